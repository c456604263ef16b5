r"""The token-statistics backward's epilogue in Triton: logits chunk → gradient of ``Σ g_lp·logprob + g_H·H``,
in place, in one pass (SPEC §14.1).

In the backward of :func:`cggr_torch.token_stats.fused_linear_token_stats` the rows' logits are recomputed one
vocabulary chunk ``[v0, v0 + C)`` at a time, ``Z = H_r W[v0:v0+C]ᵀ + b`` (``K × C``, the inputs' dtype). With
the saved ``lse_r`` and ``H_r`` of the transformed distribution and the upstream gradients ``g_lp``, ``g_H`` of
each row, each chunk must become (``τ`` the temperature, ``c`` the soft-cap)::

    y = c·tanh(Z / c) / τ          (without a soft-cap: y = Z / τ)
    log p = y − lse_r,  p = e^{log p}
    G = [g_lp·(onehot − p) − g_H·p·(log p + H_r)] · (1 − tanh²(Z / c)) / τ      (p = 0 terms are exactly 0)

before the two backward matmuls ``∂h_r += G W[v0:v0+C]`` and ``∂W[v0:v0+C] += Gᵀ H_r``. Written with PyTorch
element-wise ops that is some ten passes over float32 copies of the chunk; this kernel reads each logit once and
writes ``G`` over ``Z`` in the inputs' dtype, with the arithmetic in float32. With a bias it also writes the
float32 column sums of ``G`` of each row block (``∂b`` of the chunk, summed by the caller in a fixed order).

A row with ``g_lp = g_H = 0`` (an unselected, padded or non-finite row) writes exact zeros, whatever its
logits (no ``0·∞``). Grid ``(ceil(K / BLOCK_R), ceil(C / BLOCK_C))``; rows beyond ``K`` and columns beyond ``C``
are masked; offsets are 64-bit. ``tanh`` is ``1 − 2/(e^{2x} + 1)`` (exact at ±∞, absolute error ~1e-7 near 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import check_chunk, check_colsum, check_row_vectors, device_guard

__all__ = ["launch_token_stats_gradient", "token_stats_gradient_op", "GRADIENT_BLOCK_ROWS",
           "GRADIENT_BLOCK_COLS"]

#: Rows × columns of one program, as the fused head's chunk gradient (a memory-bound element-wise pass).
GRADIENT_BLOCK_ROWS = 16
GRADIENT_BLOCK_COLS = 512
_WARPS = 4
_LOG2E = 1.4426950408889634


@triton.jit
def _token_stats_gradient_kernel(
    z_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, t_ptr, colsum_ptr,
    K, C, v0, stride_z, inv_temperature, softcap,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_COLSUM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """One ``BLOCK_R × BLOCK_C`` tile of ``Z ← G`` (see the module docstring)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < K
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    # A target outside this chunk (or none: -1 - v0 < 0) never equals a column index in [0, C).
    local_t = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v0
    active = (g_lp != 0.0) | (g_h != 0.0)
    ptrs = z_ptr + rows[:, None] * stride_z + cols[None, :]
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        e2 = tl.exp2(z * (2.0 * 1.4426950408889634 / softcap))
        th = 1.0 - 2.0 / (e2 + 1.0)
        y = th * softcap
    else:
        y = z
    logp = y * inv_temperature - lse[:, None]
    p = tl.exp2(logp * 1.4426950408889634)
    inner = g_lp[:, None] + g_h[:, None] * (logp + ent[:, None])
    g = tl.where(p > 0.0, -p * inner, 0.0)
    g = g + tl.where(cols[None, :] == local_t[:, None], g_lp[:, None], 0.0)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    g = g * inv_temperature
    g = tl.where(ok & active[:, None], g, 0.0)
    tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=ok)
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_r.to(tl.int64) * C + cols, tl.sum(g, 0), mask=col_ok)


