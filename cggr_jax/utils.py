"""Argument checks shared by the package and the causal-LM shift (SPEC §1, §11).

Every check here runs at trace time on static information (shapes, dtypes, Python configuration values) and
raises :class:`ValueError` naming the argument and what was expected. The only value-dependent check,
:func:`check_target_range`, runs only when the targets are concrete (not traced): inside ``jax.jit`` values
cannot raise, and the callers make an out-of-range token ineligible instead (SPEC §11).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from cggr import CGGRConfig, check_label_dtype_range

__all__ = [
    "DEFAULT_CONFIG",
    "shift_for_causal_lm",
    "is_traced",
    "as_logits",
    "as_targets",
    "check_logits",
    "check_targets",
    "check_label_dtype",
    "check_target_range",
    "target_masks",
    "check_int",
    "check_real",
    "check_choice",
]


#: The defaults of every setting, those of ``cggr.CGGRConfig`` (never re-declared in this package).
DEFAULT_CONFIG = CGGRConfig()


# ------------------------------------------------------------------------------------------ tracing state
def is_traced(x: Any) -> bool:
    """True when ``x`` is an abstract value of a JAX transformation (``jit``, ``grad``, ``vmap``, ...).

    Concrete arrays (``jax.Array`` outside a trace, NumPy arrays, Python scalars) return False: their values
    can be read, so value checks can raise :class:`ValueError` for them.
    """
    return isinstance(x, jax.core.Tracer)


# ------------------------------------------------------------------------------------------ array checks
def as_logits(logits: Any, name: str = "logits") -> jax.Array:
    """``logits`` as a ``jax.Array`` after :func:`check_logits` (array-likes are converted)."""
    if not isinstance(logits, (jax.Array, np.ndarray)):
        try:
            logits = jnp.asarray(logits)
        except TypeError as err:
            raise ValueError(f"{name}: expected a floating-point array of shape (B, T, V) or (N, V), "
                             f"got {type(logits).__name__}") from err
    check_logits(logits, name)
    return jnp.asarray(logits)


def check_logits(logits: Any, name: str = "logits") -> None:
    """``logits`` must be floating point, rank 2 ``(N, V)`` or rank 3 ``(B, T, V)``, with ``V >= 1``."""
    dtype = getattr(logits, "dtype", None)
    shape = getattr(logits, "shape", None)
    if dtype is None or shape is None:
        raise ValueError(f"{name}: expected a floating-point array of shape (B, T, V) or (N, V), "
                         f"got {type(logits).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point dtype (float32, float16, bfloat16; float64 is "
                         f"computed in float32), got {dtype}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{name}: expected shape (B, T, V) or (N, V), got shape {tuple(shape)} "
                         f"(rank {len(shape)})")
    if shape[-1] < 1:
        raise ValueError(f"{name}: the vocabulary (last) dimension V must be >= 1, got shape {tuple(shape)}")


def as_targets(targets: Any, logits_shape: tuple[int, ...], name: str = "targets", *,
               ignore_index: int | None = None) -> jax.Array:
    """``targets`` as a ``jax.Array`` after :func:`check_targets` (array-likes are converted).

    With ``ignore_index`` also the label rules of SPEC §1.1 and §11, checked on the caller's own values
    BEFORE any conversion: the dtype must be able to hold ``ignore_index`` (:func:`check_label_dtype`), and
    concrete values must lie in ``[0, V)`` or equal ``ignore_index`` (:func:`check_target_range`). Host
    (NumPy) int64 labels are checked before ``jnp.asarray`` turns them into int32 without 64-bit mode, so a
    value beyond int32 raises instead of being wrapped into range. Errors name ``name``.
    """
    if not isinstance(targets, (jax.Array, np.ndarray)):
        try:
            targets = np.asarray(targets)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected an integer array of shape {tuple(logits_shape[:-1])}, "
                             f"got {type(targets).__name__}") from err
    check_targets(targets, logits_shape, name)
    if ignore_index is not None:
        check_label_dtype(targets.dtype, ignore_index, name)
        check_target_range(targets, logits_shape[-1], ignore_index, name)
    return jnp.asarray(targets)


def check_label_dtype(dtype: Any, ignore_index: int, name: str = "targets") -> None:
    """SPEC §1.1: an integer dtype that cannot represent ``ignore_index`` (``uint8`` with ``-100``) would wrap
    the marker onto a real token id; refused with :func:`cggr.check_label_dtype_range`. Static (dtype only)."""
    info = np.iinfo(np.dtype(dtype))
    check_label_dtype_range(name, np.dtype(dtype).name, int(info.min), int(info.max), int(ignore_index))


def check_targets(targets: Any, logits_shape: tuple[int, ...], name: str = "targets") -> None:
    """``targets`` must have an integer dtype and exactly the leading dimensions of the logits."""
    dtype = getattr(targets, "dtype", None)
    shape = getattr(targets, "shape", None)
    expected = tuple(logits_shape[:-1])
    if dtype is None or shape is None:
        raise ValueError(f"{name}: expected an integer array of shape {expected}, got {type(targets).__name__}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype (token ids), got {dtype}")
    if tuple(shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} (the leading dimensions of logits "
                         f"{tuple(logits_shape)}), got {tuple(shape)}")


def target_masks(targets: jax.Array, vocab_size: int,
                 ignore_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(not_ignored, in_range, safe_targets)`` for integer ``targets``.

    * ``not_ignored``: ``target != ignore_index``;
    * ``in_range``: ``0 <= target < vocab_size``;
    * ``safe_targets``: int32, the target where it is both, else 0 — the only index ever used for a gather,
      so that no out-of-bounds read can happen (SPEC §4).

    Comparisons are made in the targets' own dtype with bounds decided statically from ``jnp.iinfo``, so an
    unsigned or narrow dtype never wraps ``ignore_index`` or ``vocab_size`` into a different value.
    """
    info = jnp.iinfo(targets.dtype)
    if info.min <= ignore_index <= info.max:
        not_ignored = targets != jnp.asarray(ignore_index, dtype=targets.dtype)
    else:
        not_ignored = jnp.ones(targets.shape, dtype=bool)
    lower_ok = (targets >= 0) if info.min < 0 else jnp.ones(targets.shape, dtype=bool)
    if vocab_size <= info.max:
        upper_ok = targets < jnp.asarray(vocab_size, dtype=targets.dtype)
    else:
        upper_ok = jnp.ones(targets.shape, dtype=bool)
    in_range = lower_ok & upper_ok
    safe = jnp.where(not_ignored & in_range, targets, 0).astype(jnp.int32)
    return not_ignored, in_range, safe


