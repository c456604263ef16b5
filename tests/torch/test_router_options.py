"""PyTorch: the cheaper router of SPEC §9.3 (a prefix, a stride, a sample of positions) and the static bucket
sizes of SPEC §9.4 (a compiled model in ``CGGRModel``).

The selections are compared with ``tests.oracle.select_sequences_at`` on the *full* truncated router's logits
(a causal prefix router's logits are the full router's at the positions it reads) with the positions of
``tests.oracle.router_scored_positions``, written from SPEC §9.3 independently of ``cggr.config``. Buckets are
compared with exact slicing (losses, gradients, metrics) and their compile count with a counting backend.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from cggr.config import RouterPositions  # noqa: E402
from cggr_torch import scorer as scorer_module  # noqa: E402
from cggr_torch.batch_split import CGGRModel, default_buckets, is_compiled_module, select_sequences  # noqa: E402
from cggr_torch.router import create_truncated_router  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, random_logits, random_targets  # noqa: E402
from tests.torch.test_router import V, FixedRouter, tiny_model  # noqa: E402

OPTIONS = [
    {},
    {"router_positions": 4},
    {"router_positions": 1},
    {"router_positions": 50},              # stride > T: position 0 only
    {"router_samples": 3},
    {"router_samples": 50},                # m > T: every position
    {"router_prefix": 4},
    {"router_prefix": 50},                 # prefix >= T: the full router
    {"router_prefix": 6, "router_positions": 2},
    {"router_prefix": 7, "router_samples": 2},
]


def _batch(seed: int, B: int = 7, T: int = 11):
    """Odd T; right padding, left padding, an all-ignored sequence, a sequence whose only valid targets lie
    beyond a short prefix, ignored targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    am = torch.ones_like(ids)
    labels[2, :] = -100                   # all ignored: never eligible
    am[3, T - 5:] = 0                     # right padding
    am[4, :6] = 0                         # left padding longer than a 4-column prefix
    labels[5, 3] = -100
    return ids, labels, am


def _check_against_oracle(res, metrics, logits, labels, am, positions, *, scoring="combined", reference=None):
    ratio = np.float32(metrics["effective_ratio"])
    ref = oracle.select_sequences_at(as_f64(logits), labels.numpy(), ratio, positions, scoring=scoring,
                                     attention_mask=am.numpy(),
                                     reference_nll=None if reference is None else reference.double().numpy())
    np.testing.assert_array_equal(res.sequence_eligible.numpy(), ref["sequence_eligible"])
    np.testing.assert_allclose(res.sequence_difficulty.numpy(), ref["sequence_difficulty"], atol=2e-4, rtol=2e-5)
    assert metrics["tokens_total"] == ref["tokens_total"]
    np.testing.assert_allclose(metrics["avg_confidence"], ref["mean_confidence"], atol=1e-5)
    # given the package's own float32 D the selection is the oracle's, exactly
    mask, k = oracle.select_tokens(res.sequence_difficulty.double().numpy(), res.sequence_eligible.numpy(),
                                   ratio, "topk")
    assert res.kept.tolist() == np.flatnonzero(mask).tolist() and metrics["sequences_selected"] == k
    return ref


@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "all")
def test_truncated_router_options_match_the_oracle(options, path):
    model = tiny_model("llama")
    ids, labels, am = _batch(1)
    T = ids.shape[1]
    cggr = CGGRModel(model, router_layers=2, warmup_steps=0, min_tokens_ratio=0.5, router_path=path, **options)
    res = cggr.forward_with(model, ids, labels, am)
    m = cggr.get_metrics()
    assert m["router_path"] == path
    with torch.no_grad():
        full = create_truncated_router(model, 2)(ids, attention_mask=am)   # all T columns
    positions = oracle.router_scored_positions(T, **options)
    ref = _check_against_oracle(res, m, full, labels, am, positions)
    assert not res.sequence_eligible[2]
    if options.get("router_prefix") == 4:
        # sequence 4's real tokens start at column 6: no eligible pair inside the prefix, never kept
        assert not res.sequence_eligible[4] and not ref["sequence_eligible"][4]
    # the ratio is SPEC §5.2 from the scored pairs' mean confidence
    assert np.float32(m["effective_ratio"]) == oracle.dynamic_ratio(np.float32(0.5), m["avg_confidence"], 0.5)


