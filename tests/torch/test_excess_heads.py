"""SPEC §3.1 ``scoring='excess'`` in the fused LM head, the distributed loss (SPEC §13) and the Hugging Face
helper of ``cggr_torch``.

References:

* ``CGGRLoss(scoring='excess')`` / ``cggr_loss`` on the materialised logits ``F.linear(hidden, W, b)`` with
  autograd (whole-row forward blocks: the same logits, so masks and metrics are compared exactly);
* the float64 oracle (``reference_nll=``, fed the fused path's own float32 difficulties) for chunked blocks;
* the single-process loss and selection on the concatenated batch for the 2-process gloo run;
* a manual shift of the labels-aligned reference for ``hf_causal_lm_cggr_loss``.

Odd sizes (N = 37 or 3 × 13, d = 23, V = 301), fp32/bf16 (fp16 against the oracle), NaN/±inf references
(not eligible, counted in ``tokens_nonfinite``), ignore_index, all-ignored batches and the argument errors.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cggr_torch import CGGRLoss, cggr_loss, dispatch, score_tokens, select_tokens
from cggr_torch import distributed as D
from cggr_torch.fused_linear import (
    FusedLinearCGGRLoss,
    fused_linear_cggr,
    fused_linear_cggr_loss,
    fused_linear_scores,
)
from cggr_torch.causal_lm import hf_causal_lm_cggr_loss
from cggr_torch.loss import NUMERIC_METRIC_KEYS
from tests import oracle
from tests.torch import as_f64, kernel_test_device

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}   # relative to the largest reference entry
WHOLE = dict(row_chunk_size=1000, vocab_chunk_size=1000)          # one block: the materialised logits
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)
V, D_HID = 301, 23


def _inputs(seed: int, shape: tuple[int, ...], dtype: torch.dtype, *, ignore_index: int = -100,
            ref_dtype: torch.dtype = torch.float32):
    """hidden, weight, bias, targets and a reference with NaN / +inf / −inf at valid tokens and NaN at an
    ignored one (3 non-finite valid references)."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal(shape + (D_HID,)) * rng.uniform(0.2, 3.0, size=shape + (1,))
    w = rng.standard_normal((V, D_HID)) * (1.5 / np.sqrt(D_HID))
    b = rng.standard_normal(V) * 0.5
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < 0.15] = ignore_index
    ref = rng.uniform(-1.0, 6.0, size=shape)
    flat_t, flat_r = t.reshape(-1), ref.reshape(-1)
    flat_t[[1, 4, 9]] = [3, 5, 7]
    flat_r[[1, 4, 9]] = [np.nan, np.inf, -np.inf]
    flat_t[6], flat_r[6] = ignore_index, np.nan          # ignored: its reference is never read, never counted
    as_t = lambda x: torch.from_numpy(x.astype(np.float32)).to(dtype)  # noqa: E731
    return as_t(h), as_t(w), as_t(b), torch.from_numpy(t), torch.from_numpy(ref).to(ref_dtype)


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _fused(h, w, b, t, ref, step, **kw):
    h, w, b = _leaf(h), _leaf(w), _leaf(b)
    out = fused_linear_cggr(h, w, t, step, bias=b, scoring="excess", reference_nll=ref, **kw)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


def _close(actual: torch.Tensor, expected, rel: float, name: str) -> None:
    a = actual.detach().double().numpy()
    e = expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    scale = max(1e-30, float(np.abs(e).max())) if e.size else 1.0
    err = float(np.abs(a - e).max()) if a.size else 0.0
    assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3g} > {rel:g} × max|ref| {scale:.3g}"


# ------------------------------------------------------------------------ fused head == CGGRLoss(excess)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,selection", [((37,), "topk"), ((37,), "stratified"), ((3, 13), "sequence_aware"),
                                             ((3, 13), "fixed_quota")])
