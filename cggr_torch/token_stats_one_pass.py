r"""The ρ = 1 policy gradient's one pass over the LM head (PyTorch, kernel devices): every row's SPEC §2 statistics
and the gradient of a row-separable objective from one GEMM per row block, three ``N·V·d`` GEMMs in all where the
statistics followed by a recomputing backward (:mod:`cggr_torch.token_stats`) take four.

Split from :mod:`cggr_torch.token_stats` (whose input checks and kernel choices it uses) so that each module
holds one pass; :mod:`cggr_torch.policy_gradient` decides when it applies (DECISIONS.md:
token-stats-pure-first-version).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .kernels.launch import check_positive_int
from .token_stats import flat_inputs, gradient_kernel, statistics_op_applies
from .types import TokenStatistics
from .utils import FLOAT_DTYPES

__all__ = ["ONE_PASS_MEMORY_BUDGET", "OnePassResult", "one_pass_available", "one_pass_rows",
           "token_stats_with_gradient"]

#: The one pass's default working memory: 1 GiB, four times the token statistics' 0.25 GiB. Its row blocks grow
#: with the budget, and with them the ``∂W += Gᵀ H_r`` GEMMs, which read and write all of ``∂W`` once per block
#: (DECISIONS.md: one-pass-budget; 0.89× Liger's GRPO loss at 1 GiB, 1.02× at 0.25 GiB, with 0.59× its memory).
ONE_PASS_MEMORY_BUDGET = 1 << 30

_FILL = 0.875           # the fraction of the budget a block fills, as token_stats' plans
_ALIGN = 128


def _round_down(x: int) -> int:
    return (x // _ALIGN) * _ALIGN if x >= _ALIGN else max(1, x)


class OnePassResult(NamedTuple):
    """:func:`token_stats_with_gradient`'s statistics (token-shaped, no gradient, NaN in every field of a
    non-finite row), ``finite`` and the gradients of the caller's objective (``None`` where not asked for;
    ``grad_hidden`` is ``(N, d)``)."""

    statistics: TokenStatistics
    finite: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


def one_pass_available(hidden: torch.Tensor, temperature: float = 1.0, softcap: Optional[float] = None) -> bool:
    """Whether :func:`token_stats_with_gradient` runs here: a kernel device, float16/bfloat16/float32 inputs,
    ``temperature = 1`` and no soft-cap (the statistics kernel reads raw logits)."""
    return (isinstance(hidden, torch.Tensor) and hidden.dtype != torch.float64
            and statistics_op_applies(hidden, float(temperature), softcap) and gradient_kernel(hidden) is not None)


def one_pass_rows(num_rows: int, hidden_dim: int, vocab_size: int, dtype: Any, *, bias: bool = False,
                  memory_budget_bytes: int = ONE_PASS_MEMORY_BUDGET) -> int:
    """Rows of one block of :func:`token_stats_with_gradient`: the largest ``R`` (a multiple of 128, at least 1,
    at most ``N``) with ``R·(V·e + d·e + 64 + [bias]·V/4) ≤ 7/8·B`` - the block's whole logits row in the inputs'
    dtype, its hidden rows, its statistics and, with a bias, the gradient kernel's float32 column sums."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    e = torch.empty((), dtype=dtype).element_size()
    budget = check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)
    per_row = vocab_size * e + hidden_dim * e + 64 + (-(-vocab_size // 4) if bias else 0)
    return int(max(1, min(max(1, num_rows), _round_down(int(_FILL * budget) // per_row))))


def token_stats_with_gradient(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: Optional[torch.Tensor], row_grad: Any, *, need_hidden: bool = True,
                              need_weight: bool = True, need_bias: bool = True, ignore_index: int = -100,
                              row_chunk_size: Optional[int] = None,
                              memory_budget_bytes: int = ONE_PASS_MEMORY_BUDGET) -> OnePassResult:
    r"""Every row's statistics and the gradient of a **row-separable** objective ``L = Σ_i f_i(logprob_i)`` in one
    pass over the LM head: three ``N·V·d`` GEMMs where the statistics followed by a recomputing backward take
    four (the ρ = 1 policy gradient, DECISIONS.md: token-stats-pure-first-version).

    Row block by row block (:func:`one_pass_rows` rows): the block's whole logits row ``Z = H_r Wᵀ + b`` (one
    cuBLAS GEMM, the inputs' dtype), its SPEC §2 statistics from one read by the scoring kernel, the caller's
    ``g_i = ∂L/∂logprob_i = row_grad(r0, r1, logprob, finite)`` (float32 ``(r1 − r0,)``; ``logprob`` is 0 for
    ``ignore_index`` and NaN on a non-finite row, whose ``g`` is replaced by 0), ``Z`` turned into
    ``G = g·(onehot − p)`` in place by the gradient kernel, then ``∂h_r = G W`` and ``∂W += Gᵀ H_r`` (``∂W``
    accumulates in the weight's dtype over the ``⌈N/R⌉`` blocks, as Liger's fused losses do) and ``∂b`` in float32.

    Only where :func:`one_pass_available` (temperature 1, no soft-cap, a kernel device); the caller decides
    that the objective is separable (its ``∂L/∂logprob_i`` must not depend on other rows' values, which the
    pass has not computed yet). Working memory beyond the inputs, the outputs and the gradients: at most the
    budget ``B`` (:func:`one_pass_rows`). No host synchronisation.
    """
    if not one_pass_available(hidden):
        raise ValueError("hidden: token_stats_with_gradient needs a kernel device (CUDA, or the Triton "
                         "interpreter) and float16/bfloat16/float32 inputs; see one_pass_available")
    check_positive_int(row_chunk_size, "row_chunk_size")
    check_positive_int(memory_budget_bytes, "memory_budget_bytes", allow_none=False)
    h2, safe_t, has_t = flat_inputs(hidden, weight, targets, bias, ignore_index)
    N, d = h2.shape
    V = weight.shape[0]
    dev, dt = h2.device, h2.dtype
    f32 = torch.float32
    need_bias = need_bias and bias is not None
    R = row_chunk_size or one_pass_rows(N, d, V, dt, bias=need_bias, memory_budget_bytes=memory_budget_bytes)
    stats_kernel = dispatch.kernel("token_statistics_triton")
    launch = gradient_kernel(h2)
    out = [torch.empty((N,), dtype=f32, device=dev) for _ in range(5)]
    finite = torch.empty((N,), dtype=torch.bool, device=dev)
    gh = torch.empty((N, d), dtype=dt, device=dev) if need_hidden else None
    gw = torch.zeros_like(weight) if need_weight else None
    gb = torch.zeros((V,), dtype=f32, device=dev) if need_bias else None
    t_all = torch.where(has_t, safe_t, torch.full_like(safe_t, -1))
    zero = torch.zeros((), dtype=f32, device=dev)
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        h2 = h2.detach()
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            h_ok = torch.isfinite(h2[r0:r1]).all(dim=1)
            # A non-finite hidden row is read as zeros: its gradient row is zero, and 0·NaN never reaches ∂W.
            h = torch.where(h_ok[:, None], h2[r0:r1], torch.zeros((), dtype=dt, device=dev))
            z = F.linear(h, weight.detach(), None if bias is None else bias.detach())
            st = stats_kernel(z, t_all[r0:r1], -1)
            ok = h_ok.clone()
            for x in st:
                ok &= torch.isfinite(x)
            for buf, x in zip(out, st):
                buf[r0:r1] = torch.where(ok, x, torch.full_like(x, math.nan))
            finite[r0:r1] = ok
            has_r = has_t[r0:r1]
            logprob = torch.where(has_r, -out[4][r0:r1], torch.zeros_like(out[4][r0:r1]))
            g = row_grad(r0, r1, logprob, ok)
            g = torch.where(ok & has_r, g.to(f32), zero).contiguous()
            lse = torch.where(ok, out[0][r0:r1], zero).contiguous()
            t = torch.where(g != 0, t_all[r0:r1], torch.full_like(t_all[r0:r1], -1)).contiguous()
            colsum = torch.empty((-(-(r1 - r0) // 16), V), dtype=f32, device=dev) if need_bias else None
            no_entropy = torch.zeros_like(lse)
            launch(z, lse, no_entropy, g, no_entropy, t, 0, colsum=colsum)
            if need_bias:
                gb += colsum.sum(dim=0)
                del colsum
            if need_hidden:
                torch.mm(z, weight.detach(), out=gh[r0:r1])
            if need_weight:
                gw.addmm_(z.t(), h)
            del z, h
    stats = TokenStatistics(*out)
    return OnePassResult(stats, finite, gh, gw, None if gb is None else gb.to(dt))

