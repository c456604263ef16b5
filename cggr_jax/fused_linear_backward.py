r"""The fused LM head's backward in JAX (SPEC §8 on the selected rows): a ``jax.custom_vjp`` whose value is the
forward's loss and whose VJP recomputes the logits of the buffered selected rows only, one vocabulary chunk of
``C`` columns at a time (a ``fori_loop`` over the full chunks, then the tail).

The algorithm, the static capacity of the buffer and the memory plan are described in
:mod:`cggr_jax.fused_linear` (the forward, which computes the statistics, the selection, the buffer and the loss
value, then calls :func:`selected_rows_loss`). Split from it so that each module holds one pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["BackwardPlan", "block_logits", "selected_rows_loss"]


def block_logits(h: jax.Array, w: jax.Array, b: Optional[jax.Array], layout: str, ldt: Any) -> jax.Array:
    """``h Wᵀ + b`` in ``ldt`` with float32 accumulation (``w`` in the given layout): a block of the head's
    logits, formed by the forward's statistics pass and recomputed by the backward."""
    contract = ((1,), (1,)) if layout == "vd" else ((1,), (0,))
    z = jax.lax.dot_general(h, w, (contract, ((), ())), preferred_element_type=jnp.float32)
    if b is not None:
        z = z + b.astype(jnp.float32)
    ldt = jnp.dtype(ldt)
    if ldt.itemsize < 4:
        # XLA may keep a fusion's intermediate in float32 instead of rounding it (its default
        # --xla_allow_excess_precision), while the logits the forward's kernel read were rounded in memory.
        # The backward's softmax must use the same logits as the forward's lse, or Σp ≠ 1 and the
        # gradient is off by the rounding (a few % on peaked bf16 rows): reduce_precision cannot be elided.
        info = jnp.finfo(ldt)
        z = jax.lax.reduce_precision(z, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return z.astype(ldt)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """The static settings of the backward: vocabulary columns per chunk, the weight's layout (``"vd"``:
    ``(V, d)``; ``"dv"``: ``(d, V)``) and the dtype the logits are formed in."""

    vocab_chunk: int
    weight_layout: str
    logits_dtype: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def selected_rows_loss(plan: BackwardPlan, hidden2d: jax.Array, weight: jax.Array, bias: Optional[jax.Array],
                        loss_value: jax.Array, rows: jax.Array, row_weight: jax.Array, row_target: jax.Array,
                        row_lse: jax.Array) -> jax.Array:
    """Returns ``loss_value``; its VJP is the selective cross-entropy gradient of the buffered rows."""
    return loss_value


def _selected_rows_fwd(plan: BackwardPlan, hidden2d: jax.Array, weight: jax.Array, bias: Optional[jax.Array],
                       loss_value: jax.Array, rows: jax.Array, row_weight: jax.Array, row_target: jax.Array,
                       row_lse: jax.Array) -> tuple[jax.Array, tuple[Any, ...]]:
    return loss_value, (hidden2d, weight, bias, rows, row_weight, row_target, row_lse)


def _vocab_slice(x: jax.Array, start: Any, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _selected_rows_bwd(plan: BackwardPlan, res: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    hidden2d, weight, bias, rows, row_weight, row_target, row_lse = res
    N, d = hidden2d.shape
    layout = plan.weight_layout
    v_axis = 0 if layout == "vd" else 1
    V = weight.shape[v_axis]
    cap = rows.shape[0]
    cdt = hidden2d.dtype
    ldt = jnp.dtype(plan.logits_dtype)
    if cap == 0:
        gb0 = None if bias is None else jnp.zeros_like(bias)
        return (jnp.zeros_like(hidden2d), jnp.zeros_like(weight), gb0) + (None,) * 5
    live = row_weight > 0
    w_rows = row_weight * g.astype(jnp.float32)
    h_sel = jnp.where(live[:, None], hidden2d[rows], jnp.zeros((), cdt))
    lse_col = row_lse[:, None]

    def chunk(v0: Any, size: int) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        w_c = _vocab_slice(weight, v0, size, v_axis)
        b_c = None if bias is None else _vocab_slice(bias, v0, size, 0)
        z = block_logits(h_sel, w_c, b_c, layout, ldt).astype(jnp.float32)
        cols = v0 + jnp.arange(size, dtype=jnp.int32)
        onehot = (row_target[:, None] == cols[None, :]).astype(jnp.float32)
        gz = jnp.where(live[:, None], (jnp.exp(z - lse_col) - onehot) * w_rows[:, None], 0.0)
        gz_c = gz.astype(cdt)
        if layout == "vd":   # w_c (C, d)
            gh = jax.lax.dot_general(gz_c, w_c, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            gw = jax.lax.dot_general(gz_c, h_sel, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:                # w_c (d, C)
            gh = jax.lax.dot_general(gz_c, w_c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            gw = jax.lax.dot_general(h_sel, gz_c, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        gb = None if bias is None else jnp.sum(gz, axis=0)
        return gh, gw.astype(weight.dtype), gb

    C = max(1, min(plan.vocab_chunk, V))
    n_full = V // C
    tail = V - n_full * C
    acc_h = jnp.zeros((cap, d), jnp.float32)
    grad_w = jnp.zeros_like(weight)
    grad_b = None if bias is None else jnp.zeros((V,), jnp.float32)

    def body(i: jax.Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        a_h, g_w, g_b = carry
        v0 = i * C
        gh, gw, gb = chunk(v0, C)
        g_w = jax.lax.dynamic_update_slice_in_dim(g_w, gw, v0, v_axis)
        if g_b is not None:
            g_b = jax.lax.dynamic_update_slice_in_dim(g_b, gb, v0, 0)
        return a_h + gh, g_w, g_b

    if n_full > 0:
        acc_h, grad_w, grad_b = jax.lax.fori_loop(0, n_full, body, (acc_h, grad_w, grad_b))
    if tail > 0:
        v0 = n_full * C
        gh, gw, gb = chunk(v0, tail)
        acc_h = acc_h + gh
        grad_w = jax.lax.dynamic_update_slice_in_dim(grad_w, gw, v0, v_axis)
        if grad_b is not None:
            grad_b = grad_b.at[v0:].set(gb)
    # Rows are distinct except the padding slots (row 0, value exactly 0), so an add in the output dtype is
    # exact and needs no N × d float32 buffer.
    acc_h = jnp.where(live[:, None], acc_h, 0.0).astype(cdt)
    grad_h = jnp.zeros((N, d), cdt).at[rows].add(acc_h)
    grad_b_out = None if bias is None else grad_b.astype(bias.dtype)
    return (grad_h, grad_w, grad_b_out) + (None,) * 5


selected_rows_loss.defvjp(_selected_rows_fwd, _selected_rows_bwd)
