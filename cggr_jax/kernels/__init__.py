"""Pallas GPU kernels of ``cggr_jax`` (SPEC §12): they sit behind the reference functions and meet the same
score bounds (SPEC §11) and selection.

* :func:`token_statistics_pallas` — every SPEC §2 statistic of a row in one read of the logits (online
  softmax with a true whole-row top-2), returning ``cggr_jax.scoring.TokenStatistics``.
* :func:`selective_cross_entropy_pallas` — mean cross-entropy over a selection with a ``jax.custom_vjp``
  whose backward reads only the selected rows and recomputes their softmax from the saved ``lse``.
* :func:`scored_selective_cross_entropy_pallas` — scores → ``cggr_jax.selection.select_tokens`` → the loss.

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
    PALLAS_GPU_BACKEND,
    KernelConfig,
    kernel_config,
    kernels_enabled,
    resolve_interpret,
    token_statistics_pallas,
    use_pallas_kernels,
)

__all__ = [
    "PALLAS_GPU_BACKEND",
    "KernelConfig",
    "kernel_config",
    "kernels_enabled",
    "resolve_interpret",
    "use_pallas_kernels",
    "token_statistics_pallas",
    "selective_cross_entropy_pallas",
    "scored_selective_cross_entropy_pallas",
]
