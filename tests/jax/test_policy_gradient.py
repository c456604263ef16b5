"""``cggr_jax.policy_gradient`` (SPEC §14.3) against the float64 oracle, and inside a jitted optax step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cggr_jax import policy_gradient_loss
from cggr_jax.policy_gradient import PG_CONFIG, policy_gradient_capacity
from cggr_jax.token_stats import fused_linear_statistics
from cggr_jax.scoring import difficulty_from_statistics
from tests import oracle

B, T, D, V = 3, 13, 23, 301
CHUNKS = dict(row_chunk_size=7, vocab_chunk_size=64)


def _inputs(seed, per_token_adv=False):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((B, T, D)) * rng.uniform(0.3, 3.0, (B, T, 1))).astype(np.float32)
    w = (rng.standard_normal((V, D)) * (1.5 / np.sqrt(D))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, (B, T))
    t[:, :3] = -100
    t[1, 9:] = -100
    adv = rng.standard_normal((B, T) if per_token_adv else (B,)).astype(np.float32)
    lp0 = -rng.uniform(2.0, 8.0, (B, T)).astype(np.float32)
    return dict(h=jnp.asarray(h), w=jnp.asarray(w), b=jnp.asarray(b), t=jnp.asarray(t, jnp.int32),
                adv=jnp.asarray(adv), lp0=jnp.asarray(lp0))


def _oracle(x, difficulty, *, old=None, ref=None, beta=0.0, loss_type="dapo", temperature=1.0, softcap=None,
            selection="topk", ratio=0.2, **sel):
    h, w, b = (np.asarray(x[k], np.float64) for k in ("h", "w", "b"))
    z = h @ w.T + b
    t = np.asarray(x["t"])
    st = oracle.token_stats(z, t, temperature, softcap)
    elig = st["finite"] & (t != -100)
    mask, _ = oracle.select_tokens(np.asarray(difficulty), elig, ratio, selection, **sel)
    adv = np.asarray(x["adv"], np.float64)
    adv = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    old_v = st["logprob"] if old is None else np.asarray(old, np.float64)
    terms = oracle.policy_gradient_terms(np.where(elig, st["logprob"], 0.0), np.where(elig, old_v, 0.0),
                                         np.where(elig, adv, 0.0),
                                         None if ref is None else np.where(elig, np.asarray(ref, np.float64), 0.0),
                                         beta, 0.2, 0.2)
    agg = oracle.policy_gradient_loss(terms["loss"], terms["grad"], mask, elig, None, loss_type)
    G = oracle.token_stats_grad(z, t, agg["grad"], np.zeros((B, T)), temperature, softcap)
    return dict(loss=agg["loss"], mask=mask, gh=G @ w, gw=np.einsum("btv,btd->vd", G, h), gb=G.sum(axis=(0, 1)))


def _run(x, **kw):
    old, ref = kw.pop("old", None), kw.pop("ref", None)

    def f(h, w, b):
        out = policy_gradient_loss(h, w, x["t"], x["adv"], old, ref, b, **CHUNKS, **kw)
        return out.loss, out

    (loss, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(x["h"], x["w"], x["b"])
    return out, grads


def _check(out, grads, ref, rel=2e-5):
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    assert abs(float(out.loss) - ref["loss"]) <= 1e-6 + 1e-5 * abs(ref["loss"])
    for g, key in zip(grads, ("gh", "gw", "gb")):
        e = ref[key]
        assert float(np.abs(np.asarray(g, np.float64) - e).max()) <= rel * max(1e-12, float(np.abs(e).max())), key


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_default_against_the_oracle(loss_type):
    x = _inputs(1)
    out, grads = _run(x, loss_type=loss_type)
    _check(out, grads, _oracle(x, out.entropy, loss_type=loss_type))
    old = out.logprob + 0.6 * jax.random.normal(jax.random.PRNGKey(3), (B, T))
    out, grads = _run(x, loss_type=loss_type, old=old)
    _check(out, grads, _oracle(x, out.entropy, old=old, loss_type=loss_type))


def test_kl_softcap_temperature_stratified_combined():
    x = _inputs(2, per_token_adv=True)
    kw = dict(temperature=0.7, softcap=3.0, selection="stratified", scoring="combined", min_tokens_ratio=0.4)
    out, grads = _run(x, ref=x["lp0"], beta=0.05, loss_type="grpo", **kw)
    stats = fused_linear_statistics(x["h"], x["w"], x["t"], x["b"], temperature=0.7, softcap=3.0, **CHUNKS)
    d = np.asarray(difficulty_from_statistics(stats, "combined"))
    ref = _oracle(x, d, ref=x["lp0"], beta=0.05, loss_type="grpo", temperature=0.7, softcap=3.0,
                  selection="stratified", ratio=0.4)
    _check(out, grads, ref)


def test_traced_step_nonfinite_and_all_ignored():
    x = _inputs(3)
    f = jax.jit(lambda step: policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], step=step, warmup_steps=4,
                                                  min_tokens_ratio=0.25).metrics["token_ratio"])
    assert float(f(2)) == pytest.approx(0.625) and float(f(9)) == pytest.approx(0.25)
    adv = x["adv"].at[2].set(jnp.nan)
    out = policy_gradient_loss(x["h"], x["w"], x["t"], adv)
    assert bool(jnp.isfinite(out.loss)) and not bool(out.mask[2].any())
    assert int(out.metrics["tokens_nonfinite"]) == int((np.asarray(x["t"][2]) != -100).sum())
    t = jnp.full((B, T), -100, jnp.int32)
    g = jax.grad(lambda h: policy_gradient_loss(h, x["w"], t, x["adv"]).loss)(x["h"])
    assert bool((g == 0).all())
    assert policy_gradient_capacity(B * T, B, PG_CONFIG) == oracle.num_selected(B * T, 0.2)


def test_inside_a_jitted_optax_step():
    x = _inputs(4)
    params = {"w": x["w"], "b": x["b"]}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        def loss_fn(p):
            out = policy_gradient_loss(x["h"], p["w"], x["t"], x["adv"], None, None, p["b"], step=i)
            return out.loss, out.metrics
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    for i in range(3):
        params, opt_state, loss, metrics = step(params, opt_state, i)
        assert math.isfinite(float(loss)) and int(metrics["step"]) == i
    assert not np.array_equal(np.asarray(params["w"]), np.asarray(x["w"]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="x"), "loss_type"), (dict(beta=0.1), "ref_logprob"), (dict(scoring="excess"), "scoring"),
    (dict(epsilon_low=-1.0), "epsilon_low"), (dict(config=PG_CONFIG, num_strata=3), "config"),
])
def test_bad_arguments(kwargs, match):
    x = _inputs(5)
    with pytest.raises(ValueError, match=match):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], **kwargs)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"][:2])
    with pytest.raises(ValueError, match="old_logprob"):
        policy_gradient_loss(x["h"], x["w"], x["t"], x["adv"], x["lp0"][:, :3])
