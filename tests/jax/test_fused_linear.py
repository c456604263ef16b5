"""Fused LM head + selective cross-entropy (``cggr_jax.fused_linear``) against the materialised path.

The reference is the float64 oracle fed with the fused path's own float32 difficulties
(``difficulty_override``): selections compare exactly (SPEC §11 level 1), and the loss and
``∂h = G W``, ``∂W = Gᵀ h``, ``∂b = Σ G`` are computed in float64 from the oracle's ``G = ∂loss/∂logits``
of the materialised logits. Small odd shapes (N = 37, d = 24 / 23, V = 301), chunk sizes dividing neither N nor V.
Every configuration is compiled once (forward and gradient together) to keep the CPU suite fast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax import dispatch
from cggr_jax import fused_linear as fl
from cggr_jax import causal_lm
from cggr_jax.loss import NUMERIC_METRIC_KEYS, CGGRLoss, metrics_to_dict
from cggr_jax import scoring as sc
from tests import oracle

DT = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _inputs(seed, shape, d, V, dtype, *, bias=True, p_ignore=0.15, ignore_index=-100):
    rng = np.random.default_rng(seed)
    temps = rng.uniform(0.2, 3.0, size=shape + (1,))
    h = (rng.standard_normal(shape + (d,)) * temps).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=shape).astype(np.int32)
    t[rng.random(shape) < p_ignore] = ignore_index
    return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(b, dtype) if bias else None, jnp.asarray(t))


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)


def _run(h, w, b, t, step, **kw):
    """Output and gradients w.r.t. (hidden, weight, bias) from one ``value_and_grad`` trace."""

    def f(h, w, b):
        out = fl.fused_linear_cggr(h, w, t, step, bias=b, **kw)
        return out.loss, out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(h, w, b)
    return out, grads


def _materialised_logits(h, w, b, ldt=None):
    ldt = h.dtype if ldt is None else ldt
    z = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    if b is not None:
        z = z + b.astype(jnp.float32)
    return z.astype(ldt)


def _oracle(h, w, b, t, step, difficulty, **cfg):
    z = _materialised_logits(h, w, b)
    ref = oracle.cggr_loss(_f64(z), np.asarray(t), step, difficulty_override=np.asarray(difficulty), **cfg)
    V, d = w.shape
    G = ref["grad"].reshape(-1, V)
    h64 = _f64(h).reshape(-1, d)
    h64 = np.where(np.isfinite(h64), h64, 0.0)
    ref["gh"] = (G @ _f64(w)).reshape(h.shape)
    ref["gw"] = G.T @ h64
    ref["gb"] = G.sum(axis=0)
    ref["z"] = z
    return ref


def _close(actual, expected, rel, name):
    a = _f64(actual)
    scale = max(1e-30, float(np.abs(expected).max())) if expected.size else 1.0
    err = float(np.abs(a - expected).max()) if a.size else 0.0
    assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3g} > {rel:g} × max|ref| {scale:.3g}"


def _within(actual, expected, quantity):
    atol, rtol = oracle.SCORE_TOL[quantity]
    np.testing.assert_allclose(_f64(actual), expected, atol=atol, rtol=rtol, err_msg=quantity)


# ------------------------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("dtype,selection", [("float32", "topk"), ("float32", "stratified"),
                                             ("float32", "sequence_aware"), ("float32", "fixed_quota"),
                                             ("bfloat16", "topk"), ("float16", "stratified")])
def test_matches_oracle(dtype, selection):
    scoring = {"topk": "combined", "stratified": "entropy", "sequence_aware": "margin",
               "fixed_quota": "loss"}[selection]
    shape = (3, 13) if selection == "sequence_aware" else (37,)
    d = 23 if dtype == "float16" else 24
    cfg = dict(scoring=scoring, selection=selection, min_tokens_ratio=0.3, warmup_steps=100,
               min_tokens_per_sequence=2)
    h, w, b, t = _inputs(1, shape, d, 301, DT[dtype])
    out, (gh, gw, gb) = _run(h, w, b, t, 60, **cfg, **CHUNKS)
    ref = _oracle(h, w, b, t, 60, out.scores.difficulty, **cfg)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    assert int(out.metrics["tokens_selected"]) == int(ref["mask"].sum()) > 0
    sco = oracle.score_tokens(_f64(ref["z"]), np.asarray(t), scoring)
    np.testing.assert_array_equal(np.asarray(out.scores.eligible), sco["eligible"])
    for q in ("lse", "entropy", "confidence", "runner_up", "nll"):
        _within(getattr(out.scores.stats, q), sco["stats"][q], q)
    _within(out.scores.difficulty, sco["difficulty"], "difficulty")
    np.testing.assert_allclose(float(out.loss), ref["loss"], atol=1e-4 if dtype != "float32" else 1e-5,
                               rtol=1e-5)
    assert out.loss.dtype == jnp.float32 and out.loss.shape == ()
    assert gh.dtype == h.dtype and gw.dtype == w.dtype and gb.dtype == b.dtype
    _close(gh, ref["gh"], GRAD_TOL[dtype], "grad_hidden")
    _close(gw, ref["gw"], GRAD_TOL[dtype], "grad_weight")
    _close(gb, ref["gb"], GRAD_TOL[dtype], "grad_bias")
    assert not np.asarray(gh)[~np.asarray(out.mask)].any()
    om = ref["metrics"]
    for key in ("step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(out.metrics[key]) == om[key], key
    assert int(out.tokens_over_capacity) == 0
    assert set(out.metrics) == set(NUMERIC_METRIC_KEYS)
    # c̄ is a float32 sum whose order is free (SPEC §11): a few ulp
    assert float(out.metrics["effective_ratio"]) == pytest.approx(float(ref["ratio"]), abs=4e-7)
    for key, tol in (("avg_confidence", 1e-5), ("avg_entropy", 1e-4), ("avg_difficulty", 3e-4)):
        assert float(out.metrics[key]) == pytest.approx(om[key], abs=tol, rel=1e-5), key


def test_dv_layout_no_bias_under_jit():
    """A Flax-style ``(d, V)`` kernel without bias, the whole step under ``jax.jit``, equals the oracle."""
    h, w, _b, t = _inputs(2, (37,), 24, 301, jnp.float32, bias=False)
    cfg = dict(selection="topk", warmup_steps=0, min_tokens_ratio=0.4)
    loss_fn = CGGRLoss(**cfg)   # the configuration may come from a cggr_jax CGGRLoss

    @jax.jit
    def step_fn(h, k):
        def f(h, k):
            out = fl.fused_linear_cggr(h, k, t, 3, weight_layout="dv", loss_fn=loss_fn, **CHUNKS)
            return out.loss, out
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, k)

    (_, out), (gh, gk) = step_fn(h, w.T)
    ref = _oracle(h, w, None, t, 3, out.scores.difficulty, **cfg)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    np.testing.assert_allclose(float(out.loss), ref["loss"], atol=1e-5, rtol=1e-5)
    assert gk.shape == (24, 301)
    _close(gk.T, ref["gw"], GRAD_TOL["float32"], "grad_kernel")
    _close(gh, ref["gh"], GRAD_TOL["float32"], "grad_hidden")
    host = metrics_to_dict(out.metrics, loss_fn)
    assert host["tokens_selected"] == int(ref["mask"].sum()) and host["step"] == 3
    with pytest.raises(ValueError, match="loss_fn"):
        fl.fused_linear_cggr(h, w, t, 0, loss_fn=loss_fn, selection="topk")


# -------------------------------------------------------------------------- ignore_index, NaN, all-ignored
def test_ignore_index_and_nonfinite_rows():
    h, w, b, t = _inputs(5, (37,), 24, 301, jnp.float32, ignore_index=-1, p_ignore=0.2)
    h = h.at[3].set(jnp.nan).at[8, 5].set(jnp.inf).at[11, 0].set(-jnp.inf)
    t = t.at[3].set(7).at[8].set(9).at[11].set(-1)
    cfg = dict(ignore_index=-1, warmup_steps=0, min_tokens_ratio=0.5)
    out, (gh, gw, gb) = _run(h, w, b, t, 0, **cfg, **CHUNKS)
    assert np.isfinite(float(out.loss))
    assert all(bool(jnp.isfinite(g).all()) for g in (gh, gw, gb))
    sel = np.asarray(out.mask)
    assert not sel[[3, 8, 11]].any() and not sel[np.asarray(t) == -1].any()
    assert not np.asarray(gh)[~sel].any()
    assert int(out.metrics["tokens_nonfinite"]) == 2
    ref = _oracle(h, w, b, t, 0, out.scores.difficulty, **cfg)
    np.testing.assert_array_equal(sel, ref["mask"])
    np.testing.assert_allclose(float(out.loss), ref["loss"], atol=1e-5, rtol=1e-5)
    _close(gw, ref["gw"], GRAD_TOL["float32"], "grad_weight")
    _close(gh, ref["gh"], GRAD_TOL["float32"], "grad_hidden")


@pytest.mark.parametrize("shape", [(37,), (0,)])
def test_all_ignored_or_empty_gives_zero_loss_and_zero_grads(shape):
    h, w, b, t = _inputs(6, shape, 24, 301, jnp.float32)
    t = jnp.full_like(t, -100)
    out, (gh, gw, gb) = _run(h, w, b, t, 5, **CHUNKS)
    assert float(out.loss) == 0.0
    assert gh.shape == h.shape and not np.asarray(gh).any()
    assert not np.asarray(gw).any() and not np.asarray(gb).any()
    assert int(out.metrics["tokens_selected"]) == 0 and int(out.metrics["tokens_total"]) == 0
    assert float(out.metrics["avg_confidence"]) == 0.0


# ------------------------------------------------------------------------ capacity and traced labels
def test_capacity_overflow_under_jit_keeps_the_hardest_and_reports_it():
    h, w, b, t = _inputs(7, (37,), 24, 301, jnp.float32, p_ignore=0.0)
    t = t.at[5].set(301)  # out of range: only possible traced
    cfg = dict(selection="topk", warmup_steps=0, min_tokens_ratio=0.5, dynamic_threshold=False)

    @jax.jit
    def f(h, w, t):
        def loss_fn(h, w):
            out = fl.fused_linear_cggr(h, w, t, 0, bias=b, capacity=6, **cfg, **CHUNKS)
            return out.loss, out
        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(h, w)

    (_, out), (gh, gw) = f(h, w, t)
    m = out.metrics
    assert int(m["tokens_out_of_range"]) == 1 and not bool(out.scores.eligible[5])
    assert int(m["tokens_total"]) == 36
    k = oracle.num_selected(36, 0.5)
    assert int(m["tokens_selected"]) == 6 and int(out.tokens_over_capacity) == k - 6
    d = np.asarray(out.scores.difficulty)
    rank = oracle.rank_tokens(d, np.asarray(out.scores.eligible))
    np.testing.assert_array_equal(np.asarray(out.mask), (rank >= 0) & (rank < 6))
    tt = np.asarray(t).copy()
    tt[5] = -100  # the oracle's view of the out-of-range token: never eligible
    z = _f64(_materialised_logits(h, w, b))
    mask = np.asarray(out.mask)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    G = np.exp(z - lse[:, None])
    G[np.arange(37), np.where(tt >= 0, tt, 0)] -= 1.0
    G = np.where(mask[:, None], G / 6.0, 0.0)
    np.testing.assert_allclose(float(out.loss), float((lse - z[np.arange(37), np.where(tt >= 0, tt, 0)])[mask].mean()),
                               atol=1e-5, rtol=1e-5)
    _close(gw, G.T @ _f64(h), GRAD_TOL["float32"], "grad_weight")
    _close(gh, G @ _f64(w), GRAD_TOL["float32"], "grad_hidden")
    # concrete inputs: the overflow and the out-of-range label are ValueErrors
    with pytest.raises(ValueError, match="capacity"):
        fl.fused_linear_cggr(h, w, t.at[5].set(0), 0, bias=b, capacity=6, **cfg)
    with pytest.raises(ValueError, match="targets"):
        fl.fused_linear_cggr(h, w, t, 0, bias=b, **cfg)


def test_max_selected():
    assert fl.max_selected(16384) == 16384                                   # warmup starts at ratio 1
    assert fl.max_selected(16384, warmup_steps=0) == oracle.num_selected(16384, np.float32(0.375))
    assert fl.max_selected(16384, warmup_steps=0, selection="fixed_quota") == 4096
    assert fl.max_selected(20, 3, warmup_steps=0, selection="sequence_aware", min_tokens_per_sequence=2) == 8 + 6
    assert fl.max_selected(10, 3, warmup_steps=0, selection="sequence_aware", min_tokens_per_sequence=2) == 10
    assert fl.max_selected(0) == 0
    assert fl.max_selected(100, warmup_steps=0, ratio_schedule=lambda s: 0.1) == 100


def test_plan_meets_the_memory_budget_at_the_target_shape():
    N, d, V = 16384, 2048, 128256
    budget = fl.DEFAULT_MEMORY_BUDGET
    plan = fl.plan_chunks(N, d, V, jnp.bfloat16, selected_rows=4096, statistics_kernel=True)
    # With the statistics kernel the forward keeps every row and splits the vocabulary (as cggr_torch).
    assert plan.row_chunk == N and plan.forward_vocab_chunk == 7168
    assert fl.plan_chunks(N, d, V, jnp.bfloat16, selected_rows=4096) == plan   # the default, as in cggr_torch
    assert plan.row_chunk * plan.forward_vocab_chunk * 2 <= budget
    assert N * 2 * (plan.forward_vocab_chunk + 128) > 0.875 * budget              # the widest that fits
    # Backward: the float32 ∂H_S accumulator and H_S, then per column the logits, two float32 temporaries
    # and the gradient in the inputs' dtype.
    assert plan.vocab_chunk % 128 == 0 and 4096 * d * (4 + 2) + 4096 * plan.vocab_chunk * (2 + 8 + 2) <= budget
    # float32 logits: all rows would leave 3584 columns, narrower than 4096 - so 4096 columns of fewer rows.
    f32 = fl.plan_chunks(N, d, V, jnp.bfloat16, selected_rows=4096, statistics_kernel=True,
                         logits_dtype=jnp.float32)
    assert f32.forward_vocab_chunk == 4096 and f32.row_chunk == 14336 and 14336 * 4096 * 4 <= budget
    # The XLA reference statistics take whole rows and need float32 temporaries; same backward.
    ref_plan = fl.plan_chunks(N, d, V, jnp.bfloat16, selected_rows=4096, statistics_kernel=False)
    assert ref_plan.forward_vocab_chunk == V and ref_plan.row_chunk == 101   # < 128 rows: not rounded
    assert ref_plan.row_chunk * V * (2 + 16) <= budget and ref_plan.vocab_chunk == plan.vocab_chunk
    # Very many rows: blocks no narrower than 4096 columns, the rows split instead.
    big = fl.plan_chunks(8 * N, d, V, jnp.bfloat16, selected_rows=4096, statistics_kernel=True)
    assert big.forward_vocab_chunk == 4096 and big.row_chunk % 128 == 0 and big.row_chunk < 8 * N
    assert big.row_chunk * 4096 * 2 <= budget
    # A caller's row block: the plan sizes the columns for it (whole rows when they fit).
    own = fl.plan_chunks(N, d, V, jnp.bfloat16, statistics_kernel=True, row_chunk=1000)
    assert own.row_chunk == 1000 and 1000 * own.forward_vocab_chunk * 2 <= budget and own.forward_vocab_chunk < V
    assert fl.plan_chunks(N, d, V, jnp.bfloat16, statistics_kernel=True, row_chunk=896).forward_vocab_chunk == V
    assert fl.plan_chunks(30, 3, 7, jnp.float32, statistics_kernel=True, row_chunk=1000).row_chunk == 30
    assert fl.plan_chunks(N, d, V, jnp.bfloat16, row_chunk=1000, statistics_kernel=False)[::2] == (1000, V)
    for kernel in (False, True):
        assert fl.plan_chunks(5, 3, 7, jnp.float32, memory_budget_bytes=1, statistics_kernel=kernel) == (1, 7, 7)
        assert fl.plan_chunks(0, 3, 7, jnp.float32, statistics_kernel=kernel) == (1, 7, 7)
    with pytest.raises(ValueError, match="row_chunk"):
        fl.plan_chunks(5, 3, 7, jnp.float32, row_chunk=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        fl.plan_chunks(5, 3, 7, jnp.float32, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="vocab_size"):
        fl.plan_chunks(5, 3, 0, jnp.float32)


# -------------------------------------------------------------------------------- forward-only scores
def test_fused_linear_scores_match_score_tokens():
    h, w, b, t = _inputs(9, (3, 11), 23, 301, jnp.bfloat16)
    h = h.at[1, 4].set(jnp.nan)
    vm = jnp.ones((3, 11), bool).at[0, :3].set(False)
    z = _materialised_logits(h, w, b)
    for labels, scoring in ((t, "combined"), (None, "margin")):
        got = fl.fused_linear_scores(h, w, labels, b, scoring=scoring, valid_mask=vm, row_chunk_size=7)
        want = sc.score_tokens(z, labels, scoring=scoring, valid_mask=vm)
        np.testing.assert_array_equal(np.asarray(got.eligible), np.asarray(want.eligible))
        np.testing.assert_array_equal(np.asarray(got.valid), np.asarray(want.valid))
        # the same float32 formulas; XLA may fuse the row sums differently inside the scan (last-bit changes)
        np.testing.assert_allclose(np.asarray(got.difficulty), np.asarray(want.difficulty), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        fl.fused_linear_scores(h, w, None, scoring="loss")
    with pytest.raises(ValueError, match="valid_mask"):
        fl.fused_linear_scores(h, w, t, valid_mask=vm[0])
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fl.fused_linear_scores(h, w, t, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="row_chunk_size"):
        fl.fused_linear_scores(h, w, t, row_chunk_size=-1)


def test_fused_statistics_through_the_pallas_kernel_with_wide_programs(monkeypatch):
    """The forward's blocks through the (interpreted) Pallas kernel, launched for few rows (wide programs):
    the same scores as the XLA reference path."""
    from cggr_jax.kernels import launch as ks

    calls = []
    original = ks.scoring_config_for_rows

    def spy(n_rows, vocab, itemsize, sms):
        launch = original(n_rows, vocab, itemsize, 64)          # 64 "SMs": blocks of 7 rows are few
        calls.append((n_rows, launch))
        return launch

    h, w, b, t = _inputs(13, (3, 11), 23, 2053, jnp.float32)     # rows of 2053: room for wider steps
    h = h.at[2, 5].set(jnp.inf)
    with dispatch.force("reference"):                             # the XLA reference, on any backend
        want = fl.fused_linear_scores(h, w, t, b, row_chunk_size=7)
    monkeypatch.setattr(ks, "scoring_config_for_rows", spy)
    jax.clear_caches()                    # a GPU run may hold this call's kernel trace from another test
    with dispatch.force("kernel"):
        got = fl.fused_linear_scores(h, w, t, b, row_chunk_size=7)
    assert calls and all(launch.num_warps and launch.num_warps > 1 for _, launch in calls)
    np.testing.assert_array_equal(np.asarray(got.eligible), np.asarray(want.eligible))
    assert not bool(got.eligible[2, 5])
    np.testing.assert_allclose(np.asarray(got.difficulty), np.asarray(want.difficulty), atol=1e-5, rtol=1e-5)


def _spy_chunk_launches(monkeypatch):
    """Record ``(rows, v0, C)`` of every chunked statistics launch the fused forward traces."""
    from cggr_jax.kernels import scoring as ks

    calls = []
    original = ks.chunk_statistics

    def spy(logits_chunk, targets1d=None, **kw):
        calls.append((logits_chunk.shape[0], kw["v0"], logits_chunk.shape[1]))
        return original(logits_chunk, targets1d, **kw)

    monkeypatch.setattr(ks, "chunk_statistics", spy)
    return calls


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("blocks,layout", [(dict(vocab_chunk_size=64), "vd"),
                                           (dict(row_chunk_size=20, vocab_chunk_size=101), "dv"),
                                           (dict(row_chunk_size=8), "vd")],
                         ids=["vocab-blocks", "row-and-vocab-blocks-dv", "row-blocks"])
def test_blockwise_statistics_kernel_path_equals_the_reference(monkeypatch, with_labels, blocks, layout):
    """The forward through the (interpreted) Pallas kernel: a row split into vocabulary blocks carries its
    state from one block's launch to the next - same scores as the XLA reference (whole rows). Blocks of 64
    columns (a ragged last one), of 101 columns over row blocks of 20 (a row tail of 9, a 1-column last
    block, the "dv" layout), and row blocks only (whole rows: no chunked launch)."""
    h, w, b, t = _inputs(5, (29,), 16, 203, jnp.float32)
    h = h.at[3].set(jnp.nan)
    b = b.at[150:].set(-jnp.inf)            # the last vocabulary block of every row is entirely -inf
    t = jnp.where(t >= 150, 7, t)
    labels = t if with_labels else None
    weight = w if layout == "vd" else w.T
    with dispatch.force("reference"):
        ref = fl.fused_linear_scores(h, weight, labels, b, weight_layout=layout, **blocks)
    calls = _spy_chunk_launches(monkeypatch)
    jax.clear_caches()                      # another test may hold this call's trace (the spy sees none)
    with dispatch.force("kernel"):
        got = fl.fused_linear_scores(h, weight, labels, b, weight_layout=layout, **blocks)
    cols = blocks.get("vocab_chunk_size")
    if cols is None:
        assert not calls                    # 8-row blocks of whole rows fit the budget: the whole-row kernel
    else:
        starts = list(range(0, 203, cols))
        rows = [blocks.get("row_chunk_size", 29)] + ([29 % blocks["row_chunk_size"]] if "row_chunk_size" in blocks
                                                      else [])
        assert calls == [(r, v0, min(cols, 203 - v0)) for r in rows for v0 in starts]
    for name in ("difficulty",) + tuple(got.stats._fields):
        a = got.difficulty if name == "difficulty" else getattr(got.stats, name)
        r = ref.difficulty if name == "difficulty" else getattr(ref.stats, name)
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-5, atol=2e-5, equal_nan=True,
                                   err_msg=name)
    np.testing.assert_array_equal(np.asarray(got.eligible), np.asarray(ref.eligible))
    assert not bool(got.eligible[3])


def test_vocab_chunked_forward_gives_the_reference_loss_and_gradients(monkeypatch):
    """``fused_linear_cggr`` with the kernel forward in vocabulary blocks (``vocab_chunk_size`` also sizes
    the backward's chunks) and a ``"dv"`` head: the selection, loss and gradients of the reference forward.

    bf16 where XLA's matmul is the same for every block shape (CPU). On a GPU the bf16 logits of a 100-column
    block and of the whole row come from different GEMM kernels whose float32 sums round differently before
    the cast (~3e-4 in the loss), so float32 is used there: this test is about the chunked statistics, not
    about GEMM rounding."""
    dtype = jnp.bfloat16 if jax.default_backend() == "cpu" else jnp.float32
    h, w, b, t = _inputs(8, (3, 13), 24, 301, dtype)
    cfg = dict(selection="sequence_aware", min_tokens_ratio=0.3, warmup_steps=0, min_tokens_per_sequence=1,
               weight_layout="dv", vocab_chunk_size=100)
    with dispatch.force("reference"):
        want, grads_want = _run(h, w.T, b, t, 0, **cfg)
    calls = _spy_chunk_launches(monkeypatch)
    jax.clear_caches()                      # another test may hold this call's trace (the spy sees none)
    with dispatch.force("kernel"):
        got, grads_got = _run(h, w.T, b, t, 0, **cfg)
    assert [v0 for _, v0, _ in calls] == [0, 100, 200, 300]      # 100-column blocks, a 1-column last one
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    assert int(got.metrics["tokens_selected"]) > 0
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.scores.difficulty), np.asarray(want.scores.difficulty),
                               rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("hidden", "weight", "bias"), grads_got, grads_want):
        # The same rows, lse and backward: the gradients differ at most by the lse's last bits.
        _close(a, _f64(e), 1e-2, name)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    h, w, b, t = _inputs(10, (37,), 24, 301, jnp.float32)
    cases = [
        (dict(hidden=h.astype(jnp.bfloat16)), "weight: expected dtype"),
        (dict(weight=w[:, :23]), r"weight: expected shape \(V, 24\)"),
        (dict(weight=w.T), r"weight: expected shape \(V, 24\)"),
        (dict(weight=w.T, weight_layout="dv"), None),
        (dict(weight_layout="vdx"), "weight_layout"),
        (dict(hidden=h[0]), "hidden: expected"),
        (dict(hidden=h.astype(jnp.int32)), "hidden: expected"),
        (dict(targets=t[:30]), r"targets: expected shape \(37,\)"),
        (dict(targets=t.astype(jnp.float32)), "targets: expected an integer dtype"),
        (dict(targets=jnp.full_like(t, 301)), r"targets: values must lie in \[0, 301\)"),
        (dict(bias=b[:300]), r"bias: expected None or an array of shape \(301,\)"),
        (dict(bias=b.astype(jnp.float16)), "bias: expected dtype"),
        (dict(row_chunk_size=0), "row_chunk_size"),
        (dict(vocab_chunk_size=2.5), "vocab_chunk_size"),
        (dict(vocab_chunk_size=0), "vocab_chunk_size"),
        (dict(capacity=38), "capacity"),
        (dict(selection="bogus"), "selection"),
        (dict(step=-1), "step"),
        (dict(logits_dtype=jnp.int32), "logits_dtype"),
        (dict(loss_fn=object()), "loss_fn"),
    ]
    for change, msg in cases:
        args = dict(hidden=h, weight=w, targets=t, step=0, bias=b)
        args.update(change)
        if msg is None:
            continue  # a valid call (checked elsewhere); listed to document the accepted layout
        with pytest.raises(ValueError, match=msg):
            fl.fused_linear_cggr(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("step"),
                                 **args)


# ------------------------------------------------------------------------------------------- DecoderLM
@pytest.mark.parametrize("tie", [False, True])
def test_decoder_lm_helper_matches_materialised_logits(tie):
    from flax import nnx

    from cggr_jax.models import DecoderConfig, DecoderLM

    cfg_m = DecoderConfig(vocab_size=301, d_model=24, num_layers=1, num_heads=2, max_seq_len=16,
                          tie_embeddings=tie)
    model = DecoderLM(cfg_m, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 301, (3, 9)), jnp.int32)
    labels = ids.at[0, 2].set(-100)
    amask = jnp.ones((3, 9), jnp.int32).at[2, 7:].set(0)
    cfg = dict(selection="sequence_aware", min_tokens_ratio=0.3, warmup_steps=0, min_tokens_per_sequence=2)

    def fused(m):
        loss, metrics = causal_lm.decoder_lm_cggr_loss(m, ids, labels, 0, attention_mask=amask, vocab_chunk_size=100,
                                                **cfg)
        return loss, metrics

    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(fused, has_aux=True))(model)
    # The materialised reference: the model's own logits, shifted; the selection is the oracle's given the
    # fused difficulties; a plain masked mean cross-entropy with autodiff gives the reference gradients.
    logits = nnx.jit(lambda m: m(ids, amask))(model)[:, :-1]
    tgt = np.asarray(labels[:, 1:]).copy()
    tgt[np.asarray(amask[:, 1:]) == 0] = -100
    scores = fl.fused_linear_scores(
        causal_lm.decoder_lm_hidden_states(model, ids, amask)[:, :-1],
        model.lm_head.kernel[...] if not tie else model.embed.embedding[...],
        jnp.asarray(tgt), weight_layout="dv" if not tie else "vd", logits_dtype=jnp.float32)
    ref = oracle.cggr_loss(_f64(logits), tgt, 0, difficulty_override=np.asarray(scores.difficulty), **cfg)
    assert int(metrics["tokens_selected"]) == int(ref["mask"].sum()) > 0
    np.testing.assert_allclose(float(loss), ref["loss"], atol=1e-5, rtol=1e-5)
    mask = jnp.asarray(ref["mask"])
    safe = jnp.asarray(np.where(tgt >= 0, tgt, 0))

    def materialised(m):
        z = m(ids, amask)[:, :-1].astype(jnp.float32)
        ce = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, safe[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    ref_grads = nnx.jit(nnx.grad(materialised))(model)
    got = jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param))
    want = jax.tree_util.tree_leaves(nnx.state(ref_grads, nnx.Param))
    assert len(got) == len(want) > 0
    for a, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-6, rtol=2e-4)
    with pytest.raises(ValueError, match="model"):
        causal_lm.decoder_lm_cggr_loss(object(), ids, labels, 0)
