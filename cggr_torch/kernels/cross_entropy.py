"""Selective cross-entropy (SPEC §8) with a sparse backward, in Triton.

::

    S     = {i : mask_i ∧ target_i ≠ ignore_index ∧ 0 ≤ target_i < V}      (the selected rows)
    loss  = Σ_{i∈S} nll_i / max(1, |S|),        nll_i = lse_i − z_i[target_i]            (float32)
    ∂loss/∂z_i = g·(softmax(z_i) − onehot(target_i)) / max(1, |S|)   for i ∈ S,   0 otherwise

With ``row_weights`` ω (float32 per row; the Horvitz–Thompson weights ``w_i / max(1, n)`` of the ``sampled``
selection, SPEC §7.4 and §8) the loss is ``Σ_{i∈S} ω_i·nll_i`` (no division) and the gradient of row ``i``
is ``g·ω_i·(softmax(z_i) − onehot(target_i))``; without them the kernels are unchanged (``HAS_WEIGHTS`` is a
compile-time switch).

**Forward.** One program per row; an unselected row is not read at all. With ``lse`` given (from the
scoring pass, :func:`cggr_torch.kernels.scoring.token_statistics_triton`) a selected row costs one gather
(``z[target]``); without it the program streams the row once for an online log-sum-exp. The per-row losses
are summed by ``torch.sum`` (deterministic), divided by the device count: no host synchronisation.

**Backward.** :mod:`cggr_torch.kernels.cross_entropy_backward` (re-exported here): one launch writes the
whole gradient, ``(2^{(z − lse)·log2 e} − [col = target])·g/|S|`` on the selected rows (read once) and zeros on
the others: ``|S|·V`` reads plus ``N·V`` writes, the floor of a dense gradient. ``inplace_backward=True``
writes it into the logits buffer itself (SPEC §8.1): the same traffic, no ``N·V`` allocation;
the logits are destroyed, so nothing may read them afterwards (an autograd node that saved them raises, as for
any in-place operation), and there is one backward per forward. It is eager only (under ``torch.compile``
a graph break; ``fullgraph=True`` raises).

The selection itself (scores → ratio → :func:`cggr_torch.selection.select_tokens`) is done by the caller on
the device; ``mask`` must only contain eligible (finite) rows - a selected non-finite row makes the loss NaN.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..utils import check_logits, check_target_range, check_targets
from . import scoring as scoring_kernels
from .cross_entropy_backward import check_inplace_logits, launch_selective_backward
from .inputs import RowGeometry, check_kernel_device, device_guard, flat_targets, row_geometry
from .launch import LaunchConfig, lse_config

# The kernels below call the scoring module's rescaling reference by this (module-global) name.
_ref_of = scoring_kernels.ref_of

__all__ = [
    "selective_cross_entropy_triton",
    "scored_selective_cross_entropy",
    "launch_selective_forward",
    "launch_selective_backward",
    "launch_masked_mean",
    "check_inplace_logits",
    "weighted_selective_cross_entropy",
    "selective_cross_entropy_op",
    "selective_cross_entropy_backward_op",
    "scored_selective_cross_entropy_op",
    "scored_selective_cross_entropy_backward_op",
]

#: The one-program masked mean: 4096 lanes, 8 warps (16 B of mask and nll per thread per step).
_MEAN_BLOCK = 4096
_MEAN_WARPS = 8


# ============================================================================================== kernels
@triton.jit
def _lse_block(x, m, d_acc):
    """Fold one [ROWS, GROUP] float32 block into the running max m and the lanes of d = Σ 2^{u}."""
    m_new = tl.maximum(m, tl.max(tl.max(x, 1), 0))
    if m_new > m:
        c_new = _ref_of(m_new)
        c_old = tl.where(m > float("-inf"), m * 1.4426950408889634, c_new)
        d_acc = d_acc * tl.exp2(c_old - c_new)
        m = m_new
    c = _ref_of(m)
    d_acc += tl.sum(tl.exp2(tl.fma(x, 1.4426950408889634, -c)), 1)
    return m, d_acc


@triton.jit
def _selective_forward_kernel(
    x_ptr, t_ptr, sel_ptr, lse_in_ptr, nll_ptr, lse_out_ptr,
    V, T, stride_b, stride_t,
    HAS_LSE: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
):
    """Per row: nll (0 when not selected) and, without HAS_LSE, the lse of selected rows (0 elsewhere)."""
    i = tl.program_id(0).to(tl.int64)
    b = i // T
    row_ptr = x_ptr + b * stride_b + (i - b * T) * stride_t
    BLOCK: tl.constexpr = ROWS * GROUP
    sel = tl.load(sel_ptr + i)
    nll = tl.zeros([], tl.float32)
    lse = tl.zeros([], tl.float32)
    if sel != 0:
        tgt = tl.load(t_ptr + i)  # selected ⇒ valid and in range (checked by the launcher's mask)
        z_t = tl.load(row_ptr + tgt).to(tl.float32)
        if HAS_LSE:
            lse = tl.load(lse_in_ptr + i)
            nll = lse - z_t
        else:
            idx = tl.arange(0, ROWS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            m = tl.full([], float("-inf"), tl.float32)
            d_acc = tl.zeros([ROWS], tl.float32)
            n_full = V // BLOCK
            x_next = tl.load(row_ptr + idx, mask=n_full > 0, other=0.0, eviction_policy="evict_first")
            for blk in range(0, n_full):  # full blocks, next block requested before this one is reduced
                x = x_next
                x_next = tl.load(row_ptr + ((blk + 1) * BLOCK + idx), mask=blk + 1 < n_full, other=0.0,
                                 eviction_policy="evict_first")
                m, d_acc = _lse_block(x.to(tl.float32), m, d_acc)
            if n_full * BLOCK < V:
                cols = n_full * BLOCK + idx
                x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"),
                            eviction_policy="evict_first").to(tl.float32)
                m, d_acc = _lse_block(x, m, d_acc)
            c = _ref_of(m)
            log2d = tl.log2(tl.sum(d_acc, 0))
            lse = (c + log2d) * 0.6931471805599453
            nll = (log2d - tl.fma(z_t, 1.4426950408889634, -c)) * 0.6931471805599453
    tl.store(nll_ptr + i, nll)
    if not HAS_LSE:
        tl.store(lse_out_ptr + i, lse)


@triton.jit
def _masked_mean_kernel(mask_ptr, nll_ptr, loss_ptr, count_ptr, N, BLOCK: tl.constexpr):
    """One program: ``count = Σ mask``, ``loss = (Σ_{mask} nll) ⊘ max(1, count)`` (fixed summation order)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.int64)
    for start in range(0, N, BLOCK):
        idx = start + offs
        sel = tl.load(mask_ptr + idx, mask=idx < N, other=0) != 0
        nll = tl.load(nll_ptr + idx, mask=idx < N, other=0.0)   # independent of sel: one memory round trip
        acc += tl.where(sel, nll, 0.0)
        cnt += sel.to(tl.int64)
    count = tl.sum(cnt, 0)
    tl.store(loss_ptr, tl.math.div_rn(tl.sum(acc, 0), tl.maximum(count, 1).to(tl.float32)))
    tl.store(count_ptr, count)


