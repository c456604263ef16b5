"""Which tokens are kept: the total order and the selection strategies (SPEC §6, §7).

Everything here is exact comparison and integer arithmetic on the device; nothing reads a value back to the
host, and nothing loops over tokens in Python.

The total order (§6): eligible tokens by difficulty descending, ties by lower flat index. Both paths sort an
int32 key once: ``b`` = the float32 bits of the difficulty (``−0.0`` canonicalised to ``+0.0``),
``o = b`` if ``b ≥ 0`` else ``b ^ 0x7FFFFFFF`` (monotone in the value, ``±∞`` included), ``key = ~o`` for
eligible tokens and ``2^31 − 1`` for the others (no eligible key reaches it: that would be a NaN). One stable
ascending sort puts the ``n`` eligible tokens first, in rank order, so ``rank(order[j]) = j`` - no cumulative
count, no comparison of keys after the sort.

Dtype rule (SPEC §6): float64 difficulties are first rounded to float32 (round to nearest even), then ranked
like any other, so both packages select the same tokens from the same array; float16/bfloat16 values are
exact in float32. Two float64 values that round to the same float32 tie, broken by the lower flat index.

Dispatch (:mod:`cggr_torch.dispatch`): CUDA tensors use the Triton implementation
:func:`cggr_torch.kernels.selection.select_tokens_triton` (keys → sort → a one-program plan for ``n``/``k``/
strata → one mask pass: a handful of launches instead of dozens) unless kernels are disabled or Triton is not
importable (then the PyTorch code below). Both give bit-identical masks and ``k`` (tested against the oracle).
"""
from __future__ import annotations

import numbers
from typing import Union

import numpy as np
import torch

from cggr import SELECTION_STRATEGIES

from . import dispatch
from .curriculum import num_selected
from .utils import check_selection

__all__ = ["SELECTION_STRATEGIES", "rank_tokens", "select_tokens", "stratum_counts", "order_key32",
           "as_ranking_dtype", "check_inputs"]

_SENTINEL = 2**31 - 1


def check_inputs(difficulty: torch.Tensor, eligible: torch.Tensor) -> None:
    """Static checks of the selection inputs (no device work): float ``(N,)``/``(B, T)`` difficulty, bool
    ``eligible`` of the same shape and device."""
    if not isinstance(difficulty, torch.Tensor) or not difficulty.dtype.is_floating_point:
        raise ValueError(f"difficulty: expected a floating tensor of shape (N,) or (B, T), got "
                         f"{difficulty.dtype if isinstance(difficulty, torch.Tensor) else type(difficulty).__name__}")
    if difficulty.dim() not in (1, 2):
        raise ValueError(f"difficulty: expected shape (N,) or (B, T), got {tuple(difficulty.shape)}")
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool:
        raise ValueError(f"eligible: expected a bool tensor, got "
                         f"{eligible.dtype if isinstance(eligible, torch.Tensor) else type(eligible).__name__}")
    if tuple(eligible.shape) != tuple(difficulty.shape):
        raise ValueError(f"eligible: expected shape {tuple(difficulty.shape)} (that of difficulty), got "
                         f"{tuple(eligible.shape)}")
    if eligible.device != difficulty.device:
        raise ValueError(f"eligible: expected device {difficulty.device}, got {eligible.device}")


def as_ranking_dtype(difficulty: torch.Tensor) -> torch.Tensor:
    """The difficulties that are ranked (SPEC §6): float64 rounded to float32 (to nearest), others as given."""
    return difficulty.to(torch.float32) if difficulty.dtype == torch.float64 else difficulty