def launch_token_stats_gradient(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, g_lp: torch.Tensor,
                                g_h: torch.Tensor, targets: torch.Tensor, v0: int, *, temperature: float = 1.0,
                                softcap: Optional[float] = None, colsum: Optional[torch.Tensor] = None) -> None:
    """Overwrite the logits chunk ``z`` (``K × C``) with the gradient ``G`` of the module docstring, in place.

    Args:
        z: ``(K, C)`` float32/float16/bfloat16 raw logits (bias included) of the rows for columns
            ``[v0, v0 + C)``, unit stride along ``C`` (a row stride ≥ C is allowed). Overwritten with ``G``.
        lse, entropy: contiguous float32 ``(K,)``: each row's log-sum-exp and entropy of the transformed
            distribution (finite where ``g_lp`` or ``g_h`` is non-zero).
        g_lp, g_h: contiguous float32 ``(K,)``: the upstream gradients of the row's log-prob and entropy; a row
            with both 0 gets exact zeros.
        targets: contiguous int64 ``(K,)``: each row's target column in the full vocabulary, or ``-1`` for none.
        v0: first vocabulary column of the chunk (host int ≥ 0).
        temperature: finite ``> 0`` (host float); softcap: None or finite ``> 0`` (host float).
        colsum: optional contiguous float32 ``(ceil(K / GRADIENT_BLOCK_ROWS), C)``: receives the column sums of
            ``G`` (float32, before rounding) of each block of rows; ``∂b`` of the chunk is their sum over dim 0.

    Raises:
        ValueError: shapes, dtypes, devices, strides or transform parameters other than the above.
    """
    K, C = check_chunk(z, v0)
    check_row_vectors(z, lse=(lse, torch.float32), entropy=(entropy, torch.float32), g_lp=(g_lp, torch.float32),
                      g_h=(g_h, torch.float32), targets=(targets, torch.int64))
    for name, value, optional in (("temperature", temperature, False), ("softcap", softcap, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0 \
                or float(value) == float("inf"):
            raise ValueError(f"{name}: expected {'None or ' if optional else ''}a finite host number > 0, "
                             f"got {value!r}")
    check_colsum(colsum, z, GRADIENT_BLOCK_ROWS)
    if triton.cdiv(C, GRADIENT_BLOCK_COLS) > 65535:
        raise ValueError(f"z: {C} columns need more than the 65535 column blocks of a CUDA grid's second "
                         f"dimension; use a smaller vocab_chunk_size")
    token_stats_gradient_op(z, lse, entropy, g_lp, g_h, targets, v0, float(temperature),
                            -1.0 if softcap is None else float(softcap), colsum)


# The launch as a torch.library custom op that mutates its buffers (SPEC §12.1), like the fused head's
# ``cggr::chunk_gradient``: torch.compile sees one node. ``softcap <= 0`` means none.
@torch.library.custom_op("cggr::token_stats_gradient", mutates_args=("z", "colsum"))
def token_stats_gradient_op(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, g_lp: torch.Tensor,
                            g_h: torch.Tensor, targets: torch.Tensor, v0: int, temperature: float, softcap: float,
                            colsum: Optional[torch.Tensor]) -> None:
    """:func:`launch_token_stats_gradient` on checked arguments: ``z`` becomes ``G``, ``colsum`` its column
    sums."""
    K, C = z.shape
    if K == 0 or C == 0:
        return
    grid = (triton.cdiv(K, GRADIENT_BLOCK_ROWS), triton.cdiv(C, GRADIENT_BLOCK_COLS))
    with device_guard(z):
        _token_stats_gradient_kernel[grid](
            z, lse, entropy, g_lp, g_h, targets, colsum if colsum is not None else lse,
            K, C, v0, z.stride(0) if K > 1 else C, 1.0 / temperature, softcap if softcap > 0 else 1.0,
            BLOCK_R=GRADIENT_BLOCK_ROWS, BLOCK_C=GRADIENT_BLOCK_COLS, HAS_COLSUM=colsum is not None,
            HAS_SOFTCAP=softcap > 0, num_warps=_WARPS,
        )


@token_stats_gradient_op.register_fake
def _(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor,
      targets: torch.Tensor, v0: int, temperature: float, softcap: float, colsum: Optional[torch.Tensor]) -> None:
    return None
