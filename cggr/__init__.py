"""CGGR: Confidence-Gated Gradient Routing.

This small pure-Python package holds what both implementations share: the configuration
(:class:`CGGRConfig`, validated once), the metric names and the label rule. ``cggr_torch`` (PyTorch, Triton,
Hugging Face) and ``cggr_jax`` (JAX, Flax NNX, optax, Pallas) implement ``SPEC.md`` on top of it.

The seed docs' import name works for the PyTorch API, loaded on first use::

    from cggr import CGGRLoss, CGGRModel, create_truncated_router
"""
from __future__ import annotations

from typing import Any

from .config import (CONFIG_FIELDS, DEFAULT_SEQUENCE_SELECTION, REFERENCE_SCORING_MODES, SCORING_MODES,
                     SELECTION_STRATEGIES, SEQUENCE_SELECTIONS, CGGRConfig, check_ratio_value,
                     check_reference_arguments, check_sequence_reference_arguments, reject_reference_scoring)
from .labels import check_label_dtype_range
from .metrics import INT_METRIC_KEYS, METRIC_KEYS, NUMERIC_METRIC_KEYS

__all__ = [
    "CGGRConfig", "CONFIG_FIELDS", "SCORING_MODES", "SELECTION_STRATEGIES", "SEQUENCE_SELECTIONS",
    "DEFAULT_SEQUENCE_SELECTION", "METRIC_KEYS", "NUMERIC_METRIC_KEYS", "INT_METRIC_KEYS", "check_ratio_value",
    "check_label_dtype_range", "require", "REFERENCE_SCORING_MODES", "check_reference_arguments",
    "check_sequence_reference_arguments", "reject_reference_scoring",
]

#: The PyTorch names the seed docs import from ``cggr``; resolved lazily so that ``import cggr`` needs no torch.
_TORCH_API = ("CGGRLoss", "CGGRModel", "create_truncated_router", "cggr_loss", "CGGRScorer", "TruncatedRouter",
              "PassthroughRouter", "CGGRTrainer", "CGGRStepCallback", "use_cggr", "apply_cggr",
              "remove_cggr", "score_tokens", "select_tokens", "shift_for_causal_lm")


def require(module: str, *, package: str, extra: str) -> None:
    """Import ``module`` or raise ``ModuleNotFoundError`` naming the extra that installs it.

    ``cggr_torch``/``cggr_jax`` call this first, so a user who installed one framework and imports the other
    package learns what to install instead of reading a bare "No module named 'jax'".
    """
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # a dependency of the framework itself is missing: show the real error
            raise
        raise ModuleNotFoundError(
            f"{package} needs {module!r}, which is not installed: pip install 'cggr-routing[{extra}]' "
            f"(see the README's Install section for CPU-only and GPU builds)", name=module) from err


def __getattr__(name: str) -> Any:
    if name in _TORCH_API:
        import cggr_torch  # raises the install hint of require() when torch is missing

        return getattr(cggr_torch, name)
    raise AttributeError(f"module 'cggr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_TORCH_API))