def test_fused_excess_equals_cggr_loss_on_materialised_logits(dtype, shape, selection):
    h, w, b, t, ref = _inputs(1, shape, DT[dtype])
    cfg = dict(selection=selection, min_tokens_ratio=0.3, warmup_steps=10, min_tokens_per_sequence=2)
    out, grads = _fused(h, w, b, t, ref, 7, **cfg, **WHOLE)
    leaves = [_leaf(x) for x in (h, w, b)]
    crit = CGGRLoss(scoring="excess", **cfg)
    crit.set_step(7)
    loss = crit(F.linear(*leaves), t, reference_nll=ref)
    loss.backward()
    _, met = cggr_loss(F.linear(h, w, b), t, 7, scoring="excess", reference_nll=ref, **cfg)
    assert crit.get_metrics()["tokens_selected"] == int(met["tokens_selected"]) > 0
    mat_mask = _materialised_mask(h, w, b, t, ref, met["effective_ratio"], cfg)
    assert torch.equal(out.mask, mat_mask) and int(mat_mask.sum()) == int(met["tokens_selected"])
    for key in NUMERIC_METRIC_KEYS:
        torch.testing.assert_close(out.metrics[key], met[key], atol=1e-6, rtol=1e-6, msg=key)
    assert int(out.metrics["tokens_nonfinite"]) == 3
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    for name, a, leaf in zip(("hidden", "weight", "bias"), grads, leaves):
        _close(a, leaf.grad, GRAD_TOL[dtype], name)
    flat_mask = out.mask.reshape(-1)
    assert not flat_mask[[1, 4, 6, 9]].any()               # non-finite / ignored references never selected
    assert (grads[0].reshape(-1, D_HID)[~flat_mask] == 0).all()


def _materialised_mask(h, w, b, t, ref, ratio, cfg):
    sc = score_tokens(F.linear(h, w, b), t, scoring="excess", reference_nll=ref)
    return select_tokens(sc.difficulty, sc.eligible, ratio, selection=cfg["selection"],
                         min_tokens_per_sequence=cfg["min_tokens_per_sequence"])[0]


@pytest.mark.parametrize("dtype,ref_dtype", [("float32", torch.float64), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16)])
def test_chunked_fused_excess_matches_oracle(dtype, ref_dtype):
    """Blocks that divide neither N nor V: the oracle's selection on the fused difficulties, its excess
    scores within SPEC §11, its loss and parameter gradients."""
    h, w, b, t, ref = _inputs(2, (3, 13), DT[dtype], ref_dtype=ref_dtype)
    cfg = dict(selection="sequence_aware", min_tokens_ratio=0.3, warmup_steps=100, min_tokens_per_sequence=1)
    out, (gh, gw, gb) = _fused(h, w, b, t, ref, 60, **cfg, **CHUNKS)
    r64 = ref.double().numpy()
    z = F.linear(h, w, b)
    exp = oracle.cggr_loss(as_f64(z), t.numpy(), 60, scoring="excess", reference_nll=r64,
                           difficulty_override=out.scores.difficulty.numpy(), **cfg)
    np.testing.assert_array_equal(out.mask.numpy(), exp["mask"])
    sc = oracle.score_tokens(as_f64(z), t.numpy(), "excess", reference_nll=r64)
    e = sc["eligible"]
    np.testing.assert_array_equal(out.scores.eligible.numpy(), e)
    err = np.abs(out.scores.difficulty.double().numpy() - sc["difficulty"])[e]
    bound = (3e-4 + 1e-5 * np.abs(sc["difficulty"]) + 1e-5 * np.abs(sc["stats"]["nll"]) + 2.0 ** -24 * np.abs(r64))
    assert (err <= bound[e]).all()
    # exactly nll ⊖ float32(ref) of the fused statistics
    d32 = (out.scores.stats.nll - ref.to(torch.float32)).numpy()
    np.testing.assert_array_equal(out.scores.difficulty.numpy()[e], d32[e])
    np.testing.assert_allclose(float(out.loss.detach()), exp["loss"], atol=1e-4, rtol=1e-5)
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite"):
        assert int(out.metrics[key]) == exp["metrics"][key], key
    G = exp["grad"].reshape(-1, V)
    _close(gh, (G @ as_f64(w)).reshape(tuple(h.shape)), GRAD_TOL[dtype], "hidden")
    _close(gw, G.T @ as_f64(h).reshape(-1, D_HID), GRAD_TOL[dtype], "weight")
    _close(gb, G.sum(0), GRAD_TOL[dtype], "bias")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_path_reads_the_reference(dtype):
    """The Triton statistics and chunk-gradient kernels (interpreted on CPU): the reference path's result."""
    dev = kernel_test_device()
    h, w, b, t, ref = _inputs(3, (37,), DT[dtype])
    args = [x.to(dev) for x in (h, w, b, t, ref)]
    cfg = dict(warmup_steps=0, min_tokens_ratio=0.4, **CHUNKS)
    with dispatch.force("kernel"):
        assert dispatch.use_kernels(args[0])     # the fused head's statistics and gradient kernels run
        got, g_k = _fused(*args, 0, **cfg)
    with dispatch.force("reference"):
        want, g_r = _fused(*args, 0, **cfg)
    assert torch.equal(got.mask.cpu(), want.mask.cpu())
    assert int(got.metrics["tokens_nonfinite"]) == int(want.metrics["tokens_nonfinite"]) == 3
    torch.testing.assert_close(got.loss.cpu(), want.loss.cpu(), atol=1e-6, rtol=1e-5)
    for name, a, e in zip(("hidden", "weight", "bias"), g_k, g_r):
        _close(a.cpu(), e.cpu(), {"float32": 1e-5, "bfloat16": 2e-2}[dtype], name)


