"""How the kernel launchers take their inputs: the device a launch runs on and how it addresses the rows.

:func:`check_kernel_device` (CUDA, or CPU under the Triton interpreter), :func:`device_guard` (the tensor's
device current for a launch), :class:`RowGeometry` / :func:`row_geometry` (64-bit row offsets of a ``(B, T, V)``
or ``(N, V)`` tensor, any strides) and :func:`flat_targets`: shared by every kernel module of
:mod:`cggr_torch.kernels` (and re-exported by :mod:`cggr_torch.kernels.scoring`, their first home). The scalar
arguments of the selection and the sampler: :func:`ratio_argument`, :func:`int_argument` (a host number or a
one-element tensor, :func:`scalar_argument`). Imports ``torch``, NumPy, ``cggr.config``,
:mod:`cggr_torch.utils`, :mod:`cggr_torch.kernels.launch` and the standard library.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch

from cggr.config import is_int

from ..utils import check_ratio_value
from .launch import interpreting

__all__ = ["check_kernel_device", "device_guard", "RowGeometry", "row_geometry", "flat_targets", "scalar_argument",
           "ratio_argument", "int_argument", "check_chunk", "check_row_vectors", "check_colsum"]


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


# ===================================================================================== scalar arguments
def scalar_argument(value: torch.Tensor, name: str, device: torch.device, *, floating: bool) -> Optional[
        torch.Tensor]:
    """A one-element tensor argument (dtype, size and device checked): the flat tensor when it lives on the
    kernel's device (read by the kernel; under the interpreter that is the CPU), None for a CPU tensor while
    the kernel runs on a GPU (the caller reads it on the host: no synchronisation)."""
    kind = "floating" if floating else "integer"
    if value.numel() != 1 or value.dtype.is_floating_point != floating or value.dtype == torch.bool:
        raise ValueError(f"{name}: expected a one-element {kind} tensor, got dtype {value.dtype} and shape "
                         f"{tuple(value.shape)}")
    if value.device == device:
        return value.reshape(1)
    if value.device.type == "cpu":
        return None
    raise ValueError(f"{name}: expected a tensor on {device} or the CPU, got one on {value.device}")


def ratio_argument(ratio: Union[torch.Tensor, float, np.floating], device: torch.device) -> Union[float,
                                                                                                   torch.Tensor]:
    """The ``ratio`` of a kernel entry point (SPEC §5.3; the selection and the sampler): a host value in
    ``(0, 1]`` (checked now) as a float32-rounded float, or a one-element float tensor, returned flat when it
    lives on the kernel's ``device`` (the kernels read it and round it to float32; a value outside ``(0, 1]``
    clears their ``ok`` slot) and read on the host otherwise. A CPU tensor is also checked now, like the
    reference's ``num_selected`` (reading it does not synchronise), except while compiling with CPU kernels
    (the interpreter), where a read would be a graph break and the ``ok`` slot checks it instead."""
    if isinstance(ratio, torch.Tensor):
        on_device = scalar_argument(ratio, "ratio", device, floating=True)
        # reading a CPU tensor does not synchronise; a compiled call on CPU (the interpreter) checks it in the
        # kernel instead (the ok slot, torch._assert_async): a read would be a graph break
        if ratio.device.type == "cpu" and not (torch.compiler.is_compiling() and on_device is not None):
            check_ratio_value("ratio", ratio)
        if on_device is not None:
            return on_device
    return float(np.float32(check_ratio_value("ratio", ratio)))


def int_argument(value: Union[int, torch.Tensor], name: str, device: torch.device) -> Union[int, torch.Tensor]:
    """The sampler's ``step`` or ``k``: a host integer ``>= 0`` or a one-element integer tensor (see
    :func:`scalar_argument`); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor):
        on_device = scalar_argument(value, name, device, floating=False)
        return on_device if on_device is not None else int(value.reshape(()))
    if not is_int(value) or int(value) < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return int(value)


# The in-place chunk epilogues (the fused head's chunk gradient, the token-stats gradient) share their buffers'
# contract: a (K, C) logits chunk overwritten in place, per-row vectors, per-row-block column sums.
def check_chunk(z: torch.Tensor, v0: int) -> tuple[int, int]:
    """``(K, C)`` of a logits chunk ``z`` (2-D float32/float16/bfloat16, unit column stride, rows that do not
    overlap, on a kernel device) and a host ``v0 ≥ 0``; ``ValueError`` naming the argument otherwise."""
    check_kernel_device(z, "z")
    if z.dim() != 2 or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"z: expected a 2-D float32/float16/bfloat16 tensor, got {z.dtype} {tuple(z.shape)}")
    K, C = z.shape
    if C > 1 and z.stride(1) != 1:
        raise ValueError(f"z: expected a unit stride along the columns, got strides {z.stride()}")
    if K > 1 and z.stride(0) < C:
        raise ValueError(f"z: rows overlap (row stride {z.stride(0)} < {C} columns)")
    if not isinstance(v0, int) or isinstance(v0, bool) or v0 < 0:
        raise ValueError(f"v0: expected a host integer >= 0, got {v0!r}")
    return K, C


def check_row_vectors(z: torch.Tensor, **vectors: tuple[Any, torch.dtype]) -> None:
    """Each ``name=(tensor, dtype)`` is a contiguous ``(K,)`` tensor of that dtype on ``z``'s device."""
    K = z.shape[0]
    for name, (t, dt) in vectors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != (K,) or not t.is_contiguous() \
                or t.device != z.device:
            raise ValueError(f"{name}: expected a contiguous {dt} ({K},) tensor on {z.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def check_colsum(colsum: Optional[torch.Tensor], z: torch.Tensor, block_rows: int) -> None:
    """``colsum`` is None or a contiguous float32 ``(ceil(K / block_rows), C)`` tensor on ``z``'s device."""
    if colsum is None:
        return
    want = (-(-z.shape[0] // block_rows), z.shape[1])
    if colsum.dtype != torch.float32 or tuple(colsum.shape) != want or not colsum.is_contiguous() \
            or colsum.device != z.device:
        raise ValueError(f"colsum: expected a contiguous float32 {want} tensor on {z.device}, got "
                         f"{colsum.dtype} {tuple(colsum.shape)}")

