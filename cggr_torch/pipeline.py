"""The one select-and-measure pipeline of ``cggr_torch`` (mirrored by ``cggr_jax.pipeline``).

Every loss variant - :class:`cggr_torch.CGGRLoss` / :func:`cggr_torch.cggr_loss` (reference path), the fused
LM head (:mod:`cggr_torch.fused_linear`), the distributed loss (:mod:`cggr_torch.distributed`), the scorer
and batch splitting (:mod:`cggr_torch.router`, :mod:`cggr_torch.batch_split`) - runs these stages, in this
order, through the functions below instead of re-coding them::

    statistics   SPEC §2    scoring.compute_statistics (kernel or reference, cggr_torch.dispatch)
    difficulty   SPEC §3    scoring.scores_from_statistics
    eligibility  SPEC §4    (same call: valid = target ≠ ignore_index, finite row, d not NaN)
    ratio        SPEC §5    base(step) (curriculum: a tensor from the step tensor in the losses, SPEC §12.1;
                            a host number in the scorer), then effective_ratio: the dynamic threshold
                            from the eligible tokens' mean confidence when config.uses_dynamic_threshold
    selection    SPEC §6-7  selection.select_tokens (k = num_selected, SPEC §5.3); ``sampled`` (§7.4):
                            selection.sample_tokens, which also gives the per-token weights 1/π
    loss weights SPEC §8    the caller's: Σ_{i∈mask} ce_i / max(1, |mask|), or for ``sampled``
                            Σ_{i∈mask} w_i·ce_i / max(1, n) (:func:`loss_weights`)
    metrics      SPEC §10   metric_tensors (device, no synchronisation), host_metrics (Python scalars)

The CUDA fused path of ``CGGRLoss`` (``loss.forward_fused``) is the kernel-side realisation of the same stages
(the scoring kernel writes statistics, difficulty, status and sort key; one plan program computes the ratio,
``k`` and every metric); it is tested bit-identical to this pipeline; ``loss.forward_sampled`` is the same for ``sampled`` (the
sampler's probability kernel computes the metrics, its draw kernel the row weights of :func:`loss_weights`).
The distributed global scope runs the
same stages with one all-gather between eligibility and ratio (SPEC §13).

Nothing here synchronises with the device; everything runs under ``torch.no_grad()`` in the callers.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from cggr import NUMERIC_METRIC_KEYS, CGGRConfig

from .curriculum import dynamic_ratio
from .scoring import scores_from_statistics
from .selection import sample_tokens, select_tokens
from .types import TokenScores, TokenStatistics

__all__ = ["Measured", "eligible_mean", "effective_ratio", "as_ratio_tensor", "as_step_tensor", "measure_scores",
           "select_and_measure",
           "metric_tensors", "host_metrics", "to_python", "loss_weights", "effective_sample_size"]


class Measured(NamedTuple):
    """The pipeline's result: the scores (SPEC §3-§4), the selection ``mask`` and int32 ``k`` (§5.3-§7), the
    SPEC §10 numeric metrics as 0-d device tensors (``metrics``) and the float32 per-token ``weights``: the
    Horvitz–Thompson weights ``1/π`` of ``sampled`` (§7.4), 1.0 on the selected tokens of the other
    strategies, 0 elsewhere (:func:`loss_weights` turns them into the loss's row weights)."""

    scores: TokenScores
    mask: torch.Tensor
    k: torch.Tensor
    metrics: dict[str, torch.Tensor]
    weights: Optional[torch.Tensor] = None


def eligible_mean(x: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """float32 ``Σ_eligible x / max(1, count)`` (0 when nothing is eligible); the averages of SPEC §5.2/§10."""
    total = torch.where(eligible, x.to(torch.float32), torch.zeros((), dtype=torch.float32, device=x.device))
    return total.sum(dtype=torch.float32) / torch.clamp(count, min=1).to(torch.float32)


def effective_ratio(base: Any, mean_confidence: torch.Tensor, config: CGGRConfig) -> torch.Tensor:
    """SPEC §5.2: the ratio after the dynamic threshold (``base`` itself when ``config`` does not use it), a
    0-d float32 tensor on the device of ``mean_confidence``."""
    base_t = as_ratio_tensor(base, mean_confidence.device)
    if config.uses_dynamic_threshold:
        return dynamic_ratio(base_t, mean_confidence, config.threshold_sensitivity)
    return base_t


def as_ratio_tensor(base: Any, device: torch.device) -> torch.Tensor:
    """``base`` (a host number or a 0-d tensor, e.g. :func:`cggr_torch.curriculum.base_ratio_tensor`'s) as a
    0-d float32 tensor on ``device``; a host number is written by a fill kernel (no copy, no graph input)."""
    if isinstance(base, torch.Tensor):
        return base.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(np.float32(base)), dtype=torch.float32, device=device)


def as_step_tensor(step: Any, device: torch.device) -> torch.Tensor:
    """The metric ``step``: a fresh 0-d int64 tensor on ``device`` (a copy of a step tensor, never a view of
    the module's buffer, which ``step()`` advances in place)."""
    if isinstance(step, torch.Tensor):
        return step.reshape(()).to(device=device, dtype=torch.int64).clone()
    return torch.full((), int(step), dtype=torch.int64, device=device)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """SPEC §10 ``sample_ess``: float32 ``(Σw)² / Σw²`` over the selected tokens (``weights`` 0 elsewhere);
    0 when nothing is selected."""
    w = weights.reshape(-1).to(torch.float32)
    s1 = w.sum(dtype=torch.float32)
    s2 = (w * w).sum(dtype=torch.float32)
    return torch.where(s2 > 0, (s1 * s1) / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))