def test_ignore_index_and_all_ignored():
    h, w, b, t, ref = _inputs(4, (37,), torch.float32, ignore_index=-1)
    out, (gh, gw, gb) = _fused(h, w, b, t, ref, 0, ignore_index=-1, warmup_steps=0, **CHUNKS)
    assert not out.mask[t == -1].any() and int(out.metrics["tokens_nonfinite"]) == 3
    assert int(out.metrics["tokens_total"]) == int(((t != -1) & torch.isfinite(ref)).sum())
    t_none = torch.full_like(t, -1)
    nan_ref = torch.full_like(ref, float("nan"))        # never read: every token is ignored
    out, (gh, gw, gb) = _fused(h, w, b, t_none, nan_ref, 0, ignore_index=-1, warmup_steps=0, **CHUNKS)
    assert float(out.loss.detach()) == 0.0
    assert (gh == 0).all() and (gw == 0).all() and (gb == 0).all()
    assert int(out.metrics["tokens_total"]) == 0 and int(out.metrics["tokens_nonfinite"]) == 0
    e = torch.zeros(2, 0, D_HID)
    out = fused_linear_cggr(e, w, torch.zeros(2, 0, dtype=torch.long), 0, scoring="excess",
                            reference_nll=torch.zeros(2, 0))
    assert float(out.loss) == 0.0


def test_module_and_scores_take_the_reference():
    h, w, b, t, ref = _inputs(5, (3, 13), torch.float32)
    crit = FusedLinearCGGRLoss(scoring="excess", warmup_steps=4, min_tokens_ratio=0.25, vocab_chunk_size=50)
    crit.set_step(2)
    loss = crit(h, w, t, b, reference_nll=ref)
    want, met = fused_linear_cggr_loss(h, w, t, 2, bias=b, scoring="excess", reference_nll=ref, warmup_steps=4,
                                       min_tokens_ratio=0.25)
    assert float(loss) == pytest.approx(float(want), abs=1e-6)
    m = crit.get_metrics()
    assert m["scoring"] == "excess" and m["tokens_nonfinite"] == 3 == int(met["tokens_nonfinite"])
    got = fused_linear_scores(h, w, t, b, scoring="excess", reference_nll=ref, **WHOLE)
    exp = score_tokens(F.linear(h, w, b), t, scoring="excess", reference_nll=ref)
    assert torch.equal(got.eligible, exp.eligible) and torch.equal(got.valid, exp.valid)
    torch.testing.assert_close(got.difficulty, exp.difficulty, equal_nan=True)


