"""Selective cross-entropy with a sparse backward (SPEC §8), as Pallas kernels behind a ``jax.custom_vjp``.

With ``S`` the selected tokens (``mask`` ∧ target valid and in ``[0, V)`` ∧ finite ``nll``; a mask produced
by the selection of SPEC §7 only holds eligible tokens, for which this is the mask itself)::

    loss          = Σ_{i∈S} nll_i / max(1, |S|),          nll_i = lse_i − z_i[t_i]
    ∂loss/∂z_i    = (softmax(z_i) − onehot(t_i)) · g / max(1, |S|)    for i ∈ S,     0 otherwise

With ``row_weights`` ω (float32 per token; the ``sampled`` selection's ``w_i / max(1, n)``, SPEC §7.4 and §8)
the loss is ``Σ_{i∈S} ω_i·nll_i`` (no division) and row ``i``'s gradient is scaled by ``g·ω_i``; without them
the kernel is unchanged (the weights are a static switch of the backward kernel).

Forward. ``nll`` and ``lse`` come from the scoring kernel (:mod:`cggr_jax.kernels.scoring`): either passed in
as ``stats=`` (the scores the selection was made from — then the loss reads no logits at all), or computed
here with the kernel's row mask, which reads only programs holding a selected row.

Backward. The gradient is written tile by tile: grid ``(⌈N / R⌉, ⌈V / block_v⌉)`` (or, with
``flat_grid=True``, the same tiles on a flat row-major 1-D grid), one ``(R, block_v)`` tile per
program (``R = block_rows``), no loop. A tile reads the logits of its *selected* rows only (the
load is masked per row) and writes ``(2^{(z − lse)·log2 e} − onehot(t)) · g / |S|`` there — the softmax
from the saved ``lse``, no second reduction — and exact zeros in every other row; a tile without a selected
row reads nothing and only stores zeros. Tiles at the edges mask their stores: the columns ``≥ V`` of the
last column tile (``V mod block_v ≠ 0``) and the rows ``≥ N`` of the last row tile (``N mod R ≠ 0``) are
neither read nor written. The arithmetic is float32, stored in the logits' dtype. Per element of a selected
row: one subtraction, one multiply and one ``ex2`` (``(z − lse)`` is exact for the terms that matter, so
``p`` keeps full float32 relative accuracy even for ``|lse|`` in the thousands).

The selection itself (``mask``, the scores it came from) carries no gradient: ``stats`` is wrapped in
``stop_gradient`` and the custom rule returns no cotangent for targets, mask, lse or nll.

Scores → selection → this loss in one pass is ``cggr_jax.pipeline.scored_selective_cross_entropy`` (policy
lives outside the kernels: this module imports only ``cggr_jax.types``, ``cggr_jax.utils`` and its siblings).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..types import TokenStatistics
from .launch import BACKWARD_DEFAULTS, BACKWARD_FLAT_GRID, MAX_FLAT_PROGRAMS, SCORING_DEFAULTS, KernelConfig, Launch, \
    kernel_config
from .scoring import (
    LOG2E,
    as_float32_input,
    bind,
    check_inputs,
    exp2,
    load,
    pallas_call_options,
    program_rows,
    row_statistics,
    sanitize_targets,
    store,
    token_statistics_pallas,
    whole,
)

__all__ = ["selective_cross_entropy_pallas", "backward_grids"]



# ---------------------------------------------------------------------------------------- backward kernel
def _ce_grad_kernel(*refs: Any, n: int, v: int, rows: int, block_v: int, interpret: bool, flat: bool,
                    weighted: bool = False) -> None:
    if weighted:
        tgt_ref, sel_ref, lse_ref, scale_ref, w_ref, x_ref, g_ref = refs
    else:
        (tgt_ref, sel_ref, lse_ref, scale_ref, x_ref, g_ref), w_ref = refs, None
    f32 = jnp.float32
    if flat:  # 1-D row-major grid: program pid = i·n_col_tiles + j (the grid size fits int32, see _ce_grad)
        n_col_tiles = pl.cdiv(v, block_v)
        pid = pl.program_id(0)
        i, j = lax.div(pid, n_col_tiles), lax.rem(pid, n_col_tiles)  # pid ≥ 0: C division = floor division
    else:  # 2-D grid (row tile, column tile)
        i, j = pl.program_id(0), pl.program_id(1)
    row0, safe, in_range = program_rows(n, rows, i)
    sel = (sel_ref[safe] != 0) & in_range                      # (R,) selected real rows
    any_sel = jnp.max(sel.astype(jnp.int32)) > 0
    start = pl.multiple_of(j * block_v, block_v)
    shape = (rows, block_v)
    view = (pl.ds(row0, rows), pl.ds(start, block_v))
    out_dtype = g_ref.dtype

    def tile(col_mask: bool) -> None:
        cols = start + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = jnp.broadcast_to(in_range[:, None], shape) if n % rows else None
        if col_mask:
            mask = cols < v if mask is None else mask & (cols < v)

        @pl.when(any_sel)
        def _gradient() -> None:
            # Unselected rows of the tile are not read (a one-row tile gets here only when it is selected).
            read = None if rows == 1 else jnp.broadcast_to(sel[:, None], shape)
            if col_mask:
                read = cols < v if read is None else read & (cols < v)
            x = load(x_ref.at[view], read, None if read is None else -jnp.inf, stream=True)
            lse = lse_ref[safe]
            tgt = tgt_ref[safe]
            p = exp2((x.astype(f32) - lse[:, None]) * f32(LOG2E), interpret)
            if weighted:   # SPEC §7.4: each row's Horvitz–Thompson weight (already divided by max(1, n))
                g = (p - jnp.where(cols == tgt[:, None], f32(1.0), f32(0.0))) * (scale_ref[0] * w_ref[safe])[:, None]
            else:
                g = (p - jnp.where(cols == tgt[:, None], f32(1.0), f32(0.0))) * scale_ref[0]
            if rows > 1:
                g = jnp.where(sel[:, None], g, f32(0.0))
            store(g_ref.at[view], g.astype(out_dtype), mask)

        @pl.when(jnp.logical_not(any_sel))
        def _zeros() -> None:
            store(g_ref.at[view], jnp.zeros(shape, out_dtype), mask)

    n_full = v // block_v
    if v % block_v == 0:
        tile(False)
    else:  # only the last column tile is ragged; the others store without a column mask
        pl.when(j < n_full)(lambda: tile(False))
        pl.when(j >= n_full)(lambda: tile(True))


def _ce_grad(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, scale: jax.Array,
             cfg: KernelConfig, weights: Optional[jax.Array] = None) -> jax.Array:
    n, v = logits2d.shape
    flat = cfg.flat_grid
    n_row_tiles, n_col_tiles = pl.cdiv(n, cfg.block_rows), pl.cdiv(v, cfg.block_v)
    if flat:
        if n_row_tiles * n_col_tiles > MAX_FLAT_PROGRAMS:
            raise ValueError(
                f"flat_grid: logits of shape ({n}, {v}) with block_rows={cfg.block_rows}, "
                f"block_v={cfg.block_v} need {n_row_tiles} x {n_col_tiles} = {n_row_tiles * n_col_tiles} "
                f"programs, more than the {MAX_FLAT_PROGRAMS} a flat (int32) grid can index; use larger "
                f"blocks or flat_grid=False")
        grid: tuple[int, ...] = (n_row_tiles * n_col_tiles,)
    else:
        grid = (n_row_tiles, n_col_tiles)
    kernel = bind(_ce_grad_kernel, n=n, v=v, rows=cfg.block_rows, block_v=cfg.block_v,
                  interpret=cfg.interpret, flat=flat, weighted=weights is not None)
    args = [tgt, sel.astype(jnp.int32), lse, scale.reshape(1).astype(jnp.float32)]
    if weights is not None:
        args.append(weights.astype(jnp.float32))
    args.append(logits2d)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, v), logits2d.dtype),
        grid=grid,
        in_specs=[whole(a.shape) for a in args],
        out_specs=whole((n, v)),
        name="cggr_selective_ce_grad",
        **pallas_call_options(cfg),
    )(*args)


def backward_grids(fn: Any, *args: Any) -> list[tuple[int, ...]]:
    """The launch grids of this module's backward kernel (``cggr_selective_ce_grad``) in the jaxpr of
    ``fn(*args)``, nested jaxprs included: which grid (2-D, or the flat one of ``flat_grid=True``) a traced
    function really uses."""
    grids: list[tuple[int, ...]] = []

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and "cggr_selective_ce_grad" in str(eqn.params.get("name")):
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _weighted_ce(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, nll: jax.Array,
                 weights: jax.Array, cfg: KernelConfig) -> jax.Array:
    del logits2d, tgt, lse, cfg
    return jnp.sum(jnp.where(sel, weights * nll, jnp.float32(0.0)))


def _weighted_ce_fwd(logits2d: jax.Array, tgt: jax.Array, sel: jax.Array, lse: jax.Array, nll: jax.Array,
                     weights: jax.Array, cfg: KernelConfig) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    del cfg
    loss = jnp.sum(jnp.where(sel, weights * nll, jnp.float32(0.0)))
    return loss, (logits2d, tgt, sel, lse, weights)


def _weighted_ce_bwd(cfg: KernelConfig, res: tuple[jax.Array, ...], g: jax.Array) -> tuple[Any, ...]:
    logits2d, tgt, sel, lse, weights = res
    grad = _ce_grad(logits2d, tgt, sel, lse, g.astype(jnp.float32), cfg, weights=weights)
    return grad, None, None, None, None, None


_weighted_ce.defvjp(_weighted_ce_fwd, _weighted_ce_bwd)


# ------------------------------------------------------------------------------------------ entry points
def _as_launch(value: Optional[Launch], name: str) -> Launch:
    if value is None:
        return Launch()
    if not isinstance(value, Launch):
        raise ValueError(f"{name} must be a cggr_jax.kernels.Launch or None, got {type(value).__name__}")
    return value


def selective_cross_entropy_pallas(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                                   ignore_index: int = -100, stats: Optional[TokenStatistics] = None,
                                   interpret: Optional[bool] = None, block_rows: Optional[int] = None,
                                   block_v: Optional[int] = None, num_warps: Optional[int] = None,
                                   num_stages: Optional[int] = None,
                                   scoring_launch: Optional[Launch] = None,
                                   flat_grid: Optional[bool] = None,
                                   row_weights: Optional[jax.Array] = None) -> jax.Array:
    """Mean float32 cross-entropy over the selected tokens, with the sparse custom backward (module doc).

    Args:
      logits: ``(N, V)`` or ``(B, T, V)`` float32/float16/bfloat16.
      targets: integer array of the token shape; ``ignore_index`` tokens are never selected.
      mask: bool array of the token shape, the selection (SPEC §7).
      stats: optional ``TokenStatistics`` of these logits/targets (e.g. from :func:`token_statistics_pallas`
        used for the selection); its ``lse``/``nll`` are reused and the forward reads no logits.
      interpret: ``None`` = compile with the Triton backend on a GPU, interpret elsewhere.
      block_rows, block_v, num_warps, num_stages: launch of the backward kernel (rows × columns per program;
        defaults :data:`~cggr_jax.kernels.launch.BACKWARD_DEFAULTS`).
      scoring_launch: launch of the row-masked scoring pass that computes ``lse``/``nll`` when ``stats`` is
        None (defaults :data:`~cggr_jax.kernels.launch.SCORING_DEFAULTS`).
      flat_grid: the backward's grid order, ``None`` = :data:`~cggr_jax.kernels.launch.BACKWARD_FLAT_GRID`
        (read when this function is traced; both orders give bit-identical gradients).
      row_weights: optional float32 array of the token shape (the ``sampled`` selection's ``w_i / max(1, n)``,
        SPEC §7.4): the loss is then ``Σ_{i∈S} row_weights_i·nll_i`` and row ``i``'s gradient is scaled by
        ``row_weights_i`` (no division by ``|S|``). None: the unweighted mean (the kernels unchanged).

    Returns:
      A float32 scalar; ``0.0`` with an all-zero gradient when nothing is selected. jit-safe.
    """
    logits, targets, ignore_index = check_inputs(logits, targets, ignore_index)
    if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must be a bool array of shape {tuple(targets.shape)}, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"mask must have dtype bool, got {jnp.asarray(mask).dtype}")
    if row_weights is not None and (not hasattr(row_weights, "shape")
                                    or tuple(row_weights.shape) != tuple(targets.shape)
                                    or jnp.asarray(row_weights).dtype != jnp.float32):
        raise ValueError(f"row_weights must be a float32 array of shape {tuple(targets.shape)}, got "
                         f"{getattr(row_weights, 'dtype', type(row_weights).__name__)}"
                         f"{tuple(getattr(row_weights, 'shape', ()))}")
    v = logits.shape[-1]
    n = math.prod(targets.shape)
    itemsize = as_float32_input(logits).dtype.itemsize
    cfg = kernel_config(v, itemsize, defaults=BACKWARD_DEFAULTS, block_rows=block_rows, block_v=block_v,
                        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    if flat_grid is not None and not isinstance(flat_grid, bool):
        raise ValueError(f"flat_grid: expected None or a bool, got {flat_grid!r}")
    cfg = dataclasses.replace(cfg, flat_grid=BACKWARD_FLAT_GRID if flat_grid is None else flat_grid)
    fwd_cfg = kernel_config(v, itemsize, defaults=SCORING_DEFAULTS, interpret=interpret,
                            **_as_launch(scoring_launch, "scoring_launch").kwargs())
    if n == 0:
        return jnp.sum(logits.astype(jnp.float32)) * jnp.float32(0.0)  # 0.0, differentiable, zero grad
    logits2d = as_float32_input(logits.reshape(n, v))  # float64: computed (and differentiated) in float32
    tgt, code = sanitize_targets(targets.reshape(n), v, ignore_index)
    want = jnp.asarray(mask).reshape(n) & (code == 1)
    if stats is None:
        lse, _, _, _, nll = row_statistics(lax.stop_gradient(logits2d), targets.reshape(n),
                                           ignore_index=ignore_index, cfg=fwd_cfg, row_mask=want)
    else:
        for name in ("lse", "nll"):
            arr = getattr(stats, name)
            if tuple(arr.shape) != tuple(targets.shape) or arr.dtype != jnp.float32:
                raise ValueError(f"stats.{name} must be float32 of shape {tuple(targets.shape)}, got "
                                 f"{arr.dtype}{tuple(arr.shape)}")
        lse = lax.stop_gradient(stats.lse).reshape(n)
        nll = lax.stop_gradient(stats.nll).reshape(n)
    sel = want & (jnp.abs(nll) < jnp.inf)  # a non-finite row is never in the loss (SPEC §4, §8)
    if row_weights is not None:
        w = lax.stop_gradient(jnp.asarray(row_weights)).reshape(n)
        return _weighted_ce(logits2d, tgt, sel, lse, nll, w, cfg)
    return _selective_ce(logits2d, tgt, sel, lse, nll, cfg)
