"""SPEC §11 parity of ``selection='sampled'`` (SPEC §7.4) between cggr_torch and cggr_jax.

* the draws ``u`` are bit-identical (exact uint32 arithmetic);
* from the same difficulties, eligibility and float32 ratio: identical ``k``; π within ``oracle.PI_RTOL``;
  masks identical except tokens with ``|u − π| ≤ PI_RTOL·π``; weights of tokens included by both within
  ``PI_RTOL``;
* from the same logits: the loss and ∂loss/∂logits within level 4 (1e-5 + 1e-4·|x|), ``sample_ess`` within
  1e-4 relative, when the masks agree (they do for these seeds; a band token would be reported).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import cggr_jax  # noqa: E402
import cggr_torch  # noqa: E402
from cggr_jax import selection as jsel  # noqa: E402
from cggr_torch import selection as tsel  # noqa: E402
from tests import oracle  # noqa: E402

PI_RTOL = oracle.PI_RTOL


def test_draws_are_bit_identical():
    for seed, step in [(0, 0), (5, 17), (2**32 - 1, 2**31 + 3), (123456789, 10**9)]:
        u_t = tsel.uniform_hash(seed, step, torch.arange(20000)).numpy()
        u_j = np.asarray(jsel.uniform_hash(seed, step, jnp.arange(20000, dtype=jnp.int32)))
        np.testing.assert_array_equal(u_t, u_j)


@pytest.mark.parametrize("shape", [(53,), (7, 13)])
def test_masks_and_weights_on_many_random_inputs(shape):
    rng = np.random.default_rng(sum(shape))
    disagreements = 0
    for trial in range(40):
        d = (rng.standard_normal(shape) * rng.uniform(0.1, 6)).astype(np.float32)
        if trial % 5 == 0:
            d[rng.random(shape) < 0.1] = np.nan
        if trial % 7 == 0:
            d.flat[0] = np.inf
        e = rng.random(shape) < rng.uniform(0.2, 1.0)
        ratio = np.float32(rng.choice([rng.uniform(1e-3, 1.0), 1.0, 0.25]))
        power = float(rng.choice([0.0, 0.5, 1.0, 2.0, 4.0]))
        mix = float(rng.choice([0.0, 0.05, 0.1, 0.5, 1.0]))
        seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**31))
        kw = dict(step=step, seed=seed, power=power, uniform_mix=mix)
        m_t, w_t, k_t = tsel.sample_tokens(torch.from_numpy(d), torch.from_numpy(e), float(ratio), **kw)
        m_j, w_j, k_j = jsel.sample_tokens(jnp.asarray(d), jnp.asarray(e), float(ratio), **kw)
        m_t, w_t, m_j, w_j = m_t.numpy(), w_t.numpy(), np.asarray(m_j), np.asarray(w_j)
        assert int(k_t) == int(k_j)
        k = int(k_t)
        pi_t = tsel.sampling_probabilities(torch.from_numpy(d), torch.from_numpy(e), k, power=power,
                                           uniform_mix=mix).numpy()
        pi_j = np.asarray(jsel.sampling_probabilities(jnp.asarray(d), jnp.asarray(e), k, power=power,
                                                      uniform_mix=mix))
        np.testing.assert_allclose(pi_t, pi_j, rtol=PI_RTOL, atol=1e-12)
        u = tsel.uniform_hash(seed, step, torch.arange(d.size)).numpy().reshape(shape)
        differ = m_t != m_j
        assert not (differ & ~(np.abs(u - pi_t) <= PI_RTOL * pi_t)).any()
        disagreements += int(differ.sum())
        both = m_t & m_j
        np.testing.assert_allclose(w_t[both], w_j[both], rtol=PI_RTOL)
    assert disagreements <= 2   # band tokens are rare (a draw within ~1e-7 of π)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_and_gradient_parity(dtype):
    rng = np.random.default_rng(17)
    B, T, V = 3, 11, 37
    z = (rng.standard_normal((B, T, V)) * 2).astype(np.float32)
    t = rng.integers(0, V, (B, T))
    t[rng.random((B, T)) < 0.15] = -100
    z[1, 1, 3] = np.nan
    cfg = dict(selection="sampled", warmup_steps=100, sample_seed=9, sample_power=1.0, sample_uniform_mix=0.1)
    x_t = torch.from_numpy(z).to(getattr(torch, dtype)).requires_grad_(True)
    with cggr_torch.dispatch.force("reference"):
        loss_t, met_t = cggr_torch.cggr_loss(x_t, torch.from_numpy(t), 37, **cfg)
        loss_t.backward()
    x_j = jnp.asarray(z).astype(getattr(jnp, dtype))
    fn = cggr_jax.CGGRLoss(**cfg)
    with cggr_jax.dispatch.force("reference"):
        (loss_j, met_j), g_j = jax.value_and_grad(lambda x: fn(x, jnp.asarray(t), 37), has_aux=True)(x_j)
    assert int(met_t["tokens_selected"]) == int(met_j["tokens_selected"])
    assert float(met_t["sample_ess"]) == pytest.approx(float(met_j["sample_ess"]), rel=1e-4)
    assert float(loss_t.detach()) == pytest.approx(float(loss_j), rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(x_t.grad.float().numpy(), np.asarray(g_j.astype(jnp.float32)),
                               atol=1e-5, rtol=1e-4 if dtype == "float32" else 1.6e-2)