# ------------------------------------------------------------------------------------------ bad input
def _bad_calls(h, w, b, t):
    """Each entry point that takes reference_nll, as ``fn(scoring, reference_nll)``."""
    return {
        "fused_linear_cggr": lambda s, r: fused_linear_cggr(h, w, t, 0, bias=b, scoring=s, reference_nll=r),
        "FusedLinearCGGRLoss": lambda s, r: FusedLinearCGGRLoss(scoring=s)(h, w, t, b, reference_nll=r),
        "fused_linear_scores": lambda s, r: fused_linear_scores(h, w, t, b, scoring=s, reference_nll=r),
        "distributed.cggr_loss": lambda s, r: D.cggr_loss(F.linear(h, w, b), t, 0, scope="local", scoring=s,
                                                          reference_nll=r),
        "DistributedCGGRLoss": lambda s, r: D.DistributedCGGRLoss(scoring=s, scope="local")(F.linear(h, w, b), t,
                                                                                            reference_nll=r),
        "global scope": lambda s, r: D.cggr_loss(F.linear(h, w, b), t, 0, scoring=s, reference_nll=r),
    }


@pytest.mark.parametrize("entry", list(_bad_calls(*[None] * 4)))
def test_bad_reference_is_a_value_error_naming_it(entry):
    h, w, b, t, _ = _inputs(6, (2, 5), torch.float32)
    call = _bad_calls(h, w, b, t)[entry]
    with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs"):
        call("excess", None)
    with pytest.raises(ValueError, match=r"reference_nll: only scoring='excess'.*scoring='combined'"):
        call("combined", torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 5\).*got \(10,\)"):
        call("excess", torch.zeros(10))
    with pytest.raises(ValueError, match="reference_nll: expected a floating dtype"):
        call("excess", torch.zeros(2, 5, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ Hugging Face
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_helper_shifts_the_labels_aligned_reference():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, 2] = -100
    amask = torch.ones_like(ids)
    amask[2, 7:] = 0
    ref = torch.rand(3, 9, generator=g) * 4.0         # ref[b, t]: the reference loss of predicting labels[b, t]
    ref[:, 0] = float("nan")                          # labels[:, 0] is never predicted: never read
    ref[1, 4] = float("inf")                          # a valid next token: not eligible, counted
    cfg = dict(scoring="excess", selection="topk", min_tokens_ratio=0.3, warmup_steps=0)
    crit = FusedLinearCGGRLoss(**cfg, vocab_chunk_size=100)
    loss = hf_causal_lm_cggr_loss(model, ids, labels, crit, attention_mask=amask, reference_nll=ref)
    assert crit.get_metrics()["tokens_nonfinite"] == 1 and crit.get_metrics()["tokens_selected"] > 0
    # the manual shift on the materialised logits
    logits = model(input_ids=ids, attention_mask=amask).logits
    tgt = labels[:, 1:].masked_fill(amask[:, 1:] == 0, -100)
    want, _ = cggr_loss(logits[:, :-1], tgt, 0, reference_nll=ref[:, 1:], **cfg)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    # an unshifted (mis-aligned) reference gives another selection: the check can fail
    wrong, _ = cggr_loss(logits[:, :-1], tgt, 0, reference_nll=torch.nan_to_num(ref[:, :-1]), **cfg)
    assert abs(float(wrong.detach()) - float(want.detach())) > 1e-3
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(3, 9\)"):
        hf_causal_lm_cggr_loss(model, ids, labels, crit, reference_nll=ref[:, 1:])
    with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs"):
        hf_causal_lm_cggr_loss(model, ids, labels, crit)
    with pytest.raises(ValueError, match=r"reference_nll: only scoring='excess'"):
        hf_causal_lm_cggr_loss(model, ids, labels, FusedLinearCGGRLoss(), reference_nll=ref)


# ------------------------------------------------------------------------- 2 processes (gloo), SPEC §13
def _full_batch(seed: int, world: int, shape_r: tuple[int, ...], Vd: int = 11):
    rng = np.random.default_rng(seed)
    full = (shape_r[0] * world,) + tuple(shape_r[1:])
    z = torch.from_numpy((rng.standard_normal(full + (Vd,)) * 2.0 / rng.uniform(0.3, 3.0, full + (1,)))
                         .astype(np.float32))
    t = torch.from_numpy(rng.integers(0, Vd, full))
    t[torch.from_numpy(rng.random(full) < 0.2)] = -100
    ref = torch.from_numpy(rng.uniform(-1.0, 5.0, full).astype(np.float32))
    flat_t, flat_r = t.view(-1), ref.view(-1)
    flat_t[[0, 5]] = 1
    flat_r[0], flat_r[5] = float("nan"), float("inf")    # rank 0 holds both (N per rank ≥ 6)
    return z, t, ref


def _slice(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def _dp_case(rank: int, world: int) -> None:
    for i, (shape_r, cfg) in enumerate([((2, 7), dict(selection="sequence_aware", min_tokens_per_sequence=2)),
                                        ((9,), dict(selection="topk")), ((3, 5), dict(selection="stratified"))]):
        cfg = dict(scoring="excess", warmup_steps=20, **cfg)
        z, t, ref = _full_batch(10 + i, world, shape_r)
        x = _slice(z, world, rank).clone().requires_grad_(True)
        loss, met = D.cggr_loss(x, _slice(t, world, rank), 9, reference_nll=_slice(ref, world, rank), **cfg)
        loss.backward()
        # single process, concatenated batch: the same selection (at the DP ratio), loss and gradient share
        sc = score_tokens(z, t, scoring="excess", reference_nll=ref)
        mask = select_tokens(sc.difficulty, sc.eligible, met["effective_ratio"], selection=cfg["selection"],
                             min_tokens_per_sequence=cfg.get("min_tokens_per_sequence", 1))[0]
        zl = z.clone().requires_grad_(True)
        want, wmet = cggr_loss(zl, t, 9, reference_nll=ref, **cfg)
        want.backward()
        mask_r = _slice(mask, world, rank)
        assert int(met["tokens_selected"]) == int(mask.sum()) > 0
        assert int(met["tokens_selected_local"]) == int(mask_r.sum())
        assert int(met["tokens_nonfinite"]) == int(wmet["tokens_nonfinite"]) == 2
        torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x.grad, world * _slice(zl.grad, world, rank), atol=world * 1e-5, rtol=1e-4)
        assert (x.grad[~mask_r] == 0).all()
    # local scope and the module: the plain loss of the shard with its own reference
    z, t, ref = _full_batch(20, world, (2, 5))
    crit = D.DistributedCGGRLoss(scoring="excess", scope="global", warmup_steps=0)
    g_loss = crit(_slice(z, world, rank), _slice(t, world, rank), _slice(ref, world, rank))
    want, _ = cggr_loss(z, t, 0, scoring="excess", reference_nll=ref, warmup_steps=0)
    torch.testing.assert_close(g_loss, want, atol=1e-5, rtol=1e-4)
    loc, _ = D.cggr_loss(_slice(z, world, rank), _slice(t, world, rank), 0, scope="local", scoring="excess",
                         reference_nll=_slice(ref, world, rank), warmup_steps=0)
    mine, _ = cggr_loss(_slice(z, world, rank), _slice(t, world, rank), 0, scoring="excess",
                        reference_nll=_slice(ref, world, rank), warmup_steps=0)
    assert float(loc) == float(mine)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        try:
            _dp_case(rank, world)
            result = "ok"
        except Exception:  # reported to the parent test
            result = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_global_scope_with_excess_equals_the_concatenated_batch():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world,
                           start_method="spawn", join=True)
        reports = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                reports.append(json.load(f))
    failures = [f"rank {r}:\n{rep}" for r, rep in enumerate(reports) if rep != "ok"]
    assert not failures, "\n".join(failures)
