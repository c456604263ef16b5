"""``selection='sampled'`` (SPEC §7.4, §8, §10) in ``cggr_jax`` against the float64 oracle.

π within ``oracle.PI_RTOL`` of the oracle, the draws ``u`` bit-exact, masks identical outside the band
``|u − π| ≤ PI_RTOL·π``; the loss and gradient against the oracle's Horvitz–Thompson loss (reference and
Pallas paths); unbiasedness over many draws with a tolerance derived from the estimator's variance.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax import dispatch
from cggr_jax.loss import CGGRLoss, cggr_loss, metrics_to_dict
from cggr_jax.pipeline import effective_sample_size
from cggr_jax.scoring import score_tokens
from cggr_jax.selection import sample_checked, sample_tokens, sampling_probabilities, select_tokens, uniform_hash
from tests import oracle

PI_RTOL = oracle.PI_RTOL
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
GRAD_TOL = {"float32": (1e-5, 1e-4), "float16": (1e-5, 2e-3), "bfloat16": (1e-5, 1.6e-2)}
PARAMS = [(1.0, 0.1), (0.0, 0.1), (2.0, 0.0), (1.0, 1.0), (0.5, 0.3)]


def _band_equal(mask, mask_ref, u, pi_ref):
    differ = np.asarray(mask) != mask_ref
    assert not (differ & ~(np.abs(u - pi_ref) <= PI_RTOL * pi_ref + 1e-12)).any()


def test_uniform_hash_is_the_oracle_bit_for_bit():
    idx = jnp.arange(3000, dtype=jnp.int32)
    for seed, step in [(0, 0), (1, 0), (0, 1), (12345, 987), (2**32 - 1, 2**33 + 5)]:
        u = np.asarray(uniform_hash(seed, step, idx))
        ref = np.array([oracle.uniform_hash(seed, step, i) for i in range(3000)])
        np.testing.assert_array_equal(u.astype(np.float64), ref)
        assert u.dtype == np.float32
    # traced step: the same bits
    f = jax.jit(lambda s: uniform_hash(7, s, idx))
    np.testing.assert_array_equal(np.asarray(f(jnp.int32(3))), np.asarray(uniform_hash(7, 3, idx)))


@pytest.mark.parametrize("shape", [(37,), (5, 7), (3, 1)])
@pytest.mark.parametrize("power, mix", PARAMS)
def test_probabilities_match_the_oracle(shape, power, mix):
    rng = np.random.default_rng(hash((shape, power, mix)) % 2**32)
    for _ in range(3):
        d = (rng.standard_normal(shape) * rng.uniform(0.1, 5)).astype(np.float32)
        d[rng.random(shape) < 0.1] = np.nan
        e = rng.random(shape) < rng.uniform(0.3, 1.0)
        n = int((e & ~np.isnan(d)).sum())
        k = int(rng.integers(0, n + 2))
        pi = np.asarray(sampling_probabilities(jnp.asarray(d), jnp.asarray(e), k, power=power, uniform_mix=mix))
        ref = oracle.sampling_probabilities(d, e, k, power, mix)
        assert pi.dtype == np.float32 and pi.shape == shape
        np.testing.assert_allclose(pi, ref, rtol=PI_RTOL, atol=1e-9)
        assert (pi[~(e & ~np.isnan(d))] == 0).all()
        assert abs(float(pi.astype(np.float64).sum()) - min(k, n)) <= 1e-5 * max(k, 1) + 1e-5


def test_probabilities_edge_cases():
    d = jnp.asarray([3.0, -1.0, 0.5, np.inf, -np.inf, 2.0, 7.0, 1e-30], jnp.float32)
    e = jnp.ones(8, bool)
    for kw in (dict(power=0.0), dict(uniform_mix=1.0)):
        np.testing.assert_allclose(np.asarray(sampling_probabilities(d, e, 3, **kw)), 3 / 8, rtol=1e-6)
    assert not np.asarray(sampling_probabilities(d, e, 0)).any()
    assert (np.asarray(sampling_probabilities(d, e, 8)) == 1).all()
    assert (np.asarray(sampling_probabilities(d, e, 50)) == 1).all()
    pi = np.asarray(sampling_probabilities(d, e, 2))
    assert np.isfinite(pi).all() and pi[3] == 1.0
    assert sampling_probabilities(jnp.zeros((0,)), jnp.zeros((0,), bool), 3).shape == (0,)
    assert not np.asarray(sampling_probabilities(d, jnp.zeros(8, bool), 3)).any()


@pytest.mark.parametrize("shape", [(41,), (6, 9)])
def test_sample_tokens_match_the_oracle(shape):
    rng = np.random.default_rng(3)
    for trial in range(8):
        d = (rng.standard_normal(shape) * 3).astype(np.float32)
        e = rng.random(shape) < 0.8
        ratio = np.float32(rng.uniform(0.05, 1.0))
        power, mix = PARAMS[trial % len(PARAMS)]
        seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 10**6))
        mask, w, k = sample_tokens(jnp.asarray(d), jnp.asarray(e), float(ratio), step=step, seed=seed,
                                   power=power, uniform_mix=mix)
        m_o, w_o, k_o, pi_o, u_o = oracle.sample_tokens(d, e, ratio, step, seed, power, mix)
        mask, w = np.asarray(mask), np.asarray(w)
        assert int(k) == k_o
        _band_equal(mask, m_o, u_o, pi_o)
        both = mask & m_o
        np.testing.assert_allclose(w[both], w_o[both], rtol=PI_RTOL)
        assert (w[~mask] == 0).all() and (w[mask] >= 1).all()
        m2, k2 = select_tokens(jnp.asarray(d), jnp.asarray(e), float(ratio), selection="sampled", step=step,
                               seed=seed, power=power, uniform_mix=mix)
        np.testing.assert_array_equal(np.asarray(m2), mask)


def test_effective_sample_size():
    assert float(effective_sample_size(jnp.zeros(5))) == 0.0
    assert float(effective_sample_size(jnp.asarray([1.0, 1.0, 0.0, 1.0]))) == 3.0
    w = np.array([2.0, 1.0, 4.0, 0.0])
    assert float(effective_sample_size(jnp.asarray(w, jnp.float32))) == pytest.approx(oracle.sample_ess(w), rel=1e-6)


def _loss_and_grad(fn, logits, targets, step):
    (loss, metrics), grad = jax.value_and_grad(lambda x: fn(x, targets, step), has_aux=True)(logits)
    return loss, metrics, grad


@pytest.mark.parametrize("mode", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 7, 11), (29, 5)])
def test_loss_matches_the_oracle(mode, dtype, shape):
    rng = np.random.default_rng(len(shape) * 7 + len(dtype))
    V = shape[-1]
    z = (rng.standard_normal(shape) * 2).astype(np.float32)
    t = rng.integers(0, V, shape[:-1])
    t[rng.random(shape[:-1]) < 0.15] = -100
    if len(shape) == 3:
        z[1, 2, 3] = np.nan
        z[2, 0, :] = np.inf
    logits = jnp.asarray(z).astype(DTYPES[dtype])
    cfg = dict(selection="sampled", warmup_steps=10, sample_seed=11, sample_power=1.5, sample_uniform_mix=0.2)
    with dispatch.force(mode):
        loss, met, grad = _loss_and_grad(CGGRLoss(**cfg), logits, jnp.asarray(t), 4)
    d = np.asarray(score_tokens(logits, jnp.asarray(t)).difficulty)
    z64 = np.asarray(logits.astype(jnp.float32)).astype(np.float64)
    ref = oracle.cggr_loss(z64, t, 4, difficulty_override=d, **cfg)
    assert int(met["tokens_selected"]) == int(ref["mask"].sum())
    assert int(met["tokens_total"]) == ref["metrics"]["tokens_total"]
    assert int(met["tokens_nonfinite"]) == ref["metrics"]["tokens_nonfinite"]
    assert float(met["sample_ess"]) == pytest.approx(ref["metrics"]["sample_ess"], rel=1e-4)
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)
    atol, rtol = GRAD_TOL[dtype]
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), ref["grad"], atol=atol, rtol=rtol)
    assert grad.dtype == DTYPES[dtype]


@pytest.mark.parametrize("mode", ["reference", "kernel"])
def test_all_ignored_and_empty(mode):
    fn = CGGRLoss(selection="sampled")
    with dispatch.force(mode):
        for z, t in [(np.random.default_rng(0).standard_normal((4, 6, 5)), np.full((4, 6), -100)),
                     (np.zeros((0, 5)), np.zeros((0,), np.int32)),
                     (np.full((3, 5), np.nan), np.zeros((3,), np.int32))]:
            loss, met, grad = _loss_and_grad(fn, jnp.asarray(z, jnp.float32), jnp.asarray(t), 0)
            assert float(loss) == 0.0 and not np.asarray(grad).any() and int(met["tokens_selected"]) == 0
            assert float(met["sample_ess"]) == 0.0


def test_metrics_dict_and_traced_step_compiles_once():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((4, 9, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (4, 9)))
    fn = CGGRLoss(selection="sampled", warmup_steps=0, min_tokens_ratio=0.3, sample_seed=3)
    step_fn = jax.jit(lambda x, t, s: fn(x, t, s))
    masks = []
    for s in range(3):
        loss, met = step_fn(logits, targets, jnp.int32(s))
        masks.append(int(met["tokens_selected"]))
        m = metrics_to_dict(met, fn)
        assert m["selection"] == "sampled" and isinstance(m["sample_ess"], float)
        assert 0 < m["sample_ess"] <= m["tokens_selected"]
    assert step_fn._cache_size() == 1
    _, met = cggr_loss(logits, targets, 0, selection="topk")
    assert float(met["sample_ess"]) == float(met["tokens_selected"])


def test_unbiased_loss_and_gradient():
    """E[loss] = full-batch mean CE, E[grad] = full-batch gradient (SPEC §7.4, §8).

    S draws (steps 0..S−1, no curriculum, so k is fixed); Var of one HT loss = Σ ce_i²(1 − π_i)/π_i / n²
    (independent inclusions), so |mean − full| ≤ 5·sqrt(Var/S) + 1e-5; each gradient element within 6 sigma
    (Var_ij = g_ij²·(1 − π_i)/π_i with g the full-batch gradient).
    """
    rng = np.random.default_rng(21)
    N, V = 40, 5
    z = (rng.standard_normal((N, V)) * 2).astype(np.float32)
    t = rng.integers(0, V, (N,))
    t[rng.random(N) < 0.1] = -100
    valid = t != -100
    n = int(valid.sum())
    logits, targets = jnp.asarray(z), jnp.asarray(t)

    def full(x):
        logp = jax.nn.log_softmax(x, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(jnp.asarray(valid), nll, 0.0)) / n, nll

    (full_mean, ce), full_grad = jax.value_and_grad(full, has_aux=True)(logits)
    fn = CGGRLoss(selection="sampled", warmup_steps=0, min_tokens_ratio=0.25, dynamic_threshold=False)
    S = 600
    batched = jax.jit(jax.vmap(lambda s: jax.value_and_grad(lambda x: fn(x, targets, s)[0])(logits)))
    losses, grads = batched(jnp.arange(S, dtype=jnp.int32))
    d = score_tokens(logits, targets).difficulty
    k = oracle.num_selected(n, np.float32(0.25))
    pi = np.asarray(sampling_probabilities(d, jnp.asarray(valid), k)).astype(np.float64)
    ce = np.asarray(ce, np.float64)
    var = float((ce[valid] ** 2 * (1 - pi[valid]) / pi[valid]).sum()) / n**2
    assert abs(float(np.mean(np.asarray(losses, np.float64))) - float(full_mean)) <= 5 * math.sqrt(var / S) + 1e-5
    g = np.asarray(full_grad, np.float64)
    g_var = g**2 * np.where(valid, (1 - pi) / np.where(valid, pi, 1), 0)[:, None]
    err = np.abs(np.asarray(grads, np.float64).mean(0) - g)
    assert (err <= 6 * np.sqrt(g_var / S) + 1e-6).all()


@pytest.mark.parametrize("field, value", [("sample_power", -0.5), ("sample_power", float("inf")),
                                          ("sample_uniform_mix", 1.5), ("sample_floor", 0.0),
                                          ("sample_floor", float("nan")), ("sample_seed", -1),
                                          ("sample_seed", 2**32), ("sample_seed", 1.5)])
def test_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        CGGRLoss(selection="sampled", **{field: value})


def test_bad_function_arguments():
    d, e = jnp.asarray(np.random.default_rng(0).standard_normal(6), jnp.float32), jnp.ones(6, bool)
    with pytest.raises(ValueError, match="power"):
        sampling_probabilities(d, e, 2, power=-1.0)
    with pytest.raises(ValueError, match="uniform_mix"):
        sample_tokens(d, e, 0.5, uniform_mix=2.0)
    with pytest.raises(ValueError, match="floor"):
        sample_tokens(d, e, 0.5, floor=0.0)
    with pytest.raises(ValueError, match="seed"):
        sample_tokens(d, e, 0.5, seed=-3)
    with pytest.raises(ValueError, match="k"):
        sampling_probabilities(d, e, -1)
    with pytest.raises(ValueError, match="ratio"):
        sample_tokens(d, e, 0.0)
    with pytest.raises(ValueError, match="step"):
        sample_tokens(d, e, 0.5, step=-1)
    with pytest.raises(ValueError, match="index"):
        uniform_hash(0, 0, jnp.zeros(3))
    with pytest.raises(ValueError, match="difficulty"):
        sample_tokens(jnp.arange(6), e, 0.5)


def test_entry_points_without_weights_refuse_sampled():
    from cggr_jax.distributed import cggr_loss as distributed_loss
    from cggr_jax.fused_linear import fused_linear_cggr
    h, w = jnp.zeros((4, 3)), jnp.zeros((5, 3))
    with pytest.raises(ValueError, match="not supported yet by fused_linear_cggr"):
        fused_linear_cggr(h, w, jnp.zeros((4,), jnp.int32), 0, selection="sampled")
    with pytest.raises(ValueError, match="not supported yet by cggr_jax.distributed"):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        distributed_loss(jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32), 0, mesh=mesh, selection="sampled")
    # the traced sampler on checked inputs is what the pipeline runs
    m, wt, k = sample_checked(jnp.ones(5), jnp.ones(5, bool), jnp.float32(0.4), jnp.int32(0), seed=0, power=1.0,
                              uniform_mix=0.1, floor=1e-6)
    assert int(k) == 2 and m.shape == (5,)


def test_scored_selective_cross_entropy_sampled_is_the_loss():
    """The all-kernel pipeline (the benchmark's) with ``selection='sampled'`` equals CGGRLoss's sampled loss."""
    from cggr_jax.pipeline import scored_selective_cross_entropy
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((30, 9)), jnp.float32)
    t = np.asarray(rng.integers(0, 9, 30))
    t[:4] = -100
    t = jnp.asarray(t)

    def pipe(a):
        loss, mask, k = scored_selective_cross_entropy(a, t, 0.4, selection="sampled", step=3)
        return loss, (mask, k)

    (loss, (mask, k)), g = jax.value_and_grad(pipe, has_aux=True)(z)
    fn = CGGRLoss(selection="sampled", ratio_schedule=lambda s: 0.4, dynamic_threshold=False)
    with dispatch.force("reference"):
        (loss2, met), g2 = jax.value_and_grad(lambda a: fn(a, t, 3), has_aux=True)(z)
    assert int(mask.sum()) == int(met["tokens_selected"]) and int(k) == oracle.num_selected(26, np.float32(0.4))
    assert float(loss) == pytest.approx(float(loss2), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g2), atol=1e-6, rtol=1e-5)
