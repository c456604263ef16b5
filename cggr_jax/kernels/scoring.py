"""Pallas scoring kernel: every SPEC §2 statistic of a row in one read of the logits.

Math. A row ``z ∈ ℝ^V`` (upcast exactly to float32 on load) is streamed in steps of ``block_v`` columns with
an online (streaming) softmax. The carry after the steps ``0 … b`` is

    m  = max_j z_j                                   running maximum
    r  = second largest element of the multiset      runner-up logit z_(2) (ties counted, −∞ if none)
    d  = Σ_j e^{z_j − m}                             running normaliser
    s  = Σ_j e^{z_j − m}·(z_j − m)                   running first moment, shifted by m

When a step raises the maximum to ``m' ≥ m`` the old terms are rescaled with ``α = e^{m − m'}``::

    d ← α·d + Σ_step e^{z − m'}
    s ← α·(s + d·(m − m')) + Σ_step e^{z − m'}·(z − m')

(the second line is ``Σ e^{z−m'}(z−m') = α·Σ e^{z−m}((z−m) + (m−m'))``). At the end, with ``z_t`` the target
logit,

    lse = m + log d        H = log d − s/d   (= lse − Σ_j p_j z_j)
    p1  = 1/d              p2 = e^{r − m}/d
    nll = (m − z_t) + log d

``s`` is kept relative to ``m`` (``Σ p_j z_j = m + s/d``), which avoids the cancellation of two numbers of
size ``|m|`` in ``H``; ``z − m`` is exact for the terms that matter, so every finite ``m`` (up to ``FLT_MAX``)
is handled. ``e^t`` is computed as ``2^{t·log2 e}``. A ``−∞`` entry has ``e^{z − m} = 0`` exactly and its
``(z − m)`` factor is clamped to −200 first, so it contributes 0 to ``s`` (no ``0·(−∞)``).

Top-2 across steps. A step with maximum ``b1`` (``k`` copies) and second value ``b2`` (``b2 = b1`` when
``k ≥ 2``) merges with the carry as ``m' = max(m, b1)``, ``r' = max(min(m, b1), max(r, b2))`` — the second
largest of the union of two multisets, ties included (two equal maxima give ``r' = m'`` and so ``p2 = p1``).
A step with ``b1 ≤ r`` in every row of the program cannot change ``(m, r)`` (the formula then returns ``r``);
the merge, which costs two more passes over the step in registers, is skipped for it — after the first few
steps of a row, almost every step. ``V = 1`` leaves ``r = −∞`` and ``p2 = 0``.

Non-finite rows. A NaN anywhere makes ``d`` NaN (``exp(NaN) = NaN``; this does not rely on how ``max``
treats NaN, which is ``maxnum`` in the Triton lowering); ``+∞`` makes ``m = +∞``; a row of only ``−∞`` keeps
``m = −∞``. Such rows get NaN in ``lse, entropy, confidence, runner_up`` (and in ``nll`` when the target is
valid), exactly like ``tests/oracle.py``, so every consumer sees them as not finite (SPEC §2).

Targets. The target logits are read with one masked gather per program at the sanitised columns
``where(valid ∧ 0 ≤ t < V, t, 0)``; the gather is masked off for ignored rows, so an ``ignore_index`` row
never reads its target. ``nll = 0`` where ``t = ignore_index``. Concrete (non-traced) targets outside
``[0, V)`` raise ``ValueError``; under ``jit`` they cannot raise (SPEC §11) and, like ignored ones, give
``nll = 0`` (``cggr_jax.scoring.TokenStatistics``: no valid target) and are never used as an index; the
callers make them ineligible.

Vocabulary chunks (:func:`chunk_statistics`, the fused LM head's forward). A row may also arrive as column
chunks ``z[:, v0:v0 + C]`` in increasing ``v0``, one launch each. The carry is the state between launches:
``(m, r, d, s, z_t)``, float32 ``(CHUNK_STATE_ROWS, N)``. The first chunk starts from ``(−∞, −∞, 0, 0)``,
every later one resumes the recurrence above from the stored carry (``d``, ``s`` stay relative to the
carried ``m`` and are rescaled by ``α`` when a chunk raises it; the top-2 merge is the same multiset union),
and the last (``v0 + C = V``) turns the carry into the statistics with the formulas above. The result is
that of one pass over the row up to the summation order of ``d`` and ``s``. ``z_t`` is read (one masked
gather at column ``t − v0``) by the chunk with ``v0 ≤ t < v0 + C`` only; the others pass it on.

Launch geometry (:class:`KernelConfig`, defaults :data:`SCORING_DEFAULTS`). A program owns ``block_rows = R``
consecutive token rows ``pid·R … pid·R + R − 1``. One loop step reads ``block_v`` columns of each of them as
``block_v / C`` sub-tiles of shape ``(R, C)``, ``C = 32·vec·max(1, num_warps / R)`` and ``vec`` = the
elements of one 16-byte load (8 for bf16/fp16, 4 for fp32). With ``num_warps ≤ R`` that is exactly the
layout Triton's coalescing pass gives an ``(R, C)`` tile — lanes along the columns, warps along the rows — so
each warp owns whole rows, each thread holds ``block_v / (32·vec)`` 16-byte vectors of its row per step, and
every per-row reduction (max, the two sums) stays inside one warp: register operations and five shuffles, no
shared memory, no barrier. (Only the "does any row need a top-2 merge" test crosses warps when
``R > 1 = num_warps / R``.) With ``num_warps > R`` the spare warps split the columns and the reductions cross
warps. Ragged last row block (``N mod R ≠ 0``): the rows past ``N`` are masked off in every logits load
(nothing is read) and in every output store (nothing is written); per-row scalars (targets, row mask) are
gathered at the row index clamped to ``N − 1``.

Pipelining. The loop over the full steps prefetches step ``j + 1`` into registers before it reduces step
``j`` (the last full step re-reads itself rather than paying masked-load register fills in every step).
Triton's software pipeliner only pipelines loads of loops that feed a ``dot`` or carry a per-loop
``num_stages`` attribute, which Pallas does not emit, so ``num_stages`` has no effect on these loops (it is
passed to Triton unchanged). The ragged last step is a separate masked load with ``other = −∞``. Loads use
``evict_first`` (read-once stream). ``2^x`` is one ``ex2.approx.ftz.f32`` (inline PTX) on the GPU instead
of libdevice's ``exp2f``, whose subnormal-range fix-ups cost four instructions per logit; the interpreter
uses ``jnp.exp2``. Results below ``2^-126`` flush to 0, which changes no statistic by more than ``1e-38``.

Backend (the single switch, :data:`PALLAS_GPU_BACKEND`): see ``cggr_jax/kernels/__init__.py``. On GPU the
``pallas_call`` is lowered through Pallas' Triton backend by passing ``plt.CompilerParams``; elsewhere it
runs with ``interpret=True``. Addresses: the Triton lowering switches the element offsets of a ref to 64-bit
when the whole array exceeds 2^32 bytes, so ``N·V > 2^31`` elements is addressed correctly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .. import utils
from ..types import TokenStatistics
from .launch import PALLAS_GPU_BACKEND, SCORING_DEFAULTS, KernelConfig, kernel_config, tile_columns

__all__ = [
    "token_statistics_pallas",
    "CHUNK_STATE_ROWS",
    "chunk_statistics",
]

LOG2E = 1.4426950408889634
#: Lower clamp of ``t = z − m`` inside ``e^t·t``: ``e^-200 = 0`` in float32 (``2^-288``), so the clamp changes
#: no nonzero term and turns ``0·(−∞)`` into ``0·(−200) = 0``.
_T_MIN = -200.0


def _compiler_params(num_warps: int, num_stages: int) -> Any:
    """Backend-specific ``compiler_params`` for ``pl.pallas_call`` (see :data:`PALLAS_GPU_BACKEND`)."""
    if PALLAS_GPU_BACKEND != "triton":
        raise ValueError(f"PALLAS_GPU_BACKEND must be 'triton', got {PALLAS_GPU_BACKEND!r}")
    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams", None)
    if cls is None:
        raise RuntimeError(
            f"jax {jax.__version__} has no jax.experimental.pallas.triton.CompilerParams: the Pallas Triton "
            "backend these kernels use was removed; run with CGGR_DISABLE_KERNELS=1 (XLA reference) or use "
            "a jax that ships it (0.10.x and 0.11.x are supported)")
    return cls(num_warps=num_warps, num_stages=num_stages)


def pallas_call_options(cfg: KernelConfig) -> dict[str, Any]:
    """``interpret=``/``compiler_params=`` keyword arguments of ``pl.pallas_call`` for ``cfg``."""
    if cfg.interpret:
        return {"interpret": True}
    return {"interpret": False, "compiler_params": _compiler_params(cfg.num_warps, cfg.num_stages)}


# ------------------------------------------------------------------------------------ in-kernel primitives
def _plt_fn(name: str) -> Callable[..., Any]:
    fn = getattr(plt, name, None)
    if fn is None:
        raise RuntimeError(f"jax {jax.__version__} has no jax.experimental.pallas.triton.{name}; the Pallas "
                           "Triton backend these kernels use is missing (set CGGR_DISABLE_KERNELS=1)")
    return fn


def load(ref: Any, mask: Optional[jax.Array] = None, other: Any = None, *, stream: bool = False) -> jax.Array:
    """``plt.load`` (optionally masked; the only masked load the Triton lowering and the interpreter share).
    Masked-off elements are not read; they take ``other`` (undefined when ``other`` is None: only for values
    that are never used). ``stream``: a read-once stream (``evict_first``: do not keep it in L2 at the
    expense of other data)."""
    kwargs: dict[str, Any] = {"eviction_policy": "evict_first"} if stream else {}
    if mask is not None:
        kwargs["mask"] = mask
        if other is not None:
            kwargs["other"] = other
    return _plt_fn("load")(ref, **kwargs)


def store(ref: Any, value: jax.Array, mask: Optional[jax.Array] = None) -> None:
    """``plt.store``, optionally masked (masked-off elements are not written)."""
    if mask is None:
        _plt_fn("store")(ref, value)
    else:
        _plt_fn("store")(ref, value, mask=mask)


def exp2(x: jax.Array, interpret: bool) -> jax.Array:
    """``2^x`` in float32: one ``ex2.approx.ftz.f32`` per element on the GPU (module doc), ``jnp.exp2`` in
    the interpreter. NaN → NaN, +∞ → +∞, −∞ → 0; results below 2^-126 flush to 0."""
    if interpret:
        return jnp.exp2(x)
    [y] = _plt_fn("elementwise_inline_asm")(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def whole(shape: Sequence[int]) -> Any:
    """A BlockSpec whose block is the whole array (the kernel indexes it itself, with masks at the edges)."""
    shape = tuple(int(s) for s in shape)
    zeros = (0,) * len(shape)
    return pl.BlockSpec(shape, lambda *ids: zeros)


def program_rows(n: int, rows: int, tile: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row0, safe, in_range)`` of this program's rows ``row0 … row0 + rows − 1``: ``safe`` (``(rows,)``)
    clamped to ``n − 1`` (always a legal gather index) and ``in_range`` whether each is a real row
    (``< n``). ``tile``: the row-tile index (``row0 = tile·rows``); ``None`` = ``pl.program_id(0)``."""
    if tile is None:
        tile = pl.program_id(0)
    row0 = pl.multiple_of(tile * rows, rows)
    ids = row0 + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    return row0, jnp.minimum(ids, n - 1), ids < n


