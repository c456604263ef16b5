"""The quality-study v2 harness (``benchmarks/quality``: ``pycode.py``, ``study.py``, ``analyze.py``) on CPU.

Round 3 (S2) is checked at the tiny scale too: its whole plan (early-stopped reference, per-token stores, sweeps
with rule 1, the gate with SPEC §9.3's router options and the stride rule, paired units, R in the analysis), and
its pieces against independent computations.

A synthetic corpus in the pycode format (manifest + ``.u16.xz`` arrays of 1025-token chunks, V = 64) is written to a
temporary folder, so the end-to-end test needs neither the GPU nor the 39 MB real corpus: it runs the whole round-1
plan at the ``tiny`` scale (reference model, LR sweeps, the gate, every arm incl. CGGR's batch splitting through
the public API, noise controls), checks every JSON, resumes (nothing re-runs), and renders the summary. The pieces
(one-pass batches, noise flags, the LR schedule, paired statistics, the m inversion, time-to-target, CLI errors)
are checked against hand-computed values. One test reads the real corpus's small `val` split when
``../shared/data/pycode`` is present and is skipped otherwise.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quality import analyze, pycode, study

V = 64


def _write_corpus(root: Path, copy_load_py: bool = False) -> Path:
    """A pycode-format folder with small splits of structured random tokens (learnable: a repeating motif)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 200), ("ref", 40), ("val", 24), ("test", 8)):
        motif = rng.integers(1, V, 17)
        base = np.resize(motif, (n, 1025))
        noise = rng.integers(0, V, (n, 1025))
        arr = np.where(rng.random((n, 1025)) < 0.3, noise, base).astype("<u2")
        raw = arr.tobytes()
        xz = lzma.compress(raw)
        (root / f"{name}.u16.xz").write_bytes(xz)
        splits[name] = {"file": f"{name}.u16.xz", "dtype": "<u2", "shape": [n, 1025],
                        "sha256_raw": hashlib.sha256(raw).hexdigest(), "sha256_xz": hashlib.sha256(xz).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"name": "synthetic", "tokenizer": {"vocab_size": V},
                                                    "splits": splits}))
    if copy_load_py:
        shutil.copy(pycode.find_pycode_dir() / "load.py", root / "load.py")
    return root


def _real_corpus() -> Path | None:
    try:
        return pycode.find_pycode_dir()
    except FileNotFoundError:
        return None


