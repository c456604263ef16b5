"""The ``sampled`` selection (SPEC §7.4) on the device: 3 Triton launches around one ``torch.sort`` (6 for large N).

:func:`cggr_torch.selection.sample_tokens` and :func:`cggr_torch.selection.sampling_probabilities` dispatch
CUDA tensors here (:mod:`cggr_torch.dispatch`); the PyTorch code there stays the reference (about 60 small
operations, launch-bound on the host). The same SPEC §7.4 arithmetic, in this order:

1. **probabilities** (one program, three passes over the ``N`` tokens; fixed summation order):
   pass 1 counts the eligible tokens ``n`` (eligible and not NaN) and takes ``max ln b`` with
   ``b = min(max(d, 0) ⊕ ε, FLT_MAX)``; then ``k`` (SPEC §5.3 from the ratio, exactly as
   :mod:`cggr_torch.kernels.selection`'s plan: ``r_q = round_half_even(ratio·2^16)``,
   ``k = (r_q·n + 2^15) >> 16`` clamped to ``[1, n]``, 0 when ``n = 0``; or a given ``k``) and
   ``k' = min(k, n)``; pass 2 sums ``q = exp(β ⊗ (ln b ⊖ ln b*))`` into ``Q``; pass 3 writes the int32 sort
   key of ``p = ((1 − λ) ⊗ q) ⊘ Q ⊕ λ ⊘ f32(max(n, 1))``: ``~bits(p)`` for an eligible token
   (``p ≥ +0``, so the ascending key is ``p`` descending) and ``2^31 − 1`` otherwise.
2. ``torch.sort(key, stable=True)``: the eligible tokens first, ``p`` descending, ties by lower flat index
   (the stable sort), exactly the reference's order. ``p`` is read back from the sorted key's bits.
3. **water-filling** (one program, one pass over the ``n`` sorted positions from the last block to the
   first): ``S_j = carry ⊕ (in-block suffix sum)``, accumulated in float64 and rounded once to float32 (any
   order is allowed; every term is ``≥ 0`` so ``S_j ≥ p_(j)``), ``j* = min {j < k' : f32(k' − j) ⊗ p_(j) ≤
   S_j}`` and ``c = f32(k' − j*) ⊘ S_{j*}`` (0 if ``S_{j*} = 0``).
4. **draws** (one program per block of sorted positions ``m``): ``π = 1`` for ``m < j*`` or when
   ``k' = n``, ``min(1, c ⊗ p_(m))`` otherwise, 0 for ``m ≥ n`` or ``k' = 0``; token ``i = order[m]`` draws
   ``u_i`` (lowbias32 of ``(seed, step, i)``, exact uint32 arithmetic) and is kept iff ``m < n`` and
   ``u_i < π``, with weight ``1 ⊘ π``. Every output element is written once (``order`` is a permutation).

Divisions are ``div_rn`` (correctly rounded, as PyTorch's) and the kernels are compiled without FMA
contraction; on a GPU ``ln``/``exp`` are libdevice's ``logf``/``expf`` (what PyTorch's CUDA ``log``/``exp``
call), under the interpreter NumPy's. What may differ from the reference is what SPEC §11 allows: the
float32 summation order of ``Q`` and of the suffix sums (``π`` within a few ulp); ``n``, ``k``, the order,
``j*``'s rule and the draws ``u`` are exact. Nothing synchronises with the host: ``n``, ``k``, ``k'``,
``j*`` and ``c`` stay in two small device buffers (slots in :data:`INT_SLOTS`, :data:`FLOAT_SLOTS`); a device
ratio outside ``(0, 1]`` clears the ``ok`` slot, which the launcher turns into ``torch._assert_async``.

The fused ``sampled`` loss (:func:`sample_from_scores`, re-exported from :mod:`~cggr_torch.kernels.sampled_loss`)
runs the same steps from the scoring kernel's buffers; both share :mod:`~cggr_torch.kernels.sampling_math`'s code.
Launches for ``sample_tokens`` on a CUDA tensor: probabilities, the sort, water-filling, draws (plus the
assertion when the ratio is a device tensor). The one-program kernels' time grows linearly with ``N`` (a few
µs per 4096 tokens and pass, estimated), so above :data:`SINGLE_PROGRAM_MAX_TOKENS` steps 1 and 3 are
multi-program launches instead, one program per block of :data:`MULTI_BLOCK` tokens: step 1 as three
launches (block counts and maxima; block sums of ``q``; keys), step 3 as two (block sums of ``p`` in float64;
each block's candidate ``j_b`` with the later blocks' sums as its carry), the draw kernel taking the least
``j_b``. Every program that needs a global value (``n``, ``max ln b``, ``Q``, ``j*``) reduces all the block
partials itself in one fixed order, so every program sees the same value and no launch waits on another
except through the stream order.
"""
from __future__ import annotations

import importlib
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
import triton
import triton.language as tl

from cggr.config import check_sampling_parameters