def order_key32(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """int32 key whose ascending order is SPEC §6 (see the module docstring); ``d`` float32, ``e`` bool."""
    d = torch.where(d == 0, torch.zeros_like(d), d).contiguous()          # −0.0 → +0.0
    bits = d.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return torch.where(e, torch.bitwise_not(ordered), torch.full_like(ordered, _SENTINEL))


def _sorted_order(difficulty: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, n)``: flat indices with the ``n`` eligible tokens first, in rank order (SPEC §6)."""
    d = as_ranking_dtype(difficulty).reshape(-1)
    e = eligible.reshape(-1) & ~torch.isnan(d)
    order = torch.sort(order_key32(d.to(torch.float32), e), stable=True).indices
    return order, e.sum()




def _flat_rank(difficulty: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """int64 rank of every flat token (−1 where not eligible or NaN), SPEC §6."""
    order, n = _sorted_order(difficulty, eligible)
    pos = torch.arange(order.numel(), device=order.device, dtype=torch.int64)
    return torch.empty_like(pos).scatter_(0, order, torch.where(pos < n, pos, torch.full_like(pos, -1)))


def rank_tokens(difficulty: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of every eligible token in the total order of SPEC §6; ``−1`` where not eligible.

    Difficulty descending, ties by lower flat index (row-major); ``±0.0`` equal; a NaN difficulty is not
    eligible. Returns int32 of the input shape (``n < 2**31``).

    Args:
        difficulty: float tensor ``(N,)`` or ``(B, T)``.
        eligible: bool tensor of the same shape.
    """
    check_inputs(difficulty, eligible)
    difficulty = as_ranking_dtype(difficulty)
    if dispatch.use_kernels(difficulty):
        kernel = dispatch.kernel("rank_tokens_triton")
        if kernel is not None:
            return kernel(difficulty, eligible)
    return _flat_rank(difficulty, eligible).to(torch.int32).reshape(difficulty.shape)


def stratum_counts(n: torch.Tensor, k: torch.Tensor, num_strata: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Stratum bounds, sizes ``m_s`` and effective quotas ``e_s`` of SPEC §7.2, vectorised in int64.

    ``bounds_s = floor(s·n/S)`` (``S + 1`` values), ``m_s = bounds_{s+1} − bounds_s``; quotas
    ``q_s = floor(k·(S − s)/W)`` (``W = S(S+1)/2``) plus one for ``s < R = k − Σ q``. The first spill-over
    walk ``e_s = min(m_s, q_s + c)``, ``c ← q_s + c − e_s`` is the recursion ``c_s = max(0, c_{s−1} + q_s − m_s)``
    whose closed form is ``c_s = P_s − min(0, min_{j≤s} P_j)`` with ``P_s = Σ_{i≤s}(q_i − m_i)``; then
    ``e_s = q_s + c_{s−1} − c_s``. The second walk hands the final carry ``C`` to the strata in order:
    ``extra_s = clamp(C − Σ_{i<s}(m_i − e_i), 0, m_s − e_s)``.
    """
    S = int(num_strata)
    dev = n.device
    s_all = torch.arange(S + 1, device=dev, dtype=torch.int64)
    bounds = torch.div(s_all * n, S, rounding_mode="floor")
    m = bounds[1:] - bounds[:-1]
    W = S * (S + 1) // 2
    w = S - s_all[:S]
    q = torch.div(k * w, W, rounding_mode="floor")
    rem = k - q.sum()
    q = q + (s_all[:S] < rem).to(torch.int64)
    P = torch.cumsum(q - m, dim=0)
    carry = P - torch.clamp(torch.cummin(P, dim=0).values, max=0)
    carry_prev = torch.cat([carry.new_zeros(1), carry[:-1]])
    e = q + carry_prev - carry
    room = m - e
    room_before = torch.cumsum(room, dim=0) - room
    e = e + torch.minimum(torch.clamp(carry[-1] - room_before, min=0), room)
    return bounds, m, e


def _stratified_mask(rank: torch.Tensor, n: torch.Tensor, k: torch.Tensor, num_strata: int) -> torch.Tensor:
    """SPEC §7.2: systematic sampling of ``e_s`` in-stratum ranks ``floor((2j+1)·m_s / (2·e_s))``.

    A token with in-stratum rank ``r'`` is chosen iff some ``j ∈ [0, e_s)`` maps to it. The smallest ``j``
    with ``(2j+1)·m ≥ 2e·r'`` is ``j* = max(0, ceil((2e·r' − m) / (2m)))``; the token is chosen iff
    ``j* < e`` and ``(2j*+1)·m < 2e·(r'+1)``. All products stay below ``2·m² < 2**63``.
    """
    bounds, m, e = stratum_counts(n, k, num_strata)
    r = torch.clamp(rank, min=0)
    s = torch.searchsorted(bounds[1:].contiguous(), r, right=True).clamp(max=num_strata - 1)
    r_in = r - bounds[s]
    m_t = torch.clamp(m[s], min=1)
    e_t = e[s]
    num = 2 * e_t * r_in - m_t
    j = torch.clamp(torch.div(num + 2 * m_t - 1, 2 * m_t, rounding_mode="floor"), min=0)
    chosen = (j < e_t) & ((2 * j + 1) * m_t < 2 * e_t * (r_in + 1))
    return chosen & (rank >= 0) & (e_t > 0)


def _within_sequence_rank(rank2: torch.Tensor) -> torch.Tensor:
    """Rank of each eligible token within its row (the global order restricted to the row, §7.3)."""
    B, T = rank2.shape
    big = torch.full_like(rank2, np.iinfo(np.int64).max)
    key = torch.where(rank2 >= 0, rank2, big)            # eligible ranks are unique
    idx = torch.sort(key, dim=1).indices
    pos = torch.arange(T, device=rank2.device, dtype=torch.int64).expand(B, T)
    within = torch.empty_like(rank2).scatter_(1, idx, pos)
    return torch.where(rank2 >= 0, within, torch.full_like(within, -1))


def select_tokens(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Union[torch.Tensor, float], *,
                  selection: str = "topk", num_strata: int = 4,
                  min_tokens_per_sequence: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection mask of SPEC §7 and ``k`` of §5.3.

    * ``topk`` / ``fixed_quota``: the eligible tokens with ``rank < k`` (exactly ``k``; ``fixed_quota`` differs
      from ``topk`` only in how the loss computes ``ratio``);
    * ``stratified``: ``num_strata`` rank strata, linear weights hardest first, integer quotas with spill-over,
      systematic sampling inside each stratum (exactly ``k``);
    * ``sequence_aware``: ``topk`` ∪ each sequence's ``min_tokens_per_sequence`` hardest eligible tokens
      (rows of a 2-D input are the sequences; a 1-D input is one sequence). May exceed ``k``.

    Args:
        difficulty: float tensor ``(N,)`` or ``(B, T)``.
        eligible: bool tensor of the same shape; NaN difficulties are treated as not eligible.
        ratio: the float32 ratio after the dynamic threshold, in ``(0, 1]`` (0-d tensor or number).
        selection: one of :data:`SELECTION_STRATEGIES`.
        num_strata: ``S >= 1`` (stratified).
        min_tokens_per_sequence: ``>= 0`` (sequence_aware).

    Returns:
        ``(mask, k)``: bool mask of the input shape, ``k`` a 0-d int32 tensor on the same device.
    """
    check_inputs(difficulty, eligible)
    check_selection(selection)
    if not isinstance(num_strata, numbers.Integral) or isinstance(num_strata, bool) or num_strata < 1:
        raise ValueError(f"num_strata: expected an integer >= 1, got {num_strata!r}")
    if not isinstance(min_tokens_per_sequence, numbers.Integral) or isinstance(min_tokens_per_sequence, bool) \
            or min_tokens_per_sequence < 0:
        raise ValueError(f"min_tokens_per_sequence: expected an integer >= 0, got {min_tokens_per_sequence!r}")
    num_strata, min_tokens_per_sequence = int(num_strata), int(min_tokens_per_sequence)
    difficulty = as_ranking_dtype(difficulty)
    if dispatch.use_kernels(difficulty):
        kernel = dispatch.kernel("select_tokens_triton")
        if kernel is not None:
            mask, k = kernel(difficulty, eligible, ratio, selection=selection, num_strata=num_strata,
                             min_tokens_per_sequence=min_tokens_per_sequence)
            return mask, k.to(torch.int32)
    rank = _flat_rank(difficulty, eligible)
    n = (rank >= 0).sum()
    k = num_selected(n, ratio)
    if selection == "stratified":
        mask = _stratified_mask(rank, n, k, num_strata)
    else:
        mask = (rank >= 0) & (rank < k)
    if selection == "sequence_aware" and min_tokens_per_sequence > 0:
        rank2 = rank.reshape(difficulty.shape) if difficulty.dim() == 2 else rank.reshape(1, -1)
        within = _within_sequence_rank(rank2)
        extra = (within >= 0) & (within < min_tokens_per_sequence)
        mask = mask | extra.reshape(-1)
    return mask.reshape(difficulty.shape), k.to(torch.int32)