def _finite(obj: object, where: str = "") -> int:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return 0
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"non-finite number at {where}: {obj}"
        return 1
    if isinstance(obj, dict):
        return sum(_finite(v, f"{where}.{k}") for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_finite(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise AssertionError(f"unexpected JSON value at {where}: {obj!r}")


# ------------------------------------------------------------------------------------------- end to end
def test_round1_plan_end_to_end_tiny(tmp_path: Path) -> None:
    data = _write_corpus(tmp_path / "pycode")
    out = tmp_path / "out"
    argv = ["--scale", "tiny", "--out", str(out), "--data-dir", str(data), "--device", "cpu", "--no-progress",
            "--export", str(tmp_path / "export.tar.gz")]
    assert study.main(argv) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    s = study.SCALES["tiny"]
    arms = {r["arm"] + ("+noise" if r["noise"] else "") for r in runs.values()}
    round1_arms = set(study.ARMS) - set(study.ROUTER_EXCESS) - set(study.CGGR_EXCESS) - set(study.TOKEN_ARMS) \
        - set(study.CGGR_EXCESS_STRIDE)
    assert arms >= round1_arms | {"random_subset+noise", "oracle_excess+noise", "oracle_loss+noise",
                                  "cggr_matched+noise"}
    assert len([r for r in runs.values() if r["tag"] == "budget"]) == 2 * len(s.seeds)
    assert any(r["tag"] == "repeat" for r in runs.values())
    for key, r in runs.items():
        assert r["key"] == key and _finite(r) > 20
        acc = r["accounting"]
        assert acc["optimizer_steps"] == len(range(acc["optimizer_steps"])) and len(r["curve"]) >= 1
        rows_per_step = {"std_B": s.batch, "cggr_shipped": None}.get(r["arm"], s.keep)
        if rows_per_step is not None:   # every arm but the shipped default trains a fixed count
            assert acc["trained_rows"] == rows_per_step * acc["optimizer_steps"]
        cand = s.keep if r["arm"] == "std_k" else s.batch
        assert acc["candidate_tokens"] == cand * acc["optimizer_steps"] * s.seq_len
        assert acc["trained_tokens"] == acc["trained_rows"] * s.seq_len
        if r["arm"] not in ("std_B", "std_k"):
            ids = np.load(out / "runs" / f"{key}.ids.npy")
            assert len(ids) == acc["trained_rows"]
            pos = ids[ids >= 0]
            assert len(np.unique(pos)) == len(pos), "one pass: no chunk trained twice"
            assert r["selection"]["noise_share_trained"] == pytest.approx((ids < 0).mean())
        if not r["noise"]:
            assert r["selection"]["noise_share_trained"] == 0.0
    # Paired candidates: the random subset of a seed picks from exactly the chunks the oracle arms see.
    perm0 = np.random.default_rng(0).permutation(200)[:s.batch * s.steps]
    for arm in ("random_subset", "oracle_loss", "oracle_excess", "ref_only", "cggr_matched"):
        [path] = (out / "runs").glob(f"{arm}__lr*__N{s.steps}__s0.ids.npy")    # at whichever LR was tuned
        ids = np.load(path)
        assert set(ids.tolist()) <= set(perm0.tolist())
    gate = json.loads((out / "gate.json").read_text())
    assert _finite(gate) > 10 and gate["routers"] == [1, 2]
    assert gate["sets"]["noise"]["noise_share_top25"]["full_loss"] <= 0.4 + 1e-9
    assert (out / "ref" / "refnll_train.npy").exists() and (tmp_path / "export.tar.gz").stat().st_size > 0
    # Resume: the same command re-runs nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    next((out / "runs").glob(f"oracle_loss__lr*__N{s.steps}__s1.json")).unlink()
    assert study.main(argv + ["--dry-run"]) == 0        # lists the missing run, trains nothing
    assert len(list((out / "runs").glob("*.json"))) == len(mtimes) - 1
    # The summary renders from what was written.
    assert analyze.main([str(out), "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paired"]["oracle_excess - random_subset"]["n"] == 2
    assert "m" in summary and "## Gate `gate`" in (out / "summary.md").read_text()


def test_synthetic_corpus_loads_with_the_real_load_py(tmp_path: Path) -> None:
    if _real_corpus() is None:
        pytest.skip("the real pycode folder (../shared/data/pycode) is absent: its load.py cannot be checked")
    data = _write_corpus(tmp_path / "pycode", copy_load_py=True)
    c = pycode.load_corpus(data, ("train", "val"))
    c2 = pycode.load_corpus(_write_corpus(tmp_path / "b"), ("train", "val"))   # the built-in fallback loader
    assert c["train"].shape == (200, 1025) and c.vocab_size == V
    assert (c["train"] == c2["train"]).all()


def test_real_corpus_val_split() -> None:
    d = _real_corpus()
    if d is None:
        pytest.skip("the real pycode folder (../shared/data/pycode) is absent")
    c = pycode.load_corpus(d, ("val",))
    assert c["val"].shape == (953, 1025) and c.vocab_size == 16384 and int(c["val"].max()) < 16384
    # Consecutive rows overlap by one token (chunk i = tokens [1024 i, 1024 i + 1025) of the stream).
    assert (c["val"][:-1, -1] == c["val"][1:, 0]).all()


# ------------------------------------------------------------------------------------------- pieces
def test_candidate_stream_one_pass_paired_and_noise() -> None:
    train = np.arange(100 * 9, dtype=np.uint16).reshape(100, 9)   # row i holds 9i .. 9i+8: ids readable
    a = pycode.CandidateStream(train, seed=3, batch=8, steps=10, seq_len=8)
    b = pycode.CandidateStream(train, seed=3, batch=8, steps=10, seq_len=8)
    ids = np.concatenate([a.batch(i)[0] for i in range(10)])
    assert len(np.unique(ids)) == 80                                 # one pass
    assert all((a.batch(i)[1] == b.batch(i)[1]).all() for i in range(10))   # same seed, same batches
    i0, t0 = a.batch(0)
    assert (t0[:, 0] == 9 * i0).all() and t0.shape == (8, 9)
    k = pycode.CandidateStream(train, seed=3, batch=2, steps=40, seq_len=8)
    assert (np.concatenate([k.batch(i)[0] for i in range(40)]) == ids).all()   # std_k = the same permutation
    bank = np.full((30, 9), 7, np.uint16)
    n = pycode.CandidateStream(train, seed=3, batch=8, steps=10, seq_len=8, noise_frac=0.25, noise=bank)
    for i in range(10):
        ids_n, toks = n.batch(i)
        ids_c, toks_c = a.batch(i)
        flag = ids_n < 0
        assert flag.sum() == 2 and (toks[flag] == 7).all() and (toks[~flag] == toks_c[~flag]).all()
        assert (ids_n[~flag] == ids_c[~flag]).all()
        assert set((-1 - ids_n[flag]).tolist()) == {2 * i, 2 * i + 1}   # each noise row used once
    for kw, match in (({"steps": 13}, "one pass"), ({"seq_len": 9}, "seq_len"), ({"noise_frac": 1.0}, "noise_frac"),
                      ({"noise_frac": 0.25}, "noise bank")):
        args = {"seed": 0, "batch": 8, "steps": 10, "seq_len": 8, **kw}
        with pytest.raises(ValueError, match=match):
            pycode.CandidateStream(train, **args)
    with pytest.raises(IndexError):
        a.batch(10)


def test_noise_bank_follows_the_unigram() -> None:
    probs = np.array([0.5, 0.25, 0.25, 0.0])
    bank = pycode.noise_bank(probs, 200, 99, seed=1)
    assert bank.shape == (200, 100) and bank.dtype == np.uint16 and not (bank == 3).any()
    freq = np.bincount(bank.ravel(), minlength=4) / bank.size
    np.testing.assert_allclose(freq, probs, atol=0.01)
    assert (pycode.noise_bank(probs, 5, 9, 1) == pycode.noise_bank(probs, 5, 9, 1)).all()
    u = pycode.unigram(np.array([[0, 1, 1, 9], [2, 2, 2, 9]], np.uint16), 4)
    np.testing.assert_allclose(u, [1 / 6, 2 / 6, 3 / 6, 0])       # the overlapping last column is not counted


def test_lr_schedule_and_eval_subset() -> None:
    N, peak = 100, 2.0
    lrs = [study.lr_at(i, N, peak) for i in range(N)]
    assert lrs[0] == pytest.approx(peak / 5) and lrs[4] == pytest.approx(peak)       # 5 warm-up steps
    assert lrs[-1] == pytest.approx(0.1 * peak) and max(lrs) == pytest.approx(peak)
    assert all(x >= y - 1e-12 for x, y in zip(lrs[4:], lrs[5:]))                       # monotone decay
    with pytest.raises(ValueError):
        study.lr_at(0, 0, 1.0)
    sub = pycode.eval_subset(953, 256)
    assert len(sub) == 256 and sub[0] == 0 and sub[-1] == 952
    with pytest.raises(ValueError):
        pycode.eval_subset(5, 6)


def test_statistics() -> None:
    p = analyze.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.4, 2: 3.6})
    d = np.array([-0.5, -0.4, -0.6])
    se = d.std(ddof=1) / math.sqrt(3)
    assert p["mean"] == pytest.approx(-0.5) and p["se"] == pytest.approx(se)
    assert p["ci"] == pytest.approx([-0.5 - 4.303 * se, -0.5 + 4.303 * se])
    assert p["verdict"] == "lower (better)"
    assert analyze.paired({0: 1.0, 1: 1.0}, {0: 1.01, 1: 0.99}, floor=0.05)["verdict"].startswith("no difference")
    assert analyze.paired({0: 1.0}, {1: 1.0}) is None
    assert analyze.paired({0: 1.0}, {0: 2.0})["verdict"] == "1 seed: no interval"
    pts = [(100.0, 5.0), (200.0, 4.0), (400.0, 3.5)]
    assert analyze.invert_curve(pts, 4.0) == (pytest.approx(200.0), False)
    D, ext = analyze.invert_curve(pts, 4.5)
    assert D == pytest.approx(100 * math.sqrt(2)) and not ext
    D, ext = analyze.invert_curve(pts, 3.0)                  # beyond: slope of the last segment in log D
    assert ext and D == pytest.approx(800.0)
    with pytest.raises(ValueError):
        analyze.invert_curve(pts[:1], 4.0)
    curve = [{"wall_s": 1.0, "val_loss": 5.0}, {"wall_s": 2.0, "val_loss": 3.0}]
    assert analyze.time_to_target(curve, 4.0) == pytest.approx(1.5)
    assert analyze.time_to_target(curve, 2.0) is None
    assert analyze.t95(2) == 4.303 and analyze.t95(50) == 1.96
    with pytest.raises(ValueError):
        analyze.t95(0)
    assert study.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 25])) == pytest.approx(0.8)
    assert study.top_share(np.array([4.0, 3, 2, 1]), np.array([True, False, True, True]), 0.5) == 0.5


