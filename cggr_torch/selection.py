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

from cggr import SELECTION_STRATEGIES, CGGRConfig, check_ratio_value
from cggr.config import SAMPLED_SELECTIONS, check_sampling_parameters, is_int

from . import dispatch
from .curriculum import num_selected
from .utils import check_selection

__all__ = ["SELECTION_STRATEGIES", "rank_tokens", "select_tokens", "stratum_counts", "order_key32",
           "as_ranking_dtype", "check_inputs", "uniform_hash", "sampling_probabilities", "sample_tokens"]

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
                  min_tokens_per_sequence: int = 1, step: Union[int, torch.Tensor] = 0,
                  seed: int = CGGRConfig.sample_seed, power: float = CGGRConfig.sample_power,
                  uniform_mix: float = CGGRConfig.sample_uniform_mix,
                  floor: float = CGGRConfig.sample_floor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection mask of SPEC §7 and ``k`` of §5.3.

    * ``topk`` / ``fixed_quota``: the eligible tokens with ``rank < k`` (exactly ``k``; ``fixed_quota`` differs
      from ``topk`` only in how the loss computes ``ratio``);
    * ``stratified``: ``num_strata`` rank strata, linear weights hardest first, integer quotas with spill-over,
      systematic sampling inside each stratum (exactly ``k``);
    * ``sequence_aware``: ``topk`` ∪ each sequence's ``min_tokens_per_sequence`` hardest eligible tokens
      (rows of a 2-D input are the sequences; a 1-D input is one sequence). May exceed ``k``.
    * ``sampled``: the random draw of SPEC §7.4 (``k`` expected tokens; ``step``, ``seed``, ``power``,
      ``uniform_mix``, ``floor`` as :func:`sample_tokens`, which also returns the loss weights ``1/π``).

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
    if selection in SAMPLED_SELECTIONS:
        mask, _, k = sample_tokens(difficulty, eligible, ratio, step=step, seed=seed, power=power,
                                   uniform_mix=uniform_mix, floor=floor)
        return mask, k
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


# ------------------------------------------------------------------------------- SPEC §7.4 sampled selection
_MASK32 = 0xFFFFFFFF
#: lowbias32's multipliers (SPEC §7.4), split in 16-bit halves so that int64 products never overflow.
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_SEED_SALT = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x · c) mod 2^32`` of uint32 values held in int64: ``x·c_lo + ((x·c_hi mod 2^16) << 16)``, every
    intermediate below 2^50 (an int64 product of two 32-bit values could overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (SPEC §7.4) on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MULTIPLIERS[1])
    return x ^ (x >> 16)


def _check_seed(seed: object) -> int:
    return check_sampling_parameters(0.0, 0.0, 1.0, seed)[3]


