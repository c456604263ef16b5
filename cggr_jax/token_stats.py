r"""Per-token log-probs and entropy of an LM head without materialising the ``(N, V)`` logits (SPEC §14), JAX.

The mirror of :mod:`cggr_torch.token_stats` (read its docstring for the maths): the logits
``z = hidden · Wᵀ + b`` (``W`` in the ``(V, d)`` layout) are soft-capped, then divided by the temperature
(SPEC §14.1), and every SPEC §2 statistic is taken of the result block by block - ``lax`` loops over row
blocks and vocabulary chunks (full blocks in a ``fori_loop``/``scan``, the ragged tail as a static slice), each
chunk folded into the rows' streaming state (running maximum, runner-up, ``s = Σ e^{y−m}``,
``a = Σ e^{y−m}(y − m)``, the target's ``y``). The gradient is a ``jax.custom_vjp`` whose backward recomputes
the rows' logits chunk by chunk from the saved ``lse`` and ``H``: ``∂h`` of a row block in a float32
accumulator, ``∂W[v0:v1]`` written per chunk (accumulated in the weight's dtype across row blocks), ``∂b`` in
float32. Blocks come from :func:`plan_token_stats`, the same formula as PyTorch's (the bound of SPEC §14.4).

Pure XLA, no Pallas kernel in this first version: correct on every backend. Everything is ``jit``-compatible
with static shapes; the temperature, soft-cap, ``need`` and chunk sizes are static.
Under ``jit`` a target outside ``[0, V)`` (which cannot raise, SPEC §11) makes its row not finite
(``logprob = NaN``, no gradient); concrete ones raise.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from cggr_jax import dispatch, fused_linear, utils
from cggr_jax.fused_linear_backward import block_logits
from cggr_jax.kernels.launch import DEFAULT_MEMORY_BUDGET
from cggr_jax.scoring import top_two
from cggr_jax.types import TokenStatistics

__all__ = [
    "NEEDS",
    "TokenStatsOutput",
    "TokenStatsPlan",
    "check_transform",
    "fused_linear_statistics",
    "fused_linear_token_stats",
    "plan_token_stats",
    "token_stats_on_rows",
]

NEEDS = ("logprob", "entropy")
_FILL = 0.875
_ALIGN = 128
_FORWARD_MIN_COLUMNS = 512


class TokenStatsOutput(NamedTuple):
    """As :class:`cggr_torch.token_stats.TokenStatsOutput`: float32 ``logprob`` (0 for ignored targets),
    ``entropy`` (``None`` when not in ``need``), ``lse``, bool ``finite`` and the SPEC §2 ``statistics`` of the
    transformed logits (NaN in every field of a non-finite row)."""

    logprob: Optional[jax.Array]
    entropy: Optional[jax.Array]
    lse: jax.Array
    finite: jax.Array
    statistics: TokenStatistics


class TokenStatsPlan(NamedTuple):
    """Forward blocks ``row_chunk × vocab_chunk``, backward blocks ``backward_row_chunk × backward_vocab_chunk``."""

    row_chunk: int
    vocab_chunk: int
    backward_row_chunk: int
    backward_vocab_chunk: int


def check_transform(temperature: Any, softcap: Any) -> tuple[float, Optional[float]]:
    """``(temperature, softcap)`` as host floats: finite ``temperature > 0``, ``softcap`` None or finite ``> 0``
    (SPEC §14.1); ``ValueError`` naming the argument otherwise."""
    for name, value, optional in (("temperature", temperature, False), ("softcap", softcap, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
                or float(value) <= 0:
            raise ValueError(f"{name}: expected {'None or ' if optional else ''}a finite number > 0, got {value!r}")
    return float(temperature), (None if softcap is None else float(softcap))


def _check_need(need: Any) -> tuple[str, ...]:
    if isinstance(need, str) or not isinstance(need, Sequence) or any(n not in NEEDS for n in need):
        raise ValueError(f"need: expected a sequence of names from {NEEDS}, got {need!r}")
    return tuple(n for n in NEEDS if n in need)


def _round_down(x: int) -> int:
    return (x // _ALIGN) * _ALIGN if x >= _ALIGN else max(1, x)


def plan_token_stats(num_rows: int, hidden_dim: int, vocab_size: int, dtype: Any, *,
                     grad_rows: Optional[int] = None,
                     memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsPlan:
    """The blocks of SPEC §14.4 (the formula of :func:`cggr_torch.token_stats.plan_token_stats`)."""
    for name, value in (("num_rows", num_rows), ("hidden_dim", hidden_dim), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size: expected an integer >= 1, got {vocab_size}")
    budget = utils.check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
    if grad_rows is not None and grad_rows != 0:
        utils.check_int(grad_rows, "grad_rows", minimum=1)
    try:
        e = jnp.dtype(dtype).itemsize
    except TypeError as err:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype!r}") from err
    n, V, d = max(1, int(num_rows)), int(vocab_size), int(hidden_dim)
    target = int(_FILL * budget)
    per_logit = e + 20
    cols_min = min(V, _FORWARD_MIN_COLUMNS)
    rows = n if n * (cols_min * per_logit + 32) <= target else _round_down(target // (cols_min * per_logit + 32))
    rows = min(n, rows)
    cols = min(V, max(1, _round_down((target - 32 * rows) // (rows * per_logit)) if target > 32 * rows else 1))
    k = n if grad_rows is None else max(1, int(grad_rows))
    fixed_row = d * (4 + 2 * e)
    brows = min(k, _round_down((target // 2) // max(1, fixed_row)))
    free = target - brows * fixed_row - 4 * V
    per_col = brows * (2 * e + 24) + d * e
    bcols = min(V, max(1, _round_down(free // per_col) if free > per_col else 1))
    return TokenStatsPlan(int(rows), int(cols), int(brows), int(bcols))


# ========================================================================================= checks
def _check_inputs(hidden: Any, weight: Any, targets: Any, bias: Any, ignore_index: int) -> jax.Array:
    h_dtype = getattr(hidden, "dtype", None)
    h_shape = getattr(hidden, "shape", None)
    if h_dtype is None or h_shape is None or len(h_shape) not in (2, 3) or not jnp.issubdtype(h_dtype, jnp.floating):
        raise ValueError(f"hidden: expected a floating (N, d) or (B, T, d) array, got {_describe(hidden)}")
    d = int(h_shape[-1])
    w_shape = getattr(weight, "shape", None)
    if w_shape is None or len(w_shape) != 2 or w_shape[1] != d or w_shape[0] < 1:
        raise ValueError(f"weight: expected the LM head weight of shape (V, {d}) with V >= 1 (d = hidden.shape[-1]), "
                         f"got {_describe(weight)}")
    if weight.dtype != h_dtype:
        raise ValueError(f"weight: expected dtype {h_dtype} (that of hidden), got {weight.dtype}")
    V = int(w_shape[0])
    if bias is not None:
        if tuple(getattr(bias, "shape", ())) != (V,):
            raise ValueError(f"bias: expected None or an array of shape ({V},), got {_describe(bias)}")
        if bias.dtype != h_dtype:
            raise ValueError(f"bias: expected dtype {h_dtype} (that of hidden), got {bias.dtype}")
    return utils.as_targets(targets, tuple(h_shape[:-1]) + (V,), "targets", ignore_index=ignore_index)


def _describe(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return type(x).__name__ if shape is None or dtype is None else f"an array of dtype {dtype} and shape {tuple(shape)}"


# ======================================================================================== loops
def _chunks(total: int, size: int) -> tuple[int, int]:
    return total // size, total % size


def _loop(total: int, size: int, body, carry):
    """``body(carry, start, width)`` over ``[0, total)`` in blocks of ``size``: the full blocks in a
    ``fori_loop`` (traced start), the ragged tail with a static start and width."""
    full, tail = _chunks(total, size)
    if full == 1:
        carry = body(carry, 0, size)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, c: body(c, i * size, size), carry)
    if tail:
        carry = body(carry, full * size, tail)
    return carry


def _logits(h: jax.Array, w: jax.Array, b: Optional[jax.Array]) -> jax.Array:
    """``h Wᵀ + b`` in the inputs' dtype (float32 accumulation, one rounding that XLA keeps: the fused head's
    :func:`~cggr_jax.fused_linear_backward.block_logits`)."""
    return block_logits(h, w, b, "vd", h.dtype)


def _transform(z: jax.Array, temperature: float, softcap: Optional[float]) -> jax.Array:
    y = z.astype(jnp.float32)
    if softcap is not None:
        y = jnp.tanh(y / jnp.float32(softcap)) * jnp.float32(softcap)
    return y / jnp.float32(temperature) if temperature != 1.0 else y


def _slice(x: Optional[jax.Array], start, width: int, axis: int = 0) -> Optional[jax.Array]:
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, width, axis=axis)


# ====================================================================================== forward
def _block_statistics(h, w, b, safe_t, has_t, cols: int, temperature: float, softcap: Optional[float]):
    R = h.shape[0]
    V = w.shape[0]
    f32 = jnp.float32
    ninf = jnp.full((R,), -jnp.inf, f32)
    zeros = jnp.zeros((R,), f32)

    def body(state, v0, width):
        m1, m2, s, a, yt, bad = state
        y = _transform(_logits(h, _slice(w, v0, width), _slice(b, v0, width)), temperature, softcap)
        bad = bad | jnp.any(jnp.isnan(y) | (y == jnp.inf), axis=1)
        if width >= 2:
            c1, c2 = top_two(y)
        else:
            c1, c2 = y[:, 0], ninf
        new_m = jnp.maximum(m1, c1)
        m2 = jnp.maximum(jnp.maximum(jnp.minimum(m1, c1), m2), c2)
        shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
        old = s > 0
        alpha = jnp.where(old, jnp.exp(m1 - shift), 0.0)
        delta = jnp.where(old, m1 - shift, 0.0)
        u = y - shift[:, None]
        ex = jnp.exp(u)
        eu = jnp.where(ex > 0, ex * u, 0.0)
        a = alpha * (a + s * delta) + jnp.sum(eu, axis=1)
        s = alpha * s + jnp.sum(ex, axis=1)
        local = safe_t - v0
        here = has_t & (local >= 0) & (local < width)
        picked = jnp.take_along_axis(y, jnp.clip(local, 0, width - 1)[:, None], axis=1)[:, 0]
        yt = jnp.where(here, picked, yt)
        return new_m, m2, s, a, yt, bad

    m1, m2, s, a, yt, bad = _loop(V, cols, body, (ninf, ninf, zeros, zeros, zeros, jnp.zeros((R,), bool)))
    ln_s = jnp.log(s)
    lse = m1 + ln_s
    entropy = ln_s - a / s
    p1 = jnp.exp(m1 - lse)
    p2 = jnp.exp(m2 - lse)
    nll = jnp.where(has_t, lse - yt, 0.0)
    ok = ~bad & jnp.isfinite(lse) & jnp.isfinite(entropy) & jnp.isfinite(p1) & jnp.isfinite(p2) \
        & jnp.isfinite(nll) & jnp.all(jnp.isfinite(h), axis=1)
    return tuple(jnp.where(ok, x, jnp.nan) for x in (lse, entropy, p1, p2, nll)) + (ok,)


def _flat_statistics(h2, w, b, safe_t, has_t, plan: TokenStatsPlan, temperature: float,
                     softcap: Optional[float]) -> tuple[TokenStatistics, jax.Array]:
    N = h2.shape[0]
    R = min(plan.row_chunk, max(1, N))
    out = tuple(jnp.zeros((N,), jnp.float32) for _ in range(5)) + (jnp.zeros((N,), bool),)

    def body(bufs, r0, width):
        res = _block_statistics(_slice(h2, r0, width), w, b, _slice(safe_t, r0, width), _slice(has_t, r0, width),
                                plan.vocab_chunk, temperature, softcap)
        return tuple(jax.lax.dynamic_update_slice_in_dim(buf, x, r0, axis=0) for buf, x in zip(bufs, res))

    res = _loop(N, R, body, out) if N else out
    return TokenStatistics(*res[:5]), res[5]


# ===================================================================================== backward
@dataclasses.dataclass(frozen=True)
class _Static:
    plan: TokenStatsPlan
    temperature: float
    softcap: Optional[float]


def _backward(st: _Static, h2, w, b, rows, t_rows, lse, entropy, g_lp, g_h):
    N, d = h2.shape
    V = w.shape[0]
    dt = h2.dtype
    f32 = jnp.float32
    K = rows.shape[0]
    ok = jnp.isfinite(lse) & jnp.isfinite(entropy)
    g_lp = jnp.where(ok & (t_rows >= 0), g_lp.astype(f32), 0.0)
    g_h = jnp.where(ok, g_h.astype(f32), 0.0)
    lse = jnp.where(ok, lse, 0.0)
    entropy = jnp.where(ok, entropy, 0.0)
    R = min(st.plan.backward_row_chunk, max(1, K))
    C = st.plan.backward_vocab_chunk
    T, cap = st.temperature, st.softcap

    def row_body(carry, r0, height):
        gh, gw, gb = carry
        idx = _slice(rows, r0, height)
        okr = _slice(ok, r0, height)
        h = jnp.where(okr[:, None], h2[idx], jnp.zeros((), dt))
        gl, gH, l_r, H_r, t_r = (_slice(x, r0, height)[:, None] for x in (g_lp, g_h, lse, entropy, t_rows))

        def col_body(inner, v0, width):
            acc, gw, gb = inner
            w_c = _slice(w, v0, width)
            z = _logits(h, w_c, _slice(b, v0, width)).astype(f32)
            if cap is not None:
                th = jnp.tanh(z / f32(cap))
                y, dz = th * f32(cap), 1.0 - th * th
            else:
                y, dz = z, None
            if T != 1.0:
                y = y / f32(T)
            logp = y - l_r
            p = jnp.exp(logp)
            g = -gH * jnp.where(p > 0, p * (logp + H_r), 0.0) - p * gl
            cols = jnp.arange(width)[None, :] + v0
            g = g + jnp.where(cols == t_r, gl, 0.0)
            if dz is not None:
                g = g * dz
            if T != 1.0:
                g = g / f32(T)
            gb = jax.lax.dynamic_update_slice_in_dim(gb, _slice(gb, v0, width) + jnp.sum(g, axis=0), v0, axis=0)
            gd = g.astype(dt)
            acc = acc + jax.lax.dot_general(gd, w_c, (((1,), (0,)), ((), ())), preferred_element_type=f32)
            dw = jax.lax.dot_general(gd, h, (((0,), (0,)), ((), ())), preferred_element_type=f32)
            gw = jax.lax.dynamic_update_slice_in_dim(gw, (_slice(gw, v0, width).astype(f32) + dw).astype(gw.dtype),
                                                     v0, axis=0)
            return acc, gw, gb

        acc, gw, gb = _loop(V, C, col_body, (jnp.zeros((height, d), f32), gw, gb))
        gh = gh.at[idx].add(acc.astype(dt))
        return gh, gw, gb

    init = (jnp.zeros((N, d), dt), jnp.zeros_like(w), jnp.zeros((V,), f32))
    gh, gw, gb = _loop(K, R, row_body, init) if K else init
    return gh, gw, (None if b is None else gb.astype(b.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attach(st: _Static, h2, w, b, rows, t_rows, lse, entropy, lp_out, ent_out):
    return lp_out, ent_out


def _attach_fwd(st, h2, w, b, rows, t_rows, lse, entropy, lp_out, ent_out):
    return (lp_out, ent_out), (h2, w, b, rows, t_rows, lse, entropy)


def _attach_bwd(st, res, g):
    h2, w, b, rows, t_rows, lse, entropy = res
    g_lp, g_h = g
    gh, gw, gb = _backward(st, h2, w, b, rows, t_rows, lse, entropy, g_lp, g_h)
    return (gh, gw, gb, None, None, None, None, None, None)


_attach.defvjp(_attach_fwd, _attach_bwd)


# ======================================================================================= public
def _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index, row_chunk_size, vocab_chunk_size,
             memory_budget_bytes, grad_rows=None):
    temperature, softcap = check_transform(temperature, softcap)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    for name, value in (("row_chunk_size", row_chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None:
            utils.check_int(value, name, minimum=1)
    utils.check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
    targets = _check_inputs(hidden, weight, targets, bias, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    V = weight.shape[0]
    not_ignored, in_range, safe = utils.target_masks(targets.reshape(-1), V, ignore_index)
    has_t = not_ignored & in_range
    plan = plan_token_stats(h2.shape[0], h2.shape[1], V, hidden.dtype, grad_rows=grad_rows,
                            memory_budget_bytes=memory_budget_bytes)
    plan = TokenStatsPlan(row_chunk_size or plan.row_chunk, vocab_chunk_size or plan.vocab_chunk,
                          row_chunk_size or plan.backward_row_chunk, vocab_chunk_size or plan.backward_vocab_chunk)
    return h2, safe, has_t, not_ignored & ~in_range, plan, temperature, softcap


@functools.partial(jax.jit, static_argnames=("plan", "temperature", "softcap"))
def _statistics(h2, w, b, safe, has_t, bad_target, plan, temperature, softcap):
    sg = jax.lax.stop_gradient
    stats, ok = _flat_statistics(sg(h2), sg(w), None if b is None else sg(b), safe, has_t, plan, temperature,
                                 softcap)
    ok = ok & ~bad_target      # a traced out-of-range target: not finite (SPEC §14.2)
    return TokenStatistics(*(jnp.where(ok, x, jnp.nan) for x in stats)), ok


def _uses_statistics_kernel(hidden: jax.Array, temperature: float, softcap: Optional[float]) -> bool:
    """The fused head's Pallas statistics (:func:`cggr_jax.fused_linear.fused_linear_scores`: XLA GEMM blocks,
    each read once by the chunk kernel) serve the untransformed distribution (temperature 1, no soft-cap) where
    the kernels run; a transform takes the ``lax`` blocks (the kernel's state has no transform)."""
    return temperature == 1.0 and softcap is None and dispatch.use_kernels(hidden)


def _any_statistics(h2, weight, bias, safe, has_t, bad_t, plan: TokenStatsPlan, temperature: float,
                    softcap: Optional[float], ignore_index: int, row_chunk_size: Optional[int],
                    vocab_chunk_size: Optional[int], memory_budget_bytes: int) -> tuple[TokenStatistics, jax.Array]:
    """:func:`_statistics`, or the same statistics from the fused head's kernel path (same memory budget; the
    caller's chunk sizes are its blocks), with SPEC §14.2's non-finite rows."""
    if not _uses_statistics_kernel(h2, temperature, softcap):
        return _statistics(h2, weight, bias, safe, has_t, bad_t, plan=plan, temperature=temperature,
                           softcap=softcap)
    sg = jax.lax.stop_gradient
    # In-range targets or ignore_index only: an out-of-range target is bad_t, not finite below.
    t = jnp.where(has_t, safe, ignore_index)
    scores = fused_linear.fused_linear_scores(sg(h2), sg(weight), t, None if bias is None else sg(bias),
                                              scoring="entropy", ignore_index=ignore_index,
                                              row_chunk_size=row_chunk_size, vocab_chunk_size=vocab_chunk_size,
                                              memory_budget_bytes=memory_budget_bytes)
    return _non_finite_rows(h2, scores.stats, bad_t)


@jax.jit
def _non_finite_rows(h2, stats: TokenStatistics, bad_t) -> tuple[TokenStatistics, jax.Array]:
    ok = jnp.all(jnp.isfinite(h2), axis=1) & ~bad_t
    for x in stats:
        ok = ok & jnp.isfinite(x)
    return TokenStatistics(*(jnp.where(ok, x, jnp.nan) for x in stats)), ok


def fused_linear_statistics(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                            bias: Optional[jax.Array] = None, *, temperature: float = 1.0,
                            softcap: Optional[float] = None, ignore_index: int = -100,
                            row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                            memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatistics:
    """SPEC §2 statistics of the transformed logits (§14.1), token-shaped, float32, no gradient (NaN in every
    field of a non-finite row, §14.2); arguments as :func:`fused_linear_token_stats`."""
    h2, safe, has_t, bad_t, plan, temperature, softcap = _prepare(
        hidden, weight, targets, bias, temperature, softcap, ignore_index, row_chunk_size, vocab_chunk_size,
        memory_budget_bytes)
    stats, _ = _any_statistics(h2, weight, bias, safe, has_t, bad_t, plan, temperature, softcap, ignore_index,
                               row_chunk_size, vocab_chunk_size, memory_budget_bytes)
    shape = tuple(hidden.shape[:-1])
    return TokenStatistics(*(x.reshape(shape) for x in stats))


def _finish(logprob, entropy, lse, ok, stats, need, shape) -> TokenStatsOutput:
    r = (lambda x: x.reshape(shape))
    return TokenStatsOutput(r(logprob) if "logprob" in need else None, r(entropy) if "entropy" in need else None,
                            r(lse), r(ok), TokenStatistics(*(r(x) for x in stats)))


def fused_linear_token_stats(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                             bias: Optional[jax.Array] = None, *, need: Sequence[str] = NEEDS,
                             temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                             row_chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                             memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsOutput:
    """Per-token target log-prob, entropy and lse of ``hidden · weightᵀ + bias`` (soft-capped, then divided by
    the temperature: SPEC §14.1) without materialising the logits; differentiable (``jax.grad``) in ``hidden``,
    ``weight`` and ``bias`` through the outputs named in ``need``. Arguments and results as
    :func:`cggr_torch.token_stats.fused_linear_token_stats` (``weight`` is ``(V, d)``). ``jit``-compatible.
    """
    need = _check_need(need)
    h2, safe, has_t, bad_t, plan, temperature, softcap = _prepare(
        hidden, weight, targets, bias, temperature, softcap, ignore_index, row_chunk_size, vocab_chunk_size,
        memory_budget_bytes)
    stats, ok = _any_statistics(h2, weight, bias, safe, has_t, bad_t, plan, temperature, softcap, ignore_index,
                                row_chunk_size, vocab_chunk_size, memory_budget_bytes)
    logprob = jnp.where(has_t | bad_t, -stats.nll, 0.0)
    entropy = stats.entropy
    N = h2.shape[0]
    if need:
        t_rows = jnp.where(has_t & ok, safe, -1)
        lp_g, ent_g = _attach(_Static(plan, temperature, softcap), h2, weight, bias, jnp.arange(N, dtype=jnp.int32),
                              t_rows, stats.lse, stats.entropy, logprob, entropy)
        logprob = lp_g if "logprob" in need else logprob
        entropy = ent_g if "entropy" in need else entropy
    return _finish(logprob, entropy, stats.lse, ok, stats, need, tuple(hidden.shape[:-1]))


def token_stats_on_rows(hidden: jax.Array, weight: jax.Array, targets: jax.Array, bias: Optional[jax.Array],
                        statistics: TokenStatistics, rows: jax.Array, live: jax.Array, *,
                        need: Sequence[str] = NEEDS, temperature: float = 1.0, softcap: Optional[float] = None,
                        ignore_index: int = -100, row_chunk_size: Optional[int] = None,
                        vocab_chunk_size: Optional[int] = None,
                        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> TokenStatsOutput:
    """:func:`cggr_torch.token_stats.token_stats_on_rows`: the gathered rows' outputs (shape ``(K,)``) from
    precomputed ``statistics``, whose backward recomputes and touches the LM head for these rows only; rows
    with ``live = False`` are padding (0, not finite, no gradient). ``jit``-compatible (``K`` static)."""
    need = _check_need(need)
    if getattr(rows, "ndim", None) != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"rows: expected a 1-D integer array of flat row indices, got {_describe(rows)}")
    if getattr(live, "dtype", None) != jnp.bool_ or tuple(live.shape) != tuple(rows.shape):
        raise ValueError(f"live: expected a bool array of shape {tuple(rows.shape)}, got {_describe(live)}")
    if not isinstance(statistics, TokenStatistics):
        raise ValueError(f"statistics: expected a TokenStatistics, got {type(statistics).__name__}")
    h2, safe, has_t, bad_t, plan, temperature, softcap = _prepare(
        hidden, weight, targets, bias, temperature, softcap, ignore_index, row_chunk_size, vocab_chunk_size,
        memory_budget_bytes, grad_rows=int(rows.shape[0]))
    N = h2.shape[0]
    rows = jnp.clip(jnp.where(live, rows.astype(jnp.int32), 0), 0, max(0, N - 1))
    flat = TokenStatistics(*(x.reshape(-1) for x in statistics))
    sel = TokenStatistics(*(jnp.where(live, x[rows], jnp.nan) for x in flat))
    has_r = has_t[rows] & live
    ok = jnp.isfinite(sel.lse) & jnp.isfinite(sel.entropy) & jnp.isfinite(sel.confidence) \
        & jnp.isfinite(sel.runner_up) & (jnp.isfinite(sel.nll) | ~has_r) & ~bad_t[rows]
    logprob = jnp.where(has_r | (bad_t[rows] & live), -sel.nll, 0.0)
    entropy = jnp.where(live, sel.entropy, 0.0)
    if need:
        t_rows = jnp.where(has_r & ok, safe[rows], -1)
        lse_r = jnp.where(ok, sel.lse, jnp.nan)
        lp_g, ent_g = _attach(_Static(plan, temperature, softcap), h2, weight, bias, rows, t_rows,
                              jax.lax.stop_gradient(lse_r), jax.lax.stop_gradient(sel.entropy),
                              jax.lax.stop_gradient(logprob), jax.lax.stop_gradient(entropy))
        logprob = lp_g if "logprob" in need else logprob
        entropy = ent_g if "entropy" in need else entropy
    return _finish(logprob, entropy, sel.lse, ok, sel, need, (rows.shape[0],))
