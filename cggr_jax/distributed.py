r"""Data-parallel CGGR in JAX: token selection over the whole data-parallel batch (SPEC §13).

A batch sharded over a mesh axis (the *data axis*, ``W`` devices; shard ``r`` holds ``N`` tokens) can be
trained with two selection scopes:

``scope="global"`` (default)
    SPEC §5–§7 on the concatenation of the shards in device order along the data axis (that is the global
    array itself: shard ``r``'s token ``i`` has the global flat index ``r·N + i``). Under ``jax.jit`` the
    plain :func:`cggr_jax.cggr_loss` on a sharded global array already has exactly this meaning — ``jit`` is
    semantically a single-device program — but XLA's partitioner decides the communication and may gather
    whole logits (e.g. for a top-k over the vocabulary, or for a Pallas kernel, which it cannot partition).
    :func:`cggr_loss` therefore computes the global scope with :func:`jax.shard_map`: every device scores its
    own shard (no logits move), and only the difficulties are exchanged::

        d_g      = psum over the axis of (d_r placed at offset r·N, zeros elsewhere)    (N floats per device;
                   NaN marks a token that is not eligible, which SPEC §4 makes lossless)
        n, c̄     = eligible count of d_g,  psum(Σ_{eligible} p1) / max(1, n)
        ratio, k = SPEC §5 with this n and c̄;   mask_g = SPEC §7 on d_g (identical on every device)
        share_r  = Σ_{i ∈ mask_g on r} ce_i / max(1, |mask_g|)
        loss     = psum(share_r) = Σ_{i ∈ mask_g} ce_i / max(1, |mask_g|)

    The exchange is an all-reduce (``psum``) rather than an all-gather so that every result is replicated
    in the type system of ``shard_map`` (``check_vma``) in every supported JAX version; adding exact zeros
    changes no value. Every device then sorts ``W·N`` difficulties with the same exact comparison logic, so
    all derive the same cut-off; the gradient w.r.t. shard ``r``'s logits is the single-device gradient on
    the concatenated batch restricted to that shard.

``scope="local"``
    Every device applies SPEC §5–§8 to its own shard (its own ``n_r``, ``c̄_r``, ``ratio_r``, ``k_r``; no
    exchange of difficulties) and the loss is the mean of the shards' losses, ``psum(L_r) / W``: what a
    data-parallel step with per-device selection and gradient averaging computes.

Metrics (SPEC §10 keys, minus the two strings) are replicated: global counts and averages in the global
scope; in the local scope summed counts, token-weighted averages (``Σ_r avg_r·n_r / Σ_r n_r``, i.e. the
average over all eligible tokens) and the mean of the shards' ``effective_ratio``.

Public functions:

* :func:`cggr_loss` / :class:`DistributedCGGRLoss` — on global arrays sharded over ``axis_name`` of ``mesh``
  (use them under ``jax.jit``; they contain the ``shard_map``);
* :func:`shard_cggr_loss` — the per-shard body, for use inside your own ``shard_map`` (or any context where
  ``axis_name`` is bound): returns ``(share_r, metrics)``; ``psum`` the share over the axis to get the loss.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cggr.config import reject_sampled_selection
from cggr_jax import curriculum, dispatch, pipeline, scoring, utils
from cggr_jax.loss import CGGRLoss

__all__ = ["SCOPES", "DistributedCGGRLoss", "cggr_loss", "shard_cggr_loss", "batch_sharding"]

#: The selection scopes of SPEC §13.
SCOPES: tuple[str, ...] = ("global", "local")

_COUNT_KEYS = ("tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range")
_AVERAGE_KEYS = ("avg_confidence", "avg_entropy", "avg_difficulty")


def _check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    return scope


def _check_axis_name(axis_name: Any) -> str:
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name: expected a non-empty mesh axis name (str), got {axis_name!r}")
    return axis_name


def _as_config(loss_fn: CGGRLoss | None, config: dict[str, Any]) -> CGGRLoss:
    """A validated :class:`cggr_jax.CGGRLoss` from either an instance or its keyword arguments."""
    if loss_fn is not None:
        if config:
            raise ValueError(f"loss_fn: pass either a CGGRLoss or its keyword arguments, not both "
                             f"(got also {sorted(config)})")
        if not isinstance(loss_fn, CGGRLoss):
            raise ValueError(f"loss_fn: expected a cggr_jax.CGGRLoss, got {type(loss_fn).__name__}")
        reject_sampled_selection(loss_fn.config, "cggr_jax.distributed")
        return loss_fn
    cfg = CGGRLoss(**config)
    reject_sampled_selection(cfg.config, "cggr_jax.distributed")
    return cfg


def _plain_config(cfg: CGGRLoss) -> CGGRLoss:
    """``cfg`` as a plain :class:`CGGRLoss` (drops the fields a subclass adds)."""
    if type(cfg) is CGGRLoss:
        return cfg
    return CGGRLoss.from_config(cfg.config, ratio_schedule=cfg.ratio_schedule)


def _selected_ce_sum(logits: jax.Array, safe: jax.Array, has_target: jax.Array, mask: jax.Array,
                     stats: scoring.TokenStatistics, ignore_index: int, kernel: bool) -> jax.Array:
    """``Σ_{i ∈ mask} ce_i`` in float32 with the SPEC §8 gradient w.r.t. ``logits``: the pipeline's selective
    cross-entropy (the mean over ``mask``) multiplied back by ``|mask|`` (a constant for the gradient; 0 when
    nothing is selected on this shard)."""
    count = jnp.sum(mask, dtype=jnp.int32).astype(jnp.float32)
    mean = pipeline.selective_cross_entropy(logits, safe, has_target, mask, stats, ignore_index, kernel=kernel)
    return mean.astype(jnp.float32) * count


def _axis_size(axis_name: str) -> int:
    return int(jax.lax.axis_size(axis_name))


def _global_share(logits: jax.Array, targets: jax.Array, step: jax.Array, reference_nll: jax.Array | None,
                  cfg: CGGRLoss, axis_name: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-shard body of the global scope (module docstring); ``axis_name`` must be bound.
    ``reference_nll``: this shard's checked reference (``scoring='excess'``): the exchanged difficulties
    already include it (SPEC §3.1, §13.2).

    The statistics, eligibility and cross-entropy are those of :class:`cggr_jax.CGGRLoss` on this shard; only
    the selection runs on the exchanged global difficulties.
    """
    W = _axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    tok_shape = tuple(logits.shape[:-1])
    N = math.prod(tok_shape)
    V = logits.shape[-1]
    config = cfg.config
    not_ignored, in_range, safe = utils.target_masks(targets, V, config.ignore_index)
    has_target = not_ignored & in_range
    kernel = dispatch.use_kernels(logits)
    stats = scoring.dispatch_statistics(jax.lax.stop_gradient(logits), safe, has_target, config.ignore_index,
                                        kernel=kernel)
    stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
    scores = scoring.scores_from_statistics(stats, config.scoring, not_ignored=not_ignored, in_range=in_range,
                                            reference_nll=reference_nll)
    elig = scores.eligible
    zero = jnp.float32(0.0)

    # The exchange: difficulties (NaN = not eligible, lossless by SPEC §4) and the sums behind c̄ / metrics.
    d_local = jnp.where(elig, scores.difficulty.astype(jnp.float32), jnp.float32(jnp.nan)).reshape(N)
    placed = jax.lax.dynamic_update_slice(jnp.zeros((W * N,), jnp.float32), d_local, (r * N,))
    sums = jnp.stack([jnp.sum(jnp.where(elig, stats.confidence, zero)),
                      jnp.sum(jnp.where(elig, stats.entropy, zero))])
    counts = jnp.stack([jnp.sum(has_target & ~elig, dtype=jnp.int32),
                        jnp.sum(not_ignored & ~in_range, dtype=jnp.int32)])
    d_g, sums, counts = jax.lax.psum((placed, sums, counts), axis_name)

    global_shape = (W * tok_shape[0], tok_shape[1]) if len(tok_shape) == 2 else (W * N,)
    d_g = d_g.reshape(global_shape)
    e_g = ~jnp.isnan(d_g)
    n_g = jnp.sum(e_g, dtype=jnp.int32)
    denom = jnp.maximum(n_g, 1).astype(jnp.float32)
    averages = {"tokens_total": n_g, "avg_confidence": sums[0] / denom, "avg_entropy": sums[1] / denom,
                "avg_difficulty": jnp.sum(jnp.where(e_g, d_g, zero)) / denom}
    base, ratio = pipeline.ratios(config, cfg.schedule, step, averages["avg_confidence"])
    mask_g, _ = pipeline.select(d_g, e_g, ratio, config)
    count_g = jnp.sum(mask_g, dtype=jnp.int32)
    mask = jax.lax.dynamic_slice(mask_g.reshape(W * N), (r * N,), (N,)).reshape(tok_shape)

    total = _selected_ce_sum(logits, safe, has_target, mask, stats, config.ignore_index, kernel)
    share = total / jnp.maximum(count_g, 1).astype(jnp.float32)
    metrics = pipeline.measure(step, base, ratio, count_g, averages, counts[0], counts[1])
    return share, metrics


