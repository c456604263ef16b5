"""cggr_torch.reference: train a reference model, score chunks once (cggr-reference-v1), load batches as tensors.

Scores are checked against an independent computation (``F.cross_entropy`` and a float64 NumPy log-softmax) on a
tiny Hugging Face Llama (V = 17) and a plain module; training against a toy learnable sequence; the loader's
alignment against ``CGGRLoss(scoring="excess")`` with the reference passed by hand; bad input against
``ValueError`` naming the argument. The example's ``--smoke`` mode runs here too (a couple of steps).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from cggr.reference import MissingChunkIds, chunks_sha256, load_reference  # noqa: E402
from cggr_torch import CGGRLoss, cggr_loss, shift_for_causal_lm  # noqa: E402
from cggr_torch.reference import (model_logits, model_meta, reference_loader, score_chunks,  # noqa: E402
                                  token_nll, train_reference_model)

ROOT = pathlib.Path(__file__).resolve().parents[2]
V, T = 17, 10


def _llama(seed: int = 0, vocab: int = V):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


class Bigram(torch.nn.Module):
    """A plain module returning logits (no Hugging Face output object)."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids):
        return self.emb(ids) * 3.0


class Pooled(Bigram):
    """Returns (B, V): not per-token logits."""

    def forward(self, ids):
        return self.emb(ids).sum(1)


def _chunks(rng, n=7, t=T, vocab=V):
    return rng.integers(0, vocab, size=(n, t + 1)).astype(np.uint16)


def _nll64(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(z, targets[..., None].astype(np.int64), -1)[..., 0]


# --------------------------------------------------------------------------------------------------------------
# token_nll and scoring
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_nll_matches_float64(dtype):
    rng = np.random.default_rng(1)
    z = torch.from_numpy((rng.standard_normal((3, 5, 29)) * 4).astype(np.float32)).to(dtype)
    t = torch.from_numpy(rng.integers(0, 29, (3, 5)))
    got = token_nll(z, t)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    want = _nll64(z.float().numpy(), t.numpy())  # half inputs are upcast exactly
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=1e-5)


def test_token_nll_nonfinite_rows():
    z = torch.zeros(1, 3, 4)
    z[0, 0, 1] = float("nan")
    z[0, 1, 2] = float("-inf")
    nll = token_nll(z, torch.tensor([[0, 2, 3]]))
    assert torch.isnan(nll[0, 0]) and torch.isposinf(nll[0, 1]) and torch.isfinite(nll[0, 2])


