"""CPU smoke tests of the benchmark product (issue 13 item 9): the GPU runner's ``--list`` / ``--dry-run`` of
every suite, the harness's timing / record / layout on trivial functions, ``benchmarks/report.py`` on fake
records, and one op script per framework end to end in its ``--quick`` mode (interpreted kernels).

They check the plumbing, not the numbers: no GPU is needed and nothing here is timed for real.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.harness import convert, env, records, timing  # noqa: E402
from tests.bench_env import subprocess_env as _subprocess_env  # noqa: E402



# ------------------------------------------------------------------------------------------------ runner
def test_runner_list_names_every_suite(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for suite in ("verify", "kernels", "heads", "models", "quality", "step"):
        assert f"{suite}:" in out
    assert "expected on one H200" in out


@pytest.mark.parametrize("suite", ["verify", "kernels", "heads", "models", "step"])
@pytest.mark.parametrize("trim", [False, True])
def test_runner_dry_run_prints_the_commands(suite, trim, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_GPU_COUNT", "1")  # the plan of a one-GPU machine, whatever this one has
    argv = [suite, "--dry-run", "--commit", "abc1234", "--run-folder", str(tmp_path / "r")]
    argv += ["--trim"] if trim else []
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    cmds = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert cmds, out
    for step in run.SUITES[suite][1]:
        if step.min_gpus > 1:
            assert f"{step.name}] " in out and "needs 2 GPUs" in out  # named even when skipped
            continue
        assert f"[{suite}/{step.name}]" in out
    for c in cmds:
        if "benchmarks/" in c and c.split()[1].endswith(tuple(f"{op}.py" for op in records.OPS)):
            assert f"--run-folder {tmp_path / 'r'}" in c and "--commit abc1234" in c
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_runner_dry_run_quality_passes_arguments_through(capsys, tmp_path):
    assert run.main(["quality", "--dry-run", "--commit", "abc1234", "--run-folder", str(tmp_path / "r"), "--",
                     "--scale", "S", "--round", "round2", "--deadline-s", "530"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "benchmarks.quality.study" in x)
    assert "--scale S --round round2 --deadline-s 530" in line
    assert f"--out {tmp_path / 'r' / 'quality'}" in line


def test_pytest_workers_scale_per_step():
    """The JAX tests get 5/3 of --pytest-workers (their time is mostly CPU compilation); the others the count
    itself; a placeholder without ``-n`` passes through."""
    assert run.scale_workers(["-n", "3", "--dist", "loadfile"], 5 / 3) == ["-n", "5", "--dist", "loadfile"]
    assert run.scale_workers(["-n", "3", "--dist", "loadfile"], 1.0) == ["-n", "3", "--dist", "loadfile"]
    assert run.scale_workers(["-n", "1"], 0.2) == ["-n", "1"]
    assert run.scale_workers([], 5 / 3) == []
    assert run.scale_workers(["[-n 3 --dist loadfile if pytest-xdist is installed]"], 2.0) == \
        ["[-n 3 --dist loadfile if pytest-xdist is installed]"]
    steps = {st.name: st for st in run.SUITES["verify"][1]}
    xd = ["-n", "3", "--dist", "loadfile"]
    jax_cmd = run.expand(steps["pytest_jax"], trim=False, run=Path("r"), commit="c", py="py", quality_args=(),
                         xdist=xd)
    torch_cmd = run.expand(steps["pytest_torch"], trim=False, run=Path("r"), commit="c", py="py", quality_args=(),
                           xdist=xd)
    assert jax_cmd[jax_cmd.index("-n") + 1] == "5" and torch_cmd[torch_cmd.index("-n") + 1] == "3"
    assert "--durations=25" in jax_cmd and jax_cmd[-1] == "tests/jax"


def test_runner_rejects_unknown_suite(capsys):
    assert run.main(["final3a", "--dry-run"]) == 2
    assert "--list" in capsys.readouterr().err


def test_runner_estimates_bound_the_lead_command():
    """The verify + kernels call the lead runs after the merge must fit one device call (≤ 9 min) trimmed."""
    steps = [s for name in ("verify", "kernels") for s in run.SUITES[name][1] if s.min_gpus == 1]
    assert run.expected_s(steps, trim=True, serial=False) <= 9 * 60
    assert all(s.timeout_s >= s.est_s for name in run.SUITES for s in run.SUITES[name][1])


def test_parse_pytest_summary():
    log = "....\n=== 3 failed, 97 passed, 1 skipped, 2 deselected in 49.11s ===\n"
    assert run.parse_pytest(log) == {"failed": 3.0, "passed": 97.0, "skipped": 1.0, "deselected": 2.0,
                                     "pytest_s": 49.11}


# ------------------------------------------------------------------------------------------------ harness
def test_summarize_quantiles_and_iqr():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], warmup=2, method="given")
    assert (t.median_ms, t.p25_ms, t.p75_ms, t.min_ms, t.reps) == (3.0, 2.0, 4.0, 1.0, 5)
    assert t.iqr_ms == 2.0 and t.as_dict()["iqr_ms"] == 2.0
    with pytest.raises(ValueError, match="times_ms"):
        timing.summarize([])


def test_measure_times_a_trivial_function():
    calls = []
    t = timing.measure(lambda: calls.append(sum(range(200))), framework="host", warmup=2, reps=7,
                       before_each=lambda: calls.append("prep"))
    assert t.reps == 7 and t.warmup == 2 and t.method == "host-clock"
    assert 0 <= t.min_ms <= t.p25_ms <= t.median_ms <= t.p75_ms
    assert calls.count("prep") == 9 and len(calls) == 18  # before_each ran before every call, untimed
    budgeted = timing.measure(lambda: None, framework="host", warmup=0, budget_ms=1.0, min_reps=3, max_reps=5)
    assert 3 <= budgeted.reps <= 5
    with pytest.raises(ValueError, match="framework"):
        timing.measure(lambda: None, framework="numpy")


def test_ratios_and_throughput():
    assert timing.ratios(2.0, {"liger": 4.0, "missing": None, "zero": 0.0}) == {"liger": 0.5}
    tp = timing.throughput(2.0, input_tokens=16384, trained_tokens=4096)
    assert tp == {"input_tokens_per_s": 16384 / 2e-3, "trained_tokens_per_s": 4096 / 2e-3}


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
                                       ("cpu", "cpu"), ("Tesla V100-SXM2-16GB", "v100-sxm2-16gb")])
def test_gpu_slug(name, slug):
    assert env.gpu_slug(name) == slug


def test_record_layout_and_roundtrip(tmp_path):
    ctx = records.RunContext(suite="kernels", commit="abc1234+dirty", gpu="NVIDIA H200", date="2026-12-02",
                             command="python benchmarks/scoring.py --framework torch", results_root=tmp_path)
    assert ctx.run_folder == tmp_path / "h200" / "2026-12-02_abc1234-dirty"
    t = timing.measure(lambda: None, framework="host", warmup=0, reps=3)
    rec = ctx.record(op="scoring", framework="torch", case="trivial", shape={"n": 1}, dtype="bf16",
                     metrics=t.as_dict() | timing.throughput(t.median_ms or 1.0, input_tokens=1),
                     ratios={"floor": 1.5})
    path = records.write_records([rec], ctx.suite_dir / "scoring_torch.jsonl")
    assert path == tmp_path / "h200" / "2026-12-02_abc1234-dirty" / "kernels" / "scoring_torch.jsonl"
    (back,) = records.load_records(tmp_path)
    for key in ("schema", "suite", "op", "framework", "case", "shape", "dtype", "metrics", "ratios", "commit",
                "gpu", "date", "command"):
        assert back[key] == rec[key]
    with pytest.raises(ValueError, match="suite"):
        records.make_record(suite="final3a", op="x", framework="torch", case="c", metrics={"a": 1}, commit="c",
                            gpu="g", date="d", command="c")
    with pytest.raises(ValueError, match="metrics"):
        ctx.record(op="x", framework="torch", case="c", metrics={})


def test_convert_legacy_selective_ce_json():
    raw = {"benchmark": "selective_ce_torch", "args": {"ratio": 0.25},
           "results": [{"name": "CGGRLoss topk", "n": 16384, "vocab": 128256, "dtype": "bf16", "median_ms": 2.0,
                        "p10_ms": 1.9, "p90_ms": 2.1, "x_liger": 0.625},
                       {"name": "liger CE (full)", "n": 16384, "vocab": 128256, "dtype": "bf16", "median_ms": 3.2,
                        "x_liger": 1.0}]}
    assert convert.kind_of(raw, "whatever.json") == "selective_ce_torch"
    cggr, liger = convert.convert(raw, "selective_ce_torch", commit="c", gpu="g", date="d", command="cmd")
    assert cggr["suite"] == "kernels" and cggr["ratios"] == {"liger_ce": 0.625} and not cggr["baseline"]
    assert liger["baseline"]
    assert cggr["metrics"]["input_tokens_per_s"] == pytest.approx(16384 / 2e-3)
    assert cggr["metrics"]["trained_tokens_per_s"] == pytest.approx(4096 / 2e-3)


def test_migrated_results_are_records():
    recs = records.load_records(records.RESULTS_ROOT)
    assert len(recs) > 100
    assert {r["suite"] for r in recs} >= {"kernels", "heads", "models"}
    assert all(r["gpu"] == "NVIDIA H200" for r in recs if "/h200/" in r["_file"])
    for folder in (records.RESULTS_ROOT / "h200").iterdir():
        man = json.loads((folder / "manifest.json").read_text())
        assert folder.name == f"{man['date']}_{man['commit'].replace('+', '-')}"


# ------------------------------------------------------------------------------------------------ report
def _fake(tmp: Path, folder: str, started: str, median: float, *, quick: bool = False) -> None:
    d = tmp / "h200" / folder
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"started": started}))
    recs = [records.make_record(suite="kernels", op="scoring", framework="torch", case="triton default",
                                shape={"n": 16384, "vocab": 128256}, dtype="bf16",
                                metrics={"median_ms": median, "iqr_ms": 0.01, "input_tokens_per_s": 1.6e7},
                                ratios={"read_once_floor": median / 0.976}, commit=folder[11:], gpu="NVIDIA H200",
                                date=folder[:10], command=f"python benchmarks/scoring.py --framework torch #{folder}",
                                extra={"quick": True} if quick else None),
            records.make_record(suite="kernels", op="scoring", framework="torch", case="copy", metrics={
                "median_ms": 1.953}, baseline=True, commit=folder[11:], gpu="NVIDIA H200", date=folder[:10],
                command="c")]
    records.write_records(recs, d / "kernels" / "scoring_torch.jsonl")
    gpu = {"clocks.sm": 1980.0, "power.draw": 512.0, "temperature.gpu": 41.0}
    (d / "kernels" / "scoring_torch.meta.json").write_text(json.dumps(
        {"telemetry_before": {"gpus": [gpu]}, "telemetry_after": {"gpus": [dict(gpu, **{"clocks.sm": 1755.0})]}}))


def test_report_renders_the_latest_run(tmp_path):
    res = tmp_path / "benchmarks" / "results"
    _fake(res, "2026-12-01_aaaaaaa", "2026-12-01T10:00:00Z", 1.111)
    _fake(res, "2026-12-02_bbbbbbb", "2026-12-02T10:00:00Z", 1.004)
    out = tmp_path / "benchmarks" / "RESULTS.md"
    assert report.main(["--results", str(res), "--out", str(out)]) == 0
    text = out.read_text()
    assert "1.004" in text and "1.111" not in text  # latest run only
    assert "× read_once_floor" in text and "1.029" in text  # same-run ratio column
    assert "`bbbbbbb`" in text and "#2026-12-02_bbbbbbb" in text  # commit and command of the figure
    assert "RESULTS_ARCHIVE.md" in text and "DECISIONS.md" in text
    assert "*(baseline)*" in text and "1 older run(s)" in text
    assert "before: SM 1980 MHz, 512 W" in text and "after: SM 1755 MHz" in text  # nvidia-smi telemetry


def test_report_leaves_out_quick_records(tmp_path):
    res = tmp_path / "results"
    _fake(res, "2026-12-03_ccccccc", "2026-12-03T10:00:00Z", 7.777, quick=True)
    text = report.render(records.load_records(res), res, tmp_path / "RESULTS.md")
    assert "7.777" not in text


# ------------------------------------------------------------------------------- end to end, CPU quick
def test_runner_runs_an_op_quick_and_packs_the_run(tmp_path):
    """``run.py`` → ``benchmarks/selection.py`` → ``ops/selection_torch.py --smoke`` (interpreted Triton), then
    the archive the device tool brings back. ~5 s."""
    runf, tar = tmp_path / "run", tmp_path / "out" / "results.tgz"
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "kernels", "--allow-cpu", "--quick", "--only",
                        "selection_torch", "--run-folder", str(runf), "--commit", "abc1234", "--out-tar", str(tar)],
                       cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    man = json.loads((runf / "manifest.json").read_text())
    (step,) = [s for s in man["steps"] if "rc" in s]
    assert step["step"] == "selection_torch" and step["rc"] == 0
    recs = records.load_records(runf)
    assert recs and all(r["op"] == "selection" and r["commit"] == "abc1234" and r["extra"]["quick"] for r in recs)
    assert (runf / "kernels" / "raw" / "selection_torch.json").exists()
    assert (runf / "kernels" / "logs" / "selection_torch.log").exists()
    names = tarfile.open(tar).getnames()
    assert "run/manifest.json" in names and "run/kernels/selection_torch.jsonl" in names


def test_jax_op_script_quick(tmp_path):
    """``benchmarks/scoring.py --framework jax --quick``: Pallas interpreted on tiny shapes. ~12 s."""
    p = subprocess.run([sys.executable, "benchmarks/scoring.py", "--framework", "jax", "--quick", "--no-sweep",
                        "--run-folder", str(tmp_path), "--commit", "abc1234"],
                       cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = records.load_records(tmp_path)
    assert {r["case"] for r in recs} >= {"pallas (default)", "copy (jnp.copy, read+write)"}
    assert all(r["framework"] == "jax" and r["suite"] == "kernels" for r in recs)
    meta = json.loads((tmp_path / "kernels" / "scoring_jax.meta.json").read_text())
    assert meta["rc"] == 0 and meta["records"] == len(recs)


def test_selection_has_no_jax_benchmark(capsys):
    from benchmarks.harness import front

    assert front.main("selection", ["--framework", "jax"]) == 0
    assert "n/a" in capsys.readouterr().out


def test_runner_concurrent_steps_timeouts_and_deadline(tmp_path, monkeypatch, capsys):
    """The runner's own mechanics on stand-in steps: a parallel batch, a step killed at its timeout (rc 124,
    its own process group), a step skipped because the deadline cannot fit it, the manifest and the records."""
    py = sys.executable
    steps = [
        run.Step("quick_ok", [py, "-c", "print('1 passed in 0.10s')"], est_s=1, timeout_s=20, kind="pytest",
                 parallel="checks"),
        run.Step("hangs", [py, "-c", "import time; time.sleep(60)"], est_s=1, timeout_s=2, kind="check",
                 parallel="checks"),
        run.Step("too_long", [py, "-c", "print('never')"], est_s=3600, timeout_s=4000, kind="check"),
    ]
    monkeypatch.setitem(run.SUITES, "verify", ("stand-in", steps))
    rc = run.main(["verify", "--allow-cpu", "--run-folder", str(tmp_path), "--commit", "abc1234",
                   "--deadline-min", "1", "--pytest-workers", "0"])
    assert rc == 1  # one failing step
    man = json.loads((tmp_path / "manifest.json").read_text())
    by = {s["step"]: s for s in man["steps"]}
    assert by["quick_ok"]["rc"] == 0 and by["quick_ok"]["wall_s"] < 15
    assert by["hangs"]["rc"] == 124 and by["hangs"]["timed_out"] and by["hangs"]["wall_s"] < 15
    assert "deadline" in by["too_long"]["skipped"]
    recs = {r["case"]: r for r in records.load_records(tmp_path / "verify")}
    assert recs["quick_ok"]["metrics"]["passed"] == 1.0 and recs["hangs"]["metrics"]["rc"] == 124


# ------------------------------------------------------------------------------ whole-step suite (step)
ROUTER_OPTION_ROWS = {"batch_split_L1_stride", "batch_split_L1_samples", "batch_split_L1_prefix"}
STEP_ROWS_TORCH = {"standard", "liger_flce", "cggr_loss", "cggr_fused", "batch_split_L1", "batch_split_L2",
                   "batch_split_L4", "random_subset", "batch_split_L1_compiled_router",
                   "batch_split_L1_stride4", "batch_split_L1_stride4_compiled_router"} | ROUTER_OPTION_ROWS
STEP_ROWS_JAX = STEP_ROWS_TORCH - {"liger_flce", "batch_split_L1_compiled_router",
                                   "batch_split_L1_stride4_compiled_router"}
#: the options each router row sets in --quick (benchmarks/step.py QUICK_ROUTER_OPTION_ROWS)
QUICK_OPTIONS = {"batch_split_L1_stride": {"router_positions": 4}, "batch_split_L1_samples": {"router_samples": 4},
                 "batch_split_L1_prefix": {"router_prefix": 8}, "batch_split_L1_stride4": {"router_positions": 4},
                 "batch_split_L1_compiled_router": {"router_compile": True},
                 "batch_split_L1_stride4_compiled_router": {"router_positions": 4, "router_compile": True},
                 "batch_split_L1_combined": {"router_prefix": 8, "router_samples": 4, "router_compile": True}}
RECORD_KEYS = ("schema", "suite", "op", "framework", "case", "shape", "dtype", "metrics", "ratios", "baseline",
               "commit", "gpu", "date", "command")


def _step(tmp: Path, *args: str, timeout: int = 420) -> list[dict]:
    p = subprocess.run([sys.executable, "benchmarks/step.py", "--run-folder", str(tmp), "--commit", "abc1234",
                        *args], cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return records.load_records(tmp)


def test_budget_skips_what_does_not_fit_and_learns_the_scale():
    from benchmarks.harness.budget import Budget

    now = [0.0]
    b = Budget(100.0, clock=lambda: now[0])
    assert b.fits(60.0) is None and b.fits(60.0, share_left=50.0).startswith("deadline")
    b.observe(10.0, 20.0)  # rows take twice their prior here
    assert b.scale == 1.0  # one row is not enough to rescale (it also paid for start-up)
    b.observe(10.0, 20.0)
    assert b.scale == 2.0 and b.expected(30.0) == 60.0
    now[0] = 50.0
    assert b.fits(20.0) is None and "50 s left" in b.fits(30.0)
    assert Budget(None).fits(1e9) is None
    with pytest.raises(ValueError, match="total_s"):
        Budget(0.0)


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_step_deadline_records_every_row_as_skipped(fw, tmp_path):
    """A budget nothing fits: every row of every shape is a record saying why, one file per shape; nothing is
    built or compiled (a few seconds)."""
    recs = _step(tmp_path, "--framework", fw, "--quick", "--deadline-s", "0.001")
    files = {Path(r["_file"]).name for r in recs}
    assert files == {f"step_{s}_{fw}.jsonl" for s in ("1b", "135m", "qwen")}
    assert all(r["extra"]["status"] == "skipped" and "deadline" in r["extra"]["reason"] for r in recs)
    assert all(r["metrics"] == {"skipped": 1.0, "wall_s": 0.0} for r in recs)
    per_shape = len(STEP_ROWS_TORCH) * 2 if fw == "torch" else len(STEP_ROWS_JAX)
    assert len(recs) == 3 * per_shape
    assert not any(r["extra"]["row"] == "batch_split_L1_combined" for r in recs)  # not a default row


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_step_rows_selection(fw, tmp_path):
    """``--rows all`` adds the rows outside the default selection (the combined router); named rows run alone
    (both variants in PyTorch); an unknown row is an error naming ``--rows``. Nothing is built (deadline)."""
    recs = _step(tmp_path / "all", "--framework", fw, "--quick", "--shapes", "1b", "--rows", "all",
                 "--deadline-s", "0.001")
    every = (STEP_ROWS_TORCH if fw == "torch" else STEP_ROWS_JAX) | {"batch_split_L1_combined"}
    assert {r["extra"]["row"] for r in recs} == every
    recs = _step(tmp_path / "two", "--framework", fw, "--quick", "--shapes", "1b", "--rows",
                 "random_subset,batch_split_L1_prefix", "--deadline-s", "0.001")
    got = sorted((r["extra"]["row"], r["extra"]["compiled"]) for r in recs)
    want = [("batch_split_L1_prefix", True), ("random_subset", True)]
    if fw == "torch":
        want = sorted(want + [("batch_split_L1_prefix", False), ("random_subset", False)])
    assert got == want
    p = subprocess.run([sys.executable, "benchmarks/step.py", "--framework", fw, "--quick", "--rows",
                        "batch_split_L3_fast", "--run-folder", str(tmp_path / "bad")], cwd=ROOT,
                       env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--rows" in p.stderr


def _check_step_records(recs: list[dict], fw: str, rows: set[str]) -> None:
    assert recs and all(r["suite"] == "step" and r["op"] == "step" and r["framework"] == fw for r in recs)
    for r in recs:
        for key in RECORD_KEYS:
            assert key in r, key
        assert r["commit"] == "abc1234" and r["extra"]["quick"] and r["dtype"] == "bf16"
        assert r["shape"]["model"] == "1b" and r["shape"]["batch_size"] == 8 and r["shape"]["seq_len"] == 16
        assert "warmup_steps=0" in r["extra"]["cggr"]
    ok = [r for r in recs if r["extra"]["status"] == "ok"]
    compiled = {True, False} if fw == "torch" else {True}
    assert {(r["extra"]["row"], r["extra"]["compiled"]) for r in recs} == {(x, c) for x in rows for c in compiled}
    for r in recs:
        if r["extra"]["status"] != "ok":
            assert r["extra"]["row"] == "liger_flce" and r["extra"]["status"] == "skipped", r["extra"]
            assert "liger" in r["extra"]["reason"]
    assert len(ok) >= len(recs) - 2
    B, T = 8, 16
    for r in ok:
        m = r["metrics"]
        assert m["median_ms"] > 0 and m["iqr_ms"] >= 0 and m["reps"] == 2 and m["warmup_steps"] == 1
        assert m["input_tokens_per_s"] == pytest.approx(B * T / (m["median_ms"] * 1e-3))
        row = r["extra"]["row"]
        trained = m["trained_tokens_per_step"]
        if row in ("standard", "liger_flce"):
            assert trained == B * (T - 1)
        elif row.startswith("batch_split") or row == "random_subset":
            assert trained == 2 * (T - 1) and m["sequences_trained"] == 2  # num_selected(8, 0.25)
        else:  # token-level CGGR: a quarter of the valid targets (stratified, threshold off)
            assert trained == pytest.approx(0.25 * B * (T - 1), abs=1)
        assert m["trained_tokens_per_s"] == pytest.approx(trained / (m["median_ms"] * 1e-3))
        if row == "standard":
            assert r["baseline"] and "standard" not in r["ratios"]
        else:
            assert r["ratios"]["standard"] > 0
        if row.startswith("batch_split"):
            assert r["ratios"]["random_subset"] > 0
            assert r["extra"]["router_layers"] == (1 if row.startswith("batch_split_L1") else int(row[-1]))
        if row in QUICK_OPTIONS:  # the cheaper routers: the options as set, in the record and its API line
            want = dict(QUICK_OPTIONS[row])
            if fw == "jax":
                want.pop("router_compile", None)
            assert r["extra"]["router_options"] == want
            assert all(f"{k}={v!r}" in r["extra"]["api"] for k, v in want.items())
        elif row.startswith("batch_split"):
            assert "router_options" not in r["extra"]
        if fw == "torch" and row.startswith("batch_split") and r["extra"]["compiled"]:
            assert r["extra"]["buckets"] == [1, 2, 3, 4, 6, 8]  # buckets="auto" with the compiled model, B = 8
        if fw == "jax":
            assert m["peak_memory_gib"] > 0 and m["compile_s"] > 0
    if fw == "torch":
        for r in ok:
            if r["extra"]["compiled"]:
                assert "graphs_compiled_timed" in r["metrics"]


def test_step_torch_quick(tmp_path):
    """``benchmarks/step.py --framework torch --quick``: every row eager and compiled (aot_eager) on a tiny
    Llama, CPU; then the report's step table from those records. ~1 min."""
    recs = _step(tmp_path, "--framework", "torch", "--quick", "--shapes", "1b")
    _check_step_records(recs, "torch", STEP_ROWS_TORCH)
    for r in recs:
        r["extra"].pop("quick")
    text = report.render(recs, tmp_path, tmp_path / "RESULTS.md")
    assert "### step · 1b — cpu" in text and "| batch_split_L4 | torch | yes |" in text
    assert "Issue 16 goals" in text and "fused CGGR step vs compiled standard" in text
    best = min((r["metrics"]["median_ms"], r["extra"]["row"]) for r in recs
               if r["extra"]["status"] == "ok" and r["extra"]["compiled"] and r["extra"]["row"].startswith("batch"))
    assert f"CGGRModel vs random subset, compiled (best router row: {best[1]})" in text
    assert "router_prefix=8" in text  # the options in the row's note
    meta = json.loads((tmp_path / "step" / "step_1b_torch.meta.json").read_text())
    assert meta["rows"] == len(recs)


