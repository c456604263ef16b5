"""SPEC §9.2 / §11: sequence-level ``sampled`` selection in PyTorch and JAX from identical router logits: the
same eligible sequences, ratio and difficulties, the same draw and the same ``1/π`` weights.

Level 1 (exact given identical float32 sequence difficulties and ratio): both packages' ``sample_tokens`` on
the ``(B,)`` difficulties (what ``CGGRModel`` and the JAX step apply, the batch index being the draw's index)
give the same inclusions, up to the π tolerance of SPEC §11 at ``u ≈ π``, and weights within ``PI_RTOL``.
End to end (``CGGRModel`` with a router returning the logits vs ``cggr_jax.scorer.select_sequences`` at the same
curriculum step): the difficulties differ by float32 summation order only, so the draws agree except where
``u`` lies within that rounding of ``π``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from cggr_jax import scorer as jbs  # noqa: E402
from cggr_jax import selection as jsel  # noqa: E402
from cggr_torch import batch_split as tmodel  # noqa: E402
from cggr_torch import selection as tsel  # noqa: E402
from tests import oracle  # noqa: E402
from tests.parity.cases import bucketed, real_sequences, sequence_batch  # noqa: E402

SAMPLE = dict(sample_power=1.5, sample_uniform_mix=0.2, sample_floor=1e-6, sample_seed=11)
PARAMS = dict(seed=11, power=1.5, uniform_mix=0.2, floor=1e-6)


def _boundary(diff, u, pi, rtol):
    assert np.all(np.abs(u[diff] - pi[diff]) <= rtol * pi[diff] + 1e-7)


def test_identical_difficulties_same_draw_and_weights():
    rng = np.random.default_rng(5)
    for trial in range(12):
        B = int(rng.integers(1, 12))
        d = rng.uniform(0.0, 6.0, B).astype(np.float32)
        e = rng.random(B) < 0.8
        d[rng.random(B) < 0.2] = d[0]                             # ties
        ratio = np.float32(rng.uniform(0.05, 1.0))
        step = int(rng.integers(0, 1000))
        tm, tw, tk = tsel.sample_tokens(torch.from_numpy(d), torch.from_numpy(e), torch.tensor(ratio), step=step,
                                        **PARAMS)
        jm, jw, jk = jsel.sample_tokens(jnp.asarray(d), jnp.asarray(e), jnp.float32(ratio), step=step, **PARAMS)
        mo, wo, ko, pi, u = oracle.sample_sequences(d, e, ratio, step, 11, 1.5, 0.2, 1e-6)
        assert int(tk) == int(jk) == ko
        tm, jm = tm.numpy(), np.asarray(jm)
        _boundary(tm != jm, u, pi, 2 * oracle.PI_RTOL)
        _boundary(tm != mo, u, pi, oracle.PI_RTOL)
        both = tm & jm & mo
        np.testing.assert_allclose(tw.numpy()[both], np.asarray(jw)[both], rtol=2 * oracle.PI_RTOL)
        np.testing.assert_allclose(tw.numpy()[both], wo[both], rtol=oracle.PI_RTOL)
        assert not tm[~e].any() and not jm[~e].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cggr_model_and_the_jax_selection_draw_the_same_sequences(dtype):
    from tests.torch.test_router import FixedRouter
    from tests.torch.test_split_sampled import LogitsLM

    rng = np.random.default_rng(41 + (dtype == "bfloat16"))
    identical = 0
    jitted = jax.jit(lambda z, y, m, s, cfg: jbs.select_sequences(z, y, m, step=s, config=cfg), static_argnums=4)
    for trial in range(8):
        B, T, V = int(rng.integers(1, 9)), int(rng.integers(2, 10)), int(rng.choice([5, 33]))
        logits, labels, mask = sequence_batch(rng, B, T, V)
        tl = torch.from_numpy(logits).to(getattr(torch, dtype))
        logits = tl.float().numpy()
        step = int(rng.integers(0, 50))
        lm = LogitsLM(V)
        cggr = tmodel.CGGRModel(lm, FixedRouter(tl), selection="sampled", warmup_steps=20, min_tokens_ratio=0.3,
                                **SAMPLE)
        cggr.set_step(step)
        res = cggr.forward_with(lm, torch.zeros(B, T, dtype=torch.long), torch.from_numpy(labels),
                                torch.from_numpy(mask))
        m = cggr.get_metrics()
        cfg = jbs.BatchSplitConfig(selection="sampled", warmup_steps=20, min_tokens_ratio=0.3, **SAMPLE)
        j = jitted(*bucketed(logits, labels, mask, dtype), jnp.int32(step), cfg)
        jm, je, jd = real_sequences(j, B)
        e = res.sequence_eligible.numpy()
        np.testing.assert_array_equal(e, je)
        assert float(j.base_ratio) == m["token_ratio"]
        assert abs(float(j.ratio) - m["effective_ratio"]) <= 4 * np.spacing(np.float32(m["effective_ratio"]))
        np.testing.assert_allclose(res.sequence_difficulty.numpy()[e], jd[e], atol=oracle.SCORE_PARITY_ATOL,
                                   rtol=oracle.SCORE_PARITY_RTOL)
        tm = np.zeros(B, bool)
        tm[res.kept.numpy()] = True
        assert m["sequences_selected"] == int(tm.sum())
        # each package's draw is the oracle's on its own difficulties (level 1)
        for mask_i, d_i, r_i in ((tm, res.sequence_difficulty.numpy(), m["effective_ratio"]),
                                 (jm, jd, float(j.ratio))):
            mo, _, ko, pi, u = oracle.sample_sequences(d_i, e, np.float32(r_i), step, 11, 1.5, 0.2, 1e-6)
            _boundary(mask_i != mo, u, pi, oracle.PI_RTOL)
        # across frameworks: equal, or a disagreement where u is within the difficulties' rounding of π
        diff = tm != jm
        if diff.any():
            _, _, _, pi, u = oracle.sample_sequences(jd, e, np.float32(j.ratio), step, 11, 1.5, 0.2, 1e-6)
            _boundary(diff, u, pi, 1e-2)
        else:
            identical += 1
        # the weights of the kept sequences agree (same π up to the difficulties' rounding)
        tw = tsel.sample_tokens(res.sequence_difficulty, res.sequence_eligible, torch.tensor(m["effective_ratio"]),
                                step=step, **PARAMS)[1].numpy()
        jw = np.asarray(jsel.sample_tokens(jnp.asarray(jd), jnp.asarray(je), j.ratio, step=step, **PARAMS)[1])
        both = tm & jm
        np.testing.assert_allclose(tw[both], jw[both], rtol=1e-2)
    assert identical >= 6
