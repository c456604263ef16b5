"""Batch splitting's main pass (SPEC §9, §9.2, §9.4): how :class:`cggr_torch.batch_split.CGGRModel` hands the kept
rows to the model and reads its answer.

* the labels the model sees (:func:`effective_labels`: every ignored or padding position set to
  :data:`HF_IGNORE_INDEX`);
* the static batch sizes of SPEC §9.4 (:func:`default_buckets`, :func:`check_buckets`, and
  :func:`is_compiled_module`, the test of ``buckets='auto'``);
* the model's forward signature and output (:func:`forward_parameters`, :func:`output_loss`,
  :func:`output_logits`);
* the next-token loss of a model that returns only logits (:func:`next_token_loss`) and SPEC §9.2's weighted
  one for ``selection='sampled'`` (:func:`weighted_next_token_loss`), in float32.

PyTorch only (the JAX batch split is a jitted step with its own static sizes, ``cggr_jax.batch_split``).
:mod:`cggr_torch.batch_split` re-exports the names of its public API (``HF_IGNORE_INDEX``, ``default_buckets``,
``effective_labels``, ``is_compiled_module``).
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["HF_IGNORE_INDEX", "effective_labels", "default_buckets", "check_buckets", "is_compiled_module",
           "forward_parameters", "output_loss", "output_logits", "next_token_loss", "weighted_next_token_loss"]

#: The Hugging Face label value that the models' own losses ignore.
HF_IGNORE_INDEX = -100


def output_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The loss of a model output: ``.loss``, ``['loss']`` or a 0-d first element of a tuple (None when there is
    none)."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor) \
            and outputs[0].dim() == 0:
        loss = outputs[0]
    return loss if isinstance(loss, torch.Tensor) else None


def output_logits(outputs: Any) -> Optional[torch.Tensor]:
    """The logits of a model output without a loss: the tensor itself, ``.logits``, ``['logits']`` or the first
    element of a tuple (None when there is none)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    return logits if isinstance(logits, torch.Tensor) else None


def forward_parameters(model: nn.Module) -> tuple[bool, bool, bool]:
    """Which of ``input_ids`` (by keyword), ``attention_mask`` and ``labels`` the model's forward accepts: a
    logits-only module such as ``forward(self, x)`` gets ``input_ids`` positionally and no labels."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):   # torch.compile(model): the original module's forward is the one called
        model = orig
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):   # no introspectable signature: assume the Hugging Face one
        return True, True, True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True, True, True
    return "input_ids" in params, "attention_mask" in params, "labels" in params


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True,
                    ignore_index: int = HF_IGNORE_INDEX) -> torch.Tensor:
    """Mean float32 cross-entropy of ``logits`` ``(B, T, V)`` against ``labels`` ``(B, T)`` over the targets that
    are not ``ignore_index``; with ``shift`` (causal LM, SPEC §1) ``logits[:, :-1]`` predict ``labels[:, 1:]``.
    0 when no target is valid (divided by ``max(count, 1)``, so the count never has to reach the host)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = labels.reshape(-1)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(torch.float32), flat,
                                              ignore_index=ignore_index, reduction="sum")
    return total / torch.clamp((flat != ignore_index).sum(), min=1).to(torch.float32)


def weighted_next_token_loss(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor, *,
                              shift: bool = True, ignore_index: int = HF_IGNORE_INDEX) -> torch.Tensor:
    """SPEC §9.2: ``Σ_b ω_b · Σ_t ce_{b,t}`` (float32) of ``logits`` ``(k, T, V)`` against ``labels`` ``(k, T)``
    with row weights ``ω`` ``(k,)``; ignored targets contribute 0 (shifted as in :func:`next_token_loss`)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(torch.float32),
                                           labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return (ce.reshape(labels.shape).sum(dim=1) * row_weights).sum()


_DEFAULT_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


def default_buckets(batch_size: int) -> tuple[int, ...]:
    """SPEC §9.4: ``sorted{⌈B·f⌉ : f ∈ (1/8, 1/4, 3/8, 1/2, 3/4, 1)}`` (each ``≥ 1``), at most 6 sizes, as
    ``cggr_jax.batch_split.default_buckets``."""
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return tuple(sorted({max(1, math.ceil(batch_size * f)) for f in _DEFAULT_FRACTIONS}))


def is_compiled_module(model: Any) -> bool:
    """True for a ``torch.compile``d module (an ``OptimizedModule``) or one that called ``.compile()``: the models
    whose main pass ``CGGRModel(buckets='auto')`` pads to static bucket sizes (SPEC §9.4)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) or \
        getattr(model, "_compiled_call_impl", None) is not None


def check_buckets(buckets: Any) -> Any:
    """``'auto'``, None, a callable, or a tuple of integers ``>= 1`` (the upper bound ``B`` is checked per call)."""
    if buckets is None or (isinstance(buckets, str) and buckets == "auto"):
        return buckets
    if isinstance(buckets, str):
        raise ValueError(f"buckets: expected 'auto', None, a sequence of integers >= 1 or a callable "
                         f"batch_size -> sizes, got {buckets!r}")
    if callable(buckets):
        return buckets
    try:
        values = tuple(buckets)
    except TypeError as err:
        raise ValueError(f"buckets: expected 'auto', None, a sequence of integers >= 1 or a callable "
                         f"batch_size -> sizes, got {buckets!r}") from err
    for b in values:
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 1:
            raise ValueError(f"buckets: expected integers >= 1, got {b!r} in {buckets!r}")
    return tuple(int(b) for b in values)


def effective_labels(labels: torch.Tensor, attention_mask: Optional[torch.Tensor], ignore_index: int,
                     out_ignore_index: int = HF_IGNORE_INDEX) -> torch.Tensor:
    """``labels`` with every ignored position (``labels == ignore_index`` or ``attention_mask == 0``) set to
    ``out_ignore_index`` (the Hugging Face ``-100`` by default, what the models' own losses ignore)."""
    drop = labels == ignore_index
    if attention_mask is not None:
        drop = drop | (attention_mask == 0)
    return labels.masked_fill(drop, out_ignore_index)
