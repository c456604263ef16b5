r"""``CGGRLoss``: the selective cross-entropy of SPEC §8 with the curriculum, threshold and metrics (§5, §10).

For logits :math:`z_i` and targets :math:`t_i`, with the selection :math:`\mathcal S` of SPEC §7 computed
from the difficulties of SPEC §3 (under ``stop_gradient``: the selection carries no gradient):

.. math::

    \mathcal L = \frac{1}{\max(1, |\mathcal S|)} \sum_{i \in \mathcal S} (\mathrm{lse}_i - z_{i,t_i}),
    \qquad
    \frac{\partial \mathcal L}{\partial z_i} =
        \frac{\mathrm{softmax}(z_i) - \mathrm{onehot}(t_i)}{\max(1, |\mathcal S|)}\ [i \in \mathcal S]

in float32 (the gradient is cast to the logits' dtype). With nothing selectable — an empty call, every token
ignored, every valid row non-finite — the loss is ``0.0`` and its gradient all zeros, never NaN: the forward
sums the selected rows' ``nll`` statistic, and the custom backward replaces every unselected row by zeros
before the exponential, so a NaN or infinite row cannot leak into the gradient (no ``0·NaN``). On a GPU
backend the Pallas selective cross-entropy (``cggr_jax.kernels``) computes the same loss with a sparse
backward; ``CGGR_DISABLE_KERNELS=1`` forces the XLA reference.

Everything is traced: ``step`` is an int32 scalar array, the curriculum is an ``optax.Schedule`` and the
dynamic threshold a float32 reduction, so a jitted training step compiles once for the whole run.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cggr_jax import curriculum, scoring, selection, utils

__all__ = ["METRIC_KEYS", "NUMERIC_METRIC_KEYS", "CGGRLoss", "cggr_loss", "metrics_to_dict", "metric_template"]

#: SPEC §10, in the order of the docs; the JAX metrics pytree holds all but the two strings.
METRIC_KEYS: tuple[str, ...] = (
    "step",
    "token_ratio",
    "effective_ratio",
    "tokens_selected",
    "tokens_total",
    "tokens_nonfinite",
    "tokens_out_of_range",
    "avg_confidence",
    "avg_entropy",
    "avg_difficulty",
    "selection",
    "scoring",
)
NUMERIC_METRIC_KEYS: tuple[str, ...] = METRIC_KEYS[:-2]
_INT_METRICS = frozenset({"step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"})


def metric_template() -> dict[str, jax.Array]:
    """Zero-valued metrics with the dtypes :class:`CGGRLoss` returns (int32 counts, float32 values)."""
    return {k: jnp.zeros((), jnp.int32 if k in _INT_METRICS else jnp.float32) for k in NUMERIC_METRIC_KEYS}


# ------------------------------------------------------------------------------ selective cross-entropy
@jax.custom_vjp
def _selected_ce(logits: jax.Array, safe_targets: jax.Array, mask: jax.Array, lse: jax.Array,
                 nll: jax.Array) -> jax.Array:
    """``Σ_{mask} nll / max(1, Σ mask)`` with the SPEC §8 gradient (see the module docstring).

    ``lse`` and ``nll = lse − z[t]`` are the (stop-gradient) statistics the selection was made from, so the
    forward reads no logits; ``safe_targets`` are in ``[0, V)``. The backward reads the logits once.
    """
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


@functools.lru_cache(maxsize=1)
def _load_ce_kernel() -> Callable[..., jax.Array] | None:
    try:
        from cggr_jax.kernels.cross_entropy import selective_cross_entropy_pallas
    except ImportError as err:
        warnings.warn(f"cggr_jax: the Pallas selective cross-entropy could not be imported ({err!r}); using "
                      f"the XLA reference on this GPU backend", RuntimeWarning, stacklevel=3)
        return None
    return selective_cross_entropy_pallas


def _use_ce_kernel() -> bool:
    """The Pallas selective cross-entropy on a GPU backend (same switch as the scoring kernel)."""
    if scoring.kernels_disabled() or jax.default_backend() not in scoring._GPU_PLATFORMS:
        return False
    return _load_ce_kernel() is not None


# --------------------------------------------------------------------------------------------- the loss
@dataclasses.dataclass(frozen=True)
class CGGRLoss:
    """Confidence-gated selective cross-entropy (SPEC §2–§8, §10): a frozen, hashable configuration whose
    call ``(logits, labels, step) -> (loss, metrics)`` is a pure function (``jit``/``grad`` friendly).

    Args:
      scoring: ``'combined'`` (default), ``'entropy'``, ``'margin'`` or ``'loss'`` (SPEC §3).
      selection: ``'topk'``, ``'stratified'`` (default), ``'sequence_aware'`` or ``'fixed_quota'`` (SPEC §7).
      dynamic_threshold: scale the ratio by ``1 + (1 − c̄)·threshold_sensitivity`` (SPEC §5.2; off for
        ``'fixed_quota'``).
      threshold_sensitivity: finite, ``>= 0`` (typically 0–1).
      min_tokens_ratio: the ratio after warmup, ``0 < r ≤ 1``.
      warmup_steps: integer ``>= 0``; the ratio falls linearly from 1 to ``min_tokens_ratio``.
      num_strata: ``S >= 1`` for ``'stratified'``.
      min_tokens_per_sequence: ``>= 0`` for ``'sequence_aware'`` (rows of a 3-D input are the sequences).
      ignore_index: target value that marks a token without a target (default −100).
      ratio_schedule: any ``optax.Schedule`` ``step -> ratio`` in ``(0, 1]``, replacing the default
        :func:`cggr_jax.curriculum.linear_warmup_ratio` (``min_tokens_ratio``, ``warmup_steps``).

    Call: ``logits`` ``(B, T, V)`` or ``(N, V)`` (float32/float16/bfloat16), ``labels`` of the leading shape
    (integer; already aligned — use :func:`cggr_jax.shift_for_causal_lm` for a causal LM), ``step`` an
    integer scalar (e.g. :func:`cggr_jax.current_step` of the optimizer state). Returns the float32 loss and
    a dict of scalar arrays with the keys :data:`NUMERIC_METRIC_KEYS`.

    Errors: configuration → :class:`ValueError` at construction; shapes and dtypes → :class:`ValueError` at
    trace time; concrete labels outside ``[0, V)`` (other than ``ignore_index``) → :class:`ValueError`. Under
    ``jit`` such a label cannot raise: its token is not eligible and is counted in ``tokens_out_of_range``.
    """

    scoring: str = "combined"
    selection: str = "stratified"
    dynamic_threshold: bool = True
    threshold_sensitivity: float = 0.5
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    ignore_index: int = -100
    ratio_schedule: optax.Schedule | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("scoring", utils.check_choice(self.scoring, "scoring", scoring.SCORING_MODES))
        set_("selection", utils.check_choice(self.selection, "selection", selection.SELECTION_STRATEGIES))
        if not isinstance(self.dynamic_threshold, (bool, np.bool_)):
            raise ValueError(f"dynamic_threshold: expected a bool, got {self.dynamic_threshold!r}")
        set_("dynamic_threshold", bool(self.dynamic_threshold))
        set_("threshold_sensitivity", utils.check_real(self.threshold_sensitivity, "threshold_sensitivity",
                                                       low=0.0))
        set_("min_tokens_ratio", utils.check_real(self.min_tokens_ratio, "min_tokens_ratio", low=0.0, high=1.0,
                                                  low_inclusive=False))
        set_("warmup_steps", utils.check_int(self.warmup_steps, "warmup_steps", minimum=0))
        set_("num_strata", utils.check_int(self.num_strata, "num_strata", minimum=1,
                                           maximum=selection.MAX_STRATA))
        set_("min_tokens_per_sequence", utils.check_int(self.min_tokens_per_sequence, "min_tokens_per_sequence",
                                                        minimum=0))
        set_("ignore_index", utils.check_int(self.ignore_index, "ignore_index"))
        if self.ratio_schedule is not None and not callable(self.ratio_schedule):
            raise ValueError(f"ratio_schedule: expected None or an optax.Schedule (a callable step -> ratio), "
                             f"got {type(self.ratio_schedule).__name__}")

    @property
    def schedule(self) -> optax.Schedule:
        """The curriculum in use: ``ratio_schedule`` or ``linear_warmup_ratio(min_tokens_ratio, warmup_steps)``."""
        if self.ratio_schedule is not None:
            return self.ratio_schedule
        return curriculum.linear_warmup_ratio(self.min_tokens_ratio, self.warmup_steps)

    def __call__(self, logits: jax.Array, labels: jax.Array, step: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)`` for one batch at curriculum step ``step`` (see the class docstring)."""
        logits = utils.as_logits(logits)
        labels = utils.as_targets(labels, logits.shape, "labels")
        utils.check_target_range(labels, logits.shape[-1], self.ignore_index, "labels")
        step = curriculum.check_step(step)
        if self.ratio_schedule is not None and not utils.is_traced(step):
            # A concrete step lets us check the custom schedule's value (SPEC §5.1: in (0, 1]).
            curriculum.check_ratio_value(_schedule_value(self.ratio_schedule, step), "ratio_schedule(step)")
        return _loss_impl(logits, labels, step, config=self, stats_kernel=scoring.use_kernel(),
                          ce_kernel=_use_ce_kernel())