def check_target_range(targets: Any, vocab_size: int, ignore_index: int, name: str = "targets") -> None:
    """Raise :class:`ValueError` if a concrete ``targets`` holds a value outside ``[0, V)`` that is not
    ``ignore_index``. Traced targets are not checked here (SPEC §11: under ``jit`` the token is made
    ineligible and counted in the metric ``tokens_out_of_range``).

    This reads the values, so it synchronises with the device; it only ever runs eagerly.
    """
    if is_traced(targets):
        return
    t = np.asarray(targets)
    if t.size == 0:
        return
    if t.dtype != np.uint64:
        t = t.astype(np.int64)   # widened: unsigned and narrow dtypes are compared as their true values
    not_ignored = (t != ignore_index) if ignore_index >= 0 or t.dtype != np.uint64 else np.ones(t.shape, bool)
    bad = not_ignored & ((t < 0) | (t >= vocab_size))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: values must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {int(t[first])} at index {first} ({int(bad.sum())} out of range in total)")


# ----------------------------------------------------------------------------------- configuration checks
def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int; ``ValueError`` if it is not an integer (bools rejected) or out of range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {value}")
    return value


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """``value`` as a finite Python float within the given bounds; ``ValueError`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- causal shift
def shift_for_causal_lm(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pair each position's prediction with the next token: ``(logits[:, :-1], labels[:, 1:])`` (SPEC §1).

    ``logits`` is ``(B, T, V)`` (a model's output at every input position) and ``labels`` ``(B, T)``; the
    results are ``(B, T-1, V)`` and ``(B, T-1)``. The loss itself never shifts.
    """
    logits = as_logits(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape (B, T, V) for a causal LM, got {tuple(logits.shape)}")
    if isinstance(labels, np.ndarray):
        # Host labels stay NumPy, so that the loss checks their true values before any conversion (SPEC §1.1).
        check_targets(labels, logits.shape, "labels")
    else:
        labels = as_targets(labels, logits.shape, "labels")
    return logits[:, :-1], labels[:, 1:]
