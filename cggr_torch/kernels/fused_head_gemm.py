r"""The fused LM head's GEMMs with the CGGR work in their epilogues (Triton; ``head_kernel="gemm"``).

Two kernels replace "cuBLAS matmul → logits block in memory → a second pass over it" in
:func:`cggr_torch.fused_linear.fused_linear_cggr` (SPEC §12, the fused head's launch shapes):

**Forward statistics (split-V online statistics).** A 1-D grid of ``ceil(N / BM) · S`` programs; program
``p`` owns the rows ``[m·BM, (m+1)·BM)`` with ``m = p div S`` and the vocabulary split ``s = p mod S`` (the
split is the fastest index, so the programs resident together share few hidden-state blocks, which stay in
L2 while the splits stream the weight). A split is ``ceil(ceil(V / BN) / S)`` whole ``BN``-column tiles (the
last split ragged, an empty split allowed). For each tile the program forms ``acc = H_blk W_tileᵀ (+ b)``
in float32 (a K-loop over ``d`` in ``BK`` steps, masked for a ragged ``d``) and folds it into per-row
registers - the streaming state of :mod:`cggr_torch.kernels.scoring` in base-2 units (``L = log2 e``):
running max ``m``, runner-up ``z_(2)`` (ties count), ``d = Σ 2^u`` and ``s = Σ 2^u·u`` with
``u = fma(z, L, −c)``, ``c = fl(m·L)``, rebased when ``m`` rises, and the target logit ``z_t``. Columns past
``V`` are ``−∞`` (they add nothing and never reach the top-2 above a real logit). Each program writes its
state to ``partials[:, s, rows]`` (float32 ``(5, S, N)``: a few MB; no ``(N, V)`` or ``(N, BN·S)`` logits
buffer exists anywhere). A combine kernel then merges the ``S`` states of every row **in split order**
(deterministic), with the same rebase, and writes SPEC §2's statistics with the scoring kernel's final
formulas (correctly rounded divisions)::

    lse = (c + log2 d)·ln 2    H = (log2 d − s/d) ⊘ L    p1 = 2^{fma(m,L,−c)} ⊘ d    p2 = 2^{fma(z_(2),L,−c)} ⊘ d
    nll = (log2 d − fma(z_t, L, −c)) ⊘ L   (readable target; NaN for a valid target outside [0, V); 0 ignored)

**Backward gradient.** For one vocabulary chunk ``[v0, v0 + C)`` of the ``K`` selected rows, a tiled GEMM
(grid ``ceil(K / BM) · ceil(C / BN)``, grouped along the rows for L2 reuse) forms ``acc = H_S W_cᵀ (+ b)`` in
float32 and writes ``G = s·(2^{(acc − lse)·L} − onehot)`` in the inputs' dtype (``s = grad / max(1, |S|)``, a
device scalar) and, with a bias, the float32 column sums of ``G`` of each row block (``∂b`` of the chunk,
summed by the caller in a fixed order). The logits tile never leaves registers; the two backward matmuls
``∂h_S += G W_c`` and ``∂W_c = Gᵀ H_S`` stay cuBLAS.

**Logits precision.** Both kernels use the float32 accumulator as the logit (today's ``"blocks"`` path rounds
each logits block to the inputs' dtype before its statistics, as ``nn.Linear`` does): the statistics and ``G``
are those of the unrounded ``h·Wᵀ + b``, the same in the forward and the backward, so the softmax used for ``G``
is the one whose ``lse`` was saved. Float32 inputs run ``tl.dot`` with ``input_precision="ieee"`` (PyTorch's
default float32 matmul is not TF32); float64 is refused (no ``tl.dot`` path here: use ``"blocks"``).

Offsets are 64-bit; rows past ``N`` (``K``) and columns past ``V`` (``C``) load wrapped, valid addresses and
are masked at the stores, so the K-loop needs no row/column masks (and none at all when ``BK`` divides ``d``).
Launch shapes (:class:`HeadGemmConfig`, :func:`head_gemm_config`, :data:`HEAD_GEMM_CONFIGS`) are tuning: they
change the float32 summation order only (SPEC §12). Choice of the default path: DECISIONS.md:
gemm-epilogue-head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import check_kernel_device, device_guard
from .launch import interpreting, num_sms
from .scoring import ref_of

__all__ = [
    "HeadGemmConfig",
    "HEAD_GEMM_CONFIGS",
    "FLOAT32_CONFIG",
    "HEAD_PARTIAL_ROWS",
    "head_gemm_config",
    "head_splits",
    "launch_head_statistics",
    "launch_head_gradient",
    "head_statistics_op",
    "head_gradient_op",
    "colsum_rows",
]

#: Float32 values of a split's partial state per row: ``m``, ``z_(2)``, ``d``, ``s``, ``z_t`` (module docstring).
HEAD_PARTIAL_ROWS = 5
_COMBINE_ROWS = 128
_COMBINE_WARPS = 4
#: Rows of tiles swept together by the backward GEMM's grouped ordering (W_c tiles reused from L2).
_GROUP_M = 8


@dataclass(frozen=True)
class HeadGemmConfig:
    """Tile shape of both head GEMMs.

    Attributes:
        block_m, block_n, block_k: ``BM × BN`` output tile and ``BK`` reduction step (powers of two ≥ 16, the
            smallest ``tl.dot`` shape).
        num_warps, num_stages: Triton launch parameters (software pipelining depth of the K-loop).
        splits: forward vocabulary splits ``S`` (0 = :func:`head_splits`' heuristic).
        flatten: forward only: one software-pipelined loop over (tile, K step) instead of a K-loop per tile
            (``tl.range(flatten=True)``: the next tile's loads overlap this tile's epilogue). Unmeasured: off.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    splits: int = 0
    flatten: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"HeadGemmConfig.{name}: expected a power of two >= 16, got {v!r}")
        if isinstance(self.num_warps, bool) or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"HeadGemmConfig.num_warps: expected 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"HeadGemmConfig.num_stages: expected an int >= 1, got {self.num_stages!r}")
        if isinstance(self.splits, bool) or not isinstance(self.splits, int) or self.splits < 0:
            raise ValueError(f"HeadGemmConfig.splits: expected an int >= 0 (0 = heuristic), got {self.splits!r}")
        if not isinstance(self.flatten, bool):
            raise ValueError(f"HeadGemmConfig.flatten: expected a bool, got {self.flatten!r}")

    def describe(self) -> str:
        """Short label, e.g. ``128x128x64 8w 4st S=auto``."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} {self.num_warps}w {self.num_stages}st "
                f"S={self.splits or 'auto'}" + (" flat" if self.flatten else ""))


#: Candidates for H100/H200 bfloat16 (the benchmark sweeps them; none is measured yet). 128 × 128 keeps the
#: float32 tile at 64 registers per thread with 8 warps, leaving room for the epilogue's temporaries;
#: 128 × 256 halves the hidden-state re-reads per column but doubles that. All compile for sm_90 without
#: register spills (ptxas -v, both kernels, bf16). The 8-warp shapes take all 64K registers of an SM (one
#: program per SM: an epilogue never overlaps another program's main loop); the 4-warp ones fit two.
HEAD_GEMM_CONFIGS: tuple[HeadGemmConfig, ...] = (
    HeadGemmConfig(128, 128, 64, 8, 4),
    HeadGemmConfig(128, 128, 64, 8, 3),
    HeadGemmConfig(128, 256, 64, 8, 3),
    HeadGemmConfig(64, 128, 64, 4, 4),
    HeadGemmConfig(128, 64, 64, 4, 4),
    HeadGemmConfig(128, 128, 64, 8, 4, flatten=True),
    HeadGemmConfig(64, 128, 64, 4, 4, flatten=True),
)
#: float32 inputs: 64 × 128 × 32, 8 warps, 3 stages - no register spills under ptxas for sm_90 (128 × 128 spills
#: ~350 bytes with the IEEE product).
FLOAT32_CONFIG = HeadGemmConfig(64, 128, 32, 8, 3)
#: Small tiles for the Triton interpreter (CPU tests): the smallest legal ``tl.dot`` shapes.
_INTERPRETER_CONFIG = HeadGemmConfig(16, 32, 16, 4, 1)


def head_gemm_config(dtype: torch.dtype, device: torch.device) -> HeadGemmConfig:
    """The default tile shape: :data:`HEAD_GEMM_CONFIGS`' first entry on CUDA for half precision;
    :data:`FLOAT32_CONFIG` for float32 (its IEEE ``tl.dot`` runs on the FMA units: a 128 × 128 tile spills); the
    interpreter's small tiles elsewhere. A fixed heuristic, not an autotuner: no benchmark (and no
    synchronisation) the first time a shape is seen in a training step."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return FLOAT32_CONFIG if dtype == torch.float32 else HEAD_GEMM_CONFIGS[0]