def test_equivalent_settings_select_what_the_full_router_selects():
    model = tiny_model("llama")
    ids, labels, am = _batch(2)
    full = CGGRModel(model, router_layers=2, warmup_steps=0).forward_with(model, ids, labels, am)
    for options in ({"router_prefix": 11}, {"router_prefix": 99}, {"router_positions": 1}, {"router_samples": 10},
                    {"router_samples": 64}):
        res = CGGRModel(model, router_layers=2, warmup_steps=0, **options).forward_with(model, ids, labels, am)
        assert torch.equal(res.kept, full.kept) and torch.equal(res.sequence_eligible, full.sequence_eligible)
        torch.testing.assert_close(res.sequence_difficulty, full.sequence_difficulty, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.loss, full.loss, atol=0, rtol=0)
    # chunking the router pass changes nothing either
    a = CGGRModel(model, router_layers=2, warmup_steps=0, router_samples=3, router_prefix=8)
    b = CGGRModel(model, router_layers=2, warmup_steps=0, router_samples=3, router_prefix=8, router_batch_size=3,
                  router_memory_budget_bytes=4096)
    ra, rb = a.forward_with(model, ids, labels, am), b.forward_with(model, ids, labels, am)
    assert torch.equal(ra.kept, rb.kept)
    torch.testing.assert_close(ra.sequence_difficulty, rb.sequence_difficulty, atol=1e-5, rtol=1e-5)


def test_prefix_router_reads_only_the_prefix_and_the_head_runs_on_the_scored_rows(monkeypatch):
    model = tiny_model("llama")
    ids, labels, am = _batch(3)
    B, T = ids.shape
    cggr = CGGRModel(model, router_layers=2, warmup_steps=0, router_prefix=6, router_positions=2)
    seen = {}
    real_hidden = cggr.router.hidden_states
    real_fused = scorer_module.score_next_tokens_fused

    def hidden_states(input_ids, attention_mask=None, **kw):
        seen["ids"], seen["am"], seen["kw"] = input_ids.shape, attention_mask.shape, kw
        return real_hidden(input_ids, attention_mask=attention_mask, **kw)

    def fused(hidden, *args, **kw):
        seen["hidden"] = hidden.shape
        return real_fused(hidden, *args, **kw)

    monkeypatch.setattr(cggr.router, "hidden_states", hidden_states)
    monkeypatch.setattr(scorer_module, "score_next_tokens_fused", fused)
    pos_ids = torch.arange(T).expand(B, T)
    cggr.forward_with(model, ids, labels, am, position_ids=pos_ids)
    assert seen["ids"] == (B, 6) and seen["am"] == (B, 6) and seen["kw"]["position_ids"].shape == (B, 6)
    assert seen["hidden"][:2] == (B, 3)   # positions 0, 2, 4: the head sees 3 rows per sequence, not T


def test_logits_router_gets_the_prefix_and_its_logits_are_gathered():
    rng = np.random.default_rng(4)
    B, T, Vs = 5, 9, 13
    logits = random_logits(rng, (B, T, Vs), torch.float32)
    labels = random_targets(rng, (B, T), Vs)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 5:] = 0
    router = FixedRouter(logits[:, :5])
    model = nn.Linear(1, 1)
    model.forward = lambda input_ids, labels=None, attention_mask=None: {"logits": torch.zeros(
        input_ids.shape + (Vs,), requires_grad=True)}
    cggr = CGGRModel(model, router, warmup_steps=0, min_tokens_ratio=0.6, router_prefix=5, router_samples=3)
    ids = torch.randint(0, Vs, (B, T))
    res = cggr.forward_with(model, ids, labels, am)
    assert router.calls[-1]["input_ids"].shape == (B, 5) and router.calls[-1]["attention_mask"].shape == (B, 5)
    full = torch.cat([logits[:, :5], torch.zeros(B, T - 5, Vs)], dim=1)   # columns >= 5 are never read
    _check_against_oracle(res, cggr.get_metrics(), full, labels, am, oracle.router_scored_positions(T, "all", 3, 5))
    # a router returning all T columns while reading 5 is an error naming the router
    with pytest.raises(ValueError, match="router"):
        CGGRModel(model, FixedRouter(logits), warmup_steps=0, router_prefix=5).forward_with(model, ids, labels, am)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", ["token", "sequence"])
@pytest.mark.parametrize("options", [{"router_positions": 3}, {"router_samples": 4}, {"router_prefix": 5}],
                         ids=["stride", "sample", "prefix"])
