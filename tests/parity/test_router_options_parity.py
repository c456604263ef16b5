"""SPEC §9.3 / §11: with the cheaper router's settings (a prefix, a stride, a sample of positions), PyTorch and
JAX keep the same sequences given the same router logits, and both agree with the oracle.

The positions depend on ``T``, so the batches are not padded to a bucket here (the selection runs eagerly).
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
from tests.parity.test_sequence_parity import _batch  # noqa: E402

OPTIONS = [
    {"router_positions": 3},
    {"router_positions": 16},
    {"router_samples": 4},
    {"router_samples": 16},
    {"router_prefix": 5},
    {"router_prefix": 16},
    {"router_prefix": 6, "router_positions": 2},
    {"router_prefix": 7, "router_samples": 3},
]


@pytest.mark.parametrize("reference", [None, "token", "sequence"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_logits_same_sequences_with_router_options(options, reference):
    rng = np.random.default_rng(len(str(options)) + (0 if reference is None else len(reference)))
    scoring = "combined" if reference is None else "excess"
    identical = 0
    for trial in range(6):
        B, T, V = int(rng.integers(2, 9)), int(rng.integers(2, 13)), int(rng.choice([5, 33]))
        logits, labels, mask = _batch(rng, B, T, V)
        ratio = np.float32(rng.uniform(0.05, 1.0))
        ref = None
        if reference is not None:
            ref = (rng.uniform(0.0, 4.0, size=(B, T) if reference == "token" else (B,))).astype(np.float32)
            ref.reshape(-1)[0] = np.nan
        # JAX and the pure PyTorch selection may get the R columns a prefix router read
        R = T if "router_prefix" not in options else min(options["router_prefix"], T)
        z = logits[:, :R] if trial % 2 else logits
        t = tmodel.select_sequences(torch.from_numpy(z), torch.from_numpy(labels), torch.from_numpy(mask),
                                    ratio=torch.tensor(ratio), scoring=scoring,
                                    reference_nll=None if ref is None else torch.from_numpy(ref), **options)
        j = jbs.select_sequences(jnp.asarray(z), jnp.asarray(labels, dtype=jnp.int32),
                                 jnp.asarray(mask, dtype=jnp.int32), ratio=jnp.float32(ratio),
                                 config=jbs.BatchSplitConfig(scoring=scoring, **options),
                                 reference_nll=None if ref is None else jnp.asarray(ref))
        positions = oracle.router_scored_positions(T, **options)
        o = oracle.select_sequences_at(logits, labels, ratio, positions, scoring=scoring, attention_mask=mask,
                                       reference_nll=None if ref is None else ref.astype(np.float64))
        np.testing.assert_array_equal(t.eligible.numpy(), np.asarray(j.eligible))
        np.testing.assert_array_equal(t.eligible.numpy(), o["sequence_eligible"])
        assert int(t.k) == int(j.k) == o["k"]
        e = t.eligible.numpy()
        np.testing.assert_allclose(t.difficulty.numpy()[e], np.asarray(j.difficulty)[e],
                                   atol=oracle.SCORE_PARITY_ATOL, rtol=oracle.SCORE_PARITY_RTOL)
        # selection exact given each package's own difficulties (level 1) ...
        m_o, _ = oracle.select_tokens(t.difficulty.numpy(), e, ratio)
        np.testing.assert_array_equal(t.mask.numpy(), m_o)
        m_o, _ = oracle.select_tokens(np.asarray(j.difficulty), np.asarray(j.eligible), ratio)
        np.testing.assert_array_equal(np.asarray(j.mask), m_o)
        # ... and across frameworks different only within the parity band of the cut
        diff = t.mask.numpy() != np.asarray(j.mask)
        if diff.any():
            d = t.difficulty.numpy()
            cut = np.sort(d[e])[::-1][int(t.k) - 1]
            assert np.all(np.abs(d[diff] - cut) <= 2 * oracle.SCORE_PARITY_ATOL)
        else:
            identical += 1
    assert identical >= 5