# ============================================================================================ launchers
def launch_selective_forward(geom: RowGeometry, targets: torch.Tensor, selected: torch.Tensor,
                             lse: Optional[torch.Tensor], nll_out: torch.Tensor,
                             lse_out: Optional[torch.Tensor], config: Optional[LaunchConfig] = None) -> None:
    """Per-row nll into ``nll_out`` (float32 ``(N,)``); without ``lse`` also the lse into ``lse_out``.

    ``selected`` is uint8 ``(N,)`` and must only mark rows whose target is valid and in range;
    ``targets`` is contiguous int64 ``(N,)``; ``lse`` (when given) contiguous float32 ``(N,)``.
    """
    n = geom.n
    if n == 0:
        return
    has_lse = lse is not None
    if not has_lse and lse_out is None:
        raise ValueError("lse_out: a float32 (N,) buffer is needed when lse is not given")
    cfg = config if config is not None else lse_config(geom.vocab, geom.x.dtype)
    with device_guard(geom.x):
        _selective_forward_kernel[(n,)](
            geom.x, targets, selected, lse if has_lse else nll_out, nll_out, nll_out if has_lse else lse_out,
            geom.vocab, geom.seq_len, geom.stride_b, geom.stride_t,
            HAS_LSE=has_lse, ROWS=cfg.rows, GROUP=cfg.group, num_warps=cfg.num_warps,
        )


