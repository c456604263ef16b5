r"""The one select-and-measure pipeline of ``cggr_jax``: every loss variant calls it instead of re-coding it.

Order (the SPEC section of each step):

1. statistics of every token (SPEC §2) — :func:`cggr_jax.scoring.dispatch_statistics`, kernel or reference
   (:mod:`cggr_jax.dispatch`), or the fused head's blockwise statistics;
2. difficulty (SPEC §3), validity and eligibility (SPEC §4) — :func:`cggr_jax.scoring.scores_from_statistics`;
3. the ratio (SPEC §5): curriculum ``base = schedule(step)`` (§5.1) and, when
   ``config.uses_dynamic_threshold``, the dynamic threshold with the mean confidence of the eligible tokens
   (§5.2) — :func:`ratios`;
4. ``k`` and the selection (SPEC §5.3, §6, §7) — :func:`select`; ``sampled`` (SPEC §7.4) draws with
   :func:`cggr_jax.selection.sample_checked`, which also gives the Horvitz–Thompson weights ``1/π``;
5. the loss weights (SPEC §8): ``1 / max(1, |S|)`` on the selected rows, or for ``sampled``
   ``w_i / max(1, n)`` (:func:`loss_weights`) — :func:`selective_cross_entropy`;
6. the metrics (SPEC §10) — :func:`measure`.

:func:`select_and_measure` runs steps 3, 4 and 6 on the token scores of one call; the loss
(:mod:`cggr_jax.loss`), the fused LM head (:mod:`cggr_jax.fused_linear`) and the distributed loss's local
scope use it whole; the distributed global scope (:mod:`cggr_jax.distributed`) runs :func:`ratios`,
:func:`select` and :func:`measure` on the difficulties and sums exchanged between devices, and batch splitting
(:mod:`cggr_jax.scorer`) runs :func:`ratios` and :func:`token_averages` on its token scores and selects
sequences. Everything is traced, static-shaped and free of host synchronisation: ``step`` is an int32 array,
the configuration (a ``cggr.CGGRConfig``) is static.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from cggr import INT_METRIC_KEYS, NUMERIC_METRIC_KEYS, CGGRConfig

from cggr_jax import curriculum, dispatch, selection, utils
from cggr_jax import scoring as scoring_lib
from cggr_jax.selection import sample_checked
from cggr_jax.types import TokenScores, TokenStatistics

__all__ = ["Measured", "metric_template", "eligible_mean", "token_averages", "ratios", "select", "measure",
           "select_and_measure", "selective_cross_entropy", "scored_selective_cross_entropy", "loss_weights",
           "effective_sample_size"]


class Measured(NamedTuple):
    """Result of :func:`select_and_measure`: the selection ``mask`` (token shape), ``k`` (int32), the SPEC
    §10 ``metrics`` (dict of scalar arrays, keys :data:`cggr.NUMERIC_METRIC_KEYS`) and the float32 per-token
    ``weights``: the Horvitz–Thompson weights ``1/π`` of ``sampled`` (§7.4), 1.0 on the selected tokens of
    the other strategies, 0 elsewhere (:func:`loss_weights` turns them into the loss's row weights)."""

    mask: jax.Array
    k: jax.Array
    metrics: dict[str, jax.Array]
    weights: jax.Array | None = None


def metric_template() -> dict[str, jax.Array]:
    """Zero-valued metrics with the dtypes every entry point returns (int32 counts, float32 values)."""
    return {k: jnp.zeros((), jnp.int32 if k in INT_METRIC_KEYS else jnp.float32) for k in NUMERIC_METRIC_KEYS}


def eligible_mean(x: jax.Array, eligible: jax.Array) -> jax.Array:
    """SPEC §10: the float32 mean of ``x`` over the eligible tokens (0 when there is none)."""
    n = jnp.sum(eligible, dtype=jnp.int32)
    total = jnp.sum(jnp.where(eligible, x.astype(jnp.float32), 0.0), dtype=jnp.float32)
    return jnp.where(n > 0, total / jnp.maximum(n, 1).astype(jnp.float32), jnp.float32(0.0))


def token_averages(scores: TokenScores) -> dict[str, jax.Array]:
    """SPEC §10's token averages and ``tokens_total`` over the eligible tokens of ``scores``."""
    e = scores.eligible
    return {
        "tokens_total": jnp.sum(e, dtype=jnp.int32),
        "avg_confidence": eligible_mean(scores.stats.confidence, e),
        "avg_entropy": eligible_mean(scores.stats.entropy, e),
        "avg_difficulty": eligible_mean(scores.difficulty, e),
    }


def ratios(config: CGGRConfig, schedule: Callable[[Any], Any], step: jax.Array,
           mean_confidence: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SPEC §5.1–§5.2: ``(base, effective)`` float32 ratios at ``step``; the dynamic threshold applies when
    ``config.uses_dynamic_threshold``."""
    base = curriculum.schedule_value(schedule, step)
    if config.uses_dynamic_threshold:
        return base, curriculum.dynamic_ratio(base, mean_confidence, config.threshold_sensitivity)
    return base, base


def select(difficulty: jax.Array, eligible: jax.Array, ratio: jax.Array,
           config: CGGRConfig) -> tuple[jax.Array, jax.Array]:
    """SPEC §5.3, §6, §7: ``(mask, k)`` of ``config.selection`` (rows of a 2-D input are the sequences).
    A deterministic strategy: ``sampled`` (§7.4) is drawn by :func:`select_and_measure` (it needs the step and
    gives weights), and a caller that has no weighted loss must refuse it (``ValueError`` here otherwise)."""
    return selection.select_checked(difficulty.astype(jnp.float32), eligible & ~jnp.isnan(difficulty), ratio,
                                    selection=config.selection, num_strata=config.num_strata,
                                    min_tokens_per_sequence=config.min_tokens_per_sequence)


def effective_sample_size(weights: jax.Array) -> jax.Array:
    """SPEC §10 ``sample_ess``: float32 ``(Σw)² / Σw²`` over the selected tokens (``weights`` 0 elsewhere);
    0 when nothing is selected."""
    w = weights.reshape(-1).astype(jnp.float32)
    s1 = jnp.sum(w)
    s2 = jnp.sum(w * w)
    return jnp.where(s2 > 0, (s1 * s1) / jnp.where(s2 > 0, s2, jnp.float32(1.0)), jnp.float32(0.0))


def loss_weights(measured: Measured, config: CGGRConfig) -> jax.Array | None:
    """SPEC §8: the float32 row weights ``ω_i = w_i / max(1, n)`` of ``sampled`` (the loss is
    ``Σ_{i∈mask} ω_i·ce_i``), or None for the other strategies (their loss is the plain selected mean)."""
    if config.selection != "sampled":
        return None
    n = jnp.maximum(measured.metrics["tokens_total"], 1).astype(jnp.float32)
    return jax.lax.stop_gradient(measured.weights.astype(jnp.float32) / n)


def measure(step: jax.Array, base: jax.Array, ratio: jax.Array, tokens_selected: jax.Array,
            averages: dict[str, jax.Array], tokens_nonfinite: jax.Array,
            tokens_out_of_range: jax.Array, sample_ess: jax.Array | None = None) -> dict[str, jax.Array]:
    """SPEC §10: the metrics dict (keys :data:`cggr.NUMERIC_METRIC_KEYS`, in that order) from its parts;
    ``averages`` as from :func:`token_averages`; ``sample_ess`` of a weighted selection (None: an unweighted
    one, whose effective sample size is ``tokens_selected``)."""
    values = {
        "sample_ess": (jnp.asarray(tokens_selected).astype(jnp.float32) if sample_ess is None
                       else sample_ess.astype(jnp.float32)),
        "step": jnp.asarray(step, jnp.int32),
        "token_ratio": base,
        "effective_ratio": ratio,
        "tokens_selected": tokens_selected,
        "tokens_nonfinite": tokens_nonfinite,
        "tokens_out_of_range": tokens_out_of_range,
        **averages,
    }
    return {key: values[key] for key in NUMERIC_METRIC_KEYS}


def select_and_measure(scores: TokenScores, in_range: jax.Array, step: jax.Array, *, config: CGGRConfig,
                       schedule: Callable[[Any], Any]) -> Measured:
    """SPEC §5–§7 and §10 on the token scores of one call.

    ``in_range``: the targets inside ``[0, V)``; a valid token outside is counted in ``tokens_out_of_range``
    (it can only arrive traced: concrete ones raise at the entry point, SPEC §11), a valid in-range token that
    is not eligible in ``tokens_nonfinite``.
    """
    averages = token_averages(scores)
    base, ratio = ratios(config, schedule, step, averages["avg_confidence"])
    if config.selection == "sampled":      # SPEC §7.4: a random draw with Horvitz–Thompson weights
        d = scores.difficulty.astype(jnp.float32)
        mask, weights, k = selection.sample_checked(
            d, scores.eligible & ~jnp.isnan(d), ratio, jnp.asarray(step).reshape(()), seed=config.sample_seed,
            power=config.sample_power, uniform_mix=config.sample_uniform_mix, floor=config.sample_floor)
        ess = effective_sample_size(weights)
    else:
        mask, k = select(scores.difficulty, scores.eligible, ratio, config)
        weights, ess = mask.astype(jnp.float32), None
    valid = scores.valid
    metrics = measure(step, base, ratio, jnp.sum(mask, dtype=jnp.int32), averages,
                      jnp.sum(valid & in_range & ~scores.eligible, dtype=jnp.int32),
                      jnp.sum(valid & ~in_range, dtype=jnp.int32), ess)
    return Measured(mask, k, metrics, weights)


# ------------------------------------------------------------------------- SPEC §8: the loss weights
@jax.custom_vjp
def _selected_ce(logits: jax.Array, safe_targets: jax.Array, mask: jax.Array, lse: jax.Array,
                 nll: jax.Array) -> jax.Array:
    """``Σ_{mask} nll / max(1, Σ mask)`` with the SPEC §8 gradient (see :func:`selective_cross_entropy`)."""
    loss, _ = _selected_ce_fwd(logits, safe_targets, mask, lse, nll)
    return loss


def _selected_ce_fwd(logits: jax.Array, safe_targets: jax.Array, mask: jax.Array, lse: jax.Array,
                     nll: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    count = jnp.sum(mask, dtype=jnp.int32)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(mask, nll, 0.0)) / denom
    return loss, (logits, safe_targets, mask, lse, denom)


def _selected_ce_bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[Any, ...]:
    logits, safe_targets, mask, lse, denom = res
    z = logits.astype(jnp.float32)
    lse_sel = jnp.where(mask, lse, 0.0)                     # unselected rows never feed exp
    p = jnp.exp(jnp.where(mask[..., None], z, 0.0) - lse_sel[..., None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == safe_targets[..., None]
    scale = (g.astype(jnp.float32) / denom)
    grad = jnp.where(mask[..., None], (p - onehot.astype(jnp.float32)) * scale, 0.0)
    return grad.astype(logits.dtype), None, None, None, None


_selected_ce.defvjp(_selected_ce_fwd, _selected_ce_bwd)


@jax.custom_vjp
def _weighted_ce(logits: jax.Array, safe_targets: jax.Array, mask: jax.Array, lse: jax.Array, nll: jax.Array,
                 weights: jax.Array) -> jax.Array:
    """``Σ_{mask} ω·nll`` with the gradient ``ω_i·(softmax − onehot)`` (SPEC §7.4, §8; ``sampled``)."""
    loss, _ = _weighted_ce_fwd(logits, safe_targets, mask, lse, nll, weights)
    return loss


def _weighted_ce_fwd(logits: jax.Array, safe_targets: jax.Array, mask: jax.Array, lse: jax.Array,
                     nll: jax.Array, weights: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    loss = jnp.sum(jnp.where(mask, weights * nll, 0.0))
    return loss, (logits, safe_targets, mask, lse, weights)


def _weighted_ce_bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[Any, ...]:
    logits, safe_targets, mask, lse, weights = res
    z = logits.astype(jnp.float32)
    lse_sel = jnp.where(mask, lse, 0.0)                     # unselected rows never feed exp
    p = jnp.exp(jnp.where(mask[..., None], z, 0.0) - lse_sel[..., None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == safe_targets[..., None]
    scale = g.astype(jnp.float32) * jnp.where(mask, weights, 0.0)
    grad = jnp.where(mask[..., None], (p - onehot.astype(jnp.float32)) * scale[..., None], 0.0)
    return grad.astype(logits.dtype), None, None, None, None, None


_weighted_ce.defvjp(_weighted_ce_fwd, _weighted_ce_bwd)


def selective_cross_entropy(logits: jax.Array, safe_targets: jax.Array, has_target: jax.Array,
                            mask: jax.Array, stats: TokenStatistics, ignore_index: int, *,
                            kernel: bool, row_weights: jax.Array | None = None) -> jax.Array:
    r"""SPEC §8: ``Σ_{i∈S} nll_i / max(1, |S|)`` (float32) with the gradient
    ``(softmax(z_i) − onehot(t_i)) / max(1, |S|)`` on the selected rows and exact zeros elsewhere.

    ``stats`` are the (stop-gradient) statistics the selection was made from, so the forward reads no logits.
    ``kernel`` (from :func:`cggr_jax.dispatch.use_kernels`, static): the Pallas selective cross-entropy with
    its sparse backward, else the XLA ``custom_vjp`` whose backward replaces every unselected row by zeros
    before the exponential (a NaN or infinite row cannot leak into the gradient, no ``0·NaN``).

    ``row_weights`` (float32, the token shape; ``sampled``, SPEC §7.4, from :func:`loss_weights`): the loss is
    ``Σ_{i∈S} ω_i·nll_i`` with the gradient ``ω_i·(softmax(z_i) − onehot(t_i))`` (no division by ``|S|``).
    """
    if kernel:
        kernels = dispatch.load_kernels(required=True)
        kernel_targets = jnp.where(has_target, safe_targets, ignore_index)
        if row_weights is None:
            return kernels.selective_cross_entropy_pallas(logits, kernel_targets, mask, ignore_index=ignore_index,
                                                          stats=stats)
        return kernels.selective_cross_entropy_pallas(logits, kernel_targets, mask, ignore_index=ignore_index,
                                                      stats=stats, row_weights=row_weights)
    if row_weights is not None:
        return _weighted_ce(logits, safe_targets, mask, stats.lse, stats.nll, row_weights.astype(jnp.float32))
    return _selected_ce(logits, safe_targets, mask, stats.lse, stats.nll)


def scored_selective_cross_entropy(
        logits: jax.Array, targets: jax.Array, ratio: Any, *, scoring: str = utils.DEFAULT_CONFIG.scoring,
        selection: str = "topk", num_strata: int = utils.DEFAULT_CONFIG.num_strata,
        min_tokens_per_sequence: int = utils.DEFAULT_CONFIG.min_tokens_per_sequence,
        ignore_index: int = utils.DEFAULT_CONFIG.ignore_index, interpret: bool | None = None,
        scoring_launch: Any = None,
        backward_launch: Any = None, step: Any = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Pallas kernels end to end: scores (one kernel read of the logits) → selection on device →
    selective cross-entropy. Returns ``(loss, mask, k)``.

    ``ratio`` is the float32 ratio after the dynamic threshold (SPEC §5.2); eligibility is SPEC §4. Gradients
    flow to ``logits`` through the sparse backward only. ``interpret``: ``None`` = compile on a GPU,
    interpret elsewhere; ``scoring_launch`` / ``backward_launch``: :class:`cggr_jax.kernels.Launch` of the
    two kernels (None: their defaults). Always the kernels, whatever :mod:`cggr_jax.dispatch` says.
    ``selection='sampled'`` (SPEC §7.4) draws at ``step`` (an integer scalar, may be traced) with the default
    ``CGGRConfig.sample_*`` parameters and returns the Horvitz–Thompson loss of §8 (``k`` expected).
    """
    kernels = dispatch.load_kernels(required=True)
    config = CGGRConfig(scoring=scoring, selection=selection, num_strata=num_strata,
                        min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index)
    for name, value in (("scoring_launch", scoring_launch), ("backward_launch", backward_launch)):
        if value is not None and not isinstance(value, kernels.Launch):
            raise ValueError(f"{name} must be a cggr_jax.kernels.Launch or None, got {type(value).__name__}")
    scoring_launch = scoring_launch or kernels.Launch()
    backward_launch = backward_launch or kernels.Launch()
    logits = utils.as_logits(logits)
    targets = utils.as_targets(targets, logits.shape, ignore_index=ignore_index)
    ratio = curriculum.check_ratio_value(ratio)
    stats = kernels.token_statistics_pallas(jax.lax.stop_gradient(logits), targets, ignore_index,
                                            interpret=interpret, **scoring_launch.kwargs())
    stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
    not_ignored, in_range, _ = utils.target_masks(targets, logits.shape[-1], ignore_index)
    scores = scoring_lib.scores_from_statistics(stats, config.scoring, not_ignored=not_ignored, in_range=in_range)
    if config.selection == "sampled":
        d = scores.difficulty.astype(jnp.float32)
        e = scores.eligible & ~jnp.isnan(d)
        mask, weights, k = sample_checked(   # the argument `selection` shadows the module here
            d, e, ratio, jnp.asarray(step, jnp.int32).reshape(()), seed=config.sample_seed,
            power=config.sample_power, uniform_mix=config.sample_uniform_mix, floor=config.sample_floor)
        row_weights = weights / jnp.maximum(jnp.sum(e, dtype=jnp.int32), 1).astype(jnp.float32)
        loss = kernels.selective_cross_entropy_pallas(logits, targets, mask, ignore_index=ignore_index,
                                                      stats=stats, interpret=interpret, row_weights=row_weights,
                                                      **backward_launch.kwargs())
        return loss, mask, k
    mask, k = select(scores.difficulty, scores.eligible, ratio, config)
    loss = kernels.selective_cross_entropy_pallas(logits, targets, mask, ignore_index=ignore_index, stats=stats,
                                                  interpret=interpret, **backward_launch.kwargs())
    return loss, mask, k
