"""CGGR (Confidence-Gated Gradient Routing) for PyTorch: cross-entropy over the hardest tokens.

The contract is ``SPEC.md``; the names mirror ``cggr_jax`` (``CONTRIBUTING.md``). CUDA tensors use the Triton
kernels of :mod:`cggr_torch.kernels` when they import; set ``CGGR_DISABLE_KERNELS=1`` to force the pure-PyTorch
reference everywhere (:mod:`cggr_torch.dispatch` decides, and ``dispatch.force(...)`` overrides it for a block).
"""
from cggr import CGGRConfig, require

require("torch", package="cggr_torch", extra="torch")


from . import dispatch
from .batch_split import CGGRModel
from .curriculum import dynamic_ratio, linear_warmup_ratio, num_selected
from .loss import METRIC_KEYS, CGGRLoss, cggr_loss
from .router import PassthroughRouter, TruncatedRouter, create_truncated_router
from .scorer import CGGRScorer
from .scoring import SCORING_MODES, difficulty_from_statistics, score_tokens, token_statistics
from .policy_gradient import policy_gradient_loss
from .selection import SELECTION_STRATEGIES, rank_tokens, select_tokens
from .token_stats import fused_linear_token_stats
from .types import SequenceSelection, TokenScores, TokenStatistics
from .utils import shift_for_causal_lm

__all__ = [
    "CGGRConfig",
    "dispatch",
    "CGGRLoss",
    "cggr_loss",
    "METRIC_KEYS",
    "SCORING_MODES",
    "SELECTION_STRATEGIES",
    "TokenScores",
    "TokenStatistics",
    "SequenceSelection",
    "token_statistics",
    "difficulty_from_statistics",
    "score_tokens",
    "linear_warmup_ratio",
    "dynamic_ratio",
    "num_selected",
    "rank_tokens",
    "select_tokens",
    "shift_for_causal_lm",
    "CGGRModel",
    "CGGRScorer",
    "PassthroughRouter",
    "TruncatedRouter",
    "create_truncated_router",
    "fused_linear_token_stats",
    "policy_gradient_loss",
    "CGGRTrainer",
    "CGGRStepCallback",
    "use_cggr",
    "apply_cggr",
    "remove_cggr",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers' Trainer (and accelerate); load it only when asked for.
    if name in ("CGGRTrainer", "CGGRStepCallback", "use_cggr", "apply_cggr", "remove_cggr"):
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'cggr_torch' has no attribute {name!r}")
