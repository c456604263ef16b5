"""Pallas GPU kernels of ``cggr_jax`` (SPEC §12): they sit behind the reference functions and meet the same
score bounds (SPEC §11) and selection. Leaves: they import only ``cggr``, ``cggr_jax.types`` and
``cggr_jax.utils``; whether they run is decided by :mod:`cggr_jax.dispatch`.

* :func:`token_statistics_pallas` — every SPEC §2 statistic of a row in one read of the logits (online
  softmax with a true whole-row top-2), returning ``cggr_jax.types.TokenStatistics``.
* :func:`chunk_statistics` — the same statistics from logits that arrive one vocabulary block at a time (the
  fused LM head's forward): each call resumes every row's carried streaming state, the last one returns the
  statistics.
* :func:`selective_cross_entropy_pallas` — mean cross-entropy over a selection with a ``jax.custom_vjp``
  whose backward reads only the selected rows and recomputes their softmax from the saved ``lse``.

Launch parameters (:mod:`.launch`). Every kernel takes ``block_rows`` (token rows per program), ``block_v``
(vocabulary columns per loop step or per program), ``num_warps`` and ``num_stages`` (see :mod:`.scoring` for
the tile layout they produce); :class:`Launch` bundles them, ``None`` meaning the default. The defaults live
in one place each, :data:`SCORING_DEFAULTS` and :data:`BACKWARD_DEFAULTS` (:class:`LaunchDefaults`, with the
block width in bytes so fp32 and bf16 issue the same loads), chosen by the GPU sweeps recorded in
DECISIONS.md (``pallas-launch-defaults``).

Where they run. The backend choice is one switch, :data:`PALLAS_GPU_BACKEND` (``"triton"``), read only by
``scoring._compiler_params``: on a GPU the generic ``pl.pallas_call`` is lowered through Pallas' Triton
backend (explicit ``jax.experimental.pallas.triton.CompilerParams``), which exists in both supported JAX
versions — 0.10.x and 0.11.x (0.11 deprecates it, warning at lowering, in favour of Mosaic GPU). Mosaic GPU
was not chosen: its ``pallas_call`` path is deprecated for ``plgpu.kernel`` (whose API changed between the
two versions), it lacks the masked loads a ragged vocabulary needs, and a bandwidth-bound row reduction gains
nothing from Hopper's wgmma/TMA. On CPU (and other backends) ``interpret=None`` resolves to
``interpret=True``, which is how the CPU test suite checks the kernels.
"""
from .cross_entropy import selective_cross_entropy_pallas
from .launch import (
    BACKWARD_DEFAULTS,
    BACKWARD_FLAT_GRID,
    PALLAS_GPU_BACKEND,
    SCORING_DEFAULTS,
    KernelConfig,
    Launch,
    LaunchDefaults,
    kernel_config,
    resolve_interpret,
)
from .scoring import chunk_statistics, token_statistics_pallas

__all__ = [
    "PALLAS_GPU_BACKEND",
    "Launch",
    "LaunchDefaults",
    "SCORING_DEFAULTS",
    "BACKWARD_DEFAULTS",
    "BACKWARD_FLAT_GRID",
    "KernelConfig",
    "kernel_config",
    "resolve_interpret",
    "token_statistics_pallas",
    "chunk_statistics",
    "selective_cross_entropy_pallas",
]