def test_bad_cli_input(tmp_path: Path) -> None:
    for argv, match in ((["--scale", "XL"], "--scale"), (["--round", "round9"], "--round"),
                        (["--plan-only"], "--plan-only"), (["--assume-ms-std-B", "0"], "--assume-ms-std-B"),
                        (["--seeds", "a,b"], "--seeds"), (["--seeds", "-1"], "--seeds"), (["--steps", "1"], "--steps"),
                        (["--deadline-s", "0"], "--deadline-s"), (["--device", "tpu"], "--device")):
        with pytest.raises(ValueError, match=match):
            study.parse_args(["--out", str(tmp_path), *argv])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        pycode.find_pycode_dir(str(tmp_path))
    with pytest.raises(ValueError, match="runs/"):
        analyze.main([str(tmp_path)])
    with pytest.raises(ValueError, match="split"):
        pycode.load_corpus(tmp_path, ("bogus",))


def test_round2_plans_tiny(tmp_path: Path) -> None:
    """Rounds 2a/2b after round 1 in the same folder: every round-2 arm runs, with its accounting."""
    data = _write_corpus(tmp_path / "pycode")
    out = tmp_path / "out"
    base = ["--scale", "tiny", "--out", str(out), "--data-dir", str(data), "--device", "cpu", "--no-progress"]
    assert study.main(base + ["--steps", "4"]) == 0
    assert study.main(base + ["--steps", "4", "--round", "round2a"]) == 0
    assert study.main(base + ["--steps", "4", "--round", "round2b", "--with-sampled"]) == 0
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    arms = {r["arm"] for r in runs}
    assert arms >= set(study.ROUTER_EXCESS) | set(study.CGGR_EXCESS) | set(study.TOKEN_ARMS)
    s = study.SCALES["tiny"]
    for r in runs:
        acc = r["accounting"]
        if r["arm"] in study.TOKEN_ARMS:
            assert acc["level"] == "token" and acc["candidate_tokens"] == s.batch * 4 * s.seq_len
            if r["arm"] != "excess_token_sampled":   # exactly k/B of the candidate tokens are in the loss
                assert acc["trained_tokens"] == s.keep * 4 * s.seq_len
            else:
                assert 0 < acc["trained_tokens"] <= s.batch * 4 * s.seq_len
        elif r["arm"] in study.ROUTER_EXCESS or r["arm"] in study.CGGR_EXCESS:
            assert acc["trained_rows"] == s.keep * 4
    # The library's excess batch splitting keeps the chunks the harness's router-excess arm keeps (same router,
    # same reference), so round 2b's CGGRModel arms repeat round 2a's selection.
    for n in (1,):
        a = np.load(next((out / "runs").glob(f"router_excess_r{n}__lr*__N4__s0.ids.npy")))
        b = np.load(next((out / "runs").glob(f"cggr_excess_r{n}__lr*__N4__s0.ids.npy")))
        assert sorted(a[:s.keep].tolist()) == sorted(b[:s.keep].tolist())