# --------------------------------------------------------------------------------------------- validation
def check_inputs(logits: Any, targets: Any, ignore_index: Any) -> tuple[jax.Array, Optional[jax.Array], int]:
    """SPEC §1/§11 checks shared with the reference (``cggr_jax.utils``): ``ValueError`` naming the argument
    for a bad rank/dtype/shape or ``V = 0``, and for concrete targets outside ``[0, V)`` that are not
    ``ignore_index`` (traced targets cannot be checked; see :func:`sanitize_targets`)."""
    logits = utils.as_logits(logits)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    if targets is not None:
        targets = utils.as_targets(targets, logits.shape, ignore_index=ignore_index)
    return logits, targets, ignore_index


def as_float32_input(logits2d: jax.Array) -> jax.Array:
    """float64 is accepted and computed in float32 (SPEC §1); fp32/fp16/bf16 are read as they are."""
    if logits2d.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        return logits2d.astype(jnp.float32)
    return logits2d


def sanitize_targets(targets1d: jax.Array, vocab: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """``(t, code)``, int32 ``(N,)``: ``t`` = the target where it is valid and in ``[0, V)``, else 0 (so it is
    never an out-of-bounds index); ``code`` = 1 valid and in range, 0 ignored (``t = ignore_index``), −1 valid
    but outside ``[0, V)`` (possible only under ``jit``, where values cannot raise)."""
    not_ignored, in_range, safe = utils.target_masks(targets1d, vocab, ignore_index)
    code = jnp.where(not_ignored, jnp.where(in_range, 1, -1), 0).astype(jnp.int32)
    return safe, code


# ------------------------------------------------------------------------------------------------- kernel
class Stream:
    """The ``(R, block_v)`` steps of a program's rows as ``(R, C)`` sub-tiles, loaded in the input dtype.

    ``row_mask`` (``(R,)`` bool or None): rows past ``N`` of a ragged last program; their loads are masked
    off (nothing is read; their values are undefined and never stored) — None when ``N`` is a multiple of
    ``R``."""

    def __init__(self, x_ref: Any, row0: jax.Array, rows: int, row_mask: Optional[jax.Array], v: int,
                 block_v: int, chunk: int) -> None:
        self.x_ref, self.row0, self.rows, self.row_mask = x_ref, row0, rows, row_mask
        self.v, self.block_v, self.chunk = v, block_v, chunk
        self.n_sub = block_v // chunk
        self.n_full, self.tail = divmod(v, block_v)

    def step(self, j: jax.Array, *, ragged: bool = False) -> list[jax.Array]:
        """Sub-tiles of step ``j``; ``ragged``: the last, partial step, whose columns ``≥ V`` are masked off
        (read as −∞)."""
        start = pl.multiple_of(j * self.block_v, self.block_v)
        shape = (self.rows, self.chunk)
        rows_ok = None if self.row_mask is None else jnp.broadcast_to(self.row_mask[:, None], shape)
        tiles = []
        for u in range(self.n_sub):
            col0 = pl.multiple_of(start + u * self.chunk, self.chunk)
            view = self.x_ref.at[pl.ds(self.row0, self.rows), pl.ds(col0, self.chunk)]
            mask, other = rows_ok, None  # rows past N: values never used
            if ragged:
                cols_ok = col0 + lax.broadcasted_iota(jnp.int32, shape, 1) < self.v
                mask, other = (cols_ok if mask is None else mask & cols_ok), -jnp.inf
            tiles.append(load(view, mask, other, stream=True))
        return tiles

    def fold(self, fn: Callable[[list[jax.Array], Any], Any], carry: Any) -> Any:
        """``carry = fn(tiles, carry)`` over every step: the full steps with a one-step register prefetch,
        then the ragged step (masked)."""
        if self.n_full:
            def body(j: jax.Array, state: Any) -> Any:
                tiles, c = state
                # Issued before this step is reduced. The last full step re-reads itself instead of
                # masking (a masked load costs register fills every step; the re-read is one block per row).
                nxt = self.step(jnp.minimum(j + 1, self.n_full - 1))
                return nxt, fn(tiles, c)

            first = self.step(jnp.int32(0))
            _, carry = lax.fori_loop(0, self.n_full, body, (first, carry))
        if self.tail:
            # A one-step loop: its index is traced, so the slice start is dynamic (a static start past
            # V − block_v is rejected at trace time).
            carry = lax.fori_loop(self.n_full, self.n_full + 1,
                                  lambda j, c: fn(self.step(j, ragged=True), c), carry)
        return carry


def _online_statistics(stream: Stream, interpret: bool,
                       init: Optional[tuple[jax.Array, ...]] = None) -> tuple[jax.Array, ...]:
    """``(m, r, d, s)`` per row of the program (module doc), ``(R,)`` float32 each.

    ``init``: the carry ``(m, r, d, s)`` to resume from (the state a previous vocabulary chunk of the same
    rows left, :func:`chunk_statistics`); None = the empty row ``(−∞, −∞, 0, 0)``. The recurrence is the same
    either way: ``d``, ``s`` are relative to the carried ``m`` and get rescaled when a step raises it."""
    f32 = jnp.float32
    neg_inf = f32(-jnp.inf)
    log2e = f32(LOG2E)
    rows = stream.rows

    def fn(tiles: list[jax.Array], carry: Any) -> Any:
        m, r, d, s = carry
        xs = [t.astype(f32) for t in tiles]
        xm = xs[0]
        for x in xs[1:]:
            xm = jnp.maximum(xm, x)
        b1 = jnp.max(xm, axis=1)

        def merge_top2() -> jax.Array:
            copies = jnp.zeros((rows,), jnp.int32)
            below = jnp.full((rows,), neg_inf)
            for x in xs:
                is_max = x == b1[:, None]
                copies = copies + jnp.sum(is_max.astype(jnp.int32), axis=1)
                below = jnp.maximum(below, jnp.max(jnp.where(is_max, neg_inf, x), axis=1))
            b2 = jnp.where(copies > 1, b1, below)
            return jnp.maximum(jnp.minimum(m, b1), jnp.maximum(r, b2))

        need = jnp.max((b1 > r).astype(jnp.int32)) > 0  # any row of the program: one uniform branch
        r_new = lax.cond(need, merge_top2, lambda: r)
        m_new = jnp.maximum(m, b1)
        # Exponent base: m' where it is finite. A row whose maximum is +∞/NaN ends non-finite anyway (its
        # outputs become NaN); base 0 only keeps its arithmetic defined. All −∞ so far: 2^(−∞) = 0.
        base = jnp.where((m_new > neg_inf) & (m_new < jnp.inf), m_new, f32(0.0))
        had_terms = m > neg_inf  # d = s = 0 until a finite maximum was seen
        delta = jnp.where(had_terms, jnp.maximum(m - base, f32(_T_MIN)), f32(0.0))
        alpha = jnp.where(had_terms, exp2(delta * log2e, interpret), f32(0.0))
        acc_e = acc_s = None
        for x in xs:
            t = x - base[:, None]
            e = exp2(t * log2e, interpret)
            es = e * jnp.maximum(t, f32(_T_MIN))
            acc_e = e if acc_e is None else acc_e + e
            acc_s = es if acc_s is None else acc_s + es
        d_new = d * alpha + jnp.sum(acc_e, axis=1)
        s_new = (s + d * delta) * alpha + jnp.sum(acc_s, axis=1)
        return m_new, r_new, d_new, s_new

    if init is None:
        init = (jnp.full((rows,), neg_inf), jnp.full((rows,), neg_inf), jnp.zeros((rows,), f32),
                jnp.zeros((rows,), f32))
    return stream.fold(fn, tuple(x.astype(f32) for x in init))


def _row_outputs(m: jax.Array, r: jax.Array, d: jax.Array, s: jax.Array, z_t: Optional[jax.Array],
                 valid: Optional[jax.Array], interpret: bool) -> list[jax.Array]:
    """The statistics of a finished carry (module doc): ``[lse, H, p1, p2]`` and, with a target logit
    ``z_t``, ``nll`` (0 where ``valid`` is False). A row whose ``d`` is NaN or whose ``m`` is ±∞ is not
    finite: NaN in every statistic (and in ``nll`` where the target is valid)."""
    f32 = jnp.float32
    bad = jnp.logical_not((d == d) & (m > -jnp.inf) & (m < jnp.inf))
    nan = f32(jnp.nan)
    log_d = jnp.log(d)
    vals = [m + log_d, log_d - s / d, f32(1.0) / d, exp2((r - m) * f32(LOG2E), interpret) / d]
    vals = [jnp.where(bad, nan, x) for x in vals]
    if z_t is not None:
        vals.append(jnp.where(valid, jnp.where(bad, nan, (m - z_t) + log_d), f32(0.0)))
    return vals


def _row_statistics_kernel(*refs: Any, n: int, v: int, rows: int, block_v: int, chunk: int,
                           has_targets: bool, has_row_mask: bool, interpret: bool) -> None:
    it = iter(refs)
    x_ref = next(it)
    tgt_ref = next(it) if has_targets else None
    code_ref = next(it) if has_targets else None
    row_ref = next(it) if has_row_mask else None
    outs = [next(it) for _ in range(5 if has_targets else 4)]
    f32 = jnp.float32
    row0, safe, in_range = program_rows(n, rows)
    out_mask = in_range if n % rows else None  # rows past N exist only in a ragged last program
    active = in_range if row_ref is None else in_range & (row_ref[safe] != 0)

    def compute() -> None:
        stream = Stream(x_ref, row0, rows, out_mask, v, block_v, chunk)
        m, r, d, s = _online_statistics(stream, interpret)
        ok = z_t = None
        if has_targets:
            ok = code_ref[safe] == 1
            # One masked gather of the target logits: rows without a valid in-range target read nothing.
            z_t = load(x_ref.at[safe, tgt_ref[safe]], ok, 0).astype(f32)
        vals = _row_outputs(m, r, d, s, z_t, ok, interpret)
        for ref, val in zip(outs, vals):
            store(ref.at[pl.ds(row0, rows)], jnp.where(active, val, f32(0.0)), out_mask)

    if row_ref is None:
        compute()
        return
    any_active = jnp.max(active.astype(jnp.int32)) > 0
    pl.when(any_active)(compute)

    @pl.when(jnp.logical_not(any_active))
    def _skip() -> None:  # rows outside the row mask are not read; their outputs are 0
        for ref in outs:
            store(ref.at[pl.ds(row0, rows)], jnp.zeros((rows,), f32), out_mask)


def row_statistics(logits2d: jax.Array, targets1d: Optional[jax.Array], *, ignore_index: int,
                   cfg: KernelConfig, row_mask: Optional[jax.Array] = None) -> tuple[jax.Array, ...]:
    """Run the scoring kernel on ``(N, V)`` logits; returns float32 ``(lse, entropy, p1, p2[, nll])`` ``(N,)``.

    ``row_mask`` (optional, ``(N,)`` bool): a program none of whose rows is in the mask reads nothing; rows
    outside the mask get 0 in every output (the selective cross-entropy's sparse forward).
    """
    n, v = logits2d.shape
    x = as_float32_input(logits2d)
    rows = cfg.block_rows
    args: list[jax.Array] = [x]
    has_targets = targets1d is not None
    if has_targets:
        t, code = sanitize_targets(targets1d, v, ignore_index)
        args += [t, code]
    if row_mask is not None:
        args.append(row_mask.astype(jnp.int32))
    n_out = 5 if has_targets else 4
    kernel = bind(_row_statistics_kernel, n=n, v=v, rows=rows, block_v=cfg.block_v,
                  chunk=tile_columns(cfg, x.dtype.itemsize), has_targets=has_targets,
                  has_row_mask=row_mask is not None, interpret=cfg.interpret)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * n_out,
        grid=(pl.cdiv(n, rows),),
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole((n,))] * n_out,
        name="cggr_token_statistics",
        **pallas_call_options(cfg),
    )(*args))


