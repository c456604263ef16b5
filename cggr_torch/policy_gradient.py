r"""The GRPO/PPO clipped policy-gradient loss on the tokens CGGR selects, from the LM head's inputs (SPEC §14.3).

For each token ``i`` with a target (a completion token; ``ignore_index`` marks prompt and padding)::

    lp_i  = log p(t_i)  of the transformed logits (SPEC §14.1, :mod:`cggr_torch.token_stats`, no logits)
    r_i   = exp(lp_i − old_i)                  (old_i = lp_i without gradient when old_logprob is None)
    ℓ_i   = −min(r_i·A_i, clip(r_i, 1 − ε_low, 1 + ε_high)·A_i) + β·(exp(ref_i − lp_i) − (ref_i − lp_i) − 1)

and the loss is ``Σ_{i kept} w_i·ℓ_i / D_i``: the kept tokens are CGGR's selection (SPEC §3-§7) on the same
statistics (default: the 20 % highest-entropy tokens, "Beyond the 80/20 Rule"), ``w_i`` their weights
(``1/π_i`` for ``selection='sampled'``, else 1) and ``D_i`` the aggregation's normaliser over the *eligible*
tokens - as TRL's ``top_entropy_quantile`` masks the loss, not the normaliser: ``"token-mean"`` / ``"dapo"`` /
``"bnpo"`` ``D = max(1, n)``; ``"sequence-mean"`` / ``"grpo"`` ``D_i = B · max(1, n_b)`` for ``i`` in
sequence ``b``.

The forward computes every row's statistics once (:func:`cggr_torch.token_stats.fused_linear_statistics`); the
backward recomputes and touches the LM head for the kept rows only
(:func:`cggr_torch.token_stats.token_stats_on_rows`), gathered into a buffer whose size is a host bound of the
selection (``num_selected(N, ratio_max)``; ``N`` for ``sampled``), so nothing synchronises with the device.

**At ρ = 1** (every eligible token kept with weight 1: ``topk``/``stratified`` at a host ratio of 1 without the
dynamic threshold, a token-mean aggregation, temperature 1 and no soft-cap, on a kernel device) the loss is
separable per token up to the scalar ``1/D``, so its gradient is computed in the forward, in one pass over the
LM head (:func:`cggr_torch.token_stats_one_pass.token_stats_with_gradient`: three ``N·V·d`` GEMMs instead of the
statistics' one plus the backward's three) and scaled by the upstream gradient in the backward, in place. Same loss, mask,
metrics and gradients (tests/torch/test_policy_gradient_one_pass.py); ``∂W`` is summed over the row blocks in
the weight's dtype.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from cggr import CGGRConfig
from cggr.config import reject_reference_scoring

from .curriculum import Curriculum, Schedule, base_ratio, dynamic_ratio, host_step, num_selected
from .fused_linear import DEFAULT_MEMORY_BUDGET
from .loss import check_schedule
from .pipeline import host_metrics, measure_scores
from .scoring import scores_from_statistics
from .token_stats import check_transform, fused_linear_statistics, token_stats_on_rows
from .token_stats_one_pass import ONE_PASS_MEMORY_BUDGET, one_pass_available, token_stats_with_gradient
from .types import TokenScores, TokenStatistics
from .utils import resolve_config

__all__ = ["LOSS_TYPES", "PG_CONFIG", "PG_METRIC_KEYS", "PolicyGradientLoss", "PolicyGradientOutput",
           "policy_gradient_capacity", "policy_gradient_loss"]

#: SPEC §14.3: the aggregations, TRL's names (``grpo`` = sequence-mean, ``dapo``/``bnpo`` = token-mean).
LOSS_TYPES = ("grpo", "sequence-mean", "dapo", "token-mean", "bnpo")
_SEQUENCE_MEAN = ("grpo", "sequence-mean")
#: The CGGR defaults of the policy-gradient loss: the entropy top-20 % of "Beyond the 80/20 Rule", fixed from
#: the first step (no warmup, no dynamic threshold).
PG_CONFIG = CGGRConfig(scoring="entropy", selection="topk", dynamic_threshold=False, min_tokens_ratio=0.2,
                       warmup_steps=0)
#: Metrics beyond SPEC §10: the fraction of kept tokens whose clip is active, the mean k3 KL over kept tokens.
PG_METRIC_KEYS = ("clip_fraction", "kl")


class PolicyGradientOutput(NamedTuple):
    """``loss`` (float32 scalar with gradient), ``metrics`` (SPEC §10 plus :data:`PG_METRIC_KEYS`, 0-d
    tensors), the kept-token ``mask`` and the per-token ``logprob``/``entropy`` of every token (no gradient;
    what a trainer logs or stores as the next ``old_logprob``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    mask: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor


def _check_real(value: Any, name: str, low: float = 0.0, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < low:
        raise ValueError(f"{name}: expected {'None or ' if allow_none else ''}a finite number >= {low}, got "
                         f"{value!r}")
    return float(value)


def _check_per_token(x: Any, name: str, shape: tuple[int, ...], device: torch.device,
                     allow_sequence: bool = False) -> Optional[torch.Tensor]:
    """A floating tensor of the token ``shape`` (or, ``allow_sequence``, one value per sequence), as float32."""
    if x is None:
        return None
    seq = (shape[0],) if len(shape) == 2 else (1,)
    ok_shapes = [shape] + ([seq] if allow_sequence else [])
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or tuple(x.shape) not in ok_shapes:
        want = " or ".join(str(s) for s in ok_shapes)
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating tensor of shape {want}, got {got}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (that of hidden), got {x.device}")
    x = x.detach().to(torch.float32)
    if tuple(x.shape) != shape:     # one value per sequence: broadcast along the tokens
        x = x.reshape(seq + (1,) * (len(shape) - 1)).expand(shape) if len(shape) == 2 else x.expand(shape)
    return x


def policy_gradient_capacity(num_tokens: int, num_sequences: int, base: Any, config: CGGRConfig) -> int:
    """The most tokens the configuration can keep from ``num_tokens`` at curriculum ratio ``base`` (the size of
    the backward's row buffer): ``num_selected(N, r_max)``, ``r_max`` the ratio at zero confidence when the
    dynamic threshold applies (SPEC §5.2 is monotone in ``c̄``); ``sequence_aware`` adds
    ``min_tokens_per_sequence`` per sequence; ``sampled`` can draw every token (``N``)."""
    if num_tokens == 0:
        return 0
    if config.selection == "sampled":
        return int(num_tokens)
    r = float(np.float32(base))
    if config.uses_dynamic_threshold:
        r = float(dynamic_ratio(r, 0.0, config.threshold_sensitivity))
    k = num_selected(int(num_tokens), r)
    if config.selection == "sequence_aware":
        k += int(num_sequences) * int(config.min_tokens_per_sequence)
    return int(min(num_tokens, k))


def _objective(lp: torch.Tensor, live: torch.Tensor, old: Optional[torch.Tensor], adv: torch.Tensor,
               ref: Optional[torch.Tensor], pg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §14.3's per-token ``ℓ_i`` (module docstring), its k3 KL term and whether the clip is inactive, for
    the rows' log-probs ``lp`` (with or without gradient); ``old``/``adv``/``ref`` are the same rows' values
    (``old`` None: on-policy). Rows with ``live = False`` read zeros (their values may be anything)."""
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    old_r = lp.detach() if old is None else torch.where(live, old, zero)
    adv_r = torch.where(live, adv, zero)
    ratio = torch.exp(lp - old_r)
    clipped = torch.clamp(ratio, 1.0 - pg["epsilon_low"], 1.0 + pg["epsilon_high"])
    unclipped = ratio * adv_r <= clipped * adv_r
    # min(r·A, r̃·A) with the tie given to r·A; where the clip is active r̃ is constant in lp.
    ell = -torch.where(unclipped, ratio * adv_r, clipped.detach() * adv_r)
    kl = torch.zeros_like(ell)
    if ref is not None:
        d = torch.where(live, ref, zero) - lp
        kl = torch.exp(d) - d - 1.0
        ell = ell + pg["beta"] * kl
    return ell, kl, unclipped


def _checked_extras(hidden, targets, advantages, old_logprob, ref_logprob, pg: dict[str, Any]):
    """The per-token inputs as float32 token-shaped tensors and ``extra``: the tokens whose advantage, old and
    reference log-probs are finite (the others are not eligible, counted in ``tokens_nonfinite``, SPEC §10, so
    they can never make the loss NaN)."""
    shape = tuple(hidden.shape[:-1])
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != shape:
        got = f"shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected an integer tensor of shape {shape} (the leading dims of hidden), "
                         f"got {got}")
    dev = hidden.device
    adv = _check_per_token(advantages, "advantages", shape, dev, allow_sequence=True)
    if adv is None:
        raise ValueError("advantages: expected a floating tensor (one value per sequence or per token), got None")
    old = _check_per_token(old_logprob, "old_logprob", shape, dev)
    ref = _check_per_token(ref_logprob, "ref_logprob", shape, dev)
    beta = pg["beta"]
    if (ref is None) != (beta == 0.0):
        raise ValueError(f"ref_logprob: the KL term needs both beta > 0 and ref_logprob (got beta={beta} and "
                         f"ref_logprob {'None' if ref is None else 'given'}); a reference with beta = 0 would be "
                         f"silently unused")
    extra = torch.isfinite(adv)
    for x in (old, ref):
        if x is not None:
            extra = extra & torch.isfinite(x)
    return adv, old, ref, extra


def _one_pass_applies(hidden, weight, bias, base: Any, config: CGGRConfig, pg: dict[str, Any]) -> bool:
    """The ρ = 1 policy gradient in one pass
    (:func:`cggr_torch.token_stats_one_pass.token_stats_with_gradient`): every eligible token is kept with weight 1 (``topk``/``stratified`` at a host ratio of 1, no dynamic threshold),
    the normaliser is one scalar (token-mean aggregations: then ``∂L/∂lp_i`` is separable up to ``1/D``, applied
    after the pass), a gradient is wanted, and the kernels run (temperature 1, no soft-cap)."""
    return (pg["loss_type"] not in _SEQUENCE_MEAN and config.selection in ("topk", "stratified")
            and not config.uses_dynamic_threshold and float(np.float32(base)) == 1.0
            and torch.is_grad_enabled()
            and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
            and one_pass_available(hidden, pg["temperature"], pg["softcap"]))


class _PrecomputedGradients(torch.autograd.Function):
    """Attaches gradients computed in the forward (the one-pass path) to the loss: the backward scales them by
    ``grad · scale`` in place and hands them on (no copy of the ``V × d`` weight gradient)."""

    @staticmethod
    def forward(ctx, value, scale, hidden, weight, bias, gh, gw, gb):
        ctx.save_for_backward(scale)
        ctx.grads = (gh, gw, gb)
        ctx.hidden_shape = hidden.shape
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        if ctx.grads is None:
            raise RuntimeError("policy_gradient_loss: the one-pass loss (rho = 1) stores its gradients and hands "
                               "them on in its first backward; a second backward through the same loss "
                               "(retain_graph=True) is not supported - recompute the loss")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        s = grad.to(torch.float32) * scale
        gh, gw, gb = (None if x is None else x.mul_(s) for x in (gh, gw, gb))
        gh = None if gh is None else gh.reshape(ctx.hidden_shape)
        return None, None, gh, gw, gb, None, None, None


def _run_one_pass(hidden, weight, targets, bias, adv, old, ref, extra, step: int, base: Any, config: CGGRConfig,
                  pg: dict[str, Any]) -> PolicyGradientOutput:
    """:func:`_run` at ρ = 1 in one pass over the LM head (see :func:`_one_pass_applies`): the gradient of
    ``Σ_{i eligible} ℓ_i / D'`` row block by row block (``D'`` the eligible count predicted from finite hidden
    rows), scaled by ``D'/D`` once the true count ``D`` is known (on the device, no synchronisation; exactly 1
    unless a finite row's statistics were not); the loss, mask and metrics as :func:`_run` computes them."""
    flat = [None if x is None else x.reshape(-1) for x in (old, adv, ref)]
    extra_f = extra.reshape(-1)
    has_t = (targets != config.ignore_index).reshape(-1)
    # The normaliser as predicted before the pass (finite hidden rows; the statistics of a finite row are finite
    # unless its logits overflow or the head holds a NaN): the pass scales by 1/D', the backward by D'/D, which
    # is exactly 1 whenever the prediction holds - so no extra rounding of the stored gradients then.
    h_ok = torch.isfinite(hidden.detach().reshape(-1, hidden.shape[-1])).all(dim=1)
    predicted = torch.clamp((has_t & extra_f & h_ok).sum(), min=1).to(torch.float32)

    def row_grad(r0: int, r1: int, logprob: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        live = ok & has_t[r0:r1] & extra_f[r0:r1]
        with torch.enable_grad():
            x = logprob.detach().requires_grad_(True)
            ell, _, _ = _objective(x, live, *(None if v is None else v[r0:r1] for v in flat), pg)
            (g,) = torch.autograd.grad(torch.where(live, ell, torch.zeros_like(ell)).sum() / predicted, x)
        return torch.where(live, g, torch.zeros_like(g))

    res = token_stats_with_gradient(hidden, weight, targets, bias, row_grad,
                                    need_hidden=hidden.requires_grad, need_weight=weight.requires_grad,
                                    need_bias=bias is not None and bias.requires_grad,
                                    ignore_index=config.ignore_index,
                                    row_chunk_size=pg["chunks"]["row_chunk_size"],
                                    memory_budget_bytes=pg["one_pass_budget"])
    shape = tuple(hidden.shape[:-1])
    stats = TokenStatistics(*(x.reshape(shape) for x in res.statistics))
    scores = scores_from_statistics(stats, targets, config.scoring, config.ignore_index)
    scores = TokenScores(scores.difficulty, scores.eligible & extra, scores.valid, scores.stats)
    measured = measure_scores(scores, step, base, config)
    mask = measured.mask
    live = mask.reshape(-1)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    lp = torch.where(has_t, -res.statistics.nll, torch.zeros_like(res.statistics.nll))
    with torch.no_grad():
        ell, kl, unclipped = _objective(lp, live, *flat, pg)
        denom = torch.clamp(scores.eligible.sum(), min=1).to(torch.float32)
        value = torch.where(live, ell, zero).sum(dtype=torch.float32) / denom
        kept = torch.clamp(live.sum(), min=1).to(torch.float32)
    loss = _PrecomputedGradients.apply(value, predicted / denom, hidden, weight, bias, res.grad_hidden, res.grad_weight,
                                       res.grad_bias)
    metrics = dict(measured.metrics)
    metrics["clip_fraction"] = ((live & ~unclipped).sum().to(torch.float32) / kept).detach()
    metrics["kl"] = (torch.where(live, kl, zero).sum() / kept).detach()
    return PolicyGradientOutput(loss, metrics, mask, lp.reshape(shape), stats.entropy)


def _run(hidden, weight, targets, advantages, old_logprob, ref_logprob, bias, step: int, base: Any,
         config: CGGRConfig, pg: dict[str, Any]) -> PolicyGradientOutput:
    if _one_pass_applies(hidden, weight, bias, base, config, pg):
        adv, old, ref, extra = _checked_extras(hidden, targets, advantages, old_logprob, ref_logprob, pg)
        return _run_one_pass(hidden, weight, targets, bias, adv, old, ref, extra, step, base, config, pg)
    stats = fused_linear_statistics(hidden, weight, targets, bias, temperature=pg["temperature"],
                                    softcap=pg["softcap"], ignore_index=config.ignore_index, **pg["chunks"])
    shape = tuple(hidden.shape[:-1])
    dev = hidden.device
    adv, old, ref, extra = _checked_extras(hidden, targets, advantages, old_logprob, ref_logprob, pg)
    scores = scores_from_statistics(stats, targets, config.scoring, config.ignore_index)
    scores = TokenScores(scores.difficulty, scores.eligible & extra, scores.valid, scores.stats)
    measured = measure_scores(scores, step, base, config)
    mask = measured.mask
    N = int(math.prod(shape))
    B = shape[0] if len(shape) == 2 else 1
    cap = policy_gradient_capacity(N, B, base, config)
    flat_mask = mask.reshape(-1)
    rows = torch.argsort((~flat_mask).to(torch.int8), stable=True)[:cap]
    live = flat_mask[rows]
    out = token_stats_on_rows(hidden, weight, targets, bias, stats, rows, live, need=("logprob",),
                              temperature=pg["temperature"], softcap=pg["softcap"],
                              ignore_index=config.ignore_index, **pg["chunks"])
    lp = out.logprob
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    ell, kl, unclipped = _objective(lp, live, *(None if x is None else x.reshape(-1)[rows] for x in (old, adv, ref)),
                                    pg)
    weights = measured.weights.reshape(-1)[rows]
    elig = scores.eligible.reshape(B, -1)
    if pg["loss_type"] in _SEQUENCE_MEAN:
        per_seq = torch.clamp(elig.sum(dim=1), min=1).to(torch.float32) * float(B)
        denom = per_seq[rows // elig.shape[1]]
    else:
        denom = torch.clamp(elig.sum(), min=1).to(torch.float32).expand(rows.shape)
    loss = torch.where(live, weights * ell / denom, zero).sum(dtype=torch.float32)
    kept = torch.clamp(live.sum(), min=1).to(torch.float32)
    metrics = dict(measured.metrics)
    metrics["clip_fraction"] = ((live & ~unclipped).sum().to(torch.float32) / kept).detach()
    metrics["kl"] = (torch.where(live, kl, zero).sum() / kept).detach()
    has_t = targets != config.ignore_index
    logprob_all = torch.where(has_t, -stats.nll, torch.zeros_like(stats.nll))
    return PolicyGradientOutput(loss, metrics, mask, logprob_all, stats.entropy)


def _pg_settings(beta, epsilon_low, epsilon_high, loss_type, temperature, softcap, row_chunk_size,
                 vocab_chunk_size, memory_budget_bytes) -> dict[str, Any]:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    eps_low = _check_real(epsilon_low, "epsilon_low")
    eps_high = _check_real(epsilon_high, "epsilon_high", allow_none=True)
    temperature, softcap = check_transform(temperature, softcap)
    return dict(beta=_check_real(beta, "beta"), epsilon_low=eps_low,
                epsilon_high=eps_low if eps_high is None else eps_high, loss_type=loss_type,
                temperature=temperature, softcap=softcap,
                chunks=dict(row_chunk_size=row_chunk_size, vocab_chunk_size=vocab_chunk_size,
                            memory_budget_bytes=(DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None
                                                 else memory_budget_bytes)),
                one_pass_budget=ONE_PASS_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes)


def _config(config, settings) -> CGGRConfig:
    cfg = resolve_config(config, settings, defaults=PG_CONFIG)
    reject_reference_scoring(cfg, "the policy-gradient loss")
    return cfg


def policy_gradient_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         advantages: torch.Tensor, old_logprob: Optional[torch.Tensor] = None,
                         ref_logprob: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                         step: int = 0, beta: float = 0.0, epsilon_low: float = 0.2,
                         epsilon_high: Optional[float] = None, loss_type: str = "dapo", temperature: float = 1.0,
                         softcap: Optional[float] = None, scoring: str = PG_CONFIG.scoring,
                         selection: str = PG_CONFIG.selection,
                         dynamic_threshold: bool = PG_CONFIG.dynamic_threshold,
                         threshold_sensitivity: float = PG_CONFIG.threshold_sensitivity,
                         min_tokens_ratio: float = PG_CONFIG.min_tokens_ratio,
                         warmup_steps: int = PG_CONFIG.warmup_steps, num_strata: int = PG_CONFIG.num_strata,
                         min_tokens_per_sequence: int = PG_CONFIG.min_tokens_per_sequence,
                         ignore_index: int = PG_CONFIG.ignore_index, sample_power: float = PG_CONFIG.sample_power,
                         sample_uniform_mix: float = PG_CONFIG.sample_uniform_mix,
                         sample_floor: float = PG_CONFIG.sample_floor, sample_seed: int = PG_CONFIG.sample_seed,
                         ratio_schedule: Optional[Schedule] = None, config: Optional[CGGRConfig] = None,
                         row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                         memory_budget_bytes: Optional[int] = None) -> PolicyGradientOutput:
    """The clipped policy-gradient loss on CGGR's kept tokens, without the ``(N, V)`` logits (SPEC §14.3).

    Args:
        hidden: ``(B, T, d)`` (``B`` sequences) or ``(N, d)`` (one sequence), aligned with ``targets``.
        weight, bias: the LM head (``(V, d)``, ``(V,)``), dtype and device of ``hidden``.
        targets: the sampled tokens, integer, token shape; ``ignore_index`` on prompt and padding positions.
        advantages: floating, one per sequence (``(B,)``; ``(1,)`` for 2-D input) or per token.
        old_logprob: floating, token shape: the sampling policy's log-probs (None: on-policy, ratio 1).
        ref_logprob: floating, token shape: the reference model's log-probs; needed iff ``beta > 0``.
        step: the curriculum step (host int; the module form holds it).
        beta: the k3 KL coefficient (``≥ 0``). epsilon_low, epsilon_high: the clip range ``[1 − ε_low,
            1 + ε_high]`` (``epsilon_high=None``: ``ε_low``).
        loss_type: one of :data:`LOSS_TYPES`.
        temperature, softcap: SPEC §14.1 (the sampler's temperature, the model's logit soft-cap).
        scoring ... sample_seed, ratio_schedule, config: the CGGR selection (SPEC §3-§7), defaults
            :data:`PG_CONFIG` (entropy top-20 %, from step 0); ``scoring='excess'`` is not supported.
        row_chunk_size, vocab_chunk_size, memory_budget_bytes: as
            :func:`cggr_torch.token_stats.fused_linear_token_stats`; ``memory_budget_bytes=None``: its 0.25 GiB,
            or 1 GiB (``ONE_PASS_MEMORY_BUDGET``) where the ρ = 1 one pass runs (SPEC §14.4).

    Returns:
        :class:`PolicyGradientOutput`.
    """
    cfg = _config(config, dict(scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
                               threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
                               warmup_steps=warmup_steps, num_strata=num_strata,
                               min_tokens_per_sequence=min_tokens_per_sequence, ignore_index=ignore_index,
                               sample_power=sample_power, sample_uniform_mix=sample_uniform_mix,
                               sample_floor=sample_floor, sample_seed=sample_seed))
    pg = _pg_settings(beta, epsilon_low, epsilon_high, loss_type, temperature, softcap, row_chunk_size,
                      vocab_chunk_size, memory_budget_bytes)
    schedule = check_schedule(ratio_schedule, cfg)
    step = host_step(step)
    return _run(hidden, weight, targets, advantages, old_logprob, ref_logprob, bias, step,
                base_ratio(schedule, step), cfg, pg)


class PolicyGradientLoss(Curriculum, nn.Module):
    """:func:`policy_gradient_loss` as a module that holds the curriculum step (SPEC §5.4) and the metrics.

    ``forward(hidden, weight, targets, advantages, old_logprob=None, ref_logprob=None, bias=None)`` returns
    the loss; :meth:`get_metrics` the last call's metrics as Python scalars; call :meth:`step` after each
    optimizer step. Arguments as :func:`policy_gradient_loss`.
    """

    def __init__(self, *, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                 loss_type: str = "dapo", temperature: float = 1.0, softcap: Optional[float] = None,
                 scoring: str = PG_CONFIG.scoring, selection: str = PG_CONFIG.selection,
                 dynamic_threshold: bool = PG_CONFIG.dynamic_threshold,
                 threshold_sensitivity: float = PG_CONFIG.threshold_sensitivity,
                 min_tokens_ratio: float = PG_CONFIG.min_tokens_ratio, warmup_steps: int = PG_CONFIG.warmup_steps,
                 num_strata: int = PG_CONFIG.num_strata,
                 min_tokens_per_sequence: int = PG_CONFIG.min_tokens_per_sequence,
                 ignore_index: int = PG_CONFIG.ignore_index, sample_power: float = PG_CONFIG.sample_power,
                 sample_uniform_mix: float = PG_CONFIG.sample_uniform_mix,
                 sample_floor: float = PG_CONFIG.sample_floor, sample_seed: int = PG_CONFIG.sample_seed,
                 ratio_schedule: Optional[Schedule] = None, config: Optional[CGGRConfig] = None,
                 row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                 memory_budget_bytes: Optional[int] = None) -> None:
        super().__init__()
        self.config = _config(config, dict(
            scoring=scoring, selection=selection, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, num_strata=num_strata, min_tokens_per_sequence=min_tokens_per_sequence,
            ignore_index=ignore_index, sample_power=sample_power, sample_uniform_mix=sample_uniform_mix,
            sample_floor=sample_floor, sample_seed=sample_seed))
        self.pg = _pg_settings(beta, epsilon_low, epsilon_high, loss_type, temperature, softcap, row_chunk_size,
                               vocab_chunk_size, memory_budget_bytes)
        self._init_curriculum(self.config.min_tokens_ratio, self.config.warmup_steps,
                              check_schedule(ratio_schedule, self.config))
        self._metrics: Optional[dict[str, torch.Tensor]] = None
        self.last_output: Optional[PolicyGradientOutput] = None

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                advantages: torch.Tensor, old_logprob: Optional[torch.Tensor] = None,
                ref_logprob: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = _run(hidden, weight, targets, advantages, old_logprob, ref_logprob, bias, self._step,
                   self.base_ratio(), self.config, self.pg)
        self._metrics = out.metrics
        self.last_output = out
        return out.loss

    def get_metrics(self) -> dict[str, Any]:
        """SPEC §10 metrics and :data:`PG_METRIC_KEYS` of the last ``forward`` as Python scalars (synchronises)."""
        return host_metrics(self._metrics, self._step, self.base_ratio(), self.config, extra_keys=PG_METRIC_KEYS)
