"""SPEC §9 / §11: given the same router logits, PyTorch and JAX keep the same sequences.

JAX runs every batch padded to one bucket shape (``tests/parity/cases.py``: extra all-padding sequences, extra
padding positions; neither is ever a target, SPEC §9) and its per-sequence results are cut back to the real
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
from tests.parity.cases import bucketed, real_sequences, same_sequences, sequence_batch  # noqa: E402


@pytest.mark.parametrize("scoring", oracle.SCORING_MODES)
def test_same_router_logits_same_sequences(scoring):
    rng = np.random.default_rng(7 + oracle.SCORING_MODES.index(scoring))
    identical = 0
    for trial in range(8):
        B, T, V = int(rng.integers(1, 9)), int(rng.integers(2, 10)), int(rng.choice([5, 33, 64]))
        logits, labels, mask = sequence_batch(rng, B, T, V)
        ratio = np.float32(rng.uniform(0.05, 1.0))
        t = tmodel.select_sequences(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(mask),
                                    ratio=torch.tensor(ratio), scoring=scoring)
        j = jbs.select_sequences(*bucketed(logits, labels, mask), ratio=jnp.float32(ratio),
                                 config=jbs.BatchSplitConfig(scoring=scoring))
        o = oracle.select_sequences(logits, labels, ratio, scoring=scoring, attention_mask=mask)
        identical += same_sequences(t, *real_sequences(j, B), j.k, o, ratio)
    assert identical >= 6