def bind(fn: Callable[..., None], **static: Any) -> Callable[..., None]:
    """``functools.partial`` that keeps the kernel's name (Pallas names the kernel after it)."""
    def kernel(*refs: Any) -> None:
        fn(*refs, **static)
    kernel.__name__ = fn.__name__.lstrip("_")
    kernel.__qualname__ = kernel.__name__
    return kernel


# ------------------------------------------------------------------------------- vocabulary-chunked launch
#: Float32 ``(N,)`` rows of the running state of :func:`chunk_statistics`: ``m``, the runner-up ``r =
#: z_(2)``, ``d``, ``s`` (relative to ``m``, module doc) and the target logit ``z_t`` (0 until the chunk that
#: holds the target; 0 throughout without targets). The same layout as ``cggr_torch``'s chunked launch.
CHUNK_STATE_ROWS = 5


def _chunk_statistics_kernel(*refs: Any, n: int, c: int, rows: int, block_v: int, chunk: int,
                             has_targets: bool, first: bool, final: bool, interpret: bool) -> None:
    """One vocabulary chunk ``[v0, v0 + c)`` of each row folded into the carried state (see
    :func:`chunk_statistics`). Refs: the ``(N, c)`` chunk; with targets the chunk-local target column and the
    chunk code (2: valid target in this chunk, 1: valid target elsewhere, 0 ignored, −1 out of range); unless
    ``first`` the previous state ``m, r, d, s[, z_t]``; then the outputs: the new state (not ``final``) or
    the statistics ``lse, H, p1, p2[, nll]``."""
    it = iter(refs)
    x_ref = next(it)
    col_ref = next(it) if has_targets else None
    code_ref = next(it) if has_targets else None
    n_state = 5 if has_targets else 4
    prev = [] if first else [next(it) for _ in range(n_state)]
    outs = [next(it) for _ in range(n_state)]
    f32 = jnp.float32
    row0, safe, in_range = program_rows(n, rows)
    out_mask = in_range if n % rows else None  # rows past N exist only in a ragged last program
    # Per-row scalars are gathered at the clamped row index (always legal); rows past N are never stored.
    init = None if first else tuple(ref[safe] for ref in prev[:4])
    stream = Stream(x_ref, row0, rows, out_mask, c, block_v, chunk)
    m, r, d, s = _online_statistics(stream, interpret, init)
    z_t = valid = None
    if has_targets:
        code = code_ref[safe]
        here = code == 2
        # The target logit is read in the chunk that holds it (one masked gather; the column is clamped to 0
        # elsewhere and not read); the other chunks pass the carried value on.
        z_here = load(x_ref.at[safe, col_ref[safe]], here, 0).astype(f32)
        z_t = z_here if first else jnp.where(here, z_here, prev[4][safe])
        valid = code >= 1
    if final:
        vals = _row_outputs(m, r, d, s, z_t, valid, interpret)
    else:
        vals = [m, r, d, s] + ([z_t] if has_targets else [])
    for ref, val in zip(outs, vals):
        store(ref.at[pl.ds(row0, rows)], val, out_mask)


