"""SPEC §9 / §11: given the same router logits, PyTorch and JAX keep the same sequences.

JAX runs every batch padded to one bucket shape (extra all-padding sequences below, extra padding positions
after every sequence: neither is ever a target, SPEC §9) and its per-sequence results are cut back to the real
batch, so the bucket compiles once instead of every random shape compiling anew.
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
from tests.parity.test_parity import pad_to  # noqa: E402

#: The JAX bucket (B, T) of the random batches (B <= 8, T <= 9).
BUCKET = (8, 9)


def _batch(rng, B, T, V):
    temps = rng.uniform(0.3, 3.0, size=(B, 1, 1))
    logits = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < 0.1] = -100
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        pad = int(rng.integers(0, T // 2))
        if pad:
            mask[b, T - pad:] = 0
    if B > 2:
        mask[B - 1] = 0        # an all-padding sequence is never kept
        labels[0] = -100       # an all-ignored sequence is never kept
    return logits, labels, mask


@pytest.mark.parametrize("scoring", oracle.SCORING_MODES)
def test_same_router_logits_same_sequences(scoring):
    rng = np.random.default_rng(7 + oracle.SCORING_MODES.index(scoring))
    identical = 0
    for trial in range(8):
        B, T, V = int(rng.integers(1, 9)), int(rng.integers(2, 10)), int(rng.choice([5, 33, 64]))
        logits, labels, mask = _batch(rng, B, T, V)
        ratio = np.float32(rng.uniform(0.05, 1.0))
        t = tmodel.select_sequences(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(mask),
                                    ratio=torch.tensor(ratio), scoring=scoring)
        j = jbs.select_sequences(jnp.asarray(pad_to(logits, BUCKET, 0.0)),
                                 jnp.asarray(pad_to(labels, BUCKET, -100), dtype=jnp.int32),
                                 jnp.asarray(pad_to(mask, BUCKET, 0), dtype=jnp.int32), ratio=jnp.float32(ratio),
                                 config=jbs.BatchSplitConfig(scoring=scoring))
        assert not np.asarray(j.mask)[B:].any() and not np.asarray(j.eligible)[B:].any()
        j = j._replace(mask=j.mask[:B], eligible=j.eligible[:B], difficulty=j.difficulty[:B])
        o = oracle.select_sequences(logits, labels, ratio, scoring=scoring, attention_mask=mask)
        np.testing.assert_array_equal(t.eligible.numpy(), np.asarray(j.eligible))
        np.testing.assert_array_equal(t.eligible.numpy(), o["sequence_eligible"])
        assert int(t.k) == int(j.k) == o["k"]
        e = t.eligible.numpy()
        np.testing.assert_allclose(t.difficulty.numpy()[e], np.asarray(j.difficulty)[e],
                                   atol=oracle.SCORE_PARITY_ATOL, rtol=oracle.SCORE_PARITY_RTOL)
        # Selection is exact given identical sequence difficulties (parity level 1) ...
        m_o, _ = oracle.select_tokens(t.difficulty.numpy(), e, ratio)
        np.testing.assert_array_equal(t.mask.numpy(), m_o)
        m_o, _ = oracle.select_tokens(np.asarray(j.difficulty), np.asarray(j.eligible), ratio)
        np.testing.assert_array_equal(np.asarray(j.mask), m_o)
        # ... and between frameworks may differ only where two sequences' difficulties are within the band.
        diff = t.mask.numpy() != np.asarray(j.mask)
        if diff.any():
            d = t.difficulty.numpy()
            k = int(t.k)
            cut = np.sort(d[e])[::-1][k - 1]
            assert np.all(np.abs(d[diff] - cut) <= 2 * oracle.SCORE_PARITY_ATOL)
        else:
            identical += 1
    assert identical >= 6
