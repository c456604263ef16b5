"""CGGR — Confidence-Gated Gradient Routing for JAX, optax and Flax NNX.

Train on the hardest tokens of each batch: score every token (entropy, top-2 margin, cross-entropy), keep a
curriculum-controlled fraction of them, and back-propagate only through those. ``SPEC.md`` is the contract;
every function here is pure, static-shaped, ``jax.jit``- and ``jax.grad``-compatible.

Quick start (Flax NNX)::

    loss_fn = cggr_jax.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=1000)
    tx = optax.chain(cggr_jax.advance_curriculum(), optax.adamw(3e-4))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, input_ids, labels):
        step = cggr_jax.current_step(optimizer.opt_state)
        def compute(model):
            logits, targets = cggr_jax.shift_for_causal_lm(model(input_ids), labels)
            return loss_fn(logits, targets, step)
        (loss, metrics), grads = nnx.value_and_grad(compute, has_aux=True)(model)
        optimizer.update(model, grads, cggr_metrics=metrics)
        return loss, metrics
"""
from cggr import SCORING_MODES, SELECTION_STRATEGIES, CGGRConfig, require

require("jax", package="cggr_jax", extra="jax")

from cggr_jax import curriculum, dispatch, integrations, loss, pipeline, scoring, selection, types, utils
from cggr_jax.curriculum import dynamic_ratio, linear_warmup_ratio, num_selected
from cggr_jax.integrations import CurriculumState, advance_curriculum, current_step, latest_metrics
from cggr_jax.loss import METRIC_KEYS, CGGRLoss, cggr_loss, metrics_to_dict
from cggr_jax.router import TruncatedRouter, create_truncated_router
from cggr_jax.scoring import difficulty_from_statistics, score_tokens, token_statistics
from cggr_jax.policy_gradient import policy_gradient_loss
from cggr_jax.selection import rank_tokens, select_tokens
from cggr_jax.token_stats import fused_linear_token_stats
from cggr_jax.types import SequenceSelection, TokenScores, TokenStatistics
from cggr_jax.utils import shift_for_causal_lm

__all__ = [
    "CGGRConfig",
    "curriculum",
    "dispatch",
    "integrations",
    "loss",
    "pipeline",
    "scoring",
    "selection",
    "types",
    "utils",
    "SCORING_MODES",
    "SELECTION_STRATEGIES",
    "METRIC_KEYS",
    "TokenStatistics",
    "TokenScores",
    "SequenceSelection",
    "token_statistics",
    "difficulty_from_statistics",
    "score_tokens",
    "linear_warmup_ratio",
    "dynamic_ratio",
    "num_selected",
    "rank_tokens",
    "select_tokens",
    "CGGRLoss",
    "cggr_loss",
    "metrics_to_dict",
    "CurriculumState",
    "advance_curriculum",
    "current_step",
    "latest_metrics",
    "shift_for_causal_lm",
    "TruncatedRouter",
    "create_truncated_router",
    "fused_linear_token_stats",
    "policy_gradient_loss",
]