def launch_masked_mean(mask: torch.Tensor, nll: torch.Tensor, loss: torch.Tensor, count: torch.Tensor) -> None:
    """``count ← Σ mask`` (int64, one element) and ``loss ← Σ_{mask} nll / max(1, count)`` (float32, one element).

    ``mask`` is a contiguous bool/uint8 ``(N,)`` tensor, ``nll`` contiguous float32 ``(N,)``; one program sums in
    a fixed order (deterministic). Unselected entries of ``nll`` (NaN for non-finite rows) are never used.
    """
    n = mask.numel()
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8) or mask.dim() != 1 or not mask.is_contiguous():
        raise ValueError(f"mask: expected a contiguous 1-byte (N,) tensor, got {mask.dtype} {tuple(mask.shape)}")
    if nll.dtype != torch.float32 or tuple(nll.shape) != (n,) or not nll.is_contiguous():
        raise ValueError(f"nll: expected a contiguous float32 ({n},) tensor, got {nll.dtype} {tuple(nll.shape)}")
    if loss.dtype != torch.float32 or loss.numel() != 1 or count.dtype != torch.int64 or count.numel() != 1:
        raise ValueError("loss, count: expected one-element float32 and int64 tensors")
    with device_guard(mask):
        _masked_mean_kernel[(1,)](mask, nll, loss, count, n, BLOCK=_MEAN_BLOCK, num_warps=_MEAN_WARPS)


# ======================================================================================= autograd glue
def _check_token_floats(name: str, x: Any, token_shape: tuple[int, ...], device: torch.device) -> None:
    """An optional per-token float32 input (``lse``, ``row_weights``): the logits' leading shape and device."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError(f"{name}: expected a float32 tensor of shape {token_shape}, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if tuple(x.shape) != token_shape:
        raise ValueError(f"{name}: expected shape {token_shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")


def _save_geometry(ctx: Any, geom: RowGeometry, logits: torch.Tensor) -> None:
    """Keep the row geometry's host fields on ``ctx`` (the buffer itself goes through ``save_for_backward``)."""
    ctx.geom_meta = (geom.n, geom.vocab, geom.seq_len, geom.stride_b, geom.stride_t, geom.token_shape)
    ctx.logits_shape = tuple(logits.shape)


def _saved_geometry(ctx: Any, x: torch.Tensor) -> RowGeometry:
    """The :class:`RowGeometry` of the saved buffer ``x`` from :func:`_save_geometry`'s fields."""
    n, V, T, sb, st, token_shape = ctx.geom_meta
    return RowGeometry(x, n, V, T, sb, st, token_shape)


@torch.compiler.disable
def _eager_apply(fn: Any, *args: Any) -> torch.Tensor:
    """``fn.apply(*args)`` outside any compiled graph: the eager-only autograd functions (explicit launch shapes,
    in-place gradients) launch Triton directly, which the compiler must not trace; under ``torch.compile``
    this is a graph break (``fullgraph=True`` raises), never a traced kernel."""
    return fn.apply(*args)


