"""PyTorch vs JAX for SPEC §14: token statistics, their gradients and the policy-gradient loss from identical
inputs (both frameworks in one process). Statistics within twice the oracle bounds; the kept-token masks of the
policy-gradient loss identical (SPEC §11 levels 2-4: the entropies agree far inside the decision band here,
and the check asserts that no kept token sits within it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cggr_jax
import cggr_torch
from tests import oracle

DT = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
TOL = {"float32": (2e-4, 2e-5), "bfloat16": (4e-2, 2e-2)}
CHUNKS = dict(row_chunk_size=9, vocab_chunk_size=100)


def _inputs(seed, dtype, shape=(4, 11), d=19, V=257):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal(shape + (d,)) * rng.uniform(0.3, 3.0, shape + (1,))).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, shape)
    t[:, :2] = -100
    t[rng.random(shape) < 0.1] = -100
    adv = rng.standard_normal(shape[0]).astype(np.float32)
    td, jd = DT[dtype]
    # round through the dtype once so that both frameworks see the same values
    hq, wq, bq = (torch.from_numpy(x).to(td) for x in (h, w, b))
    return ((hq, wq, bq, torch.from_numpy(t), torch.from_numpy(adv)),
            tuple(jnp.asarray(x.float().numpy(), jd) for x in (hq, wq, bq)) + (jnp.asarray(t, jnp.int32),
                                                                               jnp.asarray(adv)))


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, 2.5)])
def test_token_stats_and_gradients_agree(dtype, temperature, softcap):
    (th, tw, tb, tt, _), (jh, jw, jb, jt, _) = _inputs(1, dtype)
    kw = dict(temperature=temperature, softcap=softcap, **CHUNKS)
    hl, wl, bl = (x.clone().requires_grad_(True) for x in (th, tw, tb))
    to = cggr_torch.fused_linear_token_stats(hl, wl, tt, bl, **kw)
    (to.logprob.sum() + 0.5 * to.entropy.sum()).backward()

    def f(h, w, b):
        o = cggr_jax.fused_linear_token_stats(h, w, jt, b, **kw)
        return jnp.sum(o.logprob) + 0.5 * jnp.sum(o.entropy), o

    (_, jo), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(jh, jw, jb)
    atol, rtol = TOL[dtype]
    np.testing.assert_array_equal(to.finite.numpy(), np.asarray(jo.finite))
    for name in ("logprob", "entropy", "lse"):
        np.testing.assert_allclose(getattr(to, name).detach().numpy(), np.asarray(getattr(jo, name)), atol=atol,
                                   rtol=rtol, err_msg=name)
    rel = 2e-5 if dtype == "float32" else 6e-2
    for a, g in zip((hl, wl, bl), grads):
        e = np.asarray(jnp.asarray(g, jnp.float32))
        assert float(np.abs(a.grad.float().numpy() - e).max()) <= rel * float(np.abs(e).max())


@pytest.mark.parametrize("selection, scoring", [("topk", "entropy"), ("stratified", "combined")])
def test_policy_gradient_masks_and_loss_agree(selection, scoring):
    (th, tw, tb, tt, ta), (jh, jw, jb, jt, ja) = _inputs(2, "float32")
    kw = dict(selection=selection, scoring=scoring, min_tokens_ratio=0.3, loss_type="grpo", temperature=0.9,
              **CHUNKS)
    hl, wl, bl = (x.clone().requires_grad_(True) for x in (th, tw, tb))
    to = cggr_torch.policy_gradient_loss(hl, wl, tt, ta, None, None, bl, **kw)
    to.loss.backward()

    def f(h, w, b):
        o = cggr_jax.policy_gradient_loss(h, w, jt, ja, None, None, b, **kw)
        return o.loss, o

    (_, jo), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(jh, jw, jb)
    # the difficulties agree far inside the decision band, so the masks must be identical
    d_t = to.entropy.numpy()
    assert np.abs(d_t - np.asarray(jo.entropy))[np.isfinite(d_t)].max() < oracle.SCORE_PARITY_ATOL
    np.testing.assert_array_equal(to.mask.numpy(), np.asarray(jo.mask))
    assert abs(float(to.loss.detach()) - float(jo.loss)) <= 1e-5 + 1e-4 * abs(float(jo.loss))
    for a, g in zip((hl, wl, bl), grads):
        e = np.asarray(g)
        assert float(np.abs(a.grad.numpy() - e).max()) <= 1e-5 + 1e-4 * float(np.abs(e).max())
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite"):
        assert int(to.metrics[key]) == int(jo.metrics[key])


def test_identical_masks_from_identical_entropies():
    """SPEC §11 level 1 through the policy-gradient selection: the same float32 entropies give bit-identical
    masks (the selection functions both losses call)."""
    rng = np.random.default_rng(3)
    ent = rng.random((5, 17)).astype(np.float32)
    ent[0, :4] = ent[0, 4]                 # ties
    elig = rng.random((5, 17)) > 0.2
    for ratio in (0.2, 0.5, 1.0):
        mt, kt = cggr_torch.select_tokens(torch.from_numpy(ent), torch.from_numpy(elig), ratio, selection="topk")
        mj, kj = cggr_jax.select_tokens(jnp.asarray(ent), jnp.asarray(elig), ratio, selection="topk")
        np.testing.assert_array_equal(mt.numpy(), np.asarray(mj))
        assert int(kt) == int(kj)
