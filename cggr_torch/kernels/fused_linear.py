r"""The fused LM head's backward epilogue in Triton: logits chunk → softmax gradient, in place, in one pass.

In the backward of :func:`cggr_torch.fused_linear.fused_linear_cggr` the ``K`` selected rows' logits are
recomputed one vocabulary chunk ``[v0, v0 + C)`` at a time, ``Z = H_S W[v0:v0+C]ᵀ + b`` (``K × C``, the
inputs' dtype). Each chunk must become::

    G[r, c] = s · (exp(Z[r, c] − lse_r) − [t_r = v0 + c])        s = grad / max(1, |S|)   (a device scalar)

before the two backward matmuls ``∂h_S += G W[v0:v0+C]`` and ``∂W[v0:v0+C] = Gᵀ H_S``. Written with PyTorch
element-wise ops that is five passes over a float32 copy of the chunk (upcast, subtract, exp, scatter, scale,
downcast: ~20 bytes moved per logit); this kernel reads each logit once and writes ``G`` over ``Z`` in the
inputs' dtype (4 bytes per bf16 logit), with the arithmetic in float32. With a bias it also writes the
float32 column sums of ``G`` of each row block (``∂b`` of the chunk, summed by the caller in a fixed order).

Grid ``(ceil(K / BLOCK_R), ceil(C / BLOCK_C))``; rows beyond ``K`` and columns beyond ``C`` are masked, so
any ``K`` and ``C`` (odd sizes, a ragged last block) are handled. Offsets are 64-bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import check_chunk, check_colsum, check_row_vectors, device_guard

__all__ = ["launch_chunk_gradient", "chunk_gradient_op", "CHUNK_BLOCK_ROWS", "CHUNK_BLOCK_COLS"]

#: Rows × columns of one program: 16 × 512 bf16 logits = 16 KiB read and written, four 16-byte vectors per
#: thread at 4 warps - a memory-bound element-wise pass, so the shape only has to keep enough bytes in flight.
CHUNK_BLOCK_ROWS = 16
CHUNK_BLOCK_COLS = 512
_CHUNK_WARPS = 4


@triton.jit
def _chunk_gradient_kernel(
    z_ptr, lse_ptr, t_ptr, scale_ptr, colsum_ptr,
    K, C, v0, stride_z,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_COLSUM: tl.constexpr,
):
    """``Z ← s·(2^{(Z − lse)·log2 e} − onehot(t − v0))`` over one ``BLOCK_R × BLOCK_C`` tile (see module)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < K
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # A target outside this chunk (or a masked row: -1 - v0 < 0) never equals a column index in [0, C).
    local_t = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v0
    scale = tl.load(scale_ptr).to(tl.float32)
    ptrs = z_ptr + rows[:, None] * stride_z + cols[None, :]
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    p = tl.exp2((z - lse[:, None]) * 1.4426950408889634)
    g = (p - tl.where(cols[None, :] == local_t[:, None], 1.0, 0.0)) * scale
    g = tl.where(ok, g, 0.0)
    tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=ok)
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_r.to(tl.int64) * C + cols, tl.sum(g, 0), mask=col_ok)


def launch_chunk_gradient(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, v0: int,
                          scale: torch.Tensor, colsum: Optional[torch.Tensor] = None) -> None:
    """Overwrite the logits chunk ``z`` (``K × C``) with its softmax gradient, in place (module docstring).

    Args:
        z: ``(K, C)`` float32/float16/bfloat16 logits of the selected rows for columns ``[v0, v0 + C)``, unit
            stride along ``C`` (a row stride ≥ C is allowed). Overwritten with ``G`` in the same dtype.
        lse: contiguous float32 ``(K,)``: each selected row's log-sum-exp from the forward.
        targets: contiguous int64 ``(K,)``: each row's target column in the full vocabulary (valid, in range).
        v0: first vocabulary column of the chunk (host int ≥ 0).
        scale: float32 device tensor of one element, ``grad / max(1, |S|)``.
        colsum: optional contiguous float32 ``(ceil(K / CHUNK_BLOCK_ROWS), C)``: receives the column sums of
            ``G`` (float32, before rounding) of each block of ``CHUNK_BLOCK_ROWS`` rows; ``∂b`` of the chunk is
            their sum over the first dimension.

    Raises:
        ValueError: shapes, dtypes, devices or strides other than the above.
    """
    K, C = check_chunk(z, v0)
    check_row_vectors(z, lse=(lse, torch.float32), targets=(targets, torch.int64))
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32 \
            or scale.device != z.device:
        raise ValueError(f"scale: expected a float32 one-element tensor on {z.device}")
    check_colsum(colsum, z, CHUNK_BLOCK_ROWS)
    grid_c = triton.cdiv(C, CHUNK_BLOCK_COLS)
    if grid_c > 65535:
        raise ValueError(f"z: {C} columns need {grid_c} column blocks, more than the 65535 of a CUDA grid's "
                         f"second dimension; use a smaller vocab_chunk_size")
    chunk_gradient_op(z, lse, targets, v0, scale, colsum)


# The launch as a torch.library custom op that mutates its buffers (SPEC §12.1): torch.compile sees one node
# (it runs inside the fused head's backward op; registered so that every kernel entry point is an operator).
@torch.library.custom_op("cggr::chunk_gradient", mutates_args=("z", "colsum"))
def chunk_gradient_op(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, v0: int, scale: torch.Tensor,
                      colsum: Optional[torch.Tensor]) -> None:
    """:func:`launch_chunk_gradient` on checked arguments: ``z`` becomes ``G``, ``colsum`` the column sums."""
    K, C = z.shape
    if K == 0 or C == 0:
        return
    grid_r = triton.cdiv(K, CHUNK_BLOCK_ROWS)
    grid_c = triton.cdiv(C, CHUNK_BLOCK_COLS)
    with device_guard(z):
        _chunk_gradient_kernel[(grid_r, grid_c)](
            z, lse, targets, scale, colsum if colsum is not None else scale,
            K, C, v0, z.stride(0) if K > 1 else C,
            BLOCK_R=CHUNK_BLOCK_ROWS, BLOCK_C=CHUNK_BLOCK_COLS, HAS_COLSUM=colsum is not None,
            num_warps=_CHUNK_WARPS,
        )


@chunk_gradient_op.register_fake
def _(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, v0: int, scale: torch.Tensor,
      colsum: Optional[torch.Tensor]) -> None:
    return None