def _describe_array(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return "None" if x is None else type(x).__name__
    return f"an array of dtype {dtype} and shape {tuple(shape)}"


def _check_host_int(value: Any, name: str, minimum: int) -> int:
    """A static (host) integer ``>= minimum``; a traced value cannot size or place a static chunk."""
    if utils.is_traced(value):
        raise ValueError(f"{name}: expected a host (static) integer >= {minimum}, got a traced value")
    return utils.check_int(value, name, minimum=minimum)


def chunk_statistics(logits_chunk: jax.Array, targets1d: Optional[jax.Array] = None, *, ignore_index: int,
                     v0: int, vocab_size: int, state: Optional[jax.Array] = None,
                     cfg: Optional[KernelConfig] = None) -> "jax.Array | tuple[jax.Array, ...]":
    r"""Fold the vocabulary chunk ``logits_chunk = z[:, v0:v0 + C]`` into each row's streaming statistics.

    For logits produced one vocabulary chunk at a time (the fused LM head's forward): the chunks of a row
    are passed in increasing ``v0``, the first (``v0 = 0``) starting from the empty carry ``(m, r, d, s) =
    (−∞, −∞, 0, 0)``, every later one from the ``state`` the previous call returned. Each call runs the
    recurrence of the module docstring over its ``C`` columns (same kernel body, same ``Stream`` with the
    ragged last step masked to −∞), so with chunk widths ``C_1 … C_k`` the result equals one pass over the
    whole row up to the summation order of ``d`` and ``s``: the top-2 ``(m, r)``, the target logit and the
    finiteness are exactly those of :func:`row_statistics`. A chunk that is not the last (``v0 + C <
    vocab_size``) returns the new state; the last returns the statistics, computed from the final carry
    exactly as :func:`row_statistics` does::

        lse = m + log d,   H = log d − s/d,   p1 = 1/d,   p2 = e^{r − m}/d,   nll = (m − z_t) + log d

    Targets are indices into the FULL vocabulary: :func:`sanitize_targets` decides validity against
    ``vocab_size``, and the chunk with ``v0 ≤ t < v0 + C`` reads ``z_t`` at column ``t − v0`` (one masked
    gather; every other chunk keeps the carried ``z_t``). ``nll = 0`` for ``ignore_index`` and (possible only
    under ``jit``) out-of-range targets; NaN statistics on non-finite rows, as :func:`row_statistics`.

    Args:
      logits_chunk: ``(N, C)`` float32/float16/bfloat16 (float64 is computed in float32), ``C ≥ 1``.
      targets1d: ``None`` or an integer ``(N,)`` array (the same in every chunk of a row; concrete values
        outside ``[0, vocab_size)`` that are not ``ignore_index`` raise).
      ignore_index: the ignored target value.
      v0: first vocabulary column of the chunk, a host int with ``0 ≤ v0`` and ``v0 + C ≤ vocab_size``.
      vocab_size: ``V``, the full row length (host int ≥ 1).
      state: float32 ``(CHUNK_STATE_ROWS, N)`` = ``(m, r, d, s, z_t)`` returned by the previous chunk;
        required when ``v0 > 0``, not read (and may be None) when ``v0 = 0``.
      cfg: launch parameters (:func:`kernel_config` of ``C`` and the input's element size when None).

    Returns:
      Not the last chunk: the new state, float32 ``(CHUNK_STATE_ROWS, N)``. The last chunk: float32
      ``(lse, entropy, p1, p2[, nll])`` of shape ``(N,)`` each (``nll`` only with targets). jit-safe; the
      shapes and ``v0`` are static.

    Raises:
      ValueError: naming the argument, for a bad rank/dtype/shape, ``v0``/``vocab_size`` that are not host
        integers or place the chunk outside ``[0, vocab_size)``, a missing or malformed ``state``, a ``cfg``
        that is not a :class:`KernelConfig`, or concrete targets out of range.
    """
    shape = getattr(logits_chunk, "shape", None)
    dtype = getattr(logits_chunk, "dtype", None)
    if shape is None or dtype is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.floating) \
            or shape[1] < 1:
        raise ValueError(f"logits_chunk: expected a floating (N, C) array with C >= 1 columns, got "
                         f"{_describe_array(logits_chunk)}")
    n, c = int(shape[0]), int(shape[1])
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    vocab_size = _check_host_int(vocab_size, "vocab_size", 1)
    v0 = _check_host_int(v0, "v0", 0)
    if v0 + c > vocab_size:
        raise ValueError(f"v0: expected 0 <= v0 and v0 + C <= vocab_size, got v0={v0}, C={c}, "
                         f"vocab_size={vocab_size}")
    first, final = v0 == 0, v0 + c == vocab_size
    if state is not None or not first:
        s_shape, s_dtype = getattr(state, "shape", None), getattr(state, "dtype", None)
        if s_shape is None or tuple(s_shape) != (CHUNK_STATE_ROWS, n) or s_dtype != jnp.float32:
            raise ValueError(f"state: expected the float32 ({CHUNK_STATE_ROWS}, {n}) state returned by the "
                             f"previous chunk (required when v0 > 0; v0 = {v0}), got {_describe_array(state)}")
    if targets1d is not None:
        targets1d = utils.as_targets(targets1d, (n, vocab_size), "targets1d", ignore_index=ignore_index)
    if cfg is not None and not isinstance(cfg, KernelConfig):
        raise ValueError(f"cfg: expected None or a KernelConfig (kernel_config(...)), got {type(cfg).__name__}")
    x = as_float32_input(jnp.asarray(logits_chunk))
    if cfg is None:
        cfg = kernel_config(c, x.dtype.itemsize)
    has_targets = targets1d is not None
    n_state = 5 if has_targets else 4
    if n == 0:
        if final:
            return tuple(jnp.zeros((0,), jnp.float32) for _ in range(n_state))
        return jnp.zeros((CHUNK_STATE_ROWS, 0), jnp.float32)
    args: list[jax.Array] = [x]
    if has_targets:
        t, code = sanitize_targets(targets1d, vocab_size, ignore_index)
        here = (code == 1) & (t >= v0) & (t < v0 + c)
        # Chunk-local column (0 where the target is not in this chunk: a legal index that is never read) and
        # the chunk code 2 = "read z_t here"; the validity codes 1/0/−1 of sanitize_targets otherwise.
        args += [jnp.where(here, t - v0, 0).astype(jnp.int32), jnp.where(here, 2, code).astype(jnp.int32)]
    if not first:
        args += [state[j] for j in range(n_state)]
    rows = cfg.block_rows
    kernel = bind(_chunk_statistics_kernel, n=n, c=c, rows=rows, block_v=cfg.block_v,
                  chunk=tile_columns(cfg, x.dtype.itemsize), has_targets=has_targets, first=first, final=final,
                  interpret=cfg.interpret)
    outs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * n_state,
        grid=(pl.cdiv(n, rows),),
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole((n,))] * n_state,
        name="cggr_chunk_statistics",
        **pallas_call_options(cfg),
    )(*args)
    if final:
        return tuple(outs)
    if not has_targets:  # z_t row: no target logit to carry
        outs = list(outs) + [jnp.zeros((n,), jnp.float32)]
    return jnp.stack(outs)


