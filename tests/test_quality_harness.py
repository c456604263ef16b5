"""The quality harness (``benchmarks/quality``): end-to-end cpu-smoke run, plus its pieces against independent
references (the float64 oracle, parameter counts of the real models, hand-computed statistics).

The end-to-end test runs the ``cpu-smoke`` scale in a temporary directory (PyTorch and JAX, every mode, one
seed) and checks that the run JSONs, ``results.md``, ``summary.json`` and the PNG plots exist and hold finite
numbers for every mode. It needs the shared corpora (``../shared/data`` or ``$CGGR_DATA_DIR``) and is skipped,
saying so, when they are absent.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quality import report
from benchmarks.quality.data import eval_windows, find_data_dir, train_batches
from benchmarks.quality.flops import SCORE_FLOPS_PER_LOGIT, ModelShape, step_flops
from benchmarks.quality.modes import (
    MODES,
    OptimConfig,
    TorchTrainer,
    VariantDefaults,
    build_torch_model,
    parse_variants,
)
from benchmarks.quality.run import SCALES, lr_at, main, setup_tag
from tests import oracle

TINY = ModelShape(vocab_size=61, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=24)


def _data_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------------------------- end to end
E2E_MODES = ("standard,random_token,random_sequence,cggr_token:scoring=entropy,cggr_token:scoring=margin,"
             "cggr_token:scoring=loss,cggr_token,cggr_token:selection=stratified,cggr_sequence,"
             "cggr_sequence:scoring=loss:shift=0")
E2E_JAX_MODES = "standard,random_token,cggr_token,random_sequence,cggr_sequence"


def _finite_numbers(obj: object, where: str) -> int:
    """Assert every number in a JSON tree is finite; return how many were checked."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return 0
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"non-finite number at {where}: {obj}"
        return 1
    if isinstance(obj, dict):
        return sum(_finite_numbers(v, f"{where}.{k}") for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_finite_numbers(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise AssertionError(f"unexpected JSON value at {where}: {obj!r}")


@pytest.mark.slow
@pytest.mark.skipif(not _data_available(), reason="shared corpora (../shared/data or $CGGR_DATA_DIR) not found")
def test_cpu_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "q"
    common = ["--scale", "cpu-smoke", "--out", str(out), "--seeds", "0", "--steps", "6", "--no-progress"]
    assert main(common + ["--frameworks", "torch", "--modes", E2E_MODES, "--no-report"]) == 0
    assert main(common + ["--frameworks", "jax", "--modes", E2E_JAX_MODES]) == 0

    runs = {(r["framework"], r["label"]): r for r in report.load_runs(out)}
    expected = [("torch", m) for m in E2E_MODES.split(",")] + [("jax", m) for m in E2E_JAX_MODES.split(",")]
    assert sorted(runs) == sorted(expected)
    for fw in ("torch", "jax"):
        assert {r["mode"] for (f, _), r in runs.items() if f == fw} == set(MODES)
    B, T = 8, 32
    for (fw, label), r in runs.items():
        assert _finite_numbers(r["curve"], f"{fw}/{label}.curve") > 0
        _finite_numbers(r["final"], f"{fw}/{label}.final")
        _finite_numbers(r["per_step"], f"{fw}/{label}.per_step")
        assert r["steps"] == 6 and len(r["per_step"]["loss"]) == 6 and len(r["curve"]) == 3  # p = 0, 1/2, 1
        assert r["data"]["eval_file"] == "wikitext-2/valid.txt"
        assert 3.0 < r["final"]["eval_loss"] < 7.0  # ~log(320) = 5.77 at init, a few steps of training
        assert r["final"]["tokens_per_s"] > 0 and r["final"]["flops"] > 0
        std = step_flops("standard", TINY_SMOKE(r), B, T).executed
        per_step = [c["flops"] for c in r["curve"]]
        assert per_step == sorted(per_step)
        if r["mode"] == "standard":
            assert r["final"]["flops"] == pytest.approx(6 * std)
            assert r["final"]["kept_token_fraction"] == 1.0
        elif r["mode"] in ("random_token", "cggr_token"):
            assert r["final"]["flops"] > 6 * std > r["final"]["flops_nominal"]  # dense backward, scored
            assert 0 < r["final"]["kept_token_fraction"] < 1
        else:
            assert 0 < r["final"]["kept_sequence_fraction"] < 1
            if r["mode"] == "random_sequence":
                assert r["final"]["flops"] < 6 * std
            ps = r["per_step"]
            recomputed = sum(step_flops(r["mode"], TINY_SMOKE(r), B, T, kept_sequences=k, main_rows=rows,
                                        router_layers=1).executed
                             for k, rows in zip(ps["kept_sequences"], ps["main_rows"]))
            assert r["final"]["flops"] == pytest.approx(recomputed)
            assert all(k <= rows <= B for k, rows in zip(ps["kept_sequences"], ps["main_rows"]))
    # random_token keeps exactly CGGRLoss's count: same init, same batch and same confidence at step 0.
    for fw, cggr in (("torch", "cggr_token"), ("jax", "cggr_token")):
        assert runs[(fw, "random_token")]["per_step"]["kept_tokens"][0] == \
            runs[(fw, cggr)]["per_step"]["kept_tokens"][0]
    # Same seed → same initial weights and eval set: the step-0 eval loss is shared by every torch variant.
    init = {round(r["curve"][0]["eval_loss"], 6) for (fw, _), r in runs.items() if fw == "torch"}
    assert len(init) == 1

    md = (out / "results.md").read_text()
    assert "wikitext-2/valid.txt" in md and "tinyshakespeare/input.txt" in md
    for fw, label in expected:
        assert f"`{label}`" in md
    assert "NON-FINITE" not in md
    summary = json.loads((out / "summary.json").read_text())
    labels = {(v["framework"], v["label"]) for s in summary for v in s["variants"]}
    assert labels == set(expected)
    for s in summary:
        for v in s["variants"]:
            for field in ("eval_loss", "eval_loss_at_equal_flops", "eval_loss_at_equal_wall", "flops",
                          "tokens_per_s"):
                assert all(math.isfinite(x) for x in v[field]), (v["key"], field, v[field])
    pngs = sorted(out.glob("plot_*.png"))
    assert len(pngs) == 6  # {torch, jax} x {step, wall, flops}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


def TINY_SMOKE(run: dict) -> ModelShape:  # noqa: N802 - the shape a run record describes
    m = run["model"]
    return ModelShape(m["vocab_size"], m["d_model"], m["num_layers"], m["num_heads"], m["num_kv_heads"],
                      m["ffn_dim"])


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_matmul_params_match_the_real_models() -> None:
    """P_layer / matmul parameters against the Linear weights of both frameworks' models (independent)."""
    model = build_torch_model(TINY, seq_len=8, seed=0, device="cpu")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert TINY.matmul_params == linear
    emb = model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in model.parameters()) == linear + emb + TINY.d_model * (2 * TINY.num_layers + 1)

    import jax
    from flax import nnx

    from cggr_jax.models import DecoderConfig, DecoderLM

    jm = DecoderLM(DecoderConfig(vocab_size=61, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mlp_hidden_dim=24, max_seq_len=8), rngs=nnx.Rngs(0))
    params = nnx.state(jm, nnx.Param)
    two_d = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2)
    assert two_d - 61 * 16 == TINY.matmul_params  # every matrix but the embedding table


