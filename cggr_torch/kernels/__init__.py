"""Triton kernels of ``cggr_torch`` (SPEC §12): one-pass scoring, device selection, selective cross-entropy.

Public entry points (imported lazily, so that ``import cggr_torch.kernels`` works without Triton):

* :func:`token_statistics_triton` ``(logits, targets=None, ignore_index=-100) -> TokenStatistics`` - the
  SPEC §2 statistics of every token from **one read of the logits** (online softmax, per row: running max
  ``m``, ``d = Σ 2^{u}``, ``s = Σ 2^{u}·u`` with ``u = z·log2(e) − c`` and a true whole-row top-2);
* :func:`launch_scoring_chunk` - the same statistics from logits that arrive one vocabulary block at a time
  (the fused LM head's forward): each launch resumes every row's streaming state where the previous block
  left it, the last one writes the statistics;
* :func:`score_tokens_triton` - the same pass plus the difficulty of one scoring mode and eligibility
  (SPEC §3-§4), mirroring :func:`cggr_torch.scoring.score_tokens`;
* :func:`selective_cross_entropy_triton` ``(logits, targets, mask, *, ignore_index=-100, lse=None,
  inplace_backward=False) -> loss`` - ``Σ_{i∈mask} nll_i / max(1, |mask|)`` as an autograd function whose
  backward writes ``(softmax − onehot)·g/|mask|`` only for selected rows (recomputed from the saved ``lse``)
  and zeros elsewhere, optionally into the logits buffer;
* :func:`select_tokens_triton` / :func:`rank_tokens_triton` - SPEC §6-§7 selection on the device in a few
  launches (sort key → one ``torch.sort`` → a one-program plan for ``n``/``k``/strata → one mask pass),
  bit-identical to :func:`cggr_torch.selection.select_tokens`, which dispatches CUDA tensors to it;
  :func:`select_from_scores` is the fused :class:`cggr_torch.CGGRLoss` path's selection (the plan also
  computes the dynamic ratio and every SPEC §10 metric);
* :func:`sample_tokens_triton` / :func:`sampling_probabilities_triton` - SPEC §7.4's ``sampled`` selection
  (probabilities → one ``torch.sort`` → water-filling → draws: three launches around the sort, six for large
  inputs), behind :func:`cggr_torch.selection.sample_tokens` / :func:`~cggr_torch.selection.sampling_probabilities`;
  :func:`sample_from_scores` (:mod:`~cggr_torch.kernels.sampled_loss`) is the fused ``sampled`` loss after the
  scoring kernel (probabilities with every SPEC §10 metric, sort, water-filling, draws writing the row weights, a
  one-program finish with the loss);
* :func:`scored_selective_cross_entropy` - the fused path's loss: the masked mean of the scoring pass's
  ``nll`` with the same sparse backward;
* :func:`launch_head_statistics` / :func:`launch_head_gradient` - the fused LM head's GEMMs with the CGGR work
  in their epilogues (``head_kernel="gemm"``): the split-V forward statistics and the backward's chunk
  gradient, no logits block in memory (:class:`HeadGemmConfig`, :func:`head_gemm_config`,
  :data:`HEAD_GEMM_CONFIGS`, :func:`head_splits`: their tile shapes and vocabulary splits);
* :func:`launch_token_stats_gradient` - the per-token log-prob / entropy backward's chunk gradient
  (:mod:`cggr_torch.token_stats`, SPEC §14.1): a recomputed logits chunk becomes the gradient of
  ``Σ g_lp·logprob + g_H·H`` in place, temperature and soft-cap included.

Launch-grid and block-size heuristics live in one place: :mod:`cggr_torch.kernels.launch`
(:class:`LaunchConfig`, :func:`scoring_config`, :func:`lse_config`, :func:`backward_config`, the fused LM head's
:func:`plan_chunks`), the input handling every launcher shares in :mod:`cggr_torch.kernels.inputs` (device
checks, row addressing); the kernel modules import only ``cggr``, ``cggr_torch.types``, ``cggr_torch.utils`` and each
other, never a policy module (dispatch is :mod:`cggr_torch.dispatch`'s). The benchmarks
``benchmarks/bench_scoring_torch.py`` (scoring variants), ``benchmarks/bench_selective_ce_torch.py``
(backward variants) and ``benchmarks/bench_selection_torch.py`` (sort variants) sweep alternatives on a GPU.

Every entry point runs its launches inside a ``torch.library`` custom op (namespace ``cggr``, registered in the
module of its kernel, with a fake implementation and, where a gradient flows, a backward op), so that
``torch.compile`` treats a kernel as one opaque node (SPEC §12.1). The variants with an explicit launch
configuration or ``inplace_backward=True`` stay eager-only autograd functions.

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported); otherwise they need CUDA tensors. Kernel errors are raised, never replaced by the reference.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = [
    "triton_available",
    "token_statistics_triton",
    "score_tokens_triton",
    "launch_scoring_chunk",
    "selective_cross_entropy_triton",
    "scored_selective_cross_entropy",
    "select_tokens_triton",
    "rank_tokens_triton",
    "select_from_scores",
    "sample_tokens_triton",
    "sampling_probabilities_triton",
    "sample_from_scores",
    "LaunchConfig",
    "scoring_config",
    "lse_config",
    "backward_config",
    "launch_head_statistics",
    "launch_head_gradient",
    "launch_token_stats_gradient",
    "HeadGemmConfig",
    "HEAD_GEMM_CONFIGS",
    "head_gemm_config",
    "head_splits",
]

_LAZY = {
    "token_statistics_triton": "scoring",
    "score_tokens_triton": "scoring",
    "launch_scoring_chunk": "scoring",
    "LaunchConfig": "launch",
    "scoring_config": "launch",
    "lse_config": "launch",
    "backward_config": "launch",
    "selective_cross_entropy_triton": "cross_entropy",
    "scored_selective_cross_entropy": "cross_entropy",
    "select_tokens_triton": "selection",
    "rank_tokens_triton": "selection",
    "select_from_scores": "selection",
    "sample_tokens_triton": "sampling",
    "sampling_probabilities_triton": "sampling",
    "sample_from_scores": "sampled_loss",
    "launch_head_statistics": "fused_head_gemm",
    "launch_head_gradient": "fused_head_gemm",
    "launch_token_stats_gradient": "token_stats_gradient",
    "HeadGemmConfig": "fused_head_gemm",
    "HEAD_GEMM_CONFIGS": "fused_head_gemm",
    "head_gemm_config": "fused_head_gemm",
    "head_splits": "fused_head_gemm",
}


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported by this call)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str) -> Any:
    """Import the kernel modules on first use (PEP 562); a missing Triton raises ``ModuleNotFoundError``."""
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
