"""``cggr_jax.token_stats``'s kernel forward (the fused head's Pallas statistics, SPEC §14.1 with temperature 1
and no soft-cap) against the float64 oracle and the ``lax`` block path of the same call.

The kernels run interpreted on the CPU (``dispatch.force("kernel")``). Odd shapes (N = 37, d = 23, V = 301)
with chunks that divide neither N nor V; NaN hidden rows, ``-inf``/``+inf`` logits, ignored, out-of-range and
all-ignored targets; the policy-gradient loss through the same forward; which path runs is asserted.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax import dispatch, fused_linear_token_stats
from cggr_jax import token_stats as ts
from cggr_jax.policy_gradient import policy_gradient_loss
from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STAT_TOL = {"float32": (1e-4, 1e-5), "bfloat16": (2e-2, 1e-2)}
GRAD_TOL = {"float32": 2e-5, "bfloat16": 3e-2}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _inputs(seed, dtype="float32", N=37, d=23, V=301, p_ignore=0.2):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((N, d)) * rng.uniform(0.3, 3.0, (N, 1))).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=N)
    t[rng.random(N) < p_ignore] = -100
    dt = DT[dtype]
    return jnp.asarray(h, dt), jnp.asarray(w, dt), jnp.asarray(b, dt), jnp.asarray(t, jnp.int32)


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = ts.fused_linear.fused_linear_scores

    def counting(*args, **kwargs):
        calls.append(kwargs.get("vocab_chunk_size"))
        return real(*args, **kwargs)
    monkeypatch.setattr(ts.fused_linear, "fused_linear_scores", counting)
    return calls


@pytest.mark.parametrize("dtype", list(DT))
def test_kernel_forward_matches_the_oracle_and_the_blocks(dtype, monkeypatch):
    h, w, b, t = _inputs(1, dtype)
    with dispatch.force("reference"):
        ref_out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    calls = _count_kernel_calls(monkeypatch)
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    assert calls == [64]                                       # the caller's chunk reaches the kernel path
    z = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) \
        + b.astype(jnp.float32)
    orc = oracle.token_stats(_f64(z.astype(h.dtype)), np.asarray(t))
    tol = STAT_TOL[dtype]
    assert bool(out.finite.all())
    for name in ("logprob", "entropy", "lse"):
        np.testing.assert_allclose(_f64(getattr(out, name)), orc[name], atol=tol[0], rtol=tol[1], err_msg=name)
        np.testing.assert_allclose(_f64(getattr(out, name)), _f64(getattr(ref_out, name)), atol=tol[0],
                                   rtol=tol[1], err_msg=f"{name} vs blocks")
    for field in ("confidence", "runner_up", "nll"):
        np.testing.assert_allclose(_f64(getattr(out.statistics, field)), _f64(getattr(ref_out.statistics, field)),
                                   atol=tol[0], rtol=tol[1], err_msg=field)
    assert bool((out.logprob[t == -100] == 0).all())


@pytest.mark.parametrize("dtype", list(DT))
def test_kernel_forward_gradients_match_the_blocks(dtype, monkeypatch):
    h, w, b, t = _inputs(2, dtype)
    g_lp = jnp.asarray(np.random.default_rng(0).standard_normal(37), jnp.float32)
    g_h = jnp.asarray(np.random.default_rng(1).standard_normal(37), jnp.float32)

    def objective(h, w, b):
        out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
        return jnp.sum(out.logprob * g_lp) + jnp.sum(out.entropy * g_h)

    with dispatch.force("reference"):
        expected = jax.grad(objective, argnums=(0, 1, 2))(h, w, b)
    calls = _count_kernel_calls(monkeypatch)
    with dispatch.force("kernel"):
        actual = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(h, w, b)
    assert len(calls) == 1
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        e64 = _f64(e)
        scale = max(1e-30, float(np.abs(e64).max()))
        err = float(np.abs(_f64(a) - e64).max())
        assert err <= GRAD_TOL[dtype] * scale, f"{name}: {err:.3g} > {GRAD_TOL[dtype]} x {scale:.3g}"


def test_kernel_forward_non_finite_rows_and_targets(monkeypatch):
    h, w, b, t = _inputs(3)
    h = h.at[4].set(math.nan)
    b = b.at[5].set(-math.inf)
    t = t.at[6].set(5).at[7].set(11)                 # row 6's target logit is -inf: not finite
    t_bad = t.at[9].set(301)                          # out of range (traced): not finite
    with dispatch.force("reference"):
        ref_out = jax.jit(lambda h, w, t, b: fused_linear_token_stats(h, w, t, b, **CHUNKS))(h, w, t_bad, b)
    calls = _count_kernel_calls(monkeypatch)
    with dispatch.force("kernel"):
        out = jax.jit(lambda h, w, t, b: fused_linear_token_stats(h, w, t, b, **CHUNKS))(h, w, t_bad, b)
        ignored = fused_linear_token_stats(h, w, jnp.full_like(t, -100), jnp.zeros_like(b), **CHUNKS)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.asarray(out.finite), np.asarray(ref_out.finite))
    assert not bool(out.finite[4]) and not bool(out.finite[6]) and not bool(out.finite[9]) and bool(out.finite[7])
    for name in ("logprob", "entropy", "lse"):
        a, e = _f64(getattr(out, name)), _f64(getattr(ref_out, name))
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=name)
        fin = np.asarray(out.finite)
        np.testing.assert_allclose(a[fin], e[fin], atol=1e-4, rtol=1e-5, err_msg=name)
    assert bool((ignored.logprob == 0).all()) and bool(ignored.finite[np.arange(37) != 4].all())


def test_a_transform_keeps_the_blocks(monkeypatch):
    h, w, b, t = _inputs(4)
    calls = _count_kernel_calls(monkeypatch)
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(h, w, t, b, temperature=0.7, **CHUNKS)
        capped = fused_linear_token_stats(h, w, t, b, softcap=3.0, **CHUNKS)
    assert calls == []
    assert bool(out.finite.all()) and bool(capped.finite.all())


def test_policy_gradient_loss_on_the_kernel_forward(monkeypatch):
    h, w, _, t = _inputs(6, p_ignore=0.0)
    rng = np.random.default_rng(0)
    adv = jnp.asarray(rng.standard_normal(37), jnp.float32)
    old = jnp.asarray(-rng.uniform(0.5, 6.0, 37), jnp.float32)

    def loss(h, w):
        return policy_gradient_loss(h, w, t, adv, old).loss

    with dispatch.force("reference"):
        ref_l, ref_g = jax.value_and_grad(loss, argnums=(0, 1))(h, w)
    calls = _count_kernel_calls(monkeypatch)
    with dispatch.force("kernel"):
        got_l, got_g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
    assert len(calls) == 1
    np.testing.assert_allclose(float(got_l), float(ref_l), atol=1e-5, rtol=1e-5)
    for a, e in zip(got_g, ref_g):
        e64 = _f64(e)
        assert float(np.abs(_f64(a) - e64).max()) <= 2e-5 * float(np.abs(e64).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_block_logits_rounding_survives_jit(dtype):
    """The backward's recomputed logits must be rounded as the forward's were in memory: on the GPU, XLA's
    default excess precision drops a float32 → bf16 → float32 round trip inside a fusion, and the bf16 hidden
    gradient of the kernel path was then 6 % off the reference. The rounding is a ``reduce_precision``, which
    XLA keeps; float32 logits need none."""
    from cggr_jax.fused_linear_backward import block_logits
    h, w, b, _ = _inputs(4, "float32")
    dt = jnp.dtype(dtype)
    h, w = h.astype(dt), w.astype(dt)
    text = str(jax.make_jaxpr(lambda h, w, b: block_logits(h, w, b, "vd", dt).astype(jnp.float32) * 2)(h, w, b))
    assert ("reduce_precision" in text) == (dt.itemsize < 4)
    z = np.asarray(jax.jit(lambda h, w, b: block_logits(h, w, b, "vd", dt).astype(jnp.float32) * 2)(h, w, b))
    exact = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) + b
    np.testing.assert_array_equal(z, np.asarray(exact.astype(dt).astype(jnp.float32)) * 2)
