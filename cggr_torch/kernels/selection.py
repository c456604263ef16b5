"""Token selection on the device (SPEC §5.3, §6, §7) in a handful of launches: keys → one sort → plan → mask.

The total order of SPEC §6 is the *ascending* order of an integer sort key (see
:mod:`cggr_torch.kernels.scoring`): with ``b`` the int32 bits of the difficulty (``−0.0`` → ``+0.0``)::

    o     = b            if b ≥ 0        (monotone in the float value)
          = b ^ 0x7FFFFFFF otherwise
    key32 = ~o           for an eligible token,        2^31 − 1 (the sentinel) otherwise
    key64 = key32·2^32 + i                              (unique, so the sort need not be stable)

No eligible key equals the sentinel (that would be a NaN difficulty), so after one stable ascending sort the
``n`` eligible tokens come first, in rank order, and ``rank(order[j]) = j``. Then:

1. **plan** (one program, fixed summation order): ``n``, the ratio (given, or SPEC §5.2 from the mean
   confidence), ``k`` exactly in integers (§5.3: ``r_q = round_half_even(ratio·2^16)``,
   ``k = (r_q·n + 2^15) >> 16``, clamped to ``[1, n]``, 0 when ``n = 0``), the stratified quotas ``e_s``
   (§7.2, both spill-over walks) and, for :class:`cggr_torch.CGGRLoss`, every SPEC §10 metric. It is
   compiled without FMA contraction, so ``min(1, base ⊗ (1 ⊕ ((1 ⊖ c̄) ⊗ sensitivity)))`` is rounded
   operation by operation as the SPEC writes it.
2. **mask** (one program per block of sorted positions ``j``): token ``order[j]`` is selected iff ``j < n``
   and ``j < k`` (``topk``/``fixed_quota``) or ``j`` is a systematic-sampling rank of its stratum
   (``stratified``: stratum ``s = min(S−1, ⌊((j+1)·S − 1)/n⌋)``, in-stratum rank ``r = j − ⌊s·n/S⌋``, chosen
   iff the smallest ``j*`` with ``(2j*+1)·m_s ≥ 2e_s·r`` satisfies ``j* < e_s`` and
   ``(2j*+1)·m_s < 2e_s·(r+1)``). Every mask element is written once (``order`` is a permutation).
3. ``sequence_aware``: ``topk ∪`` each sequence's ``min_tokens_per_sequence`` hardest eligible tokens. With
   one sequence (1-D input or ``B = 1``) that is the ``max(k, min(m, n))`` first ranks; otherwise the mask
   pass also writes each token's rank, one batched sort orders every row by rank, and a top-up kernel marks
   the first ``m`` eligible entries of each row.

Nothing here synchronises with the host: ``n``, ``k`` and the metrics stay in two small device buffers
(``ints`` int64, ``floats`` float32; slots below). A device ratio outside ``(0, 1]`` or, in the fused loss,
a target outside ``[0, V)`` clears the ``ok`` slot, which the caller turns into ``torch._assert_async``.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import triton
import triton.language as tl

from . import scoring as scoring_kernels
from .inputs import check_kernel_device, device_guard, ratio_argument

# The kernels below call the scoring module's sort-key function by this (module-global) name.
_order_key = scoring_kernels.order_key

__all__ = [
    "SORT_KEY_BITS",
    "INT_SLOTS",
    "FLOAT_SLOTS",
    "SelectionPlan",
    "select_tokens_triton",
    "rank_tokens_triton",
    "select_from_scores",
    "select_from_scores_op",
    "select_tokens_op",
    "rank_tokens_op",
    "sort_order",
    "launch_keys",
    "launch_plan",
    "launch_mask",
]

#: Width of the sort key (32: int32 keys, stable sort; 64: unique int64 keys, any sort). The benchmark
#: ``benchmarks/bench_selection_torch.py`` times both; the default is the narrower, cheaper radix sort.
SORT_KEY_BITS = 32

#: Slots of the int64 plan buffer.
INT_SLOTS = {"step": 0, "tokens_selected": 1, "tokens_total": 2, "tokens_nonfinite": 3, "tokens_out_of_range": 4,
             "k": 5, "ok": 6}
#: Slots of the float32 plan buffer.
FLOAT_SLOTS = {"token_ratio": 0, "effective_ratio": 1, "avg_confidence": 2, "avg_entropy": 3, "avg_difficulty": 4}
_N_INTS = 8
_N_FLOATS = 8

_SENTINEL32 = 2**31 - 1
_PLAN_BLOCK = 4096          # one program, 8 warps: 16 tokens per thread per step
_PLAN_WARPS = 8
_STRATA_BLOCK_MAX = 1024    # strata handled per step of the plan's stratum loops
_MASK_BLOCK = 1024          # sorted positions per program of the mask kernel
_MASK_WARPS = 4
_TOPUP_BLOCK = 256


# =============================================================================================== kernels
@triton.jit
def _keys_kernel(d_ptr, e_ptr, key_ptr, N, KEY64: tl.constexpr, BLOCK: tl.constexpr):
    """``key[i]`` for difficulty ``d`` (any float dtype, upcast exactly) and eligibility ``e`` (NaN → not)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    d = tl.load(d_ptr + i, mask=inb, other=0.0).to(tl.float32)
    e = (tl.load(e_ptr + i, mask=inb, other=0) != 0) & (d == d)
    tl.store(key_ptr + i, _order_key(d, e, i, KEY64), mask=inb)


