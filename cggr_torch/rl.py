r"""TRL ``GRPOTrainer`` with per-token log-probs, entropies and the entropy mask from CGGR's fused head (SPEC §14.5).

:class:`CGGRGRPOTrainer` is ``trl.GRPOTrainer`` with two methods replaced:

* ``_get_per_token_logps_and_entropies``: the base model's final hidden states go through
  :func:`cggr_torch.token_stats.fused_linear_token_stats` (temperature = the trainer's, no ``(B, T, V)``
  logits) instead of TRL's own head; the log-probs are differentiable and so is the entropy (TRL's entropy
  bonus). Every caller of the method - the policy, the old policy and the reference model - uses it.
* ``get_high_entropy_mask`` (``top_entropy_quantile = ρ < 1``): the SPEC §7.1 ``topk`` selection of
  ``k = num_selected(n, ρ)`` (SPEC §5.3) tokens by entropy over the completion tokens of the local batch (ties by
  lower flat index) instead of ``torch.quantile`` (``entropy ≥`` the interpolated quantile, gathered across
  processes): the same mask as :func:`cggr_torch.policy_gradient.policy_gradient_loss` would keep, and
  identical in PyTorch and JAX.

TRL then computes its own loss (any of its ``loss_type``\ s, importance sampling, KL, ...) from these tensors:
with ``top_entropy_quantile = 1`` the loss and gradients equal TRL's own path within float rounding
(``tests/torch/test_trl_grpo.py``). This integration saves the logits, not the backward of the masked tokens
(TRL multiplies their loss by 0): the backward that touches the LM head for the kept rows only is
:func:`cggr_torch.policy_gradient.policy_gradient_loss`.

Limits (``ValueError``): vision-language inputs, MoE auxiliary losses, and models whose logits are not
``hidden · Wᵀ + b`` (soft-capped or scaled heads: SPEC §9's head check, :func:`cggr_torch.causal_lm.hf_base_and_head`).
Tested with ``trl==1.16.0`` (whose own ``GRPOTrainer`` head is already chunked, ``trl.trainer.utils.add_fused_lm_head``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .causal_lm import hf_base_and_head
from .fused_linear import DEFAULT_MEMORY_BUDGET
from .selection import select_tokens
from .token_stats import fused_linear_token_stats

try:  # trl is optional (it pulls in datasets, pyarrow and pandas)
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError("cggr_torch.rl needs trl (pip install trl; tested with trl 1.16.0)") from err

__all__ = ["CGGRGRPOTrainer", "fused_per_token_logps_and_entropies"]

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def fused_per_token_logps_and_entropies(model: torch.nn.Module, input_ids: torch.Tensor,
                                        attention_mask: torch.Tensor, logits_to_keep: int, *,
                                        temperature: float = 1.0, compute_entropy: bool = False,
                                        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
                                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(logps, entropies)`` of the last ``logits_to_keep`` tokens of ``input_ids`` (``(B, logits_to_keep)``,
    float32; 0 where ``attention_mask`` is 0), as TRL's ``_get_per_token_logps_and_entropies`` returns them, from
    the base model's hidden states and :func:`cggr_torch.token_stats.fused_linear_token_stats`.

    The prediction of token ``t`` is the hidden state at ``t − 1`` (the causal shift), divided by
    ``temperature``; under ``torch.autocast`` the head runs in the autocast dtype, as ``nn.Linear`` would.
    """
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) \
            or not 1 <= logits_to_keep < input_ids.shape[1]:
        raise ValueError(f"logits_to_keep: expected an integer in [1, {input_ids.shape[1]}), got {logits_to_keep!r}")
    with torch.autocast(device_type=input_ids.device.type, enabled=False):   # the head check is float32
        base, head = hf_base_and_head(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    hidden = out[0] if hidden is None else hidden
    hidden = hidden[:, -logits_to_keep - 1:-1]
    weight, bias = head.weight, head.bias
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    keep = attention_mask[:, -logits_to_keep:] != 0
    targets = input_ids[:, -logits_to_keep:].masked_fill(~keep, -100)
    need = ("logprob", "entropy") if compute_entropy else ("logprob",)
    stats = fused_linear_token_stats(hidden, weight, targets, bias, need=need, temperature=temperature,
                                     memory_budget_bytes=memory_budget_bytes)
    entropy = None
    if compute_entropy:
        entropy = torch.where(keep, stats.entropy, torch.zeros_like(stats.entropy))
    return stats.logprob, entropy


class CGGRGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs, entropies and entropy mask come from CGGR (module
    docstring). ``cggr_memory_budget_bytes``: the working-memory bound of the fused head (default 0.25 GiB)."""

    def __init__(self, *args: Any, cggr_memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, **kwargs: Any) -> None:
        self.cggr_memory_budget_bytes = int(cggr_memory_budget_bytes)
        super().__init__(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        used = sorted(k for k in _MULTIMODAL if kwargs.get(k) is not None)
        if used or compute_aux_loss:
            raise ValueError(f"model: CGGRGRPOTrainer supports text-only models without auxiliary losses, got "
                             f"{used or ['compute_aux_loss']}")
        model = self.accelerator.unwrap_model(model)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            with self.accelerator.autocast():
                lp, ent = fused_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep,
                    temperature=self.temperature, compute_entropy=compute_entropy,
                    memory_budget_bytes=self.cggr_memory_budget_bytes)
            logps.append(lp)
            if compute_entropy:
                entropies.append(ent)
        return torch.cat(logps, dim=0), (torch.cat(entropies, dim=0) if compute_entropy else None), None

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """The ``topk`` selection (SPEC §7.1) of ``1 − threshold`` of the completion tokens by entropy."""
        ratio = 1.0 - float(threshold)
        eligible = mask.bool() & torch.isfinite(entropies)
        kept, _ = select_tokens(entropies.detach().float(), eligible, ratio, selection="topk")
        return kept
