"""Batch splitting with a reference (SPEC §9.1): ``CGGRModel(scoring="excess")`` and ``select_sequences`` with
``reference_nll`` per token ``(B, T)`` (aligned like the unshifted labels) or per sequence ``(B,)``, against the
float64 oracle (``tests.oracle.select_sequences_excess``) and an independent NumPy re-computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from cggr_torch.batch_split import CGGRModel, select_sequences  # noqa: E402
from cggr_torch.scorer import CGGRScorer  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import as_f64, random_logits, random_targets  # noqa: E402
from tests.torch.test_cggr_model import RecordingLM  # noqa: E402
from tests.torch.test_router import V, FixedRouter, tiny_model  # noqa: E402

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMS = ("token", "sequence")


def _case(seed: int, dtype: torch.dtype, B: int = 7, T: int = 9, Vs: int = 11, ignore_index: int = -100):
    """Odd B/T; right padding (row 1), left padding (row 2), an all-padding row (4), a non-finite router row
    (0, 1) and an all non-finite row (5); ignored labels at random."""
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (B, T, Vs), dtype)
    labels = random_targets(rng, (B, T), Vs, ignore_index=ignore_index)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 4:] = 0
    am[2, :3] = 0
    am[4, :] = 0
    logits[0, 1, 2] = float("nan")
    logits[5, :, 0] = float("inf")
    return rng, logits, labels, am


def _reference(rng, labels, am, form: str, ignore_index: int = -100, nonfinite: bool = True,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, T = labels.shape
    if form == "sequence":
        ref = torch.from_numpy(rng.uniform(0.5, 3.0, B)).to(dtype)
        if nonfinite:
            ref[3] = float("nan")       # sequence 3 is then not eligible, its valid tokens counted non-finite
            ref[6] = float("inf")
        return ref
    ref = torch.from_numpy(rng.uniform(0.0, 3.0, (B, T))).to(dtype)
    if nonfinite:
        ref[:, 0] = float("nan")        # position 0 is never read (shifted like the labels)
        ref[3, 4] = float("inf")        # non-finite at (likely) valid targets: not eligible, counted
        ref[6, 2] = float("nan")
        ref[6, 5] = float("-inf")
        # a NaN under an ignored / padding target is never read and never counted
        ref[(labels == ignore_index) | (am == 0)] = float("nan")
        ref[0, 2] = float("nan")        # labels[0, 2] is predicted by the NaN router row (0, 1): counted once
    return ref


def _numpy_sequences(logits, labels, am, ref, ignore_index=-100, shift=True):
    """An independent float64 re-computation (plain NumPy loops, not the oracle's helper)."""
    z = as_f64(logits)
    y = labels.numpy().copy()
    y[am.numpy() == 0] = ignore_index
    r = ref.double().numpy()
    B, T, _ = z.shape
    seq_d, seq_ok = np.zeros(B), np.zeros(B, bool)
    nonfinite = 0
    for b in range(B):
        vals = []
        for t in range(T - 1 if shift else T):
            tgt = y[b, t + 1] if shift else y[b, t]
            if tgt == ignore_index:
                continue
            row = z[b, t]
            rr = r[b] if r.ndim == 1 else (r[b, t + 1] if shift else r[b, t])
            if not np.all(np.isfinite(row)) or not math.isfinite(rr):
                nonfinite += 1
                continue
            m = row.max()
            nll = m + math.log(np.exp(row - m).sum()) - row[tgt]
            vals.append(nll if r.ndim == 1 else nll - rr)
        if vals:
            seq_ok[b] = True
            seq_d[b] = np.mean(vals) - (r[b] if r.ndim == 1 else 0.0)
    return seq_d, seq_ok, nonfinite


def _band_equal(mask, other, d, k):
    """Masks equal except for sequences within SPEC §11's band of the cut-off."""
    diff = mask != other
    if diff.any():
        cut = np.sort(d[mask | other])[::-1][k - 1]
        assert np.all(np.abs(d[diff] - cut) <= 2 * oracle.SCORE_PARITY_ATOL)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("form", FORMS)
def test_kept_sequences_match_the_oracle(form, dtype):
    rng, logits, labels, am = _case(3 + FORMS.index(form), DT[dtype])
    ref = _reference(rng, labels, am, form)
    model = RecordingLM(11)
    cggr = CGGRModel(model, FixedRouter(logits), scoring="excess", min_tokens_ratio=0.4, warmup_steps=0)
    ids = torch.randint(0, 11, labels.shape)
    res = cggr.forward_with(model, ids, labels, am, reference_nll=ref)
    m = cggr.get_metrics()
    ratio = np.float32(m["effective_ratio"])
    assert ratio == oracle.dynamic_ratio(np.float32(0.4), m["avg_confidence"], 0.5)
    o = oracle.select_sequences_excess(as_f64(logits), labels.numpy(), ratio, ref.double().numpy(),
                                       attention_mask=am.numpy())
    ok = o["sequence_eligible"]
    np.testing.assert_array_equal(res.sequence_eligible.numpy(), ok)
    assert not ok[4] and not ok[5] and (form == "token" or not ok[3] and not ok[6])
    # SPEC §11 excess bound: 3e-4 + 1e-5·|d| + 1e-5·|nll|; nll ≤ ~20 here
    np.testing.assert_allclose(res.sequence_difficulty.numpy()[ok], o["sequence_difficulty"][ok], atol=6e-4,
                               rtol=1e-5)
    # the independent NumPy re-computation agrees on eligibility, D_b and the non-finite count
    nd, nok, nnf = _numpy_sequences(logits, labels, am, ref)
    np.testing.assert_array_equal(nok, ok)
    np.testing.assert_allclose(res.sequence_difficulty.numpy()[ok], nd[ok], atol=6e-4, rtol=1e-5)
    # selection: exact given the package's own D (parity level 1), the oracle's own D within the band
    mask_o, k_o = oracle.select_tokens(res.sequence_difficulty.double().numpy(), ok, ratio, "topk")
    np.testing.assert_array_equal(res.kept.numpy(), np.flatnonzero(mask_o))
    assert k_o == o["k"] == m["sequences_selected"] and m["sequences_total"] == int(ok.sum())
    _band_equal(mask_o, o["mask"], o["sequence_difficulty"], k_o)
    sc = o["scores"]
    assert m["tokens_total"] == int(sc["eligible"].sum())
    assert m["tokens_nonfinite"] == int(sc["nonfinite"].sum()) == nnf
    assert m["avg_difficulty"] == pytest.approx(float(sc["difficulty"][sc["eligible"]].mean()), abs=6e-4)
    assert m["avg_confidence"] == pytest.approx(float(sc["stats"]["confidence"][sc["eligible"]].mean()), abs=1e-5)
    # the reference never reaches the main model; the kept rows do
    call = model.calls[-1]
    assert "reference_nll" not in call
    torch.testing.assert_close(call["input_ids"], ids[res.kept])
    # the functional form gives the same at the same ratio; select() the same without a main pass
    sel = select_sequences(logits, labels, am, ratio=torch.tensor(ratio), scoring="excess", reference_nll=ref)
    assert torch.equal(sel.mask, torch.from_numpy(mask_o)) and int(sel.k) == k_o
    torch.testing.assert_close(sel.difficulty, res.sequence_difficulty, atol=0, rtol=0)
    s2 = cggr.select(ids, labels, am, reference_nll=ref)
    assert torch.equal(torch.nonzero(s2.mask).reshape(-1), res.kept)


@pytest.mark.parametrize("form", FORMS)
def test_half_and_double_references_are_rounded_like_spec_3_1(form):
    rng, logits, labels, am = _case(21, torch.float32)
    ref64 = _reference(rng, labels, am, form, dtype=torch.float64)
    res = {}
    for name, r in (("f64", ref64), ("f32", ref64.to(torch.float32)), ("bf16", ref64.to(torch.bfloat16)),
                    ("bf16_as_f32", ref64.to(torch.bfloat16).to(torch.float32))):
        res[name] = select_sequences(logits, labels, am, ratio=0.5, scoring="excess", reference_nll=r)
    # float64 rounds to nearest float32 first; bfloat16 widens exactly: bit-identical results
    for a, b in (("f64", "f32"), ("bf16", "bf16_as_f32")):
        assert torch.equal(res[a].difficulty, res[b].difficulty) and torch.equal(res[a].mask, res[b].mask)


def test_ignore_index_and_masked_lm_alignment():
    # a custom ignore_index; shift=False (masked LM): reference_nll[b, t] belongs to labels[b, t]
    rng, logits, labels, am = _case(8, torch.float32, ignore_index=-1)
    ref = _reference(rng, labels, am, "token", ignore_index=-1)
    ref[:, 0] = torch.from_numpy(rng.uniform(0, 3, labels.shape[0])).float()   # read without shifting
    ref[0, 0] = float("nan")
    model = RecordingLM(11)
    for shift in (True, False):
        cggr = CGGRModel(model, FixedRouter(logits), scoring="excess", min_tokens_ratio=0.5, warmup_steps=0,
                         ignore_index=-1, shift_labels=shift, dynamic_threshold=False)
        res = cggr.forward_with(model, torch.zeros_like(labels), labels, am, reference_nll=ref)
        o = oracle.select_sequences_excess(as_f64(logits), labels.numpy(), np.float32(0.5), ref.double().numpy(),
                                           ignore_index=-1, attention_mask=am.numpy(), shift=shift)
        nd, nok, nnf = _numpy_sequences(logits, labels, am, ref, ignore_index=-1, shift=shift)
        np.testing.assert_array_equal(res.sequence_eligible.numpy(), o["sequence_eligible"])
        np.testing.assert_array_equal(nok, o["sequence_eligible"])
        ok = nok
        np.testing.assert_allclose(res.sequence_difficulty.numpy()[ok], nd[ok], atol=6e-4, rtol=1e-5)
        np.testing.assert_allclose(o["sequence_difficulty"][ok], nd[ok], atol=1e-5, rtol=1e-6)
        assert cggr.get_metrics()["tokens_nonfinite"] == nnf == int(o["scores"]["nonfinite"].sum())


def test_per_token_and_per_sequence_forms_agree():
    """A per-sequence reference equal to the per-token reference's mean over the eligible tokens gives the same
    D_b (mean(nll − ref) = mean(nll) − mean(ref)) and the same kept sequences."""
    rng, logits, labels, am = _case(5, torch.float32)
    ref_tok = _reference(rng, labels, am, "token", nonfinite=False)
    tok = select_sequences(logits, labels, am, ratio=0.45, scoring="excess", reference_nll=ref_tok)
    elig = tok.token_scores.eligible               # input positions: column t predicts labels[:, t + 1]
    shifted = torch.cat([ref_tok[:, 1:], torch.zeros(ref_tok.shape[0], 1)], 1).double()
    per_seq = torch.where(elig, shifted, 0.0).sum(1) / elig.sum(1).clamp(min=1)
    seq = select_sequences(logits, labels, am, ratio=0.45, scoring="excess", reference_nll=per_seq)
    assert torch.equal(tok.eligible, seq.eligible) and int(tok.k) == int(seq.k)
    ok = tok.eligible
    torch.testing.assert_close(tok.difficulty[ok], seq.difficulty[ok], atol=2e-5, rtol=1e-5)
    _band_equal(tok.mask.numpy(), seq.mask.numpy(), tok.difficulty.double().numpy(), int(tok.k))
    assert torch.equal(tok.token_scores.eligible, seq.token_scores.eligible)


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    model = tiny_model("llama")
    cggr = CGGRModel(model, router_layers=1, scoring="excess", warmup_steps=0)
    ids = torch.randint(3, V, (3, 7))
    for ref in (torch.rand(3, 7), torch.rand(3)):
        loss = cggr(ids, labels=torch.full_like(ids, -100), reference_nll=ref)
        assert loss.dtype == torch.float32 and float(loss.detach()) == 0.0 and loss.requires_grad
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        m = cggr.get_metrics()
        assert m["sequences_selected"] == 0 and m["tokens_total"] == 0 and m["tokens_nonfinite"] == 0
    # every reference non-finite: nothing is eligible either, every valid token is counted
    loss = cggr(ids, labels=ids, reference_nll=torch.full((3,), float("nan")))
    assert float(loss.detach()) == 0.0 and cggr.last_kept.numel() == 0
    assert cggr.get_metrics()["tokens_nonfinite"] == 3 * 6


@pytest.mark.parametrize("form", FORMS)
def test_fused_and_logits_router_paths_agree_and_the_loss_is_the_kept_rows(form):
    model = tiny_model("llama")
    fused = CGGRModel(model, router_layers=2, scoring="excess", warmup_steps=0, min_tokens_ratio=0.5)
    plain = CGGRModel(model, router_layers=2, scoring="excess", warmup_steps=0, min_tokens_ratio=0.5,
                      router_path="logits")
    chunked = CGGRModel(model, router_layers=2, scoring="excess", warmup_steps=0, min_tokens_ratio=0.5,
                        router_batch_size=2)
    assert fused.get_metrics()["router_path"] == "fused"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (5, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    am[3, :2] = 0
    ref = torch.rand((5, 9) if form == "token" else (5,), generator=g) * 4.0
    res = {n: c.forward_with(model, ids, ids, am, reference_nll=ref)
           for n, c in (("fused", fused), ("logits", plain), ("chunked", chunked))}
    for n in ("fused", "chunked"):
        assert torch.equal(res[n].kept, res["logits"].kept)
        torch.testing.assert_close(res[n].sequence_difficulty, res["logits"].sequence_difficulty, atol=6e-4,
                                   rtol=2e-5)
    # the router's own float64 D_b (the oracle on the router's logits)
    with torch.no_grad():
        rl = plain.router(ids, attention_mask=am)
    o = oracle.select_sequences_excess(as_f64(rl), ids.numpy(), np.float32(0.5), ref.double().numpy(),
                                       attention_mask=am.numpy())
    np.testing.assert_allclose(res["logits"].sequence_difficulty.numpy(), o["sequence_difficulty"], atol=6e-4,
                               rtol=1e-5)
    # the loss is the standard loss of the kept rows (the reference changes which rows, not the loss)
    kept = res["fused"].kept
    eff = ids.masked_fill(am == 0, -100)[kept]
    with torch.no_grad():
        want = model(input_ids=ids[kept], attention_mask=am[kept], labels=eff).loss
    torch.testing.assert_close(res["fused"].loss.detach(), want, atol=1e-6, rtol=1e-6)


def test_bad_reference_raises_naming_reference_nll():
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    model = RecordingLM(11)
    cggr = CGGRModel(model, FixedRouter(logits), scoring="excess")
    plain = CGGRModel(model, FixedRouter(logits))
    ids = torch.zeros_like(labels)
    calls = len(model.calls)
    cases = [
        (cggr, None, "reference_nll: scoring='excess' needs the reference model's loss"),
        (plain, torch.zeros(3, 6), "reference_nll: only scoring='excess' reads a reference loss; got one with "
                                   "scoring='combined'"),
        (cggr, torch.zeros(3, 5), r"reference_nll: expected shape \(B, T\) = \(3, 6\) .* or \(B,\) = \(3,\)"),
        (cggr, torch.zeros(6), "reference_nll: expected shape"),
        (cggr, torch.zeros(3, 1), "reference_nll: expected shape"),
        (cggr, torch.zeros(3, 6, 1), "reference_nll: expected shape"),
        (cggr, torch.zeros(3, dtype=torch.int64), "reference_nll: expected a floating dtype"),
        (cggr, torch.zeros(3, 6, dtype=torch.bool), "reference_nll: expected a floating dtype"),
        (cggr, [0.0, 1.0, 2.0], "reference_nll: expected a floating tensor"),
        (cggr, np.zeros(3, np.float32), "reference_nll: expected a floating tensor"),
    ]
    for c, ref, match in cases:
        with pytest.raises(ValueError, match=match):
            c(ids, labels=labels, reference_nll=ref)
        with pytest.raises(ValueError, match=match):
            c.select(ids, labels, reference_nll=ref)
        with pytest.raises(ValueError, match=match):
            select_sequences(logits, labels, ratio=0.5, scoring=c.scoring, reference_nll=ref)
    assert len(model.calls) == calls                 # nothing ran
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="reference_nll: expected device"):
            cggr(ids.cuda(), labels=labels.cuda(), reference_nll=torch.zeros(3))
    # the scorer's routing mask has no reference: it refuses at construction and says what to use instead
    with pytest.raises(ValueError, match="not supported by CGGRScorer .* CGGRModel\\(scoring='excess'\\)"):
        CGGRScorer(FixedRouter(logits), scoring="excess")


def datasets_or_rows(rows):
    """A ``datasets.Dataset`` when the library is installed (the Trainer filters the columns of those only),
    else the plain rows."""
    try:
        import datasets
    except ImportError:
        return rows
    return datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).with_format("torch")