def test_pure_selection_with_a_reference(options, form, dtype):
    rng = np.random.default_rng(5)
    B, T, Vs = 6, 10, 11
    logits = random_logits(rng, (B, T, Vs), DTYPES[dtype])
    labels = random_targets(rng, (B, T), Vs)
    am = torch.ones(B, T, dtype=torch.long)
    am[2, 6:] = 0
    logits[0, 3, 1] = float("nan")
    ref = torch.tensor(rng.normal(size=(B, T) if form == "token" else (B,)), dtype=torch.float32)
    ref[4] = float("nan")   # per token: one NaN row of the reference; per sequence: sequence 4 not eligible
    ratio = np.float32(0.5)
    sel = select_sequences(logits, labels, am, ratio=ratio, scoring="excess", reference_nll=ref, **options)
    positions = oracle.router_scored_positions(T, **options)
    want = oracle.select_sequences_at(as_f64(logits), labels.numpy(), ratio, positions, scoring="excess",
                                      attention_mask=am.numpy(), reference_nll=ref.double().numpy())
    np.testing.assert_array_equal(sel.eligible.numpy(), want["sequence_eligible"])
    np.testing.assert_allclose(sel.difficulty.numpy(), want["sequence_difficulty"], atol=2e-4, rtol=2e-5)
    mask, k = oracle.select_tokens(sel.difficulty.double().numpy(), sel.eligible.numpy(), ratio, "topk")
    np.testing.assert_array_equal(sel.mask.numpy(), mask)
    assert not sel.eligible[4]
    # hand-computed D_b of sequence 0 (float64): the mean over its eligible scored pairs
    e = want["scores"]["eligible"][0]
    z = as_f64(logits)[0, positions]
    tgt = labels.numpy()[0, positions + 1]
    nll = np.array([np.log(np.exp(r - r.max()).sum()) + r.max() - (r[y] if y >= 0 else np.nan)
                    for r, y in zip(z, tgt)])
    r0 = ref.double().numpy()
    hand = (nll - (r0[0, positions + 1] if form == "token" else r0[0]))[e].mean()
    np.testing.assert_allclose(sel.difficulty[0].item(), hand, atol=2e-4, rtol=2e-5)


def test_cggr_model_excess_with_options_matches_the_oracle():
    model = tiny_model("llama")
    ids, labels, am = _batch(6)
    with torch.no_grad():
        full = create_truncated_router(model, 2)(ids, attention_mask=am)
    for reference in (torch.rand(ids.shape) * 4, torch.rand(ids.shape[0]) * 4):
        cggr = CGGRModel(model, router_layers=2, warmup_steps=0, scoring="excess", router_samples=4,
                         router_prefix=9)
        res = cggr.forward_with(model, ids, labels, am, reference_nll=reference)
        _check_against_oracle(res, cggr.get_metrics(), full, labels, am,
                              oracle.router_scored_positions(ids.shape[1], "all", 4, 9), scoring="excess",
                              reference=reference)


def test_all_ignored_batch_and_short_batches():
    model = tiny_model("llama")
    ids = torch.randint(3, V, (3, 6))
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, router_positions=4, router_prefix=2)
    loss = cggr(ids, labels=torch.full_like(ids, -100))
    assert float(loss.detach()) == 0.0 and cggr.last_kept.numel() == 0
    m = cggr.get_metrics()
    assert m["tokens_total"] == 0 and m["sequences_total"] == 0
    # T = 2: one candidate pair (position 0) whatever the settings; T = 1: none
    for T, expected in ((2, 3), (1, 0)):
        ids = torch.randint(3, V, (3, T))
        c = CGGRModel(model, router_layers=1, warmup_steps=0, router_samples=5)
        c(ids, labels=ids)
        assert c.get_metrics()["sequences_total"] == expected


def test_router_settings_live_in_one_place_and_bad_values_raise():
    model = tiny_model("llama")
    router = create_truncated_router(model, 2, router_samples=8)
    assert router.positions == RouterPositions(router_samples=8)
    assert CGGRModel(model, router).positions == RouterPositions(router_samples=8)           # the router's own
    assert CGGRModel(model, router, router_samples=8).positions == RouterPositions(router_samples=8)
    with pytest.raises(ValueError, match="router_positions/router_samples/router_prefix"):
        CGGRModel(model, router, router_prefix=4)
    assert CGGRModel(model, router_layers=1, router_prefix=3).router.positions == RouterPositions(router_prefix=3)
    for kwargs, name in (({"router_positions": 0}, "router_positions"), ({"router_positions": "some"},
                         "router_positions"), ({"router_positions": 2.0}, "router_positions"),
                         ({"router_positions": True}, "router_positions"), ({"router_samples": 0}, "router_samples"),
                         ({"router_samples": 2.5}, "router_samples"), ({"router_prefix": 0}, "router_prefix"),
                         ({"router_prefix": -3}, "router_prefix"),
                         ({"router_positions": 2, "router_samples": 3}, "router_samples")):
        with pytest.raises(ValueError, match=name):
            CGGRModel(model, router_layers=1, **kwargs)
        with pytest.raises(ValueError, match=name):
            create_truncated_router(model, 1, **kwargs)
        with pytest.raises(ValueError, match=name):
            select_sequences(torch.zeros(2, 4, V), torch.zeros(2, 4, dtype=torch.long), ratio=0.5, **kwargs)
    with pytest.raises(ValueError, match="router_logits"):   # neither T nor the prefix's R columns
        select_sequences(torch.zeros(2, 3, V), torch.zeros(2, 6, dtype=torch.long), ratio=0.5, router_prefix=4)
    with pytest.raises(ValueError, match="labels"):          # out of range, even outside the scored positions
        bad = torch.zeros(2, 6, dtype=torch.long)
        bad[1, 5] = V
        CGGRModel(model, router_layers=1, router_positions=4)(torch.zeros(2, 6, dtype=torch.long) + 3, labels=bad)