def _gradient_buffer(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """Where the backward writes ``∂loss/∂logits``: the saved logits buffer itself (in place, once) or a new
    uninitialised buffer (every element is written by the kernel, so no fill)."""
    if not ctx.inplace_backward:
        return torch.empty(ctx.logits_shape, dtype=x.dtype, device=x.device)
    if ctx.backward_done:
        raise RuntimeError("inplace_backward=True: the logits buffer already holds the gradient; a second "
                           "backward (retain_graph=True) cannot recompute it")
    return x


def _gradient_written(ctx: Any, grad: torch.Tensor) -> None:
    """After an in-place backward: bump the logits' version counter, so that any other autograd node that saved
    them (or a view of them) raises "modified by an inplace operation" instead of reading the gradient."""
    if ctx.inplace_backward:
        ctx.backward_done = True
        torch.autograd.graph.increment_version(grad)


def _save_for_sparse_backward(ctx: Any, geom: RowGeometry, logits: torch.Tensor, saved: tuple[Any, ...],
                              bwd_config: Optional[LaunchConfig], inplace_backward: bool) -> None:
    """What both eager autograd functions keep for their sparse backward: ``geom.x`` (the logits or their
    unit-stride copy) then ``saved``, the geometry, the launch shape and the in-place state. No ``N·V`` buffer."""
    ctx.save_for_backward(geom.x, *saved)
    _save_geometry(ctx, geom, logits)
    ctx.bwd_config = bwd_config
    ctx.inplace_backward = inplace_backward
    ctx.backward_done = False


def _sparse_backward(ctx: Any, x: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor, lse: torch.Tensor,
                     scale: torch.Tensor, *, count: Optional[torch.Tensor] = None,
                     row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``∂loss/∂logits`` of both eager autograd functions (:func:`launch_selective_backward`'s ``scale``,
    ``count`` and ``row_weights``), written into a new buffer or, with ``inplace_backward``, the logits."""
    grad = _gradient_buffer(ctx, x)
    launch_selective_backward(_saved_geometry(ctx, x), targets, selected, lse, scale, grad, ctx.bwd_config,
                              count=count, row_weights=row_weights)
    _gradient_written(ctx, grad)
    return grad


def _selective_loss(geom: RowGeometry, targets: torch.Tensor, selected: torch.Tensor, lse: Optional[torch.Tensor],
                    row_weights: Optional[torch.Tensor], config: Optional[LaunchConfig]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse_out, denom)`` of the unfused loss, eager or custom op: ``lse_out`` the computed log-sum-exp
    when ``lse`` is None, else empty; ``denom`` the float32 divisor (``max(1, |S|)``, or 1 with
    ``row_weights``: SPEC §7.4/§8's ``Σ ω_i·nll_i``, unselected rows having ``nll = 0`` and ``ω = 0``)."""
    dev = geom.x.device
    nll = torch.empty((geom.n,), dtype=torch.float32, device=dev)
    if lse is None:
        lse_out = torch.empty((geom.n,), dtype=torch.float32, device=dev)
        launch_selective_forward(geom, targets, selected, None, nll, lse_out, config)
    else:
        lse_out = torch.empty((0,), dtype=torch.float32, device=dev)
        launch_selective_forward(geom, targets, selected, lse, nll, None, config)
    if row_weights is None:
        denom = torch.clamp(selected.sum(dtype=torch.int64), min=1).to(torch.float32)
        loss = nll.sum() / denom
    else:
        denom = torch.ones((), dtype=torch.float32, device=dev)
        loss = torch.where(selected != 0, nll * row_weights, torch.zeros_like(nll)).sum()
    return loss, lse_out, denom


class _SelectiveCrossEntropy(torch.autograd.Function):
    """``loss = Σ_{i∈S} nll_i / max(1, |S|)``; backward ``g·(softmax − onehot)/max(1, |S|)`` on S, 0 elsewhere.

    Inputs are prepared by :func:`selective_cross_entropy_triton` (int64 targets, uint8 ``selected`` that
    only marks rows with a valid in-range target, optional float32 ``lse``). Saved for backward: the logits
    (or their unit-stride copy), targets, ``selected``, the lse and ``max(1, |S|)`` - no ``N·V`` buffer.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                lse: Optional[torch.Tensor], inplace_backward: bool,
                fwd_config: Optional[LaunchConfig], bwd_config: Optional[LaunchConfig],
                row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        geom = row_geometry(logits.detach())
        loss, lse_out, denom = _selective_loss(geom, targets, selected, lse, row_weights, fwd_config)
        # geom.x is the logits or (non-unit last stride, never with inplace_backward) a contiguous copy.
        _save_for_sparse_backward(ctx, geom, logits, (targets, selected, lse_out if lse is None else lse, denom,
                                                      row_weights), bwd_config, inplace_backward)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, targets, selected, lse, denom, row_weights = ctx.saved_tensors
        nones = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        scale = (grad_loss.detach().to(torch.float32).reshape(1) / denom).contiguous()
        return (_sparse_backward(ctx, x, targets, selected, lse, scale, row_weights=row_weights),) + nones


def selective_cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                                   ignore_index: int = -100, lse: Optional[torch.Tensor] = None,
                                   inplace_backward: bool = False,
                                   forward_config: Optional[LaunchConfig] = None,
                                   backward_config: Optional[LaunchConfig] = None,
                                   row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean float32 cross-entropy over the selected tokens, with a sparse backward (see the module docstring).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)`` float32/float16/bfloat16/float64 on CUDA (CPU under
            ``TRITON_INTERPRET=1``); any strides (a non-unit last stride costs one copy).
        targets: integer tensor of shape ``logits.shape[:-1]``; values in ``[0, V)`` or ``ignore_index``
            (CPU: ``ValueError``; CUDA: device-side assertion; an out-of-range target is never read and its
            token is treated as not selected).
        mask: bool tensor of the token shape, the selection (SPEC §7). Tokens whose target is
            ``ignore_index`` are never in the loss, even when ``mask`` marks them.
        ignore_index: target value of a token without a target.
        lse: optional float32 tensor of the token shape holding each row's log-sum-exp (e.g.
            ``token_statistics_triton(...).lse``); then the forward reads only ``z[target]`` of the selected
            rows. Without it the forward streams each selected row once.
        inplace_backward: write the gradient into the logits buffer (SPEC §8.1: saves an ``N·V`` allocation,
            same traffic; the logits are overwritten, so no other autograd node may need them - one that saved
            them raises; one backward only; eager only, a graph break under ``torch.compile``). Needs logits
            that pass :func:`check_inplace_logits` (unit last stride, non-overlapping rows).
        forward_config, backward_config: optional launch shapes (default :func:`lse_config` /
            :func:`backward_config` of :mod:`cggr_torch.kernels.scoring`).
        row_weights: optional float32 tensor of the token shape (the ``sampled`` selection's ``w_i/max(1, n)``,
            SPEC §7.4): then the loss is ``Σ_{i∈S} row_weights_i·nll_i`` and row ``i``'s gradient is scaled by
            ``row_weights_i`` (no division by ``|S|``). None: the unweighted mean (the kernels unchanged).

    Returns:
        0-d float32 loss ``Σ_{i∈S} nll_i / max(1, |S|)`` (0.0 when nothing is selected), or the weighted sum.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``inplace_backward`` on a layout that cannot hold the
            gradient, or (CPU) out-of-range targets.
    """
    check_logits(logits)
    check_kernel_device(logits, "logits")
    check_targets(targets, logits)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    token_shape = tuple(logits.shape[:-1])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {token_shape}, got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != token_shape:
        raise ValueError(f"mask: expected shape {token_shape} (the leading dims of logits), got {tuple(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask: expected device {logits.device}, got {mask.device}")
    if lse is not None:
        _check_token_floats("lse", lse, token_shape, logits.device)
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
    V = logits.shape[-1]
    if inplace_backward:
        check_inplace_logits(logits)
    check_target_range(targets, V, ignore_index)

    t = flat_targets(targets)
    with torch.no_grad():
        readable = (t != ignore_index) & (t >= 0) & (t < V)
        selected = (mask.reshape(-1) & readable).to(torch.uint8).contiguous()
    if row_weights is not None:
        _check_token_floats("row_weights", row_weights, token_shape, logits.device)
        row_weights = row_weights.detach().reshape(-1).contiguous()
    lse_flat = None if lse is None else lse.detach().reshape(-1).contiguous()
    if inplace_backward or forward_config is not None or backward_config is not None:
        # Eager-only variants (a gradient written into the logits, explicit launch shapes): the autograd
        # function itself. The default goes through the custom ops below, which torch.compile sees through.
        return _eager_apply(_SelectiveCrossEntropy, logits, t, selected, lse_flat, inplace_backward,
                            forward_config, backward_config, row_weights)
    loss, _lse, _denom = selective_cross_entropy_op(logits, t, selected, lse_flat, row_weights)
    return loss


# ===================================================================== fused path (scores already computed)
class _ScoredSelectiveCrossEntropy(torch.autograd.Function):
    """The fused paths' loss on the scoring pass's statistics; backward as :class:`_SelectiveCrossEntropy`.

    Without ``loss_in``: ``loss = Σ_{i∈S} nll_i / max(1, |S|)`` (one program, ``|S|`` written to ``count``) and
    ``g/|S|`` is formed in the backward kernel from the device count. With ``loss_in`` (the ``sampled`` path's
    ``Σ ω_i·nll_i``, computed by its finish kernel) and ``row_weights``: the loss is that value and the gradient
    of row ``i`` is scaled by ``g·ω_i``. ``inplace_backward``: the gradient goes into the logits buffer.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, geom: RowGeometry, targets: torch.Tensor, selected: torch.Tensor,
                lse: torch.Tensor, nll: Optional[torch.Tensor], count: Optional[torch.Tensor],
                bwd_config: Optional[LaunchConfig], inplace_backward: bool = False,
                loss_in: Optional[torch.Tensor] = None, row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if loss_in is None:
            loss = torch.empty((), dtype=torch.float32, device=logits.device)
            launch_masked_mean(selected, nll, loss, count)
        else:   # a new tensor: the op's own output stays non-differentiable
            loss = loss_in.detach().reshape(()).clone()
        _save_for_sparse_backward(ctx, geom, logits, (targets, selected, lse, count, row_weights), bwd_config,
                                  inplace_backward)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, targets, selected, lse, count, row_weights = ctx.saved_tensors
        nones = (None,) * 10
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        # with row_weights the scale is g·ω_i; without, g/|S| is formed in the kernel from the device count
        grad = _sparse_backward(ctx, x, targets, selected, lse, g, count=None if row_weights is not None else count,
                                row_weights=row_weights)
        return (grad,) + nones


def _check_scored(logits: torch.Tensor, geom: RowGeometry, inplace_backward: bool,
                  flat: tuple[tuple[str, Optional[torch.Tensor], tuple[torch.dtype, ...]], ...]) -> None:
    """The checks shared by the fused paths' losses: ``(N,)`` contiguous per-row buffers on the logits'
    device, and for ``inplace_backward`` a logits layout that can hold the gradient with ``geom`` on it."""
    n = geom.n
    for name, t, dt in flat:
        if t is None or not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a contiguous {dt[0]} ({n},) tensor, got {type(t).__name__}")
        if t.dtype not in dt or tuple(t.shape) != (n,) or not t.is_contiguous() or t.device != logits.device:
            raise ValueError(f"{name}: expected a contiguous {dt[0]} ({n},) tensor on {logits.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
    if inplace_backward:
        check_inplace_logits(logits)
        if geom.x.data_ptr() != logits.data_ptr() or geom.x.stride() != logits.stride():
            raise ValueError("geom: inplace_backward=True needs the row geometry of logits.detach() itself "
                             "(kernels.scoring.row_geometry), not of a copy")


def scored_selective_cross_entropy(logits: torch.Tensor, geom: RowGeometry, targets: torch.Tensor,
                                   selected: torch.Tensor, lse: torch.Tensor, nll: torch.Tensor,
                                   count: torch.Tensor, *,
                                   backward_config: Optional[LaunchConfig] = None,
                                   inplace_backward: bool = False) -> torch.Tensor:
    """Selective cross-entropy whose per-row statistics come from the scoring kernel (the fused CGGR path).

    ::

        |S|  = Σ_i selected_i                      (written to ``count``)
        loss = Σ_{i∈S} nll_i / max(1, |S|)          (one program, fixed order: deterministic)
        ∂loss/∂z_i = g·(2^{(z_i − lse_i)·log2 e} − onehot(t_i)) / max(1, |S|)  for i ∈ S, 0 otherwise

    Nothing is re-read in the forward (``nll`` and ``lse`` are the scoring pass's); the backward is the sparse
    kernel of :func:`selective_cross_entropy_triton` with ``g/|S|`` formed on the device.

    Args:
        logits: the differentiable ``(B, T, V)`` / ``(N, V)`` logits (CUDA, or CPU under the interpreter).
        geom: :func:`cggr_torch.kernels.scoring.row_geometry` of ``logits.detach()`` (the scoring pass's).
        targets: contiguous int64 ``(N,)``.
        selected: contiguous bool/uint8 ``(N,)``; must only mark rows that are eligible (valid, in-range
            target, finite statistics) - the caller's selection guarantees it.
        lse, nll: contiguous float32 ``(N,)`` from the scoring kernel.
        count: int64 device tensor of one element; receives ``|S|``.
        backward_config: optional launch shape of the backward kernel.
        inplace_backward: write the gradient into the logits buffer (SPEC §8.1; eager only,
            one backward; ``logits`` must pass :func:`check_inplace_logits`).

    Returns:
        0-d float32 loss (0.0 when nothing is selected).
    """
    _check_scored(logits, geom, inplace_backward,
                  (("targets", targets, (torch.int64,)), ("selected", selected, (torch.bool, torch.uint8)),
                   ("lse", lse, (torch.float32,)), ("nll", nll, (torch.float32,))))
    if count.dtype != torch.int64 or count.numel() != 1 or count.device != logits.device:
        raise ValueError(f"count: expected an int64 one-element tensor on {logits.device}, got {count.dtype} "
                         f"{tuple(count.shape)} on {count.device}")
    if backward_config is not None or inplace_backward:
        return _eager_apply(_ScoredSelectiveCrossEntropy, logits, geom, targets, selected, lse, nll, count,
                            backward_config, inplace_backward)
    loss, c = scored_selective_cross_entropy_op(logits, targets, selected, lse, nll)
    count.copy_(c.reshape(count.shape))
    return loss


def weighted_selective_cross_entropy(logits: torch.Tensor, geom: RowGeometry, targets: torch.Tensor,
                                     selected: torch.Tensor, lse: torch.Tensor, row_weights: torch.Tensor,
                                     loss: torch.Tensor, *, backward_config: Optional[LaunchConfig] = None,
                                     inplace_backward: bool = False) -> torch.Tensor:
    """The weighted selective cross-entropy (SPEC §7.4, §8) whose value the caller has already computed: returns
    ``loss``'s value as a new 0-d float32 tensor whose gradient w.r.t. ``logits`` is

    ::

        ∂loss/∂z_i = g·ω_i·(2^{(z_i − lse_i)·log2 e} − onehot(t_i))   for i ∈ S,   0 otherwise

    (the ``sampled`` fused path's gradient, ``ω`` = ``row_weights``). It lets that path - whose loss comes from
    :func:`cggr_torch.kernels.sampled_loss.sample_from_scores` on the detached logits - write the gradient in place.

    Args:
        logits, geom, targets, selected, lse, backward_config, inplace_backward: as
            :func:`scored_selective_cross_entropy`.
        row_weights: contiguous float32 ``(N,)``, 0 on the unselected rows.
        loss: float32 one-element tensor, ``Σ_{i∈S} ω_i·nll_i`` (not differentiated).
    """
    _check_scored(logits, geom, inplace_backward,
                  (("targets", targets, (torch.int64,)), ("selected", selected, (torch.bool, torch.uint8)),
                   ("lse", lse, (torch.float32,)), ("row_weights", row_weights, (torch.float32,))))
    if not isinstance(loss, torch.Tensor) or loss.dtype != torch.float32 or loss.numel() != 1:
        raise ValueError(f"loss: expected a float32 one-element tensor, got "
                         f"{loss.dtype if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    return _eager_apply(_ScoredSelectiveCrossEntropy, logits, geom, targets, selected, lse, None, None,
                        backward_config, inplace_backward, loss, row_weights)


# ================================================================ torch.library custom ops (SPEC §12.1)
# The default forms of both losses as custom ops with fake implementations and a registered autograd formula
# (the backward is a custom op too), so that torch.compile sees through them without tracing a Triton launch.
@torch.library.custom_op("cggr::selective_cross_entropy", mutates_args=())
def selective_cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                               lse: Optional[torch.Tensor], row_weights: Optional[torch.Tensor]
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse_out, denom)`` on prepared inputs (flat int64 ``targets``, uint8 ``selected``, optional
    flat float32 ``lse`` / ``row_weights``); ``lse_out`` is the computed log-sum-exp when ``lse`` is None,
    else empty; ``denom`` the float32 divisor (``max(1, |S|)``, or 1 with ``row_weights``)."""
    return _selective_loss(row_geometry(logits.detach()), targets, selected, lse, row_weights, None)


@selective_cross_entropy_op.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor, lse: Optional[torch.Tensor],
      row_weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = targets.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return torch.empty((), **f32), torch.empty((n if lse is None else 0,), **f32), torch.empty((), **f32)


def _op_gradient(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor, lse: torch.Tensor,
                 scale: torch.Tensor, *, count: Optional[torch.Tensor] = None,
                 row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The custom ops' backward: a new gradient buffer (an op never writes its inputs), every element written
    by :func:`launch_selective_backward` (its ``scale``, ``count`` and ``row_weights``)."""
    grad = torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    launch_selective_backward(row_geometry(logits.detach()), targets, selected, lse, scale, grad, None, count=count,
                              row_weights=row_weights)
    return grad


@torch.library.custom_op("cggr::selective_cross_entropy_backward", mutates_args=())
def selective_cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                                        selected: torch.Tensor, lse: torch.Tensor, denom: torch.Tensor,
                                        row_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``∂loss/∂logits`` of :func:`selective_cross_entropy_op`: ``g·(softmax − onehot)/denom`` on the selected
    rows (times ``row_weights``), exact zeros elsewhere; the logits' shape and dtype."""
    scale = (grad_loss.detach().to(torch.float32).reshape(1) / denom).contiguous()
    return _op_gradient(logits, targets, selected, lse, scale, row_weights=row_weights)


@selective_cross_entropy_backward_op.register_fake
def _(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
      lse: torch.Tensor, denom: torch.Tensor, row_weights: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)


def _selective_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    logits, targets, selected, lse, row_weights = inputs
    _loss, lse_out, denom = output
    ctx.has_lse = lse is not None
    ctx.save_for_backward(logits, targets, selected, lse if lse is not None else lse_out, denom, row_weights)


def _selective_backward(ctx: Any, grad_loss: torch.Tensor, _g_lse: Any, _g_denom: Any) -> tuple[Any, ...]:
    logits, targets, selected, lse, denom, row_weights = ctx.saved_tensors
    grad = selective_cross_entropy_backward_op(grad_loss, logits, targets, selected, lse, denom, row_weights)
    return grad, None, None, None, None


selective_cross_entropy_op.register_autograd(_selective_backward, setup_context=_selective_setup_context)


@torch.library.custom_op("cggr::scored_selective_cross_entropy", mutates_args=())
def scored_selective_cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                                      lse: torch.Tensor, nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, count)`` of :func:`scored_selective_cross_entropy` (count: int64 ``(1,)``, ``|S|``)."""
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    count = torch.empty((1,), dtype=torch.int64, device=logits.device)
    launch_masked_mean(selected, nll, loss, count)
    return loss, count


@scored_selective_cross_entropy_op.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor, lse: torch.Tensor,
      nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((), dtype=torch.float32, device=logits.device),
            torch.empty((1,), dtype=torch.int64, device=logits.device))


@torch.library.custom_op("cggr::scored_selective_cross_entropy_backward", mutates_args=())
def scored_selective_cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor,
                                               targets: torch.Tensor, selected: torch.Tensor, lse: torch.Tensor,
                                               count: torch.Tensor) -> torch.Tensor:
    """``∂loss/∂logits`` of :func:`scored_selective_cross_entropy_op` (``g/|S|`` formed on the device)."""
    return _op_gradient(logits, targets, selected, lse, grad_loss.detach().to(torch.float32).reshape(1), count=count)


@scored_selective_cross_entropy_backward_op.register_fake
def _(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
      lse: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)


def _scored_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    logits, targets, selected, lse, _nll = inputs
    ctx.save_for_backward(logits, targets, selected, lse, output[1])


def _scored_backward(ctx: Any, grad_loss: torch.Tensor, _g_count: Any) -> tuple[Any, ...]:
    logits, targets, selected, lse, count = ctx.saved_tensors
    grad = scored_selective_cross_entropy_backward_op(grad_loss, logits, targets, selected, lse, count)
    return grad, None, None, None, None


scored_selective_cross_entropy_op.register_autograd(_scored_backward, setup_context=_scored_setup_context)