def test_trainer_batches_carry_reference_nll_to_cggr_model(tmp_path):
    """The Hugging Face Trainer passes every batch key on: a reference_nll column reaches CGGRModel (with
    remove_unused_columns=False; the default drops columns the model's forward does not name, and CGGRModel then
    says so)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1 (the torch extra)")
    from transformers import TrainingArguments

    from cggr_torch.integrations import CGGRTrainer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        ids = torch.randint(3, V, (8,), generator=g)
        # per-sequence reference: the easy half (high reference loss) must never be kept at ratio 0.5
        rows.append({"input_ids": ids, "labels": ids.clone(),
                     "reference_nll": torch.tensor(100.0 if i % 2 else -100.0)})
    model = tiny_model("llama").train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, max_steps=3, remove_unused_columns=False)
    trainer = CGGRTrainer(model=model, args=args, train_dataset=rows,
                          cggr_kwargs=dict(router_layers=1, warmup_steps=0, min_tokens_ratio=0.5,
                                           dynamic_threshold=False, scoring="excess"))
    seen = []
    original = trainer.cggr.forward_with

    def spy(*a, **kw):
        out = original(*a, **kw)
        seen.append((kw.get("reference_nll"), out.kept))
        return out

    trainer.cggr.forward_with = spy
    trainer.train()
    assert len(seen) == 3
    for ref, kept in seen:
        assert ref is not None and ref.shape == (4,) and kept.numel() == 2
        # D_b = mean nll − ref_b: the sequences with the lower reference loss (−100) are kept first
        dropped = torch.ones(4, dtype=torch.bool)
        dropped[kept] = False
        assert ref[kept].max() <= ref[dropped].min()
    # The Trainer's default (remove_unused_columns=True) drops the columns the model's forward does not name;
    # CGGRTrainer / use_cggr keep reference_nll, and evaluation removes it before the model sees the batch.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, max_steps=1)
    trainer = CGGRTrainer(model=model, args=args, train_dataset=datasets_or_rows(rows), eval_dataset=rows[:4],
                          cggr_kwargs=dict(router_layers=1, scoring="excess"))
    seen.clear()
    trainer.cggr.forward_with = spy
    trainer.train()
    assert len(seen) == 1 and seen[0][0] is not None
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    # Without CGGR's Trainer switch the column is dropped, and CGGRModel says what to do.
    with pytest.raises(ValueError, match="reference_nll: .*remove_unused_columns=False"):
        trainer.cggr(rows[0]["input_ids"][None], labels=rows[0]["labels"][None])