# ------------------------------------------------------------------------------------------- entry point
def token_statistics_pallas(logits: jax.Array, targets: Optional[jax.Array] = None, ignore_index: int = -100,
                            *, interpret: Optional[bool] = None, block_rows: Optional[int] = None,
                            block_v: Optional[int] = None, num_warps: Optional[int] = None,
                            num_stages: Optional[int] = None) -> TokenStatistics:
    """SPEC §2 statistics of every token from one read of the logits (the kernel behind
    ``cggr_jax.scoring.token_statistics``).

    Args:
      logits: ``(N, V)`` or ``(B, T, V)``, float32/float16/bfloat16 (float64 is computed in float32).
      targets: optional integer array of the token shape; ``ignore_index`` marks tokens without a target.
      ignore_index: the ignored target value (default −100).
      interpret: ``None`` = compile with the Triton backend on a GPU, interpret elsewhere.
      block_rows, block_v, num_warps, num_stages: launch parameters (module doc; defaults
        :data:`SCORING_DEFAULTS`: one row per program, 2 KiB of it per step, one warp).

    Returns:
      ``cggr_jax.scoring.TokenStatistics(lse, entropy, confidence, runner_up, nll)``, float32 of the token
      shape; ``nll = 0`` where there is no valid target, NaN statistics on non-finite rows. jit-safe.
    """

    logits, targets, ignore_index = check_inputs(logits, targets, ignore_index)
    shape = logits.shape[:-1]
    v = logits.shape[-1]
    n = math.prod(shape)
    cfg = kernel_config(v, as_float32_input(logits).dtype.itemsize, block_rows=block_rows, block_v=block_v,
                        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    if n == 0:
        z = jnp.zeros(shape, jnp.float32)
        return TokenStatistics(z, z, z, z, z)
    outs = row_statistics(logits.reshape(n, v), None if targets is None else targets.reshape(n),
                          ignore_index=ignore_index, cfg=cfg)
    lse, ent, p1, p2 = (o.reshape(shape) for o in outs[:4])
    nll = outs[4].reshape(shape) if targets is not None else jnp.zeros(shape, jnp.float32)
    return TokenStatistics(lse, ent, p1, p2, nll)
