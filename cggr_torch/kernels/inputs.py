"""How the kernel launchers take their inputs: the device a launch runs on and how it addresses the rows.

:func:`check_kernel_device` (CUDA, or CPU under the Triton interpreter), :func:`device_guard` (the tensor's
device current for a launch), :class:`RowGeometry` / :func:`row_geometry` (64-bit row offsets of a ``(B, T, V)``
or ``(N, V)`` tensor, any strides) and :func:`flat_targets`: shared by every kernel module of
:mod:`cggr_torch.kernels` (and re-exported by :mod:`cggr_torch.kernels.scoring`, their first home). Imports only
``torch``, :mod:`cggr_torch.kernels.launch` and the standard library.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .launch import interpreting

__all__ = ["check_kernel_device", "device_guard", "RowGeometry", "row_geometry", "flat_targets"]


def check_kernel_device(tensor: torch.Tensor, name: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and interpreting():
        return
    raise ValueError(f"{name}: the Triton kernels need a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), "
                     f"got a tensor on {tensor.device}; use cggr_torch.scoring.token_statistics for the reference")


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's CUDA device current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


class RowGeometry(NamedTuple):
    """How the kernels address the rows of a ``(B, T, V)`` or ``(N, V)`` tensor.

    Row ``i`` (the flat token index) is ``b = i // T``, ``t = i − b·T`` and starts at element
    ``b·stride_b + t·stride_t`` of ``x`` (64-bit in the kernels); columns have unit stride.
    """

    x: torch.Tensor
    n: int
    vocab: int
    seq_len: int
    stride_b: int
    stride_t: int
    token_shape: tuple[int, ...]


def row_geometry(logits: torch.Tensor) -> RowGeometry:
    """Addressing of validated ``logits``; a tensor whose last dimension is not unit-stride is copied once."""
    V = logits.shape[-1]
    x = logits if (logits.stride(-1) == 1 or V == 1) else logits.contiguous()
    token_shape = tuple(logits.shape[:-1])
    if logits.dim() == 2:
        n = logits.shape[0]
        return RowGeometry(x, n, V, max(1, n), 0, x.stride(0), token_shape)
    B, T = logits.shape[0], logits.shape[1]
    return RowGeometry(x, B * T, V, max(1, T), x.stride(0), x.stride(1), token_shape)


def flat_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets as a contiguous int64 ``(N,)`` tensor (a copy only when needed)."""
    return targets.reshape(-1).to(torch.int64).contiguous()
