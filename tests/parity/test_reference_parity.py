"""The same stored reference scores give the same selections in PyTorch and JAX (SPEC §3.1, §11).

One ``cggr-reference-v1`` store (float16 per-token NLL with NaN and ±inf entries: tokens without a reference)
is read by both packages' loaders (``cggr_torch.reference.reference_loader``, ``cggr_jax.reference
.reference_loader``); the same float32 logits (one NumPy array) and the loaded ``labels``/``reference_nll`` go
to ``cggr_torch.cggr_loss`` and ``cggr_jax.cggr_loss`` with ``scoring="excess"``. The selected tokens (the rows
with a non-zero ``∂loss/∂logits``) must be identical, as must ``k`` and the counts; loss and gradients agree
within SPEC §11 level 4.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import cggr_jax  # noqa: E402
import cggr_torch  # noqa: E402
from cggr.reference import write_reference  # noqa: E402
from cggr_jax import reference as jref  # noqa: E402
from cggr_torch import reference as tref  # noqa: E402

STRATEGIES = ("topk", "stratified", "sequence_aware", "fixed_quota")
B, T, V, N = 3, 11, 37, 10


@pytest.fixture(scope="module")
def store_and_chunks(tmp_path_factory):
    rng = np.random.default_rng(7)
    chunks = rng.integers(0, V, size=(N, T + 1)).astype(np.uint16)
    ids = rng.permutation(500)[:N]
    nll = rng.uniform(0.0, 5.0, size=(N, T)).astype(np.float32)
    nll[rng.random((N, T)) < 0.08] = np.nan   # tokens the reference did not score
    nll[0, 3], nll[1, 0] = np.inf, -np.inf
    nll[2, 5] = 70000.0                       # beyond float16: stored as +inf
    store = write_reference(str(tmp_path_factory.mktemp("ref")), ids, nll, meta={"model": "synthetic"})
    return store, chunks, ids


def _loaded(store, chunks, ids, order):
    tb = list(tref.reference_loader(chunks, ids, store, B, order=order))
    jb = list(jref.reference_loader(chunks, ids, store, B, order=order))
    assert len(tb) == len(jb) == len(order) // B
    for t, j in zip(tb, jb):  # both loaders hand over the same values
        np.testing.assert_array_equal(t.chunk_ids, j.chunk_ids)
        np.testing.assert_array_equal(t.labels.numpy(), np.asarray(j.labels))
        np.testing.assert_array_equal(t.reference_nll.numpy(), np.asarray(j.reference_nll))
        np.testing.assert_array_equal(t.chunk_reference.numpy(), np.asarray(j.chunk_reference))
    return tb, jb


@pytest.mark.parametrize("selection", STRATEGIES)
def test_same_store_same_selection(store_and_chunks, selection):
    store, chunks, ids = store_and_chunks
    rng = np.random.default_rng(11 + STRATEGIES.index(selection))
    order = rng.permutation(N)[:9]
    tb, jb = _loaded(store, chunks, ids, order)
    cfg = dict(scoring="excess", selection=selection, min_tokens_ratio=0.3, warmup_steps=10,
               threshold_sensitivity=0.5, num_strata=3, min_tokens_per_sequence=2)
    nonfinite_seen = 0
    for t, j in zip(tb, jb):
        temps = rng.uniform(0.3, 3.0, size=(B, T, 1))
        z = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
        ignore = rng.random((B, T)) < 0.15
        labels_t = t.labels.masked_fill(torch.from_numpy(ignore), -100)
        labels_j = jnp.where(jnp.asarray(ignore), -100, j.labels)
        step = int(rng.integers(0, 20))

        zt = torch.from_numpy(z).requires_grad_(True)
        loss_t, met_t = cggr_torch.cggr_loss(zt, labels_t, step, reference_nll=t.reference_nll, **cfg)
        loss_t.backward()

        def fn(x):
            return cggr_jax.cggr_loss(x, labels_j, step, reference_nll=j.reference_nll, **cfg)

        (loss_j, met_j), g_j = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(z))
        mask_t = (zt.grad != 0).any(-1).numpy()
        mask_j = np.asarray((g_j != 0).any(-1))
        for key in ("tokens_total", "tokens_nonfinite", "tokens_selected"):
            assert int(met_t[key]) == int(met_j[key]), key
        np.testing.assert_array_equal(mask_t, mask_j)
        assert mask_t.sum() == int(met_t["tokens_selected"]) > 0
        # never a token without a finite reference, never an ignored one
        ref = t.reference_nll.numpy()
        assert not (mask_t & ~np.isfinite(ref)).any() and not (mask_t & ignore).any()
        nonfinite_seen += int(met_t["tokens_nonfinite"])
        np.testing.assert_allclose(float(loss_t.detach()), float(loss_j), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(zt.grad.numpy(), np.asarray(g_j), atol=1e-5, rtol=1e-4)
    assert nonfinite_seen > 0  # the tokens without a reference are exercised


def test_token_nll_agrees_across_frameworks():
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((2, 7, V)) * 5).astype(np.float32)
    t = rng.integers(0, V, (2, 7))
    a = tref.token_nll(torch.from_numpy(z), torch.from_numpy(t)).numpy()
    b = np.asarray(jref.token_nll(jnp.asarray(z), jnp.asarray(t)))
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-5)
