"""CGGRModel (batch splitting, SPEC §9) against the oracle and against independent float64 references."""
from __future__ import annotations

import io
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from cggr_torch.batch_split import MODEL_METRIC_KEYS, CGGRModel  # noqa: E402
from cggr_torch.router import create_truncated_router  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, random_logits, random_targets  # noqa: E402
from tests.torch.test_router import V, FixedRouter, tiny_model  # noqa: E402


class RecordingLM(nn.Module):
    """A minimal causal LM that records what it receives and returns the HF-convention loss
    (mean cross-entropy of logits[:, :-1] against labels[:, 1:], label -100 ignored)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.vocab = vocab
        self.calls: list[dict[str, Any]] = []

    def forward(self, input_ids, labels=None, attention_mask=None, **kwargs):
        self.calls.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **kwargs})
        logits = self.head(self.emb(input_ids))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def _case(seed: int, dtype: torch.dtype, B: int = 7, T: int = 9, Vs: int = 11, ignore_index: int = -100):
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (B, T, Vs), dtype)
    labels = random_targets(rng, (B, T), Vs, ignore_index=ignore_index)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 4:] = 0               # right padding
    am[4, :] = 0                    # an all-padding sequence: never eligible
    logits[0, 1, 2] = float("nan")  # a non-finite router row
    logits[5, :, 0] = float("inf")  # a sequence whose every router row is non-finite: not eligible
    return logits, labels, am


def _oracle_sequences(logits, labels, am, ratio, scoring, ignore_index, seq_d, seq_ok):
    """The oracle's scores (tolerance) and its selection given the package's own sequence difficulties (exact)."""
    ref = oracle.select_sequences(as_f64(logits), labels.numpy(), ratio, scoring, ignore_index, am.numpy())
    mask, k = oracle.select_tokens(seq_d.double().numpy(), seq_ok.numpy(), ratio, "topk")
    return ref, mask, k


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scoring", oracle.SCORING_MODES)
def test_sequence_selection_matches_the_oracle(dtype, scoring):
    ignore_index = -1 if scoring == "loss" else -100
    logits, labels, am = _case(11 + len(scoring), DTYPES[dtype], ignore_index=ignore_index)
    model = RecordingLM(11)
    cggr = CGGRModel(model, FixedRouter(logits), scoring=scoring, min_tokens_ratio=0.4, warmup_steps=0,
                     ignore_index=ignore_index)
    ids = torch.randint(0, 11, labels.shape)
    res = cggr.forward_with(model, ids, labels, am)
    m = cggr.get_metrics()
    ratio = m["effective_ratio"]
    # the ratio: SPEC §5.2 from the package's own mean confidence, bit for bit
    assert np.float32(ratio) == oracle.dynamic_ratio(np.float32(0.4), m["avg_confidence"], 0.5)
    ref, ref_mask, ref_k = _oracle_sequences(logits, labels, am, np.float32(ratio), scoring, ignore_index,
                                             res.sequence_difficulty, res.sequence_eligible)
    np.testing.assert_array_equal(res.sequence_eligible.numpy(), ref["sequence_eligible"])
    assert not res.sequence_eligible[4] and not res.sequence_eligible[5]
    ok = ref["sequence_eligible"]
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(res.sequence_difficulty.numpy()[ok], ref["sequence_difficulty"][ok], atol=atol,
                               rtol=rtol)
    kept = np.flatnonzero(ref_mask)
    np.testing.assert_array_equal(res.kept.numpy(), kept)
    assert m["sequences_selected"] == ref_k == len(kept)
    assert m["sequences_total"] == int(ok.sum())
    assert ref_k == oracle.num_selected(int(ok.sum()), ratio)
    # token-level metrics over the whole batch's eligible tokens
    sc = ref["scores"]
    assert m["tokens_total"] == int(sc["eligible"].sum())
    assert m["tokens_nonfinite"] == int(sc["nonfinite"].sum())
    assert m["avg_confidence"] == pytest.approx(sc["stats"]["confidence"][sc["eligible"]].mean(), abs=1e-5)
    assert m["avg_entropy"] == pytest.approx(sc["stats"]["entropy"][sc["eligible"]].mean(), abs=1e-4, rel=1e-5)
    assert set(m) == set(MODEL_METRIC_KEYS)
    # the main pass got exactly the kept rows, ignored labels mapped to -100
    call = model.calls[-1]
    torch.testing.assert_close(call["input_ids"], ids[kept])
    torch.testing.assert_close(call["attention_mask"], am[kept])
    want = labels.clone()
    want[(labels == ignore_index) | (am == 0)] = -100
    torch.testing.assert_close(call["labels"], want[kept])
    assert m["tokens_selected"] == int((want[kept][:, 1:] != -100).sum())


def test_slicing_of_per_sequence_kwargs_and_router_inputs():
    logits, labels, am = _case(3, torch.float32)
    router = FixedRouter(logits)
    model = RecordingLM(11)
    cggr = CGGRModel(model, router, warmup_steps=0, min_tokens_ratio=0.5)
    B, T = labels.shape
    ids = torch.randint(0, 11, (B, T))
    pos_b = torch.arange(T).repeat(B, 1) + torch.arange(B).unsqueeze(1)
    extra = torch.arange(B * 3).reshape(B, 3)
    pos_1 = torch.arange(T).unsqueeze(0)
    res = cggr.forward_with(model, ids, labels, am, position_ids=pos_b, per_seq=extra, scale=0.5, shared=pos_1)
    call = model.calls[-1]
    kept = res.kept
    assert 0 < kept.numel() < B
    torch.testing.assert_close(call["position_ids"], pos_b[kept])
    torch.testing.assert_close(call["per_seq"], extra[kept])
    assert call["scale"] == 0.5 and call["shared"] is pos_1            # not per-sequence: unchanged
    # the router saw the full batch, its position_ids, and ran without gradients
    rc = router.calls[-1]
    assert rc["input_ids"] is ids and rc["attention_mask"] is am and rc["position_ids"] is pos_b
    assert not rc["grad_enabled"] and "per_seq" not in rc


def test_main_loss_and_gradient_equal_the_standard_loss_on_the_kept_sequences():
    model = tiny_model("llama").train()
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, min_tokens_ratio=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (6, 10), generator=g)
    am = torch.ones_like(ids)
    am[2, 6:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    loss = cggr(ids, labels=labels, attention_mask=am)
    kept = cggr.last_kept
    ratio = cggr.get_metrics()["effective_ratio"]      # ≈ 0.5 · (1 + (1 − 1/V)/2) ≈ 0.75
    assert kept.numel() == oracle.num_selected(6, ratio) == 4
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # independent reference: float64 cross-entropy of the full model's logits on the kept rows
    eff = labels.masked_fill(am == 0, -100)[kept]
    logits = model(input_ids=ids[kept], attention_mask=am[kept]).logits
    st = oracle.token_statistics(as_f64(logits[:, :-1]), eff[:, 1:].numpy())
    valid = eff[:, 1:].numpy() != -100
    assert float(loss.detach()) == pytest.approx(st["nll"][valid].mean(), abs=1e-5, rel=1e-5)
    # gradients: exactly those of the standard loss on the kept rows (the router contributes none)
    model(input_ids=ids[kept], attention_mask=am[kept], labels=eff).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_warmup_keeps_everything_then_decays_and_state_dict_resumes():
    model = tiny_model("gpt2")
    cggr = CGGRModel(model, router_layers=1, warmup_steps=4, min_tokens_ratio=0.25, dynamic_threshold=False)
    ids = torch.randint(3, V, (8, 6))
    cggr(ids, labels=ids)
    assert cggr.get_metrics()["sequences_selected"] == 8 and cggr.get_metrics()["token_ratio"] == 1.0
    for _ in range(4):
        cggr.step()
    cggr(ids, labels=ids)
    m = cggr.get_metrics()
    assert m["step"] == 4 and m["effective_ratio"] == 0.25 and m["sequences_selected"] == 2
    # state_dict: the model's weights once (no router duplicates) plus the step
    sd = cggr.state_dict()
    assert set(sd) == {"model." + k for k in model.state_dict()} | {"_extra_state"}
    assert sd["_extra_state"] == {"step": 4}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = CGGRModel(tiny_model("gpt2", seed=1), router_layers=1, warmup_steps=4)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.current_step == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), model.parameters()))


def test_fixed_quota_ignores_the_dynamic_threshold():
    logits, labels, am = _case(5, torch.float32)
    cggr = CGGRModel(RecordingLM(11), FixedRouter(logits), selection="fixed_quota", warmup_steps=0,
                     min_tokens_ratio=0.5)
    cggr(torch.zeros_like(labels), labels, am)
    m = cggr.get_metrics()
    assert m["effective_ratio"] == m["token_ratio"] == 0.5
    assert m["sequences_selected"] == oracle.num_selected(m["sequences_total"], 0.5)


def test_masked_lm_is_not_shifted():
    model = tiny_model("bert")
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, min_tokens_ratio=0.5)
    assert cggr.shift_labels is False
    ids = torch.randint(3, V, (4, 8))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[:, 5] = ids[:, 5]
    loss = cggr(ids, labels=labels)
    kept = cggr.last_kept
    with torch.no_grad():
        logits = model(input_ids=ids[kept]).logits
    st = oracle.token_statistics(as_f64(logits), labels[kept].numpy())
    valid = labels[kept].numpy() != -100
    assert float(loss.detach()) == pytest.approx(st["nll"][valid].mean(), abs=1e-5, rel=1e-5)
    assert cggr.get_metrics()["tokens_total"] == 8   # two scored positions per sequence, no shift


def test_router_batch_size_chunks_give_the_same_selection():
    model = tiny_model("qwen2")
    ids = torch.randint(3, V, (7, 8))
    am = torch.ones_like(ids)
    am[3, 5:] = 0
    a = CGGRModel(model, router_layers=2, warmup_steps=0)
    b = CGGRModel(model, router_layers=2, warmup_steps=0, router_batch_size=3)
    ra = a.forward_with(model, ids, ids, am)
    rb = b.forward_with(model, ids, ids, am)
    torch.testing.assert_close(ra.sequence_difficulty, rb.sequence_difficulty, atol=1e-5, rtol=1e-6)
    assert torch.equal(ra.kept, rb.kept)
    ma, mb = a.get_metrics(), b.get_metrics()
    assert ma["tokens_total"] == mb["tokens_total"] and ma["sequences_selected"] == mb["sequences_selected"]


def test_gradient_checkpointing_model_trains():
    model = tiny_model("llama").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    cggr = CGGRModel(model, router_layers=1)
    ids = torch.randint(3, V, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loss = cggr(ids, labels=ids)
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------- edge cases
def test_batch_of_one_is_kept_and_equals_the_standard_loss():
    model = tiny_model("llama")
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, min_tokens_ratio=0.25)
    ids = torch.randint(3, V, (1, 9))
    loss = cggr(ids, labels=ids)
    assert cggr.last_kept.tolist() == [0]
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)
    assert cggr.get_metrics()["sequences_selected"] == cggr.get_metrics()["sequences_total"] == 1


def test_all_padding_sequences_are_never_kept_and_an_all_padding_batch_gives_zero_loss():
    model = RecordingLM(V)
    cggr = CGGRModel(model, create_truncated_router(tiny_model("llama"), 1), warmup_steps=10)  # ratio 1 at step 0
    ids = torch.randint(3, V, (4, 6))
    am = torch.ones_like(ids)
    am[1] = 0
    am[3, 1:] = 0          # one real token: no valid next-token target
    cggr(ids, labels=ids, attention_mask=am)
    assert cggr.last_kept.tolist() == [0, 2]
    assert cggr.get_metrics()["sequences_total"] == 2
    calls = len(model.calls)
    loss = cggr(ids, labels=ids, attention_mask=torch.zeros_like(am))
    assert len(model.calls) == calls                      # the main model did not run
    assert loss.dtype == torch.float32 and float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    m = cggr.get_metrics()
    assert m["sequences_selected"] == 0 and m["tokens_total"] == 0 and m["tokens_selected"] == 0
    # every label ignored, and a single position (no next token): the same documented result
    assert float(cggr(ids, labels=torch.full_like(ids, -100)).detach()) == 0.0
    assert float(cggr(ids[:, :1], labels=ids[:, :1]).detach()) == 0.0


def test_bad_input_raises():
    model = tiny_model("llama")
    cggr = CGGRModel(model, router_layers=1)
    ids = torch.randint(3, V, (3, 6))
    with pytest.raises(ValueError, match="labels"):
        cggr(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        cggr(ids[0], labels=ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        cggr(ids.float(), labels=ids)
    with pytest.raises(ValueError, match="labels"):
        cggr(ids, labels=ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        cggr(ids, labels=ids, attention_mask=torch.ones(3, 5, dtype=torch.long))
    bad = ids.clone()
    bad[1, 2] = V
    with pytest.raises(ValueError, match="labels: every value must lie"):
        cggr(ids, labels=bad)
    # a router with another vocabulary
    other = tiny_model("gpt2")
    other.resize_token_embeddings(V + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        CGGRModel(model, create_truncated_router(other, 1))(ids, labels=ids)
    # sequence level supports topk / fixed_quota only (SPEC §9)
    for selection in ("stratified", "sequence_aware"):
        with pytest.raises(ValueError, match="selection"):
            CGGRModel(model, router_layers=1, selection=selection)
    with pytest.raises(ValueError, match="router_layers: the model has 3 layers"):
        CGGRModel(model)                        # default router: 4 layers, the tiny model has 3
    with pytest.raises(ValueError, match="router_layers: expected an integer >= 1"):
        CGGRModel(model, router_layers=0)       # the caller's argument is named, not num_layers
    with pytest.raises(ValueError, match="router_batch_size"):
        CGGRModel(model, router_layers=1, router_batch_size=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        CGGRModel(model, router_layers=1, warmup_steps=-1)

    class NoLoss(nn.Module):   # neither a loss nor logits (logits alone are fine: see the tests below)
        def forward(self, input_ids, **kw):
            return SimpleNamespace(hidden_states=torch.zeros(*input_ids.shape, V))

    with pytest.raises(ValueError, match="model: NoLoss returned .* neither a loss nor logits"):
        CGGRModel(NoLoss(), create_truncated_router(model, 1), warmup_steps=0)(ids, labels=ids)


def test_router_registration_rules():
    model = tiny_model("llama")
    shared = CGGRModel(model, router_layers=1)
    assert not any(k.startswith("router") for k in shared.state_dict())
    assert len(list(shared.parameters())) == len(list(model.parameters()))
    other = tiny_model("llama", seed=3)
    separate = CGGRModel(model, create_truncated_router(other, 1))
    keys = set(separate.state_dict())
    assert {"router_model." + k for k in other.state_dict()} <= keys
    plain = RecordingLM(V)
    registered = CGGRModel(model, plain)
    assert registered.router is plain and any(k.startswith("router.") for k in registered.state_dict())


# ------------------------------------------------------------------------------- scripts (smoke tests)
def _load_script(relpath: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_quick_mode_runs(tmp_path):
    bench = _load_script("benchmarks/ops/batch_split_torch.py")
    out = tmp_path / "bench.json"
    record = bench.main(["--quick", "--out", str(out)])
    modes = [r["mode"] for r in record["results"]]
    # the default rows, then one row per cheaper router of SPEC §9.3 (--router-options s4,s16,m64,p256)
    assert modes == ["standard", "random_sequence", "cggr", "cggr[L=2,auto,s4]", "cggr[L=2,auto,s16]",
                     "cggr[L=2,auto,m64]", "cggr[L=2,auto,p256]"] and out.exists()
    options = {r["mode"]: r["router_options"] for r in record["results"] if "router_options" in r}
    assert options["cggr"] == {} and options["cggr[L=2,auto,s16]"] == {"router_positions": 16}
    assert options["cggr[L=2,auto,m64]"] == {"router_samples": 64}
    assert all(r["sequences_trained_median"] == 2 for r in record["results"][1:])
    by_mode = {r["mode"]: r for r in record["results"]}
    assert by_mode["cggr"]["sequences_trained_median"] == by_mode["random_sequence"]["sequences_trained_median"] == 2
    assert all(r["tokens_per_s"] > 0 for r in record["results"])
    cg = by_mode["cggr"]
    assert cg["router_path"] == "fused" and cg["router_ms_median"] > 0
    assert cg["cggr_metrics"]["router_path"] == "fused"


def test_moe_null_routing_example_runs():
    example = _load_script("examples/moe_null_routing.py")
    res = example.main(["--steps", "3", "--warmup", "1", "--max-chars", "20000", "--batch-size", "4",
                        "--seq-len", "16", "--layers", "2", "--router-layers", "1", "--d-model", "16"])
    assert np.isfinite(res["cggr"]["eval_loss"])
    # the MoE layer's null expert is exact and the capacity bound is honoured
    moe = example.NullRoutedMoE(8, 16, 3)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    moe.routing_mask, moe.capacity = mask, 1
    y = moe(x)
    assert (y[~mask] == 0).all() and int(moe.last_stats["routed"]) <= 2


# ---------------------------------------------------------------------------------- fused router path
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_and_logits_router_paths_keep_the_same_sequences(family):
    model = tiny_model(family)
    fused = CGGRModel(model, router_layers=2, warmup_steps=0)
    chunked = CGGRModel(model, router_layers=2, warmup_steps=0, router_batch_size=3, router_memory_budget_bytes=4096)
    plain = CGGRModel(model, router_layers=2, warmup_steps=0, router_path="logits")
    assert fused.get_metrics()["router_path"] == "fused" and plain.get_metrics()["router_path"] == "logits"
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, V, (7, 9), generator=g)
        labels = ids.clone()
        labels[2, 1:] = -100                                  # all ignored: never kept
        am = torch.ones_like(ids)
        am[4, 6:] = 0
        res = {name: m.forward_with(model, ids, labels, am) for name, m in
               (("fused", fused), ("chunked", chunked), ("logits", plain))}
        for name in ("fused", "chunked"):
            assert torch.equal(res[name].kept, res["logits"].kept)
            assert torch.equal(res[name].sequence_eligible, res["logits"].sequence_eligible)
            torch.testing.assert_close(res[name].sequence_difficulty, res["logits"].sequence_difficulty,
                                       atol=6e-4, rtol=2e-5)
            torch.testing.assert_close(res[name].loss, res["logits"].loss, atol=0, rtol=0)   # same main pass
        assert not res["fused"].sequence_eligible[2]
        mf, ml = fused.get_metrics(), plain.get_metrics()
        assert mf["router_path"] == "fused" and ml["router_path"] == "logits"
        assert {k: mf[k] for k in ("tokens_total", "tokens_nonfinite", "sequences_selected", "sequences_total",
                                   "tokens_selected")} == \
               {k: ml[k] for k in ("tokens_total", "tokens_nonfinite", "sequences_selected", "sequences_total",
                                   "tokens_selected")}
        # select(): the router pass alone chooses what forward kept (no main pass, no metrics)
        sel = fused.select(ids, labels, am)
        assert torch.equal(torch.nonzero(sel.mask).reshape(-1), res["fused"].kept)
        assert int(sel.k) == len(res["fused"].kept)


def test_fused_router_all_ignored_batch_and_explicit_paths():
    model = tiny_model("llama")
    ids = torch.randint(3, V, (3, 6))
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, router_path="fused")
    loss = cggr(ids, labels=torch.full_like(ids, -100))
    assert float(loss.detach()) == 0.0 and cggr.last_kept.numel() == 0
    m = cggr.get_metrics()
    assert m["router_path"] == "fused" and m["tokens_total"] == 0 and m["sequences_total"] == 0
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="router_path"):
        CGGRModel(model, router_layers=1, router_path="fast")
    with pytest.raises(ValueError, match="router_path"):
        CGGRModel(RecordingLM(V), FixedRouter(torch.zeros(3, 6, V)), router_path="fused")
    with pytest.raises(ValueError, match="router_memory_budget_bytes"):
        CGGRModel(model, router_layers=1, router_memory_budget_bytes=-1)
    auto = CGGRModel(RecordingLM(V), FixedRouter(torch.zeros(3, 6, V)))
    assert auto.get_metrics()["router_path"] == "logits" and "arbitrary module" in auto.router_path_reason


# ------------------------------------------------------------------------------ models that return only logits
class TensorLM(nn.Module):
    """``forward(self, x)``: a logits tensor, no labels, no attention mask (the seed docs' ``model(input_ids)``)."""

    def __init__(self, vocab: int = V, dim: int = 8, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.out_dtype = out_dtype
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        h = self.emb(x)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)   # causal: position t sees t-1 and t
        return self.head(torch.tanh(self.mix(torch.cat([h, prev], dim=-1)))).to(self.out_dtype)


class LogitsAttrLM(TensorLM):
    """Returns an object with ``.logits`` only (no ``loss`` attribute), bfloat16 logits."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=super().forward(input_ids))


class HFNoLabels(nn.Module):
    """A Hugging Face causal LM called without labels: its output has ``.logits`` and ``loss=None``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask)