def loss_weights(measured: "Measured", config: CGGRConfig) -> Optional[torch.Tensor]:
    """SPEC §8: the float32 row weights ``ω_i = w_i / max(1, n)`` of ``sampled`` (the loss is
    ``Σ_{i∈mask} ω_i·ce_i``), or None for the other strategies (their loss is the plain selected mean)."""
    if config.selection != "sampled":
        return None
    n = torch.clamp(measured.metrics["tokens_total"], min=1).to(torch.float32)
    return (measured.weights.to(torch.float32) / n).detach()


def metric_tensors(scores: TokenScores, mask: torch.Tensor, step: int, base: Any, ratio: torch.Tensor,
                   count: torch.Tensor, mean_confidence: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """SPEC §10's numeric metrics as 0-d device tensors (no synchronisation). ``weights``: the
    Horvitz–Thompson weights of ``sampled`` (``sample_ess`` from them); None for an unweighted selection,
    whose ``sample_ess`` is ``tokens_selected``."""
    dev = scores.difficulty.device
    elig = scores.eligible
    selected = mask.sum()
    ess = selected.to(torch.float32) if weights is None else effective_sample_size(weights)
    return {
        "step": as_step_tensor(step, dev),
        "token_ratio": as_ratio_tensor(base, dev),
        "effective_ratio": ratio.detach(),
        "tokens_selected": selected,
        "tokens_total": count,
        "tokens_nonfinite": (scores.valid & ~elig).sum(),
        "tokens_out_of_range": torch.zeros((), dtype=torch.int64, device=dev),
        "avg_confidence": mean_confidence,
        "avg_entropy": eligible_mean(scores.stats.entropy, elig, count).detach(),
        "avg_difficulty": eligible_mean(scores.difficulty, elig, count).detach(),
        "sample_ess": ess.detach(),
    }


def measure_scores(scores: TokenScores, step: int, base: Any, config: CGGRConfig) -> Measured:
    """SPEC §5-§7 and §10 from the scores: ratio, selection and metrics (the scorer starts here)."""
    elig = scores.eligible
    n = elig.sum()
    mean_conf = eligible_mean(scores.stats.confidence, elig, n)
    ratio = effective_ratio(base, mean_conf, config)
    if config.selection == "sampled":      # SPEC §7.4: a random draw with Horvitz–Thompson weights
        mask, weights, k = sample_tokens(scores.difficulty, elig, ratio, step=step, seed=config.sample_seed,
                                         power=config.sample_power, uniform_mix=config.sample_uniform_mix,
                                         floor=config.sample_floor)
        metrics = metric_tensors(scores, mask, step, base, ratio, n, mean_conf, weights)
        return Measured(scores, mask, k, metrics, weights)
    mask, k = select_tokens(scores.difficulty, elig, ratio, selection=config.selection,
                            num_strata=config.num_strata, min_tokens_per_sequence=config.min_tokens_per_sequence)
    return Measured(scores, mask, k, metric_tensors(scores, mask, step, base, ratio, n, mean_conf),
                    mask.to(torch.float32))


def select_and_measure(stats: TokenStatistics, targets: Optional[torch.Tensor], step: int, base: Any,
                       config: CGGRConfig, reference_nll: Optional[torch.Tensor] = None) -> Measured:
    """SPEC §3-§7 and §10 from per-token statistics (every loss that has the statistics at hand: the
    materialised logits, the fused LM head). ``reference_nll``: ``scoring='excess'`` only (SPEC §3.1)."""
    scores = scores_from_statistics(stats, targets, config.scoring, config.ignore_index,
                                    reference_nll=reference_nll)
    return measure_scores(scores, step, base, config)


def to_python(value: Any) -> Any:
    """A 0-d tensor or NumPy scalar as a Python number (reads the device)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return int(value) if not value.dtype.is_floating_point else float(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def host_metrics(last: Optional[dict[str, Any]], step: int, base: Any, config: CGGRConfig,
                 extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """SPEC §10 metrics as Python scalars from the last call's metric tensors (``last``), plus ``extra_keys``.

    Before the first call (``last is None``) the counts and averages are 0 and both ratios are ``base``, the
    curriculum ratio of the current ``step``. Reads the device: call it outside the training step.
    """
    numeric = list(NUMERIC_METRIC_KEYS) + list(extra_keys)
    if last is None:
        b = float(np.float32(base))
        out: dict[str, Any] = {k: 0 for k in numeric}
        out.update(step=int(step), token_ratio=b, effective_ratio=b, avg_confidence=0.0, avg_entropy=0.0,
                   avg_difficulty=0.0, sample_ess=0.0)
    else:
        out = {k: to_python(last[k]) for k in numeric}
    out["selection"] = config.selection
    out["scoring"] = config.scoring
    return out
