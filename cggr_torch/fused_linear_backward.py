r"""The fused LM head's backward (SPEC §8 on the selected rows): ``Σ_{i∈S} nll_i / max(1, |S|)`` as an autograd
function whose gradient recomputes the logits of the ``K = |S|`` selected rows only, vocabulary chunk by
vocabulary chunk, and the float32 accumulation helpers it uses.

The algorithm, its matmul cost and its memory plan are described in :mod:`cggr_torch.fused_linear` (the
forward, which computes the statistics, the selection and the loss value, and calls
:class:`SelectedRowsCrossEntropy` eagerly or :func:`selected_rows_cross_entropy_op` under ``torch.compile``).
Split from it so that each module holds one pass; the names are re-exported there.

With ``head_gemm`` (``head_kernel="gemm"`` of the forward, kernel devices only) each chunk's logits and
gradient come from one Triton GEMM whose epilogue writes ``G`` directly
(:func:`cggr_torch.kernels.fused_head_gemm.launch_head_gradient`), instead of a cuBLAS matmul writing ``Z`` and
the in-place pass turning it into ``G``; the two backward matmuls stay cuBLAS.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch
from .kernels.launch import plan_chunks

__all__ = [
    "SelectedRowsCrossEntropy",
    "selected_rows_cross_entropy_op",
    "gradient_kernel_for",
    "accumulates_in_place",
    "accumulate_matmul",
]

_GRADIENT_KERNEL_MODULE = "cggr_torch.kernels.fused_linear"
#: The GEMM-epilogue kernels of ``head_kernel="gemm"`` (imported by the forward, which decided to use them).
_HEAD_GEMM_MODULE = "cggr_torch.kernels.fused_head_gemm"
_MIXED_ADDMM: dict[tuple[str, torch.dtype], Optional[str]] = {}


# ================================================================================ accumulation helpers
def gradient_kernel_for(hidden: torch.Tensor) -> Optional[Any]:
    """The Triton chunk-gradient module for ``hidden``'s device and dtype, or None (PyTorch element-wise ops).

    None on non-kernel devices, with ``CGGR_DISABLE_KERNELS=1``, for float64 and when Triton is absent; a
    kernel error is raised by the launch, never replaced.
    """
    if not dispatch.use_kernels(hidden) or hidden.dtype == torch.float64:
        return None
    launch = dispatch.kernel("launch_chunk_gradient")
    if launch is None:
        return None
    return importlib.import_module(_GRADIENT_KERNEL_MODULE)


def _mixed_addmm_mode(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """How ``acc_fp32 + a @ b`` runs for ``a, b`` of ``dtype`` here without rounding the product to ``dtype``.

    ``"inplace"``: ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` - cuBLAS' float32-output GEMM
    accumulating into ``acc`` itself (no copy of ``acc``, no second accumulator); ``"functional"``: the same
    without ``out=`` (PyTorch first copies ``acc`` into a new result); None: neither (older builds, other
    backends). PyTorch ≥ 2.8 exposes the float32-output GEMM for float16/bfloat16 inputs on CUDA; probed once
    per (device type, dtype) on a 2 × 2 problem, result checked.
    """
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        mode: Optional[str] = None
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            a = torch.ones((2, 2), dtype=dtype, device=device)
            try:
                c = torch.ones((2, 2), dtype=torch.float32, device=device)
                r = torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                if r.data_ptr() == c.data_ptr() and bool((c == 3).all()):
                    mode = "inplace"
            except (TypeError, RuntimeError, NotImplementedError):
                pass
            if mode is None:
                try:
                    c = torch.ones((2, 2), dtype=torch.float32, device=device)
                    if bool((torch.addmm(c, a, a, out_dtype=torch.float32) == 3).all()):
                        mode = "functional"
                except (TypeError, RuntimeError, NotImplementedError):
                    pass
        _MIXED_ADDMM[key] = mode
    return _MIXED_ADDMM[key]


def accumulates_in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`accumulate_matmul` needs no second ``K × d`` buffer (see :func:`plan_chunks`)."""
    return dtype in (torch.float32, torch.float64) or _mixed_addmm_mode(device, dtype) == "inplace"


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with ``acc`` float32 (float64 for float64 inputs): the product is not rounded to the
    inputs' dtype before the sum where the backend offers a float32-output GEMM (``∂h_S`` over vocab chunks);
    in place where it can accumulate into ``acc`` itself."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    mode = _mixed_addmm_mode(a.device, a.dtype)
    if mode == "inplace":
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if mode == "functional":
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.add_(a @ b)


# ============================================================================================ autograd
class SelectedRowsCrossEntropy(torch.autograd.Function):
    """``loss = Σ_{i∈mask} nll_i / denom`` whose backward recomputes only the selected rows' logits (the eager form;
    :func:`selected_rows_cross_entropy_op` is the compiled one)."""

    @staticmethod
    def forward(ctx: Any, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                nll: torch.Tensor, mask: torch.Tensor, safe_targets: torch.Tensor, lse: torch.Tensor,
                count: torch.Tensor, vocab_chunk: Optional[int], memory_budget_bytes: int,
                head_gemm: bool = False) -> torch.Tensor:
        denom = torch.clamp(count, min=1).to(torch.float32)
        loss = torch.where(mask, nll, torch.zeros_like(nll)).sum() / denom
        ctx.save_for_backward(hidden2d, weight, bias, mask, safe_targets, lse, denom)
        if count.device.type == "cuda":
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            ctx.count_host = (host, event)
        else:
            ctx.count_host = (count, None)
        ctx.vocab_chunk = vocab_chunk
        ctx.memory_budget_bytes = memory_budget_bytes
        ctx.head_gemm = bool(head_gemm)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        hidden2d, weight, bias, mask, safe_targets, lse, denom = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rest = (None,) * 8
        if not (need_h or need_w or need_b):
            return (None, None, None) + rest
        host, event = ctx.count_host
        if event is not None:
            event.synchronize()  # waits for the forward's count copy only, not for the queued backward work
        grad_h, grad_w, grad_b = _selected_rows_backward(
            grad_loss, hidden2d, weight, bias, mask, safe_targets, lse, denom, int(host), ctx.vocab_chunk,
            ctx.memory_budget_bytes, need_h, need_w, need_b, ctx.head_gemm)
        return (grad_h, grad_w, grad_b) + rest


def _selected_rows_backward(grad_loss: torch.Tensor, hidden2d: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], mask: torch.Tensor, safe_targets: torch.Tensor,
                            lse: torch.Tensor, denom: torch.Tensor, K: int, vocab_chunk: Optional[int],
                            memory_budget_bytes: int, need_h: bool, need_w: bool, need_b: bool,
                            head_gemm: bool = False
                            ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The backward of the selected rows (see the module docstring) with ``K = |S|`` known on the host;
    ``head_gemm``: each chunk's ``G`` from the GEMM-epilogue kernel (the caller checked it applies)."""
    N, d = hidden2d.shape
    V = weight.shape[0]
    dtype = hidden2d.dtype
    dev = hidden2d.device
    grad_h = torch.zeros_like(hidden2d) if need_h else None
    grad_w = (torch.zeros_like(weight) if K == 0 else torch.empty_like(weight)) if need_w else None
    grad_b32 = torch.zeros((V,), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                           device=dev) if need_b else None
    if K > 0:
        with torch.autocast(device_type=dev.type, enabled=False):
            # Selected rows in increasing index order, without a second synchronisation.
            idx = torch.sort(mask.to(torch.int8), descending=True, stable=True).indices[:K]
            h_sel = hidden2d.index_select(0, idx)
            t_sel = safe_targets.index_select(0, idx)
            lse_sel = lse.index_select(0, idx).unsqueeze(1)
            scale = grad_loss.detach().to(torch.float32).reshape(()) / denom
            chunk = vocab_chunk
            gemm = importlib.import_module(_HEAD_GEMM_MODULE) if head_gemm else None
            kernel = None if head_gemm else gradient_kernel_for(hidden2d)
            if chunk is None:
                # The epilogue kernel holds one K × C chunk of G in the inputs' dtype, as the in-place pass.
                chunk = plan_chunks(N, d, V, dtype, selected_rows=K,
                                    memory_budget_bytes=memory_budget_bytes,
                                    gradient_kernel=kernel is not None or head_gemm,
                                    inplace_accumulation=accumulates_in_place(dev, dtype)).vocab_chunk
            acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            acc_h = torch.zeros((K, d), dtype=acc_dtype, device=dev) if need_h else None
            if kernel is not None or head_gemm:
                lse_rows = lse_sel.reshape(-1).contiguous()
                scale_dev = scale.reshape(1)
            if head_gemm:
                g_buf = torch.empty((K, min(chunk, V)), dtype=dtype, device=dev)  # reused by every chunk
            for v0 in range(0, V, chunk):
                v1 = min(V, v0 + chunk)
                w_c = weight[v0:v1]
                if head_gemm:
                    # One GEMM: the chunk's logits stay in registers, its epilogue writes G (and ∂b's sums).
                    g_c = g_buf[:, :v1 - v0]
                    colsum = None
                    if need_b:
                        colsum = torch.empty((gemm.colsum_rows(K, dtype, dev), v1 - v0), dtype=torch.float32,
                                             device=dev)
                    gemm.head_gradient_op(h_sel, w_c, None if bias is None else bias[v0:v1].contiguous(),
                                          lse_rows, t_sel, v0, scale_dev, g_c, colsum)
                    if need_b:
                        grad_b32[v0:v1] = colsum.sum(dim=0)
                    if need_h:
                        acc_h = accumulate_matmul(acc_h, g_c, w_c)
                    if need_w:
                        torch.mm(g_c.t(), h_sel, out=grad_w[v0:v1])
                    del g_c
                    continue
                z = F.linear(h_sel, w_c, None if bias is None else bias[v0:v1])
                if kernel is not None:
                    # One pass, in place: z becomes G in the inputs' dtype (float32 arithmetic).
                    colsum = None
                    if need_b:
                        colsum = torch.empty((-(-K // kernel.CHUNK_BLOCK_ROWS), v1 - v0),
                                             dtype=torch.float32, device=dev)
                    kernel.launch_chunk_gradient(z, lse_rows, t_sel, v0, scale_dev, colsum)
                    if need_b:
                        grad_b32[v0:v1] = colsum.sum(dim=0)
                    g_c = z
                    del z  # only g_c may hold the chunk, or two chunks coexist at the next F.linear
                else:
                    g = z.to(torch.float32)
                    del z
                    g.sub_(lse_sel).exp_()
                    hit = (t_sel >= v0) & (t_sel < v1)
                    col = torch.clamp(t_sel - v0, 0, v1 - v0 - 1).unsqueeze(1)
                    g.scatter_add_(1, col, -hit.to(torch.float32).unsqueeze(1))
                    g.mul_(scale)
                    if need_b:
                        grad_b32[v0:v1] = g.sum(dim=0)
                    g_c = g.to(dtype)
                    del g
                if need_h:
                    acc_h = accumulate_matmul(acc_h, g_c, w_c)
                if need_w:
                    torch.mm(g_c.t(), h_sel, out=grad_w[v0:v1])
                del g_c
            if need_h:
                grad_h.index_copy_(0, idx, acc_h.to(dtype))
    grad_b = grad_b32.to(bias.dtype) if need_b else None
    return grad_h, grad_w, grad_b


# The compiled form (SPEC §12.1): the same loss as custom ops with a registered autograd formula. The
# backward needs K on the host to size its buffers; inside the op it reads the count (one synchronisation
# per backward on CUDA, where the eager autograd function waits only for a pinned copy made in the forward).
@torch.library.custom_op("cggr::selected_rows_cross_entropy", mutates_args=())
def selected_rows_cross_entropy_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   nll: torch.Tensor, mask: torch.Tensor, safe_targets: torch.Tensor,
                                   lse: torch.Tensor, count: torch.Tensor, vocab_chunk: int,
                                   memory_budget_bytes: int, head_gemm: bool = False) -> torch.Tensor:
    """``Σ_{i∈mask} nll_i / max(1, count)`` (float32 0-d); its gradient is the selected-rows backward
    (``head_gemm``: with the GEMM-epilogue gradient kernel)."""
    denom = torch.clamp(count, min=1).to(torch.float32)
    return torch.where(mask, nll, torch.zeros_like(nll)).sum() / denom


@selected_rows_cross_entropy_op.register_fake
def _(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], nll: torch.Tensor,
      mask: torch.Tensor, safe_targets: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, vocab_chunk: int,
      memory_budget_bytes: int, head_gemm: bool = False) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=nll.device)


@torch.library.custom_op("cggr::selected_rows_cross_entropy_backward", mutates_args=())
def selected_rows_cross_entropy_backward_op(
        grad_loss: torch.Tensor, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        mask: torch.Tensor, safe_targets: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, vocab_chunk: int,
        memory_budget_bytes: int, need_h: bool, need_w: bool, need_b: bool, head_gemm: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂h, ∂W, ∂b)`` of :func:`selected_rows_cross_entropy_op`; a gradient that is not needed (or the
    bias's without a bias) is an empty tensor."""
    denom = torch.clamp(count, min=1).to(torch.float32)
    K = int(count)  # sizes the gathered rows: read on the host (see above)
    g_h, g_w, g_b = _selected_rows_backward(grad_loss, hidden2d, weight, bias, mask, safe_targets, lse, denom, K,
                                            vocab_chunk or None, memory_budget_bytes, need_h, need_w,
                                            need_b and bias is not None, head_gemm)
    empty = hidden2d.new_empty((0,))
    return (g_h if g_h is not None else empty, g_w if g_w is not None else empty,
            g_b if g_b is not None else empty)


@selected_rows_cross_entropy_backward_op.register_fake
def _(grad_loss: torch.Tensor, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
      mask: torch.Tensor, safe_targets: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, vocab_chunk: int,
      memory_budget_bytes: int, need_h: bool, need_w: bool, need_b: bool, head_gemm: bool = False
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    empty = hidden2d.new_empty((0,))
    return (torch.empty_like(hidden2d) if need_h else empty, torch.empty_like(weight) if need_w else empty,
            torch.empty_like(bias) if need_b and bias is not None else hidden2d.new_empty((0,)))


def _selected_rows_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    hidden2d, weight, bias, _nll, mask, safe_targets, lse, count, vocab_chunk, budget, *gemm = inputs
    ctx.save_for_backward(hidden2d, weight, bias, mask, safe_targets, lse, count)
    ctx.vocab_chunk, ctx.memory_budget_bytes = vocab_chunk, budget
    ctx.head_gemm = bool(gemm[0]) if gemm else False


def _selected_rows_grad(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    hidden2d, weight, bias, mask, safe_targets, lse, count = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g_h, g_w, g_b = selected_rows_cross_entropy_backward_op(
        grad_loss, hidden2d, weight, bias, mask, safe_targets, lse, count, ctx.vocab_chunk,
        ctx.memory_budget_bytes, need_h, need_w, bool(need_b and bias is not None), ctx.head_gemm)
    return ((g_h if need_h else None), (g_w if need_w else None),
            (g_b if need_b and bias is not None else None)) + (None,) * 8


selected_rows_cross_entropy_op.register_autograd(_selected_rows_grad, setup_context=_selected_rows_setup_context)
