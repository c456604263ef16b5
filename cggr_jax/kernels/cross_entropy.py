"""Selective cross-entropy with a sparse backward (SPEC §8), as Pallas kernels behind a ``jax.custom_vjp``.

With ``S`` the selected tokens (``mask`` ∧ target valid and in ``[0, V)`` ∧ finite ``nll``; a mask produced
by the selection of SPEC §7 only holds eligible tokens, for which this is the mask itself)::

    loss          = Σ_{i∈S} nll_i / max(1, |S|),          nll_i = lse_i − z_i[t_i]
    ∂loss/∂z_i    = (softmax(z_i) − onehot(t_i)) · g / max(1, |S|)    for i ∈ S,     0 otherwise

Forward. ``nll`` and ``lse`` come from the scoring kernel (:mod:`cggr_jax.kernels.scoring`): either passed in
as ``stats=`` (the scores the selection was made from — then the loss reads no logits at all), or computed
here with the kernel's row mask, which reads only the selected rows.

Backward. One program per row: a selected row is read once and its gradient row written from the saved
``lse`` (``softmax(z) = exp(z − lse)``, no second reduction); every other row is written with zeros without
being read. The gradient is float32 arithmetic, stored in the logits' dtype.

The selection itself (``mask``, the scores it came from) carries no gradient: ``stats`` is wrapped in
``stop_gradient`` and the custom rule returns no cotangent for targets, mask, lse or nll.

Pipeline (issue item 2): :func:`scored_selective_cross_entropy_pallas` runs scores → selection
(``cggr_jax.selection.select_tokens`` on device) → this loss, reading the logits once in the forward pass.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .scoring import (
    _LOG2E,
    _SQUEEZED,
    KernelConfig,
    _bind,
    _masked_load,
    _masked_store,
    check_inputs,
    kernel_config,
    pallas_call_options,
    row_statistics,
    sanitize_targets,
    token_statistics_pallas,
)

if TYPE_CHECKING:
    from cggr_jax.scoring import TokenStatistics

__all__ = ["selective_cross_entropy_pallas", "scored_selective_cross_entropy_pallas"]


# ---------------------------------------------------------------------------------------- backward kernel
def _ce_grad_kernel(tgt_ref: Any, sel_ref: Any, lse_ref: Any, scale_ref: Any, x_ref: Any, g_ref: Any, *,
                    v: int, block_v: int) -> None:
    f32 = jnp.float32
    selected = sel_ref[...] != 0
    out_dtype = g_ref.dtype

    @pl.when(selected)
    def _grad_row() -> None:
        lse = lse_ref[...]
        tgt = tgt_ref[...]
        scale = scale_ref[0]

        def write(sl: Any, cols: jax.Array, x: jax.Array, mask: Optional[jax.Array]) -> None:
            p = jnp.exp2((x.astype(f32) - lse) * f32(_LOG2E))
            g = ((p - jnp.where(cols == tgt, f32(1.0), f32(0.0))) * scale).astype(out_dtype)
            if mask is None:
                g_ref[sl] = g
            else:
                _masked_store(g_ref.at[sl], g, mask)

        _write_loop(v, block_v, lambda sl, cols, mask: write(
            sl, cols, x_ref[sl] if mask is None else _masked_load(x_ref.at[sl], mask, -jnp.inf), mask))

    @pl.when(jnp.logical_not(selected))
    def _zero_row() -> None:
        zeros = jnp.zeros((block_v,), out_dtype)

        def write(sl: Any, cols: jax.Array, mask: Optional[jax.Array]) -> None:
            del cols
            if mask is None:
                g_ref[sl] = zeros
            else:
                _masked_store(g_ref.at[sl], zeros, mask)

        _write_loop(v, block_v, write)


def _write_loop(v: int, block_v: int, write: Any) -> None:
    """Call ``write(slice, cols, mask)`` for the full blocks (``mask=None``) and the ragged tail (masked)."""
    n_full, tail = divmod(v, block_v)
    lanes = lax.broadcasted_iota(jnp.int32, (block_v,), 0)

    def full_body(j: jax.Array, c: Any) -> Any:
        start = pl.multiple_of(j * block_v, block_v)
        write(pl.ds(start, block_v), start + lanes, None)
        return c

    def tail_body(j: jax.Array, c: Any) -> Any:  # traced start: see scoring._vocab_loop
        start = pl.multiple_of(j * block_v, block_v)
        cols = start + lanes
        write(pl.ds(start, block_v), cols, cols < v)
        return c

    if n_full:
        lax.fori_loop(0, n_full, full_body, 0)
    if tail:
        lax.fori_loop(n_full, n_full + 1, tail_body, 0)


def _ce_grad(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, scale: jax.Array,
             cfg: KernelConfig) -> jax.Array:
    n, v = logits2d.shape
    row_spec = pl.BlockSpec((_SQUEEZED, v), lambda i: (i, 0))
    scalar_spec = pl.BlockSpec((_SQUEEZED,), lambda i: (i,))
    one_spec = pl.BlockSpec((1,), lambda i: (0,))
    kernel = _bind(_ce_grad_kernel, v=v, block_v=cfg.block_v)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, v), logits2d.dtype),
        grid=(n,),
        in_specs=[scalar_spec, scalar_spec, scalar_spec, one_spec, row_spec],
        out_specs=row_spec,
        name="cggr_selective_ce_grad",
        **pallas_call_options(cfg),
    )(tgt, sel.astype(jnp.int32), lse, scale.reshape(1), logits2d)


# ------------------------------------------------------------------------------------------- custom_vjp
def _masked_mean(sel: jax.Array, nll: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = jnp.sum(sel.astype(jnp.int32))
    total = jnp.sum(jnp.where(sel, nll, jnp.float32(0.0)))
    return total / jnp.maximum(count, 1).astype(jnp.float32), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _selective_ce(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, nll: jax.Array,
                  cfg: KernelConfig) -> jax.Array:
    del logits2d, tgt, lse, cfg
    return _masked_mean(sel, nll)[0]


def _selective_ce_fwd(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, nll: jax.Array,
                      cfg: KernelConfig) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    del cfg
    loss, count = _masked_mean(sel, nll)
    return loss, (logits2d, tgt, sel, lse, count)


def _selective_ce_bwd(cfg: KernelConfig, res: tuple[jax.Array, ...], g: jax.Array) -> tuple[Any, ...]:
    logits2d, tgt, sel, lse, count = res
    scale = g.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
    grad = _ce_grad(logits2d, tgt, sel, lse, scale, cfg)
    return grad, None, None, None, None


_selective_ce.defvjp(_selective_ce_fwd, _selective_ce_bwd)


# ------------------------------------------------------------------------------------------ entry points
def selective_cross_entropy_pallas(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                                   ignore_index: int = -100, stats: Optional["TokenStatistics"] = None,
                                   interpret: Optional[bool] = None, block_v: Optional[int] = None,
                                   num_warps: Optional[int] = None,
                                   num_stages: Optional[int] = None) -> jax.Array:
    """Mean float32 cross-entropy over the selected tokens, with the sparse custom backward (module doc).

    Args:
      logits: ``(N, V)`` or ``(B, T, V)`` float32/float16/bfloat16.
      targets: integer array of the token shape; ``ignore_index`` tokens are never selected.
      mask: bool array of the token shape, the selection (SPEC §7).
      stats: optional ``TokenStatistics`` of these logits/targets (e.g. from :func:`token_statistics_pallas`
        used for the selection); its ``lse``/``nll`` are reused and the forward reads no logits.
      interpret, block_v, num_warps, num_stages: as in :func:`token_statistics_pallas`.

    Returns:
      A float32 scalar; ``0.0`` with an all-zero gradient when nothing is selected. jit-safe.
    """
    logits, targets, ignore_index = check_inputs(logits, targets, ignore_index)
    if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must be a bool array of shape {tuple(targets.shape)}, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"mask must have dtype bool, got {jnp.asarray(mask).dtype}")
    v = logits.shape[-1]
    n = math.prod(targets.shape)
    if n == 0:
        return jnp.sum(logits.astype(jnp.float32)) * jnp.float32(0.0)  # 0.0, differentiable, zero grad
    cfg = kernel_config(v, block_v=block_v, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    logits2d = logits.reshape(n, v)
    if logits2d.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        logits2d = logits2d.astype(jnp.float32)  # float64: computed (and differentiated) in float32
    tgt, code = sanitize_targets(targets.reshape(n), v, ignore_index)
    want = jnp.asarray(mask).reshape(n) & (code == 1)
    if stats is None:
        lse, _, _, _, nll = row_statistics(lax.stop_gradient(logits2d), targets.reshape(n),
                                           ignore_index=ignore_index, cfg=cfg, row_mask=want)
    else:
        for name in ("lse", "nll"):
            arr = getattr(stats, name)
            if tuple(arr.shape) != tuple(targets.shape) or arr.dtype != jnp.float32:
                raise ValueError(f"stats.{name} must be float32 of shape {tuple(targets.shape)}, got "
                                 f"{arr.dtype}{tuple(arr.shape)}")
        lse = lax.stop_gradient(stats.lse).reshape(n)
        nll = lax.stop_gradient(stats.nll).reshape(n)
    sel = want & (jnp.abs(nll) < jnp.inf)  # a non-finite row is never in the loss (SPEC §4, §8)
    return _selective_ce(logits2d, tgt, sel, lse, nll, cfg)


def scored_selective_cross_entropy_pallas(
        logits: jax.Array, targets: jax.Array, ratio: Any, *, scoring: str = "combined",
        selection: str = "topk", num_strata: int = 4, min_tokens_per_sequence: int = 1,
        ignore_index: int = -100, interpret: Optional[bool] = None, block_v: Optional[int] = None,
        num_warps: Optional[int] = None, num_stages: Optional[int] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scores (one kernel read of the logits) → selection on device → selective cross-entropy.

    ``ratio`` is the float32 ratio after the dynamic threshold (SPEC §5.2); eligibility is SPEC §4
    (valid ∧ target in range ∧ finite row ∧ difficulty not NaN). Returns ``(loss, mask, k)``; gradients flow
    to ``logits`` through the sparse backward only. The difficulty is
    ``cggr_jax.scoring.difficulty_from_statistics``, the selection ``cggr_jax.selection.select_tokens``.
    """
    from cggr_jax.scoring import difficulty_from_statistics, row_finite
    from cggr_jax.selection import select_tokens

    logits, targets, ignore_index = check_inputs(logits, targets, ignore_index)
    opts = dict(interpret=interpret, block_v=block_v, num_warps=num_warps, num_stages=num_stages)
    stats = token_statistics_pallas(lax.stop_gradient(logits), targets, ignore_index, **opts)
    stats = jax.tree_util.tree_map(lax.stop_gradient, stats)
    difficulty = difficulty_from_statistics(stats, scoring, has_targets=True)
    _, code = sanitize_targets(targets.reshape(-1), logits.shape[-1], ignore_index)
    has_target = code.reshape(targets.shape) == 1
    eligible = has_target & row_finite(stats, has_target) & ~jnp.isnan(difficulty)
    mask, k = select_tokens(difficulty, eligible, ratio, selection=selection, num_strata=num_strata,
                            min_tokens_per_sequence=min_tokens_per_sequence)
    loss = selective_cross_entropy_pallas(logits, targets, mask, ignore_index=ignore_index, stats=stats,
                                          **opts)
    return loss, mask, k
