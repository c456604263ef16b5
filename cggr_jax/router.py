"""Routers of CGGR batch splitting in JAX (SPEC §9): the truncated router of a :class:`cggr_jax.models.DecoderLM`
and the choice of how its tokens are scored (:func:`resolve_router_path`: from its final hidden states through
the fused head, or from its logits).

The scorer that turns a router's output into a sequence selection (:func:`cggr_jax.scorer.select_sequences`,
:class:`cggr_jax.scorer.BatchSplitConfig`, ...) is in :mod:`cggr_jax.scorer`, the head-linearity rule and the
DecoderLM's fused loss in :mod:`cggr_jax.causal_lm`; their names stay importable from here.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from cggr_jax import models, utils
# Re-exported (their home since the split is cggr_jax.causal_lm, which does not import this module).
from cggr_jax.causal_lm import (
    HEAD_TOLERANCE,
    check_linear_head,
    decoder_lm_cggr_loss,
    decoder_lm_hidden_states,
    forget_head_checks,
    head_weight,
    linear_head_logits,
)
from cggr_jax.types import SequenceSelection

__all__ = [
    "ROUTER_PATHS",
    "ROUTER_MEMORY_BUDGET",
    "TruncatedRouter",
    "create_truncated_router",
    "resolve_router_path",
    # re-exported from cggr_jax.causal_lm
    "HEAD_TOLERANCE",
    "check_linear_head",
    "forget_head_checks",
    "head_weight",
    "linear_head_logits",
    "decoder_lm_hidden_states",
    "decoder_lm_cggr_loss",
    # re-exported from cggr_jax.scorer, loaded on first use below
    "BatchSplitConfig",
    "SequenceSelection",
    "check_labels_and_mask",
    "sequence_difficulty",
    "check_shifted_labels",
    "shifted_targets",
    "select_sequences",
    "select_sequences_fused",
    "select_from_scores",
    "score_sequences",
    "selection_info",
]

#: How the router's tokens are scored (:attr:`BatchSplitConfig.router_path`): ``"fused"`` runs the router to
#: its final normed hidden states (``DecoderLM.hidden_states``) and scores the LM head block by block with
#: :func:`cggr_jax.fused_linear.fused_linear_scores` (the ``(B, T, V)`` float32 logits never exist);
#: ``"logits"`` scores ``model.router_logits(...)``; ``"auto"`` takes ``"fused"`` whenever
#: :func:`resolve_router_path` allows it.
ROUTER_PATHS: tuple[str, ...] = ("auto", "fused", "logits")

#: Default working memory (bytes) of the fused router's logit blocks: 1 GiB (the router runs before the main
#: pass, whose activations set the step's peak).
ROUTER_MEMORY_BUDGET: int = 2**30

#: Names that moved to :mod:`cggr_jax.scorer`, which imports this module (the router paths and budget of
#: :class:`~cggr_jax.scorer.BatchSplitConfig`): resolved lazily (PEP 562) so that
#: ``from cggr_jax.router import select_sequences`` keeps working without an import cycle.
_SCORER_NAMES = ("BatchSplitConfig", "check_labels_and_mask", "sequence_difficulty", "check_shifted_labels",
                 "shifted_targets", "select_sequences", "select_sequences_fused", "select_from_scores",
                 "score_sequences", "selection_info")


def __getattr__(name: str) -> Any:
    if name in _SCORER_NAMES:
        from cggr_jax import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_router_path(model: Any, router_path: str) -> tuple[str, str]:
    """``(path, reason)``: ``"fused"`` or ``"logits"`` for ``model`` under ``router_path`` (SPEC-neutral: both
    give the same scores up to matmul rounding) and a sentence saying why.

    ``"fused"`` needs a :class:`cggr_jax.models.DecoderLM` whose head passes :func:`check_linear_head` (its
    logits are a plain linear map of ``hidden_states``). Any other model only promises ``router_logits``.

    Raises:
        ValueError: an unknown ``router_path``; ``"fused"`` for a model that cannot take it; ``"fused"`` or
            ``"auto"`` for a ``DecoderLM`` whose logits are not its linear head's (the head-linearity rule).
    """
    utils.check_choice(router_path, "router_path", ROUTER_PATHS)
    if router_path == "logits":
        return "logits", "router_path='logits' was requested"
    if isinstance(model, models.DecoderLM) and callable(getattr(model, "hidden_states", None)):
        check_linear_head(model)
        return "fused", ("DecoderLM: plain linear head, scored from the router's final hidden states without "
                         "materialising its (B, T, V) logits")
    reason = (f"{type(model).__name__} is not a cggr_jax.models.DecoderLM: only its router_logits are known, "
              f"not a plain linear head over hidden states")
    if router_path == "fused":
        raise ValueError(f"router_path: 'fused' is not possible: {reason}; use 'auto' or 'logits'")
    return "logits", reason


# ---------------------------------------------------------------------------------------------- routers
class TruncatedRouter(nnx.Module):
    """A view of a :class:`DecoderLM`: its embedding, first ``num_layers`` blocks, final norm and head.

    The sub-modules are the model's own objects (NNX shared references), so the router holds no parameter
    copies and always sees the model's current weights; ``router(ids) == model.router_logits(ids, n)``.
    """

    def __init__(self, model: models.DecoderLM, num_layers: int) -> None:
        models.check_num_layers(num_layers, model.config)
        self.model = model
        self.num_layers = num_layers

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.model.router_logits(input_ids, self.num_layers, attention_mask)


def create_truncated_router(model: models.DecoderLM, num_layers: int = 4) -> TruncatedRouter:
    """The JAX counterpart of ``cggr_torch.create_truncated_router``: a router sharing ``model``'s weights."""
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model must be a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    return TruncatedRouter(model, num_layers)
