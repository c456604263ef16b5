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
backward (:mod:`cggr_jax.dispatch` decides; ``CGGR_DISABLE_KERNELS=1`` forces the XLA reference). The
steps are those of :mod:`cggr_jax.pipeline`.

Everything is traced: ``step`` is an int32 scalar array, the curriculum is an ``optax.Schedule`` and the
dynamic threshold a float32 reduction, so a jitted training step compiles once for the whole run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from cggr import INT_METRIC_KEYS, METRIC_KEYS, NUMERIC_METRIC_KEYS, CGGRConfig

from cggr_jax import curriculum, dispatch, pipeline, scoring, selection, utils

__all__ = ["METRIC_KEYS", "NUMERIC_METRIC_KEYS", "CGGRLoss", "cggr_loss", "metrics_to_dict", "metric_template",
           "DEFAULT_CONFIG", "resolve_config"]

DEFAULT_CONFIG = utils.DEFAULT_CONFIG
metric_template = pipeline.metric_template


def resolve_config(config: CGGRConfig | None, settings: Mapping[str, Any], *, caller: str) -> CGGRConfig:
    """The one ``CGGRConfig`` of an entry point that takes both ``config=`` and the keyword settings: the
    settings (validated by ``CGGRConfig``) or ``config`` — giving ``config`` and a changed setting is a
    :class:`ValueError` naming both (a silent precedence would hide one of them)."""
    if config is None:
        return CGGRConfig.from_kwargs(dict(settings), caller=caller)
    if not isinstance(config, CGGRConfig):
        raise ValueError(f"config: expected a cggr.CGGRConfig, got {type(config).__name__}")
    changed = sorted(k for k, v in settings.items()
                     if not (v is getattr(DEFAULT_CONFIG, k) or (type(v) is type(getattr(DEFAULT_CONFIG, k))
                                                                  and v == getattr(DEFAULT_CONFIG, k))))
    if changed:
        raise ValueError(f"config: pass either config= or the settings {changed}, not both ({caller})")
    return config