def test_step_flops_per_mode() -> None:
    B, T = 3, 7
    P = TINY.matmul_params
    attn = 4 * TINY.num_layers * TINY.d_model * (T + 1) / 2
    full = 2 * P + attn
    assert TINY.forward_flops_per_token(2, T) == full
    router1 = 2 * (TINY.params_per_layer + 16 * 61) + 4 * 1 * 16 * (T + 1) / 2
    assert TINY.forward_flops_per_token(1, T) == router1
    score = SCORE_FLOPS_PER_LOGIT * 61 * B * (T - 1)
    std = step_flops("standard", TINY, B, T)
    assert std.executed == std.nominal == 3 * full * B * T
    tok = step_flops("cggr_token", TINY, B, T, kept_tokens=5)
    assert tok.executed == 3 * full * B * T + score
    assert tok.nominal == full * B * T + 2 * full * 5 + score
    assert step_flops("random_token", TINY, B, T, kept_tokens=5) == tok
    rs = step_flops("random_sequence", TINY, B, T, kept_sequences=1, main_rows=2)  # JAX bucket of 2
    assert (rs.executed, rs.nominal) == (3 * full * 2 * T, 3 * full * 1 * T)
    cs = step_flops("cggr_sequence", TINY, B, T, kept_sequences=1, main_rows=1, router_layers=1)
    assert cs.executed == cs.nominal == router1 * B * T + score + 3 * full * T
    with pytest.raises(ValueError, match="mode"):
        step_flops("cggr", TINY, B, T)
    with pytest.raises(ValueError, match="kept_tokens"):
        step_flops("cggr_token", TINY, B, T, kept_tokens=B * T + 1)
    with pytest.raises(ValueError, match="main_rows"):
        step_flops("cggr_sequence", TINY, B, T, kept_sequences=2, main_rows=1)
    with pytest.raises(ValueError, match="layers"):
        TINY.forward_flops_per_token(3, T)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(61, 16, 2, 4, 3, 24)


