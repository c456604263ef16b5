"""Round 4 of the quality study (PROTOCOL.md "Round 4 (M)"; ``benchmarks/quality/round4.py``, ``jax_arm.py``) on CPU.

At the ``tiny`` scale with a synthetic corpus in the pycode format (as ``tests/test_quality_harness.py``) and a
synthetic per-chunk reference table standing in for round 3's: the plan's dry-run listing, the whole plan end to
end (sweeps with rule 1, paired units, budgets N/2 and 2N, the JAX arm in its child process), the `test` split
(read by round 4's runs but not its sweep runs, never by another plan; the value checked against an independent
computation), resume, ``--plan-only``, the analysis (paired `test` table, the JAX arm's seed band), and the JAX
arm's pieces: its LR schedule against ``study.lr_at``, and its first step's selection against a NumPy
re-computation of its router's excess ranking and against the PyTorch ``CGGRModel`` arm given the same weights.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quality import analyze, pycode, round4, study

V = 64


def _write_corpus(root: Path) -> Path:
    """A pycode-format folder of small splits (structured random tokens: a repeating motif plus noise)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 200), ("ref", 40), ("val", 24), ("test", 11)):
        base = np.resize(rng.integers(1, V, 17), (n, 1025))
        arr = np.where(rng.random((n, 1025)) < 0.3, rng.integers(0, V, (n, 1025)), base).astype("<u2")
        raw = arr.tobytes()
        xz = lzma.compress(raw)
        (root / f"{name}.u16.xz").write_bytes(xz)
        splits[name] = {"file": f"{name}.u16.xz", "dtype": "<u2", "shape": [n, 1025],
                        "sha256_raw": hashlib.sha256(raw).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"name": "synthetic", "tokenizer": {"vocab_size": V},
                                                    "splits": splits}))
    return root


def _write_ref(root: Path, nan_ids=(), spread: float = 2.0) -> Path:
    """A stand-in for round 3's committed reference folder: ``refnll_train.npy`` (one value per train chunk, uniform
    in [2, 2 + spread]) and ``ref.json``."""
    root.mkdir(parents=True, exist_ok=True)
    table = np.random.default_rng(1).uniform(2.0, 2.0 + spread, 200).astype(np.float32)
    table[list(nan_ids)] = np.nan
    np.save(root / "refnll_train.npy", table)
    (root / "ref.json").write_text(json.dumps({"arch": {"name": "S2"}, "final": {"val_loss": 2.648},
                                               "commit": "b1c0792"}))
    return root


def _argv(tmp_path: Path, data: Path, ref: Path, steps: int = 4) -> list:
    return ["--scale", "tiny", "--round", "round4", "--out", str(tmp_path / "out"), "--data-dir", str(data),
            "--ref-dir", str(ref), "--ref-store", str(tmp_path / "store"), "--device", "cpu", "--no-progress",
            "--steps", str(steps)]


