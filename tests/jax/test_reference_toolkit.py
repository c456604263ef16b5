"""cggr_jax.reference: train a reference model, score chunks once (cggr-reference-v1), load batches as arrays.

Scores are checked against an independent computation (optax's integer-label cross-entropy and a float64 NumPy
log-softmax) on a tiny ``DecoderLM`` (V = 17); training against a toy learnable sequence; the loader's alignment
against ``cggr_loss(scoring="excess")`` with the reference passed by hand; bad input against ``ValueError``
naming the argument. Shapes are fixed so that each jitted function compiles a few times only.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
optax = pytest.importorskip("optax")
from flax import nnx  # noqa: E402

from cggr.reference import chunks_sha256, load_reference, warmup_cosine_lr  # noqa: E402
from cggr_jax import cggr_loss, shift_for_causal_lm  # noqa: E402
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402
from cggr_jax.reference import (model_logits, model_meta, reference_loader, score_chunks,  # noqa: E402
                                token_nll, train_reference_model)

V, T = 17, 10


def _model(seed: int = 0):
    return DecoderLM(DecoderConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=2, max_seq_len=32),
                     rngs=nnx.Rngs(seed))


def _chunks(rng, n=7):
    return rng.integers(0, V, size=(n, T + 1)).astype(np.uint16)


def _counting(rng, n):
    start = rng.integers(0, V, size=(n, 1))
    return ((start + np.arange(T + 1)) % V).astype(np.uint16)


def _nll64(logits, targets):
    z = np.asarray(logits, np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(z, np.asarray(targets)[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_token_nll_matches_float64(dtype):
    rng = np.random.default_rng(1)
    z = jnp.asarray((rng.standard_normal((3, 5, 29)) * 4).astype(np.float32)).astype(getattr(jnp, dtype))
    t = rng.integers(0, 29, (3, 5))
    got = token_nll(z, jnp.asarray(t))
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(got), _nll64(np.asarray(z.astype(jnp.float32)), t), atol=1e-4, rtol=1e-5)


def test_token_nll_nonfinite_rows():
    z = np.zeros((1, 3, 4), np.float32)
    z[0, 0, 1], z[0, 1, 2] = np.nan, -np.inf
    nll = np.asarray(token_nll(jnp.asarray(z), jnp.asarray([[0, 2, 3]])))
    assert np.isnan(nll[0, 0]) and np.isposinf(nll[0, 1]) and np.isfinite(nll[0, 2])


def test_scores_equal_cross_entropy(tmp_path):
    rng = np.random.default_rng(2)
    model = _model()
    chunks = _chunks(rng)                      # 7 chunks, batch 3: the last batch is padded
    ids = np.array([90, 4, 17, 33, 2, 8, 61])
    store = score_chunks(model, chunks, ids, str(tmp_path / "ref"), batch_size=3, meta={"split": "toy"})
    logits = model_logits(model, jnp.asarray(chunks[:, :-1].astype(np.int32)))
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(chunks[:, 1:], jnp.int32)))
    got = store.token_nll_of(ids)
    assert store.token_nll.dtype == np.float16 and got.shape == (7, T)
    np.testing.assert_allclose(got, ce.astype(np.float16).astype(np.float32), rtol=2 ** -10, atol=0)
    np.testing.assert_allclose(got, _nll64(logits, chunks[:, 1:]), rtol=2 ** -10, atol=1e-4)
    meta = load_reference(str(tmp_path / "ref")).meta
    assert meta["data_sha256"] == chunks_sha256(chunks, ids) and meta["split"] == "toy"
    assert meta["model"] == model_meta(model) and meta["model"]["config"]["vocab_size"] == V
    assert meta["model"]["config"]["dtype"] == "float32" and meta["model"]["framework"] == "jax"


def test_training_reduces_held_out_loss_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(3)
    train, held = _counting(rng, 32), _counting(rng, 8)
    model = _model(seed=1)
    before = score_chunks(model, held, np.arange(8), str(tmp_path / "before")).chunk_mean.mean()
    losses = []
    out = train_reference_model(model, train, steps=40, batch_size=8, lr=1e-2, seed=0,
                                callback=lambda s, loss: losses.append(float(loss)))
    assert out is model and len(losses) == 40
    after = score_chunks(model, held, np.arange(8), str(tmp_path / "after")).chunk_mean.mean()
    assert before > 2.5 and after < 0.5 * before, (before, after)
    # the same seed and initialisation give the same parameters; another seed other batches
    params = []
    for seed in (0, 0, 1):
        m = _model(seed=1)
        train_reference_model(m, train, steps=3, batch_size=8, lr=1e-2, seed=seed)
        leaves = jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))
        params.append(np.concatenate([np.asarray(x).ravel() for x in leaves]))
    # Same batches and learning rates: equal up to the last bits of GPU reductions (XLA's GPU reductions are not
    # run-to-run bit-reproducible; on the CPU they are); another seed trains on other batches: far apart.
    np.testing.assert_allclose(params[0], params[1], rtol=1e-5, atol=1e-6)
    assert np.abs(params[0] - params[2]).max() > 1e-3


def test_training_follows_the_shared_schedule():
    # with zero gradients AdamW's update is the weight decay alone: p ← p·(1 − lr_s·wd), so the parameters
    # after each step reveal the learning rate the jitted step read
    class Zero(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((V,)))

        def __call__(self, ids):
            return jnp.zeros(ids.shape + (V,)) + 0.0 * jax.lax.stop_gradient(self.w[...])

    rng = np.random.default_rng(5)
    chunks = _chunks(rng)
    lrs = warmup_cosine_lr(5, lr=0.1, warmup_steps=2, min_lr_ratio=0.2)
    m = Zero()
    seen = []
    train_reference_model(m, chunks, steps=5, batch_size=2, lr=0.1, warmup_steps=2, min_lr_ratio=0.2,
                          weight_decay=0.5, grad_clip=None, callback=lambda s, l: seen.append(float(m.w[...][0])))
    want = np.cumprod(1 - lrs * 0.5)
    np.testing.assert_allclose(seen, want, rtol=1e-6)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    rng = np.random.default_rng(6)
    chunks = _chunks(rng, n=9)
    ids = rng.permutation(1000)[:9]
    model = _model(seed=2)
    store = score_chunks(model, chunks, ids, str(tmp_path_factory.mktemp("ref")), batch_size=4)
    return model, chunks, ids, store


def test_loader_feeds_excess_loss_like_a_hand_made_reference(scored):
    model, chunks, ids, store = scored
    order = np.array([5, 0, 8, 3, 1, 7])
    cfg = dict(scoring="excess", warmup_steps=0, min_tokens_ratio=0.3)
    for j, b in enumerate(reference_loader(chunks, ids, store, 3, order=order, device=jax.devices("cpu")[0])):
        pos = order[3 * j:3 * j + 3]
        assert isinstance(b.input_ids, jax.Array) and b.input_ids.dtype == jnp.int32
        assert b.reference_nll.dtype == jnp.float32 and b.reference_nll.shape == (3, T)
        assert isinstance(b.chunk_ids, np.ndarray)
        np.testing.assert_array_equal(b.chunk_ids, ids[pos])
        hand = store.token_nll[np.searchsorted(store.chunk_ids, ids[pos])].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(b.reference_nll), hand)
        np.testing.assert_array_equal(np.asarray(b.input_ids), chunks[pos, :-1])
        np.testing.assert_array_equal(np.asarray(b.labels), chunks[pos, 1:])
        logits = model_logits(model, b.input_ids)
        loss_a, met_a = cggr_loss(logits, b.labels, 0, reference_nll=b.reference_nll, **cfg)
        loss_b, met_b = cggr_loss(logits, jnp.asarray(chunks[pos, 1:], jnp.int32), 0,
                                  reference_nll=jnp.asarray(hand), **cfg)
        assert float(loss_a) == float(loss_b)
        for key in met_a:
            np.testing.assert_array_equal(np.asarray(met_a[key]), np.asarray(met_b[key]))
        assert int(met_a["tokens_total"]) == 3 * T
        assert abs(float(met_a["avg_difficulty"])) < 5e-3  # learner = reference: excess ≈ fp16 rounding


def test_labels_layout_shifts_to_the_targets_layout(scored):
    model, chunks, ids, store = scored
    tb = next(reference_loader(chunks, ids, store, 4))
    lb = next(reference_loader(chunks, ids, store, 4, layout="labels"))
    assert lb.labels.shape == (4, T + 1) and bool(jnp.isnan(lb.reference_nll[:, 0]).all())
    logits, labels = shift_for_causal_lm(model(lb.input_ids), lb.labels)
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(tb.labels))
    np.testing.assert_array_equal(np.asarray(lb.reference_nll[:, 1:]), np.asarray(tb.reference_nll))
    loss, met = cggr_loss(logits, labels, 0, reference_nll=lb.reference_nll[:, 1:], scoring="excess")
    assert np.isfinite(float(loss)) and int(met["tokens_total"]) == 4 * T


def test_bad_input_names_the_argument(scored, tmp_path):
    model, chunks, ids, store = scored
    d = str(tmp_path / "bad")
    cases = [
        (lambda: score_chunks(model, chunks[0], ids[:1], d), "^chunks: expected a 2-D"),
        (lambda: score_chunks(model, chunks.astype(np.float32), ids, d), "^chunks: expected integer"),
        (lambda: score_chunks(model, chunks, ids[:-1], d), r"^chunk_ids: expected a \(9,\)"),
        (lambda: score_chunks(model, chunks + V, ids, d), r"^chunks: token ids must lie in \[0, 17\)"),
        (lambda: score_chunks(model, chunks, ids, d, batch_size=0), "^batch_size:"),
        (lambda: score_chunks(lambda x: x, chunks, ids, d), "^model: expected a Flax NNX module"),
        (lambda: train_reference_model(model, chunks, steps=0, batch_size=2, lr=1e-3), "^steps:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=True, lr=1e-3), "^batch_size:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=float("nan")), "^lr:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=1e-3, grad_clip=0.0),
         "^grad_clip:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=1e-3, callback=3), "^callback:"),
        (lambda: next(reference_loader(chunks[:, :-1], ids, store, 2)), r"^chunks: expected shape \(n, 11\)"),
        (lambda: reference_loader(chunks, ids[:4], store, 2), r"^chunk_ids: expected shape \(9,\)"),
        (lambda: reference_loader(chunks, ids + 5000, store, 2), r"^chunk_ids: chunk ids not in the reference"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


class DropLM(nnx.Module):
    """A module with dropout: scoring must switch it off, training must use it."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(V, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, V, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.dropout(self.embed(ids)))


