"""A Hugging Face causal LM's CGGR loss through the fused LM head: the ``(B, T, V)`` logits never exist.

:func:`hf_base_and_head` finds the model's base model and ``nn.Linear`` head and checks them by SPEC §9's
head-linearity rule (:func:`cggr_torch.utils.check_linear_head`); :func:`hf_causal_lm_cggr_loss` runs the base
model, shifts the labels (SPEC §1) and calls :class:`cggr_torch.fused_linear.FusedLinearCGGRLoss` on the final
hidden states. ``cggr_torch.integrations.apply_cggr`` and ``cggr_torch.rl`` build on them. The JAX
counterpart for ``cggr_jax.models.DecoderLM`` is ``cggr_jax.causal_lm.decoder_lm_cggr_loss``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .fused_linear import FusedLinearCGGRLoss, describe
from .scoring import check_reference_nll
from .utils import check_linear_head, check_target_range, is_integer_dtype, widen_labels

__all__ = ["hf_base_and_head", "hf_causal_lm_cggr_loss"]


def hf_base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A Hugging Face causal LM's base model and ``nn.Linear`` LM head, checked by SPEC §9's head-linearity rule
    (its logits must be ``hidden · Wᵀ + b``); ``ValueError`` naming ``model`` otherwise. Shared by
    :func:`hf_causal_lm_cggr_loss` and ``cggr_torch.integrations.apply_cggr``."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"model: expected a Hugging Face *ForCausalLM with a base model (model.base_model), got "
                         f"{type(model).__name__}")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: expected get_output_embeddings() to return an nn.Linear LM head, got "
                         f"{type(head).__name__}")

    def probe(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=input_ids).logits
        out = base(input_ids=input_ids)
        hidden = getattr(out, "last_hidden_state", None)
        return logits, (out[0] if hidden is None else hidden)

    reason = check_linear_head(model, head, probe)
    if reason is not None:
        raise ValueError(f"model: {reason}")
    return base, head


def hf_causal_lm_cggr_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           loss_module: FusedLinearCGGRLoss, attention_mask: Optional[torch.Tensor] = None,
                           reference_nll: Optional[torch.Tensor] = None, **model_kwargs: Any) -> torch.Tensor:
    """CGGR loss of a Hugging Face causal LM without materialising its ``(B, T, V)`` logits.

    Runs the base model (``model.base_model``, e.g. ``model.model`` of a Llama) to get the final hidden states
    ``(B, T, d)``, takes the output embedding ``model.get_output_embeddings()`` (an ``nn.Linear``; tied
    embeddings are the same parameter) and calls ``loss_module(hidden, weight, shifted_labels, bias)`` where
    ``shifted_labels[:, t] = labels[:, t + 1]`` and the last position gets ``ignore_index`` (SPEC §1: the
    prediction at ``t`` is scored against token ``t + 1``; the last position has no target). Shifting the
    labels instead of slicing the hidden states avoids copying them. A position whose next token is padding
    (``attention_mask[:, t + 1] == 0``) is ignored as well (the convention of SPEC §9); ``attention_mask`` and
    ``model_kwargs`` are passed to the base model.

    ``reference_nll`` (``scoring='excess'`` only, SPEC §3.1) is aligned like the unshifted ``labels``, shape
    ``(B, T)``: ``reference_nll[b, t]`` is the reference model's loss of predicting ``labels[b, t]``. It is
    shifted exactly as the labels are (``reference_nll[:, 0]`` is never read; the last position has no target).

    The head's kernel is ``loss_module.head_kernel`` (``FusedLinearCGGRLoss(head_kernel=...)``, SPEC §12;
    :func:`cggr_torch.integrations.apply_cggr` passes its ``head_kernel=`` there): the module is the one holder
    of the head's settings, so this function takes no second ``head_kernel`` that could contradict it.

    Returns the float32 loss; metrics via ``loss_module.get_metrics()``; call ``loss_module.step()`` after
    each optimizer step.

    Raises:
        ValueError: ``loss_module`` not a :class:`FusedLinearCGGRLoss`, a model without a base model or linear
            output embedding, a model whose logits are not ``hidden · Wᵀ + b`` (scaling, capping or
            soft-capping after the head: the numeric rule :func:`cggr_torch.router.check_linear_head`, run once
            per model and head), or bad ``input_ids``/``labels``.
    """
    if not isinstance(loss_module, FusedLinearCGGRLoss):
        raise ValueError(f"loss_module: expected a cggr_torch.fused_linear.FusedLinearCGGRLoss, got "
                         f"{type(loss_module).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or not is_integer_dtype(input_ids.dtype):
        raise ValueError(f"input_ids: expected an integer (B, T) tensor, got {describe(input_ids)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape) \
            or not is_integer_dtype(labels.dtype):
        raise ValueError(f"labels: expected an integer tensor of shape {tuple(input_ids.shape)} (that of "
                         f"input_ids), got {describe(labels)}")
    # Checked against the unshifted labels (the caller's alignment) before the model runs.
    reference_nll = check_reference_nll(reference_nll, loss_module.config.scoring, tuple(labels.shape),
                                        device=labels.device)
    base, head = hf_base_and_head(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    ignore = loss_module.ignore_index
    # The caller passed labels: the dtype rule and range errors name them (the loss would say targets).
    labels = widen_labels(labels, ignore, name="labels")
    check_target_range(labels, head.weight.shape[0], ignore, name="labels")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore)], dim=1)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(labels.shape):
            raise ValueError(f"attention_mask: expected None or a tensor of shape {tuple(labels.shape)}, got "
                             f"{describe(attention_mask)}")
        pad_next = torch.cat([attention_mask[:, 1:] == 0, torch.ones_like(attention_mask[:, :1], dtype=torch.bool)],
                             dim=1)
        shifted = shifted.masked_fill(pad_next, ignore)
    if reference_nll is not None:   # shifted as the labels; the last position's value is never read (ignored)
        reference_nll = torch.cat([reference_nll[:, 1:], torch.zeros_like(reference_nll[:, :1])], dim=1)
    return loss_module(hidden, head.weight, shifted, head.bias, reference_nll)
