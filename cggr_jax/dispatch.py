"""The one place that decides between the Pallas kernels and the XLA reference (SPEC §12).

* :func:`kernels_enabled` — False when the environment variable ``CGGR_DISABLE_KERNELS`` is ``1``/``true``/
  ``yes`` (the switch shared with ``cggr_torch``) or while :func:`force` holds ``"reference"``.
* :func:`use_kernels` — whether a computation on ``x`` (an array; its backend, or the default backend for a
  traced value or ``None``) goes to the kernels: in ``"auto"`` mode, a GPU backend with kernels enabled whose
  kernel modules import (a failed import warns once and falls back to the reference, which SPEC §12 allows:
  both meet the same bounds); ``"kernel"`` forces them on any backend (interpreted off the GPU; an import
  failure then raises); ``"reference"`` never uses them.
* :func:`force` — a context manager setting the mode, used by tests instead of patching module globals.

**Trace time.** The decision is read when a function is *traced*: the package's own jitted implementations
take it as a static argument (a forced mode gets its own compilation, never a stale cache entry), and a
function that the caller jitted keeps the path it was traced with — wrap the tracing (the first call) in
:func:`force`, or build a fresh ``jax.jit``, to change it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Any, Iterator

import jax

__all__ = ["MODES", "DISABLE_ENV", "GPU_PLATFORMS", "kernels_enabled", "use_kernels", "force", "mode",
           "load_kernels"]

#: The modes of :func:`force`.
MODES: tuple[str, ...] = ("auto", "kernel", "reference")
#: The environment switch shared with ``cggr_torch``.
DISABLE_ENV = "CGGR_DISABLE_KERNELS"
#: The platforms on which ``"auto"`` uses the kernels.
GPU_PLATFORMS: tuple[str, ...] = ("gpu", "cuda", "rocm")

_state = threading.local()


def mode() -> str:
    """The mode in force: ``"auto"`` unless inside :func:`force`."""
    return getattr(_state, "mode", "auto")


def kernels_enabled() -> bool:
    """False when ``CGGR_DISABLE_KERNELS`` is set to ``1``/``true``/``yes``, or the mode is ``"reference"``."""
    if mode() == "reference":
        return False
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def _import_kernels() -> Any:
    try:
        from cggr_jax import kernels
    except ImportError as err:
        return err
    return kernels


def load_kernels(*, required: bool = False) -> Any:
    """The ``cggr_jax.kernels`` package, or None if it does not import (warns once; raises if ``required``)."""
    result = _import_kernels()
    if isinstance(result, ImportError):
        if required:
            raise ImportError(f"cggr_jax.kernels did not import: {result!r}") from result
        if not getattr(_state, "warned", False):
            _state.warned = True
            warnings.warn(f"cggr_jax: the Pallas kernels could not be imported ({result!r}); using the XLA "
                          f"reference on this GPU backend", RuntimeWarning, stacklevel=3)
        return None
    return result


def _platform(x: Any) -> str:
    if x is not None and isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            return next(iter(x.devices())).platform
        except Exception:  # noqa: BLE001 - a deleted or exotic array: fall back to the default backend
            pass
    return jax.default_backend()


def use_kernels(x: Any = None) -> bool:
    """Whether a computation on ``x`` runs the Pallas kernels (see the module docstring). Trace-time only."""
    current = mode()
    if current == "reference":
        return False
    if current == "kernel":
        load_kernels(required=True)
        return True
    if not kernels_enabled() or _platform(x) not in GPU_PLATFORMS:
        return False
    return load_kernels() is not None


@contextlib.contextmanager
def force(mode: str) -> Iterator[None]:  # the argument shadows mode(): the state is read directly
    """Within the block, :func:`use_kernels` follows ``mode`` (``"kernel"``, ``"reference"``, ``"auto"``).

    Affects what is traced inside the block (see the module docstring); restores the previous mode on exit.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    previous = getattr(_state, "mode", "auto")
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous
