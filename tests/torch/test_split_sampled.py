"""Sequence-level ``selection='sampled'`` (SPEC §9.2) of ``CGGRModel``: the kept sequences and their weights
against the float64 oracle (``tests.oracle.sample_sequences``, the §7.4 rule on the sequence difficulties),
the Horvitz–Thompson loss against an independent float64 computation (``tests.oracle.sampled_sequence_loss``),
unbiasedness over many steps, padding / ignore_index / all-ignored batches, ``excess`` + ``sampled``, bad input."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cggr import CGGRConfig
from cggr_torch.batch_split import CGGRModel
from tests import oracle
from tests.torch import as_f64, random_logits, random_targets
from tests.torch.test_router import FixedRouter

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE = dict(sample_power=1.5, sample_uniform_mix=0.2, sample_floor=1e-6, sample_seed=7)


class LogitsLM(nn.Module):
    """A row-independent causal LM (embedding + head) that returns logits and no loss when given no labels, as a
    Hugging Face model does; records what it receives."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.calls.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
        return SimpleNamespace(loss=None, logits=self.head(self.emb(input_ids)))


def _case(seed: int, dtype: torch.dtype, B: int = 9, T: int = 7, Vs: int = 11, ignore_index: int = -100):
    """Odd B/T; right padding (row 1), left padding (row 2), an all-padding row (4), a non-finite router entry
    (0, 1) and an all-ignored row (6)."""
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (B, T, Vs), dtype)
    labels = random_targets(rng, (B, T), Vs, ignore_index=ignore_index)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 3:] = 0
    am[2, :2] = 0
    am[4, :] = 0
    labels[6, :] = ignore_index
    logits[0, 1, 2] = float("nan")
    ids = torch.from_numpy(rng.integers(0, Vs, (B, T)))
    return ids, logits, labels, am


def _oracle_draw(sel, step: int, **sample):
    """The oracle's draw on the implementation's own (float32) sequence difficulties and ratio."""
    s = {k.removeprefix("sample_"): v for k, v in sample.items()}
    return oracle.sample_sequences(sel.difficulty.double().numpy(), sel.eligible.numpy(), np.float32(sel.ratio),
                                   step, s["seed"], s["power"], s["uniform_mix"], s["floor"])


def _assert_same_draw(kept_mask: np.ndarray, mask_o, pi, u):
    """Equal inclusions, except where ``u`` lies within the π tolerance of SPEC §11 (float32 vs float64 π)."""
    diff = kept_mask != mask_o
    assert np.all(np.abs(u[diff] - pi[diff]) <= oracle.PI_RTOL * pi[diff] + 1e-7), (kept_mask, mask_o)
    return diff


def _full_logits(lm: LogitsLM, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return as_f64(lm.head(lm.emb(ids)))


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("seed", [0, 1])
def test_kept_sequences_weights_and_loss_match_the_oracle(dtype, seed):
    ids, logits, labels, am = _case(seed, DT[dtype])
    lm = LogitsLM(11, seed)
    model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", warmup_steps=0, min_tokens_ratio=0.4,
                      **SAMPLE)
    # the sequence difficulties follow SPEC §9 (checked against the oracle once; the draw uses the model's own)
    sel = model.select(ids, labels, am)
    o = oracle.select_sequences(as_f64(logits), labels.numpy(), float(sel.ratio), attention_mask=am.numpy())
    e = o["sequence_eligible"]
    np.testing.assert_array_equal(sel.eligible.numpy(), e)
    assert not e[4] and not e[6]                                     # all-padding, all-ignored
    np.testing.assert_allclose(sel.difficulty.numpy()[e], o["sequence_difficulty"][e], atol=oracle.SCORE_PARITY_ATOL,
                               rtol=oracle.SCORE_PARITY_RTOL)
    full = _full_logits(lm, ids)
    seen = set()
    for step in range(6):
        sel = model.select(ids, labels, am)
        mask_o, w_o, k_o, pi, u = _oracle_draw(sel, step, **SAMPLE)
        assert int(sel.k) == k_o                                      # the expected count k_seq of §5.3
        np.testing.assert_allclose(pi.sum(), k_o, rtol=1e-9)
        out = model.forward_with(lm, ids, labels, am)
        kept = np.zeros(len(e), bool)
        kept[out.kept.numpy()] = True
        np.testing.assert_array_equal(kept, sel.mask.numpy())        # select() is forward's draw
        if _assert_same_draw(kept, mask_o, pi, u).any():
            continue
        seen.add(int(kept.sum()))
        assert lm.calls[-1]["labels"] is None                         # the model's own loss is not used
        ref = oracle.sampled_sequence_loss(full, labels.numpy(), w_o, e, attention_mask=am.numpy())
        np.testing.assert_allclose(out.loss.item(), ref["loss"], rtol=2e-5, atol=1e-6)
        assert out.outputs.loss is out.loss             # handed back in the model's output
        m = model.get_metrics()
        assert m["sequences_selected"] == int(kept.sum()) and m["selection"] == "sampled"
        np.testing.assert_allclose(m["sample_ess"], oracle.sample_ess(w_o), rtol=1e-5)
        valid = (labels.numpy()[:, 1:] != -100) & (am.numpy()[:, 1:] != 0)
        assert m["tokens_selected"] == int(valid[kept].sum())
        model.step()
    assert len(seen) >= 2                                             # the realised count varies with the step


def test_gradient_is_that_of_the_weighted_sum():
    """∂loss/∂θ of the HT loss = that of Σ_b ω_b Σ_t ce_{b,t} written independently (float64 autograd)."""
    ids, logits, labels, am = _case(3, torch.float32)
    lm = LogitsLM(11, 3)
    model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", warmup_steps=0, min_tokens_ratio=0.5,
                      **SAMPLE)
    sel = model.select(ids, labels, am)
    mask_o, w_o, _, pi, u = _oracle_draw(sel, 0, **SAMPLE)
    out = model.forward_with(lm, ids, labels, am)
    kept = np.zeros(len(w_o), bool)
    kept[out.kept.numpy()] = True
    assert not _assert_same_draw(kept, mask_o, pi, u).any() and kept.any()
    out.loss.backward()
    got = [p.grad.clone() for p in lm.parameters()]
    lm64 = LogitsLM(11, 3).double()
    lm64.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
    z = lm64.head(lm64.emb(ids))[:, :-1]
    y = labels.clone()
    y[am == 0] = -100
    y = y[:, 1:]
    ce = nn.functional.cross_entropy(z.reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="none")
    n_tok = int(((y != -100) & sel.eligible[:, None]).sum())
    ref = (ce.reshape(y.shape).sum(1) * torch.from_numpy(w_o)).sum() / n_tok
    ref.backward()
    for g, p in zip(got, lm64.parameters()):
        np.testing.assert_allclose(g.numpy(), p.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.loss.item(), ref.item(), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 5])
def test_loss_is_unbiased_over_steps(seed):
    """E[loss] over the draws = the mean token CE of the eligible sequences (tolerance from the HT variance
    Σ_b (1 − π_b)/π_b · (S_b / N_tok)², S_b a sequence's summed CE)."""
    ids, logits, labels, am = _case(10 + seed, torch.float32, B=8)
    lm = LogitsLM(11, seed)
    sample = dict(SAMPLE, sample_seed=seed)
    model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", warmup_steps=0, min_tokens_ratio=0.3,
                      dynamic_threshold=False, **sample)
    sel = model.select(ids, labels, am)
    _, _, _, pi, _ = _oracle_draw(sel, 0, **sample)
    e = sel.eligible.numpy()
    ref = oracle.sampled_sequence_loss(_full_logits(lm, ids), labels.numpy(), np.zeros(len(e)), e,
                                       attention_mask=am.numpy())
    y = ref["row_ce"] / ref["n_tok"]
    var = float(np.sum(np.where(e & (pi > 0), (1 - pi) / np.where(pi > 0, pi, 1) * y * y, 0.0)))
    assert var > 0 and np.all(pi[e] > 0) and np.all(pi[e] < 1 + 1e-12)
    S = 300
    losses = []
    with torch.no_grad():
        for _ in range(S):
            losses.append(float(model(ids, labels, am)))
            model.step()
    assert abs(np.mean(losses) - ref["full_mean"]) <= 5 * np.sqrt(var / S) + 1e-5
    # and the spread is the HT one (not, e.g., an unweighted mean's)
    assert 0.5 * var <= np.var(losses) <= 2.0 * var


def test_all_ignored_batch_and_custom_ignore_index():
    ids, logits, labels, am = _case(4, torch.float32, ignore_index=-1)
    lm = LogitsLM(11)
    model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", warmup_steps=0, min_tokens_ratio=0.5,
                      ignore_index=-1, **SAMPLE)
    out = model.forward_with(lm, ids, labels, am)
    sel_e = model.select(ids, labels, am).eligible.numpy()
    assert not sel_e[4] and not sel_e[6] and out.kept.numel() > 0
    assert np.isfinite(out.loss.item())
    # every target ignored: nothing eligible, loss 0 with zero gradients, no model call, ESS 0
    calls = len(lm.calls)
    loss = model(ids, torch.full_like(labels, -1), am)
    loss.backward()
    assert loss.item() == 0.0 and len(lm.calls) == calls
    assert all(p.grad is None or not p.grad.any() for p in lm.parameters())
    m = model.get_metrics()
    assert m["sequences_selected"] == 0 and m["sequences_total"] == 0 and m["sample_ess"] == 0.0


