"""SPEC §11 parity of ``scoring='excess'`` (SPEC §3.1) in the fused LM heads of cggr_torch and cggr_jax:
identical hidden states, head and reference give the same selection, loss and gradients.

Level 1: the same fused difficulties (torch's) and float32 ratio → bit-identical masks and ``k``.
Level 2: eligibility identical (NaN/±inf references included), difficulties within the excess parity bound.
Level 3: selections identical outside the tolerance band of the cut-off.
Level 4: loss and ∂loss/∂(hidden, W, b) within 1e-5 + 1e-4·|x| (float32) when the masks agree.
Odd sizes (N = 39 as 3 × 13, d = 23, V = 301), chunk sizes that divide neither N nor V.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from cggr_jax import fused_linear as jfl  # noqa: E402
from cggr_torch import fused_linear as tfl  # noqa: E402
from tests import oracle  # noqa: E402
from tests.parity.cases import same_selection  # noqa: E402

SHAPE, D_HID, V = (3, 13), 23, 301
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)
STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal(SHAPE + (D_HID,)) * rng.uniform(0.2, 3.0, SHAPE + (1,))).astype(np.float32)
    w = (rng.standard_normal((V, D_HID)) * (1.5 / np.sqrt(D_HID))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, SHAPE).astype(np.int64)
    t[rng.random(SHAPE) < 0.15] = -100
    ref = rng.uniform(-1.0, 6.0, SHAPE).astype(np.float32)
    ref[rng.random(SHAPE) < 0.1] = np.nan
    t[0, 1], ref[0, 1] = 4, np.inf
    t[2, 3], ref[2, 3] = 9, -np.inf
    return h, w, b, t, ref


def _torch(h, w, b, t, ref, step, cfg):
    leaves = [torch.from_numpy(x).requires_grad_(True) for x in (h, w, b)]
    out = tfl.fused_linear_cggr(leaves[0], leaves[1], torch.from_numpy(t), step, bias=leaves[2],
                                reference_nll=torch.from_numpy(ref), **cfg, **CHUNKS)
    out.loss.backward()
    return out, [x.grad.numpy() for x in leaves]


def _jax(h, w, b, t, ref, step, cfg):
    def f(h, w, b):
        out = jfl.fused_linear_cggr(h, w, jnp.asarray(t.astype(np.int32)), step, bias=b,
                                    reference_nll=jnp.asarray(ref), **cfg, **CHUNKS)
        return out.loss, out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(*map(jnp.asarray, (h, w, b)))
    return out, [np.asarray(g) for g in grads]


@pytest.mark.parametrize("selection", STRATEGIES)
def test_fused_heads_agree_on_excess(selection):
    h, w, b, t, ref = _inputs(71 + STRATEGIES.index(selection))
    cfg = dict(scoring="excess", selection=selection, min_tokens_ratio=0.4, warmup_steps=10, num_strata=3,
               min_tokens_per_sequence=1)
    out_t, g_t = _torch(h, w, b, t, ref, 5, cfg)
    out_j, g_j = _jax(h, w, b, t, ref, 5, cfg)
    # level 2
    e = out_t.scores.eligible.numpy()
    np.testing.assert_array_equal(e, np.asarray(out_j.scores.eligible))
    assert (out_t.scores.valid.numpy() & ~e).sum() >= 3            # the non-finite references are exercised
    for key in ("tokens_total", "tokens_nonfinite"):
        assert int(out_t.metrics[key]) == int(out_j.metrics[key]), key
    d_t, d_j = out_t.scores.difficulty.numpy(), np.asarray(out_j.scores.difficulty)
    nll = out_t.scores.stats.nll.numpy()
    bound = oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * (np.abs(d_t) + np.abs(nll))
    assert (np.abs(d_t - d_j) <= bound)[e].all()
    # level 1: torch's difficulties through both selections at torch's ratio
    ratio = np.float32(out_t.metrics["effective_ratio"])
    m_t, k_t = same_selection(d_t, e, ratio, selection=selection, num_strata=3, min_tokens_per_sequence=1)
    np.testing.assert_array_equal(m_t, out_t.mask.numpy())
    # level 3
    mask_t, mask_j = out_t.mask.numpy(), np.asarray(out_j.mask)
    if not np.array_equal(mask_t, mask_j):
        cut = np.sort(d_t[e])[::-1][int(k_t) - 1]
        band = oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * (abs(cut) + float(np.abs(nll[e]).max()))
        assert (np.abs(d_t[mask_t != mask_j] - cut) <= band).all(), "selection differs outside the band"
        return
    # level 4
    np.testing.assert_allclose(float(out_t.loss.detach()), float(out_j.loss), atol=1e-5, rtol=1e-4)
    for name, a, c in zip(("hidden", "weight", "bias"), g_t, g_j):
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4, err_msg=name)


def test_fused_scores_agree_on_excess():
    h, w, b, t, ref = _inputs(81)
    s_t = tfl.fused_linear_scores(torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(t),
                                  torch.from_numpy(b), scoring="excess", reference_nll=torch.from_numpy(ref))
    s_j = jfl.fused_linear_scores(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t.astype(np.int32)), jnp.asarray(b),
                                  scoring="excess", reference_nll=jnp.asarray(ref))
    np.testing.assert_array_equal(s_t.valid.numpy(), np.asarray(s_j.valid))
    np.testing.assert_array_equal(s_t.eligible.numpy(), np.asarray(s_j.eligible))
    e = s_t.eligible.numpy()
    d_t, d_j = s_t.difficulty.numpy()[e], np.asarray(s_j.difficulty)[e]
    bound = oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * (np.abs(d_t) + np.abs(s_t.stats.nll.numpy()[e]))
    assert (np.abs(d_t - d_j) <= bound).all()
