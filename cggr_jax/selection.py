r"""The total order of tokens and the selection strategies (SPEC §6–§7), with static shapes.

Every strategy returns a boolean mask of the input's shape — never a dynamic-size gather — so the selection
compiles once under ``jax.jit`` whatever ``n`` and ``k`` are.

**Order (§6).** Eligible tokens are ranked by difficulty descending, ties by lower flat index. The float32
difficulty is mapped to a monotone int32 key (``-0.0`` and ``+0.0`` equal, ``±inf`` ordinary numbers) and the
tokens are sorted on ``(−key, flat index)`` with :func:`jax.lax.sort` (ineligible tokens keyed last); the
index key makes the order total, so no tie can depend on the sort's stability. A NaN difficulty is never
eligible.

**Integer arithmetic.** ``k`` (§5.3), the stratum bounds ``floor(s·n/S)``, the quotas ``floor(k·(S−s)/W)`` and
the in-stratum positions ``floor((2j+1)·m/(2e))`` are exact. Their products exceed 32 bits for large ``n``,
and JAX has no 64-bit integers unless x64 is enabled, so they are evaluated on ``uint32`` pairs
``(hi, lo)`` (a 32×32→64-bit product on 16-bit limbs and a 64/32-bit restoring division); the results are the
same with or without ``jax_enable_x64``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from cggr import SELECTION_STRATEGIES
from cggr.config import SAMPLED_SELECTIONS, check_sampling_parameters

from cggr_jax import curriculum, utils

__all__ = ["SELECTION_STRATEGIES", "MAX_STRATA", "rank_tokens", "select_tokens", "select_checked",
           "uniform_hash", "sampling_probabilities", "sample_tokens", "sample_checked"]


#: Upper bound on ``num_strata``: the quota denominator ``W = S(S+1)/2`` must fit in 32 bits.
MAX_STRATA = 65536

_U16 = 0xFFFF


# --------------------------------------------------------------------------------- 64-bit integer helpers
def _u32(x: Any) -> jax.Array:
    """``x`` as uint32 (non-negative integers; Python ints up to 2^32 − 1 are converted exactly)."""
    if isinstance(x, int):
        return jnp.asarray(np.uint32(x))
    return jnp.asarray(x).astype(jnp.uint32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact ``a·b`` of two uint32 arrays as ``(hi, lo)`` uint32 words (16-bit limbs, no overflow)."""
    m16 = jnp.uint32(_U16)
    s16 = jnp.uint32(16)
    a0, a1 = a & m16, a >> s16
    b0, b1 = b & m16, b >> s16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1          # each < 2^32
    mid = (p00 >> s16) + (p01 & m16) + (p10 & m16)                    # < 3·2^16
    lo = (p00 & m16) | (mid << s16)                                   # mid << 16 keeps its low 16 bits
    hi = p11 + (p01 >> s16) + (p10 >> s16) + (mid >> s16)
    return hi, lo