def _check_step(step: object) -> None:
    """SPEC §5.4's step as the draws take it: a host integer ``>= 0`` or a one-element integer tensor."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype == torch.bool:
            raise ValueError(f"step: expected an integer scalar, got {step.dtype} {tuple(step.shape)}")
    elif not is_int(step) or int(step) < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")


def uniform_hash(seed: int, step: Union[int, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """SPEC §7.4: the draws ``u ∈ (0, 1)`` (float32, the shape of ``index``) of a counter-based hash::

        h = mix(seed ^ 0x9E3779B9);  h = mix(h ^ step);  h = mix(h ^ index);  u = ((h >> 8) | 1) · 2^-24

    ``mix`` is lowbias32 on uint32; ``step`` and ``index`` are taken mod 2^32. Exact integer arithmetic: the
    same bits in every package and on every device. ``u`` is an odd multiple of 2^-24, never 0, so an
    included token has ``π > 2^-24`` and a finite weight.

    Args:
        seed: host integer in ``[0, 2^32)``.
        step: host integer ``>= 0`` or an integer tensor (the curriculum step, SPEC §5.4).
        index: integer tensor of flat token indices (``>= 0``).
    """
    seed = _check_seed(seed)
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index: expected an integer tensor, got "
                         f"{index.dtype if isinstance(index, torch.Tensor) else type(index).__name__}")
    _check_step(step)
    if isinstance(step, torch.Tensor):
        step_t = step.reshape(()).to(device=index.device, dtype=torch.int64) & _MASK32
    else:
        step_t = torch.full((), int(step) & _MASK32, dtype=torch.int64, device=index.device)
    h = _mix32(torch.full((), seed ^ _SEED_SALT, dtype=torch.int64, device=index.device))
    h = _mix32(h ^ step_t)
    h = _mix32(h ^ (index.to(torch.int64) & _MASK32))
    # (h >> 8) | 1 < 2^24: exact in float32, and so is the power-of-two scale.
    return (((h >> 8) | 1).to(torch.float32) * (2.0 ** -24)).to(torch.float32)


def _check_sampling(power: object, uniform_mix: object, floor: object) -> tuple[float, float, float]:
    """The parameters of SPEC §7.4 (the rules of ``cggr.CGGRConfig``'s ``sample_*`` fields)."""
    return check_sampling_parameters(power, uniform_mix, floor)[:3]


def _probabilities(d: torch.Tensor, e: torch.Tensor, k: torch.Tensor, power: float, uniform_mix: float,
                   floor: float) -> torch.Tensor:
    """SPEC §7.4 on flat float32 ``d`` and bool ``e`` (NaN already not eligible), ``k`` an int tensor."""
    f32 = torch.float32
    N = d.numel()
    dev = d.device
    n = e.sum()
    zero = torch.zeros((), dtype=f32, device=dev)
    fmax = float(torch.finfo(f32).max)
    b = torch.clamp(torch.clamp(d, min=0.0) + np.float32(floor), max=fmax)
    b = torch.where(e, b, torch.ones_like(b))             # any positive value: not read below
    log_b = torch.log(b)
    log_max = torch.where(e, log_b, torch.full_like(log_b, -float("inf"))).max() if N else zero
    q = torch.where(e, torch.exp(np.float32(power) * (log_b - log_max)), zero)
    Q = q.sum()
    n_f = torch.clamp(n, min=1).to(f32)
    p = torch.where(e, (np.float32(1.0 - uniform_mix) * q) / torch.clamp(Q, min=np.float32(1e-45))
                    + np.float32(uniform_mix) / n_f, zero)
    # Water-filling: sort p descending (ties: lower flat index first; ineligible last), suffix sums S_j, the
    # first j < k with (k − j)·p_(j) <= S_j caps the j largest at 1 and scales the rest by (k − j)/S_j.
    key = torch.where(e, p, torch.full_like(p, -1.0))
    ps, order = torch.sort(key, descending=True, stable=True)
    ps = torch.clamp(ps, min=0.0)
    suffix = torch.flip(torch.cumsum(torch.flip(ps, (0,)), 0), (0,))
    kk = torch.minimum(k.to(torch.int64), n)
    j = torch.arange(N, device=dev, dtype=torch.int64)
    ok = (j < kk) & ((kk - j).to(f32) * ps <= suffix)
    jstar = torch.where(ok, j, torch.full_like(j, N)).min() if N else torch.zeros((), dtype=torch.int64, device=dev)
    jc = torch.clamp(jstar, max=max(N - 1, 0))
    # index_select, not suffix[jc]: a 0-d tensor index is a graph break under torch.compile (SPEC §12.1)
    s_j = suffix.index_select(0, jc.reshape(1)).reshape(()) if N else zero
    c = torch.where(s_j > 0, (kk - jstar).to(f32) / torch.where(s_j > 0, s_j, torch.ones_like(s_j)), zero)
    # k = n keeps every eligible token: exactly π = 1 (the rounding of c·p could leave 1 − ulp).
    pi_sorted = torch.where((j < jstar) | (kk >= n), torch.ones_like(ps), torch.clamp(c * ps, max=1.0))
    pi_sorted = torch.where((j < n) & (kk > 0), pi_sorted, torch.zeros_like(pi_sorted))
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def sampling_probabilities(difficulty: torch.Tensor, eligible: torch.Tensor, k: Union[int, torch.Tensor], *,
                           power: float = CGGRConfig.sample_power,
                           uniform_mix: float = CGGRConfig.sample_uniform_mix,
                           floor: float = CGGRConfig.sample_floor) -> torch.Tensor:
    """SPEC §7.4: the inclusion probabilities ``π`` (float32, the input's shape) of the ``sampled`` selection.

    Over the ``n`` eligible tokens (NaN difficulty is not eligible)::

        b_i = min(max(d_i, 0) + ε, FLT_MAX),   q_i = exp(β·(ln b_i − ln max_j b_j))   (= (b_i / b_max)^β)
        p_i = (1 − λ)·q_i / Σq + λ / n,        π_i = min(1, c·p_i),  Σ π = min(k, n)

    (water-filling: sort ``p`` descending, suffix sums ``S_j``; ``j*`` = the first ``j < k`` with
    ``(k − j)·p_(j) <= S_j``; ``π = 1`` for the ``j*`` largest and ``c = (k − j*)/S_{j*}``). ``π = 0`` for
    tokens that are not eligible, and everywhere when ``k = 0``. No synchronisation. CUDA tensors use
    :func:`cggr_torch.kernels.sampling.sampling_probabilities_triton` (:mod:`cggr_torch.dispatch`; the same
    ``π`` within SPEC §11's ``PI_RTOL``, the code below is the reference).

    Args:
        difficulty: float tensor ``(N,)`` or ``(B, T)`` (float64 is rounded to float32, SPEC §6).
        eligible: bool tensor of the same shape.
        k: the expected count, a host integer ``>= 0`` or an integer tensor (``k > n`` counts as ``n``).
        power, uniform_mix, floor: ``β >= 0``, ``λ ∈ [0, 1]``, ``ε > 0`` (``CGGRConfig.sample_*``).
    """
    check_inputs(difficulty, eligible)
    power, uniform_mix, floor = _check_sampling(power, uniform_mix, floor)
    if isinstance(k, torch.Tensor):
        if k.numel() != 1 or k.dtype.is_floating_point or k.dtype == torch.bool:
            raise ValueError(f"k: expected an integer scalar, got {k.dtype} {tuple(k.shape)}")
    elif not is_int(k) or int(k) < 0:
        raise ValueError(f"k: expected an integer >= 0, got {k!r}")
    if dispatch.use_kernels(difficulty):
        kernel = dispatch.kernel("sampling_probabilities_triton")
        if kernel is not None:
            return kernel(difficulty, eligible, k, power=power, uniform_mix=uniform_mix, floor=floor)
    d = as_ranking_dtype(difficulty).reshape(-1).to(torch.float32)
    e = eligible.reshape(-1) & ~torch.isnan(d)
    if isinstance(k, torch.Tensor):
        k_t = k.reshape(()).to(device=d.device, dtype=torch.int64)
    else:
        k_t = torch.full((), int(k), dtype=torch.int64, device=d.device)
    return _probabilities(d, e, k_t, power, uniform_mix, floor).reshape(difficulty.shape)


def sample_tokens(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Union[torch.Tensor, float], *,
                  step: Union[int, torch.Tensor] = 0, seed: int = CGGRConfig.sample_seed,
                  power: float = CGGRConfig.sample_power, uniform_mix: float = CGGRConfig.sample_uniform_mix,
                  floor: float = CGGRConfig.sample_floor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §7.4: the ``sampled`` selection: ``(mask, weights, k)``.

    ``k = num_selected(n, ratio)`` (§5.3) is the *expected* count; token ``i`` is included iff it is eligible
    and ``uniform_hash(seed, step, i) < π_i`` (:func:`sampling_probabilities`, flat row-major ``i``), and its
    Horvitz–Thompson weight is ``w_i = 1/π_i`` (float32; 0 for the others), so that
    ``E[Σ_{i∈S} w_i·ce_i] = Σ_eligible ce_i``.

    CUDA tensors use :func:`cggr_torch.kernels.sampling.sample_tokens_triton` (:mod:`cggr_torch.dispatch`):
    three launches around one ``torch.sort`` (six for large inputs) instead of about sixty small operations, no
    synchronisation; the same ``k`` and draws, ``π`` within SPEC §11's ``PI_RTOL`` (the code below is the
    reference).

    Returns:
        ``mask`` (bool, the input's shape), ``weights`` (float32, the input's shape), ``k`` (0-d int32).
    """
    check_inputs(difficulty, eligible)
    seed = _check_seed(seed)
    power, uniform_mix, floor = _check_sampling(power, uniform_mix, floor)
    if not isinstance(ratio, torch.Tensor):
        check_ratio_value("ratio", ratio)
    _check_step(step)
    if dispatch.use_kernels(difficulty):
        kernel = dispatch.kernel("sample_tokens_triton")
        if kernel is not None:
            return kernel(difficulty, eligible, ratio, step=step, seed=seed, power=power, uniform_mix=uniform_mix,
                          floor=floor)
    d = as_ranking_dtype(difficulty).reshape(-1).to(torch.float32)
    e = eligible.reshape(-1) & ~torch.isnan(d)
    n = e.sum()
    k = num_selected(n, ratio)
    if not isinstance(k, torch.Tensor):
        k = torch.full((), int(k), dtype=torch.int32, device=d.device)
    pi = _probabilities(d, e, k, power, uniform_mix, floor)
    u = uniform_hash(seed, step, torch.arange(d.numel(), device=d.device, dtype=torch.int64))
    mask = e & (u < pi)
    weights = torch.where(mask, 1.0 / torch.where(mask, pi, torch.ones_like(pi)), torch.zeros_like(pi))
    shape = difficulty.shape
    return mask.reshape(shape), weights.reshape(shape), k.to(torch.int32)
