"""Framework integrations of ``cggr_jax``: the optax transform, where the curriculum step lives (SPEC §5.1).

``optax.chain(cggr_jax.advance_curriculum(), optax.adamw(1e-3))`` counts optimizer updates in a
:class:`CurriculumState` and keeps the metrics of the last loss call, passed to ``update`` as the extra
argument ``cggr_metrics=``. A training step reads the step with :func:`current_step` before computing the
loss, so the first update uses step 0, and checkpointing the optimizer state checkpoints the curriculum.

With Flax NNX (0.12): ``optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
``optimizer.update(model, grads, cggr_metrics=metrics)`` — ``nnx.Optimizer.update`` forwards its keyword
arguments to ``tx.update``. :func:`current_step` and :func:`latest_metrics` accept ``optimizer.opt_state``
(whose arrays NNX wraps in variables) as well as a plain optax state.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cggr import NUMERIC_METRIC_KEYS

from cggr_jax.pipeline import metric_template

__all__ = ["CurriculumState", "advance_curriculum", "current_step", "latest_metrics"]

_INT32_MAX = np.iinfo(np.int32).max


class CurriculumState(NamedTuple):
    """State of :func:`advance_curriculum`.

    ``step``: int32 scalar, the number of updates applied so far — the curriculum step of the next loss.
    ``metrics``: the ``cggr_metrics`` passed to the last update (zeros before the first), a dict of scalar
    arrays with the keys of :data:`cggr.NUMERIC_METRIC_KEYS`.
    """

    step: jax.Array
    metrics: dict[str, jax.Array]


def _coerce_metrics(metrics: Mapping[str, Any], template: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``metrics`` with the template's keys, shapes and dtypes (ValueError naming what differs)."""
    if not isinstance(metrics, Mapping) or set(metrics) != set(template):
        got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
        raise ValueError(f"cggr_metrics: expected the metrics dict returned by CGGRLoss (keys "
                         f"{tuple(template)}), got {got}")
    out = {}
    for key, ref in template.items():
        value = jnp.asarray(metrics[key])
        if value.shape != ():
            raise ValueError(f"cggr_metrics[{key!r}]: expected a scalar, got shape {value.shape}")
        out[key] = value.astype(jnp.asarray(ref).dtype)
    return out


def advance_curriculum() -> optax.GradientTransformationExtraArgs:
    """An optax transformation that leaves the updates unchanged and advances the CGGR curriculum.

    ``init`` → ``CurriculumState(step=0, metrics=zeros)``; every ``update(updates, state, params=None, *,
    cggr_metrics=None, **extra_args)`` increments ``step`` by one (saturating at ``2^31 − 1``) and, when
    ``cggr_metrics`` is given, stores it (otherwise the previous metrics are kept). Put it first in an
    ``optax.chain``; the other extra arguments are ignored.
    """

    def init_fn(params: optax.Params) -> CurriculumState:
        del params
        return CurriculumState(step=jnp.zeros((), jnp.int32), metrics=metric_template())

    def update_fn(updates: optax.Updates, state: CurriculumState, params: optax.Params | None = None, *,
                  cggr_metrics: Mapping[str, Any] | None = None,
                  **extra_args: Any) -> tuple[optax.Updates, CurriculumState]:
        del params, extra_args
        step = jnp.asarray(state.step)
        new_step = jnp.where(step < _INT32_MAX, step + 1, step).astype(jnp.int32)
        metrics = state.metrics if cggr_metrics is None else _coerce_metrics(cggr_metrics, state.metrics)
        return updates, CurriculumState(step=new_step, metrics=metrics)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap(x: Any) -> Any:
    """The array inside a Flax NNX variable (``optimizer.opt_state`` wraps its arrays), else ``x``."""
    get_value = getattr(x, "get_value", None)
    if callable(get_value) and not isinstance(x, (jax.Array, np.ndarray)):
        return get_value()
    return x


def _find_state(opt_state: Any) -> CurriculumState:
    found = [leaf for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, CurriculumState))
             if isinstance(leaf, CurriculumState)]
    if not found:
        raise ValueError("opt_state: no CurriculumState found; build the optimizer with "
                         "optax.chain(cggr_jax.advance_curriculum(), <your optimizer>)")
    if len(found) > 1:
        raise ValueError(f"opt_state: found {len(found)} CurriculumState entries; use advance_curriculum() "
                         f"once per optimizer")
    return found[0]


def current_step(opt_state: Any) -> jax.Array:
    """The curriculum step (int32 scalar) held by the :func:`advance_curriculum` state anywhere in
    ``opt_state`` (a plain optax state or ``nnx.Optimizer.opt_state``). :class:`ValueError` if there is none.
    """
    return jnp.asarray(_unwrap(_find_state(opt_state).step), dtype=jnp.int32)


def latest_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """The metrics stored by the last update (zeros before the first), as a dict of scalar arrays; pass it
    to :func:`cggr_jax.metrics_to_dict` for Python scalars."""
    metrics = _find_state(opt_state).metrics
    return {key: jnp.asarray(_unwrap(metrics[key])) for key in NUMERIC_METRIC_KEYS}
