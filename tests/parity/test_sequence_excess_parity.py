"""SPEC §9.1 / §11: given the same router logits and the same ``reference_nll`` (per token ``(B, T)`` aligned
like the labels, or per sequence ``(B,)``), PyTorch and JAX keep the same sequences.

As in ``test_sequence_parity.py``, JAX runs every batch padded to one bucket shape (``tests/parity/cases.py``;
the padding's reference is NaN, which is never read there) so that the bucket compiles once.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from cggr_jax import scorer as jbs  # noqa: E402
from cggr_torch import batch_split as tmodel  # noqa: E402
from tests import oracle  # noqa: E402
from tests.parity.cases import (BUCKET, bucketed, pad_to, real_sequences, same_sequences,  # noqa: E402
                                sequence_batch)

CONFIG = jbs.BatchSplitConfig(scoring="excess")


def _reference(rng, labels, mask, form):
    B, T = labels.shape
    if form == "sequence":
        ref = rng.uniform(0.0, 4.0, B)
        ref[rng.random(B) < 0.15] = np.nan
        return ref
    ref = rng.uniform(0.0, 4.0, (B, T))
    ref[rng.random((B, T)) < 0.08] = np.inf
    ref[:, 0] = np.nan                       # never read
    ref[(labels == -100) | (mask == 0)] = np.nan
    return ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", ["token", "sequence"])
def test_same_router_logits_and_reference_same_sequences(form, dtype):
    rng = np.random.default_rng(31 + (form == "sequence") + 2 * (dtype == "bfloat16"))
    identical = 0
    for trial in range(8):
        B, T, V = int(rng.integers(1, 9)), int(rng.integers(2, 10)), int(rng.choice([5, 33, 64]))
        logits, labels, mask = sequence_batch(rng, B, T, V)
        tl = torch.from_numpy(logits).to(getattr(torch, dtype))
        logits = tl.float().numpy()                     # the values both frameworks (and the oracle) see
        ref = _reference(rng, labels, mask, form)       # float64: both round it to the same float32
        ratio = np.float32(rng.uniform(0.05, 1.0))
        t = tmodel.select_sequences(tl, torch.from_numpy(labels), torch.from_numpy(mask), ratio=torch.tensor(ratio),
                                    scoring="excess", reference_nll=torch.from_numpy(ref))
        ref_pad = pad_to(ref, (BUCKET[0],) if form == "sequence" else BUCKET, np.nan)
        j = jbs.select_sequences(*bucketed(logits, labels, mask, dtype), ratio=jnp.float32(ratio), config=CONFIG,
                                 reference_nll=ref_pad)
        o = oracle.select_sequences_excess(logits, labels, ratio, ref, attention_mask=mask)
        identical += same_sequences(t, *real_sequences(j, B), j.k, o, ratio)
        # the token-level counts agree too (eligible tokens; valid tokens excluded by a row or the reference)
        tt, jt = t.token_scores, j.token_scores
        assert int(tt.eligible.sum()) == int(np.asarray(jt.eligible).sum()) == int(o["scores"]["eligible"].sum())
        assert int((tt.valid & ~tt.eligible).sum()) == int(np.asarray(jt.valid & ~jt.eligible).sum()) \
            == int(o["scores"]["nonfinite"].sum())
    assert identical >= 6


@pytest.mark.parametrize("form", ["token", "sequence"])
def test_cggr_model_and_the_jax_selection_agree_at_a_curriculum_step(form):
    """The whole router-side step: CGGRModel (its router returning these logits) and the JAX selection at the
    same curriculum step derive the same dynamic ratio (c̄ over the same eligible tokens, the reference's
    non-finite tokens excluded) and keep the same sequences."""
    from tests.torch.test_cggr_model import RecordingLM
    from tests.torch.test_router import FixedRouter

    rng = np.random.default_rng(77 + (form == "sequence"))
    B, T, V = 7, 9, 33
    logits, labels, mask = sequence_batch(rng, B, T, V)
    ref = _reference(rng, labels, mask, form)
    model = RecordingLM(V)
    cggr = tmodel.CGGRModel(model, FixedRouter(torch.from_numpy(logits)), scoring="excess", warmup_steps=10,
                            min_tokens_ratio=0.25)
    cggr.set_step(6)
    res = cggr.forward_with(model, torch.zeros(B, T, dtype=torch.long), torch.from_numpy(labels),
                            torch.from_numpy(mask), reference_nll=torch.from_numpy(ref))
    m = cggr.get_metrics()
    cfg = jbs.BatchSplitConfig(scoring="excess", warmup_steps=10, min_tokens_ratio=0.25)
    j = jbs.select_sequences(jnp.asarray(logits), jnp.asarray(labels, dtype=jnp.int32),
                             jnp.asarray(mask, dtype=jnp.int32), step=6, config=cfg, reference_nll=ref)
    info = jbs.selection_info(j)
    assert float(j.base_ratio) == m["token_ratio"]
    assert abs(float(j.ratio) - m["effective_ratio"]) <= 4 * np.spacing(np.float32(m["effective_ratio"]))
    assert int(info["tokens_total"]) == m["tokens_total"] and int(info["tokens_nonfinite"]) == m["tokens_nonfinite"]
    assert int(info["n"]) == m["sequences_total"]
    np.testing.assert_array_equal(res.sequence_eligible.numpy(), np.asarray(j.eligible))
    np.testing.assert_allclose(res.sequence_difficulty.numpy(), np.asarray(j.difficulty),
                               atol=oracle.SCORE_PARITY_ATOL, rtol=oracle.SCORE_PARITY_RTOL)
    # fixed seeds, far from a half-integer ratio·n_seq and from the band: the same k and the same sequences
    assert int(j.k) == m["sequences_selected"] > 0
    np.testing.assert_array_equal(res.kept.numpy(), np.flatnonzero(np.asarray(j.mask)))
