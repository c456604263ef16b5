"""CGGR: Confidence-Gated Gradient Routing.

This small pure-Python package holds what both implementations share: the configuration
(:class:`CGGRConfig`, validated once), the metric names and the label rule. ``cggr_torch`` (PyTorch, Triton,
Hugging Face) and ``cggr_jax`` (JAX, Flax NNX, optax, Pallas) implement ``SPEC.md`` on top of it.

The seed docs' import name works for the PyTorch API, loaded on first use::

    from cggr import CGGRLoss, CGGRModel, create_truncated_router
"""
from __future__ import annotations

from typing import Any

from .config import (CONFIG_FIELDS, DEFAULT_SEQUENCE_SELECTION, SCORING_MODES, SELECTION_STRATEGIES,
                     SEQUENCE_SELECTIONS, CGGRConfig, check_ratio_value)
from .labels import check_label_dtype_range
from .metrics import INT_METRIC_KEYS, METRIC_KEYS, NUMERIC_METRIC_KEYS

__all__ = [
    "CGGRConfig", "CONFIG_FIELDS", "SCORING_MODES", "SELECTION_STRATEGIES", "SEQUENCE_SELECTIONS",
    "DEFAULT_SEQUENCE_SELECTION", "METRIC_KEYS", "NUMERIC_METRIC_KEYS", "INT_METRIC_KEYS", "check_ratio_value",
    "check_label_dtype_range",
]

#: The PyTorch names the seed docs import from ``cggr``; resolved lazily so that ``import cggr`` needs no torch.
_TORCH_API = ("CGGRLoss", "CGGRModel", "create_truncated_router", "cggr_loss", "CGGRScorer", "TruncatedRouter",
              "PassthroughRouter", "CGGRTrainer", "CGGRStepCallback", "score_tokens", "select_tokens",
              "shift_for_causal_lm")


def __getattr__(name: str) -> Any:
    if name in _TORCH_API:
        try:
            import cggr_torch
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"cggr.{name} is the PyTorch API; install it with `pip install cggr[torch]` "
                              f"({err})") from err
        return getattr(cggr_torch, name)
    raise AttributeError(f"module 'cggr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_TORCH_API))