def _logits_case(B: int = 6, T: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[4, 5:] = 0
    am[2, 8:] = 0
    am[5, 9:] = 0
    labels = ids.clone()
    labels[0, :4] = -100
    labels[3, 2] = -100
    router = FixedRouter(torch.randn(B, T, V, generator=g) * 3)
    return ids, labels, am, router


def _reference_nll(logits: torch.Tensor, labels: torch.Tensor, am: torch.Tensor) -> float:
    """By hand, float64: mean of -log p(labels[t+1] | logits[t]) over t with a valid, unpadded target."""
    logp = torch.log_softmax(logits.detach().to(torch.float64), dim=-1)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != -100 and int(am[b, t + 1]) != 0:
                total -= float(logp[b, t, y])
                count += 1
    return total / count


@pytest.mark.parametrize("cls", [TensorLM, LogitsAttrLM])
def test_model_returning_only_logits_gets_the_next_token_loss_of_the_kept_rows(cls):
    torch.manual_seed(0)
    lm = cls(out_dtype=torch.bfloat16) if cls is LogitsAttrLM else cls()
    ids, labels, am, router = _logits_case()
    cggr = CGGRModel(lm, router=router, warmup_steps=0, min_tokens_ratio=0.5, dynamic_threshold=False)
    res = cggr.forward_with(lm, ids, labels, attention_mask=am)
    kept = res.kept
    assert 0 < kept.numel() < ids.shape[0] and lm.calls == [kept.numel()]   # only the kept rows ran
    assert (am[kept] == 0).any() and (labels[kept] == -100).any()   # both ignore rules matter for these rows
    assert res.loss.dtype == torch.float32 and res.loss.dim() == 0
    logits = lm(ids[kept])
    logits = logits.logits if cls is LogitsAttrLM else logits
    want = _reference_nll(logits, labels[kept], am[kept])
    assert float(res.loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert cggr.get_metrics()["tokens_selected"] == int(((labels[kept][:, 1:] != -100) & (am[kept][:, 1:] != 0)).sum())
    # gradients flow to every parameter and equal those of the same loss written by hand
    res.loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    lm.zero_grad()
    eff = labels.masked_fill(am == 0, -100)[kept]
    F.cross_entropy(logits[:, :-1].float().reshape(-1, V), eff[:, 1:].reshape(-1), ignore_index=-100).backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_hf_model_output_without_loss_gets_the_loss_computed_and_filled_in():
    hf = tiny_model("llama").train()
    wrapped = HFNoLabels(hf)
    ids, labels, am, _ = _logits_case(seed=1)
    cggr = CGGRModel(wrapped, router=create_truncated_router(hf, 1), warmup_steps=0, min_tokens_ratio=0.5)
    torch.manual_seed(0)
    res = cggr.forward_with(wrapped, ids, labels, attention_mask=am)
    kept = res.kept
    assert 0 < kept.numel() < ids.shape[0] and (am[kept] == 0).any() and (labels[kept] == -100).any()
    assert res.outputs.loss is res.loss and res.outputs["loss"] is res.loss   # the output's own loss field
    res.loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    eff = labels.masked_fill(am == 0, -100)[kept]
    ref = hf(input_ids=ids[kept], attention_mask=am[kept]).logits
    assert float(res.loss.detach()) == pytest.approx(_reference_nll(ref, labels[kept], am[kept]), rel=1e-5, abs=1e-6)
    hf(input_ids=ids[kept], attention_mask=am[kept], labels=eff).loss.backward()   # HF's own loss, same rows
    for n, p in hf.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


class _Returns(nn.Module):
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return self.value(input_ids) if callable(self.value) else self.value


@pytest.mark.parametrize("value, match", [
    (None, "neither a loss nor logits"),
    (SimpleNamespace(hidden=torch.zeros(1)), "neither a loss nor logits"),
    (lambda x: torch.zeros(x.shape[0], x.shape[1]), "logits of shape"),                      # 2-D
    (lambda x: torch.zeros(x.shape[0], x.shape[1] + 1, V), "logits of shape"),               # wrong T
    (lambda x: torch.zeros(x.shape[0], x.shape[1], V, dtype=torch.long), "dtype"),           # integer
])
def test_model_output_without_loss_or_usable_logits_raises_naming_model(value, match):
    ids, labels, am, router = _logits_case()
    cggr = CGGRModel(_Returns(value), router=router, warmup_steps=0)
    with pytest.raises(ValueError, match=f"model: _Returns.*{match}"):
        cggr(ids, labels=labels, attention_mask=am)


def test_logits_of_another_vocabulary_than_the_models_head_raise():
    hf = tiny_model("llama")
    wrong = _Returns(lambda x: torch.zeros(x.shape[0], x.shape[1], V + 1))
    wrong.get_output_embeddings = hf.get_output_embeddings      # vocabulary V from the head
    ids, labels, am, router = _logits_case()
    with pytest.raises(ValueError, match=rf"model: .*\(k, T, {V}\)"):
        CGGRModel(wrong, router=router, warmup_steps=0)(ids, labels=labels, attention_mask=am)
