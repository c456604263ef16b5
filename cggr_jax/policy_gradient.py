r"""The GRPO/PPO clipped policy-gradient loss on the tokens CGGR selects, from the LM head's inputs (SPEC §14.3).

The mirror of :mod:`cggr_torch.policy_gradient` (its docstring has the formula): per-token log-probs and
statistics from :mod:`cggr_jax.token_stats` (no ``(N, V)`` logits), CGGR's selection through
:mod:`cggr_jax.pipeline` (default: the 20 % highest-entropy tokens), the clipped objective with an optional k3
KL term, aggregated as TRL names it. The kept rows are gathered into a static buffer of
``capacity`` rows (:func:`policy_gradient_capacity`) whose backward alone recomputes the LM head's logits.

A pure function of arrays: usable inside a ``jax.jit``-ed optax / Flax NNX step (the configuration, the clip
range, ``beta``, ``loss_type``, temperature, soft-cap and chunk sizes are static; ``step`` may be traced)::

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            hidden = model.hidden_states(batch["input_ids"])          # (B, T, d), shifted like the targets
            out = cggr_jax.policy_gradient.policy_gradient_loss(
                hidden, model.lm_head.kernel.value.T, batch["targets"], batch["advantages"],
                batch["old_logprob"], step=optimizer.step.value)
            return out.loss, out.metrics
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cggr import CGGRConfig
from cggr.config import CONFIG_FIELDS, reject_reference_scoring

from cggr_jax import curriculum, pipeline, utils
from cggr_jax.fused_linear import max_selected
from cggr_jax.kernels.launch import DEFAULT_MEMORY_BUDGET
from cggr_jax.scoring import scores_from_statistics
from cggr_jax.token_stats import check_transform, fused_linear_statistics, token_stats_on_rows
from cggr_jax.types import TokenScores

__all__ = ["LOSS_TYPES", "PG_CONFIG", "PG_METRIC_KEYS", "PolicyGradientOutput", "policy_gradient_capacity",
           "policy_gradient_loss"]

LOSS_TYPES = ("grpo", "sequence-mean", "dapo", "token-mean", "bnpo")
_SEQUENCE_MEAN = ("grpo", "sequence-mean")
PG_CONFIG = CGGRConfig(scoring="entropy", selection="topk", dynamic_threshold=False, min_tokens_ratio=0.2,
                       warmup_steps=0)
PG_METRIC_KEYS = ("clip_fraction", "kl")


class PolicyGradientOutput(NamedTuple):
    """As :class:`cggr_torch.policy_gradient.PolicyGradientOutput` (a pytree)."""

    loss: jax.Array
    metrics: dict[str, jax.Array]
    mask: jax.Array
    logprob: jax.Array
    entropy: jax.Array


def _check_real(value: Any, name: str, low: float = 0.0, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < low:
        raise ValueError(f"{name}: expected {'None or ' if allow_none else ''}a finite number >= {low}, got "
                         f"{value!r}")
    return float(value)


def _per_token(x: Any, name: str, shape: tuple[int, ...], allow_sequence: bool = False) -> Optional[jax.Array]:
    if x is None:
        return None
    seq = (shape[0],) if len(shape) == 2 else (1,)
    ok_shapes = [shape] + ([seq] if allow_sequence else [])
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or tuple(x.shape) not in ok_shapes:
        want = " or ".join(str(s) for s in ok_shapes)
        got = type(x).__name__ if dtype is None else f"an array of dtype {dtype} and shape {tuple(x.shape)}"
        raise ValueError(f"{name}: expected a floating array of shape {want}, got {got}")
    x = jax.lax.stop_gradient(jnp.asarray(x).astype(jnp.float32))
    if tuple(x.shape) != shape:
        x = jnp.broadcast_to(x.reshape(seq + (1,) * (len(shape) - 1)) if len(shape) == 2 else x, shape)
    return x


def policy_gradient_capacity(num_tokens: int, num_sequences: int, config: CGGRConfig,
                             ratio_schedule: Optional[Callable[[Any], Any]] = None) -> int:
    """The static size of the kept-rows buffer: the most tokens ``config`` can keep from ``num_tokens`` at any
    step (:func:`cggr_jax.fused_linear.max_selected`; ``N`` for ``sampled``, whose draw can keep every token)."""
    if config.selection == "sampled":
        return int(num_tokens)
    return max_selected(int(num_tokens), max(1, int(num_sequences)), selection=config.selection,
                        dynamic_threshold=config.dynamic_threshold,
                        threshold_sensitivity=config.threshold_sensitivity,
                        min_tokens_ratio=config.min_tokens_ratio, warmup_steps=config.warmup_steps,
                        min_tokens_per_sequence=config.min_tokens_per_sequence, ratio_schedule=ratio_schedule)


def _resolve(config: Optional[CGGRConfig], settings: dict[str, Any]) -> CGGRConfig:
    if config is None:
        cfg = CGGRConfig.from_kwargs(settings, caller="policy_gradient_loss")
    elif not isinstance(config, CGGRConfig):
        raise ValueError(f"config: expected None or a cggr.CGGRConfig, got {type(config).__name__}")
    else:
        changed = sorted(k for k, v in settings.items() if k in CONFIG_FIELDS and v != getattr(PG_CONFIG, k))
        if changed:
            raise ValueError(f"config: pass either config= or the settings {changed}, not both")
        cfg = config
    reject_reference_scoring(cfg, "the policy-gradient loss")
    return cfg


def policy_gradient_loss(hidden: jax.Array, weight: jax.Array, targets: jax.Array, advantages: jax.Array,
                         old_logprob: Optional[jax.Array] = None, ref_logprob: Optional[jax.Array] = None,
                         bias: Optional[jax.Array] = None, *, step: Any = 0, beta: float = 0.0,
                         epsilon_low: float = 0.2, epsilon_high: Optional[float] = None, loss_type: str = "dapo",
                         temperature: float = 1.0, softcap: Optional[float] = None,
                         scoring: str = PG_CONFIG.scoring, selection: str = PG_CONFIG.selection,
                         dynamic_threshold: bool = PG_CONFIG.dynamic_threshold,
                         threshold_sensitivity: float = PG_CONFIG.threshold_sensitivity,
                         min_tokens_ratio: float = PG_CONFIG.min_tokens_ratio,
                         warmup_steps: int = PG_CONFIG.warmup_steps, num_strata: int = PG_CONFIG.num_strata,
                         min_tokens_per_sequence: int = PG_CONFIG.min_tokens_per_sequence,
                         ignore_index: int = PG_CONFIG.ignore_index, sample_power: float = PG_CONFIG.sample_power,
                         sample_uniform_mix: float = PG_CONFIG.sample_uniform_mix,
                         sample_floor: float = PG_CONFIG.sample_floor, sample_seed: int = PG_CONFIG.sample_seed,
                         ratio_schedule: Optional[Callable[[Any], Any]] = None,
                         config: Optional[CGGRConfig] = None, row_chunk_size: Optional[int] = None,
                         vocab_chunk_size: Optional[int] = None,
                         memory_budget_bytes: Optional[int] = None) -> PolicyGradientOutput:
    """The clipped policy-gradient loss on CGGR's kept tokens without the ``(N, V)`` logits (SPEC §14.3);
    arguments and result as :func:`cggr_torch.policy_gradient.policy_gradient_loss` (``step`` may be a traced
    integer; ``memory_budget_bytes=None`` is 0.25 GiB: there is no one pass here, SPEC §14.4). Differentiable
    with ``jax.grad`` in ``hidden``, ``weight`` and ``bias``."""
    cfg = _resolve(config, dict(scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
                                threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                                warmup_steps=warmup_steps, num_strata=num_strata,
                                min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index,
                                sample_power=sample_power, sample_uniform_mix=sample_uniform_mix,
                                sample_floor=sample_floor, sample_seed=sample_seed))
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_real(beta, "beta")
    eps_low = _check_real(epsilon_low, "epsilon_low")
    eps_high = _check_real(epsilon_high, "epsilon_high", allow_none=True)
    eps_high = eps_low if eps_high is None else eps_high
    temperature, softcap = check_transform(temperature, softcap)
    curriculum.check_schedule(ratio_schedule)
    step_arr = curriculum.check_step(step)
    chunks = dict(row_chunk_size=row_chunk_size, vocab_chunk_size=vocab_chunk_size,
                  memory_budget_bytes=DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes)
    stats = fused_linear_statistics(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                                    ignore_index=cfg.ignore_index, **chunks)
    shape = tuple(hidden.shape[:-1])
    adv = _per_token(advantages, "advantages", shape, allow_sequence=True)
    if adv is None:
        raise ValueError("advantages: expected a floating array (one value per sequence or per token), got None")
    old = _per_token(old_logprob, "old_logprob", shape)
    ref = _per_token(ref_logprob, "ref_logprob", shape)
    if (ref is None) != (beta == 0.0):
        raise ValueError(f"ref_logprob: the KL term needs both beta > 0 and ref_logprob (got beta={beta} and "
                         f"ref_logprob {'None' if ref is None else 'given'}); a reference with beta = 0 would be "
                         f"silently unused")
    V = weight.shape[0]
    t = jnp.asarray(targets)
    not_ignored, in_range, _ = utils.target_masks(t, V, cfg.ignore_index)
    scores = scores_from_statistics(stats, cfg.scoring, not_ignored=not_ignored, in_range=in_range)
    extra = jnp.isfinite(adv)
    for x in (old, ref):
        if x is not None:
            extra = extra & jnp.isfinite(x)
    scores = TokenScores(scores.difficulty, scores.eligible & extra, scores.valid, scores.stats)
    measured = pipeline.select_and_measure(scores, in_range, step_arr, config=cfg,
                                           schedule=curriculum.schedule_for(cfg, ratio_schedule))
    mask = measured.mask
    N = int(np.prod(shape))
    B = shape[0] if len(shape) == 2 else 1
    cap = policy_gradient_capacity(N, B, cfg, ratio_schedule)
    flat_mask = mask.reshape(-1)
    rows = jnp.argsort(~flat_mask, stable=True)[:cap].astype(jnp.int32)
    live = flat_mask[rows]
    out = token_stats_on_rows(hidden, weight, targets, bias, stats, rows, live, need=("logprob",),
                              temperature=temperature, softcap=softcap, ignore_index=cfg.ignore_index, **chunks)
    lp = out.logprob
    old_r = jax.lax.stop_gradient(lp) if old is None else jnp.where(live, old.reshape(-1)[rows], 0.0)
    adv_r = jnp.where(live, adv.reshape(-1)[rows], 0.0)
    ratio = jnp.exp(lp - old_r)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    unclipped = ratio * adv_r <= clipped * adv_r
    ell = -jnp.where(unclipped, ratio * adv_r, jax.lax.stop_gradient(clipped) * adv_r)
    kl = jnp.zeros_like(ell)
    if ref is not None:
        d = jnp.where(live, ref.reshape(-1)[rows], 0.0) - lp
        kl = jnp.exp(d) - d - 1.0
        ell = ell + beta * kl
    weights = measured.weights.reshape(-1)[rows]
    elig = scores.eligible.reshape(B, -1)
    if loss_type in _SEQUENCE_MEAN:
        per_seq = jnp.maximum(jnp.sum(elig, axis=1), 1).astype(jnp.float32) * jnp.float32(B)
        denom = per_seq[rows // elig.shape[1]]
    else:
        denom = jnp.broadcast_to(jnp.maximum(jnp.sum(elig), 1).astype(jnp.float32), rows.shape)
    loss = jnp.sum(jnp.where(live, weights * ell / denom, 0.0), dtype=jnp.float32)
    kept = jnp.maximum(jnp.sum(live), 1).astype(jnp.float32)
    metrics = dict(measured.metrics)
    metrics["clip_fraction"] = jax.lax.stop_gradient(jnp.sum(live & ~unclipped).astype(jnp.float32) / kept)
    metrics["kl"] = jax.lax.stop_gradient(jnp.sum(jnp.where(live, kl, 0.0)) / kept)
    logprob_all = jnp.where(not_ignored & in_range, -stats.nll, 0.0)
    return PolicyGradientOutput(loss, metrics, mask, logprob_all, stats.entropy)
