"""Fused LM head + selective cross-entropy (``cggr_torch.fused_linear``) against the materialised path.

Two references:

* the float64 oracle fed with the fused path's own float32 difficulties (``difficulty_override``), so that
  selections compare exactly (SPEC §11 level 1) and the loss / ``∂h = G W`` / ``∂W = Gᵀ h`` / ``∂b = Σ G`` are
  computed in float64 from the oracle's ``G = ∂loss/∂logits``;
* ``cggr_torch.cggr_loss`` on the materialised logits ``F.linear(hidden, weight, bias)`` with autograd.

Shapes are small and odd (N = 37, d = 24 or 23, V = 301) with chunk sizes that divide neither N nor V.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cggr_torch import cggr_loss, score_tokens, select_tokens
from cggr_torch.fused_linear import (
    DEFAULT_MEMORY_BUDGET,
    FusedLinearCGGRLoss,
    fused_linear_cggr,
    fused_linear_cggr_loss,
    fused_linear_scores,
    plan_chunks,
)
from cggr_torch.causal_lm import hf_causal_lm_cggr_loss
from cggr_torch.loss import METRIC_KEYS, NUMERIC_METRIC_KEYS
from tests import oracle
from tests.torch import as_f64, assert_within

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (atol, rtol) relative to the largest reference gradient entry: float32 accumulation everywhere, but the
# selected rows' dlogits are rounded to the inputs' dtype before the backward matmuls.
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
LOSS_TOL = {"float32": (1e-5, 1e-5), "float16": (1e-4, 1e-5), "bfloat16": (1e-4, 1e-5)}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _inputs(seed: int, shape: tuple[int, ...], d: int, V: int, dtype: torch.dtype, *, bias: bool = True,
            p_ignore: float = 0.15, ignore_index: int = -100):
    """hidden (shape + (d,)), weight (V, d), bias (V,), labels (shape): a spread of per-row temperatures."""
    rng = np.random.default_rng(seed)
    temps = rng.uniform(0.2, 3.0, size=shape + (1,))
    h = (rng.standard_normal(shape + (d,)) * temps).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < p_ignore] = ignore_index
    return (torch.from_numpy(h).to(dtype), torch.from_numpy(w).to(dtype),
            torch.from_numpy(b).to(dtype) if bias else None, torch.from_numpy(t))


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _run_fused(h, w, b, t, step, **kw):
    h, w, b = _leaf(h), _leaf(w), _leaf(b)
    out = fused_linear_cggr(h, w, t, step, bias=b, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, (None if b is None else b.grad)


def _oracle(h, w, b, t, step, difficulty, **cfg):
    """Oracle loss/selection on the materialised logits and the float64 parameter gradients."""
    z = F.linear(h, w, b)                      # the logits the fused path computes chunk by chunk
    ref = oracle.cggr_loss(as_f64(z), t.numpy(), step, difficulty_override=difficulty, **cfg)
    G = ref["grad"].reshape(-1, w.shape[0])
    h64 = as_f64(h).reshape(-1, w.shape[1])
    h64 = np.where(np.isfinite(h64), h64, 0.0)  # non-finite rows have G = 0: no 0·NaN in the reference
    ref["gh"] = (G @ as_f64(w)).reshape(tuple(h.shape))
    ref["gw"] = G.T @ h64
    ref["gb"] = G.sum(axis=0)
    ref["z"] = z
    return ref


def _close(actual: torch.Tensor, expected: np.ndarray, rel: float, name: str) -> None:
    a = as_f64(actual)
    scale = max(1e-30, float(np.abs(expected).max()))
    err = float(np.abs(a - expected).max()) if a.size else 0.0
    assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3g} > {rel:g} × max|ref| {scale:.3g}"


# ------------------------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("selection", oracle.SELECTION_STRATEGIES)
def test_matches_oracle(dtype, selection):
    scoring = {"topk": "combined", "stratified": "entropy", "sequence_aware": "margin",
               "fixed_quota": "loss"}[selection]
    shape = (3, 13) if selection == "sequence_aware" else (37,)
    d = 23 if dtype == "float16" else 24
    cfg = dict(scoring=scoring, selection=selection, min_tokens_ratio=0.3, warmup_steps=100,
               min_tokens_per_sequence=2)
    h, w, b, t = _inputs(1, shape, d, 301, DT[dtype])
    out, gh, gw, gb = _run_fused(h, w, b, t, 60, **cfg, **CHUNKS)
    ref = _oracle(h, w, b, t, 60, out.scores.difficulty.numpy(), **cfg)
    # selection given identical scores: bit-identical (SPEC §11 level 1)
    np.testing.assert_array_equal(out.mask.numpy(), ref["mask"])
    assert int(out.metrics["tokens_selected"]) == int(ref["mask"].sum()) > 0
    # scores within SPEC §11 of the oracle's statistics of the same logits
    sc = oracle.score_tokens(as_f64(ref["z"]), t.numpy(), scoring)
    np.testing.assert_array_equal(out.scores.eligible.numpy(), sc["eligible"])
    for q in ("lse", "entropy", "confidence", "runner_up", "nll"):
        assert_within(getattr(out.scores.stats, q), sc["stats"][q], q)
    assert_within(out.scores.difficulty, sc["difficulty"], "difficulty")
    atol, rtol = LOSS_TOL[dtype]
    np.testing.assert_allclose(float(out.loss.detach()), ref["loss"], atol=atol, rtol=rtol)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert gh.dtype == h.dtype and gw.dtype == w.dtype and gb.dtype == b.dtype
    _close(gh, ref["gh"], GRAD_TOL[dtype], "grad_hidden")
    _close(gw, ref["gw"], GRAD_TOL[dtype], "grad_weight")
    _close(gb, ref["gb"], GRAD_TOL[dtype], "grad_bias")
    # unselected rows: exactly zero gradient
    assert (gh[~out.mask] == 0).all()
    om = ref["metrics"]
    for key in ("step", "tokens_selected", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert int(out.metrics[key]) == om[key], key
    # c̄ is a float32 sum whose order is free (SPEC §11): a few ulp
    assert float(out.metrics["effective_ratio"]) == pytest.approx(float(ref["ratio"]), abs=4e-7)


@pytest.mark.parametrize("selection", oracle.SELECTION_STRATEGIES)
def test_matches_materialised_cggr_loss(selection):
    """Fused vs ``cggr_loss(F.linear(h, W, b), ...)`` with autograd (float32): loss, grads, metrics, mask."""
    shape = (3, 13)
    h, w, b, t = _inputs(2, shape, 24, 301, torch.float32)
    cfg = dict(selection=selection, min_tokens_ratio=0.25, warmup_steps=10, min_tokens_per_sequence=2)
    out, gh, gw, gb = _run_fused(h, w, b, t, 20, **cfg, **CHUNKS)
    h2, w2, b2 = _leaf(h), _leaf(w), _leaf(b)
    loss, met = cggr_loss(F.linear(h2, w2, b2), t, 20, **cfg)
    loss.backward()
    mat_mask = select_tokens(score_tokens(F.linear(h, w, b), t).difficulty,
                             score_tokens(F.linear(h, w, b), t).eligible, met["effective_ratio"],
                             selection=selection, min_tokens_per_sequence=2)[0]
    assert torch.equal(out.mask, mat_mask)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    for a, e in ((gh, h2.grad), (gw, w2.grad), (gb, b2.grad)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4)
    for key in NUMERIC_METRIC_KEYS:
        torch.testing.assert_close(out.metrics[key], met[key], atol=1e-5, rtol=1e-5, msg=key)


def test_no_bias_and_partial_requires_grad():
    h, w, _b, t = _inputs(3, (37,), 24, 301, torch.float32, bias=False)
    cfg = dict(warmup_steps=0, min_tokens_ratio=0.4)
    wl = _leaf(w)
    out = fused_linear_cggr(h, wl, t, 0, **cfg, **CHUNKS)  # hidden does not require grad
    out.loss.backward()
    ref = _oracle(h, w, None, t, 0, out.scores.difficulty.numpy(), **cfg)
    _close(wl.grad, ref["gw"], GRAD_TOL["float32"], "grad_weight")
    hl = _leaf(h)
    out = fused_linear_cggr(hl, w, t, 0, **cfg, **CHUNKS)  # weight does not require grad
    out.loss.backward()
    _close(hl.grad, ref["gh"], GRAD_TOL["float32"], "grad_hidden")


@pytest.mark.parametrize("chunks", [dict(), dict(row_chunk_size=1, vocab_chunk_size=1),
                                    dict(row_chunk_size=37, vocab_chunk_size=301),
                                    dict(row_chunk_size=1000, vocab_chunk_size=1000),
                                    dict(memory_budget_bytes=20_000)])
def test_chunking_does_not_change_the_result(chunks):
    h, w, b, t = _inputs(4, (37,), 24, 301, torch.bfloat16)
    cfg = dict(selection="stratified", warmup_steps=0)
    base, gh0, gw0, gb0 = _run_fused(h, w, b, t, 0, **cfg, **CHUNKS)
    out, gh, gw, gb = _run_fused(h, w, b, t, 0, **cfg, **chunks)
    assert torch.equal(out.mask, base.mask)
    torch.testing.assert_close(out.loss, base.loss, atol=1e-5, rtol=1e-5)
    for a, e in ((gh, gh0), (gw, gw0), (gb, gb0)):
        torch.testing.assert_close(a, e, atol=2e-3, rtol=2e-2)


# -------------------------------------------------------------------------- ignore_index, NaN, all-ignored
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ignore_index_and_nonfinite_rows(dtype):
    h, w, b, t = _inputs(5, (37,), 24, 301, DT[dtype], ignore_index=-1, p_ignore=0.2)
    h[3] = float("nan")
    h[8, 5] = float("inf")
    h[11, 0] = float("-inf")
    t[3] = 7
    t[8] = 9
    t[11] = -1  # ignored and non-finite
    cfg = dict(ignore_index=-1, warmup_steps=0, min_tokens_ratio=0.5)
    out, gh, gw, gb = _run_fused(h, w, b, t, 0, **cfg, **CHUNKS)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    sel = out.mask
    assert not sel[3] and not sel[8] and not sel[11] and not sel[t == -1].any()
    assert (gh[~sel] == 0).all()
    assert int(out.metrics["tokens_nonfinite"]) == 2
    assert int(out.metrics["tokens_total"]) == int(((t != -1) & torch.isfinite(h).all(-1)).sum())
    ref = _oracle(h, w, b, t, 0, out.scores.difficulty.numpy(), **cfg)
    np.testing.assert_array_equal(sel.numpy(), ref["mask"])
    np.testing.assert_allclose(float(out.loss.detach()), ref["loss"], atol=1e-4, rtol=1e-5)
    _close(gw, ref["gw"], GRAD_TOL[dtype], "grad_weight")
    _close(gh, ref["gh"], GRAD_TOL[dtype], "grad_hidden")


@pytest.mark.parametrize("shape", [(37,), (0,), (2, 0)])
def test_all_ignored_or_empty_gives_zero_loss_and_zero_grads(shape):
    h, w, b, t = _inputs(6, shape, 24, 301, torch.float32)
    t = torch.full_like(t, -100)
    out, gh, gw, gb = _run_fused(h, w, b, t, 5, **CHUNKS)
    assert float(out.loss.detach()) == 0.0 and out.loss.dtype == torch.float32
    assert gh.shape == h.shape and (gh == 0).all()
    assert (gw == 0).all() and (gb == 0).all()
    assert int(out.metrics["tokens_selected"]) == 0 and int(out.metrics["tokens_total"]) == 0
    assert float(out.metrics["avg_confidence"]) == 0.0


def test_non_finite_weight_column_makes_every_row_ineligible():
    h, w, b, t = _inputs(7, (37,), 24, 301, torch.float32)
    w[17, 2] = float("nan")
    out, gh, gw, gb = _run_fused(h, w, b, t, 0, **CHUNKS)
    assert float(out.loss.detach()) == 0.0
    assert (gh == 0).all() and (gw == 0).all() and (gb == 0).all()
    assert int(out.metrics["tokens_nonfinite"]) == int((t != -100).sum())


# ------------------------------------------------------------------------------------------ the module
def test_module_step_metrics_and_state_dict():
    h, w, b, t = _inputs(8, (2, 19), 24, 301, torch.float32)
    crit = FusedLinearCGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, vocab_chunk_size=50)
    assert crit.get_metrics()["token_ratio"] == 1.0
    wl = _leaf(w)
    for _ in range(3):
        loss = crit(h, wl, t, b)
        loss.backward()
        crit.step()
    m = crit.get_metrics()
    assert tuple(m) == METRIC_KEYS and m["step"] == 2 and m["token_ratio"] == pytest.approx(0.625)
    ref_loss, ref_met = fused_linear_cggr_loss(h, w, t, 2, bias=b, min_tokens_ratio=0.25, warmup_steps=4)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), abs=1e-6)
    assert m["tokens_selected"] == int(ref_met["tokens_selected"])
    other = FusedLinearCGGRLoss(min_tokens_ratio=0.25, warmup_steps=4)
    other.load_state_dict(crit.state_dict())
    assert other.current_step == 3
    assert "vocab_chunk_size=50" in repr(crit)
    with pytest.raises(TypeError):
        FusedLinearCGGRLoss(base_loss=torch.nn.CrossEntropyLoss(reduction="none"))  # not an argument


# -------------------------------------------------------------------------------------------- the plan
def test_plan_meets_the_memory_budget_at_the_target_shape():
    N, d, V = 16384, 2048, 128256
    plan = plan_chunks(N, d, V, torch.bfloat16, selected_rows=4096)
    # With the statistics kernel the forward keeps every row and splits the vocabulary.
    assert plan.row_chunk == N and plan.forward_vocab_chunk % 128 == 0
    assert plan.row_chunk * plan.forward_vocab_chunk * 2 <= DEFAULT_MEMORY_BUDGET
    assert N * 2 * (plan.forward_vocab_chunk + 128) > 0.875 * DEFAULT_MEMORY_BUDGET  # the widest that fits
    backward = 4096 * d * (8 + 2) + 4096 * plan.vocab_chunk * (2 * 2 + 4)
    assert plan.vocab_chunk % 128 == 0 and backward <= DEFAULT_MEMORY_BUDGET
    # The in-place gradient kernel needs only the bf16 chunk: about four times the columns per step.
    kplan = plan_chunks(N, d, V, torch.bfloat16, selected_rows=4096, gradient_kernel=True)
    assert kplan.row_chunk == plan.row_chunk and kplan.vocab_chunk >= 3 * plan.vocab_chunk
    assert 4096 * d * (8 + 2) + 4096 * kplan.vocab_chunk * 2 <= DEFAULT_MEMORY_BUDGET
    # An accumulator updated in place frees one K x d float32 buffer for wider chunks.
    iplan = plan_chunks(N, d, V, torch.bfloat16, selected_rows=4096, gradient_kernel=True, inplace_accumulation=True)
    assert iplan.vocab_chunk > kplan.vocab_chunk
    assert 4096 * d * (4 + 2) + 4096 * iplan.vocab_chunk * 2 <= 0.875 * DEFAULT_MEMORY_BUDGET
    ref_plan = plan_chunks(N, d, V, torch.bfloat16, statistics_kernel=False)
    # The reference statistics take whole rows and need float32 temporaries.
    assert ref_plan.forward_vocab_chunk == V and ref_plan.row_chunk * V * (2 + 28) <= DEFAULT_MEMORY_BUDGET
    # Very many rows: blocks no narrower than 4096 columns, the rows split instead.
    big = plan_chunks(8 * N, d, V, torch.bfloat16, selected_rows=4096)
    assert big.forward_vocab_chunk == 4096 and big.row_chunk % 128 == 0 and big.row_chunk < 8 * N
    assert big.row_chunk * 4096 * 2 <= DEFAULT_MEMORY_BUDGET
    # A caller's row block: the plan sizes the columns for it.
    own = plan_chunks(N, d, V, torch.bfloat16, row_chunk=1000)
    assert own.row_chunk == 1000 and 1000 * own.forward_vocab_chunk * 2 <= DEFAULT_MEMORY_BUDGET
    assert plan_chunks(30, 3, 7, torch.float32, row_chunk=1000).row_chunk == 30
    tiny = plan_chunks(5, 3, 7, torch.float32, memory_budget_bytes=1)
    assert tiny == (1, 7, 7)
    assert plan_chunks(0, 3, 7, torch.float32) == (1, 7, 7)
    with pytest.raises(ValueError, match="row_chunk"):
        plan_chunks(5, 3, 7, torch.float32, row_chunk=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        plan_chunks(5, 3, 7, torch.float32, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="vocab_size"):
        plan_chunks(5, 3, 0, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        plan_chunks(5, 3, 7, torch.int32)


# -------------------------------------------------------------------------------- forward-only scores
@pytest.mark.parametrize("with_labels", [True, False])
def test_fused_linear_scores_match_score_tokens(with_labels):
    h, w, b, t = _inputs(9, (3, 11), 23, 301, torch.bfloat16)
    h[1, 4] = float("nan")
    vm = torch.ones(3, 11, dtype=torch.bool)
    vm[0, :3] = False
    labels = t if with_labels else None
    for scoring in ("combined", "entropy", "margin") + (("loss",) if with_labels else ()):
        got = fused_linear_scores(h, w, labels, b, scoring=scoring, valid_mask=vm, row_chunk_size=7)
        want = score_tokens(F.linear(h, w, b), labels, scoring=scoring, valid_mask=vm)
        assert torch.equal(got.eligible, want.eligible) and torch.equal(got.valid, want.valid)
        torch.testing.assert_close(got.difficulty, want.difficulty, equal_nan=True, atol=0, rtol=0)
    with pytest.raises(ValueError, match="targets"):     # aligned targets (labels = unshifted HF labels)
        fused_linear_scores(h, w, None, scoring="loss")
    with pytest.raises(ValueError, match="valid_mask"):
        fused_linear_scores(h, w, labels, valid_mask=vm[0])


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    h, w, b, t = _inputs(10, (37,), 24, 301, torch.float32)
    cases = [
        (dict(hidden=h.double()), "weight: expected dtype"),
        (dict(weight=w[:, :23]), r"weight: expected shape \(V, 24\)"),
        (dict(weight=w.t()), r"weight: expected shape \(V, 24\)"),
        (dict(weight=w[:0]), "vocabulary dimension"),
        (dict(hidden=h[0]), "hidden: expected a"),
        (dict(hidden=h.to(torch.int64)), "hidden: expected"),
        (dict(hidden=h.reshape(1, 1, 37, 24)), "hidden: expected a"),
        (dict(targets=t[:30]), r"targets: expected shape \(37,\)"),
        (dict(targets=t.float()), "targets: expected an integer dtype"),
        (dict(targets=torch.full_like(t, 301)), r"targets: every value must lie in \[0, 301\)"),
        (dict(targets=torch.full_like(t, -5)), r"targets: every value must lie in \[0, 301\)"),
        (dict(targets=t.to(torch.uint8)), r"targets: dtype torch.uint8 holds \[0, 255\] and cannot represent"),
        (dict(bias=b[:300]), r"bias: expected None or a tensor of shape \(301,\)"),
        (dict(bias=b.half()), "bias: expected dtype"),
        (dict(weight=w.to("meta")), "weight: expected device"),
        (dict(row_chunk_size=0), "row_chunk_size"),
        (dict(vocab_chunk_size=2.5), "vocab_chunk_size"),
        (dict(memory_budget_bytes=-1), "memory_budget_bytes"),
        (dict(selection="bogus"), "selection"),
        (dict(step=-1), "step"),
    ]
    for change, msg in cases:
        args = dict(hidden=h, weight=w, targets=t, step=0, bias=b)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            fused_linear_cggr(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("step"), **args)
    crit = FusedLinearCGGRLoss()
    with pytest.raises(ValueError, match="weight: expected dtype"):
        crit(h, w.half(), t)
    with pytest.raises(ValueError, match="row_chunk_size"):
        FusedLinearCGGRLoss(row_chunk_size=-3)


# ------------------------------------------------------------------------------------------ Hugging Face
def _tiny_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=301, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_hf_causal_lm_helper_matches_materialised_logits(tie):
    model = _tiny_llama(tie)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 301, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, 2] = -100
    amask = torch.ones_like(ids)
    amask[2, 7:] = 0
    cfg = dict(selection="sequence_aware", min_tokens_ratio=0.3, warmup_steps=0, min_tokens_per_sequence=2)
    crit = FusedLinearCGGRLoss(**cfg, vocab_chunk_size=100)
    loss = hf_causal_lm_cggr_loss(model, ids, labels, crit, attention_mask=amask)
    loss.backward()
    params = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # the materialised reference: full logits, shift, padding targets ignored, CGGRLoss
    logits = model(input_ids=ids, attention_mask=amask).logits
    tgt = labels[:, 1:].masked_fill(amask[:, 1:] == 0, -100)
    ref, _ = cggr_loss(logits[:, :-1], tgt, 0, **cfg)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert crit.get_metrics()["tokens_selected"] > 0
    torch.testing.assert_close(grads[[k for k, p in params.items() if p is head][0]], head.grad,
                               atol=1e-6, rtol=1e-4)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(grads[q], params[q].grad, atol=1e-6, rtol=1e-4)


def test_hf_helper_rejects_bad_arguments():
    model = _tiny_llama(False)
    ids = torch.randint(0, 301, (2, 5))
    from cggr_torch import CGGRLoss
    with pytest.raises(ValueError, match="loss_module"):
        hf_causal_lm_cggr_loss(model, ids, ids, CGGRLoss())
    with pytest.raises(ValueError, match="labels"):
        hf_causal_lm_cggr_loss(model, ids, ids[:, :4], FusedLinearCGGRLoss())
    with pytest.raises(ValueError, match="model"):
        hf_causal_lm_cggr_loss(torch.nn.Linear(3, 3), ids, ids, FusedLinearCGGRLoss())
    # A config name alone decides nothing any more: Llama ignores final_logit_softcapping, so its head is still
    # linear and the fused loss runs; a model that really transforms its logits is refused by the numeric rule
    # (tests/torch/test_head_linearity.py).
    model.config.final_logit_softcapping = 30.0
    assert torch.isfinite(hf_causal_lm_cggr_loss(model, ids, ids, FusedLinearCGGRLoss()))
    # errors name the caller's argument: labels (unshifted), not the loss module's aligned targets
    with pytest.raises(ValueError, match=r"labels: every value must lie in \[0, 301\)"):
        hf_causal_lm_cggr_loss(model, ids, torch.full_like(ids, 301), FusedLinearCGGRLoss())
    model.lm_head = type(model.lm_head)(24, 301, bias=False)   # a new head object: the rule runs again
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * 0.25)   # a real post-head scaling
    with pytest.raises(ValueError, match="model: its logits are not hidden @ lm_head.weight.T"):
        hf_causal_lm_cggr_loss(model, ids, ids, FusedLinearCGGRLoss())


def testaccumulate_matmul_adds_the_float32_product():
    """The backward's ∂h accumulator: float32 result of acc + a @ b; in place where cuBLAS' float32-output GEMM
    takes out= (CUDA), with the product unrounded there."""
    from cggr_torch import fused_linear_backward as fl
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 301, generator=g).to(dev, torch.bfloat16)
    b = torch.randn(301, 19, generator=g).to(dev, torch.bfloat16)
    acc = torch.randn(37, 19, generator=g).to(dev)
    want = acc.double() + a.double() @ b.double()
    mode = fl._mixed_addmm_mode(dev, torch.bfloat16)
    buf = acc.clone()
    got = fl.accumulate_matmul(buf, a, b)
    assert got.dtype == torch.float32 and got.shape == (37, 19)
    rel = 1e-5 if mode is not None else 1e-2       # without the mixed GEMM the product is rounded to bf16
    assert float((got.double() - want).abs().max()) <= rel * float(want.abs().max())
    if mode == "inplace" or dev.type == "cpu":
        assert got.data_ptr() == buf.data_ptr()
    assert fl.accumulates_in_place(dev, torch.float32)
    if dev.type == "cpu":
        assert mode is None and not fl.accumulates_in_place(dev, torch.bfloat16)