def _runs(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


# ------------------------------------------------------------------------------------------- the plan
def test_round4_dry_run_lists_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    assert study.main(_argv(tmp_path, data, ref) + ["--dry-run", "--seeds", "0,1,2"]) == 0
    out = capsys.readouterr().out
    would = [ln.split("would run ")[1].split(" ")[0] for ln in out.splitlines() if "would run " in ln]
    s = study.SCALES["tiny"]
    lr = {"std_B": s.lr_grid_B, "std_k": s.lr_grid_k}
    sweep = [study.RunSpec(a, 0, x, 4).key() for a in ("std_B", "std_k") for x in lr[a]]
    assert would[:len(sweep)] == sweep
    lr_B, lr_k = s.lr_grid_B[1], s.lr_grid_k[1]          # the dry run's placeholders
    expected = []
    for seed in (0, 1, 2):
        expected += [study.RunSpec(a, seed, lr_B if a == "std_B" else lr_k, 4).key()
                     for a in ("std_B", "std_k", "random_subset", "cggr_excess_r1_s4")]
        expected += [study.RunSpec("std_k", seed, lr_k, n, tag="budget").key() for n in (2, 8)]   # N/2, 2N
    expected.append(study.RunSpec("cggr_excess_r1_s4_jax", 0, lr_k, 4).key())
    assert would[len(sweep):] == [k for k in expected if k not in sweep]
    assert "N16" not in out                                                   # no 4N budget
    for absent in ("gate", "token", "+noise", "reference model", "oracle"):  # no gate, token, noise arms, no ref
        assert absent not in " ".join(would) and "would train the reference" not in out
    assert not list((tmp_path / "out" / "runs").glob("*.json"))


def test_round4_plan_end_to_end_tiny(tmp_path: Path) -> None:
    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    out = tmp_path / "out"
    argv = _argv(tmp_path, data, ref)
    assert study.main(argv + ["--export", str(tmp_path / "r4.tar.gz")]) == 0
    runs = _runs(out)
    s = study.SCALES["tiny"]
    summary = analyze.summarize(out)
    lr_B, lr_k = summary["tuned_lr"]["std_B"], summary["tuned_lr"]["std_k"]
    for arm, grid in (("std_B", s.lr_grid_B), ("std_k", s.lr_grid_k)):   # 2-point grids: rule 1 adds one
        lrs = sorted(r["lr"] for r in runs.values() if r["arm"] == arm and r["seed"] == 0 and not r["tag"]
                     and r["accounting"]["optimizer_steps"] == 4)
        assert len(lrs) == 3 and set(grid) < set(lrs)
    tuned = {study.RunSpec("std_B", 0, lr_B, 4).key(), study.RunSpec("std_k", 0, lr_k, 4).key()}
    n_test = 11     # tiny slices val to 16 chunks; the synthetic test split has 11: all of them
    for key, r in runs.items():
        assert r["reference"]["sha256"] == hashlib.sha256((ref / "refnll_train.npy").read_bytes()).hexdigest()
        sweep = round4.is_sweep(study.RunSpec(r["arm"], r["seed"], r["lr"], r["accounting"]["optimizer_steps"],
                                              tag=r["tag"]), replace_steps(s, 4))
        if sweep and key not in tuned:
            assert "test_loss" not in r["final"], key          # the sweep compares rates without reading test
        else:
            assert math.isfinite(r["final"]["test_loss"]) and r["final"]["test_chunks"] == n_test, key
        assert r["final"].get("test_source") == ("sweep checkpoint" if key in tuned else None)
    assert not list((tmp_path / "store" / "sweep").glob("*.pt"))    # decided sweeps drop their weights
    for seed in s.seeds:
        for arm, lr in (("std_B", lr_B), ("std_k", lr_k), ("random_subset", lr_k), ("cggr_excess_r1_s4", lr_k)):
            r = runs[study.RunSpec(arm, seed, lr, 4).key()]
            assert r["accounting"]["trained_rows"] == (s.batch if arm == "std_B" else s.keep) * 4
        for n in (2, 8):
            assert study.RunSpec("std_k", seed, lr_k, n, tag="budget").key() in runs
        assert study.RunSpec("std_k", seed, lr_k, 16, tag="budget").key() not in runs
    assert not any(r["noise"] or r["arm"] in study.TOKEN_ARMS for r in runs.values())
    assert not (out / "gate.json").exists() and (tmp_path / "r4.tar.gz").stat().st_size > 0
    # The JAX arm: the PyTorch runs' schema, plus its framework and versions; the same stream and evaluations.
    j = runs[study.RunSpec("cggr_excess_r1_s4_jax", 0, lr_k, 4).key()]
    t = runs[study.RunSpec("cggr_excess_r1_s4", 0, lr_k, 4).key()]
    assert j["framework"] == "jax" and {"jax", "flax", "optax"} <= set(j["versions"])
    assert set(t) - {"cggr_metrics_last"} <= set(j) and set(t["final"]) <= set(j["final"])
    assert set(t["accounting"]) == set(j["accounting"]) and set(t["selection"]) <= set(j["selection"])
    assert [c["step"] for c in j["curve"]] == [c["step"] for c in t["curve"]]
    assert j["accounting"]["trained_rows"] == s.keep * 4 and j["accounting"]["candidate_tokens"] == \
        t["accounting"]["candidate_tokens"]
    assert j["router"]["layers"] == 1 and j["router"]["router_positions"] == 4
    assert j["batch_split"]["buckets"] == [s.keep, s.batch] and j["batch_split"]["num_traces"] == 1
    assert j["amp"] == "fp32" and j["differences_from_pytorch_arm"]
    # Its first step's kept chunks are its router's excess top-k, recomputed in NumPy from the same weights.
    st = study.Study(study.parse_args(argv))
    round4.load_reference(st)
    ids, toks = st.stream(0, s.batch, 4, False).batch(0)
    assert len(j["selection"]["first_step_kept_ids"]) == s.keep
    assert set(j["selection"]["first_step_kept_ids"]) <= set(ids.tolist())
    kept, close = numpy_router_topk(st, ids, toks, seed=0)
    if not close:
        assert sorted(j["selection"]["first_step_kept_ids"]) == sorted(ids[kept].tolist())
    # Resume: nothing re-runs (the JAX child is not started again).
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    # The analysis: test beside val, paired on test, the JAX arm in the PyTorch arm's seed band.
    assert analyze.main([str(out), "--no-plots"]) == 0
    summ = json.loads((out / "summary.json").read_text())
    pt = summ["paired_test"]["cggr_excess_r1_s4 - random_subset"]
    a = {sd: runs[study.RunSpec("cggr_excess_r1_s4", sd, lr_k, 4).key()]["final"]["test_loss"] for sd in s.seeds}
    b = {sd: runs[study.RunSpec("random_subset", sd, lr_k, 4).key()]["final"]["test_loss"] for sd in s.seeds}
    assert pt["per_seed"] == pytest.approx([a[sd] - b[sd] for sd in s.seeds])
    assert summ["paired_test"]["random_subset - std_k"]["n"] == len(s.seeds)   # seed 0's std_k: the tuned sweep run
    assert pt["test_minus_val"] == pytest.approx(pt["mean"] - summ["paired"]["cggr_excess_r1_s4 - random_subset"][
        "mean"])
    assert not any(k.startswith("cggr_excess_r1_s4_jax") for k in summ["paired"])
    band = summ["jax"]["cggr_excess_r1_s4_jax"]
    tv = [runs[study.RunSpec("cggr_excess_r1_s4", sd, lr_k, 4).key()]["final"]["val_loss"] for sd in s.seeds]
    assert band["torch_val_mean"] == pytest.approx(np.mean(tv)) and band["torch_val_min"] == min(tv)
    assert band["runs"]["0"]["val"] == j["final"]["val_loss"] and band["tolerance"] >= 0.05
    # m read on `test`: each seed's std_k budget curve of test losses (N/2, N, 2N), inverted at the arm's test loss.
    trained = runs[study.RunSpec("cggr_excess_r1_s4", 0, lr_k, 4).key()]["accounting"]["trained_tokens"]
    mt = summ["m_test"]["cggr_excess_r1_s4"]["per_seed"]
    for sd in s.seeds:
        pts = [(r["accounting"]["trained_tokens"], r["final"]["test_loss"]) for r in runs.values()
               if r["arm"] == "std_k" and r["seed"] == sd and r["lr"] == lr_k and r["tag"] in ("", "budget")]
        assert len(pts) == 3
        assert mt[str(sd)]["m"] == pytest.approx(analyze.invert_curve(pts, a[sd])[0] / trained)
    assert set(summ["m_test"]) == set(summ["m"])
    md = (out / "summary.md").read_text()
    assert "## The `test` split" in md and "## JAX arm `cggr_excess_r1_s4_jax`" in md
    assert "### The same m read on `test`" in md
    # The out-of-domain sets (none at scale tiny: given here, in a copy): the same pairs, on each set's final loss.
    assert summ["paired_ood"] == {}
    ood_out = tmp_path / "with_ood"
    (ood_out / "runs").mkdir(parents=True)
    ood = {}
    for i, (key, r) in enumerate(sorted(runs.items())):
        r = json.loads(json.dumps(r))
        r["final"]["ood"] = {"setA": 5.0 + 0.01 * i}
        ood[key] = r["final"]["ood"]["setA"]
        (ood_out / "runs" / f"{key}.json").write_text(json.dumps(r))
    po = analyze.summarize(ood_out)["paired_ood"]["setA"]["cggr_excess_r1_s4 - random_subset"]
    assert po["per_seed"] == pytest.approx([ood[study.RunSpec("cggr_excess_r1_s4", sd, lr_k, 4).key()]
                                            - ood[study.RunSpec("random_subset", sd, lr_k, 4).key()]
                                            for sd in s.seeds])
    # A fresh machine between the sweep's calls loses the kept weights: the tuned sweep run without its `test`
    # number is trained again under the tag "test", and the analysis takes seed 0's `test` number from it.
    key_B = study.RunSpec("std_B", 0, lr_B, 4).key()
    r = json.loads((out / "runs" / f"{key_B}.json").read_text())
    del r["final"]["test_loss"], r["final"]["test_source"]
    (out / "runs" / f"{key_B}.json").write_text(json.dumps(r))
    assert study.main(argv) == 0
    retrain = json.loads((out / "runs" / f"{study.RunSpec('std_B', 0, lr_B, 4, tag='test').key()}.json").read_text())
    assert math.isfinite(retrain["final"]["test_loss"])
    assert "test_loss" not in json.loads((out / "runs" / f"{key_B}.json").read_text())["final"]
    summ = analyze.summarize(out)
    assert summ["arms"]["std_B"]["test_per_seed"][0] == retrain["final"]["test_loss"]
    assert summ["arms"]["std_B"]["val_per_seed"][0] == r["final"]["val_loss"]     # val stays the sweep run's


def replace_steps(scale: study.Scale, steps: int) -> study.Scale:
    from dataclasses import replace

    return replace(scale, steps=steps)


def numpy_router_topk(st: study.Study, ids: np.ndarray, toks: np.ndarray, seed: int) -> tuple:
    """The JAX arm's first-step selection recomputed in NumPy (float64) from its initial weights: the 1-layer
    router's logits (``DecoderLM.router_logits``), the NLL of every 4th shifted target, its mean per chunk minus
    the stored reference, top k. Returns (kept positions, whether the k-th and (k+1)-th scores are too close to
    call)."""
    import jax.numpy as jnp

    from benchmarks.quality import jax_arm

    s = st.scale
    model = jax_arm.build(s, st.V, seed, jnp.float32)
    z = np.asarray(model.router_logits(jnp.asarray(toks.astype(np.int32)), 1), np.float64)[:, :-1]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = lse - np.take_along_axis(z, toks[:, 1:, None].astype(np.int64), -1)[..., 0]
    d = nll[:, ::4].mean(1) - st.ref_of(ids, seed).astype(np.float64)
    order = np.argsort(-d, kind="stable")
    gap = d[order[s.keep - 1]] - d[order[s.keep]]
    return np.sort(order[:s.keep]), gap < 1e-4


# ------------------------------------------------------------------------------------------- the `test` split
def test_only_round4_reads_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    seen = []
    orig = pycode.load_corpus

    def spy(data_dir, splits=("train", "ref", "val"), verify=True):
        seen.append(tuple(splits))
        return orig(data_dir, splits, verify)

    monkeypatch.setattr(pycode, "load_corpus", spy)
    for plan in study.PLANS:
        argv = _argv(tmp_path, data, ref)
        argv[argv.index("round4")] = plan
        st = study.Study(study.parse_args(argv))
        reads = "test" in seen[-1]
        assert reads == (plan == "round4") == (plan in study.READS_TEST), plan
        assert (st.evaluator.test is not None) == reads
        if not reads:
            model = study.build_model(st.scale, st.V, 0, st.ctx.device)
            with pytest.raises(ValueError, match="test"):
                st.evaluator.test_loss(model)
            assert not any("test" in k for k in st.evaluator.final(model))
    assert set(study.READS_TEST) == {"round4"}


def test_test_loss_is_computed_as_the_val_loss(tmp_path: Path) -> None:
    """``Evaluator.test_loss`` against an independent float64 computation over all test chunks, and the same code
    path as ``final``'s val loss (the val split swapped in gives ``final``'s number exactly)."""
    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    st = study.Study(study.parse_args(_argv(tmp_path, data, ref)))
    model = study.build_model(st.scale, st.V, 3, st.ctx.device)
    model.eval()
    got = st.evaluator.test_loss(model)
    rows = torch.from_numpy(pycode.load_corpus(data, ("test",))["test"][:, :st.scale.seq_len + 1].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits.double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    assert got["test_chunks"] == 11 and got["test_loss"] == pytest.approx(float(nll.mean(1).mean()), abs=1e-5)
    ev = st.evaluator
    ev.test = ev.val
    assert ev.test_loss(model)["test_loss"] == ev.final(model)["val_loss"]


def test_missing_reference_is_a_clear_error(tmp_path: Path) -> None:
    data = _write_corpus(tmp_path / "pycode")
    s = study.SCALES["tiny"]
    read = round4.round4_chunk_ids(replace_steps(s, 4), 200)
    assert len(read) == len(np.unique(np.concatenate([np.random.default_rng(x).permutation(200)[:s.batch * 4]
                                                      for x in s.seeds])))
    ref = _write_ref(tmp_path / "ref", nan_ids=[int(read[3])])
    with pytest.raises(ValueError, match="no reference NLL"):
        study.main(_argv(tmp_path, data, ref))
    unread = np.setdiff1d(np.arange(200), read)
    assert study.main(_argv(tmp_path, data, _write_ref(tmp_path / "ref2", nan_ids=unread[:5])) + ["--dry-run"]) == 0
    with pytest.raises(ValueError, match="ref-dir"):
        study.main(_argv(tmp_path, data, tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------- planning
def test_round4_plan_only(capsys: pytest.CaptureFixture) -> None:
    calls = round4.round4_schedule(study.SCALES["M"], 160.0, 540.0)
    assert all(sum(sec for _, sec in c) <= 540.0 for c in calls)
    names = [n for c in calls for n, _ in c]
    assert sum(n.startswith("sweep std_B") for n in names) == 3 and sum(n.startswith("sweep std_k") for n in
                                                                        names) == 3
    for seed in (0, 1, 2):
        assert sum(n.startswith(f"seed {seed}:") for n in names) == (3 if seed == 0 else 2)
    assert names[-1].startswith("seed 0: JAX arm")
    assert study.SCALES["M"].lr_grid_B == study.SCALES["M"].lr_grid_k == (5e-4, 1e-3, 2e-3)
    assert study.main(["--scale", "M", "--round", "round4", "--out", "/nonexistent", "--plan-only",
                       "--deadline-s", "540"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("round4 at scale M") and "call 1" in out and "JAX arm" in out
    with pytest.raises(ValueError, match="--plan-only"):
        study.parse_args(["--out", "x", "--round", "round2a", "--plan-only"])


# ------------------------------------------------------------------------------------------- the JAX arm
def test_jax_lr_schedule_is_study_lr_at() -> None:
    from benchmarks.quality import jax_arm

    for total, peak in ((600, 1e-3), (7, 2e-3), (2, 5e-4)):
        sched = jax_arm.lr_schedule(total, peak)
        got = np.array([float(sched(i)) for i in range(total)])
        np.testing.assert_allclose(got, [study.lr_at(i, total, peak) for i in range(total)], rtol=2e-6)
    with pytest.raises(ValueError, match="total"):
        jax_arm.lr_schedule(0, 1e-3)


def test_jax_arm_bad_arguments(tmp_path: Path) -> None:
    from benchmarks.quality import jax_arm

    base = ["--", "--scale", "tiny", "--round", "round4", "--out", str(tmp_path)]
    for argv, match in ((["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "1e-3", "--arm-seed", "-1"],
                                                                             "--arm-seed"),
                        (["--lr", "1e-3", "--run-steps", "1"], "--run-steps")):
        with pytest.raises(ValueError, match=match):
            jax_arm.parse_args(argv + base)
    with pytest.raises(ValueError, match="round4"):
        jax_arm.parse_args(["--lr", "1e-3", "--", "--scale", "tiny", "--round", "round3", "--out", str(tmp_path)])


def test_jax_arm_first_step_selects_as_the_pytorch_cggr_model(tmp_path: Path) -> None:
    """The JAX arm's step (route(), the batch-split step's own router part) and the PyTorch arm's ``CGGRModel``
    with the same weights (the DecoderLM's copied into the LlamaForCausalLM: same architecture, both float32 on
    CPU) keep the same chunks of the first candidate batch, unless the k-th and (k+1)-th excess scores are within
    1e-4 (at least one seed must be decidable); and one step of the JAX arm trains exactly k rows. The reference
    spread is small (0.002 nats) so that the router's loss, not the reference alone, decides the ranking: a router
    reading other positions (or another depth) would keep other chunks."""
    import jax
    import jax.numpy as jnp

    from benchmarks.quality import jax_arm
    from cggr_torch import CGGRModel

    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref", spread=0.002)
    st = study.Study(study.parse_args(_argv(tmp_path, data, ref)))
    round4.load_reference(st)
    s = st.scale
    decided = 0
    for seed in (0, 1, 2):
        jm = jax_arm.build(s, st.V, seed, jnp.float32)
        tm = study.build_model(s, st.V, 7, st.ctx.device)
        tm.load_state_dict(torch_state_from_jax(jm, s))
        tm.eval()
        ids, toks = st.stream(seed, s.batch, 4, False).batch(0)
        t = torch.from_numpy(toks.astype(np.int64))
        with torch.no_grad():   # the full models agree (the weight copy is right)
            np.testing.assert_allclose(tm(input_ids=t[:, :-1]).logits.numpy(),
                                       np.asarray(jm(jnp.asarray(toks[:, :-1].astype(np.int32)))), atol=2e-4)
        refs = st.ref_of(ids, seed)
        cg = CGGRModel(tm, router_layers=1, router_positions=4, scoring="excess", selection="topk", warmup_steps=0,
                       dynamic_threshold=False, min_tokens_ratio=s.keep / s.batch)
        cg(t, labels=t, reference_nll=torch.from_numpy(refs))
        torch_kept = np.sort(cg.last_kept.cpu().numpy())
        step, state = jax_arm.make_train_step(jm, s, 4, 1e-3)
        tj = jnp.asarray(toks.astype(np.int32))
        rank, k, _ = jax.jit(step.route)(state.params, state.rest, tj, tj, None, jnp.int32(0), jnp.asarray(refs))
        rank = np.asarray(rank)
        jax_kept = np.where((rank >= 0) & (rank < int(k)))[0]
        np_kept, close = numpy_router_topk(st, ids, toks, seed)
        assert int(k) == s.keep == len(torch_kept)
        if not close:
            decided += 1
            assert jax_kept.tolist() == np_kept.tolist() == torch_kept.tolist(), seed
        state, metrics = step(state, tj, tj, None, jnp.asarray(refs))
        assert int(metrics["sequences_selected"]) == s.keep and int(metrics["bucket_size"]) == s.keep
        assert math.isfinite(float(metrics["loss"]))
    assert decided >= 1


def torch_state_from_jax(jm, s: study.Scale) -> dict:
    """The DecoderLM's parameters as a LlamaForCausalLM state dict (kernels (in, out) -> weights (out, in))."""
    def a(p):
        return torch.from_numpy(np.array(p[...], np.float32))

    sd = {"model.embed_tokens.weight": a(jm.embed.embedding), "model.norm.weight": a(jm.final_norm.scale),
          "lm_head.weight": a(jm.lm_head.kernel).T.contiguous()}
    for i, blk in enumerate(jm.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = a(blk.attn_norm.scale)
        sd[p + "post_attention_layernorm.weight"] = a(blk.mlp_norm.scale)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = a(getattr(blk.attn, n).kernel).T.contiguous()
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = a(getattr(blk.mlp, n).kernel).T.contiguous()
    return sd


def test_jax_arm_bf16_compute(tmp_path: Path) -> None:
    """The GPU's configuration (bf16 compute, float32 parameters) traces and trains at the tiny scale on CPU: the
    JSON says bf16, every number is finite, exactly k rows per step."""
    from benchmarks.quality import jax_arm

    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    rest = _argv(tmp_path, data, ref, steps=2)
    assert jax_arm.main(["--lr", "1e-3", "--dtype", "bfloat16", "--", *rest]) == 0
    [p] = (tmp_path / "out" / "runs").glob("cggr_excess_r1_s4_jax__*.json")
    r = json.loads(p.read_text())
    s = study.SCALES["tiny"]
    assert r["amp"] == "bf16"
    assert "precision: DecoderConfig(dtype=bfloat16" in " ".join(r["differences_from_pytorch_arm"])
    assert r["accounting"]["trained_rows"] == 2 * s.keep
    assert all(math.isfinite(r["final"][k]) for k in ("val_loss", "test_loss", "val_loss_subset"))
    with pytest.raises(ValueError, match="dtype"):
        jax_arm.parse_args(["--lr", "1e-3", "--dtype", "float16", "--", *rest])


def test_tuned_sweep_run_gets_test_from_its_weights_on_disk(tmp_path: Path) -> None:
    """A later call on the same machine: the tuned sweep run's weights are read from ``<store>/sweep/``, its JSON
    gains the `test` loss of exactly those weights, and the arm's kept weights are deleted; without them the caller
    is told to retrain (False)."""
    data, ref = _write_corpus(tmp_path / "pycode"), _write_ref(tmp_path / "ref")
    st = study.Study(study.parse_args(_argv(tmp_path, data, ref)))
    s = st.scale
    spec = study.RunSpec("std_k", 0, 1e-3, s.steps)
    model = study.build_model(s, st.V, 5, st.ctx.device)
    model.eval()
    d = round4.sweep_dir(st)
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / f"{spec.key()}.pt")
    other = d / f"{study.RunSpec('std_k', 0, 3e-3, s.steps).key()}.pt"
    torch.save(model.state_dict(), other)
    keep_B = d / f"{study.RunSpec('std_B', 0, 1e-3, s.steps).key()}.pt"
    torch.save(model.state_dict(), keep_B)
    (st.out / "runs" / f"{spec.key()}.json").write_text(json.dumps({"final": {"val_loss": 4.0}}))
    assert round4.attach_sweep_test(st, "std_k", 1e-3)
    r = json.loads((st.out / "runs" / f"{spec.key()}.json").read_text())
    assert r["final"]["test_loss"] == st.evaluator.test_loss(model)["test_loss"]
    assert r["final"]["test_source"] == "sweep checkpoint" and r["final"]["val_loss"] == 4.0
    assert not other.exists() and keep_B.exists()           # only the decided arm's weights go
    spec_B = study.RunSpec("std_B", 0, 2e-3, s.steps)
    (st.out / "runs" / f"{spec_B.key()}.json").write_text(json.dumps({"final": {"val_loss": 4.0}}))
    assert not round4.attach_sweep_test(st, "std_B", 2e-3)   # no weights for that run: retrain
