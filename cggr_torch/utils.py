"""Shared helpers of ``cggr_torch``: the causal-LM shift and the argument checks (SPEC §1, §5.1, §11).

Every check raises :class:`ValueError` naming the offending argument and what was expected. Checks of
*shapes and dtypes* are static (no device work). The *range* check of the targets needs their values:

* CPU tensors are checked eagerly (``ValueError``);
* CUDA tensors get a device-side assertion (``torch._assert_async``) so that a training step never waits for
  the device; a failing assertion aborts the CUDA context at the next synchronisation point with the message
  given here. Out-of-range targets are never used as an index either way (the statistics and the loss
  replace every target that is ignored or out of range by 0 before any gather);
* any other device is checked eagerly (this reads the values back to the host).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "FLOAT_DTYPES",
    "shift_for_causal_lm",
    "check_logits",
    "check_targets",
    "check_target_range",
    "check_scoring",
    "check_selection",
    "check_ratio_value",
    "check_config",
    "is_integer_dtype",
]

#: Logit dtypes accepted by every function (float64 is computed in float32, SPEC §1).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the integer dtypes (signed or unsigned); ``bool`` is not an integer dtype here."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's logits with its labels (SPEC §1).

    A causal LM returns at position ``t`` the distribution of token ``t + 1``, so the loss pairs
    ``logits[:, t]`` with ``labels[:, t + 1]``::

        (logits[:, :-1], labels[:, 1:])          shapes (B, T-1, V) and (B, T-1)

    The last position of each sequence has no target and is dropped. Returns views (no copy).

    Args:
        logits: ``(B, T, V)`` floating tensor.
        labels: ``(B, T)`` integer tensor.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"logits: expected a (B, T, V) tensor, got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"labels: expected a (B, T) tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])} (the leading dims of logits "
                         f"{tuple(logits.shape)}), got {tuple(labels.shape)}")
    return logits[:, :-1], labels[:, 1:]


def check_logits(logits: Any) -> None:
    """``logits`` must be a ``(B, T, V)`` or ``(N, V)`` float32/float16/bfloat16/float64 tensor with V >= 1."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape (B, T, V) or (N, V), got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits: expected dtype float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits: the vocabulary dimension V must be >= 1, got shape {tuple(logits.shape)}")


def check_targets(targets: Any, logits: torch.Tensor, name: str = "targets") -> None:
    """``targets`` must be an integer tensor whose shape is ``logits.shape[:-1]``, on the same device."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(targets).__name__}")
    if not is_integer_dtype(targets.dtype):
        raise ValueError(f"{name}: expected an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name}: expected shape {tuple(logits.shape[:-1])} (the leading dims of logits "
                         f"{tuple(logits.shape)}), got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"{name}: expected device {logits.device} (that of logits), got {targets.device}")


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets") -> None:
    """Targets must lie in ``[0, V)`` or equal ``ignore_index`` (SPEC §1, §11).

    CPU: ``ValueError`` now. CUDA: ``torch._assert_async`` (no host synchronisation). Other devices: eager.
    """
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    msg = (f"{name}: every value must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")
    if targets.device.type == "cuda":
        torch._assert_async(torch.logical_not(bad.any()), msg)
        return
    if bool(bad.any()):
        first = targets[bad].reshape(-1)[0]
        raise ValueError(f"{msg}; found {int(bad.sum())} value(s) outside, e.g. {int(first)}")


def check_scoring(scoring: Any) -> None:
    from .scoring import SCORING_MODES

    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring: expected one of {SCORING_MODES}, got {scoring!r}")


def check_selection(selection: Any) -> None:
    from .selection import SELECTION_STRATEGIES

    if selection not in SELECTION_STRATEGIES:
        raise ValueError(f"selection: expected one of {SELECTION_STRATEGIES}, got {selection!r}")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_ratio_value(name: str, value: Any) -> float:
    """A host number in ``(0, 1]`` (SPEC §5.1); returns it as a Python float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating scalar in (0, 1], got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type != "cpu":
            raise ValueError(f"{name}: expected a host number in (0, 1]; a {value.device} tensor would need a "
                             f"device synchronisation to check")
        value = float(value)
    elif not _is_real(value):
        raise ValueError(f"{name}: expected a number in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a number in (0, 1], got {value}")
    return value


def check_config(*, scoring: Any = "combined", selection: Any = "topk", dynamic_threshold: Any = True,
                 threshold_sensitivity: Any = 0.5, min_tokens_ratio: Any = 0.25, warmup_steps: Any = 1000,
                 num_strata: Any = 4, min_tokens_per_sequence: Any = 1, ignore_index: Any = -100) -> None:
    """The constructor checks of SPEC §5.1 (and the names of §3, §7)."""
    check_scoring(scoring)
    check_selection(selection)
    if not isinstance(dynamic_threshold, bool):
        raise ValueError(f"dynamic_threshold: expected a bool, got {type(dynamic_threshold).__name__}")
    if not _is_real(threshold_sensitivity) or not math.isfinite(float(threshold_sensitivity)) \
            or float(threshold_sensitivity) < 0:
        raise ValueError(f"threshold_sensitivity: expected a finite number >= 0, got {threshold_sensitivity!r}")
    check_ratio_value("min_tokens_ratio", min_tokens_ratio)
    if not _is_int(warmup_steps) or int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
    if not _is_int(num_strata) or int(num_strata) < 1:
        raise ValueError(f"num_strata: expected an integer >= 1, got {num_strata!r}")
    if not _is_int(min_tokens_per_sequence) or int(min_tokens_per_sequence) < 0:
        raise ValueError(f"min_tokens_per_sequence: expected an integer >= 0, got {min_tokens_per_sequence!r}")
    if not _is_int(ignore_index):
        raise ValueError(f"ignore_index: expected an integer, got {ignore_index!r}")