# ----------------------------------------------------------------------------------------- random_token
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dynamic", [True, False])
def test_random_token_matches_oracle(dtype: torch.dtype, dynamic: bool) -> None:
    """random_token = the oracle's CGGRLoss with the trainer's random priorities as difficulties: same k, same
    mask, same loss; ignored and non-finite rows are never selected and get exactly zero gradient."""
    v = parse_variants(f"random_token:ratio=0.3:warmup=4:dynamic={int(dynamic)}", ("torch",), VariantDefaults(),
                       TINY.num_layers)[0]
    trainer = TorchTrainer(v, TINY, seq_len=8, seed=3, optim=OptimConfig())
    trainer.step_index = 2  # mid-curriculum: base = 1 - 0.5 * 0.7 = 0.65
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 13, 61
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 2] = -100
    targets[2, :4] = -100
    logits[1, 5, 7] = float("nan")
    logits[2, 6, 0] = float("inf")
    logits[0, 9, :] = float("-inf")
    logits = logits.requires_grad_(True)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(trainer.generator.get_state())
    priority = torch.rand((B, T), generator=replay)

    loss, count = trainer._random_token_loss(logits, targets)
    ref = oracle.cggr_loss(logits.detach().float().numpy(), targets.numpy(), step=2, scoring="entropy", selection="topk",
                           dynamic_threshold=dynamic, min_tokens_ratio=0.3, warmup_steps=4,
                           difficulty_override=priority.numpy())
    assert int(count) == int(ref["mask"].sum()) == ref["k"]
    assert math.isfinite(float(loss.detach()))
    np.testing.assert_allclose(float(loss.detach()), ref["loss"], rtol=1e-5, atol=1e-5)
    loss.backward()
    grad = logits.grad.float().numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, ref["grad"], atol=2e-3 if dtype != torch.float32 else 1e-6, rtol=1e-2)
    for b, t in ((0, 2), (2, 0), (1, 5), (2, 6), (0, 9)):
        assert not ref["mask"][b, t] and (grad[b, t] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_random_token_matches_oracle(dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.quality.jax_modes import random_token_loss
    from cggr_jax.curriculum import linear_warmup_ratio

    v = parse_variants("random_token:ratio=0.3:warmup=4", ("jax",), VariantDefaults(), TINY.num_layers)[0]
    rng = np.random.default_rng(1)
    B, T, V = 2, 11, 37
    logits = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
    logits[0, 3, 5] = np.nan
    logits[1, 4, :] = -np.inf
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    targets[1, :3] = -100
    z = jnp.asarray(logits, dtype=getattr(jnp, dtype))
    step, seed = 3, 17
    schedule = linear_warmup_ratio(0.3, 4)
    (loss, count), grad = jax.jit(jax.value_and_grad(  # one compilation instead of many eager ops
        lambda x: random_token_loss(x, jnp.asarray(targets), jnp.int32(step), jnp.int32(seed), v, schedule),
        has_aux=True))(z)
    priority = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step), (B, T), dtype=jnp.float32)
    ref = oracle.cggr_loss(np.asarray(z.astype(jnp.float32)), targets, step=step, scoring="entropy", selection="topk",
                           min_tokens_ratio=0.3, warmup_steps=4, difficulty_override=np.asarray(priority))
    assert int(count) == ref["k"] == int(ref["mask"].sum())
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-5)
    g = np.asarray(grad.astype(jnp.float32))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, ref["grad"], atol=1e-6 if dtype == "float32" else 4e-3, rtol=1e-2)
    assert (g[0, 3] == 0).all() and (g[1, 4] == 0).all() and (g[1, :3] == 0).all()