@triton.jit
def _min_i64(a, b):
    return tl.minimum(a, b)


@triton.jit
def _first_walk(sv, n, k, R, W, S, P_prev, M_prev):
    """One chunk of the first spill-over walk (SPEC §7.2) in closed form.

    ``P_s = Σ_{i≤s}(q_i − m_i)``, carry ``c_s = P_s − min(0, min_{j≤s} P_j)``, ``e_s = q_s + c_{s−1} − c_s``;
    ``P_prev`` and ``M_prev = min(0, min_{j<s0} P_j)`` carry the prefix state across chunks.
    """
    ins = sv < S
    q = tl.where(ins, (k * (S - sv)) // W + (sv < R).to(tl.int64), 0)
    m = tl.where(ins, ((sv + 1) * n) // S - (sv * n) // S, 0)
    diff = q - m
    P = P_prev + tl.cumsum(diff, 0)
    P_ex = P - diff                                              # P_{s−1}
    M_ex = tl.minimum(tl.associative_scan(P_ex, 0, _min_i64), M_prev)
    M_in = tl.minimum(M_ex, P)
    e = q + (P_ex - M_ex) - (P - M_in)
    return e, m, P_prev + tl.sum(diff, 0), tl.minimum(M_prev, tl.min(P, 0))


@triton.jit
def _plan_kernel(
    key_ptr, status_ptr, conf_ptr, ent_ptr, diff_ptr, ratio_ptr, ints_ptr, floats_ptr, strata_ptr,
    base_ptr, step_ptr, N, base, sensitivity, step, S,
    FROM_SCORES: tl.constexpr, RATIO_MODE: tl.constexpr, KEY64: tl.constexpr, STRATA: tl.constexpr,
    BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, DEVICE_BASE: tl.constexpr,
):
    """One program: counts, sums, ratio, k and (STRATA) the quotas e_s. See the module docstring.
    DEVICE_BASE: ``base`` and ``step`` are read from one-element device buffers (the compiled losses' step
    tensor, SPEC §12.1) instead of host scalars."""
    if DEVICE_BASE:
        base = tl.load(base_ptr).to(tl.float32)
        step = tl.load(step_ptr).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int32)
    nonfinite = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    conf_acc = tl.zeros([BLOCK], tl.float32)
    ent_acc = tl.zeros([BLOCK], tl.float32)
    diff_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        inb = idx < N
        if FROM_SCORES:
            st = tl.load(status_ptr + idx, mask=inb, other=0).to(tl.int32)
            conf = tl.load(conf_ptr + idx, mask=inb, other=0.0)     # independent loads: one round trip
            ent = tl.load(ent_ptr + idx, mask=inb, other=0.0)
            dif = tl.load(diff_ptr + idx, mask=inb, other=0.0)
            elig = (st & 2) != 0
            cnt += elig.to(tl.int32)
            nonfinite += ((st & 3) == 1).to(tl.int32)                 # valid, not eligible
            bad += ((st & 4) != 0).to(tl.int32)
            conf_acc += tl.where(elig, conf, 0.0)
            ent_acc += tl.where(elig, ent, 0.0)
            diff_acc += tl.where(elig, dif, 0.0)
        else:
            key = tl.load(key_ptr + idx, mask=inb, other=0)
            if KEY64:
                key = key >> 32
            cnt += (inb & (key != 2147483647)).to(tl.int32)
    n = tl.sum(cnt.to(tl.int64), 0)
    nf = tl.maximum(n, 1).to(tl.float32)
    mean_conf = tl.math.div_rn(tl.sum(conf_acc, 0), nf)
    if RATIO_MODE == 0:
        ratio = base + tl.zeros([], tl.float32)
    elif RATIO_MODE == 1:
        ratio = tl.load(ratio_ptr).to(tl.float32)
    else:  # SPEC §5.2, operation by operation (this kernel is compiled without FMA contraction)
        ratio = tl.minimum(base * (1.0 + (1.0 - mean_conf) * sensitivity), 1.0)
    ok = (ratio > 0.0) & (ratio <= 1.0) & (tl.sum(bad, 0) == 0)
    # SPEC §5.3: r_q = round_half_even(ratio·2^16) (an exact scaling), k in integers.
    x = tl.where(ok, ratio * 65536.0, 0.0)
    f = x.to(tl.int32)                                                # x ≥ 0: truncation = floor
    frac = x - f.to(tl.float32)                                      # exact
    r_q = f + ((frac > 0.5) | ((frac == 0.5) & ((f & 1) == 1))).to(tl.int32)
    k = (r_q.to(tl.int64) * n + 32768) >> 16
    k = tl.where(n > 0, tl.minimum(n, tl.maximum(k, 1)), 0)
    tl.store(ints_ptr + 0, step + tl.zeros([], tl.int64))
    tl.store(ints_ptr + 1, k)                 # tokens_selected (sequence_aware: overwritten by the loss)
    tl.store(ints_ptr + 2, n)
    tl.store(ints_ptr + 3, tl.sum(nonfinite.to(tl.int64), 0))
    tl.store(ints_ptr + 4, tl.zeros([], tl.int64))
    tl.store(ints_ptr + 5, k)
    tl.store(ints_ptr + 6, ok.to(tl.int64))
    tl.store(floats_ptr + 0, base + tl.zeros([], tl.float32))
    tl.store(floats_ptr + 1, ratio)
    tl.store(floats_ptr + 2, mean_conf)
    tl.store(floats_ptr + 3, tl.math.div_rn(tl.sum(ent_acc, 0), nf))
    tl.store(floats_ptr + 4, tl.math.div_rn(tl.sum(diff_acc, 0), nf))
    # The spare slots are written too: every output of the custom ops is defined (deterministic).
    tl.store(ints_ptr + 7, tl.zeros([], tl.int64))
    tl.store(floats_ptr + 5, tl.zeros([], tl.float32))
    tl.store(floats_ptr + 6, tl.zeros([], tl.float32))
    tl.store(floats_ptr + 7, tl.zeros([], tl.float32))
    if STRATA:
        S64 = S + tl.zeros([], tl.int64)      # scalar arguments equal to 1 arrive as constexpr: no .to()
        W = S64 * (S64 + 1) // 2
        soffs = tl.arange(0, S_BLOCK).to(tl.int64)
        qsum = tl.zeros([], tl.int64)
        for s0 in range(0, S, S_BLOCK):
            sv = s0 + soffs
            qsum += tl.sum(tl.where(sv < S64, (k * (S64 - sv)) // W, 0), 0)
        R = k - qsum
        # first walk: only the final carry C is needed before the second walk
        P_prev = tl.zeros([], tl.int64)
        M_prev = tl.zeros([], tl.int64)
        for s0 in range(0, S, S_BLOCK):
            _e, _m, P_prev, M_prev = _first_walk(s0 + soffs, n, k, R, W, S64, P_prev, M_prev)
        C = P_prev - M_prev
        # first walk again (same arithmetic) plus the second walk: extra_s = clamp(C − room before s, 0, room_s)
        P_prev = tl.zeros([], tl.int64)
        M_prev = tl.zeros([], tl.int64)
        room_before = tl.zeros([], tl.int64)
        for s0 in range(0, S, S_BLOCK):
            sv = s0 + soffs
            e, m, P_prev, M_prev = _first_walk(sv, n, k, R, W, S64, P_prev, M_prev)
            room = m - e
            before = room_before + tl.cumsum(room, 0) - room
            e = e + tl.minimum(tl.maximum(C - before, 0), room)
            tl.store(strata_ptr + sv, e, mask=sv < S64)
            room_before += tl.sum(room, 0)


@triton.jit
def _mask_kernel(
    order_ptr, ints_ptr, strata_ptr, mask_ptr, rank_ptr, N, S, min_first,
    MODE: tl.constexpr, WRITE_RANK: tl.constexpr, RANK_FILL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sorted positions ``j`` of one block: ``mask[order[j]]`` (and ``rank[order[j]]``). See the module docstring."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = j < N
    tok = tl.load(order_ptr + j, mask=inb, other=0)
    n = tl.load(ints_ptr + 2)
    k = tl.load(ints_ptr + 5)
    ranked = j < n
    if MODE == 0:
        chosen = j < tl.maximum(k, tl.minimum(min_first + tl.zeros([], tl.int64), n))
    else:
        S64 = S + tl.zeros([], tl.int64)
        s = tl.minimum(((j + 1) * S64 - 1) // tl.maximum(n, 1), S64 - 1)
        lo = (s * n) // S64
        m = tl.maximum(((s + 1) * n) // S64 - lo, 1)
        e = tl.load(strata_ptr + s, mask=inb & ranked, other=0)
        r = j - lo
        # smallest j* ≥ 0 with (2j*+1)·m ≥ 2e·r; the numerator is never negative (m ≥ 1)
        js = (2 * e * r + m - 1) // (2 * m)                       # ceil((2e·r − m) / 2m), clamped at 0
        chosen = (js < e) & ((2 * js + 1) * m < 2 * e * (r + 1))
    chosen = chosen & ranked
    tl.store(mask_ptr + tok, chosen, mask=inb)
    if WRITE_RANK:
        tl.store(rank_ptr + tok, tl.where(ranked, j, RANK_FILL).to(tl.int32), mask=inb)


@triton.jit
def _topup_kernel(sorted_rank_ptr, sorted_idx_ptr, mask_ptr, T, M, BLOCK: tl.constexpr):
    """Row ``b``: mark the first ``M`` entries of its rank-sorted tokens that are eligible (rank ≠ sentinel)."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = p < M
    r = tl.load(sorted_rank_ptr + b * T + p, mask=inb, other=2147483647)
    t = tl.load(sorted_idx_ptr + b * T + p, mask=inb, other=0)
    tl.store(mask_ptr + b * T + t, tl.full([BLOCK], 1, tl.int1), mask=inb & (r != 2147483647))


# ============================================================================================ launchers
def _key_dtype() -> torch.dtype:
    if SORT_KEY_BITS not in (32, 64):
        raise ValueError(f"SORT_KEY_BITS: expected 32 or 64, got {SORT_KEY_BITS!r}")
    return torch.int32 if SORT_KEY_BITS == 32 else torch.int64


def launch_keys(difficulty: torch.Tensor, eligible: torch.Tensor, key: torch.Tensor) -> None:
    """``key`` (contiguous int32/int64 ``(N,)``) ← the sort key of flat ``difficulty`` / ``eligible``."""
    n = difficulty.numel()
    if n == 0:
        return
    with device_guard(difficulty):
        _keys_kernel[(triton.cdiv(n, _MASK_BLOCK),)](
            difficulty, eligible, key, n, KEY64=key.dtype == torch.int64, BLOCK=_MASK_BLOCK, num_warps=_MASK_WARPS)


def sort_order(key: torch.Tensor) -> torch.Tensor:
    """``order``: int64 flat indices in SPEC §6 order (eligible first, by rank). One ``torch.sort`` call;
    int32 keys need a stable sort (equal difficulties), unique int64 keys do not."""
    return torch.sort(key, stable=key.dtype == torch.int32).indices


def launch_plan(ints: torch.Tensor, floats: torch.Tensor, strata: Optional[torch.Tensor], n_tokens: int, *,
                key: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None,
                stats: Optional[torch.Tensor] = None, ratio: Union[float, torch.Tensor] = 1.0,
                dynamic: bool = False, sensitivity: float = 0.0, step: Union[int, torch.Tensor] = 0,
                num_strata: int = 1, base: Optional[torch.Tensor] = None) -> None:
    """Run the plan kernel (one program).

    Either ``key`` (select_tokens: only ``n`` is counted) or ``status`` + ``stats`` (the scoring kernel's
    ``(6, N)`` buffer: confidence row 2, entropy row 1, difficulty row 5) for the fused loss. ``ratio`` is a
    host float (``base`` when ``dynamic``) or a one-element float device tensor (the ratio itself). ``base``:
    a one-element float32 device tensor holding the curriculum ratio (then ``ratio`` is unused, ``dynamic``
    applies, and ``step`` must be a one-element int64 device tensor too). ``strata`` (int64 ``(S,)``)
    receives the stratified quotas when given.
    """
    dev_t = key if key is not None else status
    from_scores = status is not None
    base_t = step_t = ints
    device_base = base is not None
    if device_base:
        if not isinstance(step, torch.Tensor):
            raise ValueError("step: a device base ratio needs a one-element int64 step tensor")
        ratio_mode, ratio_t, base_host = (2 if dynamic else 0), ints, 0.0
        base_t, step_t, step = base.reshape(1), step.reshape(1), 0
    elif isinstance(ratio, torch.Tensor):
        ratio_mode, ratio_t, base_host = 1, ratio, 0.0
    else:
        ratio_mode, ratio_t, base_host = (2 if dynamic else 0), ints, float(ratio)
    if from_scores:
        conf, ent, dif = stats[2], stats[1], stats[5]
    else:
        conf = ent = dif = floats
    S = int(num_strata)
    s_block = min(_STRATA_BLOCK_MAX, 1 << max(0, S - 1).bit_length())
    with device_guard(dev_t):
        _plan_kernel[(1,)](
            key if key is not None else ints, status if from_scores else ints, conf, ent, dif, ratio_t,
            ints, floats, strata if strata is not None else ints, base_t, step_t,
            n_tokens, base_host, float(sensitivity), int(step), S,
            FROM_SCORES=from_scores, RATIO_MODE=ratio_mode,
            KEY64=key is not None and key.dtype == torch.int64, STRATA=strata is not None,
            BLOCK=_PLAN_BLOCK, S_BLOCK=max(2, s_block), DEVICE_BASE=device_base, num_warps=_PLAN_WARPS,
            enable_fp_fusion=False,
        )


def launch_mask(order: torch.Tensor, ints: torch.Tensor, strata: Optional[torch.Tensor], mask: torch.Tensor, *,
                stratified: bool = False, num_strata: int = 1, min_first: int = 0,
                rank: Optional[torch.Tensor] = None, rank_fill: int = _SENTINEL32) -> None:
    """``mask`` (contiguous bool ``(N,)``) from the sorted ``order`` and the plan; optionally ``rank`` (int32)."""
    n = order.numel()
    if n == 0:
        return
    with device_guard(order):
        _mask_kernel[(triton.cdiv(n, _MASK_BLOCK),)](
            order, ints, strata if strata is not None else ints, mask, rank if rank is not None else ints,
            n, int(num_strata), int(min_first),
            MODE=1 if stratified else 0, WRITE_RANK=rank is not None, RANK_FILL=int(rank_fill),
            BLOCK=_MASK_BLOCK, num_warps=_MASK_WARPS,
        )


def _sequence_topup(rank: torch.Tensor, mask: torch.Tensor, batch: int, seq_len: int, m: int) -> None:
    """``mask |=`` each row's first ``m`` eligible tokens in rank order (rank int32, sentinel = not eligible)."""
    srt = torch.sort(rank.view(batch, seq_len), dim=1)
    cols = min(m, seq_len)
    with device_guard(rank):
        _topup_kernel[(batch, triton.cdiv(cols, _TOPUP_BLOCK))](
            srt.values, srt.indices, mask, seq_len, cols, BLOCK=_TOPUP_BLOCK, num_warps=4)


def _select_after_plan(order: torch.Tensor, ints: torch.Tensor, strata: Optional[torch.Tensor],
                       shape: tuple[int, ...], selection: str, num_strata: int,
                       min_tokens_per_sequence: int, device: torch.device) -> torch.Tensor:
    n_tok = order.numel()
    mask = torch.empty((n_tok,), dtype=torch.bool, device=device)
    per_row = (selection == "sequence_aware" and min_tokens_per_sequence > 0 and len(shape) == 2
               and shape[0] > 1)
    one_sequence = selection == "sequence_aware" and not per_row
    rank = torch.empty((n_tok,), dtype=torch.int32, device=device) if per_row else None
    launch_mask(order, ints, strata, mask, stratified=selection == "stratified", num_strata=num_strata,
                min_first=min_tokens_per_sequence if one_sequence else 0, rank=rank)
    if per_row and n_tok > 0:
        _sequence_topup(rank, mask, shape[0], shape[1], min_tokens_per_sequence)
    return mask


# ========================================================================================== public API
class SelectionPlan(NamedTuple):
    """Result of :func:`select_from_scores`: the bool ``mask`` (token shape) and the plan buffers
    (``ints`` int64 and ``floats`` float32; slot names in :data:`INT_SLOTS`, :data:`FLOAT_SLOTS`)."""

    mask: torch.Tensor
    ints: torch.Tensor
    floats: torch.Tensor


def select_from_scores(key: torch.Tensor, status: torch.Tensor, stats: torch.Tensor, token_shape: tuple[int, ...],
                       *, selection: str, num_strata: int, min_tokens_per_sequence: int,
                       base_ratio: Union[float, torch.Tensor], dynamic: bool, threshold_sensitivity: float,
                       step: Union[int, torch.Tensor]) -> SelectionPlan:
    """The fused loss's selection from the scoring kernel's ``key``/``status``/``stats`` buffers (no checks:
    the buffers come from :func:`cggr_torch.kernels.scoring.launch_scoring` with ``key``/``status``).

    ``base_ratio`` is the curriculum ratio: a 0-d float32 tensor on the buffers' device (the losses' form,
    read by the plan kernel: no synchronisation, one compiled graph for every step) or a host float32 value;
    ``step`` likewise a 0-d integer tensor or a host int. With ``dynamic`` the plan applies SPEC §5.2 with the
    mean confidence of the eligible tokens. Every SPEC §10 metric lands in the plan buffers;
    ``tokens_selected`` is ``k`` (the loss overwrites it with the real count). Runs as the custom op
    ``cggr::select_from_scores``.
    """
    dev = key.device
    if not isinstance(base_ratio, torch.Tensor):
        base_ratio = torch.full((), float(np.float32(base_ratio)), dtype=torch.float32, device=dev)
    if not isinstance(step, torch.Tensor):
        step = torch.full((), int(step), dtype=torch.int64, device=dev)
    mask, ints, floats = select_from_scores_op(
        key, status, stats, list(token_shape), selection, int(num_strata), int(min_tokens_per_sequence),
        base_ratio.reshape(()).to(device=dev, dtype=torch.float32), bool(dynamic), float(threshold_sensitivity),
        step.reshape(()).to(device=dev, dtype=torch.int64))
    return SelectionPlan(mask, ints, floats)


@torch.library.custom_op("cggr::select_from_scores", mutates_args=())
def select_from_scores_op(key: torch.Tensor, status: torch.Tensor, stats: torch.Tensor, token_shape: list[int],
                          selection: str, num_strata: int, min_tokens_per_sequence: int, base_ratio: torch.Tensor,
                          dynamic: bool, threshold_sensitivity: float, step: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_from_scores` as a custom op: ``(mask, ints, floats)`` (SPEC §12.1)."""
    dev = key.device
    n_tok = key.numel()
    shape = tuple(token_shape)
    ints = torch.empty((_N_INTS,), dtype=torch.int64, device=dev)
    floats = torch.empty((_N_FLOATS,), dtype=torch.float32, device=dev)
    strata = torch.empty((num_strata,), dtype=torch.int64, device=dev) if selection == "stratified" else None
    launch_plan(ints, floats, strata, n_tok, status=status, stats=stats, dynamic=dynamic,
                sensitivity=threshold_sensitivity, step=step, num_strata=num_strata, base=base_ratio)
    order = sort_order(key)
    mask = _select_after_plan(order, ints, strata, shape, selection, num_strata, min_tokens_per_sequence, dev)
    return mask.view(shape), ints, floats


@select_from_scores_op.register_fake
def _(key: torch.Tensor, status: torch.Tensor, stats: torch.Tensor, token_shape: list[int], selection: str,
      num_strata: int, min_tokens_per_sequence: int, base_ratio: torch.Tensor, dynamic: bool,
      threshold_sensitivity: float, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = key.device
    return (torch.empty(tuple(token_shape), dtype=torch.bool, device=dev),
            torch.empty((_N_INTS,), dtype=torch.int64, device=dev),
            torch.empty((_N_FLOATS,), dtype=torch.float32, device=dev))


def select_tokens_triton(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Union[torch.Tensor, float], *,
                         selection: str = "topk", num_strata: int = 4,
                         min_tokens_per_sequence: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cggr_torch.selection.select_tokens` on the device in a few launches (bit-identical results).

    ``difficulty`` float32/float16/bfloat16 ``(N,)`` or ``(B, T)`` (float64 keeps more order information than
    the float32 key: use the PyTorch path), ``eligible`` bool of the same shape, on CUDA (CPU under
    ``TRITON_INTERPRET=1``). Arguments are validated by the caller (:func:`cggr_torch.selection.select_tokens`)
    except the ones checked here. Returns ``(mask, k)``; ``k`` is a 0-d int64 tensor. Runs as the custom op
    ``cggr::select_tokens`` (SPEC §12.1).

    Raises:
        ValueError: float64 difficulties, a host ratio outside ``(0, 1]``, a ratio on another device.
    """
    check_kernel_device(difficulty, "difficulty")
    if difficulty.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"difficulty: the Triton selection takes float32/float16/bfloat16, got {difficulty.dtype}")
    if not isinstance(num_strata, numbers.Integral) or not isinstance(min_tokens_per_sequence, numbers.Integral):
        raise ValueError("num_strata, min_tokens_per_sequence: expected integers")
    r = ratio_argument(ratio, difficulty.device)
    ratio_t = r if isinstance(r, torch.Tensor) else None
    return select_tokens_op(difficulty, eligible, ratio_t, 0.0 if ratio_t is not None else float(r), selection,
                            int(num_strata), int(min_tokens_per_sequence))


@torch.library.custom_op("cggr::select_tokens", mutates_args=())
def select_tokens_op(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Optional[torch.Tensor],
                     ratio_value: float, selection: str, num_strata: int, min_tokens_per_sequence: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_tokens_triton` on checked arguments: ``ratio`` a one-element float device tensor, or
    None and the host ``ratio_value``. Returns ``(mask, k)`` (k 0-d int64)."""
    dev = difficulty.device
    shape = tuple(difficulty.shape)
    n_tok = difficulty.numel()
    d = difficulty.reshape(-1).contiguous()
    e = eligible.reshape(-1).contiguous()
    key = torch.empty((n_tok,), dtype=_key_dtype(), device=dev)
    launch_keys(d, e, key)
    ints = torch.empty((_N_INTS,), dtype=torch.int64, device=dev)
    floats = torch.empty((_N_FLOATS,), dtype=torch.float32, device=dev)
    strata = torch.empty((num_strata,), dtype=torch.int64, device=dev) if selection == "stratified" else None
    launch_plan(ints, floats, strata, n_tok, key=key, ratio=ratio if ratio is not None else ratio_value,
                num_strata=num_strata)
    if ratio is not None and dev.type == "cuda":
        torch._assert_async(ints[INT_SLOTS["ok"]], "ratio: expected a value in (0, 1]")
    order = sort_order(key)
    mask = _select_after_plan(order, ints, strata, shape, selection, num_strata, min_tokens_per_sequence, dev)
    return mask.view(shape), ints[INT_SLOTS["k"]].clone()


@select_tokens_op.register_fake
def _(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Optional[torch.Tensor], ratio_value: float,
      selection: str, num_strata: int, min_tokens_per_sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(tuple(difficulty.shape), dtype=torch.bool, device=difficulty.device),
            torch.empty((), dtype=torch.int64, device=difficulty.device))


def rank_tokens_triton(difficulty: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """:func:`cggr_torch.selection.rank_tokens` on the device: int32 rank of the input shape, −1 where not
    eligible. Runs as the custom op ``cggr::rank_tokens`` (SPEC §12.1)."""
    check_kernel_device(difficulty, "difficulty")
    if difficulty.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"difficulty: the Triton selection takes float32/float16/bfloat16, got {difficulty.dtype}")
    return rank_tokens_op(difficulty, eligible)


@torch.library.custom_op("cggr::rank_tokens", mutates_args=())
def rank_tokens_op(difficulty: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """:func:`rank_tokens_triton` on checked arguments."""
    dev = difficulty.device
    n_tok = difficulty.numel()
    key = torch.empty((n_tok,), dtype=_key_dtype(), device=dev)
    launch_keys(difficulty.reshape(-1).contiguous(), eligible.reshape(-1).contiguous(), key)
    ints = torch.empty((_N_INTS,), dtype=torch.int64, device=dev)
    floats = torch.empty((_N_FLOATS,), dtype=torch.float32, device=dev)
    launch_plan(ints, floats, None, n_tok, key=key, ratio=1.0)
    order = sort_order(key)
    mask = torch.empty((n_tok,), dtype=torch.bool, device=dev)
    rank = torch.empty((n_tok,), dtype=torch.int32, device=dev)
    launch_mask(order, ints, None, mask, rank=rank, rank_fill=-1)
    return rank.view(difficulty.shape)


@rank_tokens_op.register_fake
def _(difficulty: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(difficulty.shape), dtype=torch.int32, device=difficulty.device)
