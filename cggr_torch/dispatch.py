"""The one place deciding kernel vs reference in ``cggr_torch`` (mirrored by ``cggr_jax.dispatch``).

Rule: a tensor on a kernel device (CUDA) uses the Triton kernels of :mod:`cggr_torch.kernels` unless the
environment variable ``CGGR_DISABLE_KERNELS`` is ``1``/``true``/``yes``; every other tensor uses the PyTorch
reference. Only a missing kernel module (or a missing Triton) selects the reference on a kernel device, with a
one-time ``RuntimeWarning``; an error raised *by* a kernel propagates, never replaced by the reference.

:func:`force` overrides the rule for a block of code (tests use it instead of patching module globals)::

    with dispatch.force("kernel") as log:      # every device takes the kernels (CPU: the Triton interpreter)
        loss = cggr_loss(logits, targets, 3)
    assert log.calls["select_from_scores"] == 1

* ``"kernel"``: every tensor goes to the kernels, including :class:`cggr_torch.CGGRLoss`'s fused kernel path
  (``fused_loss=False`` keeps that loss on its composable path: scoring kernel, selection, selective CE;
  ``scoring='excess'`` takes the composable path except with ``selection='sampled'``, see
  :func:`use_fused_loss`);
* ``"reference"``: every tensor goes to the reference (as ``CGGR_DISABLE_KERNELS=1``);
* ``"auto"``: the rule above.

``kernels={name: fn}`` substitutes kernel entry points for the block (a fake kernel in a test); the returned
:class:`DispatchLog` counts the calls of every kernel entry point obtained through :func:`kernel` meanwhile.
Under ``torch.compile`` the dispatch is decided when the call is traced, and only eager calls are counted
(a count inside a graph would be a side effect that the compiler guards on).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from cggr import REFERENCE_SCORING_MODES
from cggr.config import SAMPLED_SELECTIONS

__all__ = ["MODES", "KERNEL_DEVICE_TYPES", "FUSED_LOSS_DEVICE_TYPES", "KERNEL_ENTRY_POINTS", "DispatchLog",
           "kernels_enabled", "use_kernels", "use_fused_loss", "load_kernel", "kernel", "warn_no_kernel", "force",
           "mode", "preload_kernels"]

MODES: tuple[str, ...] = ("auto", "kernel", "reference")
#: Devices whose tensors use the kernels under ``"auto"``.
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: Devices whose tensors take ``CGGRLoss``'s fused kernel path under ``"auto"`` (elsewhere, e.g. the Triton
#: interpreter, the loss composes the scoring kernel, the selection and the selective cross-entropy kernel).
FUSED_LOSS_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: Every kernel entry point the package dispatches to: name → the kernel module that defines it.
KERNEL_ENTRY_POINTS: Mapping[str, str] = {
    "token_statistics_triton": "cggr_torch.kernels.scoring",
    "selective_cross_entropy_triton": "cggr_torch.kernels.cross_entropy",
    "select_tokens_triton": "cggr_torch.kernels.selection",
    "rank_tokens_triton": "cggr_torch.kernels.selection",
    "select_from_scores": "cggr_torch.kernels.selection",
    "launch_chunk_gradient": "cggr_torch.kernels.fused_linear",
    "launch_token_stats_gradient": "cggr_torch.kernels.token_stats_gradient",
    "sample_tokens_triton": "cggr_torch.kernels.sampling",
    "sampling_probabilities_triton": "cggr_torch.kernels.sampling",
    "sample_from_scores": "cggr_torch.kernels.sampled_loss",
    "launch_head_statistics": "cggr_torch.kernels.fused_head_gemm",
    "launch_head_gradient": "cggr_torch.kernels.fused_head_gemm",
}


@dataclass
class DispatchLog:
    """What a :func:`force` block dispatched: ``calls[name]`` = calls of kernel entry point ``name``."""

    calls: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class _State:
    mode: str = "auto"
    fused_loss: bool = True
    overrides: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)


_state = _State()
_import_cache: dict[tuple[str, str], Optional[Callable[..., Any]]] = {}
_warned = False


def mode() -> str:
    """The mode in force: ``"auto"`` unless inside :func:`force`."""
    return _state.mode


def kernels_enabled() -> bool:
    """False under ``force("reference")`` or when ``CGGR_DISABLE_KERNELS`` is ``1``/``true``/``yes``
    (``force("kernel")`` enables them whatever the environment says)."""
    if _state.mode != "auto":
        return _state.mode == "kernel"
    return os.environ.get("CGGR_DISABLE_KERNELS", "").strip().lower() not in ("1", "true", "yes")


def use_kernels(x: torch.Tensor) -> bool:
    """True when ``x`` goes to the kernels: its device has them (or ``force("kernel")``) and they are enabled."""
    if _state.mode != "auto":
        return _state.mode == "kernel"
    return x.device.type in KERNEL_DEVICE_TYPES and kernels_enabled()


def use_fused_loss(x: torch.Tensor, scoring: Optional[str] = None, selection: Optional[str] = None) -> bool:
    """True when ``CGGRLoss`` on ``x`` takes its fused kernel path (the kernel-side realisation of
    :mod:`cggr_torch.pipeline`); the entry point must also import (see :func:`kernel`).

    ``scoring``: the loss's scoring mode. The fused path computes the difficulty and the sort keys inside the
    scoring kernel, which knows only the modes without a reference; a reference mode (``'excess'``, SPEC §3.1)
    therefore takes the composable path (scoring kernel → ``nll − reference_nll`` → selection kernel →
    selective cross-entropy kernel), even under ``force("kernel")``. This is the dispatch rule, not a
    fallback: the subtraction is one elementwise pass over N floats, never over the logits (SPEC §3.1).

    ``selection``: the loss's strategy. ``'sampled'`` (SPEC §7.4) has its own fused path
    (``loss.forward_sampled``: the scoring kernel, then ``sample_from_scores`` of
    :mod:`cggr_torch.kernels.sampling`, whose probability kernel computes the metrics and the ratio and whose
    draw kernel writes the loss's row weights), for every scoring mode: with ``'excess'`` the sampler's first
    kernel subtracts the reference while it reads the scores.
    """
    sampled = selection is not None and selection in SAMPLED_SELECTIONS
    if scoring is not None and scoring in REFERENCE_SCORING_MODES and not sampled:
        return False
    if not use_kernels(x):
        return False
    if _state.mode == "kernel":
        return _state.fused_loss
    return x.device.type in FUSED_LOSS_DEVICE_TYPES


def load_kernel(module_name: str, attr: str) -> Optional[Callable[..., Any]]:
    """``module_name.attr`` if the module imports; None if that module (or Triton) does not exist.

    Any other import error (a bug in the kernel module) propagates. The result is memoised per process.
    """
    key = (module_name, attr)
    if key not in _import_cache:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing in (module_name, "cggr_torch.kernels", "triton") or missing.startswith("triton."):
                _import_cache[key] = None
                return None
            raise
        _import_cache[key] = getattr(module, attr)
    return _import_cache[key]


def preload_kernels() -> None:
    """Import every kernel module now (memoised by :func:`load_kernel`; a missing Triton is remembered as None).

    ``torch.compile`` cannot trace an import, so the entry points must be resolved before a compiled call
    first asks for them (SPEC §12.1): :func:`force` does this for ``"kernel"``, and the CGGR modules do it when
    they are built on a machine with a kernel device and kernels enabled. A compiled call that still finds a
    module unimported imports it outside the graph (one graph break, that call only)."""
    for name, module_name in KERNEL_ENTRY_POINTS.items():
        load_kernel(module_name, name)


@torch.compiler.disable
def _load_outside_graph(module_name: str, attr: str) -> Optional[Callable[..., Any]]:
    return load_kernel(module_name, attr)


def _counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    logs = list(_state.logs)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        # A traced call is not counted: counting would be a side effect of the graph, which the compiler
        # guards on (a recompilation at every call).
        if not torch.compiler.is_compiling():
            for log in logs:
                log.calls[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def kernel(name: str) -> Optional[Callable[..., Any]]:
    """The kernel entry point ``name`` (a key of :data:`KERNEL_ENTRY_POINTS`), or None when its module (or
    Triton) is not importable, after a one-time warning. Call only where :func:`use_kernels` said so."""
    fn = _state.overrides.get(name)
    if fn is None:
        module_name = KERNEL_ENTRY_POINTS[name]
        if (module_name, name) in _import_cache:
            fn = _import_cache[(module_name, name)]
        elif torch.compiler.is_compiling():
            fn = _load_outside_graph(module_name, name)
        else:
            fn = load_kernel(module_name, name)
        if fn is None:
            warn_no_kernel(module_name)
            return None
    return _counted(name, fn) if _state.logs else fn


def warn_no_kernel(what: str) -> None:
    """One warning per process that a kernel device uses the reference because Triton is not importable."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"cggr_torch: the Triton kernels ({what}) are not importable; CUDA tensors use the "
                      f"PyTorch reference", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def force(mode: str = "kernel", *, fused_loss: bool = True,
          kernels: Optional[Mapping[str, Callable[..., Any]]] = None) -> Iterator[DispatchLog]:
    """Force ``mode`` (``"kernel"``, ``"reference"`` or ``"auto"``) inside the block; see the module docstring.

    Raises:
        ValueError: an unknown mode or kernel name.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    unknown = sorted(set(kernels or {}) - set(KERNEL_ENTRY_POINTS))
    if unknown:
        raise ValueError(f"kernels: unknown kernel entry point(s) {unknown}; expected names of "
                         f"{sorted(KERNEL_ENTRY_POINTS)}")
    if mode == "kernel":
        preload_kernels()
    saved = (_state.mode, _state.fused_loss, dict(_state.overrides))
    log = DispatchLog()
    _state.mode, _state.fused_loss = mode, bool(fused_loss)
    _state.overrides.update(kernels or {})
    _state.logs.append(log)
    try:
        yield log
    finally:
        _state.mode, _state.fused_loss, _state.overrides = saved
        _state.logs.remove(log)
