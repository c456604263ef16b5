"""One-pass Triton scoring kernel (SPEC §2-§4).

Per row ``z ∈ R^V`` (loaded in its own dtype, upcast exactly to float32) the kernel keeps, while it streams
the row block by block, in base-2 units with ``L = log2(e)``:

* ``m`` - the running maximum (a scalar) and the reference ``c = fl(m·L)`` (``c = 0`` while ``m = −∞``);
* ``u_j = fma(z_j, L, −c)`` and ``e_j = 2^{u_j}``;
* ``d = Σ_j e_j`` and ``s = Σ_j e_j·max(u_j, −3e38)`` - a ``−∞`` logit has ``e_j = 0`` and contributes
  ``0·(−3e38) = 0`` (never ``0·(−∞) = NaN``);
* a whole-row top-2 ``(z_(1), z_(2))`` of the multiset (ties count), merged with the associative rule
  ``(a1, a2) ⊕ (b1, b2) = (max(a1, b1), max(min(a1, b1), a2, b2))``.

When the maximum grows from ``m`` to ``m'`` the accumulators are rebased exactly once for that block:
``δ = c − c'``, ``s ← (s + δ·d)·2^δ``, ``d ← d·2^δ`` (``δ = 0`` while ``m = −∞``, where
``d = s = 0``).
At the end, with ``ℓ = log2 d`` and ``ln 2 = 1/L``::

    lse = (c + ℓ)·ln 2              H   = (ℓ − s/d) ⊘ L              (= lse − Σ p_j z_j)
    p1  = 2^{fma(m, L, −c)} ⊘ d     p2  = 2^{fma(z_(2), L, −c)} ⊘ d   (V = 1 or z_(2) = −∞ → 0)
    nll = (ℓ − fma(z_t, L, −c)) ⊘ L                                   (valid target t; 0 otherwise)

The reference ``c`` cancels in these formulas (up to the rounding of ``δ`` at a rebase), so rounding ``m·L``
costs nothing; ``nll`` and ``H`` avoid the cancellation of two numbers of size ``|m|``. A NaN anywhere in the
row makes ``d`` NaN; a ``+∞`` makes some ``u`` NaN; an all ``−∞`` row gives ``d = 0``: all three are
therefore not finite (SPEC §2). Limitation: ``m·L`` overflows for ``|m| > 2.3e38``, so a row whose largest
logit is that large (representable in fp32/bf16) is reported as not finite.

Vectorisation: a block of ``BLOCK = ROWS·GROUP`` logits is viewed as ``[ROWS, GROUP]``; ``GROUP`` contiguous
elements (one 16-byte load) are first reduced inside a thread (``d``, ``s``, top-2), so the loop-carried
state is ``4·ROWS`` floats per program instead of ``4·BLOCK`` - fewer registers, more loads in flight.
``GROUP = 1`` is the plain per-lane variant. The loop over full blocks requests block ``k+1`` before it
reduces block ``k``; the ragged last block is a separate masked step (``other = −∞``), so full blocks
carry no per-element mask. Instruction budget (sm_90 SASS, bf16, default config): ~11 instructions and one
``ex2`` per logit, no spills. Rows are addressed with 64-bit offsets ``b·stride_b + t·stride_t``
(any ``N·V``, strided ``(B, T, V)`` views such as ``logits[:, :-1]`` without a copy); column offsets are
32-bit (``V < 2^31``).

Epilogue without contraction: ``H``, ``nll``, ``p1`` and ``p2`` are produced by correctly rounded divisions
(``H = (ℓ − s/d) ⊘ L``, ``nll = (ℓ − fma(z_t, L, −c)) ⊘ L``), so no multiplication feeds the additions of
the difficulty ``(H ⊕ (1 ⊖ (p1 ⊖ p2))) ⊕ nll``: the compiler cannot fuse them into an FMA, and the in-kernel
difficulty is bit-identical to :func:`cggr_torch.scoring.difficulty_from_statistics` of the kernel's own
statistics on every backend. The target logit is gathered before the row is streamed (its latency hides
behind the stream).

Selection outputs (``key``/``status`` buffers, used by :class:`cggr_torch.CGGRLoss` and
:mod:`cggr_torch.kernels.selection`): per row an int8 ``status`` (bit 0 valid, bit 1 eligible, bit 2 target
out of range) and a sort key whose *ascending* order is the total order of SPEC §6: with ``b`` the int32
bits of the difficulty (``−0.0`` canonicalised to ``+0.0``), ``o = b`` if ``b ≥ 0`` else ``b ^ 0x7FFFFFFF``
(monotone in the float value), ``key32 = ~o`` for eligible rows and ``2^31 − 1`` otherwise (no eligible key
reaches it: that would be a NaN). A stable ascending sort then ranks eligible tokens by difficulty
descending, ties by lower index. ``key64 = key32·2^32 + i`` is unique, so any (unstable) sort gives the
same order.

Launch shapes (:class:`LaunchConfig`, :func:`scoring_config`, …) and their variants are
:mod:`cggr_torch.kernels.launch`'s; the input handling shared by every kernel module
(:func:`check_kernel_device`, :func:`device_guard`, :func:`row_geometry`, :func:`flat_targets`) is
:mod:`cggr_torch.kernels.inputs`' (re-exported here, its first home).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from cggr import SCORING_MODES

from ..types import TokenScores, TokenStatistics
from .inputs import RowGeometry, check_kernel_device, device_guard, flat_targets, row_geometry
from .launch import (
    LaunchConfig,
    backward_config,
    check_config_device,
    interpreting,
    lse_config,
    num_sms,
    scoring_config,
    scoring_config_for_rows,
)
from ..utils import FLOAT_DTYPES, check_logits, check_target_range, check_targets

__all__ = [
    "LaunchConfig",
    "scoring_config",
    "scoring_config_for_rows",
    "lse_config",
    "backward_config",
    "token_statistics_triton",
    "score_tokens_triton",
    "launch_scoring",
    "launch_scoring_chunk",
    "CHUNK_STATE_ROWS",
    "num_sms",
    "MODE_CODE",
    "NO_DIFFICULTY",
    "interpreting",
    "order_key",
    "scoring_op",
]

#: The scoring kernel's ``mode`` argument for each SPEC §3 scoring mode.
MODE_CODE = {"entropy": 0, "margin": 1, "loss": 2, "combined": 3}
#: ``mode`` for "statistics only, no difficulty" (the fused LM head's blocks).
NO_DIFFICULTY = -1


# ============================================================================================== kernel
@triton.jit
def _top2_combine(a1, a2, b1, b2):
    """Merge two (largest, second largest) pairs of a multiset: ties count, so equal maxima give a2 = a1."""
    hi = tl.maximum(a1, b1)
    lo = tl.minimum(a1, b1)
    return hi, tl.maximum(lo, tl.maximum(a2, b2))


@triton.jit
def _ref_of(m):
    """Reference c = fl(m·log2 e) of the running max; 0 while m = −inf (then every e_j is 0)."""
    return tl.where(m > float("-inf"), m * 1.4426950408889634, 0.0)


#: The streaming state's rescaling reference as a Triton function (shared with the cross-entropy kernels).
ref_of = _ref_of


@triton.jit
def _group_top2(x, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Largest and second largest of each row of a [ROWS, GROUP] block (in-thread for GROUP ≤ one vector).

    The first level sorts pairs (2 min/max per pair) instead of merging (x, −inf) singletons (4 per merge).
    """
    if GROUP == 1:
        g1 = tl.reshape(x, [ROWS])
        g2 = tl.full([ROWS], float("-inf"), tl.float32)
    else:
        xa, xb = tl.split(tl.reshape(x, [ROWS, GROUP // 2, 2]))
        g1, g2 = tl.reduce((tl.maximum(xa, xb), tl.minimum(xa, xb)), 1, _top2_combine)
    return g1, g2


@triton.jit
def _order_key(d, eligible, i, KEY64: tl.constexpr):
    """The ascending sort key of SPEC §6 (module docstring) for float32 difficulties ``d`` at flat indices
    ``i`` (int64): ``~o`` (int32) or ``~o·2^32 + i`` (int64) for eligible tokens, the sentinel otherwise."""
    bits = tl.where(d == 0.0, 0.0, d).to(tl.int32, bitcast=True)        # −0.0 → +0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(eligible, ~ordered, 2147483647)
    if KEY64:
        key = (key.to(tl.int64) << 32) | i
    return key


#: The SPEC §6 sort key as a Triton function (shared with :mod:`cggr_torch.kernels.selection`).
order_key = _order_key


@triton.jit
def _exp2(u, FTZ: tl.constexpr):
    """``2^u``: ``ex2.approx.ftz.f32`` (one MUFU op, subnormal results flushed to 0) or ``tl.exp2``."""
    if FTZ:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        e = tl.exp2(u)
    return e


@triton.jit
def _fold_sums(x, m, block_max, d_acc, s_acc, FTZ: tl.constexpr):
    """Fold a block (maximum ``block_max``) into the running max ``m`` and the lanes of ``d = Σ 2^u`` and
    ``s = Σ 2^u·u`` (``u = z·log2 e − c``, ``c`` the reference of ``m``): rescale both sums when the maximum
    rises, then add the block. Shared by both stream variants, whose only difference is the top-2."""
    m_new = tl.maximum(m, block_max)
    if m_new > m:
        c_new = _ref_of(m_new)
        c_old = tl.where(m > float("-inf"), m * 1.4426950408889634, c_new)
        delta = c_old - c_new
        alpha = tl.exp2(delta)
        s_acc = (s_acc + delta * d_acc) * alpha
        d_acc = d_acc * alpha
        m = m_new
    c = _ref_of(m)
    u = tl.fma(x, 1.4426950408889634, -c)
    e = _exp2(u, FTZ)
    d_acc += tl.sum(e, 1)
    s_acc += tl.sum(e * tl.maximum(u, -3.0e38), 1)
    return m, d_acc, s_acc


@triton.jit
def _stream_block(x, m, t1, t2, d_acc, s_acc, ROWS: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr):
    """Fold one [ROWS, GROUP] float32 block into the running (m, top-2 lanes, d lanes, s lanes)."""
    g1, g2 = _group_top2(x, ROWS, GROUP)
    t1, t2 = _top2_combine(t1, t2, g1, g2)
    m, d_acc, s_acc = _fold_sums(x, m, tl.max(g1, 0), d_acc, s_acc, FTZ)
    return m, t1, t2, d_acc, s_acc


@triton.jit
def _stream_block_lazy(x, m, m2, d_acc, s_acc, ROWS: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr):
    """:func:`_stream_block` with a *lazy* top-2: the row's runner-up ``m2`` is a scalar, and a block's own
    top-2 is computed only when its maximum ``b1`` exceeds ``m2`` (otherwise ``(m, m2) ⊕ (b1, b2) = (m, m2)``
    exactly, ties included, because ``b2 ≤ b1 ≤ m2 ≤ m``). Per logit: one in-thread max instead of the
    pairwise top-2; the slow path runs for the few blocks that raise the runner-up."""
    g1 = tl.max(x, 1)
    bm = tl.max(g1, 0)
    if bm > m2:
        gg1, gg2 = _group_top2(x, ROWS, GROUP)
        _b1, b2 = tl.reduce((gg1, gg2), 0, _top2_combine)
        m2 = tl.maximum(tl.minimum(m, bm), tl.maximum(m2, b2))
    m, d_acc, s_acc = _fold_sums(x, m, bm, d_acc, s_acc, FTZ)
    return m, m2, d_acc, s_acc


@triton.jit
def _score_row(
    i, x_ptr, t_ptr, out_ptr, fin_ptr, key_ptr, status_ptr, state_ptr,
    V, T, stride_b, stride_t, out_stride, ignore_index, v0, V_TOTAL, state_stride,
    HAS_TARGETS: tl.constexpr, MODE: tl.constexpr, SELECT: tl.constexpr, KEY64: tl.constexpr,
    ROWS: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr, EVICT: tl.constexpr, LAZY: tl.constexpr,
    FIRST: tl.constexpr, FINAL: tl.constexpr,
):
    """Row ``i`` (int64): lse, H, p1, p2, nll, difficulty (MODE >= 0), finite flag; with SELECT key and status.

    The streamed row holds the ``V`` columns ``[v0, v0 + V)`` of a row of ``V_TOTAL`` (a whole row: ``v0 = 0``,
    ``V = V_TOTAL``, ``FIRST = FINAL = True``). A chunk that is not ``FIRST`` starts from the running state
    ``(m, z_(2), d, s, z_t)`` stored at ``state_ptr + j·state_stride + i`` by the previous chunk; a chunk that
    is not ``FINAL`` stores that state instead of the statistics (see :func:`launch_scoring_chunk`).
    """
    b = i // T
    row_ptr = x_ptr + b * stride_b + (i - b * T) * stride_t

    # The target logit is requested first: its (dependent) gather overlaps the stream.
    valid = tl.full([], 1, tl.int1)
    readable = tl.full([], 0, tl.int1)
    z_t = tl.zeros([], tl.float32)
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + i)
        valid = tgt != ignore_index
        readable = valid & (tgt >= 0) & (tgt < V_TOTAL)
        local = tgt - v0
        here = readable & (local >= 0) & (local < V)
        # Ignored and out-of-range targets are never read (masked load of index 0 with no memory access).
        z_t = tl.load(row_ptr + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
        if not FIRST:
            z_t = tl.where(here, z_t, tl.load(state_ptr + 4 * state_stride + i))

    BLOCK: tl.constexpr = ROWS * GROUP
    idx = tl.arange(0, ROWS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    if FIRST:
        m = tl.full([], float("-inf"), tl.float32)
        d_acc = tl.zeros([ROWS], tl.float32)
        s_acc = tl.zeros([ROWS], tl.float32)
        if LAZY:
            z2 = tl.full([], float("-inf"), tl.float32)
        else:
            t1 = tl.full([ROWS], float("-inf"), tl.float32)
            t2 = tl.full([ROWS], float("-inf"), tl.float32)
    else:
        # The previous chunks' sums enter lane 0: every lane is relative to the same reference c(m).
        lane0 = tl.arange(0, ROWS) == 0
        m = tl.load(state_ptr + i)
        m2_prev = tl.load(state_ptr + state_stride + i)
        d_acc = tl.where(lane0, tl.load(state_ptr + 2 * state_stride + i), 0.0)
        s_acc = tl.where(lane0, tl.load(state_ptr + 3 * state_stride + i), 0.0)
        if LAZY:
            z2 = m2_prev
        else:
            t1 = tl.where(lane0, m, float("-inf"))
            t2 = tl.where(lane0, m2_prev, float("-inf"))

    # Full blocks, software-pipelined: block blk+1 is requested before block blk is reduced.
    n_full = V // BLOCK
    x_next = tl.load(row_ptr + idx, mask=n_full > 0, other=0.0, eviction_policy=EVICT)
    for blk in range(0, n_full):
        x = x_next
        x_next = tl.load(row_ptr + ((blk + 1) * BLOCK + idx), mask=blk + 1 < n_full, other=0.0,
                         eviction_policy=EVICT)
        if LAZY:
            m, z2, d_acc, s_acc = _stream_block_lazy(x.to(tl.float32), m, z2, d_acc, s_acc, ROWS, GROUP, FTZ)
        else:
            m, t1, t2, d_acc, s_acc = _stream_block(x.to(tl.float32), m, t1, t2, d_acc, s_acc, ROWS, GROUP, FTZ)
    if n_full * BLOCK < V:  # ragged last block
        cols = n_full * BLOCK + idx
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
        if LAZY:
            m, z2, d_acc, s_acc = _stream_block_lazy(x, m, z2, d_acc, s_acc, ROWS, GROUP, FTZ)
        else:
            m, t1, t2, d_acc, s_acc = _stream_block(x, m, t1, t2, d_acc, s_acc, ROWS, GROUP, FTZ)

    # Epilogue: no multiplication feeds an addition of the difficulty (correctly rounded divisions), so it
    # cannot be contracted into an FMA and equals the reference formula on the stored statistics bit for bit.
    d = tl.sum(d_acc, 0)
    s = tl.sum(s_acc, 0)
    if not LAZY:
        _top1, z2 = tl.reduce((t1, t2), 0, _top2_combine)
    if not FINAL:
        tl.store(state_ptr + i, m)
        tl.store(state_ptr + state_stride + i, z2)
        tl.store(state_ptr + 2 * state_stride + i, d)
        tl.store(state_ptr + 3 * state_stride + i, s)
        if HAS_TARGETS:
            tl.store(state_ptr + 4 * state_stride + i, z_t)
    else:
        c = _ref_of(m)
        log2d = tl.log2(d)
        lse = (c + log2d) * 0.6931471805599453
        entropy = tl.math.div_rn(log2d - tl.math.div_rn(s, d), 1.4426950408889634)
        p1 = tl.math.div_rn(tl.exp2(tl.fma(m, 1.4426950408889634, -c)), d)
        p2 = tl.math.div_rn(tl.exp2(tl.fma(z2, 1.4426950408889634, -c)), d)
        finite = (tl.abs(lse) < float("inf")) & (tl.abs(entropy) < float("inf")) \
            & (tl.abs(p1) < float("inf")) & (tl.abs(p2) < float("inf"))

        nll = tl.zeros([], tl.float32)
        if HAS_TARGETS:
            nll_val = tl.math.div_rn(log2d - tl.fma(z_t, 1.4426950408889634, -c), 1.4426950408889634)
            nll = tl.where(readable, nll_val, tl.where(valid, float("nan"), 0.0))
            finite = finite & ((tl.abs(nll) < float("inf")) | (valid == 0))

        tl.store(out_ptr + i, lse)
        tl.store(out_ptr + out_stride + i, entropy)
        tl.store(out_ptr + 2 * out_stride + i, p1)
        tl.store(out_ptr + 3 * out_stride + i, p2)
        tl.store(out_ptr + 4 * out_stride + i, nll)
        if MODE >= 0:
            margin = 1.0 - (p1 - p2)
            if MODE == 0:
                diff = entropy
            elif MODE == 1:
                diff = margin
            elif MODE == 2:
                diff = nll
            else:
                if HAS_TARGETS:
                    diff = (entropy + margin) + nll
                else:
                    diff = entropy + margin
            tl.store(out_ptr + 5 * out_stride + i, diff)
            if SELECT:
                eligible = valid & finite & (diff == diff)
                tl.store(key_ptr + i, _order_key(diff, eligible, i, KEY64))
                status = valid.to(tl.int8) | (eligible.to(tl.int8) << 1) | ((valid & (readable == 0)).to(tl.int8) << 2)
                tl.store(status_ptr + i, status)
        tl.store(fin_ptr + i, finite.to(tl.int8))


@triton.jit
def _scoring_kernel(
    x_ptr, t_ptr, out_ptr, fin_ptr, key_ptr, status_ptr,
    N, V, T, stride_b, stride_t, out_stride, ignore_index,
    HAS_TARGETS: tl.constexpr, MODE: tl.constexpr, SELECT: tl.constexpr, KEY64: tl.constexpr,
    ROWS: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr, PERSISTENT: tl.constexpr, EVICT: tl.constexpr,
    LAZY: tl.constexpr,
):
    """One row per program, or (PERSISTENT) a grid-stride loop over the rows."""
    if PERSISTENT:
        for r in range(tl.program_id(0), N, tl.num_programs(0)):
            _score_row(r + tl.zeros([], tl.int64), x_ptr, t_ptr, out_ptr, fin_ptr, key_ptr, status_ptr, out_ptr,
                       V, T, stride_b, stride_t, out_stride, ignore_index, 0, V, 0,
                       HAS_TARGETS, MODE, SELECT, KEY64, ROWS, GROUP, FTZ, EVICT, LAZY, True, True)
    else:
        _score_row(tl.program_id(0).to(tl.int64), x_ptr, t_ptr, out_ptr, fin_ptr, key_ptr, status_ptr, out_ptr,
                   V, T, stride_b, stride_t, out_stride, ignore_index, 0, V, 0,
                   HAS_TARGETS, MODE, SELECT, KEY64, ROWS, GROUP, FTZ, EVICT, LAZY, True, True)


@triton.jit
def _chunk_scoring_kernel(
    x_ptr, t_ptr, out_ptr, fin_ptr, state_ptr,
    N, C, stride_t, out_stride, ignore_index, v0, V_TOTAL, state_stride,
    HAS_TARGETS: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr,
    EVICT: tl.constexpr, LAZY: tl.constexpr, FIRST: tl.constexpr, FINAL: tl.constexpr,
):
    """One row per program over the columns ``[v0, v0 + C)`` of an ``(N, C)`` logits chunk (statistics only)."""
    _score_row(tl.program_id(0).to(tl.int64), x_ptr, t_ptr, out_ptr, fin_ptr, fin_ptr, fin_ptr, state_ptr,
               C, N, 0, stride_t, out_stride, ignore_index, v0, V_TOTAL, state_stride,
               HAS_TARGETS, -1, False, False, ROWS, GROUP, FTZ, EVICT, LAZY, FIRST, FINAL)


# ============================================================================================ launchers
def _check_statistics_buffers(out: torch.Tensor, finite: torch.Tensor, n: int) -> None:
    """The output buffers of a scoring launch: float32 ``(6, n)`` with unit stride along N, int8 ``(n,)``."""
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != 6 or out.shape[1] != n \
            or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"out: expected a float32 (6, {n}) buffer with unit stride along N, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if finite.dtype != torch.int8 or tuple(finite.shape) != (n,) or (n > 1 and finite.stride(0) != 1):
        raise ValueError(f"finite: expected a contiguous int8 ({n},) buffer, got {finite.dtype} "
                         f"{tuple(finite.shape)}")


def launch_scoring(geom: RowGeometry, targets: Optional[torch.Tensor], ignore_index: int, mode: int,
                   out: torch.Tensor, finite: torch.Tensor, config: Optional[LaunchConfig] = None, *,
                   key: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None) -> None:
    """Run the scoring kernel into caller-provided buffers (no validation beyond buffer shapes).

    Args:
        geom: :func:`row_geometry` of validated logits.
        targets: ``None`` or contiguous int64 ``(N,)``; ignored / out-of-range targets are never read.
        ignore_index: target value without a target.
        mode: ``-1`` (statistics only) or the code of a scoring mode (entropy 0, margin 1, loss 2,
            combined 3).
        out: float32 ``(6, N)`` with unit stride along N; rows lse, entropy, p1, p2, nll, difficulty (the last
            written only when ``mode >= 0``).
        finite: int8 ``(N,)``, 1 where the row is finite (SPEC §2), else 0.
        config: launch shape; :func:`scoring_config` when None.
        key: optional contiguous int32 or int64 ``(N,)``: the sort key of SPEC §6 (see the module docstring;
            needs ``mode >= 0`` and ``status``).
        status: optional contiguous int8 ``(N,)``: bit 0 valid, bit 1 eligible, bit 2 target out of range.
    """
    n = geom.n
    _check_statistics_buffers(out, finite, n)
    select = key is not None or status is not None
    if select:
        if key is None or status is None:
            raise ValueError("key, status: pass both selection buffers or neither")
        if mode < 0:
            raise ValueError("key: the sort key needs a difficulty (mode >= 0), got mode -1")
        if key.dtype not in (torch.int32, torch.int64) or tuple(key.shape) != (n,) or (n > 1 and key.stride(0) != 1):
            raise ValueError(f"key: expected a contiguous int32 or int64 ({n},) buffer, got {key.dtype} "
                             f"{tuple(key.shape)}")
        if status.dtype != torch.int8 or tuple(status.shape) != (n,) or (n > 1 and status.stride(0) != 1):
            raise ValueError(f"status: expected a contiguous int8 ({n},) buffer, got {status.dtype} "
                             f"{tuple(status.shape)}")
    if n == 0:
        return
    cfg = config if config is not None else scoring_config(geom.vocab, geom.x.dtype)
    check_config_device(cfg, geom.x)
    has_t = targets is not None
    grid = (min(n, cfg.persistent * num_sms(geom.x)),) if cfg.persistent else (n,)
    with device_guard(geom.x):
        _scoring_kernel[grid](
            geom.x, targets if has_t else finite, out, finite,
            key if select else finite, status if select else finite,
            n, geom.vocab, geom.seq_len, geom.stride_b, geom.stride_t, out.stride(0), int(ignore_index),
            HAS_TARGETS=has_t, MODE=int(mode), SELECT=select, KEY64=select and key.dtype == torch.int64,
            ROWS=cfg.rows, GROUP=cfg.group, FTZ=cfg.ftz, PERSISTENT=cfg.persistent > 0, EVICT=cfg.evict,
            LAZY=cfg.lazy_top2, num_warps=cfg.num_warps,
        )


#: Float32 values of the running state of :func:`launch_scoring_chunk` per row: ``m``, ``z_(2)``, ``d``, ``s``,
#: ``z_t`` (see the module docstring for their meaning; ``d`` and ``s`` are relative to ``c = fl(m·log2 e)``).
CHUNK_STATE_ROWS = 5


def launch_scoring_chunk(z: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int, v0: int,
                         vocab_size: int, state: torch.Tensor, out: torch.Tensor, finite: torch.Tensor,
                         config: Optional[LaunchConfig] = None) -> None:
    r"""Fold the vocabulary chunk ``z = logits[:, v0:v0 + C]`` into each row's running statistics.

    For logits produced one vocabulary chunk at a time (the fused LM head's forward), the chunks of a row are
    streamed in increasing ``v0`` by consecutive launches on one stream: the first (``v0 = 0``) starts from an
    empty state, every launch but the last (``v0 + C = vocab_size``) stores the state of the streaming
    recurrence of the module docstring - ``(m, z_(2), d, s, z_t)``, exact float32 values - in ``state`` and the
    next one resumes from it, so the result equals one pass over the whole row up to the summation order of
    the ``d``/``s`` lanes. The last launch writes the statistics (``out`` rows 0-4: lse, H, p1, p2, nll) and
    the finite flags, as :func:`launch_scoring` with ``mode = -1``. The target logit is read in the chunk
    that holds it.

    Args:
        z: ``(N, C)`` float32/float16/bfloat16/float64 chunk with unit column stride (row stride ≥ C).
        targets: ``None`` or contiguous int64 ``(N,)`` targets in the full vocabulary (``ignore_index`` or
            out of ``[0, vocab_size)``: never read; an out-of-range target gives ``nll = NaN`` as in
            :func:`launch_scoring`).
        ignore_index: target value without a target.
        v0: first vocabulary column of the chunk (host int, ``0 ≤ v0``, ``v0 + C ≤ vocab_size``).
        vocab_size: the full row length ``V``.
        state: float32 ``(CHUNK_STATE_ROWS, N)`` with unit stride along N: the running state (read unless
            ``v0 = 0``, written unless ``v0 + C = vocab_size``).
        out, finite: as :func:`launch_scoring` (written by the last chunk only).
        config: launch shape; :func:`scoring_config` of ``C`` when None (``persistent`` is not supported).

    Raises:
        ValueError: shapes, dtypes or ranges other than the above.
    """
    check_kernel_device(z, "z")
    if z.dim() != 2 or z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"z: expected a 2-D float tensor (N, C), got {z.dtype} {tuple(z.shape)}")
    n, C = z.shape
    if C < 1 or (C > 1 and z.stride(1) != 1) or (n > 1 and z.stride(0) < C):
        raise ValueError(f"z: expected C >= 1 columns with unit stride and non-overlapping rows, got shape "
                         f"{tuple(z.shape)} strides {z.stride()}")
    for name, value in (("v0", v0), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}: expected a host integer, got {value!r}")
    v0, vocab_size = int(v0), int(vocab_size)
    if v0 < 0 or v0 + C > vocab_size:
        raise ValueError(f"v0: expected 0 <= v0 and v0 + C <= vocab_size, got v0={v0}, C={C}, "
                         f"vocab_size={vocab_size}")
    if state.dtype != torch.float32 or state.dim() != 2 or tuple(state.shape) != (CHUNK_STATE_ROWS, n) \
            or (n > 1 and state.stride(1) != 1) or state.device != z.device:
        raise ValueError(f"state: expected a float32 ({CHUNK_STATE_ROWS}, {n}) buffer with unit stride along N on "
                         f"{z.device}, got {state.dtype} {tuple(state.shape)} strides {state.stride()}")
    _check_statistics_buffers(out, finite, n)
    if targets is not None and (targets.dtype != torch.int64 or tuple(targets.shape) != (n,)
                                or (n > 1 and targets.stride(0) != 1)):
        raise ValueError(f"targets: expected None or a contiguous int64 ({n},) tensor, got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    cfg = config if config is not None else scoring_config(C, z.dtype)
    if cfg.persistent:
        raise ValueError("config.persistent: the chunked launch runs one program per row; use persistent=0")
    check_config_device(cfg, z)
    if n == 0:
        return
    has_t = targets is not None
    with device_guard(z):
        _chunk_scoring_kernel[(n,)](
            z, targets if has_t else finite, out, finite, state,
            n, C, z.stride(0) if n > 1 else C, out.stride(0), int(ignore_index), v0, vocab_size,
            state.stride(0),
            HAS_TARGETS=has_t, ROWS=cfg.rows, GROUP=cfg.group, FTZ=cfg.ftz, EVICT=cfg.evict,
            LAZY=cfg.lazy_top2, FIRST=v0 == 0, FINAL=v0 + C == vocab_size, num_warps=cfg.num_warps,
        )


def _validated(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int) -> None:
    check_logits(logits)  # rank 2/3, float32/float16/bfloat16/float64, V >= 1
    check_kernel_device(logits, "logits")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if targets is not None:
        check_targets(targets, logits)
        check_target_range(targets, logits.shape[-1], ignore_index)


def _run(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int, mode: int,
         config: Optional[LaunchConfig]) -> tuple[torch.Tensor, torch.Tensor, RowGeometry]:
    geom = row_geometry(logits.detach())
    if config is None:  # the default launch shape: the custom op (SPEC §12.1)
        out, finite, _key, _status = scoring_op(logits.detach(), targets, int(ignore_index), int(mode), 0)
        return out, finite, geom
    out = torch.empty((6, geom.n), dtype=torch.float32, device=logits.device)
    finite = torch.empty((geom.n,), dtype=torch.int8, device=logits.device)
    t = None if targets is None else flat_targets(targets)
    launch_scoring(geom, t, ignore_index, mode, out, finite, config)
    return out, finite, geom


def _stats_of(out: torch.Tensor, shape: tuple[int, ...]) -> TokenStatistics:
    return TokenStatistics(*(out[k].view(shape) for k in range(5)))


def token_statistics_triton(logits: torch.Tensor, targets: Optional[torch.Tensor] = None,
                            ignore_index: int = -100, *,
                            config: Optional[LaunchConfig] = None) -> TokenStatistics:
    """SPEC §2 statistics of every token from one read of the logits (see the module docstring).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)`` float32/float16/bfloat16/float64 (computed in float32) on CUDA
            (CPU under ``TRITON_INTERPRET=1``); any strides (a non-unit last stride costs one copy).
        targets: optional integer tensor of shape ``logits.shape[:-1]``; values in ``[0, V)`` or
            ``ignore_index`` (CPU: ``ValueError`` otherwise; CUDA: device-side assertion, and the
            out-of-range target is never read - its ``nll`` is NaN, so the row is not finite).
        ignore_index: target value of a token without a target (``nll = 0`` there, the target is not read).
        config: optional launch shape overriding :func:`scoring_config`.

    Returns:
        :class:`cggr_torch.scoring.TokenStatistics`, float32 tensors of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: bad shapes, dtypes, device, or (CPU) out-of-range targets.
    """
    _validated(logits, targets, ignore_index)
    out, _finite, geom = _run(logits, targets, ignore_index, NO_DIFFICULTY, config)
    return _stats_of(out, geom.token_shape)


def score_tokens_triton(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                        scoring: str = "combined", ignore_index: int = -100,
                        valid_mask: Optional[torch.Tensor] = None,
                        config: Optional[LaunchConfig] = None) -> TokenScores:
    """SPEC §2-§4 in the same single pass: statistics, the ``scoring`` difficulty and eligibility.

    Mirrors :func:`cggr_torch.scoring.score_tokens`: ``valid = targets != ignore_index`` (all True without
    targets) AND ``valid_mask``; ``eligible = valid ∧ row finite ∧ d not NaN``. The difficulty is computed
    in the kernel in float32 with the SPEC order ``(H ⊕ (1 ⊖ (p1 ⊖ p2))) ⊕ nll`` and is bit-identical to
    :func:`cggr_torch.scoring.difficulty_from_statistics` applied to the returned statistics.

    Raises:
        ValueError: unknown ``scoring``, ``'loss'`` without targets, a bad ``valid_mask`` and the checks of
            :func:`token_statistics_triton`.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring: expected one of {SCORING_MODES}, got {scoring!r}")
    if scoring == "loss" and targets is None:
        raise ValueError("targets: scoring='loss' needs targets, got None")
    _validated(logits, targets, ignore_index)
    token_shape = tuple(logits.shape[:-1])
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            got = valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask).__name__
            raise ValueError(f"valid_mask: expected a bool tensor of shape {token_shape}, got {got}")
        if tuple(valid_mask.shape) != token_shape:
            raise ValueError(f"valid_mask: expected shape {token_shape}, got {tuple(valid_mask.shape)}")
        if valid_mask.device != logits.device:
            raise ValueError(f"valid_mask: expected device {logits.device}, got {valid_mask.device}")
    out, finite, geom = _run(logits, targets, ignore_index, MODE_CODE[scoring], config)
    stats = _stats_of(out, token_shape)
    difficulty = out[5].view(token_shape)
    if targets is not None:
        valid = targets != ignore_index
    else:
        valid = torch.ones(token_shape, dtype=torch.bool, device=logits.device)
    if valid_mask is not None:
        valid = valid & valid_mask
    eligible = valid & finite.view(token_shape).bool() & ~torch.isnan(difficulty)
    return TokenScores(difficulty, eligible, valid, stats)


# ================================================================ torch.library custom ops (SPEC §12.1)
# The scoring pass as a custom op: torch.compile sees one opaque node with a fake (shape-only) implementation
# instead of tracing into a Triton launch, so a compiled loss has no graph break here.
@torch.library.custom_op("cggr::scoring", mutates_args=())
def scoring_op(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int, mode: int,
               key_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, finite, key, status)`` of :func:`launch_scoring` on validated logits: ``out`` float32
    ``(6, N)`` (row 5, the difficulty, is 0 when ``mode`` is -1), ``finite`` int8 ``(N,)``; with ``key_bits`` 32 or 64 (needs ``mode >= 0``) the sort key and
    the int8 status, else two empty tensors. ``targets``: None or an integer tensor of the token shape."""
    geom = row_geometry(logits.detach())
    n = geom.n
    dev = logits.device
    out = torch.empty((6, n), dtype=torch.float32, device=dev)
    finite = torch.empty((n,), dtype=torch.int8, device=dev)
    t = None if targets is None else flat_targets(targets)
    if key_bits:
        key = torch.empty((n,), dtype=torch.int32 if key_bits == 32 else torch.int64, device=dev)
        status = torch.empty((n,), dtype=torch.int8, device=dev)
        launch_scoring(geom, t, ignore_index, mode, out, finite, key=key, status=status)
    else:
        key = torch.empty((0,), dtype=torch.int32, device=dev)
        status = torch.empty((0,), dtype=torch.int8, device=dev)
        launch_scoring(geom, t, ignore_index, mode, out, finite)
    if mode < 0:
        out[5].zero_()   # no difficulty: the row is defined all the same (an op's outputs are deterministic)
    return out, finite, key, status


@scoring_op.register_fake
def _(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int, mode: int,
      key_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = math.prod(logits.shape[:-1])
    dev = logits.device
    m = n if key_bits else 0
    return (logits.new_empty((6, n), dtype=torch.float32), logits.new_empty((n,), dtype=torch.int8),
            torch.empty((m,), dtype=torch.int64 if key_bits == 64 else torch.int32, device=dev),
            torch.empty((m,), dtype=torch.int8, device=dev))
