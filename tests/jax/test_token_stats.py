"""``cggr_jax.token_stats`` (SPEC §14.1-§14.4) against the float64 oracle, under ``jit`` and ``grad``.

The oracle receives the logits the blocks compute (``hidden · Wᵀ + b`` with float32 accumulation, rounded to
the input dtype); gradients are chained through ``oracle.token_stats_grad``. Odd shapes and chunk sizes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax import fused_linear_token_stats
from cggr_jax.token_stats import fused_linear_statistics, plan_token_stats, token_stats_on_rows
from tests import oracle

DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
STAT_TOL = {"float32": (1e-4, 1e-5), "float16": (2e-3, 1e-3), "bfloat16": (2e-2, 1e-2)}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _inputs(seed, shape=(37,), d=23, V=301, dtype="float32", p_ignore=0.2):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal(shape + (d,)) * rng.uniform(0.3, 3.0, shape + (1,))).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < p_ignore] = -100
    dt = DT[dtype]
    return jnp.asarray(h, dt), jnp.asarray(w, dt), jnp.asarray(b, dt), jnp.asarray(t, jnp.int32)


def _logits(h, w, b, round_to_input=True):
    z = jax.lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST)
    z = z + b.astype(jnp.float32)
    if round_to_input:
        z = z.astype(h.dtype)
    return np.asarray(z.astype(jnp.float32), np.float64)


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _close(a, e, tol, name, where=None):
    a, e = _f64(a), np.asarray(e, np.float64)
    if where is not None:
        a, e = a[where], e[where]
    np.testing.assert_allclose(a, e, atol=tol[0], rtol=tol[1], err_msg=name)


def _grad_close(a, e, rel, name):
    e = np.asarray(e, np.float64)
    scale = max(1e-30, float(np.abs(e).max()))
    assert float(np.abs(_f64(a) - e).max()) <= rel * scale, name


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, None), (0.6, 2.0)])
def test_statistics_match_the_oracle(dtype, temperature, softcap):
    h, w, b, t = _inputs(1, dtype=dtype)
    out = fused_linear_token_stats(h, w, t, b, temperature=temperature, softcap=softcap, **CHUNKS)
    ref = oracle.token_stats(_logits(h, w, b), np.asarray(t), temperature, softcap)
    tol = STAT_TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out.finite), ref["finite"])
    assert out.logprob.dtype == jnp.float32 and bool((out.logprob[np.asarray(t) == -100] == 0).all())
    # The blocks' float32 sums differ in order from the test's one matmul (on a GPU they do), so a logit near a
    # rounding boundary of a half dtype can round one ulp the other way. The slack is twice the effect of the
    # rounding itself on each statistic (the oracle on the rounded vs the unrounded float32 logits): zero in
    # float32, and bounding a one-ulp flip of any single logit in half precision.
    unrounded = oracle.token_stats(_logits(h, w, b, round_to_input=False), np.asarray(t), temperature, softcap)

    def close(a, key, tol_, name):
        e = ref["stats"][key] if key == "runner_up" else ref[key]
        u = unrounded["stats"][key] if key == "runner_up" else unrounded[key]
        slack = np.nan_to_num(2.0 * np.abs(np.asarray(e, np.float64) - np.asarray(u, np.float64)))
        a64, e64 = _f64(a), np.asarray(e, np.float64)
        ok = np.isclose(a64, e64, atol=tol_[0], rtol=tol_[1], equal_nan=True) | (np.abs(a64 - e64) <= slack)
        assert ok.all(), f"{name}: {int((~ok).sum())} mismatches, worst {np.nanmax(np.abs(a64 - e64)[~ok])}"

    close(out.logprob, "logprob", tol, "logprob")
    close(out.entropy, "entropy", tol, "entropy")
    close(out.lse, "lse", tol, "lse")
    close(out.statistics.runner_up, "runner_up", (max(1e-5, tol[0] / 10), tol[1]), "p2")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("need", [("logprob",), ("logprob", "entropy")])
def test_gradients_match_the_oracle_under_jit(dtype, need):
    h, w, b, t = _inputs(3, shape=(3, 11), dtype=dtype)
    rng = np.random.default_rng(4)
    g_lp, g_h = rng.standard_normal((3, 11)).astype(np.float32), rng.standard_normal((3, 11)).astype(np.float32)
    T, cap = 0.8, 3.0

    @jax.jit
    def f(h, w, b):
        o = fused_linear_token_stats(h, w, t, b, need=need, temperature=T, softcap=cap, **CHUNKS)
        return sum(jnp.sum(getattr(o, n) * {"logprob": g_lp, "entropy": g_h}[n]) for n in need)

    gh, gw, gb = jax.grad(f, argnums=(0, 1, 2))(h, w, b)
    G = oracle.token_stats_grad(_logits(h, w, b), np.asarray(t), g_lp, g_h if "entropy" in need else 0 * g_h, T, cap)
    rel = GRAD_TOL[dtype]
    _grad_close(gh, G @ _f64(w), rel, "hidden")
    _grad_close(gw, np.einsum("btv,btd->vd", G, _f64(h)), rel, "weight")
    _grad_close(gb, G.sum(axis=(0, 1)), rel, "bias")
    assert gh.dtype == h.dtype and gw.dtype == w.dtype


def test_non_finite_rows_and_ignored():
    h, w, b, t = _inputs(5)
    h = h.at[4].set(jnp.nan)
    b = b.at[5].set(-jnp.inf)
    t = t.at[6].set(5).at[7].set(11)
    out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    ref = oracle.token_stats(_logits(h, w, b), np.asarray(t))
    np.testing.assert_array_equal(np.asarray(out.finite), ref["finite"])
    assert math.isnan(float(out.logprob[6])) and math.isnan(float(out.entropy[4]))

    def f(h, w, b):
        o = fused_linear_token_stats(h, w, t, b, **CHUNKS)
        return jnp.sum(jnp.where(o.finite, o.logprob + o.entropy, 0.0))

    gh, gw, gb = jax.grad(f, argnums=(0, 1, 2))(h, w, b)
    assert bool(jnp.isfinite(gh).all() & jnp.isfinite(gw).all() & jnp.isfinite(gb).all())
    assert bool((gh[4] == 0).all() & (gh[6] == 0).all()) and float(gb[5]) == 0.0
    capped = fused_linear_token_stats(h, w, t, b.at[9].set(jnp.inf), softcap=5.0, **CHUNKS)
    ref = oracle.token_stats(_logits(h, w, b.at[9].set(jnp.inf)), np.asarray(t), softcap=5.0)
    np.testing.assert_array_equal(np.asarray(capped.finite), ref["finite"])
    # all ignored: log-probs 0 and no gradient through them
    t_all = jnp.full_like(t, -100)
    g = jax.grad(lambda h: jnp.sum(fused_linear_token_stats(h, w, t_all, b, need=("logprob",)).logprob))(h)
    assert bool((g == 0).all())


def test_traced_out_of_range_target_is_not_finite():
    h, w, b, t = _inputs(6)
    t = t.at[3].set(1000)
    out = jax.jit(lambda t: fused_linear_token_stats(h, w, t, b).finite)(t)
    assert not bool(out[3]) and int(out.sum()) >= 30
    with pytest.raises(ValueError, match="targets"):
        fused_linear_token_stats(h, w, t, b)


def test_rows_and_plan():
    h, w, b, t = _inputs(7, shape=(3, 11))
    stats = fused_linear_statistics(h, w, t, b, **CHUNKS)
    rows = jnp.asarray([5, 0, 17, 32, 3, 3], jnp.int32)
    live = jnp.asarray([True, True, True, True, False, False])
    sub = token_stats_on_rows(h, w, t, b, stats, rows, live, **CHUNKS)
    full = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    np.testing.assert_array_equal(np.asarray(sub.logprob[:4]), np.asarray(full.logprob.reshape(-1)[rows[:4]]))
    assert bool((sub.logprob[4:] == 0).all()) and not bool(sub.finite[4:].any())
    assert plan_token_stats(16384, 4096, 151936, jnp.bfloat16) == (16384, 640, 3584, 1024)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"), (dict(softcap=-1.0), "softcap"), (dict(need="entropy"), "need"),
    (dict(row_chunk_size=0), "row_chunk_size"), (dict(memory_budget_bytes=0), "memory_budget_bytes"),
])
def test_bad_arguments(kwargs, match):
    h, w, b, t = _inputs(8)
    with pytest.raises(ValueError, match=match):
        fused_linear_token_stats(h, w, t, b, **kwargs)
    for args, m in (((h[0], w, t, b), "hidden"), ((h, w[:, :4], t, b), "weight"), ((h, w, t, b[:3]), "bias"),
                    ((h, w, t[:3], b), "targets"), ((h, w.astype(jnp.bfloat16), t, b), "weight")):
        with pytest.raises(ValueError, match=m):
            fused_linear_token_stats(*args)


def test_compiled_working_memory_stays_within_the_budget():
    """XLA's temporary buffers of forward + backward (``memory_analysis().temp_size_in_bytes``: the working memory
    beyond inputs and outputs) at N = 300, V = 2000 with a 256 KiB budget; the full logits would be 2.4 MB."""
    N, d, V = 300, 16, 2000
    h = jax.random.normal(jax.random.PRNGKey(0), (N, d))
    w = jax.random.normal(jax.random.PRNGKey(1), (V, d)) * 0.25
    b = jnp.zeros((V,))
    t = jax.random.randint(jax.random.PRNGKey(2), (N,), 0, V)
    temps = {}
    for budget in (256 * 1024, 2**30):
        def f(h, w, b, budget=budget):
            o = fused_linear_token_stats(h, w, t, b, softcap=3.0, memory_budget_bytes=budget)
            return jnp.sum(o.logprob) + jnp.sum(o.entropy)
        mem = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(h, w, b).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        temps[budget] = mem.temp_size_in_bytes
    assert temps[256 * 1024] <= 256 * 1024, temps
    assert temps[2**30] > 4 * 256 * 1024, temps          # the check can fail: whole-vocabulary blocks do not fit