def test_random_token_all_ignored_is_zero() -> None:
    v = parse_variants("random_token", ("torch",), VariantDefaults(), TINY.num_layers)[0]
    trainer = TorchTrainer(v, TINY, seq_len=8, seed=0, optim=OptimConfig())
    logits = torch.randn(2, 5, 61, requires_grad=True)
    loss, count = trainer._random_token_loss(logits, torch.full((2, 5), -100))
    loss.backward()
    assert int(count) == 0 and float(loss.detach()) == 0.0 and (logits.grad == 0).all()


# ---------------------------------------------------------------------------------------- specs, data, lr
def test_parse_variants_presets_and_errors() -> None:
    d = VariantDefaults(warmup=10, router_layers=2)
    main_torch = parse_variants("main", ("torch",), d, num_layers=8)
    assert {v.mode for v in main_torch} == set(MODES)
    assert sorted(v.scoring for v in main_torch if v.mode == "cggr_token") == ["combined", "entropy", "loss",
                                                                               "margin"]
    both = parse_variants("main,standard", ("torch", "jax"), d, num_layers=8)
    assert len(both) == len(main_torch) + 5  # duplicates dropped
    abl = parse_variants("ablations", ("torch",), d, num_layers=8)
    assert any(v.mode == "cggr_sequence" and v.router_layers == 4 for v in abl)  # {half}
    v = parse_variants("cggr_sequence:router=3:shift=0:warmup=0", ("torch",), d, num_layers=8)[0]
    assert (v.router_layers, v.shift, v.warmup, v.ratio, v.label) == (3, False, 0, 0.25,
                                                                       "cggr_sequence:warmup=0:router_layers=3:shift=0")
    assert parse_variants("standard", ("torch",), d, 8)[0].options() == {}
    for spec, match in (("cggr", "unknown mode"), ("standard:ratio=0.5", "does not use"),
                        ("cggr_token:foo=1", "unknown option"), ("cggr_token:ratio=0", r"\(0, 1\]"),
                        ("cggr_token:ratio=0.5:ratio=0.4", "twice"), ("cggr_token:scoring=x", "scoring"),
                        ("cggr_sequence:selection=stratified", "selection"),
                        ("cggr_sequence:router_layers=9", "router_layers"), ("cggr_token:dynamic=maybe", "0/1"),
                        ("random_sequence:dynamic=1", "does not use"), ("cggr_token:ratio", "key=value")):
        with pytest.raises(ValueError, match=match):
            parse_variants(spec, ("torch",), d, 8)
    with pytest.raises(ValueError, match="PyTorch-only"):
        parse_variants("cggr_sequence:shift=0", ("jax",), d, 8)
    with pytest.raises(ValueError, match="frameworks"):
        parse_variants("standard", ("tf",), d, 8)