from .inputs import check_kernel_device, device_guard, int_argument, ratio_argument
from .launch import interpreting
from .sampling_math import (
    block_candidate,
    expected_count,
    fill_factor,
    load_eligible,
    lowbias32,
    mass_and_share,
    probability_key,
    q_value,
    sorted_p,
    store_counts,
)

#: The fused ``sampled`` loss's names, defined in :mod:`cggr_torch.kernels.sampled_loss` (which imports this
#: module) and re-exported here on first use (:func:`__getattr__`), so that the sampler's module stays the one
#: namespace of the ``sampled`` path (what imports, stubs or re-tunes it here reaches the fused loss too).
_FUSED_LOSS_NAMES = ("METRIC_INT_SLOTS", "METRIC_FLOAT_SLOTS", "SampledLoss", "sample_from_scores",
                     "sampled_loss_from_scores_op", "sampled_loss_backward_op", "launch_scored_probabilities",
                     "launch_finish")

__all__ = [
    "INT_SLOTS",
    "FLOAT_SLOTS",
    "SINGLE_PROGRAM_MAX_TOKENS",
    "DRAW_BLOCK",
    "MULTI_BLOCK",
    "REDUCE_BLOCK",
    "WaterPartials",
    "multi_program",
    "sample_tokens_triton",
    "sampling_probabilities_triton",
    "launch_probabilities",
    "sort_by_probability",
    "launch_water_filling",
    "launch_draws",
    "draw_programs",
    "DrawPartials",
    "sample_tokens_op",
    # helpers and tunables shared with the fused loss (:mod:`cggr_torch.kernels.sampled_loss`)
    "PROB_BLOCK",
    "PROB_WARPS",
    "use_libdevice",
    "plan_buffers",
    # the fused ``sampled`` loss, re-exported from :mod:`cggr_torch.kernels.sampled_loss` (its home since the split)
    *_FUSED_LOSS_NAMES,
]

#: Slots of the int32 plan buffer (``k`` is the SPEC §5.3 count, ``k_eff`` = ``min(k, n)``).
INT_SLOTS = {"n": 0, "k": 1, "k_eff": 2, "j_star": 3, "ok": 4}
#: Slots of the float32 plan buffer.
FLOAT_SLOTS = {"c": 0, "s_star": 1, "Q": 2, "ln_b_max": 3}
_N_INTS = 8
_N_FLOATS = 4

#: Tokens per step of the one-program probability kernels (this module's and the fused loss's): 8 warps, 16
#: tokens per thread per step, as the selection plan.
PROB_BLOCK = 4096
PROB_WARPS = 8
_WATER_BLOCK = 4096
_WATER_WARPS = 8
_DRAW_WARPS = 4
_MULTI_WARPS = 4
#: Sorted positions per program of the draw kernel.
DRAW_BLOCK = 1024
#: Tokens (or sorted positions) per program of the multi-program kernels.
MULTI_BLOCK = 2048
#: Per-block partials read per step when a program reduces all of them (multi-program path).
REDUCE_BLOCK = 1024

#: Above this many tokens the probabilities and the water-filling use multi-program kernels (six launches
#: around the sort instead of three): a single program's time grows linearly with N (estimated a few µs per
#: 4096 tokens and pass), many short programs' does not. Not yet tuned on a GPU (the selection benchmark
#: times both paths); 65536 keeps the one-program path, at most 16 steps per pass, for N = 16384.
SINGLE_PROGRAM_MAX_TOKENS = 65536

#: ``K_MODE`` of the probability kernel: where ``k`` comes from.
_K_FROM_HOST_RATIO, _K_FROM_DEVICE_RATIO, _K_FROM_HOST, _K_FROM_DEVICE = 0, 1, 2, 3