def head_splits(num_rows: int, vocab_size: int, config: HeadGemmConfig, sms: int) -> int:
    """Forward vocabulary splits ``S``: ``config.splits`` if set, else the smallest ``S`` giving at least two
    programs per SM (``ceil(N / BM) · S ≥ 2·sms``: 3 at N = 16384, BM = 128 on 132 SMs), at most one per
    ``BN``-column tile."""
    tiles = max(1, -(-int(vocab_size) // config.block_n))
    if config.splits:
        return max(1, min(config.splits, tiles))
    blocks = max(1, -(-int(num_rows) // config.block_m))
    return max(1, min(tiles, -(-2 * max(1, int(sms)) // blocks)))


# ============================================================================================== kernels
@triton.jit
def _logits_tile(h_ptr, w_ptr, rows_ld, cols_ld, D, stride_hm, stride_hk, stride_wn, stride_wk,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """float32 ``H[rows_ld] · W[cols_ld]ᵀ`` (``BM × BN``); rows/columns are in-bounds addresses.

    ``UPCAST`` (the Triton interpreter with bfloat16 only, whose ``tl.dot`` misreads bfloat16 operands): the
    tiles are widened to float32 first - exact, and so is each bf16·bf16 product, as on the tensor cores."""
    ks = tl.arange(0, BK)
    a_ptrs = h_ptr + rows_ld[:, None] * stride_hm + ks[None, :] * stride_hk
    b_ptrs = w_ptr + cols_ld[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = ks < D - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_hk
        b_ptrs += BK * stride_wk
    return acc


@triton.jit
def _head_statistics_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, part_ptr,
    N, V, D, S, plane, stride_hm, stride_hk, stride_wn, stride_wk, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLATTEN: tl.constexpr,
):
    """One (row block, vocabulary split): the split's streaming state of every row → ``partials``.

    ``FLATTEN``: the tile loop and the K-loop inside it become one software-pipelined loop
    (``tl.range(flatten=True)``), so the next tile's first loads are in flight during this tile's epilogue."""
    pid = tl.program_id(0)
    pid_s = pid % S
    pid_m = pid // S
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows_ld = rows % N
    n_tiles = tl.cdiv(V, BN)
    per_split = tl.cdiv(n_tiles, S)
    tile0 = pid_s * per_split
    tile1 = tl.minimum(n_tiles, tile0 + per_split)

    readable = tl.zeros([BM], dtype=tl.int1)
    tgt = tl.zeros([BM], dtype=tl.int64)
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
        readable = (tgt != ignore_index) & (tgt >= 0) & (tgt < V)
    m = tl.full([BM], float("-inf"), tl.float32)
    z2 = tl.full([BM], float("-inf"), tl.float32)
    d_acc = tl.zeros([BM], dtype=tl.float32)
    s_acc = tl.zeros([BM], dtype=tl.float32)
    z_t = tl.zeros([BM], dtype=tl.float32)
    for tile in tl.range(tile0, tile1, flatten=FLATTEN):
        cols = tl.arange(0, BN).to(tl.int64) + tile * BN   # tile·BN < V < 2^31
        col_ok = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows_ld, cols % V, D, stride_hm, stride_hk, stride_wn, stride_wk,
                           BM, BN, BK, EVEN_K, IEEE, UPCAST)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        if HAS_TARGETS:
            # The target's column within this tile (int32; −1 when it is elsewhere or not readable). Most
            # tiles hold no target of the block's rows: the gather is skipped for them.
            local = tl.where(readable & (tgt >= tile * BN) & (tgt < tile * BN + BN), tgt - tile * BN, -1)
            local = local.to(tl.int32)
            if tl.max(local, 0) >= 0:
                # Exactly one tile of one split holds a readable target: the others add exact zeros.
                z_t += tl.sum(tl.where(tl.arange(0, BN)[None, :] == local[:, None], acc, 0.0), 1)
        # Top-2 of each row of the tile, ties counted: the runner-up is the largest value below the maximum,
        # or the maximum itself when it occurs twice (plain reductions, no pairwise tl.reduce of two arrays).
        g1 = tl.max(acc, 1)
        at_max = acc == g1[:, None]
        g2 = tl.max(tl.where(at_max, float("-inf"), acc), 1)
        g2 = tl.where(tl.sum(at_max.to(tl.int32), 1) > 1, g1, g2)
        z2 = tl.maximum(tl.minimum(m, g1), tl.maximum(z2, g2))
        # Rebase d and s from c(m) to c(m_new) (δ = 0 when the maximum does not rise), then add the tile.
        m_new = tl.maximum(m, g1)
        c_new = ref_of(m_new)
        delta = tl.where(m > float("-inf"), m * 1.4426950408889634, c_new) - c_new
        alpha = tl.exp2(delta)
        s_acc = (s_acc + delta * d_acc) * alpha
        d_acc = d_acc * alpha
        m = m_new
        u = tl.fma(acc, 1.4426950408889634, -c_new[:, None])
        e = tl.exp2(u)
        d_acc += tl.sum(e, 1)
        # A −∞ logit has e = 0: 0·(−3e38) = 0, never 0·(−∞).
        s_acc += tl.sum(e * tl.maximum(u, -3.0e38), 1)
    # partials[j, s, row] (plane = S·N). Pointer steps, not j·plane: a runtime int may be specialised to a
    # constant (N = 1), and pointer arithmetic is 64-bit whatever the offset's type.
    p = part_ptr + pid_s.to(tl.int64) * N + rows
    tl.store(p, m, mask=row_ok)
    p += plane
    tl.store(p, z2, mask=row_ok)
    p += plane
    tl.store(p, d_acc, mask=row_ok)
    p += plane
    tl.store(p, s_acc, mask=row_ok)
    p += plane
    tl.store(p, z_t, mask=row_ok)


@triton.jit
def _head_combine_kernel(
    part_ptr, t_ptr, out_ptr, N, S, plane, V, out_stride, ignore_index,
    HAS_TARGETS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the ``S`` split states of each row in split order and write lse, H, p1, p2, nll (row 5: 0)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    z2 = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    p = part_ptr + rows
    for _j in range(0, S):
        q = p
        m_j = tl.load(q, mask=ok, other=float("-inf"))
        q += plane
        z2_j = tl.load(q, mask=ok, other=float("-inf"))
        q += plane
        d_j = tl.load(q, mask=ok, other=0.0)
        q += plane
        s_j = tl.load(q, mask=ok, other=0.0)
        q += plane
        z_t += tl.load(q, mask=ok, other=0.0)
        z2 = tl.maximum(tl.minimum(m, m_j), tl.maximum(z2, z2_j))
        m_new = tl.maximum(m, m_j)
        c_new = ref_of(m_new)
        da = tl.where(m > float("-inf"), m * 1.4426950408889634, c_new) - c_new
        db = tl.where(m_j > float("-inf"), m_j * 1.4426950408889634, c_new) - c_new
        aa = tl.exp2(da)
        ab = tl.exp2(db)
        s = (s + da * d) * aa + (s_j + db * d_j) * ab
        d = d * aa + d_j * ab
        m = m_new
        p += N
    c = ref_of(m)
    log2d = tl.log2(d)
    lse = (c + log2d) * 0.6931471805599453
    entropy = tl.math.div_rn(log2d - tl.math.div_rn(s, d), 1.4426950408889634)
    p1 = tl.math.div_rn(tl.exp2(tl.fma(m, 1.4426950408889634, -c)), d)
    p2 = tl.math.div_rn(tl.exp2(tl.fma(z2, 1.4426950408889634, -c)), d)
    nll = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_TARGETS:
        tgt = tl.load(t_ptr + rows, mask=ok, other=ignore_index)
        valid = tgt != ignore_index
        readable = valid & (tgt >= 0) & (tgt < V)
        nll_val = tl.math.div_rn(log2d - tl.fma(z_t, 1.4426950408889634, -c), 1.4426950408889634)
        nll = tl.where(readable, nll_val, tl.where(valid, float("nan"), 0.0))
    tl.store(out_ptr + rows, lse, mask=ok)
    tl.store(out_ptr + out_stride + rows, entropy, mask=ok)
    tl.store(out_ptr + 2 * out_stride + rows, p1, mask=ok)
    tl.store(out_ptr + 3 * out_stride + rows, p2, mask=ok)
    tl.store(out_ptr + 4 * out_stride + rows, nll, mask=ok)
    tl.store(out_ptr + 5 * out_stride + rows, tl.zeros([BLOCK], dtype=tl.float32), mask=ok)


@triton.jit
def _head_gradient_kernel(
    h_ptr, w_ptr, b_ptr, lse_ptr, t_ptr, scale_ptr, g_ptr, colsum_ptr,
    K, C, D, v0, stride_hm, stride_hk, stride_wn, stride_wk, stride_g,
    HAS_BIAS: tl.constexpr, HAS_COLSUM: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``BM × BN`` tile of ``G = s·(softmax − onehot)`` of the chunk, from its logits in registers."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(K, BM)
    grid_n = tl.cdiv(C, BN)
    # Grouped ordering: GROUP_M row blocks sweep the columns together, so each W_c tile is read from L2.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < K
    col_ok = cols < C
    acc = _logits_tile(h_ptr, w_ptr, rows % K, cols % C, D, stride_hm, stride_hk, stride_wn, stride_wk,
                       BM, BN, BK, EVEN_K, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # A target outside this chunk (or a masked row: −1 − v0 < 0) never equals a column index in [0, C).
    local_t = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v0
    scale = tl.load(scale_ptr).to(tl.float32)
    p = tl.exp2((acc - lse[:, None]) * 1.4426950408889634)
    g = (p - tl.where(cols[None, :] == local_t[:, None], 1.0, 0.0)) * scale
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g, 0.0)
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_m.to(tl.int64) * C + cols, tl.sum(g, 0), mask=col_ok)


# ============================================================================================ launchers
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter's bfloat16 ``tl.dot`` workaround (see :func:`_logits_tile`); never on a GPU."""
    return x.dtype == torch.bfloat16 and interpreting()


def _check_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    hidden_name: str) -> None:
    check_kernel_device(hidden, hidden_name)
    if hidden.dim() != 2 or hidden.dtype not in _DTYPES:
        raise ValueError(f"{hidden_name}: expected a 2-D float32/float16/bfloat16 tensor (float64 has no tl.dot "
                         f"path here: use head_kernel='blocks'), got {hidden.dtype} {tuple(hidden.shape)}")
    d = hidden.shape[1]
    if weight.dim() != 2 or weight.shape[1] != d or weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight: expected a {hidden.dtype} (V, {d}) tensor on {hidden.device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight: expected V >= 1 rows, got shape {tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype
                             or bias.device != hidden.device or (bias.numel() > 1 and bias.stride(0) != 1)):
        raise ValueError(f"bias: expected None or a contiguous {hidden.dtype} ({weight.shape[0]},) tensor on "
                         f"{hidden.device}, got {bias.dtype} {tuple(bias.shape)}")


def _check_rows(x: Optional[torch.Tensor], name: str, dtype: torch.dtype, n: int, device: torch.device) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.dtype != dtype or tuple(x.shape) != (n,) or x.device != device \
            or (n > 1 and x.stride(0) != 1):
        raise ValueError(f"{name}: expected a contiguous {dtype} ({n},) tensor on {device}, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def launch_head_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: Optional[torch.Tensor], ignore_index: int, out: torch.Tensor,
                           config: Optional[HeadGemmConfig] = None,
                           partials: Optional[torch.Tensor] = None) -> None:
    """SPEC §2 statistics of every row of ``hidden · weightᵀ + bias`` into ``out`` (module docstring).

    Args:
        hidden: ``(N, d)`` float32/float16/bfloat16 (any strides).
        weight: ``(V, d)``, same dtype and device (any strides).
        bias: None or contiguous ``(V,)``, same dtype.
        targets: None or contiguous int64 ``(N,)`` (``ignore_index`` and values outside ``[0, V)`` are never
            read; a valid target outside the range gives ``nll = NaN``).
        ignore_index: target value without a target.
        out: float32 ``(6, N)`` with unit stride along N: rows lse, H, p1, p2, nll and 0 (no difficulty).
        config: tile shape and splits (:func:`head_gemm_config` when None).
        partials: optional float32 ``(5, S, N)`` work buffer (``S`` from :func:`head_splits`); allocated when
            None. Every entry is written before it is read.

    Raises:
        ValueError: shapes, dtypes, devices or strides other than the above.
    """
    _check_operands(hidden, weight, bias, "hidden")
    N, d = hidden.shape
    V = weight.shape[0]
    if out.dtype != torch.float32 or tuple(out.shape) != (6, N) or (N > 1 and out.stride(1) != 1) \
            or out.device != hidden.device:
        raise ValueError(f"out: expected a float32 (6, {N}) buffer with unit stride along N on {hidden.device}, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    _check_rows(targets, "targets", torch.int64, N, hidden.device)
    cfg = config if config is not None else head_gemm_config(hidden.dtype, hidden.device)
    S = head_splits(N, V, cfg, num_sms(hidden))
    if partials is None:
        partials = torch.empty((HEAD_PARTIAL_ROWS, S, N), dtype=torch.float32, device=hidden.device)
    elif partials.dtype != torch.float32 or tuple(partials.shape) != (HEAD_PARTIAL_ROWS, S, N) \
            or not partials.is_contiguous() or partials.device != hidden.device:
        raise ValueError(f"partials: expected a contiguous float32 ({HEAD_PARTIAL_ROWS}, {S}, {N}) buffer on "
                         f"{hidden.device}, got {partials.dtype} {tuple(partials.shape)}")
    if N == 0:
        return
    has_t = targets is not None
    with device_guard(hidden):
        _head_statistics_kernel[(triton.cdiv(N, cfg.block_m) * S,)](
            hidden, weight, bias if bias is not None else hidden, targets if has_t else hidden, partials,
            N, V, d, S, S * N, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), int(ignore_index),
            HAS_BIAS=bias is not None, HAS_TARGETS=has_t, EVEN_K=d % cfg.block_k == 0,
            IEEE=hidden.dtype == torch.float32, UPCAST=_upcast(hidden), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
            FLATTEN=cfg.flatten, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _head_combine_kernel[(triton.cdiv(N, _COMBINE_ROWS),)](
            partials, targets if has_t else partials, out, N, S, S * N, V, out.stride(0), int(ignore_index),
            HAS_TARGETS=has_t, BLOCK=_COMBINE_ROWS, num_warps=_COMBINE_WARPS,
        )


def launch_head_gradient(h_sel: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lse: torch.Tensor, targets: torch.Tensor, v0: int, scale: torch.Tensor,
                         grad: torch.Tensor, colsum: Optional[torch.Tensor] = None,
                         config: Optional[HeadGemmConfig] = None) -> None:
    """``grad ← s·(softmax(h_sel · weightᵀ + bias) − onehot)`` for one vocabulary chunk (module docstring).

    Args:
        h_sel: ``(K, d)`` float32/float16/bfloat16 selected hidden states (any strides).
        weight: ``(C, d)`` rows ``[v0, v0 + C)`` of the LM-head weight (a row slice of it; any strides).
        bias: None or the contiguous ``(C,)`` slice of the bias.
        lse: contiguous float32 ``(K,)``: each row's log-sum-exp from the forward.
        targets: contiguous int64 ``(K,)``: each row's target in the full vocabulary (valid, in range).
        v0: first vocabulary column of the chunk (host int ≥ 0).
        scale: float32 one-element device tensor, ``grad / max(1, |S|)``.
        grad: ``(K, C)`` output in ``h_sel``'s dtype, unit column stride (row stride ≥ C allowed).
        colsum: optional contiguous float32 ``(ceil(K / BM), C)``: the column sums of ``G`` (float32, before
            rounding) of each block of ``config.block_m`` rows; ``∂b`` of the chunk is their sum over dim 0.
        config: tile shape (:func:`head_gemm_config` when None; ``splits`` is ignored).

    Raises:
        ValueError: shapes, dtypes, devices or strides other than the above.
    """
    _check_operands(h_sel, weight, bias, "h_sel")
    K, d = h_sel.shape
    C = weight.shape[0]
    if grad.dtype != h_sel.dtype or tuple(grad.shape) != (K, C) or grad.device != h_sel.device \
            or (C > 1 and grad.stride(1) != 1) or (K > 1 and grad.stride(0) < C):
        raise ValueError(f"grad: expected a {h_sel.dtype} ({K}, {C}) tensor with unit column stride on "
                         f"{h_sel.device}, got {grad.dtype} {tuple(grad.shape)} strides {grad.stride()}")
    _check_rows(lse, "lse", torch.float32, K, h_sel.device)
    _check_rows(targets, "targets", torch.int64, K, h_sel.device)
    if isinstance(v0, bool) or not isinstance(v0, int) or v0 < 0:
        raise ValueError(f"v0: expected a host integer >= 0, got {v0!r}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32 \
            or scale.device != h_sel.device:
        raise ValueError(f"scale: expected a float32 one-element tensor on {h_sel.device}")
    cfg = config if config is not None else head_gemm_config(h_sel.dtype, h_sel.device)
    if colsum is not None:
        want = (triton.cdiv(K, cfg.block_m), C)
        if colsum.dtype != torch.float32 or tuple(colsum.shape) != want or not colsum.is_contiguous() \
                or colsum.device != h_sel.device:
            raise ValueError(f"colsum: expected a contiguous float32 {want} tensor on {h_sel.device}, got "
                             f"{colsum.dtype} {tuple(colsum.shape)}")
    if K == 0:
        return
    grid = (triton.cdiv(K, cfg.block_m) * triton.cdiv(C, cfg.block_n),)
    with device_guard(h_sel):
        _head_gradient_kernel[grid](
            h_sel, weight, bias if bias is not None else h_sel, lse, targets, scale, grad,
            colsum if colsum is not None else lse,
            K, C, d, v0, h_sel.stride(0), h_sel.stride(1), weight.stride(0), weight.stride(1),
            grad.stride(0) if K > 1 else C,
            HAS_BIAS=bias is not None, HAS_COLSUM=colsum is not None, EVEN_K=d % cfg.block_k == 0,
            IEEE=h_sel.dtype == torch.float32, UPCAST=_upcast(h_sel), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=_GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


# ================================================================ torch.library custom ops (SPEC §12.1)
@torch.library.custom_op("cggr::head_gemm_statistics", mutates_args=())
def head_statistics_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """:func:`launch_head_statistics` with the default tile shape: float32 ``(6, N)`` (lse, H, p1, p2, nll, 0)."""
    out = torch.empty((6, hidden2d.shape[0]), dtype=torch.float32, device=hidden2d.device)
    t = None if targets is None else targets.reshape(-1).to(torch.int64).contiguous()
    b = None if bias is None else bias.contiguous()
    with torch.no_grad():
        launch_head_statistics(hidden2d, weight, b, t, ignore_index, out)
    return out


@head_statistics_op.register_fake
def _(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: Optional[torch.Tensor],
      ignore_index: int) -> torch.Tensor:
    return hidden2d.new_empty((6, hidden2d.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cggr::head_gemm_gradient", mutates_args=("grad", "colsum"))
def head_gradient_op(h_sel: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lse: torch.Tensor,
                     targets: torch.Tensor, v0: int, scale: torch.Tensor, grad: torch.Tensor,
                     colsum: Optional[torch.Tensor]) -> None:
    """:func:`launch_head_gradient` with the default tile shape (``colsum`` rows: ``ceil(K / BM)`` of
    :func:`head_gemm_config`): ``grad`` becomes ``G``, ``colsum`` its column sums per row block."""
    with torch.no_grad():
        launch_head_gradient(h_sel, weight, bias, lse, targets, v0, scale, grad, colsum)


@head_gradient_op.register_fake
def _(h_sel: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lse: torch.Tensor,
      targets: torch.Tensor, v0: int, scale: torch.Tensor, grad: torch.Tensor, colsum: Optional[torch.Tensor]) -> None:
    return None


def colsum_rows(num_rows: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of the ``colsum`` buffer that :func:`head_gradient_op` (the default tile shape) writes."""
    return max(1, -(-int(num_rows) // head_gemm_config(dtype, device).block_m))