def test_excess_and_sampled_together():
    """SPEC §9.1 + §9.2: D_b from the reference, then the draw; per sequence reference with a NaN."""
    ids, logits, labels, am = _case(8, torch.float32)
    ref = torch.from_numpy(np.random.default_rng(8).uniform(0.5, 3.0, 9))
    ref[3] = float("nan")
    lm = LogitsLM(11)
    model = CGGRModel(lm, router=FixedRouter(logits), selection="sampled", scoring="excess", warmup_steps=0,
                      min_tokens_ratio=0.5, **SAMPLE)
    sel = model.select(ids, labels, am, reference_nll=ref)
    o = oracle.select_sequences_excess(as_f64(logits), labels.numpy(), float(sel.ratio), ref.numpy(),
                                       attention_mask=am.numpy())
    e = o["sequence_eligible"]
    assert not e[3]
    np.testing.assert_array_equal(sel.eligible.numpy(), e)
    np.testing.assert_allclose(sel.difficulty.numpy()[e], o["sequence_difficulty"][e], atol=oracle.SCORE_PARITY_ATOL)
    mask_o, w_o, _, pi, u = _oracle_draw(sel, 0, **SAMPLE)
    out = model.forward_with(lm, ids, labels, am, reference_nll=ref)
    kept = np.zeros(9, bool)
    kept[out.kept.numpy()] = True
    assert not kept[3]
    if not _assert_same_draw(kept, mask_o, pi, u).any():
        r = oracle.sampled_sequence_loss(_full_logits(lm, ids), labels.numpy(), w_o, e, attention_mask=am.numpy())
        np.testing.assert_allclose(out.loss.item(), r["loss"], rtol=2e-5, atol=1e-6)


def test_hugging_face_model_gets_no_labels_and_its_output_carries_the_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16, vocab_size=31)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = CGGRModel(hf, selection="sampled", router_layers=1, warmup_steps=0, min_tokens_ratio=0.5, **SAMPLE)
    ids = torch.randint(0, 31, (5, 6))
    am = torch.ones_like(ids)
    am[0, 4:] = 0
    sel = model.select(ids, ids, am)
    mask_o, w_o, _, pi, u = _oracle_draw(sel, 0, **SAMPLE)
    out = model.forward_with(hf, ids, ids, am)
    kept = np.zeros(5, bool)
    kept[out.kept.numpy()] = True
    assert kept.any()
    assert out.outputs.loss is out.loss
    if not _assert_same_draw(kept, mask_o, pi, u).any():
        k = out.kept
        with torch.no_grad():
            z = as_f64(hf(input_ids=ids[k], attention_mask=am[k]).logits)
        full = np.zeros((5,) + z.shape[1:])
        full[kept] = z
        r = oracle.sampled_sequence_loss(full, ids.numpy(), w_o, sel.eligible.numpy(), attention_mask=am.numpy())
        np.testing.assert_allclose(out.loss.item(), r["loss"], rtol=2e-5, atol=1e-6)


def test_bad_input():
    logits = torch.zeros(2, 3, 5)
    lm = LogitsLM(5)
    for field, bad in [("sample_power", -1.0), ("sample_uniform_mix", 1.5), ("sample_floor", 0.0),
                       ("sample_seed", -1)]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            CGGRModel(lm, router=FixedRouter(logits), selection="sampled", **{field: bad})
    with pytest.raises(ValueError, match="selects whole sequences"):
        CGGRModel(lm, router=FixedRouter(logits), selection="stratified")
    with pytest.raises(ValueError, match="config: pass either"):
        CGGRModel(lm, router=FixedRouter(logits), config=CGGRConfig(selection="sampled"), sample_seed=3)

    class LossOnly(nn.Module):     # a model that returns a loss and no logits cannot be weighted per sequence
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask=None, labels=None):
            return {"loss": self.w * 1.0}

    model = CGGRModel(LossOnly(), router=FixedRouter(torch.randn(3, 4, 5)), selection="sampled", warmup_steps=0,
                      min_tokens_ratio=1.0)
    with pytest.raises(ValueError, match="sampled.*logits"):
        model(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