def test_step_jax_quick(tmp_path):
    """``benchmarks/step.py --framework jax --quick``: every row (jit) on a tiny DecoderLM, CPU. ~1.5 min."""
    recs = _step(tmp_path, "--framework", "jax", "--quick", "--shapes", "1b")
    _check_step_records(recs, "jax", STEP_ROWS_JAX)
    raw = json.loads((tmp_path / "step" / "raw" / "step_1b_jax.json").read_text())
    assert raw["config"]["attention"] == "xla" and len(raw["rows"]) == len(recs)


def _step_rec(row: str, ms: float, *, fw: str = "torch", compiled: bool = True, shape: str = "1b",
              options: dict | None = None) -> dict:
    extra = {"row": row, "compiled": compiled, "status": "ok", "shape_name": shape, "cggr": "k = 4 of 16"}
    if options:
        extra["router_options"] = options
    rec = records.make_record(suite="step", op="step", framework=fw, case=row, metrics={"median_ms": ms},
                              shape={"model": shape, "batch_size": 16, "seq_len": 1024, "vocab": 128256},
                              dtype="bf16", commit="abc1234", gpu="NVIDIA H200", date="2026-12-03", command="c",
                              extra=extra, baseline=row in ("standard", "random_subset"))
    return rec


def test_report_step_goal_uses_the_best_router_row(tmp_path):
    """The issue-16 goal line names the fastest compiled batch-split row of each framework and judges it against
    the random subset of the same table (speed-up = random subset / row, goal ≥ 0.9)."""
    d = tmp_path / "h200" / "2026-12-03_abc1234" / "step"
    recs = [_step_rec("standard", 250.0), _step_rec("random_subset", 100.0), _step_rec("batch_split_L4", 150.0),
            _step_rec("batch_split_L1_prefix", 105.0, options={"router_prefix": 256}),
            _step_rec("batch_split_L1_stride", 90.0, compiled=False),  # eager: not the compiled goal's row
            _step_rec("cggr_fused", 200.0),
            _step_rec("random_subset", 80.0, fw="jax"), _step_rec("batch_split_L2", 100.0, fw="jax"),
            _step_rec("batch_split_L1_samples", 95.0, fw="jax")]
    records.write_records([r for r in recs if r["framework"] == "torch"], d / "step_1b_torch.jsonl")
    records.write_records([r for r in recs if r["framework"] == "jax"], d / "step_1b_jax.jsonl")
    text = report.render(records.load_records(tmp_path), tmp_path, tmp_path / "RESULTS.md")
    goal = next(line for line in text.splitlines() if line.startswith("Issue 16 goals"))
    assert "CGGRModel vs random subset, compiled (best router row: batch_split_L1_prefix): 0.95× (goal ≥ 0.9, met)" \
        in goal
    assert "CGGRModel vs random subset, compiled (JAX, best router row: batch_split_L1_samples): 0.84× " \
           "(goal ≥ 0.9, not met)" in goal
    assert "fused CGGR step vs compiled standard: 1.25× (goal ≥ 1.15, met)" in goal
    assert "router_prefix=256" in text