# ------------------------------------------------------------------------------------------- round 3 (S2)
def _r3_argv(tmp_path: Path, data: Path) -> list:
    return ["--scale", "tiny", "--round", "round3", "--out", str(tmp_path / "out"), "--data-dir", str(data),
            "--device", "cpu", "--no-progress", "--ref-store", str(tmp_path / "store")]


def test_round3_plan_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_corpus(tmp_path / "pycode")
    out, store = tmp_path / "out", tmp_path / "store"
    argv = _r3_argv(tmp_path, data)

    def no_on_the_fly(self):   # round 3's token arms read the stored per-token reference, never a live model
        raise AssertionError("round 3 must not run the reference model on the fly")

    monkeypatch.setattr(study.Study, "reference_model", no_on_the_fly)
    assert study.main(argv) == 0
    s = study.SCALES["tiny"]
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    # The reference: early stopping logged, stores in cggr-reference-v1 outside the results folder, tables inside.
    ref = json.loads((out / "ref" / "ref.json").read_text())
    assert [h["step"] for h in ref["history"]] == [3, 6, 9, 12] and ref["steps"] == 12
    assert ref["best_val_subset"] == min(h["val_subset"] for h in ref["history"])
    assert ref["best_step"] == min(ref["history"], key=lambda h: h["val_subset"])["step"]
    assert set(ref["store"]["manifests"]) == {"train", "gate_noise", "noise_s0", "noise_s1"}
    from cggr.reference import load_reference

    st_train = load_reference(str(store / "train"))
    assert st_train.token_nll.dtype == np.float16 and st_train.seq_len == s.seq_len
    train_ids, gate_ids = study.round3_chunk_ids(s, 200)
    assert (st_train.chunk_ids == np.union1d(train_ids, gate_ids)).all()
    table = np.load(out / "ref" / "refnll_train.npy")
    np.testing.assert_array_equal(table[st_train.chunk_ids], st_train.chunk_mean)
    assert np.isnan(np.delete(table, st_train.chunk_ids)).all()      # unread chunks have no reference
    assert not any(out.rglob("token_nll.npy"))                       # per-token NLL stays out of the results
    # Sweeps with rule 1: a 2-point grid always has its argmin at an edge, so one more point is run per arm.
    for arm in ("std_B", "std_k"):
        lrs = sorted(r["lr"] for r in runs.values() if r["arm"] == arm and r["seed"] == 0 and not r["tag"])
        assert len(lrs) == 3 and set(s.lr_grid_B) < set(lrs)
    # The gate and the stride it decides.
    gate = json.loads((out / "gate.json").read_text())
    rho = gate["sets"]["clean"]["spearman_vs_oracle_excess"]
    for n in (1, 2):   # depths 1 and 4, clipped to the tiny model's 2 layers
        for o in study.ROUTER_OPTIONS:
            assert f"r{n}_{o}_excess" in rho and f"r{n}_{o}_excess" in gate["sets"]["noise"]["noise_share_top25"]
    assert rho["r2_all_excess"] == pytest.approx(1.0)     # the full-depth router's excess is oracle excess
    assert gate["r1_stride"] == study.choose_r1_stride(gate)
    r1_arm = f"cggr_excess_r1_s{gate['r1_stride']}"
    # Every arm of every seed, the budgets, the library router's positions, the token arms' stored reference.
    lr_B, lr_k = analyze.summarize(out)["tuned_lr"]["std_B"], analyze.summarize(out)["tuned_lr"]["std_k"]
    for seed in s.seeds:
        for arm, lr in (("std_B", lr_B), ("std_k", lr_k), ("random_subset", lr_k), (r1_arm, lr_k),
                        ("cggr_excess_r4", lr_k), ("random_token", lr_B), ("excess_token", lr_B)):
            r = runs[study.RunSpec(arm, seed, lr, s.steps).key()]
            assert r["accounting"]["ms_per_step"] > 0 and r["accounting"]["train_wall_s"] > 0
        for steps in (s.steps // 2, 2 * s.steps, 4 * s.steps):
            assert study.RunSpec("std_k", seed, lr_k, steps, tag="budget").key() in runs
        r = runs[study.RunSpec(r1_arm, seed, lr_k, s.steps).key()]
        assert r["router"] == {"layers": 1, "router_positions": gate["r1_stride"]}
        assert r["accounting"]["trained_rows"] == s.keep * s.steps
        e = runs[study.RunSpec("excess_token", seed, lr_B, s.steps).key()]
        assert e["reference"]["source"] == "store" and e["reference"]["store_max_abs_chunk_mean_diff_vs_committed"] == 0
        assert e["accounting"]["trained_tokens"] == s.keep * s.steps * s.seq_len
    # Resume: nothing re-runs. A lost store (a cold device call) is rebuilt from scratch when a token arm needs it;
    # on CPU the retrained reference is bitwise the same, so the committed means and the rebuilt store agree.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    shutil.rmtree(store)
    key = study.RunSpec("excess_token", 1, lr_B, s.steps).key()
    (out / "runs" / f"{key}.json").unlink()
    assert study.main(argv) == 0
    e = json.loads((out / "runs" / f"{key}.json").read_text())
    assert e["reference"]["store_built_this_call"] is True
    assert e["reference"]["store_max_abs_chunk_mean_diff_vs_committed"] == 0.0
    assert e["final"]["val_loss"] == pytest.approx(runs[key]["final"]["val_loss"], abs=1e-6)
    # The analysis: R = (B/k)·t_arm/(m·t_B) per seed from the JSONs, beside m and time-to-target.
    assert analyze.main([str(out), "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tr = summary["time_ratio"]
    assert {r1_arm, "cggr_excess_r4", "random_subset", "random_token", "excess_token", "std_k"} <= set(tr)
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    for lab in (r1_arm, "excess_token", "std_k"):
        for sd, per in tr[lab]["per_seed"].items():
            lr = lr_B if lab.endswith("_token") else lr_k
            t_arm = runs[study.RunSpec(lab, int(sd), lr, s.steps).key()]["accounting"]["ms_per_step"]
            t_B = runs[study.RunSpec("std_B", int(sd), lr_B, s.steps).key()]["accounting"]["ms_per_step"]
            m = 1.0 if lab == "std_k" else summary["m"][lab]["per_seed"][sd]["m"]
            assert per["R"] == pytest.approx((s.batch / s.keep) * t_arm / (m * t_B))
        assert tr[lab]["mean"] == pytest.approx(np.mean([p["R"] for p in tr[lab]["per_seed"].values()]))
    md = (out / "summary.md").read_text()
    assert "## Time ratio R" in md and "early stopping" in md and "stride" in md
    assert f"{r1_arm} - random_subset" in summary["paired"] and f"{r1_arm} - cggr_excess_r4" in summary["paired"]
    # Rule 2's extra seeds: the committed tables gain the new seed's chunks and noise bank; no value changes.
    before = np.load(out / "ref" / "refnll_train.npy")
    assert study.main(argv + ["--seeds", "0,1,2"]) == 0
    after = np.load(out / "ref" / "refnll_train.npy")
    ids012, gate012 = study.round3_chunk_ids(replace(s, seeds=(0, 1, 2)), 200)
    assert np.isfinite(after[ids012]).all() and np.isfinite(before).sum() < np.isfinite(after).sum()
    np.testing.assert_array_equal(after[np.isfinite(before)], before[np.isfinite(before)])
    assert (out / "ref" / "refnll_noise_s2.npy").exists()
    assert study.RunSpec("excess_token", 2, lr_B, s.steps).key() + ".json" in {p.name for p in (out / "runs").iterdir()}


def _r3_study(tmp_path: Path) -> study.Study:
    data = _write_corpus(tmp_path / "pycode")
    return study.Study(study.parse_args(_r3_argv(tmp_path, data)))


def test_round3_reference_early_stopping_keeps_the_best_checkpoint(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    st = _r3_study(tmp_path)
    scripted = iter([3.0, 1.0, 2.0, 1.5])     # evaluations at steps 3, 6, 9, 12: the best is step 6, not the last
    seen = []

    def curve_loss(model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(st.evaluator, "curve_loss", curve_loss)
    model, info = st.train_reference_es()
    assert info["best_step"] == 6 and info["best_val_subset"] == 1.0 and len(seen) == 4
    assert [h["step"] for h in info["history"]] == [3, 6, 9, 12]
    got = model.state_dict()
    assert all(torch.equal(got[k], seen[1][k]) for k in got)          # the kept weights: step 6's
    assert not all(torch.equal(got[k], seen[3][k]) for k in got)      # not the last step's
    assert not model.training
    monkeypatch.setattr(st.evaluator, "curve_loss", lambda model: float("nan"))
    with pytest.raises(RuntimeError, match="no finite val-subset loss"):
        st.train_reference_es()


def test_round3_stored_token_reference_gives_the_on_the_fly_selection(tmp_path: Path) -> None:
    """The token arm's first step: the stored per-token reference (float16) read back for the batch's chunk ids
    equals the reference model's on-the-fly NLL to float16 rounding, and selects the same tokens through
    CGGRLoss's excess scoring (same loss) as the on-the-fly reference rounded alike."""
    from cggr_torch import CGGRLoss, score_tokens, select_tokens

    st = _r3_study(tmp_path)
    st.ensure_reference_es()
    s = st.scale
    ref_model = study.build_model(s, st.V, 1000, st.ctx.device)
    ref_model.load_state_dict(torch.load(tmp_path / "store" / "model.pt"))
    ref_model.eval()
    ids, toks_np = st.stream(0, s.batch, s.steps, False).batch(0)
    toks = st.ctx.tokens(toks_np)
    live = study.token_nll(ref_model, toks, st.ctx)                        # (B, T) float32, on the fly
    stored = torch.from_numpy(st.ref_tokens_of(ids, 0))
    assert stored.shape == live.shape == (s.batch, s.seq_len)
    torch.testing.assert_close(stored, live.half().float(), atol=2e-3, rtol=0)   # float16 rounding only
    learner = study.build_model(s, st.V, 0, st.ctx.device)
    with torch.no_grad():
        logits = learner(input_ids=toks[:, :-1]).logits
    flat, tgt = logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1)
    masks, losses = [], []
    for ref in (stored, live.half().float()):
        crit = CGGRLoss(scoring="excess", selection="topk", warmup_steps=0, dynamic_threshold=False,
                        min_tokens_ratio=s.keep / s.batch)
        losses.append(crit(flat, tgt, reference_nll=ref.reshape(-1)))
        ts = score_tokens(flat, tgt, scoring="excess", reference_nll=ref.reshape(-1))
        masks.append(select_tokens(ts.difficulty, ts.eligible, s.keep / s.batch, selection="topk")[0])
    assert int(masks[0].sum()) == round(tgt.numel() * s.keep / s.batch)
    assert torch.equal(masks[0], masks[1]) and torch.equal(losses[0], losses[1])
    live_mask = select_tokens(*(lambda t: (t.difficulty, t.eligible))(
        score_tokens(flat, tgt, scoring="excess", reference_nll=live.reshape(-1))), s.keep / s.batch)[0]
    assert (live_mask == masks[0]).float().mean() > 0.97               # unrounded: at most a few boundary ties
    # The token arm itself reads exactly that reference at its first step (captured from its training step).
    captured = {}
    orig = study.Study._train_tokens

    def spy(self, model, opt, toks_, spec, i, crit, ref_model, sel, ref_tok=None):
        if i == 0:
            captured.update(toks=toks_.clone(), ref=ref_tok.clone(), ref_model=ref_model)
        return orig(self, model, opt, toks_, spec, i, crit, ref_model, sel, ref_tok)

    study.Study._train_tokens = spy
    try:
        st.run(study.RunSpec("excess_token", 0, 1e-3, 2))
    finally:
        study.Study._train_tokens = orig
    assert captured["ref_model"] is None and torch.equal(captured["toks"], toks)
    assert torch.equal(captured["ref"], stored)
    # Noise chunks read their seed's bank; a missing store is a clear error.
    neg = np.array([-1, -2])
    np.testing.assert_array_equal(st.ref_tokens_of(neg, 0), st.noise_stores[0].token_nll[:2].astype(np.float32))
    st.ref_store = None
    with pytest.raises(ValueError, match="store"):
        st.ref_tokens_of(ids, 0)


def test_round3_gate_router_option_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's router scores (library: truncated router with the options + select_sequences) against an
    independent computation: the router's per-position CE at SPEC §9.3's scored positions, mean, minus the
    stored per-chunk reference. A prefix shorter than the tiny chunks is added so that it changes something."""
    monkeypatch.setitem(study.ROUTER_OPTIONS, "p8", {"router_prefix": 8})
    st = _r3_study(tmp_path)
    st.ensure_reference_es()
    s = st.scale
    st.best_B_state = {"spec": study.RunSpec("std_B", 0, 1e-3, s.steps), "val": 0.0,
                       "state": study.build_model(s, st.V, 5, st.ctx.device).state_dict()}
    gate = st.gate_r3("gate_test.json")
    from cggr_torch import create_truncated_router

    model = study.build_model(s, st.V, 5, st.ctx.device)
    model.eval()
    ids, rows = st.stream(0, s.gate_chunks, 1, False, offset=s.batch * s.steps).batch(0)
    t = st.ctx.tokens(rows)
    ref = st.ref_train[ids].astype(np.float64)
    L = s.seq_len
    positions = {"all": range(L), "s4": range(0, L, 4), "s16": range(0, L, 16), "n64": range(L),
                 "p256": range(L), "p8": range(8)}
    for n in (1, 2):
        with torch.no_grad():
            lg = create_truncated_router(model, n)(t[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), t[:, 1:], reduction="none").double().numpy()
        for o, pos in positions.items():
            loss = nll[:, list(pos)].mean(1)
            means = gate["sets"]["clean"]["means"]
            assert means[f"r{n}_{o}_loss"] == pytest.approx(loss.mean(), abs=1e-5), (n, o)
            assert means[f"r{n}_{o}_excess"] == pytest.approx((loss - ref).mean(), abs=1e-5), (n, o)
            assert gate["sets"]["clean"]["spearman_vs_oracle_excess"][f"r{n}_{o}_excess"] == pytest.approx(
                study.spearman(loss - ref, gate_oracle(model, t, ref, st)), abs=1e-6)
    assert gate["scored_positions"] == {o: len(p) for o, p in positions.items()}
    assert gate["r1_stride"] in (4, 16)


def gate_oracle(model, t, ref, st) -> np.ndarray:
    return study.token_nll(model, t, st.ctx).mean(1).double().numpy() - ref


def test_round3_stride_rule_and_rule1_extension() -> None:
    def g(rho):
        return {"sets": {"clean": {"spearman_vs_oracle_excess": {"r1_s16_excess": rho}}}}

    assert study.choose_r1_stride(g(0.5)) == 16 and study.choose_r1_stride(g(0.93)) == 16
    assert study.choose_r1_stride(g(0.4999)) == 4 and study.choose_r1_stride(g(float("nan"))) == 4
    with pytest.raises(ValueError, match="gate"):
        study.choose_r1_stride({"sets": {}})
    grid = (1e-3, 2e-3, 4e-3)
    assert study.edge_extension({1e-3: 4.0, 2e-3: 4.1, 4e-3: 4.2}, grid) == 5e-4
    assert study.edge_extension({1e-3: 4.3, 2e-3: 4.1, 4e-3: 4.0}, grid) == 8e-3
    assert study.edge_extension({1e-3: 4.3, 2e-3: 4.0, 4e-3: 4.1}, grid) is None
    assert study.edge_extension({1e-3: 4.0, 2e-3: 4.1}, grid) is None            # sweep incomplete
    assert study.edge_extension({1e-3: 4.3, 2e-3: 4.0, 4e-3: 4.1, 5e-4: 3.0}, grid) is None   # judged on the grid


def test_round3_time_ratio_and_schedule(capsys: pytest.CaptureFixture) -> None:
    # The amendment's arithmetic at S: t_B 35.6 ms, library router excess 35.3 ms, m 1.18 -> R = 3.4.
    assert analyze.time_ratio(32, 8, 35.3, 35.6, 1.18) == pytest.approx(4 * 35.3 / (1.18 * 35.6))
    assert round(analyze.time_ratio(32, 8, 35.3, 35.6, 1.18), 1) == 3.4
    assert analyze.time_ratio(32, 8, 19.1, 35.6, 1.0) == pytest.approx(2.146, abs=1e-3)
    for bad in ({"m": 0.0}, {"t_B": float("nan")}, {"k": -1}):
        args = {"B": 32, "k": 8, "t_arm": 1.0, "t_B": 1.0, "m": 1.0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            analyze.time_ratio(**args)
    calls = study.round3_schedule(study.SCALES["S2"], 65.0, 480.0)
    assert all(sum(sec for _, sec in c) <= 480.0 for c in calls)
    names = [n for c in calls for n, _ in c]
    assert names[0].startswith("reference") and names.index("gate (std_B in memory)") < names.index(
        "seed 0: sequence arms (3 runs)")
    for seed in (0, 1, 2):
        assert sum(n.startswith(f"seed {seed}:") for n in names) == 3
    assert study.main(["--scale", "S2", "--round", "round3", "--out", "/nonexistent", "--plan-only"]) == 0
    assert "call 1" in capsys.readouterr().out