def test_dropout_off_when_scoring_on_when_training(tmp_path):
    rng = np.random.default_rng(8)
    chunks = _chunks(rng, n=4)
    model = DropLM()
    a = score_chunks(model, chunks, np.arange(4), str(tmp_path / "a"), batch_size=4).token_nll
    b = score_chunks(model, chunks, np.arange(4), str(tmp_path / "b"), batch_size=4).token_nll
    np.testing.assert_array_equal(a, b)
    assert model.dropout.deterministic is False  # the caller's mode is kept
    logits = model_logits(nnx.view(model, deterministic=True), jnp.asarray(chunks[:, :-1].astype(np.int32)))
    np.testing.assert_allclose(a.astype(np.float32), token_nll(logits, jnp.asarray(chunks[:, 1:], jnp.int32)),
                               rtol=2 ** -10)
    train_reference_model(model, chunks, steps=2, batch_size=2, lr=1e-2)
    assert model.dropout.deterministic is True  # returned in eval mode


def test_one_trace_per_training_run_and_per_scoring_run(tmp_path):
    traces = []

    class Counting(nnx.Module):
        def __init__(self):
            self.table = nnx.Param(jnp.zeros((V, V)))

        def __call__(self, ids):
            traces.append(ids.shape)  # a Python side effect: runs once per trace
            return self.table[...][ids]

    rng = np.random.default_rng(10)
    chunks = _chunks(rng, n=7)
    m = Counting()
    train_reference_model(m, chunks, steps=6, batch_size=3, lr=1e-2)
    assert traces == [(1, 1), (3, T)]  # the vocabulary probe (shapes only), then one trace of the step
    traces.clear()
    score_chunks(m, chunks, np.arange(7), str(tmp_path / "s"), batch_size=3)  # 3 batches, the last one padded
    assert traces == [(1, 1), (3, T)]