# -------------------------------------------------------------------------------------- buckets (SPEC §9.4)
class TinyLM(nn.Module):
    """A logits-only causal model (embedding, a causal running mean, a head): rows are independent."""

    def __init__(self, vocab: int = 17, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        return self.head(torch.tanh(self.mix(h.cumsum(1) / steps)))


class TinyRouter(nn.Module):
    def __init__(self, vocab: int = 17) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids) * 3.0


RATIOS = [1.0, 0.1, 0.35, 0.6, 0.2, 0.9, 0.45, 0.15, 0.75, 0.3, 0.55]


def _run(model, buckets, *, selection="topk", steps=len(RATIOS)):
    cggr = CGGRModel(model, TinyRouter(), dynamic_threshold=False, warmup_steps=5, selection=selection,
                     ratio_schedule=lambda s: RATIOS[s % len(RATIOS)], buckets=buckets)
    out = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, 17, (16, 7), generator=g)
        am = torch.ones_like(ids)
        am[3, 4:] = 0
        for p in model.parameters():
            p.grad = None
        res = cggr.forward_with(model, ids, ids, am)
        res.loss.backward()
        out.append((res.kept.clone(), res.loss.detach().clone(), cggr.get_metrics(),
                    [p.grad.clone() for p in model.parameters()]))
        cggr.step()
    return out


def test_compiled_model_compiles_at_most_once_per_bucket_and_matches_exact_slicing():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    eager = TinyLM()
    exact = _run(eager, None)
    ks = {int(k.numel()) for k, *_ in exact}
    sizes = default_buckets(16)
    assert len(ks) > len(sizes)                       # the kept count takes more values than there are buckets
    counter = CompileCounter()
    compiled = torch.compile(TinyLM(), backend=counter, dynamic=False)
    assert is_compiled_module(compiled) and not is_compiled_module(eager)
    padded = _run(compiled, "auto")                   # 'auto' buckets a compiled model
    assert 1 <= counter.frame_count <= len(sizes), counter.frame_count
    for (k1, l1, m1, g1), (k2, l2, m2, g2) in zip(exact, padded):
        assert torch.equal(k1, k2)
        torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert {k: m1[k] for k in ("tokens_selected", "sequences_selected", "tokens_total")} == \
               {k: m2[k] for k in ("tokens_selected", "sequences_selected", "tokens_total")}
    # the contrast: exact slicing recompiles for every new kept count
    torch._dynamo.reset()
    counter2 = CompileCounter()
    _run(torch.compile(TinyLM(), backend=counter2, dynamic=False), None, steps=8)
    assert counter2.frame_count == len({int(k.numel()) for k, *_ in exact[:8]}) > len(sizes)
    torch._dynamo.reset()


@pytest.mark.parametrize("selection", ["topk", "sampled"])
def test_explicit_buckets_on_an_eager_model_change_nothing_but_the_batch_shape(selection):
    exact = _run(TinyLM(), None, selection=selection, steps=6)
    padded = _run(TinyLM(), (3, 5, 11), selection=selection, steps=6)
    for (k1, l1, m1, g1), (k2, l2, m2, g2) in zip(exact, padded):
        assert torch.equal(k1, k2)
        torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert m1["sample_ess"] == pytest.approx(m2["sample_ess"], rel=1e-6)


