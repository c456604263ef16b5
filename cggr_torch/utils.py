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

import weakref
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cggr import CONFIG_FIELDS, SCORING_MODES, SELECTION_STRATEGIES, CGGRConfig, check_label_dtype_range
import cggr

__all__ = [
    "FLOAT_DTYPES",
    "shift_for_causal_lm",
    "check_logits",
    "check_targets",
    "check_target_range",
    "check_scoring",
    "check_selection",
    "check_ratio_value",
    "widen_labels",
    "resolve_config",
    "check_batch",
    "HEAD_RTOL",
    "HEAD_PROBE_TOKENS",
    "HEAD_RTOL_TF32",
    "head_linearity_reason",
    "check_linear_head",
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
    Inside ``torch.compile`` (any device): ``torch._assert_async`` (a ``RuntimeError`` naming the argument).
    """
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    msg = (f"{name}: every value must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")
    if targets.device.type == "cuda" or torch.compiler.is_compiling():
        # Under torch.compile a value cannot raise ValueError without a graph break: an assertion instead
        # (RuntimeError with this message when the compiled call runs; SPEC §12.1).
        torch._assert_async(torch.logical_not(bad.any()), msg)
        return
    if bool(bad.any()):
        first = targets[bad].reshape(-1)[0]
        raise ValueError(f"{msg}; found {int(bad.sum())} value(s) outside, e.g. {int(first)}")


def check_scoring(scoring: Any) -> None:
    """``scoring`` must be one of :data:`cggr.SCORING_MODES` (SPEC §3)."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring: expected one of {SCORING_MODES}, got {scoring!r}")


def check_selection(selection: Any) -> None:
    """``selection`` must be one of :data:`cggr.SELECTION_STRATEGIES` (SPEC §7)."""
    if selection not in SELECTION_STRATEGIES:
        raise ValueError(f"selection: expected one of {SELECTION_STRATEGIES}, got {selection!r}")


def check_ratio_value(name: str, value: Any) -> float:
    """A host number in ``(0, 1]`` (SPEC §5.1); returns it as a Python float. A CPU floating 0-d tensor is
    accepted too (:func:`cggr.check_ratio_value` with the tensor case)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating scalar in (0, 1], got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type != "cpu":
            raise ValueError(f"{name}: expected a host number in (0, 1]; a {value.device} tensor would need a "
                             f"device synchronisation to check")
        value = float(value)
    return cggr.check_ratio_value(name, value)


def widen_labels(labels: torch.Tensor, ignore_index: int, name: str = "targets") -> torch.Tensor:
    """The label-dtype rule of SPEC §1 (:func:`cggr.check_label_dtype_range`): an integer dtype that cannot
    hold ``ignore_index`` is refused (``uint8`` labels with ``-100`` would turn the marker into token 156);
    unsigned dtypes are widened to int64 so that every later comparison sees their true values.

    ``uint64`` is refused: int64 cannot hold all its values, and a wrapped value could equal ``ignore_index``.
    Returns ``labels`` itself for signed dtypes (no copy).
    """
    dtype = labels.dtype
    if dtype == torch.uint64:
        raise ValueError(f"{name}: dtype torch.uint64 is not supported (int64 cannot hold all of its values); "
                         f"pass int64 labels")
    info = torch.iinfo(dtype)
    check_label_dtype_range(name, str(dtype), int(info.min), int(info.max), int(ignore_index))
    if info.min == 0:
        return labels.to(torch.int64)
    return labels


def resolve_config(config: Any, settings: dict[str, Any], defaults: CGGRConfig = CGGRConfig()) -> CGGRConfig:
    """The one :class:`cggr.CGGRConfig` of an entry point: ``config`` when given, else one built from the
    keyword ``settings`` (validated once, by ``CGGRConfig``). Giving ``config`` together with settings that
    differ from ``defaults`` is a ``ValueError`` (which one would win is not obvious)."""
    if config is None:
        return CGGRConfig(**settings)
    if not isinstance(config, CGGRConfig):
        raise ValueError(f"config: expected None or a cggr.CGGRConfig, got {type(config).__name__}")
    changed = sorted(k for k, v in settings.items() if k in CONFIG_FIELDS and v != getattr(defaults, k))
    if changed:
        raise ValueError(f"config: pass either config= or the settings {changed}, not both")
    return config


def check_batch(input_ids: Any, labels: Any, attention_mask: Any, *, labels_required: bool = True) -> None:
    """Static checks of a batch (no device work): 2-D integer ``input_ids`` ``(B, T)`` with ``B >= 1``;
    ``labels`` integer of the same shape; ``attention_mask`` integer or bool of the same shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D (batch, seq_len) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
                         f" (a single sequence must be given as shape (1, T))")
    if not is_integer_dtype(input_ids.dtype):
        raise ValueError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if input_ids.shape[0] < 1:
        raise ValueError(f"input_ids: expected at least one sequence, got shape {tuple(input_ids.shape)}")
    if labels is None:
        if labels_required:
            raise ValueError("labels: required (a (B, T) integer tensor; use ignore_index for positions without a "
                             "target)")
    else:
        if not isinstance(labels, torch.Tensor) or not is_integer_dtype(labels.dtype):
            raise ValueError(f"labels: expected an integer tensor, got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} (that of input_ids), got "
                             f"{tuple(labels.shape)}")
        if labels.device != input_ids.device:
            raise ValueError(f"labels: expected device {input_ids.device} (that of input_ids), got {labels.device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or not (
                is_integer_dtype(attention_mask.dtype) or attention_mask.dtype == torch.bool):
            raise ValueError(f"attention_mask: expected an integer or bool tensor, got "
                             f"{attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), got "
                             f"{tuple(attention_mask.shape)}; 4-D custom masks are not supported by batch "
                             f"splitting")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask: expected device {input_ids.device}, got {attention_mask.device}")