# ======================================================== kernels (their arithmetic: :mod:`.sampling_math`)
@triton.jit(do_not_specialize=["k_host"])
def _probabilities_kernel(
    d_ptr, e_ptr, ratio_ptr, k_ptr, key_ptr, ints_ptr, floats_ptr,
    N, ratio, k_host, floor, power, one_minus_mix, mix,
    K_MODE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: ``n``, ``max ln b``, ``k``, ``Q`` and the sort key of ``p``. See the module docstring."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    # pass 1: n and max ln b over the eligible tokens
    cnt = tl.zeros([BLOCK], tl.int32)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        e, lb = load_eligible(d_ptr, e_ptr, idx, inb, floor, LIBDEVICE)
        cnt += e.to(tl.int32)
        top = tl.maximum(top, tl.where(e, lb, float("-inf")))
    n = tl.sum(cnt.to(tl.int64), 0)
    lb_max = tl.where(n > 0, tl.max(top, 0), 0.0)                   # n = 0: no q is read
    k, ok = expected_count(n, ratio_ptr, k_ptr, ratio, k_host, K_MODE)
    # pass 2: Q = Σ_eligible q
    q_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        e, lb = load_eligible(d_ptr, e_ptr, idx, inb, floor, LIBDEVICE)
        q_acc += q_value(e, lb, lb_max, power, LIBDEVICE)
    Q, share = mass_and_share(tl.sum(q_acc, 0), n, mix)
    # pass 3: the sort key of p
    for start in range(0, N, BLOCK):
        idx = offs + start
        inb = idx < N
        e, lb = load_eligible(d_ptr, e_ptr, idx, inb, floor, LIBDEVICE)
        tl.store(key_ptr + idx, probability_key(e, q_value(e, lb, lb_max, power, LIBDEVICE), Q, share, one_minus_mix),
                 mask=inb)
    store_counts(ints_ptr, floats_ptr, n, k, ok, lb_max)
    tl.store(floats_ptr + 2, Q)


# --- the same three passes as three multi-program launches (large N): per-block partials, each program of a
# --- later launch reduces all of them in one fixed order (so every program sees the same n, max and Q)
@triton.jit
def _count_max_kernel(d_ptr, e_ptr, part_n_ptr, part_max_ptr, N, floor, LIBDEVICE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Block ``b``: its eligible count and ``max ln b``."""
    b = tl.program_id(0)
    idx = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e, lb = load_eligible(d_ptr, e_ptr, idx, idx < N, floor, LIBDEVICE)
    tl.store(part_n_ptr + b, tl.sum(e.to(tl.int32), 0))
    tl.store(part_max_ptr + b, tl.max(tl.where(e, lb, float("-inf")), 0))


@triton.jit(do_not_specialize=["k_host"])
def _q_sum_kernel(
    d_ptr, e_ptr, part_n_ptr, part_max_ptr, part_q_ptr, ratio_ptr, k_ptr, ints_ptr, floats_ptr,
    N, G, ratio, k_host, floor, power,
    K_MODE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
):
    """Block ``b``: ``Σ q`` of its tokens (``n`` and ``max ln b`` reduced from the partials); program 0 also
    stores ``n``, ``k``, ``k'``, ``ok`` and ``max ln b``."""
    b = tl.program_id(0)
    r = tl.arange(0, R_BLOCK)
    cnt = tl.zeros([R_BLOCK], tl.int64)
    top = tl.full([R_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, G, R_BLOCK):
        inr = (s0 + r) < G
        cnt += tl.load(part_n_ptr + s0 + r, mask=inr, other=0).to(tl.int64)
        top = tl.maximum(top, tl.load(part_max_ptr + s0 + r, mask=inr, other=float("-inf")))
    n = tl.sum(cnt, 0)
    lb_max = tl.where(n > 0, tl.max(top, 0), 0.0)
    idx = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e, lb = load_eligible(d_ptr, e_ptr, idx, idx < N, floor, LIBDEVICE)
    tl.store(part_q_ptr + b, tl.sum(q_value(e, lb, lb_max, power, LIBDEVICE), 0))
    if b == 0:
        k, ok = expected_count(n, ratio_ptr, k_ptr, ratio, k_host, K_MODE)
        store_counts(ints_ptr, floats_ptr, n, k, ok, lb_max)


@triton.jit
def _key_kernel(d_ptr, e_ptr, part_q_ptr, key_ptr, ints_ptr, floats_ptr, N, G, floor, power, one_minus_mix, mix,
                LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, R_BLOCK: tl.constexpr):
    """Block ``b``: the sort keys of its tokens (``Q`` reduced from the partials in one fixed order)."""
    b = tl.program_id(0)
    n = tl.load(ints_ptr + 0).to(tl.int64)
    lb_max = tl.load(floats_ptr + 3)
    r = tl.arange(0, R_BLOCK)
    q_acc = tl.zeros([R_BLOCK], tl.float32)
    for s0 in range(0, G, R_BLOCK):
        q_acc += tl.load(part_q_ptr + s0 + r, mask=(s0 + r) < G, other=0.0)
    Q, share = mass_and_share(tl.sum(q_acc, 0), n, mix)
    idx = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < N
    e, lb = load_eligible(d_ptr, e_ptr, idx, inb, floor, LIBDEVICE)
    tl.store(key_ptr + idx, probability_key(e, q_value(e, lb, lb_max, power, LIBDEVICE), Q, share, one_minus_mix),
             mask=inb)
    if b == 0:
        tl.store(floats_ptr + 2, Q)


@triton.jit
def _water_kernel(skey_ptr, ints_ptr, floats_ptr, BLOCK: tl.constexpr):
    """One program: ``j*`` and ``c`` of the water-filling from the sorted keys, last block first."""
    n = tl.load(ints_ptr + 0).to(tl.int64)
    kk = tl.load(ints_ptr + 2).to(tl.int64)
    rev = (BLOCK - 1 - tl.arange(0, BLOCK)).to(tl.int64)     # lane t holds position start + BLOCK − 1 − t
    n_blocks = tl.cdiv(n, BLOCK)
    carry = tl.zeros([], tl.float64)
    j_star = n + 1                                 # > every candidate (candidates are < k' ≤ n)
    s_star = tl.zeros([], tl.float32)
    for b in range(0, n_blocks):
        j_b, s_b, carry = block_candidate(skey_ptr, (n_blocks - 1 - b) * BLOCK + rev, n, kk, carry)
        better = j_b < j_star                      # blocks come last to first: a lower j always wins
        j_star = tl.where(better, j_b, j_star)
        s_star = tl.where(better, s_b, s_star)
    tl.store(ints_ptr + 3, tl.minimum(j_star, n).to(tl.int32))
    tl.store(floats_ptr + 0, fill_factor(kk, j_star, s_star))
    tl.store(floats_ptr + 1, s_star)


@triton.jit
def _block_sum_kernel(skey_ptr, ints_ptr, part_s_ptr, BLOCK: tl.constexpr):
    """Block ``b`` of sorted positions: the float64 sum of its ``p``."""
    b = tl.program_id(0)
    n = tl.load(ints_ptr + 0).to(tl.int64)
    j = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(part_s_ptr + b, tl.sum(sorted_p(skey_ptr, j, j < n).to(tl.float64), 0))


@triton.jit
def _water_blocks_kernel(skey_ptr, ints_ptr, part_s_ptr, part_j_ptr, part_sj_ptr, G, BLOCK: tl.constexpr,
                         R_BLOCK: tl.constexpr):
    """Block ``b`` of sorted positions: its water-filling candidate ``(j_b, S_{j_b})``, the carry being the sum of
    the later blocks' partial sums (the draw kernel takes the least ``j_b``)."""
    b = tl.program_id(0)
    n = tl.load(ints_ptr + 0).to(tl.int64)
    kk = tl.load(ints_ptr + 2).to(tl.int64)
    r = tl.arange(0, R_BLOCK)
    acc = tl.zeros([R_BLOCK], tl.float64)
    for s0 in range(0, G, R_BLOCK):
        later = ((s0 + r) < G) & ((s0 + r) > b)
        acc += tl.load(part_s_ptr + s0 + r, mask=later, other=0.0)
    rev = (BLOCK - 1 - tl.arange(0, BLOCK)).to(tl.int64)
    j_b, s_b, _ = block_candidate(skey_ptr, b.to(tl.int64) * BLOCK + rev, n, kk, tl.sum(acc, 0))
    tl.store(part_j_ptr + b, j_b)
    tl.store(part_sj_ptr + b, s_b)


@triton.jit(do_not_specialize=["seed", "step"])
def _draw_kernel(
    skey_ptr, order_ptr, ints_ptr, floats_ptr, part_j_ptr, part_sj_ptr, step_ptr, mask_ptr, w_ptr, pi_ptr,
    N, G, seed, step,
    STEP_FROM_PTR: tl.constexpr, DRAW: tl.constexpr, WRITE_PI: tl.constexpr, MULTI: tl.constexpr,
    BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
    nll_ptr=None, pcnt_ptr=None, pf_ptr=None, FUSED: tl.constexpr = False,
):
    """Sorted positions ``m`` of one block: ``π``, the draw, the mask and the weight of token ``order[m]``.
    ``MULTI``: ``j*`` and ``c`` from the water-filling blocks' candidates (the least ``j_b``), else from the
    one-program water-filling's slots. ``FUSED`` (the fused ``sampled`` loss, SPEC §8): the weight written is
    the loss's row weight ``ω = w ⊘ f32(max(1, n))``, and the program stores its partials (count; ``Σw``,
    ``Σw²``, ``Σ ω ⊗ nll`` of its kept tokens) for the finish kernel of
    :mod:`cggr_torch.kernels.sampled_loss`."""
    m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = m < N
    n = tl.load(ints_ptr + 0).to(tl.int64)
    kk = tl.load(ints_ptr + 2).to(tl.int64)
    if MULTI:
        r = tl.arange(0, R_BLOCK)
        least = tl.zeros([R_BLOCK], tl.int64) + (n + 1)
        for s0 in range(0, G, R_BLOCK):
            least = tl.minimum(least, tl.load(part_j_ptr + s0 + r, mask=(s0 + r) < G, other=n + 1))
        j_star = tl.min(least, 0)
        s_acc = tl.zeros([R_BLOCK], tl.float32)
        for s0 in range(0, G, R_BLOCK):                 # candidates are distinct positions: one block has j*
            inr = (s0 + r) < G
            jb = tl.load(part_j_ptr + s0 + r, mask=inr, other=n + 1)
            s_acc = tl.maximum(s_acc, tl.where(inr & (jb == j_star) & (j_star <= n),
                                               tl.load(part_sj_ptr + s0 + r, mask=inr, other=0.0), 0.0))
        c = fill_factor(kk, j_star, tl.max(s_acc, 0))
    else:
        j_star = tl.load(ints_ptr + 3).to(tl.int64)
        c = tl.load(floats_ptr + 0)
    ranked = m < n
    p = sorted_p(skey_ptr, m, inb & ranked)
    tok = tl.load(order_ptr + m, mask=inb, other=0)
    pi = tl.where((m < j_star) | (kk >= n), 1.0, tl.minimum(c * p, 1.0))
    pi = tl.where(ranked & (kk > 0), pi, 0.0)
    if WRITE_PI:
        tl.store(pi_ptr + tok, pi, mask=inb)
    if DRAW:
        # seed and step are host integers mod 2^32 passed as int32 bit patterns (one signature for all values)
        h = lowbias32((seed + tl.zeros([], tl.int32)).to(tl.uint32, bitcast=True)
                       ^ tl.full([], -1640531527, tl.int32).to(tl.uint32, bitcast=True))   # 0x9E3779B9
        if STEP_FROM_PTR:
            s = tl.load(step_ptr).to(tl.int64).to(tl.uint32)                # mod 2^32 (truncation)
        else:
            s = (step + tl.zeros([], tl.int32)).to(tl.uint32, bitcast=True)
        h = lowbias32(h ^ s)
        h = lowbias32(h ^ tok.to(tl.uint32))                          # the flat index mod 2^32
        u = ((h >> 8) | 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08   # · 2^-24, exact
        keep = ranked & (u < pi)
        w = tl.where(keep, tl.math.div_rn(1.0, tl.where(keep, pi, 1.0)), 0.0)
        tl.store(mask_ptr + tok, keep, mask=inb)
        if FUSED:
            omega = tl.math.div_rn(w, tl.maximum(n, 1).to(tl.float32))
            tl.store(w_ptr + tok, omega, mask=inb)
            nll = tl.load(nll_ptr + tok, mask=inb & keep, other=0.0)   # kept ⇒ eligible ⇒ finite
            b = tl.program_id(0)
            nb = tl.num_programs(0)                     # the partials are (3, programs) float32
            tl.store(pcnt_ptr + b, tl.sum(keep.to(tl.int32), 0))
            tl.store(pf_ptr + b, tl.sum(w, 0))
            tl.store(pf_ptr + nb + b, tl.sum(w * w, 0))
            tl.store(pf_ptr + 2 * nb + b, tl.sum(tl.where(keep, omega * nll, 0.0), 0))
        else:
            tl.store(w_ptr + tok, w, mask=inb)


# ============================================================================================ launchers
def _int32_bits(value: int) -> int:
    """A value mod 2^32 as the signed int32 with the same bits (so the kernel argument is always int32)."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def use_libdevice() -> bool:
    """libdevice ``logf``/``expf`` when compiled (PyTorch's CUDA functions); the interpreter has no libdevice.
    The ``LIBDEVICE`` argument of every probability kernel (this module's and the fused loss's)."""
    return not interpreting()


def multi_program(n_tokens: int) -> bool:
    """Whether ``n_tokens`` take the multi-program kernels (more launches, each short) instead of the single
    programs (whose time grows linearly with ``N``): above :data:`SINGLE_PROGRAM_MAX_TOKENS`."""
    return n_tokens > SINGLE_PROGRAM_MAX_TOKENS


class WaterPartials(NamedTuple):
    """The multi-program water-filling's per-block candidates (int64 ``j_b``, float32 ``S_{j_b}``)."""

    j: torch.Tensor
    s: torch.Tensor


def launch_probabilities(difficulty: torch.Tensor, eligible: torch.Tensor, key: torch.Tensor, ints: torch.Tensor,
                         floats: torch.Tensor, *, ratio: Union[float, torch.Tensor, None] = None,
                         k: Union[int, torch.Tensor, None] = None, power: float, uniform_mix: float,
                         floor: float) -> None:
    """Step 1: ``key`` (contiguous int32 ``(N,)``) ← the sort key of ``p``; ``ints``/``floats`` ← ``n``, ``k``,
    ``k'``, ``ok`` (and ``Q``, ``max ln b``). One program, or three multi-program launches above
    :data:`SINGLE_PROGRAM_MAX_TOKENS`. Exactly one of ``ratio`` (a host float32 value or a one-element float
    device tensor) and ``k`` (a host integer ``>= 0`` or a one-element integer device tensor).
    ``difficulty``/``eligible`` flat and contiguous; no other checks here."""
    if (ratio is None) == (k is None):
        raise ValueError("launch_probabilities: pass exactly one of ratio and k")
    ratio_t = k_t = ints
    ratio_v, k_v = 1.0, 0
    if ratio is not None:
        if isinstance(ratio, torch.Tensor):
            mode, ratio_t = _K_FROM_DEVICE_RATIO, ratio
        else:
            mode, ratio_v = _K_FROM_HOST_RATIO, float(ratio)
    elif isinstance(k, torch.Tensor):
        mode, k_t = _K_FROM_DEVICE, k
    else:
        mode, k_v = _K_FROM_HOST, int(k)
    n_tok = difficulty.numel()
    # (1 − λ) and λ rounded to float32 from the float64 host values, as the reference does
    floor_v, power_v = float(np.float32(floor)), float(np.float32(power))
    keep_v, mix_v = float(np.float32(1.0 - uniform_mix)), float(np.float32(uniform_mix))
    with device_guard(difficulty):
        if not multi_program(n_tok):
            _probabilities_kernel[(1,)](
                difficulty, eligible, ratio_t, k_t, key, ints, floats,
                n_tok, ratio_v, k_v, floor_v, power_v, keep_v, mix_v,
                K_MODE=mode, LIBDEVICE=use_libdevice(), BLOCK=PROB_BLOCK, num_warps=PROB_WARPS,
                enable_fp_fusion=False,
            )
            return
        g = triton.cdiv(n_tok, MULTI_BLOCK)
        part_n = torch.empty((g,), dtype=torch.int32, device=difficulty.device)
        part_max = torch.empty((g,), dtype=torch.float32, device=difficulty.device)
        part_q = torch.empty((g,), dtype=torch.float32, device=difficulty.device)
        common = dict(LIBDEVICE=use_libdevice(), BLOCK=MULTI_BLOCK, num_warps=_MULTI_WARPS, enable_fp_fusion=False)
        _count_max_kernel[(g,)](difficulty, eligible, part_n, part_max, n_tok, floor_v, **common)
        _q_sum_kernel[(g,)](difficulty, eligible, part_n, part_max, part_q, ratio_t, k_t, ints, floats,
                            n_tok, g, ratio_v, k_v, floor_v, power_v, K_MODE=mode, R_BLOCK=REDUCE_BLOCK, **common)
        _key_kernel[(g,)](difficulty, eligible, part_q, key, ints, floats, n_tok, g, floor_v, power_v, keep_v, mix_v,
                          R_BLOCK=REDUCE_BLOCK, **common)


def sort_by_probability(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: ``(sorted_key, order)``: one stable ascending ``torch.sort`` of the int32 key (``p`` descending,
    ties by lower flat index, the ineligible tokens last)."""
    out = torch.sort(key, stable=True)
    return out.values, out.indices


def launch_water_filling(sorted_key: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor
                         ) -> Optional[WaterPartials]:
    """Step 3: one program writing ``j*`` into ``ints`` and ``c`` (and ``S_{j*}``) into ``floats``; above
    :data:`SINGLE_PROGRAM_MAX_TOKENS` two multi-program launches whose per-block candidates it returns (pass
    them to :func:`launch_draws`)."""
    n_tok = sorted_key.numel()
    if n_tok == 0:
        return None
    with device_guard(sorted_key):
        if not multi_program(n_tok):
            _water_kernel[(1,)](sorted_key, ints, floats, BLOCK=_WATER_BLOCK, num_warps=_WATER_WARPS,
                                enable_fp_fusion=False)
            return None
        g = triton.cdiv(n_tok, MULTI_BLOCK)
        dev = sorted_key.device
        part_s = torch.empty((g,), dtype=torch.float64, device=dev)
        partials = WaterPartials(torch.empty((g,), dtype=torch.int64, device=dev),
                                 torch.empty((g,), dtype=torch.float32, device=dev))
        _block_sum_kernel[(g,)](sorted_key, ints, part_s, BLOCK=MULTI_BLOCK, num_warps=_MULTI_WARPS)
        _water_blocks_kernel[(g,)](sorted_key, ints, part_s, partials.j, partials.s, g, BLOCK=MULTI_BLOCK,
                                   R_BLOCK=REDUCE_BLOCK, num_warps=_MULTI_WARPS, enable_fp_fusion=False)
        return partials


def launch_draws(sorted_key: torch.Tensor, order: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, *,
                 mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                 pi: Optional[torch.Tensor] = None, seed: int = 0, step: Union[int, torch.Tensor] = 0,
                 partials: Optional[WaterPartials] = None, fused: Optional["DrawPartials"] = None) -> None:
    """Step 4: every element of ``pi`` (float32 ``(N,)``) and/or of ``mask`` (bool) and ``weights`` (float32)
    is written once. ``seed`` a host integer, ``step`` a host integer or a one-element integer tensor on the
    device (both taken mod 2^32); ``partials``: what :func:`launch_water_filling` returned. ``fused`` (the
    fused ``sampled`` loss): ``weights`` receives the row weights ``w ⊘ f32(max(1, n))`` and every draw program
    its partials (:class:`DrawPartials`, sized by :func:`draw_programs`)."""
    n_tok = order.numel()
    if n_tok == 0:
        return
    draw = mask is not None
    if draw != (weights is not None):
        raise ValueError("launch_draws: pass mask and weights together")
    step_from_ptr = isinstance(step, torch.Tensor)
    multi = partials is not None
    with device_guard(order):
        _draw_kernel[(triton.cdiv(n_tok, DRAW_BLOCK),)](
            sorted_key, order, ints, floats, partials.j if multi else ints, partials.s if multi else floats,
            step if step_from_ptr else ints, mask if draw else ints, weights if draw else floats,
            pi if pi is not None else floats,
            n_tok, partials.j.numel() if multi else 0, _int32_bits(int(seed)),
            0 if step_from_ptr else _int32_bits(int(step)),
            STEP_FROM_PTR=step_from_ptr, DRAW=draw, WRITE_PI=pi is not None, MULTI=multi, BLOCK=DRAW_BLOCK,
            R_BLOCK=REDUCE_BLOCK, nll_ptr=fused.nll if fused is not None else None,
            pcnt_ptr=fused.count if fused is not None else None, pf_ptr=fused.sums if fused is not None else None,
            FUSED=fused is not None, num_warps=_DRAW_WARPS, enable_fp_fusion=False,
        )


class DrawPartials(NamedTuple):
    """The fused ``sampled`` loss's per-draw-program partials: the flat float32 ``nll`` read by the draws,
    int32 ``count`` ``(G,)`` and float32 ``sums`` ``(3, G)`` (``Σw``, ``Σw²``, ``Σ ω·nll``), ``G`` =
    :func:`draw_programs`."""

    nll: torch.Tensor
    count: torch.Tensor
    sums: torch.Tensor


def draw_programs(n_tokens: int) -> int:
    """Programs of the draw kernel for ``n_tokens`` (one per :data:`DRAW_BLOCK` sorted positions)."""
    return triton.cdiv(n_tokens, DRAW_BLOCK) if n_tokens > 0 else 0


# ========================================================================================== public API
def _check_tensors(difficulty: torch.Tensor, eligible: torch.Tensor) -> None:
    if not isinstance(difficulty, torch.Tensor) or difficulty.dtype not in (torch.float32, torch.float16,
                                                                             torch.bfloat16, torch.float64):
        raise ValueError(f"difficulty: expected a float tensor (float32/float16/bfloat16/float64), got "
                         f"{difficulty.dtype if isinstance(difficulty, torch.Tensor) else type(difficulty).__name__}")
    check_kernel_device(difficulty, "difficulty")
    if difficulty.dim() not in (1, 2):
        raise ValueError(f"difficulty: expected shape (N,) or (B, T), got {tuple(difficulty.shape)}")
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool:
        raise ValueError(f"eligible: expected a bool tensor, got "
                         f"{eligible.dtype if isinstance(eligible, torch.Tensor) else type(eligible).__name__}")
    if tuple(eligible.shape) != tuple(difficulty.shape) or eligible.device != difficulty.device:
        raise ValueError(f"eligible: expected shape {tuple(difficulty.shape)} on {difficulty.device} (that of "
                         f"difficulty), got {tuple(eligible.shape)} on {eligible.device}")
    if difficulty.numel() >= 2**31:
        raise ValueError(f"difficulty: at most 2**31 - 1 tokens (int32 counts, SPEC §6), got {difficulty.numel()}")


def plan_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's int32 / float32 plan buffers (slots :data:`INT_SLOTS` / :data:`FLOAT_SLOTS`, written by the
    kernels before they are read); shared with the fused loss."""
    return (torch.empty((_N_INTS,), dtype=torch.int32, device=device),
            torch.empty((_N_FLOATS,), dtype=torch.float32, device=device))


def _probabilities_and_order(d: torch.Tensor, e: torch.Tensor, *, ratio: Union[float, torch.Tensor, None],
                             k: Union[int, torch.Tensor, None], power: float, uniform_mix: float,
                             floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    Optional[WaterPartials]]:
    """Steps 1-3 of the module docstring: ``(sorted_key, order, ints, floats, partials)``."""
    dev = d.device
    ints, floats = plan_buffers(dev)
    key = torch.empty((d.numel(),), dtype=torch.int32, device=dev)
    launch_probabilities(d, e, key, ints, floats, ratio=ratio, k=k, power=power, uniform_mix=uniform_mix,
                         floor=floor)
    if isinstance(ratio, torch.Tensor):     # a CPU value was also checked on the host (when not compiling)
        torch._assert_async(ints[INT_SLOTS["ok"]], "ratio: expected a value in (0, 1]")
    sorted_key, order = sort_by_probability(key)
    partials = launch_water_filling(sorted_key, ints, floats)
    return sorted_key, order, ints, floats, partials


def sample_tokens_triton(difficulty: torch.Tensor, eligible: torch.Tensor, ratio: Union[torch.Tensor, float], *,
                         step: Union[int, torch.Tensor] = 0, seed: int = 0, power: float = 1.0,
                         uniform_mix: float = 0.1, floor: float = 1e-6
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cggr_torch.selection.sample_tokens` (SPEC §7.4) on the device: ``(mask, weights, k)``.

    ``k = num_selected(n, ratio)`` (SPEC §5.3) is the expected count; token ``i`` is kept iff it is eligible
    (and its difficulty not NaN) and ``uniform_hash(seed, step, i) < π_i``, with weight ``1/π_i`` (float32; 0
    for the others). Same ``k``, order and draws as the reference; ``π`` within SPEC §11's ``PI_RTOL``.

    Args:
        difficulty: float32/float16/bfloat16/float64 ``(N,)`` or ``(B, T)`` (float64 rounds to float32),
            on CUDA (CPU under ``TRITON_INTERPRET=1``).
        eligible: bool tensor of the same shape and device.
        ratio: a host number in ``(0, 1]``, or a one-element float tensor (a device value is checked on the
            device with ``torch._assert_async``).
        step: a host integer ``>= 0`` or a one-element integer tensor (taken mod 2^32).
        seed, power, uniform_mix, floor: SPEC §7.4's parameters (``CGGRConfig.sample_*`` rules).

    Returns:
        ``mask`` (bool, the input's shape), ``weights`` (float32, the input's shape), ``k`` (0-d int32).

    Raises:
        ValueError: bad tensors, parameters, ratio or step (nothing is read from the device).
    """
    _check_tensors(difficulty, eligible)
    power, uniform_mix, floor, seed = check_sampling_parameters(power, uniform_mix, floor, seed)
    dev = difficulty.device
    r = ratio_argument(ratio, dev)
    step_v = int_argument(step, "step", dev)
    shape = tuple(difficulty.shape)
    d = difficulty.reshape(-1).contiguous()
    e = eligible.reshape(-1).contiguous()
    ratio_t = r if isinstance(r, torch.Tensor) else None
    step_t = step_v if isinstance(step_v, torch.Tensor) else None
    mask, weights, k = sample_tokens_op(d, e, ratio_t, 0.0 if ratio_t is not None else float(r), step_t,
                                        0 if step_t is not None else _int32_bits(int(step_v)), int(seed),
                                        float(power), float(uniform_mix), float(floor))
    return mask.view(shape), weights.view(shape), k


@torch.library.custom_op("cggr::sample_tokens", mutates_args=())
def sample_tokens_op(d: torch.Tensor, e: torch.Tensor, ratio: Optional[torch.Tensor], ratio_value: float,
                     step: Optional[torch.Tensor], step_value: int, seed: int, power: float, uniform_mix: float,
                     floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_tokens_triton` on checked flat arguments (SPEC §12.1): ``ratio`` a one-element device
    tensor or None and the host ``ratio_value``; ``step`` likewise (``step_value`` as int32 bits). Returns
    ``(mask, weights, k)`` (flat; ``k`` a 0-d int32 copy of the plan's slot: an op's outputs are fully defined
    and alias nothing)."""
    sorted_key, order, ints, floats, partials = _probabilities_and_order(
        d, e, ratio=ratio if ratio is not None else ratio_value, k=None, power=power, uniform_mix=uniform_mix,
        floor=floor)
    mask = torch.empty((d.numel(),), dtype=torch.bool, device=d.device)
    weights = torch.empty((d.numel(),), dtype=torch.float32, device=d.device)
    launch_draws(sorted_key, order, ints, floats, mask=mask, weights=weights, seed=seed,
                 step=step if step is not None else step_value, partials=partials)
    return mask, weights, ints[INT_SLOTS["k"]].clone()


@sample_tokens_op.register_fake
def _(d: torch.Tensor, e: torch.Tensor, ratio: Optional[torch.Tensor], ratio_value: float,
      step: Optional[torch.Tensor], step_value: int, seed: int, power: float, uniform_mix: float,
      floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((d.shape[0],), dtype=torch.bool, device=d.device),
            torch.empty((d.shape[0],), dtype=torch.float32, device=d.device),
            torch.empty((), dtype=torch.int32, device=d.device))


def sampling_probabilities_triton(difficulty: torch.Tensor, eligible: torch.Tensor, k: Union[int, torch.Tensor], *,
                                  power: float = 1.0, uniform_mix: float = 0.1, floor: float = 1e-6) -> torch.Tensor:
    """:func:`cggr_torch.selection.sampling_probabilities` (SPEC §7.4) on the device: ``π`` (float32, the
    input's shape; 0 where not eligible and everywhere when ``k = 0``; ``k > n`` counts as ``n``).

    Args:
        difficulty, eligible: as :func:`sample_tokens_triton`.
        k: the expected count, a host integer ``>= 0`` or a one-element integer tensor (a negative device
            value counts as 0).
        power, uniform_mix, floor: SPEC §7.4's parameters.
    """
    _check_tensors(difficulty, eligible)
    power, uniform_mix, floor, _ = check_sampling_parameters(power, uniform_mix, floor)
    dev = difficulty.device
    k_arg = int_argument(k, "k", dev)
    if isinstance(k_arg, int):
        k_arg = max(0, min(k_arg, 2**31 - 1))           # counts are int32 (a negative CPU tensor counts as 0)
    shape = tuple(difficulty.shape)
    d = difficulty.reshape(-1).contiguous()
    e = eligible.reshape(-1).contiguous()
    sorted_key, order, ints, floats, partials = _probabilities_and_order(d, e, ratio=None, k=k_arg, power=power,
                                                               uniform_mix=uniform_mix, floor=floor)
    pi = torch.empty((d.numel(),), dtype=torch.float32, device=dev)
    launch_draws(sorted_key, order, ints, floats, pi=pi, partials=partials)
    return pi.view(shape)


def __getattr__(name: str) -> Any:
    """The fused ``sampled`` loss's names (:data:`_FUSED_LOSS_NAMES`), imported from
    :mod:`cggr_torch.kernels.sampled_loss` on first use (PEP 562): that module imports this one, so an import at
    the top here would be a cycle."""
    if name in _FUSED_LOSS_NAMES:
        return getattr(importlib.import_module(f"{__package__}.sampled_loss"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
