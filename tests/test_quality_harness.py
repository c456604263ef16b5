"""The quality-study v2 harness (``benchmarks/quality``: ``pycode.py``, ``study.py``, ``analyze.py``) on CPU.

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
from pathlib import Path

import numpy as np
import pytest

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
    round1_arms = set(study.ARMS) - set(study.ROUTER_EXCESS) - set(study.CGGR_EXCESS) - set(study.TOKEN_ARMS)
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