#: Relative tolerance of the head-linearity rule by the lowest precision involved: the model's head rounds
#: its output to that dtype (float32 accumulation), the rule's reference is computed in float32.
HEAD_RTOL: Mapping[torch.dtype, float] = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2,
                                          torch.bfloat16: 3e-2}
#: Tokens of the synthetic probe sequence of :func:`check_linear_head`.
HEAD_PROBE_TOKENS = 8
#: The float32 tolerance when float32 matmuls may run in TF32 (``torch.backends.cuda.matmul.allow_tf32`` or
#: a ``float32_matmul_precision`` other than ``"highest"``): the model's head and the rule's reference then
#: round their inputs to 10-bit mantissas in different orders. A transform that moves the logits by less is
#: below the precision the model computes its own logits with.
HEAD_RTOL_TF32 = 5e-3


# ----------------------------------------------------------------------------------- head-linearity rule
def head_linearity_reason(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> Optional[str]:
    """The head-linearity rule on given rows: None when ``logits`` equal ``hidden · weightᵀ + bias`` within
    the tolerance of the lowest precision involved (:data:`HEAD_RTOL`, relative to the largest reference
    logit), else why not. Non-finite entries must sit at the same places in both."""
    expected = F.linear(hidden.detach().to(torch.float32), weight.detach().to(torch.float32),
                        None if bias is None else bias.detach().to(torch.float32))
    got = logits.detach().to(torch.float32)
    if tuple(got.shape) != tuple(expected.shape):
        return (f"its logits have shape {tuple(got.shape)}, hidden @ lm_head.weight.T has "
                f"{tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(got)):
        return "its logits are not finite where hidden @ lm_head.weight.T (+ bias) is (or the reverse)"
    if not bool(finite.any()):
        return None
    rtol = max(HEAD_RTOL.get(dt, 1e-4) for dt in (logits.dtype, hidden.dtype, weight.dtype))
    if torch.float32 in (logits.dtype, weight.dtype) and logits.device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        rtol = max(rtol, HEAD_RTOL_TF32)
    scale = float(expected[finite].abs().max())
    err = float((got[finite] - expected[finite]).abs().max())
    if err <= rtol * scale + 1e-6:
        return None
    return (f"its logits are not hidden @ lm_head.weight.T (+ bias): they differ by up to {err:.3g} (tolerance "
            f"{rtol * scale + 1e-6:.3g} at |logit| <= {scale:.3g}), so a post-head transform (scaling, capping, "
            f"soft-capping) is applied; the fused path would compute another loss - use CGGRLoss on the "
            f"model's logits (or router_path='logits') instead")


#: model → ((id of head, weight, bias), reason) of the last check (the check runs once per head).
_HEAD_CHECKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int, int], Optional[str]]]" = \
    weakref.WeakKeyDictionary()


def check_linear_head(model: nn.Module, head: nn.Linear,
                      probe: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Optional[str]:
    """THE head-linearity rule of both the router's fused path and the fused LM head (no list of names).

    The model is an argument like any other: this is its check (used by :mod:`cggr_torch.router` and
    :func:`cggr_torch.causal_lm.hf_causal_lm_cggr_loss`).

    On first use with ``head`` (and again whenever the model's head, weight or bias object changes),
    ``probe(input_ids)`` runs the model at hand on a synthetic sequence of :data:`HEAD_PROBE_TOKENS` tokens and
    returns ``(its own logits, the final hidden states the head receives)``; the rule
    (:func:`head_linearity_reason`) compares the logits with ``hidden · Wᵀ + b``. The probe runs with dropout
    off (every sub-module's training flag is restored afterwards) and autocast off. Returns None (linear) or
    the reason; the result is cached per model and head.
    """
    key = (id(head), id(head.weight), id(head.bias))
    cached = _HEAD_CHECKS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    vocab = int(head.weight.shape[0])
    ids = (torch.arange(HEAD_PROBE_TOKENS, device=head.weight.device) * 7 + 3).remainder(vocab).reshape(1, -1)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=head.weight.device.type, enabled=False):
            logits, hidden = probe(ids)
    finally:
        for m, flag in flags:
            m.training = flag
    reason = head_linearity_reason(logits, hidden, head.weight, head.bias)
    _HEAD_CHECKS[model] = (key, reason)
    return reason
