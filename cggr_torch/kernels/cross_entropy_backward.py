"""The selective cross-entropy's backward kernel (SPEC §8), in Triton; split from
:mod:`cggr_torch.kernels.cross_entropy`, which re-exports :func:`launch_selective_backward` and
:func:`check_inplace_logits`.

::

    ∂loss/∂z_i = g·s_i·(softmax(z_i) − onehot(target_i))   for i ∈ S,   exact 0 otherwise
    s_i = 1/max(1, |S|)  (the selected mean)   or   ω_i  (the ``sampled`` row weights, SPEC §7.4)

**Traffic.** One launch writes the whole ``(N, V)`` gradient: a program of a selected row reads its block of
logits once and writes its gradient; a program of an unselected row only writes zeros (no separate fill, no
``torch.zeros``). That is ``|S|·V`` element reads plus ``N·V`` element writes, the least a *dense* gradient
can cost: autograd hands the next node a strided ``(N, V)`` tensor, so every unselected row must hold zeros
in memory. Writing only the selected rows would need a sparse gradient, which the next consumer (the LM
head's matmul backward) would have to accept; the fused LM head (:mod:`cggr_torch.fused_linear`) is the
path that never writes the unselected rows (DECISIONS.md: inplace-selective-ce).

**In place.** ``grad`` may be the logits buffer itself (``inplace_backward``): a selected row's program reads
its block and overwrites it with the gradient (each program touches only its own block, so there is no race
between programs), an unselected row's program overwrites it with zeros. Same traffic as a fresh buffer; what
it saves is the ``N·V`` allocation (the peak memory of a training step). :func:`check_inplace_logits` is the
layout rule such a buffer must meet.

**Grid.** One program per (row, group of ``BPP`` column blocks), ``G = ceil(V/(BLOCK·BPP))`` groups per row:
the 2-D grid ``(N, G)``, or with ``LaunchConfig.flat_grid`` (the default, DECISIONS.md: ce-backward-flat-grid)
the row-major 1-D grid ``(N·G,)`` (program ``p`` → row ``p div G``, group ``p mod G``), so that neighbouring
programs - the zero-writing ones included - store consecutive addresses of one row instead of addresses one
row apart. Both grids write exactly the same values.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import LaunchConfig, backward_config
from .inputs import RowGeometry, device_guard

__all__ = ["launch_selective_backward", "check_inplace_logits"]

#: CUDA's grid limits (programs along x and along y).
_GRID_X_MAX = 2**31 - 1
_GRID_Y_MAX = 65535


@triton.jit
def _selective_backward_kernel(
    x_ptr, t_ptr, sel_ptr, lse_ptr, scale_ptr, count_ptr, g_ptr,
    V, T, x_stride_b, x_stride_t, g_stride_b, g_stride_t, n_col_groups,
    BLOCK: tl.constexpr, BPP: tl.constexpr, HAS_COUNT: tl.constexpr, STORE_HINT: tl.constexpr,
    FLAT_GRID: tl.constexpr, w_ptr, HAS_WEIGHTS: tl.constexpr,
):
    """Program (row, column-block group): BPP gradient blocks of a selected row, zeros for the others.

    The scale is ``scale[0]`` or, with HAS_COUNT, ``scale[0] ⊘ max(1, count[0])`` (g / |S| read on the device).
    Grid ``(N, n_col_groups)``, or with FLAT_GRID ``(N·n_col_groups,)`` in row-major order, so that programs
    launched one after another store along one row instead of one row apart.
    """
    if FLAT_GRID:
        pid = tl.program_id(0).to(tl.int64)
        i = pid // n_col_groups
        # col_group < n_col_groups < 2^31 (the launcher's bound): column offsets stay 32-bit, as in the 2-D grid.
        col_group = (pid - i * n_col_groups).to(tl.int32)
    else:
        i = tl.program_id(0).to(tl.int64)
        col_group = tl.program_id(1)
    b = i // T
    t = i - b * T
    col0 = col_group * (BLOCK * BPP)
    offs = tl.arange(0, BLOCK)
    g_row = g_ptr + b * g_stride_b + t * g_stride_t
    sel = tl.load(sel_ptr + i)
    if sel != 0:
        x_row = x_ptr + b * x_stride_b + t * x_stride_t
        lse = tl.load(lse_ptr + i)
        tgt = tl.load(t_ptr + i)
        scale = tl.load(scale_ptr).to(tl.float32)
        if HAS_COUNT:
            scale = tl.math.div_rn(scale, tl.maximum(tl.load(count_ptr), 1).to(tl.float32))
        if HAS_WEIGHTS:  # SPEC §7.4: the row's Horvitz–Thompson weight (already divided by max(1, n))
            scale = scale * tl.load(w_ptr + i)
        for j in tl.static_range(BPP):
            cols = col0 + j * BLOCK + offs
            in_row = cols < V
            x = tl.load(x_row + cols, mask=in_row, other=0.0, eviction_policy="evict_first").to(tl.float32)
            p = tl.exp2((x - lse) * 1.4426950408889634)
            grad = (p - tl.where(cols == tgt, 1.0, 0.0)) * scale
            tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=in_row, cache_modifier=STORE_HINT)
    else:
        for j in tl.static_range(BPP):
            cols = col0 + j * BLOCK + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], g_ptr.dtype.element_ty), mask=cols < V,
                     cache_modifier=STORE_HINT)


def launch_selective_backward(geom: RowGeometry, targets: torch.Tensor, selected: torch.Tensor,
                              lse: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor,
                              config: Optional[LaunchConfig] = None, *,
                              count: Optional[torch.Tensor] = None,
                              row_weights: Optional[torch.Tensor] = None) -> None:
    """Write every row of ``grad`` (shape of the logits, unit last stride; may be the logits themselves).

    ``scale`` is a float32 device tensor of one element: ``g/max(1, |S|)``, or ``g`` when ``count`` (an int64
    device tensor of one element holding ``|S|``) is given - then the division happens in the kernel.
    ``row_weights`` (contiguous float32 ``(N,)``): each selected row's scale is further multiplied by its weight.

    The grid is ``(N, G)`` with ``G = ceil(V/(BLOCK·blocks_per_program))`` column groups per row, or with
    ``config.flat_grid`` the row-major ``(N·G,)``, whose consecutive programs store sequentially along a row
    (see the module docstring). CUDA bounds the grid (x ≤ 2^31 − 1, y ≤ 65535 programs); a shape beyond
    them raises ``ValueError`` before anything is launched.
    """
    n = geom.n
    if n == 0:
        return
    want = geom.token_shape + (geom.vocab,)
    if tuple(grad.shape) != want or grad.device != geom.x.device:
        raise ValueError(f"grad: expected shape {want} on {geom.x.device}, got {tuple(grad.shape)} on {grad.device}")
    if grad.stride(-1) != 1 and geom.vocab > 1:
        raise ValueError(f"grad: expected a unit stride along V, got strides {grad.stride()}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale: expected a float32 tensor of one element, got {scale.dtype} {tuple(scale.shape)}")
    if count is not None and (count.numel() != 1 or count.dtype != torch.int64):
        raise ValueError(f"count: expected an int64 tensor of one element, got {count.dtype} {tuple(count.shape)}")
    if row_weights is not None and (row_weights.dtype != torch.float32 or tuple(row_weights.shape) != (n,)
                                    or not row_weights.is_contiguous()):
        raise ValueError(f"row_weights: expected a contiguous float32 tensor of shape ({n},), got "
                         f"{row_weights.dtype} {tuple(row_weights.shape)}")
    if grad.dim() == 2:
        g_sb, g_st = 0, grad.stride(0)
    else:
        g_sb, g_st = grad.stride(0), grad.stride(1)
    cfg = config if config is not None else backward_config(geom.vocab, grad.dtype)
    block = cfg.block
    n_col_groups = triton.cdiv(geom.vocab, block * cfg.blocks_per_program)
    if cfg.flat_grid:
        if n * n_col_groups > _GRID_X_MAX:
            raise ValueError(f"backward flat grid: N·G = {n}·{n_col_groups} = {n * n_col_groups} programs exceed "
                             f"the grid limit {_GRID_X_MAX}; use larger blocks / blocks_per_program, or "
                             f"flat_grid=False")
        grid: tuple[int, ...] = (n * n_col_groups,)
    else:
        if n > _GRID_X_MAX:
            raise ValueError(f"backward grid: N = {n} rows exceed the grid limit {_GRID_X_MAX}")
        if n_col_groups > _GRID_Y_MAX:
            raise ValueError(f"backward grid: G = ceil(V / (BLOCK·blocks_per_program)) = {n_col_groups} column "
                             f"groups (V = {geom.vocab}, BLOCK = {block}, blocks_per_program = "
                             f"{cfg.blocks_per_program}) exceed the grid's y limit {_GRID_Y_MAX}; use larger "
                             f"blocks / blocks_per_program, or flat_grid=True")
        grid = (n, n_col_groups)
    with device_guard(geom.x):
        _selective_backward_kernel[grid](
            geom.x, targets, selected, lse, scale, count if count is not None else scale, grad,
            geom.vocab, geom.seq_len, geom.stride_b, geom.stride_t, g_sb, g_st, n_col_groups,
            BLOCK=block, BPP=cfg.blocks_per_program, HAS_COUNT=count is not None, STORE_HINT=cfg.store_hint,
            FLAT_GRID=cfg.flat_grid, w_ptr=row_weights if row_weights is not None else scale,
            HAS_WEIGHTS=row_weights is not None, num_warps=cfg.num_warps,
        )


def check_inplace_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """The mode and layout a buffer must have to receive its own gradient in place (SPEC §8.1):
    unit stride along ``V`` and rows that never overlap in memory (a ``(B, T, V)`` / ``(N, V)`` tensor; a
    slice such as ``logits[:, :-1]`` qualifies, a transpose or an ``expand`` does not).

    The in-place gradient is eager only: under ``torch.compile`` the compiled graph may keep, reuse or
    functionalise the logits buffer, so the overwrite would not be the documented one.

    Raises:
        ValueError: naming ``name`` and the offending strides, or ``inplace_backward`` under ``torch.compile``.
    """
    if torch.compiler.is_compiling():
        raise ValueError("inplace_backward: True is supported in eager mode only; under torch.compile pass "
                         "inplace_backward=False")
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name}: inplace_backward=True needs a (B, T, V) or (N, V) tensor, got {got}")
    V = logits.shape[-1]
    if logits.stride(-1) != 1 and V > 1:
        raise ValueError(f"{name}: inplace_backward=True needs a unit stride along V, got strides "
                         f"{logits.stride()}; pass {name}.contiguous() or inplace_backward=False")
    if not _rows_disjoint(logits):
        raise ValueError(f"{name}: inplace_backward=True needs rows that do not overlap in memory, got shape "
                         f"{tuple(logits.shape)} with strides {logits.stride()}; pass {name}.contiguous() or "
                         f"inplace_backward=False")


def _rows_disjoint(t: torch.Tensor) -> bool:
    """True when distinct rows of a tensor with unit last stride never overlap: the leading dims, taken in
    order of increasing stride, each step at least over the span of the ones before (any permutation of
    ``(B, T)``, slices and gaps qualify; a zero or too small stride does not)."""
    span = t.shape[-1]
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim() - 1) if t.shape[d] > 1):
        if stride < span:
            return False
        span += (size - 1) * stride
    return True
