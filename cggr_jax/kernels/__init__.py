"""Pallas GPU kernels of ``cggr_jax`` (SPEC §12): they sit behind the reference functions and meet the same
score bounds (SPEC §11) and selection.

* :func:`token_statistics_pallas` — every SPEC §2 statistic of a row in one read of the logits (online
  softmax with a true whole-row top-2), returning ``cggr_jax.scoring.TokenStatistics``.
* :func:`chunk_statistics` — the same statistics from logits that arrive one vocabulary block at a time (the
  fused LM head's forward): each call resumes every row's carried streaming state, the last one returns the
  statistics.
* :func:`selective_cross_entropy_pallas` — mean cross-entropy over a selection with a ``jax.custom_vjp``
  whose backward reads only the selected rows and recomputes their softmax from the saved ``lse``.
* :func:`scored_selective_cross_entropy_pallas` — scores → ``cggr_jax.selection.select_tokens`` → the loss.

Launch parameters. Every kernel takes ``block_rows`` (token rows per program), ``block_v`` (vocabulary
columns per loop step or per program), ``num_warps`` and ``num_stages`` (see :mod:`.scoring` for the tile
layout they produce); :class:`Launch` bundles them, ``None`` meaning the default. The defaults live in one
place each, :data:`SCORING_DEFAULTS` and :data:`BACKWARD_DEFAULTS` (:class:`LaunchDefaults`, with the block
width in bytes so fp32 and bf16 issue the same loads); ``benchmarks/bench_scoring_jax.py`` and
``benchmarks/bench_selective_ce_jax.py`` sweep them on a GPU and print the best as a ready
``LaunchDefaults(...)`` line.

Where they run. The backend choice is one switch, :data:`PALLAS_GPU_BACKEND` (``"triton"``), read only by
``scoring._compiler_params``: on a GPU the generic ``pl.pallas_call`` is lowered through Pallas' Triton
backend (explicit ``jax.experimental.pallas.triton.CompilerParams``), which exists in both supported JAX
versions — 0.10.x and 0.11.x (0.11 deprecates it, warning at lowering, in favour of Mosaic GPU). Mosaic GPU
was not chosen: its ``pallas_call`` path is deprecated for ``plgpu.kernel`` (whose API changed between the
two versions), it lacks the masked loads a ragged vocabulary needs, and a bandwidth-bound row reduction gains
nothing from Hopper's wgmma/TMA. On CPU (and other backends) ``interpret=None`` resolves to
``interpret=True``, which is how the CPU test suite checks the kernels; ``cggr_jax`` itself routes to them
only when :func:`use_pallas_kernels` is true (a GPU backend, ``CGGR_DISABLE_KERNELS`` unset) and uses the
XLA reference otherwise.
"""
from .cross_entropy import scored_selective_cross_entropy_pallas, selective_cross_entropy_pallas
from .scoring import (
    BACKWARD_DEFAULTS,
    PALLAS_GPU_BACKEND,
    SCORING_DEFAULTS,
    KernelConfig,
    Launch,
    LaunchDefaults,
    chunk_statistics,
    kernel_config,
    kernels_enabled,
    resolve_interpret,
    token_statistics_pallas,
    use_pallas_kernels,
)

__all__ = [
    "PALLAS_GPU_BACKEND",
    "Launch",
    "LaunchDefaults",
    "SCORING_DEFAULTS",
    "BACKWARD_DEFAULTS",
    "KernelConfig",
    "kernel_config",
    "kernels_enabled",
    "resolve_interpret",
    "use_pallas_kernels",
    "token_statistics_pallas",
    "chunk_statistics",
    "selective_cross_entropy_pallas",
    "scored_selective_cross_entropy_pallas",
]
