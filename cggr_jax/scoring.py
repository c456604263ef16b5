r"""Per-token statistics and difficulty (SPEC §2–§4).

For one row :math:`z \in \mathbb{R}^V` (upcast exactly to float32):

.. math::

    m = \max_j z_j, \qquad s = \sum_j e^{z_j - m}, \qquad \mathrm{lse} = m + \log s, \qquad
    p_j = e^{z_j - \mathrm{lse}}

    H = -\sum_j p_j \log p_j = \mathrm{lse} - \sum_j p_j z_j = \log s - \sum_j p_j (z_j - m)

    p_1 = \max_j p_j = 1 / s, \qquad p_2 = e^{z_{(2)} - m} / s, \qquad \mathrm{nll} = \mathrm{lse} - z_t
        = (m - z_t) + \log s

:math:`z_{(2)}` is the second largest element of the multiset :math:`\{z_j\}` (two equal maxima give
:math:`p_2 = p_1`; :math:`V = 1` gives :math:`p_2 = 0`). Entries equal to :math:`-\infty` have
:math:`p_j = 0` and contribute exactly 0 to :math:`H` (``0·(−∞)`` is never evaluated). The shifted forms above
are algebraically identical to SPEC §2 and avoid cancelling two large numbers.

Difficulty (SPEC §3), in float32 with the prescribed evaluation order:
``margin_term = 1 − (p1 − p2)``; ``entropy: H``; ``margin: margin_term``; ``loss: nll``;
``combined: (H + margin_term) + nll`` (``H + margin_term`` without targets).

:func:`token_statistics` dispatches (:func:`cggr_jax.dispatch.use_kernels`, decided at trace time) between the
reference :func:`token_statistics_reference` and ``cggr_jax.kernels.scoring.token_statistics_pallas``.
:func:`scores_from_statistics` is SPEC §3–§4 (difficulty, validity, eligibility) on statistics, shared by
every scorer of the package (the plain, fused and batch-split paths).
"""
from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from cggr import SCORING_MODES, check_reference_arguments

from cggr_jax import dispatch, utils
from cggr_jax.types import TokenScores, TokenStatistics

__all__ = [
    "check_reference_nll",
    "SCORING_MODES",
    "TokenStatistics",
    "TokenScores",
    "token_statistics",
    "token_statistics_reference",
    "difficulty_from_statistics",
    "scores_from_statistics",
    "score_tokens",
    "row_finite",
    "dispatch_statistics",
    "top_two",
]