def test_bucket_shapes_and_bad_buckets():
    model = TinyLM()
    cggr = CGGRModel(model, TinyRouter(), warmup_steps=0, min_tokens_ratio=0.3, dynamic_threshold=False,
                     buckets=(2, 6))
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    ids = torch.randint(0, 17, (10, 5))
    res = cggr.forward_with(model, ids, ids)
    assert res.kept.numel() == 3 and seen[-1] == (6, 5) and res.outputs.shape[0] == 6
    assert cggr.bucket_sizes(10) == (2, 6, 10) and CGGRModel(model, TinyRouter()).bucket_sizes(10) is None
    assert default_buckets(16) == (2, 4, 6, 8, 12, 16) and default_buckets(1) == (1,)
    for bad in ("fast", [0], [2, -1], 3.5, [True]):
        with pytest.raises(ValueError, match="buckets"):
            CGGRModel(model, TinyRouter(), buckets=bad)
    with pytest.raises(ValueError, match="buckets"):   # a size above the batch
        CGGRModel(model, TinyRouter(), warmup_steps=0, buckets=(20,)).forward_with(model, ids, ids)
    with pytest.raises(ValueError, match="batch_size"):
        default_buckets(0)


def test_a_compiled_truncated_router_keeps_its_settings_and_selects_like_the_eager_one():
    model = tiny_model("llama")
    ids, labels, am = _batch(7)
    router = create_truncated_router(model, 2, router_prefix=6, router_positions=2)
    torch._dynamo.reset()
    compiled = CGGRModel(model, torch.compile(router, backend="eager"), warmup_steps=0, min_tokens_ratio=0.5)
    assert compiled.positions == RouterPositions(2, None, 6)
    eager = CGGRModel(model, router, warmup_steps=0, min_tokens_ratio=0.5)
    a, b = compiled.forward_with(model, ids, labels, am), eager.forward_with(model, ids, labels, am)
    assert compiled.get_metrics()["router_path"] == "logits" and eager.get_metrics()["router_path"] == "fused"
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(a.sequence_difficulty, b.sequence_difficulty, atol=6e-4, rtol=2e-5)
    torch._dynamo.reset()


def test_masked_lm_scores_its_subset_without_a_shift():
    model = tiny_model("bert")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, V, (5, 9), generator=g)
    labels = ids.clone()
    labels[:, 1::2] = -100
    cggr = CGGRModel(model, router_layers=1, warmup_steps=0, min_tokens_ratio=0.5, router_positions=3)
    res = cggr.forward_with(model, ids, labels)
    with torch.no_grad():
        full = create_truncated_router(model, 1)(ids)
    pos = oracle.router_scored_positions(9, 3, shift=False)           # 0, 3, 6: position t predicts labels[t]
    assert pos.tolist() == [0, 3, 6]
    sc = oracle.score_tokens(as_f64(full)[:, pos], labels.numpy()[:, pos])
    e = sc["eligible"]
    want = np.array([sc["difficulty"][b][e[b]].mean() for b in range(5)])
    np.testing.assert_allclose(res.sequence_difficulty.numpy(), want, atol=2e-4, rtol=2e-5)
    assert cggr.get_metrics()["tokens_total"] == int(e.sum()) == 10   # labels at 0 and 6 (3 is ignored)


def test_router_compile_flag_runs_the_layers_compiled_and_changes_no_selection():
    from torch._dynamo.testing import CompileCounter

    model = tiny_model("llama")
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = CGGRModel(model, router_layers=2, warmup_steps=0, min_tokens_ratio=0.5, router_prefix=8,
                         router_compile={"backend": counter, "dynamic": False})
    eager = CGGRModel(model, router_layers=2, warmup_steps=0, min_tokens_ratio=0.5, router_prefix=8)
    assert compiled.router.compile_options == {"backend": counter, "dynamic": False}
    for seed in range(3):
        ids, labels, am = _batch(10 + seed)
        a, b = compiled.forward_with(model, ids, labels, am), eager.forward_with(model, ids, labels, am)
        assert torch.equal(a.kept, b.kept) and compiled.get_metrics()["router_path"] == "fused"
        torch.testing.assert_close(a.sequence_difficulty, b.sequence_difficulty, atol=1e-5, rtol=1e-5)
    assert 1 <= counter.frame_count <= 3   # the head-linearity probe's shapes and the (7, 8) prefix: no more
    before = counter.frame_count
    ids, labels, am = _batch(20)
    compiled.forward_with(model, ids, labels, am)
    assert counter.frame_count == before   # a further step of the same shape compiles nothing
    with pytest.raises(ValueError, match="router_compile"):
        create_truncated_router(model, 1, router_compile="yes")
    with pytest.raises(ValueError, match="router_compile"):
        CGGRModel(model, create_truncated_router(model, 1), router_compile=True)
    torch._dynamo.reset()