@pytest.mark.parametrize("factory", [_llama, Bigram], ids=["hf-llama", "plain-module"])
def test_scores_equal_cross_entropy(tmp_path, factory):
    rng = np.random.default_rng(2)
    model = factory()
    chunks = _chunks(rng)                      # 7 chunks, batch 3: a ragged last batch
    ids = np.array([90, 4, 17, 33, 2, 8, 61])  # unsorted on purpose
    store = score_chunks(model, chunks, ids, str(tmp_path / "ref"), batch_size=3, meta={"split": "toy"})
    with torch.no_grad():
        x = torch.from_numpy(chunks.astype(np.int64))
        logits = model_logits(model, x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none").reshape(7, T).numpy()
    got = store.token_nll_of(ids)              # float16 on disk, read back as float32
    assert store.token_nll.dtype == np.float16 and got.shape == (7, T)
    np.testing.assert_allclose(got, ce.astype(np.float16).astype(np.float32), rtol=2 ** -10, atol=0)
    np.testing.assert_allclose(got, _nll64(logits.numpy(), chunks[:, 1:]), rtol=2 ** -10, atol=1e-4)
    np.testing.assert_allclose(store.chunk_mean_of(ids), got.astype(np.float64).mean(1), rtol=1e-6)
    # the meta: the model, the data hash (dtype-independent), the caller's keys
    meta = load_reference(str(tmp_path / "ref")).meta
    assert meta["data_sha256"] == chunks_sha256(chunks.astype(np.int64), ids) == chunks_sha256(chunks, ids)
    assert meta["data_sha256"] != chunks_sha256(chunks[::-1], ids)
    assert meta["split"] == "toy" and meta["seq_len"] == T and meta["num_chunks"] == 7
    assert meta["model"] == model_meta(model) and meta["model"]["framework"] == "torch"
    if factory is _llama:
        assert meta["model"]["config"]["vocab_size"] == V


def test_score_keeps_the_mode_and_nonfinite_scores(tmp_path):
    model = Bigram()
    with torch.no_grad():
        model.emb.weight[3, 5] = float("-inf")    # predicting 5 after 3 is impossible: +inf NLL
        model.emb.weight[4, 0] = float("nan")     # a NaN row after token 4
    model.train()
    chunks = np.array([[3, 5, 4, 1], [1, 2, 3, 4]], np.int32)
    store = score_chunks(model, chunks, [0, 1], str(tmp_path / "r"), batch_size=2)
    assert model.training  # restored
    nll = store.token_nll_of([0, 1])
    assert np.isposinf(nll[0, 0]) and np.isnan(nll[0, 2]) and np.isfinite(nll[1]).all()
    assert np.isfinite(store.chunk_mean_of([0]))  # the mean is over the finite entries


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------

def _counting(rng, n, t=T, vocab=V):
    """Toy learnable chunks: each token is the previous one plus one (mod V)."""
    start = rng.integers(0, vocab, size=(n, 1))
    return ((start + np.arange(t + 1)) % vocab).astype(np.uint16)


def test_training_reduces_held_out_loss(tmp_path):
    rng = np.random.default_rng(3)
    train, held = _counting(rng, 32), _counting(rng, 8)
    model = _llama(seed=1)
    before = score_chunks(model, held, np.arange(8), str(tmp_path / "before")).chunk_mean.mean()
    losses = []
    out = train_reference_model(model, train, steps=40, batch_size=8, lr=1e-2, seed=0,
                                callback=lambda s, loss: losses.append(float(loss)))
    assert out is model and not model.training and len(losses) == 40
    after = score_chunks(model, held, np.arange(8), str(tmp_path / "after")).chunk_mean.mean()
    assert before > 2.5 and after < 0.5 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_training_is_deterministic_and_leaves_the_global_rng():
    rng = np.random.default_rng(4)
    train = _chunks(rng, n=12)

    def run(seed):
        model = _llama(seed=5)
        state = torch.get_rng_state()
        train_reference_model(model, train, steps=4, batch_size=3, lr=1e-2, seed=seed, warmup_steps=1)
        assert torch.equal(torch.get_rng_state(), state)  # trained inside a forked RNG
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_follows_the_shared_schedule():
    from cggr.reference import warmup_cosine_lr

    seen = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    real = torch.optim.AdamW
    torch.optim.AdamW = Spy
    try:
        train_reference_model(Bigram(), _chunks(np.random.default_rng(5)), steps=6, batch_size=2, lr=0.1,
                              warmup_steps=2, min_lr_ratio=0.2)
    finally:
        torch.optim.AdamW = real
    np.testing.assert_allclose(seen, warmup_cosine_lr(6, lr=0.1, warmup_steps=2, min_lr_ratio=0.2))
    np.testing.assert_allclose(seen, [0.05, 0.1, 0.1, 0.1 * (0.2 + 0.8 * 0.75), 0.1 * (0.2 + 0.8 * 0.25), 0.02])


# --------------------------------------------------------------------------------------------------------------
# the loader and CGGRLoss(scoring="excess")
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def scored(tmp_path):
    rng = np.random.default_rng(6)
    chunks = _chunks(rng, n=9)
    ids = rng.permutation(1000)[:9]
    model = _llama(seed=2)
    store = score_chunks(model, chunks, ids, str(tmp_path / "ref"), batch_size=4)
    return model, chunks, ids, store


def test_loader_feeds_excess_loss_like_a_hand_made_reference(scored):
    model, chunks, ids, store = scored
    order = np.array([5, 0, 8, 3, 1, 7])
    batches = list(reference_loader(chunks, ids, store, 3, order=order, device="cpu"))
    assert len(batches) == 2
    for j, b in enumerate(batches):
        pos = order[3 * j:3 * j + 3]
        assert isinstance(b.input_ids, torch.Tensor) and b.input_ids.dtype == torch.int64
        assert b.reference_nll.dtype == torch.float32 and b.reference_nll.shape == (3, T)
        np.testing.assert_array_equal(b.chunk_ids, ids[pos])
        # the reference by hand: the store's rows of these ids, float16 widened
        hand = store.token_nll[np.searchsorted(store.chunk_ids, ids[pos])].astype(np.float32)
        np.testing.assert_array_equal(b.reference_nll.numpy(), hand)
        rows = torch.from_numpy(chunks[pos].astype(np.int64))
        torch.testing.assert_close(b.input_ids, rows[:, :-1], rtol=0, atol=0)
        torch.testing.assert_close(b.labels, rows[:, 1:], rtol=0, atol=0)
        with torch.no_grad():
            logits = model(b.input_ids).logits
        crit_a, crit_b = (CGGRLoss(scoring="excess", warmup_steps=0, min_tokens_ratio=0.3) for _ in range(2))
        loss_a = crit_a(logits, b.labels, b.reference_nll)
        loss_b = crit_b(logits, rows[:, 1:], torch.from_numpy(hand))
        assert torch.equal(loss_a, loss_b) and crit_a.get_metrics() == crit_b.get_metrics()
        assert crit_a.get_metrics()["tokens_total"] == 3 * T
        # the reference is what the scorer computed: the learner = the reference gives excess ≈ 0
        loss, met = cggr_loss(logits, b.labels, 0, reference_nll=b.reference_nll, scoring="excess")
        assert abs(met["avg_difficulty"]) < 5e-3


def test_labels_layout_shifts_to_the_targets_layout(scored):
    model, chunks, ids, store = scored
    tb = next(reference_loader(chunks, ids, store, 4))
    lb = next(reference_loader(chunks, ids, store, 4, layout="labels"))
    assert lb.labels.shape == (4, T + 1) and lb.reference_nll.shape == (4, T + 1)
    assert torch.isnan(lb.reference_nll[:, 0]).all()
    with torch.no_grad():
        full = model(lb.input_ids).logits
    logits, labels = shift_for_causal_lm(full, lb.labels)
    assert torch.equal(labels, tb.labels) and torch.equal(lb.reference_nll[:, 1:], tb.reference_nll)
    loss, met = cggr_loss(logits, labels, 0, reference_nll=lb.reference_nll[:, 1:], scoring="excess")
    assert torch.isfinite(loss) and met["tokens_total"] == 4 * T


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument(scored, tmp_path):
    model, chunks, ids, store = scored
    d = str(tmp_path / "bad")
    cases = [
        (lambda: score_chunks(model, chunks[0], ids[:1], d), "^chunks: expected a 2-D"),
        (lambda: score_chunks(model, chunks[:, :1], ids, d), "^chunks: expected a 2-D"),
        (lambda: score_chunks(model, chunks.astype(np.float32), ids, d), "^chunks: expected integer"),
        (lambda: score_chunks(model, chunks, ids[:-1], d), r"^chunk_ids: expected a \(9,\)"),
        (lambda: score_chunks(model, chunks, np.zeros(9, int), d), "^chunk_ids: expected distinct"),
        (lambda: score_chunks(model, chunks + V, ids, d), r"^chunks: token ids must lie in \[0, 17\)"),
        (lambda: score_chunks(model, chunks, ids, d, batch_size=0), "^batch_size:"),
        (lambda: score_chunks(model, chunks, ids, d, meta=[1]), "^meta:"),
        (lambda: score_chunks(lambda x: x, chunks, ids, d), "^model: expected a torch.nn.Module"),
        (lambda: score_chunks(Pooled(), chunks, ids, d), r"^model: expected logits of shape \(1, 1, V\)"),
        (lambda: train_reference_model(model, chunks, steps=0, batch_size=2, lr=1e-3), "^steps:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=-1.0), "^lr:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=1e-3, min_lr_ratio=2),
         "^min_lr_ratio:"),
        (lambda: train_reference_model(model, chunks, steps=1, batch_size=2, lr=1e-3, betas=(0.9,)), "^betas:"),
        (lambda: train_reference_model(model, chunks[:0], steps=1, batch_size=2, lr=1e-3), "^chunks: expected at"),
        (lambda: train_reference_model(model, -chunks.astype(np.int64) - 1, steps=1, batch_size=2, lr=1e-3),
         "^chunks: token ids"),
        (lambda: next(reference_loader(chunks[:, :-1], ids, store, 2)), r"^chunks: expected shape \(n, 11\)"),
        (lambda: next(reference_loader(chunks, ids[:4], store, 2)), r"^chunk_ids: expected shape \(9,\)"),
        (lambda: next(reference_loader(chunks, ids, store, 2, order=[0, 9])), r"^order: positions"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # ids the store lacks: a ValueError naming chunk_ids (and a KeyError, as the store's lookup always was)
    with pytest.raises(ValueError, match=r"^chunk_ids: chunk ids not in the reference store: \[5000\]") as e:
        reference_loader(chunks, np.where(ids == ids[2], 5000, ids), store, 2)
    assert isinstance(e.value, (KeyError, MissingChunkIds))


def test_example_smoke(tmp_path):
    data = ROOT.parent / "shared" / "data" / "pycode"
    if not (data / "load.py").exists():
        pytest.skip("the pycode corpus is not present")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "reference_model.py"), "--smoke",
                           "--out", str(tmp_path / "store"), "--data", str(data)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean reference loss" in proc.stdout
    store = load_reference(str(tmp_path / "store"))
    assert store.meta["reference_split"] == "ref" and np.isfinite(store.chunk_mean).all()


class DropBigram(Bigram):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, ids):
        return self.drop(self.emb(ids)) * 3.0


def test_dropout_is_seeded_when_training_and_off_when_scoring(tmp_path):
    rng = np.random.default_rng(9)
    chunks = _chunks(rng, n=6)

    def run(seed):
        torch.manual_seed(0)
        model = DropBigram().train()
        state = torch.get_rng_state()
        train_reference_model(model, chunks, steps=3, batch_size=2, lr=0.1, seed=seed)
        assert torch.equal(torch.get_rng_state(), state) and not model.training
        return model

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.emb.weight, b.emb.weight) and not torch.equal(a.emb.weight, c.emb.weight)
    a.train()
    s1 = score_chunks(a, chunks, np.arange(6), str(tmp_path / "1")).token_nll
    s2 = score_chunks(a, chunks, np.arange(6), str(tmp_path / "2")).token_nll
    np.testing.assert_array_equal(s1, s2)
    assert a.training