def _add_wide(hi: jax.Array, lo: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo) + c`` for uint32 ``c`` (the carry goes into ``hi``)."""
    lo2 = lo + c
    return hi + (lo2 < lo).astype(jnp.uint32), lo2


def _div_wide(hi: jax.Array, lo: jax.Array, d: jax.Array) -> jax.Array:
    """``floor((hi·2^32 + lo) / d)`` for uint32 ``d ≥ 1``, assuming ``hi < d`` (the quotient fits in 32 bits).

    Restoring division, one quotient bit per step; the remainder stays ``< d`` and the bit shifted out of the
    32-bit remainder is tracked, so ``d`` may use all 32 bits.
    """
    one = jnp.uint32(1)
    r = hi
    q = jnp.zeros_like(hi)
    for i in range(31, -1, -1):
        shift = jnp.uint32(i)
        top = r >> jnp.uint32(31)
        r = (r << one) | ((lo >> shift) & one)
        ge = (top == one) | (r >= d)
        r = jnp.where(ge, r - d, r)
        q = q | (ge.astype(jnp.uint32) << shift)
    return q


def _muldiv(a: Any, b: Any, d: Any, add: Any = 0) -> jax.Array:
    """``floor((a·b + add) / d)`` exactly, for uint32 operands whose quotient fits in 32 bits."""
    hi, lo = _mul_wide(_u32(a), _u32(b))
    hi, lo = _add_wide(hi, lo, _u32(add))
    return _div_wide(hi, lo, _u32(d))


def _floor_scaled(x: jax.Array, a: jax.Array, d: int) -> jax.Array:
    """``floor(x·a / d)`` (int32) for uint32 ``x < 2^31``, ``0 ≤ a ≤ d`` and a static ``d ≥ 1``.

    With ``x = q·d + r``: ``floor(x·a/d) = q·a + floor(r·a/d)`` and ``r·a < d²``; for ``d < 2^16`` that fits
    in uint32 and costs no long division, otherwise the 64-bit path (:func:`_muldiv`) is used.
    """
    if d < 2**16:
        dd = jnp.uint32(d)
        q, r = x // dd, x % dd
        return (q * a + (r * a) // dd).astype(jnp.int32)
    return _muldiv(x, a, d).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ §6 order
def _order_key(difficulty: jax.Array) -> jax.Array:
    """A signed int32 key with ``key(x) < key(y) ⟺ x < y`` for non-NaN float32, and ``key(−0.0) = key(+0.0)``.

    Computed on the bit pattern, so no floating-point simplification can undo the canonicalisation of −0.0.
    """
    bits = jax.lax.bitcast_convert_type(difficulty.astype(jnp.float32), jnp.int32)
    magnitude = bits & jnp.int32(0x7FFFFFFF)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)     # negative floats: -1 - magnitude
    return jnp.where(magnitude == 0, jnp.int32(0), key)


def _ranks_last_axis(difficulty: jax.Array, eligible: jax.Array) -> jax.Array:
    """Rank along the last axis (difficulty descending, lower index first), −1 where not eligible.

    ``eligible`` must already exclude NaN difficulties. One sort on ``(key, index)`` — ineligible entries get
    the key ``INT32_MAX``, above every eligible ``−key`` (``|key| ≤ 0x7F800001`` for non-NaN floats), so they
    sort last — then the permutation is inverted with a scatter (unique indices).
    """
    shape = difficulty.shape
    axis = difficulty.ndim - 1
    if shape[-1] == 0 or difficulty.size == 0:
        return jnp.full(shape, -1, dtype=jnp.int32)
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    sort_key = jnp.where(eligible, -_order_key(difficulty), jnp.int32(np.iinfo(np.int32).max))
    _, order = jax.lax.sort((sort_key, iota), dimension=axis, num_keys=2)
    # order[..., p] = index at sorted position p; scatter p back to that index.
    if difficulty.ndim == 1:
        position = jnp.zeros_like(order).at[order].set(iota, unique_indices=True)
    else:
        rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        position = jnp.zeros_like(order).at[rows, order].set(iota, unique_indices=True)
    return jnp.where(eligible, position, jnp.int32(-1))


def _check_scores(difficulty: Any, eligible: Any) -> tuple[jax.Array, jax.Array]:
    dtype = getattr(difficulty, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"difficulty: expected a floating-point array of shape (N,) or (B, T), got dtype {dtype}")
    if difficulty.ndim not in (1, 2):
        raise ValueError(f"difficulty: expected shape (N,) or (B, T), got {tuple(difficulty.shape)}")
    e_dtype = getattr(eligible, "dtype", None)
    if e_dtype is None or e_dtype != jnp.bool_:
        raise ValueError(f"eligible: expected a bool array of shape {tuple(difficulty.shape)}, got dtype {e_dtype}")
    if tuple(eligible.shape) != tuple(difficulty.shape):
        raise ValueError(f"eligible: expected shape {tuple(difficulty.shape)} (the shape of difficulty), "
                         f"got {tuple(eligible.shape)}")
    # SPEC §6: wider difficulties (float64) are first rounded to float32 (round to nearest, ties to even),
    # then ranked: both packages select the same tokens from the same array. Host arrays are rounded by NumPy
    # before any conversion, so the result does not depend on jax_enable_x64.
    if isinstance(difficulty, np.ndarray):
        difficulty = difficulty.astype(np.float32)
    d = jnp.asarray(difficulty).astype(jnp.float32)
    return d, jnp.asarray(eligible) & ~jnp.isnan(d)


def rank_tokens(difficulty: jax.Array, eligible: jax.Array) -> jax.Array:
    """SPEC §6: the int32 rank in ``[0, n)`` of every eligible token, −1 elsewhere (the input's shape).

    Difficulty descending (float32; ``+0.0 == −0.0``; ``±inf`` rank as numbers), ties by lower flat
    (row-major) index. A token with a NaN difficulty is not eligible.
    """
    d, e = _check_scores(difficulty, eligible)
    return _rank_flat(d, e)


@jax.jit
def _rank_flat(d: jax.Array, e: jax.Array) -> jax.Array:
    return _ranks_last_axis(d.reshape(-1), e.reshape(-1)).reshape(d.shape)


# ------------------------------------------------------------------------------------------- §7 strategies
def _stratified_mask(rank: jax.Array, n: jax.Array, k: jax.Array, num_strata: int) -> jax.Array:
    """SPEC §7.2 over flat ranks (−1 = not eligible): strata, quotas, spill-over, systematic sampling."""
    S = num_strata
    W = S * (S + 1) // 2
    n_u = _u32(n)
    k_i = k.astype(jnp.int32)
    bounds = _floor_scaled(n_u, jnp.arange(S + 1, dtype=jnp.uint32), S)          # floor(s·n/S), s = 0..S
    m = bounds[1:] - bounds[:-1]                                                   # stratum sizes m_s
    q = _floor_scaled(_u32(k_i), jnp.uint32(S) - jnp.arange(S, dtype=jnp.uint32), W)  # floor(k·(S−s)/W)
    remainder = k_i - jnp.sum(q)                                       # R < S
    q = q + (jnp.arange(S, dtype=jnp.int32) < remainder).astype(jnp.int32)
    # First walk, c_{s+1} = max(0, c_s + q_s − m_s), c_0 = 0, in closed form (Lindley):
    # c_s = X_s − min_{j ≤ s} X_j with X the prefix sums of (q − m).
    X = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q - m)])
    carry = X - jax.lax.cummin(X, axis=0)                              # c_0 .. c_S
    e = jnp.minimum(m, q + carry[:-1])
    # Second walk: the leftover c_S fills the strata in order, each up to its room m_s − e_s.
    room = m - e
    before = jnp.cumsum(room) - room
    e = e + jnp.clip(carry[-1] - before, 0, room)
    # The stratum of rank r: the number of inner bounds floor(s·n/S), s = 1..S−1, that are <= r.
    eligible = rank >= 0
    r = jnp.maximum(rank, 0)
    method = "compare_all" if S <= 64 else "scan"
    s_tok = jnp.searchsorted(bounds[1:S], r, side="right", method=method).astype(jnp.int32)
    u = r - bounds[s_tok]                                              # rank inside the stratum
    m_t = m[s_tok]
    e_t = e[s_tok]
    # The stratum keeps the in-stratum ranks f(j) = floor((2j+1)·m/(2e)), j < e (strictly increasing as
    # m/e >= 1). j0 = #{j < e : f(j) <= u − 1} = min(e, floor((2e·u + m − 1) / (2m))) is the first j with
    # f(j) >= u, so u is kept iff j0 < e and f(j0) <= u, i.e. (2·j0 + 1)·m < 2e·(u + 1) (64-bit compare).
    two = jnp.uint32(2)
    m_u, e_u = _u32(m_t), _u32(e_t)
    two_m = jnp.maximum(m_u * two, jnp.uint32(1))                      # < 2^32 since m < 2^31
    j0 = jnp.minimum(e_u, _muldiv(e_u * two, u, two_m, add=_u32(jnp.maximum(m_t - 1, 0))))
    lhs_hi, lhs_lo = _mul_wide(j0 * two + jnp.uint32(1), m_u)
    rhs_hi, rhs_lo = _mul_wide(e_u * two, _u32(u + 1))
    hit = (lhs_hi < rhs_hi) | ((lhs_hi == rhs_hi) & (lhs_lo < rhs_lo))
    return eligible & (j0 < e_u) & hit


@functools.partial(jax.jit, static_argnames=("selection", "num_strata", "min_tokens_per_sequence"))
def select_checked(d: jax.Array, e: jax.Array, ratio: jax.Array, selection: str, num_strata: int,
                    min_tokens_per_sequence: int) -> tuple[jax.Array, jax.Array]:
    """:func:`select_tokens` on validated inputs (``e`` already excludes NaN difficulties); a deterministic
    strategy (``sampled`` needs a step and a seed: :func:`sample_checked`)."""
    if selection in SAMPLED_SELECTIONS:
        raise ValueError(f"selection: {selection!r} draws tokens at random; use sample_tokens / sample_checked "
                         f"(SPEC §7.4), which take the step and the seed")
    shape = d.shape
    rank = _ranks_last_axis(d.reshape(-1), e.reshape(-1))
    n = jnp.sum(e, dtype=jnp.int32)
    k = curriculum.num_selected(n, ratio)
    if selection == "stratified":
        mask = _stratified_mask(rank, n, k, num_strata)
    else:                                                              # topk, fixed_quota, sequence_aware
        mask = (rank >= 0) & (rank < k)
    mask = mask.reshape(shape)
    if selection == "sequence_aware" and min_tokens_per_sequence > 0:
        d2 = d if d.ndim == 2 else d.reshape(1, -1)
        e2 = e if e.ndim == 2 else e.reshape(1, -1)
        seq_rank = _ranks_last_axis(d2, e2).reshape(shape)
        mask = mask | ((seq_rank >= 0) & (seq_rank < min_tokens_per_sequence))
    return mask, k


def select_tokens(difficulty: jax.Array, eligible: jax.Array, ratio: Any, *, selection: str = "topk",
                  num_strata: int = utils.DEFAULT_CONFIG.num_strata,
                  min_tokens_per_sequence: int = utils.DEFAULT_CONFIG.min_tokens_per_sequence,
                  step: Any = 0, seed: int = utils.DEFAULT_CONFIG.sample_seed,
                  power: float = utils.DEFAULT_CONFIG.sample_power,
                  uniform_mix: float = utils.DEFAULT_CONFIG.sample_uniform_mix,
                  floor: float = utils.DEFAULT_CONFIG.sample_floor,
                  ) -> tuple[jax.Array, jax.Array]:
    """SPEC §7: the boolean mask of kept tokens (the input's shape) and ``k`` (int32 scalar).

    ``difficulty`` float (computed in float32) and ``eligible`` bool, both ``(N,)`` or ``(B, T)`` (a 2-D
    input's rows are the sequences); ``ratio`` the float32 ratio after the dynamic threshold, in ``(0, 1]``.
    With ``n`` eligible tokens, ``k = num_selected(n, ratio)`` and

    * ``topk`` / ``fixed_quota``: the ``k`` eligible tokens of lowest rank (exactly ``k``);
    * ``stratified``: ``S`` rank strata ``[floor(s·n/S), floor((s+1)·n/S))``, integer quotas
      ``floor(k·(S−s)/W)`` (``W = S(S+1)/2``) plus the remainder to the hardest strata, spill-over to later
      then earlier strata, and in-stratum ranks ``floor((2j+1)·m_s/(2·e_s))`` (exactly ``k``);
    * ``sequence_aware``: ``topk`` plus each sequence's ``min_tokens_per_sequence`` hardest eligible tokens
      (the total may exceed ``k``);
    * ``sampled``: the random draw of SPEC §7.4 (``k`` expected tokens; ``step``, ``seed``, ``power``,
      ``uniform_mix``, ``floor`` as :func:`sample_tokens`, which also returns the loss weights ``1/π``).
    """
    utils.check_choice(selection, "selection", SELECTION_STRATEGIES)
    if selection in SAMPLED_SELECTIONS:
        mask, _, k = sample_tokens(difficulty, eligible, ratio, step=step, seed=seed, power=power,
                                   uniform_mix=uniform_mix, floor=floor)
        return mask, k
    num_strata = utils.check_int(num_strata, "num_strata", minimum=1, maximum=MAX_STRATA)
    min_tokens_per_sequence = utils.check_int(min_tokens_per_sequence, "min_tokens_per_sequence", minimum=0)
    d, e = _check_scores(difficulty, eligible)
    r = curriculum.check_ratio_value(ratio)
    return select_checked(d, e, r, selection=selection, num_strata=num_strata,
                           min_tokens_per_sequence=min_tokens_per_sequence)


# ------------------------------------------------------------------------------- SPEC §7.4 sampled selection
#: lowbias32's multipliers and the seed salt (SPEC §7.4).
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_SEED_SALT = 0x9E3779B9


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 (SPEC §7.4) on uint32 (XLA's uint32 multiplication wraps mod 2^32, as the SPEC's ⊗32)."""
    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(_MULTIPLIERS[0])
    x = x ^ (x >> jnp.uint32(15))
    x = x * jnp.uint32(_MULTIPLIERS[1])
    return x ^ (x >> jnp.uint32(16))


def _hash_checked(seed: int, step: jax.Array, index: jax.Array) -> jax.Array:
    h = _mix32(jnp.asarray(np.uint32(seed ^ _SEED_SALT)))
    h = _mix32(h ^ step.astype(jnp.uint32))
    h = _mix32(h ^ index.astype(jnp.uint32))
    # (h >> 8) | 1 < 2^24: exact in float32, and so is the power-of-two scale.
    return ((h >> jnp.uint32(8)) | jnp.uint32(1)).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def uniform_hash(seed: int, step: Any, index: Any) -> jax.Array:
    """SPEC §7.4: the draws ``u ∈ (0, 1)`` (float32, the shape of ``index``) of a counter-based hash::

        h = mix(seed ^ 0x9E3779B9);  h = mix(h ^ step);  h = mix(h ^ index);  u = ((h >> 8) | 1) · 2^-24

    ``mix`` is lowbias32 on uint32; ``step`` and ``index`` are taken mod 2^32. Exact integer arithmetic: the
    same bits in every package and on every backend. ``u`` is an odd multiple of 2^-24, never 0, so an
    included token has ``π > 2^-24`` and a finite weight. jit-compatible (``step`` may be traced).

    Args:
        seed: host integer in ``[0, 2^32)``.
        step: integer scalar ``>= 0`` (host or array; the curriculum step, SPEC §5.4).
        index: integer array of flat token indices (``>= 0``).
    """
    seed = check_sampling_parameters(0.0, 0.0, 1.0, seed)[3]
    index_dtype = getattr(index, "dtype", None)
    if index_dtype is None or not jnp.issubdtype(index_dtype, jnp.integer):
        raise ValueError(f"index: expected an integer array, got {index_dtype or type(index).__name__}")
    return _hash_checked(seed, _check_step(step), jnp.asarray(index))


def _check_step(step: Any) -> jax.Array:
    dtype = getattr(step, "dtype", None)
    if dtype is None:
        step = utils.check_int(step, "step", minimum=0)
        return jnp.asarray(np.uint32(step & 0xFFFFFFFF))
    if not jnp.issubdtype(dtype, jnp.integer) or tuple(getattr(step, "shape", ())) not in ((), (1,)):
        raise ValueError(f"step: expected an integer scalar, got dtype {dtype} and shape {getattr(step, 'shape', None)}")
    return jnp.asarray(step).reshape(())


def _probabilities(d: jax.Array, e: jax.Array, k: jax.Array, power: float, uniform_mix: float,
                   floor: float) -> jax.Array:
    """SPEC §7.4 on flat float32 ``d`` and bool ``e`` (NaN already not eligible), ``k`` an int32 scalar."""
    f32 = jnp.float32
    N = d.shape[0]
    if N == 0:
        return jnp.zeros((0,), f32)
    n = jnp.sum(e, dtype=jnp.int32)
    fmax = float(np.finfo(np.float32).max)
    b = jnp.minimum(jnp.maximum(d, f32(0.0)) + f32(floor), f32(fmax))
    b = jnp.where(e, b, f32(1.0))                            # any positive value: not read below
    log_b = jnp.log(b)
    log_max = jnp.max(jnp.where(e, log_b, -jnp.inf))
    q = jnp.where(e, jnp.exp(f32(power) * (log_b - log_max)), f32(0.0))
    Q = jnp.sum(q)
    n_f = jnp.maximum(n, 1).astype(f32)
    p = jnp.where(e, (f32(1.0 - uniform_mix) * q) / jnp.maximum(Q, f32(1e-45)) + f32(uniform_mix) / n_f,
                  f32(0.0))
    # Water-filling: sort p descending (ties: lower flat index first; ineligible last), suffix sums S_j, the
    # first j < k with (k − j)·p_(j) <= S_j caps the j largest at 1 and scales the rest by (k − j)/S_j.
    key = jnp.where(e, f32(0.0) - p, jnp.inf)               # 0 − p: +0.0 for p = 0 (no −0.0 in the order)
    idx = jnp.arange(N, dtype=jnp.int32)
    key_sorted, order = jax.lax.sort((key, idx), num_keys=2)
    ps = jnp.where(key_sorted < jnp.inf, f32(0.0) - key_sorted, f32(0.0))
    suffix = jnp.cumsum(ps[::-1])[::-1]
    kk = jnp.minimum(k.astype(jnp.int32), n)
    ok = (idx < kk) & ((kk - idx).astype(f32) * ps <= suffix)
    jstar = jnp.min(jnp.where(ok, idx, jnp.int32(N)))
    s_j = suffix[jnp.minimum(jstar, N - 1)]
    c = jnp.where(s_j > 0, (kk - jstar).astype(f32) / jnp.where(s_j > 0, s_j, f32(1.0)), f32(0.0))
    # k = n keeps every eligible token: exactly π = 1 (the rounding of c·p could leave 1 − ulp).
    pi_sorted = jnp.where((idx < jstar) | (kk >= n), f32(1.0), jnp.minimum(c * ps, f32(1.0)))
    pi_sorted = jnp.where((idx < n) & (kk > 0), pi_sorted, f32(0.0))
    return jnp.zeros((N,), f32).at[order].set(pi_sorted)


def sampling_probabilities(difficulty: jax.Array, eligible: jax.Array, k: Any, *,
                           power: float = utils.DEFAULT_CONFIG.sample_power,
                           uniform_mix: float = utils.DEFAULT_CONFIG.sample_uniform_mix,
                           floor: float = utils.DEFAULT_CONFIG.sample_floor) -> jax.Array:
    """SPEC §7.4: the inclusion probabilities ``π`` (float32, the input's shape) of the ``sampled`` selection.

    Over the ``n`` eligible tokens (NaN difficulty is not eligible)::

        b_i = min(max(d_i, 0) + ε, FLT_MAX),   q_i = exp(β·(ln b_i − ln max_j b_j))   (= (b_i / b_max)^β)
        p_i = (1 − λ)·q_i / Σq + λ / n,        π_i = min(1, c·p_i),  Σ π = min(k, n)

    (water-filling: sort ``p`` descending, suffix sums ``S_j``; ``j*`` = the first ``j < k`` with
    ``(k − j)·p_(j) <= S_j``; ``π = 1`` for the ``j*`` largest and ``c = (k − j*)/S_{j*}``). ``π = 0`` for
    tokens that are not eligible, and everywhere when ``k = 0``. jit-compatible.

    Args:
        difficulty: float array ``(N,)`` or ``(B, T)`` (float64 is rounded to float32, SPEC §6).
        eligible: bool array of the same shape.
        k: the expected count, an integer ``>= 0`` (host or scalar array; ``k > n`` counts as ``n``).
        power, uniform_mix, floor: ``β >= 0``, ``λ ∈ [0, 1]``, ``ε > 0`` (``CGGRConfig.sample_*``).
    """
    d, e = _check_scores(difficulty, eligible)
    power, uniform_mix, floor, _ = check_sampling_parameters(power, uniform_mix, floor)
    k_dtype = getattr(k, "dtype", None)
    if k_dtype is None:
        k = jnp.int32(utils.check_int(k, "k", minimum=0, maximum=2**31 - 1))
    elif not jnp.issubdtype(k_dtype, jnp.integer) or tuple(getattr(k, "shape", ())) != ():
        raise ValueError(f"k: expected an integer scalar, got dtype {k_dtype} and shape {getattr(k, 'shape', None)}")
    return _probabilities_jit(d.reshape(-1), e.reshape(-1), jnp.asarray(k).astype(jnp.int32), power=power,
                              uniform_mix=uniform_mix, floor=floor).reshape(d.shape)


@functools.partial(jax.jit, static_argnames=("power", "uniform_mix", "floor"))
def _probabilities_jit(d: jax.Array, e: jax.Array, k: jax.Array, *, power: float, uniform_mix: float,
                       floor: float) -> jax.Array:
    return _probabilities(d, e, k, power, uniform_mix, floor)


@functools.partial(jax.jit, static_argnames=("seed", "power", "uniform_mix", "floor"))
def sample_checked(d: jax.Array, e: jax.Array, ratio: jax.Array, step: jax.Array, *, seed: int, power: float,
                   uniform_mix: float, floor: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`sample_tokens` on validated inputs (float32 ``d``, ``e`` already excluding NaN difficulties,
    integer scalar ``step``); the parameters are static."""
    shape = d.shape
    df, ef = d.reshape(-1), e.reshape(-1)
    k = curriculum.num_selected(jnp.sum(ef, dtype=jnp.int32), ratio)
    pi = _probabilities(df, ef, k, power, uniform_mix, floor)
    u = _hash_checked(seed, step, jnp.arange(df.shape[0], dtype=jnp.uint32))
    mask = ef & (u < pi)
    weights = jnp.where(mask, jnp.float32(1.0) / jnp.where(mask, pi, jnp.float32(1.0)), jnp.float32(0.0))
    return mask.reshape(shape), weights.reshape(shape), k


def sample_tokens(difficulty: jax.Array, eligible: jax.Array, ratio: Any, *, step: Any = 0,
                  seed: int = utils.DEFAULT_CONFIG.sample_seed, power: float = utils.DEFAULT_CONFIG.sample_power,
                  uniform_mix: float = utils.DEFAULT_CONFIG.sample_uniform_mix,
                  floor: float = utils.DEFAULT_CONFIG.sample_floor) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPEC §7.4: the ``sampled`` selection: ``(mask, weights, k)``.

    ``k = num_selected(n, ratio)`` (§5.3) is the *expected* count; token ``i`` is included iff it is eligible
    and ``uniform_hash(seed, step, i) < π_i`` (:func:`sampling_probabilities`, flat row-major ``i``), and its
    Horvitz–Thompson weight is ``w_i = 1/π_i`` (float32; 0 for the others), so that
    ``E[Σ_{i∈S} w_i·ce_i] = Σ_eligible ce_i``. ``step`` may be traced (one compilation for a whole run).

    Returns:
        ``mask`` (bool, the input's shape), ``weights`` (float32, the input's shape), ``k`` (int32 scalar).
    """
    power, uniform_mix, floor, seed = check_sampling_parameters(power, uniform_mix, floor, seed)
    d, e = _check_scores(difficulty, eligible)
    r = curriculum.check_ratio_value(ratio)
    return sample_checked(d, e, r, _check_step(step), seed=seed, power=power, uniform_mix=uniform_mix,
                          floor=floor)