# ------------------------------------------------------------------------------------------- statistics
def top_two(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The largest and second-largest entries along the last axis (at least 2 long), ties counted: a maximum
    that occurs twice is its own runner-up (SPEC §2's ``p_(2)``), as ``lax.top_k(z, 2)``.

    Two reductions instead of ``top_k``, which XLA lowers to a full sort of every row on the CPU (a
    ``(2032, 4096)`` float32 sort took 0.5 s there, 89 % of a small batch-split step) and which dominated
    the ``lax`` token statistics on the GPU (DECISIONS.md: jax-top-two)."""
    z1 = jnp.max(z, axis=-1)
    at_max = z == z1[..., None]
    twice = jnp.sum(at_max, axis=-1, dtype=jnp.int32) >= 2
    below = jnp.max(jnp.where(at_max, -jnp.inf, z), axis=-1)
    # A NaN row: z1 is NaN and no entry equals it; its statistics are not finite either way.
    return z1, jnp.where(twice, z1, below)


def token_statistics_reference(logits: jax.Array, safe_targets: jax.Array | None,
                               has_target: jax.Array | None) -> TokenStatistics:
    """The XLA reference of SPEC §2 on already checked inputs (see the module docstring for the math).

    ``safe_targets`` (int32, already sanitised to ``[0, V)``) and ``has_target`` (bool) are both ``None``
    or both token-shaped. Non-finite rows give non-finite statistics (never a NaN in a finite row).
    """
    z = logits.astype(jnp.float32)
    V = z.shape[-1]
    m = jnp.max(z, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    d = z - m_safe[..., None]                       # <= 0 in a finite row; -inf entries stay -inf
    e = jnp.exp(d)
    s = jnp.sum(e, axis=-1)                         # >= 1 in a finite row (the maximum contributes 1)
    log_s = jnp.log(s)
    lse = m_safe + log_s                            # -inf for an all -inf row, +inf/NaN propagate
    # H = log s - sum_j e_j d_j / s; the e_j = 0 terms of -inf entries contribute exactly 0.
    ed = jnp.where(d == -jnp.inf, 0.0, e * d)
    entropy = log_s - jnp.sum(ed, axis=-1) / s
    if V >= 2:
        z1, z2 = top_two(z)
        confidence = jnp.exp(z1 - m_safe) / s        # = 1/s in a finite row
        runner_up = jnp.exp(z2 - m_safe) / s         # exp(-inf) = 0 when the runner-up is masked
    else:                                            # V = 1: p1 = 1 (for a finite row), p2 = 0
        confidence = jnp.exp(m - m_safe) / s
        runner_up = jnp.zeros_like(confidence)
    if safe_targets is None:
        nll = jnp.zeros_like(lse)
    else:
        z_t = jnp.take_along_axis(z, safe_targets[..., None], axis=-1, mode="clip")[..., 0]
        nll = jnp.where(has_target, (m_safe - z_t) + log_s, 0.0)   # = lse − z_t, without rounding lse
    return TokenStatistics(lse, entropy, confidence, runner_up, nll)


def _checked_inputs(logits: Any, targets: Any, ignore_index: Any,
                    ) -> tuple[jax.Array, jax.Array | None, int]:
    """Validate (SPEC §1, §11) and return ``(logits, targets, ignore_index)``; concrete out-of-range targets
    raise :class:`ValueError` here (traced ones are made ineligible by the callers)."""
    logits = utils.as_logits(logits)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    if targets is None:
        return logits, None, ignore_index
    targets = utils.as_targets(targets, logits.shape, ignore_index=ignore_index)
    return logits, targets, ignore_index


def token_statistics(logits: jax.Array, targets: jax.Array | None = None, *,
                     ignore_index: int = utils.DEFAULT_CONFIG.ignore_index) -> TokenStatistics:
    """SPEC §2 for every token of ``logits`` ``(B, T, V)`` / ``(N, V)``; float32 results of the token shape.

    ``targets`` (integer, the leading dims of ``logits``) are only needed for ``nll``; a target equal to
    ``ignore_index`` (or, under ``jit``, outside ``[0, V)``) has ``nll = 0`` and is never used as an index.
    Concrete out-of-range targets raise :class:`ValueError`.

    Kernel or reference: :func:`cggr_jax.dispatch.use_kernels` (a GPU backend unless ``CGGR_DISABLE_KERNELS=1``
    or :func:`cggr_jax.dispatch.force`). The kernel path has no autodiff rule: differentiate the loss, whose
    statistics are taken under ``stop_gradient``.
    """
    logits, targets, ignore_index = _checked_inputs(logits, targets, ignore_index)
    return _token_statistics_impl(logits, targets, ignore_index=ignore_index,
                                  kernel=dispatch.use_kernels(logits))


@functools.partial(jax.jit, static_argnames=("ignore_index", "kernel"))
def _token_statistics_impl(logits: jax.Array, targets: jax.Array | None, *, ignore_index: int,
                           kernel: bool) -> TokenStatistics:
    if targets is None:
        return dispatch_statistics(logits, None, None, ignore_index, kernel=kernel)
    not_ignored, in_range, safe = utils.target_masks(targets, logits.shape[-1], ignore_index)
    return dispatch_statistics(logits, safe, not_ignored & in_range, ignore_index, kernel=kernel)


def dispatch_statistics(logits: jax.Array, safe_targets: jax.Array | None, has_target: jax.Array | None,
                        ignore_index: int, *, kernel: bool, launch: Any = None) -> TokenStatistics:
    """Statistics of checked inputs: the Pallas kernel when ``kernel`` (decide it with
    :func:`cggr_jax.dispatch.use_kernels` outside the jitted function and pass it statically), else
    :func:`token_statistics_reference`. ``safe_targets``/``has_target`` as from
    :func:`cggr_jax.utils.target_masks` (both None without targets); ``launch`` an optional
    :class:`cggr_jax.kernels.Launch` for the kernel (ignored by the reference)."""
    if not kernel:
        return token_statistics_reference(logits, safe_targets, has_target)
    kernels = dispatch.load_kernels(required=True)
    # The kernel sees in-range targets or ignore_index only (int32), never an out-of-range value.
    kernel_targets = None if safe_targets is None else jnp.where(has_target, safe_targets, ignore_index)
    stats = kernels.token_statistics_pallas(logits, kernel_targets, ignore_index,
                                            **({} if launch is None else launch.kwargs()))
    if not isinstance(stats, TokenStatistics):
        raise TypeError(f"token_statistics_pallas returned {type(stats).__name__}, expected TokenStatistics")
    chex.assert_shape(tuple(stats), logits.shape[:-1])
    chex.assert_type(tuple(stats), jnp.float32)
    if has_target is not None:  # the contract: nll is exactly 0 without a valid target
        stats = stats._replace(nll=jnp.where(has_target, stats.nll, 0.0))
    return stats


def row_finite(stats: TokenStatistics, has_targets: jax.Array | None) -> jax.Array:
    """SPEC §2: ``lse``, ``H``, ``p1``, ``p2`` and (where a valid target exists) ``nll`` all finite."""
    ok = (jnp.isfinite(stats.lse) & jnp.isfinite(stats.entropy) & jnp.isfinite(stats.confidence)
          & jnp.isfinite(stats.runner_up))
    if has_targets is not None:
        ok = ok & (jnp.isfinite(stats.nll) | ~has_targets)
    return ok


# ------------------------------------------------------------------------------------------- difficulty
def check_reference_nll(reference_nll: Any, scoring: str, token_shape: tuple[int, ...], *,
                        has_targets: bool = True) -> jax.Array | None:
    """SPEC §3.1's checks of ``reference_nll`` (``ValueError`` naming it; static, so they also run under a
    trace); returns it as a float32 array (float16/bfloat16 widen exactly, float64 rounds to nearest — on the
    host for NumPy input, so no 64-bit mode is needed) or None."""
    if reference_nll is not None and not isinstance(reference_nll, (jax.Array, np.ndarray)):
        raise ValueError(f"reference_nll: expected a floating array of shape {tuple(token_shape)} or None, got "
                         f"{type(reference_nll).__name__}")
    check_reference_arguments(scoring, None if reference_nll is None else tuple(reference_nll.shape),
                              tuple(token_shape), has_targets=has_targets)
    if reference_nll is None:
        return None
    if not jnp.issubdtype(reference_nll.dtype, jnp.floating):
        raise ValueError(f"reference_nll: expected a floating dtype (float16/bfloat16/float32/float64), got "
                         f"{reference_nll.dtype}")
    if isinstance(reference_nll, np.ndarray):
        reference_nll = reference_nll.astype(np.float32)   # round-to-nearest on the host, as torch's .to()
    return jax.lax.stop_gradient(jnp.asarray(reference_nll).astype(jnp.float32))


def difficulty_from_statistics(stats: TokenStatistics, scoring: str = utils.DEFAULT_CONFIG.scoring, *,
                               has_targets: bool = True, reference_nll: jax.Array | None = None) -> jax.Array:
    """SPEC §3 in float32: ``margin_term = 1 − (p1 − p2)``; ``entropy → H``; ``margin → margin_term``;
    ``loss → nll``; ``combined → (H + margin_term) + nll`` (``H + margin_term`` when ``has_targets`` is
    False); ``excess → nll − reference_nll`` (SPEC §3.1: NaN where the reference is not finite, so the token
    is never eligible). ``scoring='loss'``/``'excess'`` with ``has_targets=False``, and a missing, misplaced or
    mis-shaped ``reference_nll``, are a :class:`ValueError`.
    """
    utils.check_choice(scoring, "scoring", SCORING_MODES)
    if not isinstance(has_targets, bool):
        raise ValueError(f"has_targets: expected a bool, got {has_targets!r}")
    if not isinstance(stats, TokenStatistics):
        raise ValueError(f"stats: expected a TokenStatistics, got {type(stats).__name__}")
    ref = check_reference_nll(reference_nll, scoring, tuple(stats.nll.shape), has_targets=has_targets)
    if ref is not None:
        # A non-finite reference must not rank as a number (nll − (+inf) = −inf): NaN makes the token not
        # eligible, and the pipeline counts it in tokens_nonfinite (valid, in range, not eligible).
        return jnp.where(jnp.isfinite(ref), stats.nll.astype(jnp.float32) - ref, jnp.float32(jnp.nan))
    one = jnp.float32(1.0)
    entropy = stats.entropy.astype(jnp.float32)
    margin = one - (stats.confidence.astype(jnp.float32) - stats.runner_up.astype(jnp.float32))
    if scoring == "entropy":
        return entropy
    if scoring == "margin":
        return margin
    if scoring == "loss":
        if not has_targets:
            raise ValueError("scoring: 'loss' needs targets (the per-token cross-entropy); pass targets or "
                             "choose 'entropy', 'margin' or 'combined'")
        return stats.nll.astype(jnp.float32)
    d = entropy + margin
    return d + stats.nll.astype(jnp.float32) if has_targets else d


def scores_from_statistics(stats: TokenStatistics, scoring: str, *, not_ignored: jax.Array | None,
                           in_range: jax.Array | None, valid_mask: jax.Array | None = None,
                           reference_nll: jax.Array | None = None) -> TokenScores:
    """SPEC §3–§4 on statistics: ``valid`` = target ``!= ignore_index`` (``not_ignored``; every token without
    targets) and ``valid_mask``; ``eligible`` = ``valid`` and the target in ``[0, V)`` (``in_range``) and the
    row finite and the difficulty not NaN. ``not_ignored``/``in_range`` are both None without targets."""
    has_targets = not_ignored is not None
    difficulty = difficulty_from_statistics(stats, scoring, has_targets=has_targets, reference_nll=reference_nll)
    shape = stats.lse.shape
    valid = not_ignored if has_targets else jnp.ones(shape, dtype=bool)
    if valid_mask is not None:
        valid = valid & valid_mask
    has_target = (not_ignored & in_range) if has_targets else None
    usable = valid if not has_targets else valid & in_range
    eligible = usable & row_finite(stats, has_target) & ~jnp.isnan(difficulty)
    return TokenScores(difficulty, eligible, valid, stats)


def score_tokens(logits: jax.Array, targets: jax.Array | None = None, *,
                 scoring: str = utils.DEFAULT_CONFIG.scoring, ignore_index: int = utils.DEFAULT_CONFIG.ignore_index,
                 valid_mask: jax.Array | None = None, reference_nll: jax.Array | None = None) -> TokenScores:
    """SPEC §2–§4: difficulty, validity and eligibility of every token (:func:`scores_from_statistics`).

    * ``valid`` = target given and ``!= ignore_index`` (every token when ``targets`` is None), and
      ``valid_mask`` where one is passed (bool, the token shape);
    * ``eligible`` = ``valid`` and the target inside ``[0, V)`` and the row finite (SPEC §2) and the
      difficulty not NaN (and, for ``scoring='excess'``, the reference finite).

    ``reference_nll``: ``scoring='excess'`` only (and required there), the reference model's per-token loss
    of the targets' shape (SPEC §3.1).
    """
    utils.check_choice(scoring, "scoring", SCORING_MODES)
    if scoring == "loss" and targets is None:
        raise ValueError("scoring: 'loss' needs targets (the per-token cross-entropy); pass targets or "
                         "choose 'entropy', 'margin' or 'combined'")
    logits, targets, ignore_index = _checked_inputs(logits, targets, ignore_index)
    token_shape = tuple(logits.shape[:-1])
    reference_nll = check_reference_nll(reference_nll, scoring, token_shape, has_targets=targets is not None)
    if valid_mask is not None:
        vm_dtype = getattr(valid_mask, "dtype", None)
        vm_shape = getattr(valid_mask, "shape", None)
        if vm_dtype is None or vm_dtype != jnp.bool_:
            raise ValueError(f"valid_mask: expected a bool array of shape {token_shape}, got dtype {vm_dtype}")
        if tuple(vm_shape) != token_shape:
            raise ValueError(f"valid_mask: expected shape {token_shape} (the leading dimensions of logits), "
                             f"got {tuple(vm_shape)}")
        valid_mask = jnp.asarray(valid_mask)
    return _score_tokens_impl(logits, targets, valid_mask, reference_nll, scoring=scoring,
                              ignore_index=ignore_index, kernel=dispatch.use_kernels(logits))


@functools.partial(jax.jit, static_argnames=("scoring", "ignore_index", "kernel"))
def _score_tokens_impl(logits: jax.Array, targets: jax.Array | None, valid_mask: jax.Array | None,
                       reference_nll: jax.Array | None, *, scoring: str, ignore_index: int,
                       kernel: bool) -> TokenScores:
    if targets is None:
        stats = dispatch_statistics(logits, None, None, ignore_index, kernel=kernel)
        return scores_from_statistics(stats, scoring, not_ignored=None, in_range=None, valid_mask=valid_mask)
    not_ignored, in_range, safe = utils.target_masks(targets, logits.shape[-1], ignore_index)
    stats = dispatch_statistics(logits, safe, not_ignored & in_range, ignore_index, kernel=kernel)
    return scores_from_statistics(stats, scoring, not_ignored=not_ignored, in_range=in_range,
                                  valid_mask=valid_mask, reference_nll=reference_nll)