# ---------------------------------------------------------------------- token stats (heads suite, issue 17)
TOKEN_STATS_TORCH = {"trl_materialised", "cggr_token_stats", "cggr_policy_gradient"}


def _token_stats(tmp: Path, fw: str) -> list[dict]:
    p = subprocess.run([sys.executable, "benchmarks/token_stats.py", "--framework", fw, "--quick", "--run-folder",
                        str(tmp), "--commit", "abc1234"], cwd=ROOT, env=_subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    meta = json.loads((tmp / "heads" / f"token_stats_{fw}.meta.json").read_text())
    recs = records.load_records(tmp)
    assert meta["rc"] == 0 and meta["records"] == len(recs) and "--quick" in meta["impl_argv"]
    assert (tmp / "heads" / "raw" / f"token_stats_{fw}.json").exists()
    return recs


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_token_stats_quick_records_and_report(fw, tmp_path):
    """``benchmarks/token_stats.py --framework torch|jax --quick`` through the shared front: records in the
    ``heads`` suite with input / trained tokens/s and the same-run ratios, then the report's table and the
    issue-17 goal line. ~15 s each."""
    recs = _token_stats(tmp_path, fw)
    assert all(r["suite"] == "heads" and r["op"] == "token_stats" and r["framework"] == fw and r["extra"]["quick"]
               and Path(r["_file"]).name == f"token_stats_{fw}.jsonl" for r in recs)
    ref = "trl_materialised" if fw == "torch" else "materialised"
    ok = {r["case"]: r for r in recs if r["extra"]["status"] == "ok"}
    want = {f"{m}[{rho}]" for m in (ref, "cggr_token_stats", "cggr_policy_gradient") for rho in ("0.2", "1")}
    if fw == "torch":  # the rho = 1 one pass at larger memory budgets
        want |= {"cggr_policy_gradient_256mib[1]", "cggr_policy_gradient_512mib[1]"}
    assert want <= set(ok)
    for name, r in ok.items():
        m, shape = r["metrics"], r["shape"]
        n, valid, rho = shape["N"], shape["valid_tokens"], shape["ratio"]
        assert (n, shape["V"], shape["d"]) == (256, 1003, 32) and valid == 256 - 4 * 8  # the prompt: T // 8
        assert m["input_tokens_per_s"] == pytest.approx(n / (m["median_ms"] * 1e-3))
        trained = valid if rho == 1.0 else round(rho * valid)
        assert m["trained_tokens_per_s"] == pytest.approx(trained / (m["median_ms"] * 1e-3))
        if r["extra"]["method"] == ref:
            assert r["baseline"] and "materialised" not in r["ratios"]
        else:
            base = ok[f"{ref}[{name.split('[')[1]}"]["metrics"]["median_ms"]
            assert r["ratios"]["materialised"] == pytest.approx(m["median_ms"] / base)
        if fw == "jax":  # the compiled program's temporary memory
            assert m["peak_extra_gib"] > 0
            if r["extra"]["method"] != ref:
                assert r["ratios"]["materialised_memory"] > 0
        # the same loss as the materialised path at the same rho (same selection)
        assert m[f"check_loss_vs_{ref}"] < 1e-2
    for r in recs:
        r["extra"].pop("quick")
    text = report.render(recs, tmp_path, tmp_path / "RESULTS.md")
    assert f"### token_stats · {fw} — cpu" in text and "× materialised memory" in text
    goal = next(line for line in text.splitlines() if line.startswith("Issue 17 goals"))
    assert "cggr_policy_gradient at ρ = 0.2:" in goal and "cggr_token_stats at ρ = 1:" in goal
    assert "policy-gradient loss at ρ = 0.2" in text  # the headline


def test_token_stats_conversion_and_goals():
    """A GPU-like raw JSON (memory measured, a fused alternative, a failed method, a baseline that could not
    import): ratios against the same-run rows at the same ρ, and the goal verdicts."""
    from benchmarks.harness import front

    assert front.IMPLEMENTATIONS["token_stats"]["jax"] == "benchmarks.ops.token_stats_jax"
    assert convert.SUITE_OF_OP["token_stats"] == "heads" and front.QUICK_FLAG["token_stats"] == "--quick"
    raw = {"op": "token_stats", "framework": "torch",
           "shape": {"N": 16384, "B": 16, "T": 1024, "d": 4096, "V": 151936, "dtype": "bf16", "valid_tokens": 14336},
           "results": {
               "trl_materialised[0.2]": {"median_ms": 100.0, "p10_ms": 99.0, "p90_ms": 101.0, "peak_extra_gib": 40.0},
               "trl_materialised[1]": {"median_ms": 100.0, "peak_extra_gib": 40.0},
               "trl_chunked[1]": {"median_ms": 80.0, "peak_extra_gib": 2.0},
               "cggr_policy_gradient[0.2]": {"median_ms": 50.0, "peak_extra_gib": 2.0},
               "cggr_policy_gradient[1]": {"median_ms": 88.0, "peak_extra_gib": 2.5},
               "cggr_token_stats[0.2]": {"median_ms": 70.0, "peak_extra_gib": 6.0},
               "cggr_token_stats[1]": {"error": "OutOfMemoryError: CUDA out of memory"}},
           "notes": {"liger_grpo": "skipped: Liger-Kernel's fused linear GRPO loss unavailable (ModuleNotFoundError)"}}
    assert convert.kind_of(raw, "whatever.json") == "token_stats_torch"
    assert convert.kind_of({}, "bench_token_stats_jax.json") == "token_stats_jax"
    recs = convert.convert(raw, "token_stats_torch", commit="c", gpu="NVIDIA H200", date="d", command="cmd")
    by = {r["case"]: r for r in recs}
    pg2, pg1 = by["cggr_policy_gradient[0.2]"], by["cggr_policy_gradient[1]"]
    assert pg2["ratios"] == {"materialised": 0.5, "materialised_memory": 0.05}
    assert pg1["ratios"] == pytest.approx({"materialised": 0.88, "materialised_memory": 2.5 / 40, "fastest_fused": 1.1})
    assert pg2["metrics"]["trained_tokens_per_s"] == pytest.approx(round(0.2 * 14336) / 0.05)
    assert pg2["suite"] == "heads" and not pg2["baseline"] and by["trl_chunked[1]"]["baseline"]
    assert by["cggr_token_stats[1]"]["extra"]["status"] == "failed" and "memory" in \
        by["cggr_token_stats[1]"]["extra"]["reason"]
    assert by["liger_grpo"]["extra"]["status"] == "skipped" and by["liger_grpo"]["metrics"] == {"skipped": 1.0}
    for r in recs:
        r["_file"] = "/x/h200/2026-12-03_c/heads/token_stats_torch.jsonl"
    text = "\n".join(report._token_stats_table(recs))
    assert ("cggr_policy_gradient at ρ = 0.2: 0.50× the time (goal ≤ 0.6, met), 0.050× the extra memory "
            "(goal ≤ 0.1, met)") in text
    assert "cggr_policy_gradient at ρ = 1: 1.10× the fastest fused alternative (goal ≤ 1.0, not met)" in text
    assert "cggr_token_stats at ρ = 0.2: 0.70× the time (goal ≤ 0.6, not met), 0.150× the extra memory " \
           "(goal ≤ 0.1, not met)" in text
    assert "failed: OutOfMemoryError" in text and "skipped: Liger" in text


# ------------------------------------------------------------------------------------------- DECISIONS.md
def _decision_slugs() -> set[str]:
    import re

    text = (ROOT / "DECISIONS.md").read_text()
    return set(re.findall(r"^## ([a-z0-9-]+)\s*$", text, flags=re.M))


def test_decisions_has_the_slugs_package_comments_cite():
    import re

    slugs = _decision_slugs()
    assert {"fused-head-count-wait", "fused-head-chunk-plan", "scoring-launch-variants", "ce-backward-flat-grid",
            "scoring-few-row-launch", "pallas-launch-defaults", "pallas-backward-flat-grid-off",
            "stratified-default"} <= slugs
    cited = set()
    for pkg in ("cggr", "cggr_torch", "cggr_jax", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            cited |= set(re.findall(r"DECISIONS\.md:\s*([a-z0-9-]+)", path.read_text(errors="replace")))
    assert cited <= slugs, f"cited but not in DECISIONS.md: {sorted(cited - slugs)}"


def test_report_step_partial_run_gets_its_own_table(tmp_path):
    """A later run with a subset of the rows (no ``standard`` row) does not replace the full run's table: it is
    shown after it, with the goal computed within that run only, and a miss that two decimals would round up to
    the goal is printed with three."""
    full = tmp_path / "h200" / "2026-12-03_aaa1111" / "step"
    part = tmp_path / "h200" / "2026-12-04_bbb2222" / "step"
    records.write_records([_step_rec("standard", 250.0), _step_rec("random_subset", 100.0),
                           _step_rec("batch_split_L1", 130.0), _step_rec("cggr_fused", 230.0)],
                          full / "step_1b_torch.jsonl")
    later = [_step_rec("random_subset", 68.9), _step_rec("batch_split_L1_prefix", 76.8,
                                                          options={"router_prefix": 256})]
    for r in later:
        r["commit"], r["date"] = "bbb2222", "2026-12-04"
    records.write_records(later, part / "step_1b_torch.jsonl")
    text = report.render(records.load_records(tmp_path), tmp_path, tmp_path / "RESULTS.md")
    lines = text.splitlines()
    main_goal = next(line for line in lines if line.startswith("Issue 16 goals ("))
    assert "batch_split_L1): 0.77× (goal ≥ 0.9, not met)" in main_goal and "1.09×" in main_goal
    assert any("a later partial run (torch, `2026-12-04_bbb2222`)" in line for line in lines)
    part_goal = next(line for line in lines if line.startswith("Issue 16 goals within this run"))
    assert "(best router row: batch_split_L1_prefix): 0.897× (goal ≥ 0.9, not met)" in part_goal
    assert lines.index(main_goal) < lines.index(part_goal)


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_step_given_order(fw, tmp_path):
    """``--given-order`` runs the rows in the order of ``--rows`` (a row's two variants in ``ROWS``'s order);
    without it the ops module's ``ROWS`` order holds. Nothing is built (deadline)."""
    def order(folder: Path, *extra: str) -> list[tuple[str, bool]]:
        recs = _step(folder, "--framework", fw, "--quick", "--shapes", "1b", "--rows",
                     "batch_split_L1_prefix,random_subset", "--deadline-s", "0.001", *extra)
        return [(r["extra"]["row"], r["extra"]["compiled"]) for r in recs]

    rows = ["batch_split_L1_prefix", "random_subset"]
    given = order(tmp_path / "given", "--given-order")
    default = order(tmp_path / "default")
    assert [r for r, _ in given][::(2 if fw == "torch" else 1)] == rows
    assert [r for r, _ in default][::(2 if fw == "torch" else 1)] == rows[::-1]
    if fw == "torch":  # each row's variants in ROWS's order
        assert given == [("batch_split_L1_prefix", True), ("batch_split_L1_prefix", False),
                         ("random_subset", False), ("random_subset", True)]


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_step_profile(fw, tmp_path):
    """``--profile 1`` stores each row's kernel summary in its raw result (after the timed steps) and prints its
    families; the records are those of a run without it."""
    extra = ["--eager-only"] if fw == "torch" else []
    recs = _step(tmp_path, "--framework", fw, "--quick", "--shapes", "1b", "--rows", "random_subset",
                 "--profile", "1", *extra)
    assert [r["extra"]["status"] for r in recs] == ["ok"]
    raw = json.loads((tmp_path / "step" / "raw" / f"step_1b_{fw}.json").read_text())
    (row,) = raw["rows"]
    prof = row["profile"]
    assert prof["steps"] == 1 and prof["kernels"] and prof["families"] and prof["device_ms_per_step"] > 0
    assert raw["config"]["profile_steps"] == 1