# --------------------------------------------------------------------------------------------- the loss
@dataclasses.dataclass(frozen=True)
class CGGRLoss:
    """Confidence-gated selective cross-entropy (SPEC §2–§8, §10): a frozen, hashable configuration whose
    call ``(logits, targets, step) -> (loss, metrics)`` is a pure function (``jit``/``grad`` friendly).

    Args (the settings of ``cggr.CGGRConfig``, with its defaults):
      scoring: ``'combined'`` (default), ``'entropy'``, ``'margin'``, ``'loss'`` (SPEC §3) or ``'excess'``
        (``nll − reference_nll``, SPEC §3.1; pass ``reference_nll`` to the call).
      selection: ``'topk'``, ``'stratified'`` (default), ``'sequence_aware'``, ``'fixed_quota'`` (SPEC §7) or
        ``'sampled'`` (SPEC §7.4: a random draw of ``k`` expected tokens, each loss weighted by ``1/π``).
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
      sample_power, sample_uniform_mix, sample_floor, sample_seed: ``β >= 0``, ``λ ∈ [0, 1]``, ``ε > 0`` and
        the hash seed of ``'sampled'`` (SPEC §7.4; the draws depend on the traced ``step``, no recompilation).

    :attr:`config` holds the one validated ``cggr.CGGRConfig``; :meth:`from_config` builds a loss from one.

    Call: ``logits`` ``(B, T, V)`` or ``(N, V)`` (float32/float16/bfloat16), ``targets`` of the leading shape
    (integer; already aligned — use :func:`cggr_jax.shift_for_causal_lm` for a causal LM), ``step`` an
    integer scalar (e.g. :func:`cggr_jax.current_step` of the optimizer state). Returns the float32 loss and
    a dict of scalar arrays with the keys :data:`NUMERIC_METRIC_KEYS`.

    Errors: configuration → :class:`ValueError` at construction; shapes and dtypes → :class:`ValueError` at
    trace time; a label dtype that cannot hold ``ignore_index`` (``uint8`` with −100) → :class:`ValueError`;
    concrete targets outside ``[0, V)`` (other than ``ignore_index``) → :class:`ValueError`, checked on the
    caller's values before any conversion. Under ``jit`` such a target cannot raise: its token is not eligible
    and is counted in ``tokens_out_of_range`` (SPEC §11).
    """

    scoring: str = DEFAULT_CONFIG.scoring
    selection: str = DEFAULT_CONFIG.selection
    dynamic_threshold: bool = DEFAULT_CONFIG.dynamic_threshold
    threshold_sensitivity: float = DEFAULT_CONFIG.threshold_sensitivity
    min_tokens_ratio: float = DEFAULT_CONFIG.min_tokens_ratio
    warmup_steps: int = DEFAULT_CONFIG.warmup_steps
    num_strata: int = DEFAULT_CONFIG.num_strata
    min_tokens_per_sequence: int = DEFAULT_CONFIG.min_tokens_per_sequence
    ignore_index: int = DEFAULT_CONFIG.ignore_index
    ratio_schedule: optax.Schedule | None = None
    sample_power: float = DEFAULT_CONFIG.sample_power
    sample_uniform_mix: float = DEFAULT_CONFIG.sample_uniform_mix
    sample_floor: float = DEFAULT_CONFIG.sample_floor
    sample_seed: int = DEFAULT_CONFIG.sample_seed

    def __post_init__(self) -> None:
        settings = {name: getattr(self, name) for name in dataclasses.asdict(DEFAULT_CONFIG)}
        if isinstance(settings["dynamic_threshold"], np.bool_):
            settings["dynamic_threshold"] = bool(settings["dynamic_threshold"])
        config = CGGRConfig.from_kwargs(settings, caller=type(self).__name__)
        if config.num_strata > selection.MAX_STRATA:   # the JAX selection's integer arithmetic bound
            raise ValueError(f"num_strata: expected an integer <= {selection.MAX_STRATA}, got {config.num_strata}")
        for name, value in dataclasses.asdict(config).items():
            object.__setattr__(self, name, value)   # the normalised values (hash/eq of equal configs agree)
        object.__setattr__(self, "_config", config)   # not a field: the settings above are the fields
        curriculum.check_schedule(self.ratio_schedule)

    @property
    def config(self) -> CGGRConfig:
        """The one validated ``cggr.CGGRConfig`` of these settings."""
        return self._config

    @classmethod
    def from_config(cls, config: CGGRConfig, **kwargs: Any) -> "CGGRLoss":
        """The loss of a ``cggr.CGGRConfig`` (``kwargs``: ``ratio_schedule`` and a subclass's own fields)."""
        if not isinstance(config, CGGRConfig):
            raise ValueError(f"config: expected a cggr.CGGRConfig, got {type(config).__name__}")
        return cls(**dataclasses.asdict(config), **kwargs)

    @property
    def schedule(self) -> optax.Schedule:
        """The curriculum in use: ``ratio_schedule`` or ``linear_warmup_ratio(min_tokens_ratio, warmup_steps)``."""
        return curriculum.schedule_for(self.config, self.ratio_schedule)

    def check_call(self, logits: Any, targets: Any, step: Any,
                   targets_name: str = "targets") -> tuple[jax.Array, jax.Array, jax.Array]:
        """The argument checks of a call (SPEC §1, §11): ``(logits, targets, step)`` as arrays, or
        :class:`ValueError` naming the argument (``targets_name``: the caller's name for the targets)."""
        logits = utils.as_logits(logits)
        targets = utils.as_targets(targets, logits.shape, targets_name, ignore_index=self.ignore_index)
        step = curriculum.check_step(step)
        if self.ratio_schedule is not None and not utils.is_traced(step):
            # A concrete step lets us check the custom schedule's value (SPEC §5.1: in (0, 1]).
            curriculum.check_ratio_value(curriculum.schedule_value(self.ratio_schedule, step),
                                         "ratio_schedule(step)")
        return logits, targets, step

    def __call__(self, logits: jax.Array, targets: jax.Array, step: Any, reference_nll: Any = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)`` for one batch at curriculum step ``step`` (see the class docstring).

        ``reference_nll``: with ``scoring='excess'`` (and only then), the reference model's per-token loss, a
        floating array of the targets' shape; the difficulty is ``nll − reference_nll`` (SPEC §3.1). It is an
        array argument of the jitted body (None is static), so a new reference does not recompile.
        """
        logits, targets, step = self.check_call(logits, targets, step)
        reference_nll = scoring.check_reference_nll(reference_nll, self.scoring, tuple(targets.shape))
        return _loss_impl(logits, targets, step, reference_nll, config=self.config,
                          schedule=self.ratio_schedule, kernel=dispatch.use_kernels(logits))


@functools.partial(jax.jit, static_argnames=("config", "schedule", "kernel"))
def _loss_impl(logits: jax.Array, targets: jax.Array, step: jax.Array, reference_nll: jax.Array | None, *,
               config: CGGRConfig, schedule: Any, kernel: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss, _, metrics = selective_loss(logits, targets, step, config=config, schedule=schedule, kernel=kernel,
                                      reference_nll=reference_nll)
    return loss, metrics


def selective_loss(logits: jax.Array, targets: jax.Array, step: jax.Array, *, config: CGGRConfig,
                   schedule: Any = None, kernel: bool, reference_nll: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The traced body of :class:`CGGRLoss` on checked inputs: ``(loss, mask, metrics)`` (the pipeline's
    steps, :mod:`cggr_jax.pipeline`). ``schedule``: a ``ratio_schedule`` or None for the config's warmup;
    ``reference_nll``: the checked float32 reference of ``scoring='excess'`` (SPEC §3.1), else None."""
    V = logits.shape[-1]
    not_ignored, in_range, safe = utils.target_masks(targets, V, config.ignore_index)
    has_target = not_ignored & in_range
    # The selection carries no gradient (SPEC §8): statistics of the stopped logits.
    stats = scoring.dispatch_statistics(jax.lax.stop_gradient(logits), safe, has_target, config.ignore_index,
                                        kernel=kernel)
    stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
    scores = scoring.scores_from_statistics(stats, config.scoring, not_ignored=not_ignored, in_range=in_range,
                                            reference_nll=reference_nll)
    measured = pipeline.select_and_measure(scores, in_range, step, config=config,
                                           schedule=curriculum.schedule_for(config, schedule))
    loss = pipeline.selective_cross_entropy(logits, safe, has_target, measured.mask, stats, config.ignore_index,
                                            kernel=kernel, row_weights=pipeline.loss_weights(measured, config))
    return loss.astype(jnp.float32), measured.mask, measured.metrics


def cggr_loss(logits: jax.Array, targets: jax.Array, step: Any, *, reference_nll: Any = None, **config: Any,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Functional form: ``CGGRLoss(**config)(logits, targets, step, reference_nll)`` → ``(loss, metrics)``."""
    return CGGRLoss(**config)(logits, targets, step, reference_nll)


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
        out[key] = int(value) if key in INT_METRIC_KEYS else float(value)
    out["selection"] = loss_fn.selection
    out["scoring"] = loss_fn.scoring
    return out