def _schedule_value(schedule: optax.Schedule, step: jax.Array) -> jax.Array:
    value = jnp.asarray(schedule(step))
    if value.shape != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                 or jnp.issubdtype(value.dtype, jnp.integer)):
        raise ValueError(f"ratio_schedule(step): expected a real scalar in (0, 1], got dtype {value.dtype} and "
                         f"shape {value.shape}")
    return value.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "stats_kernel", "ce_kernel"))
def _loss_impl(logits: jax.Array, labels: jax.Array, step: jax.Array, *, config: CGGRLoss, stats_kernel: bool,
               ce_kernel: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    V = logits.shape[-1]
    not_ignored, in_range, safe = utils.target_masks(labels, V, config.ignore_index)
    has_target = not_ignored & in_range
    out_of_range = not_ignored & ~in_range
    # The selection carries no gradient (SPEC §8): statistics of the stopped logits.
    stats = scoring.dispatch_statistics(jax.lax.stop_gradient(logits), safe, has_target, config.ignore_index,
                                        kernel=stats_kernel)
    stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
    difficulty = scoring.difficulty_from_statistics(stats, config.scoring, has_targets=True)
    eligible = has_target & scoring.row_finite(stats, has_target) & ~jnp.isnan(difficulty)

    n = jnp.sum(eligible, dtype=jnp.int32)
    n_f = jnp.maximum(n, 1).astype(jnp.float32)

    def mean_over_eligible(x: jax.Array) -> jax.Array:
        return jnp.where(n > 0, jnp.sum(jnp.where(eligible, x, 0.0)) / n_f, jnp.float32(0.0))

    mean_conf = mean_over_eligible(stats.confidence)
    base = _schedule_value(config.schedule, step)
    if config.dynamic_threshold and config.selection != "fixed_quota":
        ratio = curriculum.dynamic_ratio(base, mean_conf, config.threshold_sensitivity)
    else:
        ratio = base
    mask, _ = selection._select_checked(difficulty, eligible, ratio, selection=config.selection,
                                        num_strata=config.num_strata,
                                        min_tokens_per_sequence=config.min_tokens_per_sequence)
    if ce_kernel:
        kernel_targets = jnp.where(has_target, safe, config.ignore_index)
        loss = _load_ce_kernel()(logits, kernel_targets, mask, ignore_index=config.ignore_index, stats=stats)
    else:
        loss = _selected_ce(logits, safe, mask, stats.lse, stats.nll)
    metrics = {
        "step": step,
        "token_ratio": base,
        "effective_ratio": ratio,
        "tokens_selected": jnp.sum(mask, dtype=jnp.int32),
        "tokens_total": n,
        "tokens_nonfinite": jnp.sum(has_target & ~eligible, dtype=jnp.int32),
        "tokens_out_of_range": jnp.sum(out_of_range, dtype=jnp.int32),
        "avg_confidence": mean_conf,
        "avg_entropy": mean_over_eligible(stats.entropy),
        "avg_difficulty": mean_over_eligible(difficulty),
    }
    return loss.astype(jnp.float32), metrics


def cggr_loss(logits: jax.Array, targets: jax.Array, step: Any, **config: Any,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Functional form: ``CGGRLoss(**config)(logits, targets, step)`` → ``(loss, metrics)``."""
    return CGGRLoss(**config)(logits, targets, step)


def metrics_to_dict(metrics: Mapping[str, Any], loss_fn: CGGRLoss) -> dict[str, Any]:
    """The docs' metrics dictionary: every numeric metric as a Python ``int``/``float`` plus the configured
    ``selection`` and ``scoring`` names, in the order of :data:`METRIC_KEYS`. Reads the values from the
    device (call it outside the training step)."""
    if not isinstance(loss_fn, CGGRLoss):
        raise ValueError(f"loss_fn: expected a CGGRLoss, got {type(loss_fn).__name__}")
    if not isinstance(metrics, Mapping) or set(metrics) != set(NUMERIC_METRIC_KEYS):
        got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
        raise ValueError(f"metrics: expected a dict with the keys {NUMERIC_METRIC_KEYS}, got {got}")
    host = jax.device_get(dict(metrics))
    out: dict[str, Any] = {}
    for key in NUMERIC_METRIC_KEYS:
        value = np.asarray(host[key])
        if value.shape != ():
            raise ValueError(f"metrics[{key!r}]: expected a scalar, got shape {value.shape}")
        out[key] = int(value) if key in _INT_METRICS else float(value)
    out["selection"] = loss_fn.selection
    out["scoring"] = loss_fn.scoring
    return out
