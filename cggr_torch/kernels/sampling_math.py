"""The sampler's arithmetic (SPEC §7.4) as Triton device functions, operation by operation.

Called by the kernels of the sampler (:mod:`cggr_torch.kernels.sampling`, whose module docstring states the
steps and their rounding) and of the fused ``sampled`` loss (:mod:`cggr_torch.kernels.sampled_loss`): step 1's
``ln b`` (:func:`log_b`, :func:`load_eligible`), ``k`` (:func:`expected_count`), ``q`` (:func:`q_value`), the mass
``Q`` and the uniform share (:func:`mass_and_share`) and the sort key of ``p`` (:func:`probability_key`); step
3's water-filling candidate of a block of sorted positions (:func:`sorted_p`, :func:`block_candidate`,
:func:`fill_factor`); step 4's hash (:func:`lowbias32`). The plan-buffer slots written by :func:`store_counts`
are :data:`cggr_torch.kernels.sampling.INT_SLOTS` / ``FLOAT_SLOTS``. Every kernel that calls them is launched
without FMA contraction; ``LIBDEVICE`` selects libdevice's ``logf``/``expf`` (compiled) or Triton's (the
interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["log_b", "load_eligible", "expected_count", "store_counts", "q_value", "probability_key",
           "mass_and_share", "sorted_p", "block_candidate", "fill_factor", "lowbias32"]


@triton.jit
def _ln(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def log_b(d, floor, LIBDEVICE: tl.constexpr):
    """``ln b`` with ``b = min(max(d, 0) ⊕ ε, FLT_MAX)`` (SPEC §7.4: ±∞ difficulties stay finite)."""
    b = tl.minimum(tl.maximum(d, 0.0) + floor, 3.4028234663852886e38)
    return _ln(b, LIBDEVICE)


@triton.jit
def load_eligible(d_ptr, e_ptr, idx, inb, floor, LIBDEVICE: tl.constexpr):
    """``(e, ln b)`` of tokens ``idx``: eligible = ``eligible`` and not NaN (SPEC §4)."""
    d = tl.load(d_ptr + idx, mask=inb, other=0.0).to(tl.float32)    # float64 rounds to nearest (SPEC §6)
    e = (tl.load(e_ptr + idx, mask=inb, other=0) != 0) & (d == d) & inb
    return e, log_b(d, floor, LIBDEVICE)


@triton.jit
def expected_count(n, ratio_ptr, k_ptr, ratio, k_host, K_MODE: tl.constexpr):
    """``(k, ok)``: SPEC §5.3's ``k`` from a host or device ratio (``ok``: the ratio lies in ``(0, 1]``), or a
    given host or device ``k`` (``ok`` true). ``n`` int64."""
    ok = n >= 0
    if K_MODE == 0 or K_MODE == 1:
        if K_MODE == 0:
            r = ratio + tl.zeros([], tl.float32)
        else:
            r = tl.load(ratio_ptr).to(tl.float32)
        ok = (r > 0.0) & (r <= 1.0)
        x = tl.where(ok, r * 65536.0, 0.0)                           # an exact scaling
        f = x.to(tl.int32)                                            # x ≥ 0: truncation = floor
        frac = x - f.to(tl.float32)                                   # exact
        r_q = f + ((frac > 0.5) | ((frac == 0.5) & ((f & 1) == 1))).to(tl.int32)
        k = (r_q.to(tl.int64) * n + 32768) >> 16
        k = tl.where(n > 0, tl.minimum(n, tl.maximum(k, 1)), 0)
    elif K_MODE == 2:
        k = k_host + tl.zeros([], tl.int64)
    else:
        k = tl.load(k_ptr).to(tl.int64)
    return k, ok


@triton.jit
def store_counts(ints_ptr, floats_ptr, n, k, ok, lb_max):
    tl.store(ints_ptr + 0, n.to(tl.int32))
    tl.store(ints_ptr + 1, k.to(tl.int32))
    tl.store(ints_ptr + 2, tl.minimum(k, n).to(tl.int32))
    tl.store(ints_ptr + 4, ok.to(tl.int32))
    tl.store(floats_ptr + 3, lb_max)


@triton.jit
def q_value(e, lb, lb_max, power, LIBDEVICE: tl.constexpr):
    """``q = exp(β ⊗ (ln b ⊖ ln b*))`` of the eligible tokens, 0 for the others."""
    return tl.where(e, _exp(power * tl.where(e, lb - lb_max, 0.0), LIBDEVICE), 0.0)


@triton.jit
def probability_key(e, q, Q, share, one_minus_mix):
    """int32 key of ``p = ((1 − λ) ⊗ q) ⊘ Q ⊕ λ/n``: ``~bits(p)`` (``p ≥ +0``), ``2^31 − 1`` if not eligible."""
    p = tl.math.div_rn(one_minus_mix * q, Q) + share
    return tl.where(e, ~p.to(tl.int32, bitcast=True), 2147483647)


@triton.jit
def mass_and_share(Q, n, mix):
    """``(Q, λ ⊘ f32(max(n, 1)))``; ``Q ≥ 1`` whenever ``n ≥ 1`` (q of the maximum is ``exp(0) = 1``), and no
    ``p`` is read when ``n = 0``."""
    share = tl.math.div_rn(mix + tl.zeros([], tl.float32), tl.maximum(n, 1).to(tl.float32))
    return tl.where(Q > 0.0, Q, 1.0), share


@triton.jit
def sorted_p(skey_ptr, j, ranked):
    """``p_(j)`` from the sorted key's bits (0 past the ``n`` eligible positions)."""
    key = tl.load(skey_ptr + j, mask=ranked, other=-1)              # ~(-1) = +0.0
    return tl.where(ranked, (~key).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def block_candidate(skey_ptr, j, n, kk, carry):
    """Sorted positions ``j`` (descending along the lanes) with ``carry`` = the float64 sum of every later
    position: ``(j_b, S at j_b, S64 at the block's first position)``, ``j_b`` the least ``j < k'`` with
    ``f32(k' − j) ⊗ p_(j) ≤ S_j`` (``n + 1`` if none). ``S_j`` accumulates in float64 (smallest terms first)
    and is rounded once to float32: within about an ulp of the exact sum whatever the scan's order."""
    ranked = j < n
    p = sorted_p(skey_ptr, j, ranked)
    S64 = carry + tl.cumsum(p.to(tl.float64), 0)
    S = S64.to(tl.float32)
    qualifies = ranked & (j < kk) & ((kk - j).to(tl.float32) * p <= S)
    j_b = tl.min(tl.where(qualifies, j, n + 1), 0)
    s_b = tl.sum(tl.where(j == j_b, S, 0.0), 0)
    return j_b, s_b, tl.max(S64, 0)


@triton.jit
def fill_factor(kk, j_star, s_star):
    """``c = f32(k' − j*) ⊘ S_{j*}`` (0 if ``S_{j*} = 0``)."""
    return tl.where(s_star > 0.0,
                    tl.math.div_rn((kk - j_star).to(tl.float32), tl.where(s_star > 0.0, s_star, 1.0)), 0.0)


@triton.jit
def lowbias32(x):
    """lowbias32 (SPEC §7.4) on uint32: logical shifts, products mod 2^32."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.int32).to(tl.uint32, bitcast=True)
    x = x ^ (x >> 15)
    x = x * tl.full([], -2073254261, tl.int32).to(tl.uint32, bitcast=True)        # 0x846CA68B
    return x ^ (x >> 16)
