"""SPEC §11 parity levels for ``scoring='excess'`` (SPEC §3.1): identical logits and reference give identical
selections in cggr_torch and cggr_jax.

Level 1: the same excess difficulties (torch's) and float32 ratio → bit-identical masks and ``k``.
Level 2: the same logits and reference → eligibility identical, difficulties within the excess parity bound.
Level 3: the same logits and reference → selections identical outside the tolerance band of the cut-off.
Level 4: loss and ∂loss/∂logits within 1e-5 + 1e-4·|x|.
Shapes are fixed per test (a few JAX compilations).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import cggr_jax  # noqa: E402
import cggr_torch  # noqa: E402
from cggr_jax import curriculum as jcur  # noqa: E402
from cggr_jax import scoring as jsc  # noqa: E402
from cggr_jax import selection as jsel  # noqa: E402
from cggr_torch import curriculum as tcur  # noqa: E402
from cggr_torch import scoring as tsc  # noqa: E402
from cggr_torch import selection as tsel  # noqa: E402
from tests import oracle  # noqa: E402
from tests.parity.cases import same_selection  # noqa: E402

STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")
SHAPE = (3, 11, 37)


def _batch(rng, dtype="float32", nonfinite=True):
    B, T, V = SHAPE
    temps = rng.uniform(0.3, 3.0, size=(B, T, 1))
    z = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
    if dtype == "bfloat16":
        z = torch.from_numpy(z).to(torch.bfloat16).float().numpy()
    t = rng.integers(0, V, size=(B, T))
    t[rng.random((B, T)) < 0.15] = -100
    ref = rng.uniform(0.0, 5.0, (B, T)).astype(np.float32)
    if nonfinite:
        ref[rng.random((B, T)) < 0.08] = np.nan
        ref[0, 0], z[1, 1, 3] = np.inf, np.nan
    return z, t, ref


def _scores(z, t, ref, dtype="float32"):
    s_t = tsc.score_tokens(torch.from_numpy(z).to(getattr(torch, dtype)), torch.from_numpy(t), scoring="excess",
                           reference_nll=torch.from_numpy(ref))
    s_j = jsc.score_tokens(jnp.asarray(z).astype(getattr(jnp, dtype)), jnp.asarray(t), scoring="excess",
                           reference_nll=jnp.asarray(ref))
    return s_t, s_j


@pytest.mark.parametrize("selection", STRATEGIES)
def test_level1_masks_bit_identical_from_identical_excess_difficulties(selection):
    rng = np.random.default_rng(31 + STRATEGIES.index(selection))
    for _ in range(6):
        z, t, ref = _batch(rng)
        s_t, _ = _scores(z, t, ref)
        d, e = s_t.difficulty.numpy(), s_t.eligible.numpy()
        ratio = np.float32(rng.uniform(0.05, 1.0))
        m_t, k_t = same_selection(d, e, ratio, selection=selection, num_strata=3, min_tokens_per_sequence=2)
        # and both equal the oracle's selection on the same difficulties
        m_o, k_o = oracle.select_tokens(d.astype(np.float64), e, ratio, selection, 3, 2)
        assert k_t == k_o
        np.testing.assert_array_equal(m_t, m_o)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_level2_excess_scores_within_tolerance(dtype):
    rng = np.random.default_rng(41 if dtype == "float32" else 42)
    for _ in range(4):
        z, t, ref = _batch(rng, dtype)
        s_t, s_j = _scores(z, t, ref, dtype)
        np.testing.assert_array_equal(s_t.valid.numpy(), np.asarray(s_j.valid))
        np.testing.assert_array_equal(s_t.eligible.numpy(), np.asarray(s_j.eligible))
        e = s_t.eligible.numpy()
        assert (~e & s_t.valid.numpy()).any()        # the non-finite references are exercised
        d_t, d_j = s_t.difficulty.numpy()[e], np.asarray(s_j.difficulty)[e]
        nll = s_t.stats.nll.numpy()[e]
        bound = oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * (np.abs(d_t) + np.abs(nll))
        assert (np.abs(d_t - d_j) <= bound).all()


def _pipeline(framework, z, t, ref, cfg, step):
    if framework == "torch":
        sc = tsc.score_tokens(torch.from_numpy(z), torch.from_numpy(t), scoring="excess",
                              reference_nll=torch.from_numpy(ref))
        base = tcur.linear_warmup_ratio(cfg["min_tokens_ratio"], cfg["warmup_steps"])(step)
        e = sc.eligible
        mean_conf = torch.where(e, sc.stats.confidence, 0).sum() / e.sum().clamp(min=1)
        ratio = tcur.dynamic_ratio(torch.tensor(np.float32(base)), mean_conf, cfg["threshold_sensitivity"])
        mask, k = tsel.select_tokens(sc.difficulty, e, ratio, selection=cfg["selection"], num_strata=3,
                                     min_tokens_per_sequence=1)
        return sc.difficulty.numpy(), e.numpy(), mask.numpy(), int(k), np.float32(ratio)
    sc = jsc.score_tokens(jnp.asarray(z), jnp.asarray(t), scoring="excess", reference_nll=jnp.asarray(ref))
    base = jcur.linear_warmup_ratio(cfg["min_tokens_ratio"], cfg["warmup_steps"])(step)
    e = sc.eligible
    mean_conf = jnp.where(e, sc.stats.confidence, 0).sum() / jnp.maximum(e.sum(), 1)
    ratio = jcur.dynamic_ratio(base, mean_conf, cfg["threshold_sensitivity"])
    mask, k = jsel.select_tokens(sc.difficulty, e, ratio, selection=cfg["selection"], num_strata=3,
                                 min_tokens_per_sequence=1)
    return np.asarray(sc.difficulty), np.asarray(e), np.asarray(mask), int(k), np.float32(ratio)


@pytest.mark.parametrize("selection", ["topk", "fixed_quota"])
def test_level3_selections_identical_outside_band(selection):
    rng = np.random.default_rng(51)
    identical = 0
    for trial in range(8):
        z, t, ref = _batch(rng)
        cfg = dict(selection=selection, min_tokens_ratio=float(rng.uniform(0.1, 0.9)), warmup_steps=20,
                   threshold_sensitivity=0.5)
        step = int(rng.integers(0, 40))
        d_t, e_t, m_t, k_t, r_t = _pipeline("torch", z, t, ref, cfg, step)
        _, e_j, m_j, k_j, r_j = _pipeline("jax", z, t, ref, cfg, step)
        np.testing.assert_array_equal(e_t, e_j)
        if k_t != k_j:
            assert abs(k_t - k_j) <= 1 and abs(float(r_t) - float(r_j)) <= 4e-7
            continue
        if np.array_equal(m_t, m_j):
            identical += 1
            continue
        vals = np.sort(d_t[e_t])[::-1]
        cut = vals[k_t - 1]
        # SPEC §11 (excess): SCORE_PARITY_ATOL + 2e-5·(|d| + |nll|); the largest eligible nll bounds |nll|
        nll_max = float(np.abs(tsc.score_tokens(torch.from_numpy(z), torch.from_numpy(t)).stats.nll.numpy()).max())
        band = oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * (abs(cut) + nll_max)
        differ = m_t != m_j
        assert (np.abs(d_t[differ] - cut) <= band).all(), "selection differs outside the band"
    assert identical >= 6


@pytest.mark.parametrize("selection", STRATEGIES)
def test_level4_loss_and_gradients_agree(selection):
    rng = np.random.default_rng(61 + STRATEGIES.index(selection))
    for _ in range(3):
        z, t, ref = _batch(rng)
        cfg = dict(scoring="excess", selection=selection, min_tokens_ratio=0.4, warmup_steps=10,
                   threshold_sensitivity=0.5, num_strata=3, min_tokens_per_sequence=1)
        zt = torch.from_numpy(z).requires_grad_(True)
        loss_t, met_t = cggr_torch.cggr_loss(zt, torch.from_numpy(t), 5, reference_nll=torch.from_numpy(ref), **cfg)
        loss_t.backward()
        fn = lambda x: cggr_jax.cggr_loss(x, jnp.asarray(t), 5, reference_nll=jnp.asarray(ref), **cfg)  # noqa: E731
        (loss_j, met_j), g_j = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(z))
        for key in ("tokens_total", "tokens_nonfinite"):
            assert int(met_t[key]) == int(met_j[key]), key
        assert int(met_t["tokens_nonfinite"]) > 0
        if int(met_t["tokens_selected"]) != int(met_j["tokens_selected"]):
            continue  # a band case: level 3
        np.testing.assert_allclose(float(loss_t.detach()), float(loss_j), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(zt.grad.numpy(), np.asarray(g_j), atol=1e-5, rtol=1e-4)