def _local_share(logits: jax.Array, targets: jax.Array, step: jax.Array, reference_nll: jax.Array | None,
                 cfg: CGGRLoss, axis_name: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-shard body of the local scope: ``L_r / W`` and metrics combined over the axis."""
    W = _axis_size(axis_name)
    loss, m = _plain_config(cfg)(logits, targets, step, reference_nll)
    n = m["tokens_total"]
    counts = jax.lax.psum(jnp.stack([m[k].astype(jnp.int32) for k in _COUNT_KEYS]), axis_name)
    weighted = jax.lax.psum(jnp.stack([m[k].astype(jnp.float32) * n.astype(jnp.float32) for k in _AVERAGE_KEYS]
                                      + [m["effective_ratio"].astype(jnp.float32)]), axis_name)
    denom = jnp.maximum(counts[1], 1).astype(jnp.float32)
    metrics = dict(m)
    for i, key in enumerate(_COUNT_KEYS):
        metrics[key] = counts[i].astype(m[key].dtype)
    for i, key in enumerate(_AVERAGE_KEYS):
        metrics[key] = (weighted[i] / denom).astype(m[key].dtype)
    metrics["effective_ratio"] = (weighted[len(_AVERAGE_KEYS)] / jnp.float32(W)).astype(m["effective_ratio"].dtype)
    metrics["sample_ess"] = metrics["tokens_selected"].astype(jnp.float32)   # SPEC §10: unweighted selection
    return loss / jnp.float32(W), metrics


def shard_cggr_loss(logits: jax.Array, targets: jax.Array, step: Any, *, axis_name: str = "data",
                    scope: str = "global", loss_fn: CGGRLoss | None = None, reference_nll: Any = None,
                    **config: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CGGR on one shard of a data-parallel batch, inside ``shard_map`` (``axis_name`` must be bound).

    Returns ``(share, metrics)``: ``jax.lax.psum(share, axis_name)`` is the loss — the global-batch loss of
    SPEC §8 for ``scope="global"``, the mean of the shards' own CGGR losses for ``scope="local"`` — and its
    gradient w.r.t. this shard's logits is that loss's gradient restricted to the shard. If you instead
    differentiate each shard separately and average the gradients with ``pmean`` (DDP style), differentiate
    ``share · W``. ``metrics`` are replicated over the axis (see the module docstring).

    Args:
        logits: this shard's ``(B, T, V)`` or ``(N, V)`` logits (every shard the same shape).
        targets: this shard's integer targets, the leading dims of ``logits`` (already shifted).
        step: the curriculum step (an integer scalar, replicated).
        axis_name: the data axis of the enclosing ``shard_map``.
        scope: ``"global"`` or ``"local"``.
        loss_fn: a :class:`cggr_jax.CGGRLoss` holding the configuration, or pass its keyword arguments.
        reference_nll: with ``scoring='excess'`` (and only then) this shard's reference per-token loss, of
            ``targets``' shape (SPEC §3.1).
    """
    _check_scope(scope)
    _check_axis_name(axis_name)
    cfg = _as_config(loss_fn, config)
    logits, targets, step = cfg.check_call(logits, targets, step)
    ref = scoring.check_reference_nll(reference_nll, cfg.scoring, tuple(targets.shape))
    body = _local_share if scope == "local" else _global_share
    return body(logits, targets, step, ref, cfg, axis_name)


def _check_mesh(mesh: Any, axis_name: str, logits: Any) -> int:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    W = int(mesh.shape[axis_name])
    lead = logits.shape[0]
    if lead % W != 0:
        raise ValueError(f"logits: the leading dimension ({lead}) must be divisible by the size of the data "
                         f"axis {axis_name!r} ({W}); pad the batch with ignore_index targets")
    return W


def _shard_map(fn: Callable[..., Any], mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def cggr_loss(logits: jax.Array, targets: jax.Array, step: Any, *, mesh: Mesh, axis_name: str = "data",
              scope: str = "global", loss_fn: CGGRLoss | None = None, reference_nll: Any = None,
              **config: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Data-parallel CGGR loss on global arrays whose first axis is sharded over ``axis_name`` of ``mesh``.

    ``scope="global"``: the loss, gradient and metrics of :func:`cggr_jax.cggr_loss` on the whole (global)
    batch — what one device would compute — with only the difficulties exchanged between devices.
    ``scope="local"``: the mean over the shards of each shard's own CGGR loss. Returns ``(loss, metrics)``,
    both replicated. Differentiable w.r.t. ``logits``; use under ``jax.jit``.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``; the leading dimension divisible by the data-axis size.
        targets: integer targets, the leading dims of ``logits`` (already shifted).
        step: the curriculum step (integer scalar).
        mesh: the device mesh; other axes than ``axis_name`` see replicated inputs.
        axis_name: the data axis.
        scope: ``"global"`` or ``"local"``.
        loss_fn: a :class:`cggr_jax.CGGRLoss` holding the configuration, or pass its keyword arguments.
        reference_nll: with ``scoring='excess'`` (and only then) the reference per-token loss of ``targets``'
            shape, sharded like them (each device reads its shard's slice; SPEC §3.1).

    Raises:
        ValueError: unknown ``scope``/``axis_name``, a leading dimension not divisible by the axis size, or
            the input errors of :func:`cggr_jax.cggr_loss`.
    """
    _check_scope(scope)
    _check_axis_name(axis_name)
    cfg = _as_config(loss_fn, config)
    logits, targets, step = cfg.check_call(logits, targets, step)
    ref = scoring.check_reference_nll(reference_nll, cfg.scoring, tuple(targets.shape))
    _check_mesh(mesh, axis_name, logits)
    body = _global_share if scope == "global" else _local_share

    def per_shard(lg: jax.Array, lb: jax.Array, st: jax.Array, *rf: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        share, metrics = body(lg, lb, st, rf[0] if rf else None, cfg, axis_name)
        return jax.lax.psum(share, axis_name), metrics

    data = P(axis_name)
    args = (logits, targets, step) + (() if ref is None else (ref,))   # the reference is sharded like targets
    return _shard_map(per_shard, mesh, (data, data, P()) + (data,) * (len(args) - 3), (P(), P()))(*args)


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """``NamedSharding(mesh, P(axis_name))``: the first (batch) axis split over the data axis."""
    _check_axis_name(axis_name)
    if not isinstance(mesh, Mesh) or axis_name not in mesh.axis_names:
        raise ValueError(f"mesh: expected a jax.sharding.Mesh with an axis {axis_name!r}, got {mesh!r}")
    return NamedSharding(mesh, P(axis_name))


@dataclasses.dataclass(frozen=True)
class DistributedCGGRLoss(CGGRLoss):
    """:class:`cggr_jax.CGGRLoss` for a batch sharded over a data axis (SPEC §13); frozen and hashable.

    ``__call__(logits, targets, step) -> (loss, metrics)`` is :func:`cggr_loss` with this configuration:
    global arrays sharded over ``axis_name`` of ``mesh``, ``scope="global"`` (the whole batch, the same result
    as one device) or ``"local"`` (the mean of the shards' own CGGR losses).
    """

    mesh: Mesh | None = None
    axis_name: str = "data"
    scope: str = "global"

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        reject_sampled_selection(self.config, "DistributedCGGRLoss")
        _check_scope(self.scope)
        _check_axis_name(self.axis_name)
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis_name not in self.mesh.axis_names:
            raise ValueError(f"axis_name: {self.axis_name!r} is not an axis of the mesh "
                             f"{tuple(self.mesh.axis_names)}")

    def __call__(self, logits: jax.Array, targets: jax.Array, step: Any,
                 reference_nll: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        return cggr_loss(logits, targets, step, mesh=self.mesh, axis_name=self.axis_name, scope=self.scope,
                         loss_fn=_plain_config(self), reference_nll=reference_nll)

    def shard(self, logits: jax.Array, targets: jax.Array, step: Any,
              reference_nll: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:func:`shard_cggr_loss` with this configuration (inside ``shard_map`` over ``axis_name``)."""
        return shard_cggr_loss(logits, targets, step, axis_name=self.axis_name, scope=self.scope,
                               loss_fn=_plain_config(self), reference_nll=reference_nll)