def test_batches_and_eval_windows() -> None:
    data = np.arange(1000, dtype=np.int32)
    a = [next(it) for it in [train_batches(data, 4, 9, seed=5)] for _ in range(3)]
    b = [next(it) for it in [train_batches(data, 4, 9, seed=5)] for _ in range(3)]
    assert all((x == y).all() for x, y in zip(a, b)) and a[0].shape == (4, 9) and a[0].dtype == np.int32
    assert all((np.diff(x, axis=1) == 1).all() for x in a)  # contiguous windows
    w = eval_windows(data, 5, 10)
    assert w.shape == (5, 10) and w[0, 0] == 0 and w[-1, -1] == 999
    assert (np.diff(w[:, 0]) > 0).all()
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(data, 2, 1)
    with pytest.raises(ValueError, match="at least seq_len"):
        eval_windows(data[:5], 2, 10)
    with pytest.raises(FileNotFoundError, match="lacks"):
        find_data_dir("/nonexistent/dir")


def test_lr_schedule() -> None:
    assert lr_at(0.0, 1.0, 0.1) == pytest.approx(1e-3)
    assert lr_at(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(1.0, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(2.0, 1.0, 0.1) == pytest.approx(0.1)
    xs = np.linspace(0.1, 1.0, 50)
    ys = [lr_at(x, 2.0, 0.1) for x in xs]
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    assert lr_at(0.0, 1.0, 0.0) == pytest.approx(1.0)


def test_setup_tag_separates_setups() -> None:
    s = SCALES["cpu-smoke"]
    tags = {setup_tag(s, "steps", None), setup_tag(s, "flops", None), setup_tag(s, "time", 1.0),
            setup_tag(s, "time", 2.0), setup_tag(replace(s, steps=9), "steps", None)}
    assert len(tags) == 5
    assert setup_tag(replace(s, seeds=(5,)), "steps", None) == setup_tag(s, "steps", None)  # seeds do not matter


def test_bad_cli_arguments(tmp_path: Path) -> None:
    for argv, match in ((["--seeds", "a"], "seeds"), (["--shard", "2/2"], "shard"),
                        (["--eval-sequences", "10", "--eval-batch-size", "4"], "multiple"),
                        (["--router-layers", "3"], "exceeds"), (["--modes", "bogus"], "unknown mode")):
        with pytest.raises(ValueError, match=match):
            main(["--scale", "cpu-smoke", "--out", str(tmp_path), "--no-progress", *argv])


# ---------------------------------------------------------------------------------------------- report
def _fake_run(fw: str, mode: str, label: str, seed: int, final: float, flops: float, options: dict) -> dict:
    curve = [{"step": 0, "flops": 0.0, "flops_nominal": 0.0, "wall_s": 0.0, "eval_loss": 6.0},
             {"step": 10, "flops": flops / 2, "flops_nominal": flops / 4, "wall_s": 1.0, "eval_loss": final + 1.0},
             {"step": 20, "flops": flops, "flops_nominal": flops / 2, "wall_s": 2.0, "eval_loss": final}]
    for c in curve:
        c.update(progress=c["step"] / 20, tokens_seen=c["step"] * 10, eval_ppl=math.exp(c["eval_loss"]),
                 train_loss=None)
    return {
        "schema": "cggr-quality-run/1", "framework": fw, "mode": mode, "label": label, "key": f"{fw}/{label}",
        "variant": {"framework": fw, "mode": mode, "label": label, "options": options}, "seed": seed,
        "scale": {"d_model": 1, "num_layers": 1, "seq_len": 2, "batch_size": 1, "steps": 20, "vocab_size": 256,
                  "eval_sequences": 1, "lr_warmup": 0.1, "router_layers": 1, "curriculum_fraction": 0.25,
                  "seeds": [0, 1, 2]},
        "budget": {"kind": "steps", "total": 20.0, "hit_step_cap": False}, "device": "cpu", "amp": "fp32",
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "model": {"d_model": 1, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "ffn_dim": 1, "vocab_size": 256,
                  "params": 1, "matmul_params": 1},
        "data": {"split": "train on A; evaluate on B", "train_tokens": 100, "eval_tokens": 10, "tokenizer": "bpe"},
        "versions": {"python": "3"}, "git_commit": None, "steps": 20, "curve": curve,
        "final": {"eval_loss": final, "eval_ppl": math.exp(final), "flops": flops, "flops_nominal": flops / 2,
                  "train_wall_s": 2.0, "first_step_s": 0.1, "tokens_per_s": 100.0, "kept_token_fraction": 0.5,
                  "kept_sequence_fraction": 1.0, "epochs": 2.0},
    }


def test_report_paired_statistics_and_plots(tmp_path: Path) -> None:
    opts_r = {"ratio": 0.25, "warmup": 5, "dynamic": True, "sensitivity": 0.5}
    opts_c = {**opts_r, "scoring": "combined", "selection": "topk"}
    std = {0: 4.0, 1: 4.2, 2: 4.1}
    rnd = {0: 4.05, 1: 4.2, 2: 4.2}              # diffs vs standard: +0.05, 0, +0.1 -> inconclusive
    cg = {0: 3.9, 1: 4.11, 2: 4.0}               # diffs vs standard: -0.1, -0.09, -0.1 -> better
    runs = []
    for s in range(3):
        runs.append(_fake_run("torch", "standard", "standard", s, std[s], 100.0, {}))
        runs.append(_fake_run("torch", "random_token", "random_token", s, rnd[s], 100.0, opts_r))
        runs.append(_fake_run("torch", "random_token", "random_token:ratio=0.5", s, 9.0, 100.0,
                              {**opts_r, "ratio": 0.5}))
        runs.append(_fake_run("torch", "cggr_token", "cggr_token", s, cg[s], 50.0, opts_c))
    (tmp_path / "runs").mkdir()
    for i, r in enumerate(runs):
        (tmp_path / "runs" / f"r{i}.json").write_text(json.dumps(r))
    [section] = report.summarize(report.load_runs(tmp_path))
    by = {v["label"]: v for v in section["variants"]}
    assert [v["label"] for v in section["variants"]][0] == "standard"
    c = by["cggr_token"]
    assert c["baseline"] == "torch/random_token"  # the ratio-0.25 baseline, not the ratio-0.5 one
    d = np.array([cg[s] - std[s] for s in range(3)])
    assert c["vs_standard"]["final"]["mean"] == pytest.approx(d.mean())
    assert c["vs_standard"]["final"]["std"] == pytest.approx(d.std(ddof=1))
    assert c["vs_standard"]["final"]["verdict"] == "better"
    assert by["random_token"]["vs_standard"]["final"]["verdict"] == "inconclusive"
    assert c["eval_loss"][0] == pytest.approx(np.mean(list(cg.values())))
    # Equal FLOPs = 50 (the cheapest run's end): cggr is read at its end, standard at its midpoint (loss + 1).
    assert section["common"]["torch"]["flops"] == 50.0
    assert c["eval_loss_at_equal_flops"][0] == pytest.approx(np.mean(list(cg.values())))
    assert by["standard"]["eval_loss_at_equal_flops"][0] == pytest.approx(np.mean(list(std.values())) + 1.0)
    assert c["vs_standard"]["equal_flops"]["verdict"] == "better"
    assert report.t95(1) == pytest.approx(12.706) and report.t95(100) == 1.96
    with pytest.raises(ValueError, match="dof"):
        report.t95(0)
    one = report._paired({0: 1.0}, {0: 2.0})
    assert one is not None and one["verdict"] == "inconclusive (1 seed)"
    assert report._paired({0: 1.0}, {1: 2.0}) is None

    written = report.write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "better" in md and "`random_token:ratio=0.5`" in md and "mid-schedule" in md
    assert {p.name for p in written} >= {"results.md", "summary.json", "plot_s1_torch_step.png",
                                          "plot_s1_torch_wall.png", "plot_s1_torch_flops.png"}
    bad = _fake_run("torch", "cggr_token", "cggr_token", 3, 4.0, 50.0, {**opts_c, "ratio": 0.5})
    (tmp_path / "runs" / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="different options"):
        report.summarize(report.load_runs(tmp_path))
