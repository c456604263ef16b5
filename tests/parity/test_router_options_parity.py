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
from tests.parity.cases import same_sequences, sequence_batch  # noqa: E402

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
        logits, labels, mask = sequence_batch(rng, B, T, V)
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
        identical += same_sequences(t, j.mask, j.eligible, j.difficulty, j.k, o, ratio)
    assert identical >= 5
