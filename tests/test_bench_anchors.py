"""Issue 18's anchors in the benchmark product, on CPU: ``benchmarks/ops/anchors_torch.py --quick`` records
every anchor it cannot import or run as skipped with the reason and still measures our rows; the runner's
``anchors`` suite; ``benchmarks/report.py``'s ratio lines (``not run: <reason>``, goals); and the local
``--unpack`` of a results archive, whose manifest is merged with an earlier call's instead of overwritten."""
from __future__ import annotations

import io
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
from benchmarks.harness import records  # noqa: E402
from tests.bench_env import subprocess_env as _env  # noqa: E402



# ------------------------------------------------------------------------------------------ the op script
def test_anchors_quick_through_the_runner_skips_the_anchors_cleanly(tmp_path):
    """``run.py anchors --allow-cpu --quick`` → ``ops/anchors_torch.py --quick``: no CUDA and (here) no QuACK, so
    every anchor is a skipped record with its reason, our rows are measured, the summary says "not run"; no
    ``.whl`` in a clean checkout, so nothing is installed (``carried_wheels`` is null). ~30 s (interpreted)."""
    runf = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "anchors", "--allow-cpu", "--quick", "--run-folder",
                        str(runf), "--commit", "abc1234"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    man = json.loads((runf / "manifest.json").read_text())
    (step,) = man["steps"]
    assert step["step"] == "anchors_torch" and step["rc"] == 0
    assert "quack-kernels" in man["software"] and "nvidia-cutlass-dsl" in man["software"]
    if not (ROOT / ".whl").is_dir():
        assert man["carried_wheels"] is None
    recs = {(r["op"], r["case"]): r for r in records.load_records(runf)}
    from benchmarks.ops import anchors_torch as a
    assert {c for o, c in recs if o == "anchor_ce"} == set(a.CE_ROWS)
    assert {c for o, c in recs if o == "anchor_linear_ce"} == set(a.LINEAR_ROWS)
    for key in [("anchor_ce", n) for n in ("quack_ce", "quack_ce_inplace", "quack_ce_inplace_grad", "liger_ce")] + \
               [("anchor_linear_ce", "quack_linear_ce"), ("anchor_linear_ce", "liger_flce")]:
        r = recs[key]
        assert r["extra"]["status"] == "skipped" and r["metrics"] == {"skipped": 1.0}, r
        assert "not importable" in r["extra"]["reason"] or "needs CUDA" in r["extra"]["reason"], r
        assert r["baseline"] and r["extra"]["quick"]
    for key in [("anchor_ce", "cggr_topk"), ("anchor_ce", "cggr_selective_inplace"), ("anchor_ce", "eager_ce"),
                ("anchor_linear_ce", "cggr_fused"), ("anchor_linear_ce", "matmul")]:
        r = recs[key]
        assert r["extra"]["status"] == "ok" and r["metrics"]["median_ms"] > 0, r
        assert r["metrics"]["first_call_s"] > 0
        assert r["suite"] == "anchors" and r["framework"] == "torch" and r["commit"] == "abc1234"
    assert set(recs[("anchor_ce", "cggr_topk")]["ratios"]) == {"eager_ce"}  # the anchors that ran
    assert set(recs[("anchor_linear_ce", "cggr_fused")]["ratios"]) == {"one_matmul", "torch_linear_ce"}
    assert recs[("anchor_ce", "cggr_topk")]["metrics"]["trained_tokens_per_s"] == pytest.approx(
        0.25 * recs[("anchor_ce", "cggr_topk")]["metrics"]["input_tokens_per_s"])
    # the float32 loss check of the full-CE rows: eager bf16 CE agrees with float32 to bf16 rounding
    assert recs[("anchor_ce", "eager_ce")]["metrics"]["loss_rel_err"] < 2e-2
    assert recs[("anchor_linear_ce", "torch_linear_ce")]["metrics"]["loss_rel_err"] < 1e-5
    log = (runf / "anchors" / "logs" / "anchors_torch.log").read_text()
    assert "cggr_topk" in log and "not run:" in log
    meta = json.loads((runf / "anchors" / "anchors_torch.meta.json").read_text())
    assert meta["records"] == len(recs) and meta["rc"] == 0
    raw = json.loads((runf / "anchors" / "raw" / "anchors_torch.json").read_text())
    assert raw["rows"] and raw["complete"] is True


def test_anchors_bad_arguments(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/ops/anchors_torch.py", "--quick", "--rows", "cggr_topk,nope",
                        "--run-folder", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--rows: unknown rows ['nope']" in p.stderr
    p = subprocess.run([sys.executable, "benchmarks/ops/anchors_torch.py", "--ratio", "1.5"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--ratio: expected a fraction" in p.stderr


# ------------------------------------------------------------------------------------------------ runner
def test_runner_has_the_anchors_suite(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_GPU_COUNT", "1")
    assert run.main(["--list"]) == 0
    assert "anchors:" in capsys.readouterr().out
    for trim in (False, True):
        argv = ["anchors", "--dry-run", "--commit", "abc1234", "--run-folder", str(tmp_path / "r"), "--quick"]
        assert run.main(argv + (["--trim"] if trim else [])) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "anchors_torch.py" in x and not x.startswith("#"))
        assert f"--run-folder {tmp_path / 'r'}" in line and "--commit abc1234" in line and line.endswith("--quick")
        assert ("--d 2048" in line) == trim
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ report
def _rec(op: str, case: str, ms, *, d=None, status="ok", reason=None, ratios=None, baseline=False) -> dict:
    shape = {"n": 16384, "vocab": 128256} | ({"d": d} if d else {})
    extra = {"status": status, "row": case, "packages": {"quack-kernels": "0.6.5"}}
    if reason:
        extra["reason"] = reason
    metrics = {"median_ms": ms, "iqr_ms": 0.01} if status == "ok" else {status: 1.0}
    return records.make_record(suite="anchors", op=op, framework="torch", case=case, shape=shape, dtype="bf16",
                               metrics=metrics, ratios=ratios or {}, baseline=baseline, commit="ccccccc",
                               gpu="NVIDIA H200", date="2026-12-03", command="python benchmarks/ops/anchors_torch.py",
                               extra=extra)


def test_report_anchor_ratio_lines(tmp_path):
    run_f = tmp_path / "h200" / "2026-12-03_ccccccc"
    lce_reason = "quack.linear_cross_entropy not importable (TypeError: epilogue fn depends on <Logger CUTE_DSL>)"
    recs = [
        _rec("anchor_ce", "cggr_topk", 2.24, ratios={"quack_ce": 2.24 / 3.32}),
        _rec("anchor_ce", "quack_ce", 3.32, baseline=True),
        _rec("anchor_ce", "liger_ce", None, status="failed", reason="RuntimeError: boom", baseline=True),
        _rec("anchor_ce", "cggr_selective_inplace_grad", 1.6, ratios={"quack_ce": 1.6 / 3.32}),
        _rec("anchor_ce", "cggr_selective_inplace", 2.3),  # its anchor (quack_ce_inplace) has no record
    ]
    records.write_records(recs, run_f / "anchors" / "anchors_torch.jsonl")
    lin = []
    for d, ours, liger in ((2048, 24.96, 47.7), (4096, 47.9, 91.7)):
        lin += [_rec("anchor_linear_ce", "cggr_fused", ours, d=d, ratios={"liger_flce": ours / liger}),
                _rec("anchor_linear_ce", "quack_linear_ce", None, d=d, status="skipped", reason=lce_reason,
                     baseline=True),
                _rec("anchor_linear_ce", "liger_flce", liger, d=d, baseline=True)]
    records.write_records(lin, run_f / "anchors" / "anchors_torch.jsonl")
    (run_f / "manifest.json").write_text(json.dumps({"started": "2026-12-03T11:00:00Z", "carried_wheels": {
        "target": "/tmp/cggr-site/site-packages", "errors": [],
        "wheels": ["quack_kernels-0.6.5-py3-none-any.whl", "nvidia_cutlass_dsl-4.7.1-py3-none-any.whl"]}}))
    text = report.render(records.load_records(tmp_path), tmp_path, tmp_path / "RESULTS.md")
    assert "## anchors:" in text and "### anchor_ce · torch — NVIDIA H200" in text
    assert "- CGGRLoss topk × QuACK CE: 0.67× (2.240 ms / 3.320 ms)" in text
    assert "- in-place selective CE × QuACK CE: 0.48× (1.600 ms / 3.320 ms) (goal ≤ 0.5, met)" in text
    assert "- CGGRLoss topk × Liger CE: not run: liger_ce failed: RuntimeError: boom" in text
    assert ("- in-place selective CE × QuACK CE in place (both backward into .grad): not run: quack_ce_inplace "
            "not measured in this run") in text
    for d in (2048, 4096):
        assert f"- fused LM head × QuACK linear CE (d = {d}): not run: quack_linear_ce skipped: {lce_reason}" in text
    assert "- fused LM head × Liger FLCE (d = 2048): 0.52× (24.960 ms / 47.700 ms) (goal ≤ 0.45, not met)" in text
    assert "not run: skipped: quack.linear_cross_entropy not importable" in text  # the table's note column
    assert "Anchor packages: quack-kernels 0.6.5." in text
    assert ("Carried wheels (installed with `pip --target /tmp/cggr-site/site-packages`): "
            "`quack_kernels-0.6.5-py3-none-any.whl`, `nvidia_cutlass_dsl-4.7.1-py3-none-any.whl`.") in text
    assert "| CGGRLoss topk fwd+bwd × QuACK CE | torch | NVIDIA H200 | 0.67 (V=128256) |" in text  # headline



def test_report_lists_the_wheels_of_the_call_that_ran_the_anchors(tmp_path):
    # 2026-12-03: four calls shared one run folder; the last (step, Liger only) became the top-level manifest
    # and the report named its wheels under the anchors' tables instead of the anchors call's QuACK wheels.
    run_f = tmp_path / "h200" / "2026-12-03_ccccccc"
    records.write_records([_rec("anchor_ce", "cggr_topk", 2.24, ratios={"quack_ce": 2.24 / 3.32}),
                           _rec("anchor_ce", "quack_ce", 3.32, baseline=True)],
                          run_f / "anchors" / "anchors_torch.jsonl")
    liger = {"target": "/tmp/cggr-site/site-packages", "errors": [], "wheels": ["liger_kernel-0.6.5-py3-none-any.whl"]}
    quack = {"target": "/tmp/cggr-site/site-packages", "errors": [],
             "wheels": ["liger_kernel-0.6.5-py3-none-any.whl", "quack_kernels-0.6.5-py3-none-any.whl"]}
    (run_f / "manifest.json").write_text(json.dumps({
        "started": "2026-12-03T12:00:00Z", "suites": ["step"], "carried_wheels": liger,
        "earlier_calls": [{"started": "2026-12-03T10:00:00Z", "suites": ["kernels"], "carried_wheels": liger},
                          {"started": "2026-12-03T11:00:00Z", "suites": ["anchors", "heads"],
                           "carried_wheels": quack}]}))
    text = report.render(records.load_records(tmp_path), tmp_path, tmp_path / "RESULTS.md")
    assert ("Carried wheels (installed with `pip --target /tmp/cggr-site/site-packages`): "
            "`liger_kernel-0.6.5-py3-none-any.whl`, `quack_kernels-0.6.5-py3-none-any.whl`.") in text

# ------------------------------------------------------------------------------- unpack and manifest merge
def _manifest(started: str, command: str, gpu: str = "NVIDIA H200", **more) -> dict:
    return {"schema": "cggr-bench-run/1", "commit": "ccccccc", "gpu": gpu, "started": started, "command": command,
            "steps": [{"step": command}], **more}


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_merge_manifests_keeps_every_call_once_in_time_order():
    a = _manifest("2026-12-03T10:00:00Z", "kernels")
    b = _manifest("2026-12-03T11:00:00Z", "anchors", earlier_calls=[a])
    c = _manifest("2026-12-03T10:30:00Z", "verify", gpu="NVIDIA H200 x2")
    m = records.merge_manifests(b, c)
    assert m["command"] == "anchors" and [x["command"] for x in m["earlier_calls"]] == ["kernels", "verify"]
    assert all("earlier_calls" not in x for x in m["earlier_calls"])
    assert records.merge_manifests(m, c) == m  # merging a call already there changes nothing
    assert records.manifest_calls(m)[-1]["command"] == "anchors"
    assert records.merge_manifests({}, a) == a


def test_unpack_results_merges_the_manifest(tmp_path):
    repo = tmp_path / "repo"
    folder = "benchmarks/results/h200/2026-12-03_ccccccc"
    first = _manifest("2026-12-03T10:00:00Z", "python -m benchmarks.run kernels")
    (repo / folder / "kernels").mkdir(parents=True)
    (repo / folder / "manifest.json").write_text(json.dumps(first))
    (repo / folder / "kernels" / "scoring_torch.jsonl").write_text("{}\n")
    second = _manifest("2026-12-03T11:00:00Z", "python -m benchmarks.run anchors")
    tgz = _tar(tmp_path / "results.tgz", {f"{folder}/manifest.json": json.dumps(second).encode(),
                                          f"{folder}/anchors/anchors_torch.jsonl": b'{"x": 1}\n'})
    assert records.unpack_results(tgz, repo) == [(repo / folder).resolve()]
    man = json.loads((repo / folder / "manifest.json").read_text())
    assert man["command"].endswith("anchors") and [c["command"] for c in man["earlier_calls"]] == [first["command"]]
    assert (repo / folder / "kernels" / "scoring_torch.jsonl").read_text() == "{}\n"  # the earlier call's records
    assert (repo / folder / "anchors" / "anchors_torch.jsonl").read_text() == '{"x": 1}\n'
    records.unpack_results(tgz, repo)  # twice: no duplicate call
    assert len(records.manifest_calls(json.loads((repo / folder / "manifest.json").read_text()))) == 2
    # a fresh folder: the manifest is written as it is
    other = "benchmarks/results/h200/2026-12-04_ddddddd"
    records.unpack_results(_tar(tmp_path / "b.tgz", {f"{other}/manifest.json": json.dumps(second).encode()}), repo)
    assert json.loads((repo / other / "manifest.json").read_text()) == second


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt"])
def test_unpack_results_refuses_members_outside_the_root(tmp_path, name):
    tgz = _tar(tmp_path / "bad.tgz", {name: b"x"})
    with pytest.raises(ValueError, match="outside the repository root"):
        records.unpack_results(tgz, tmp_path / "repo")
    assert not (tmp_path / "evil.txt").exists()


def test_runner_unpack_command_errors(tmp_path, capsys):
    assert run.main(["--unpack", str(tmp_path / "absent.tgz")]) == 2
    assert "error: --unpack" in capsys.readouterr().err
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    assert run.main(["--unpack", str(tmp_path / "junk.tgz")]) == 2
    assert run.main(["kernels", "--unpack", str(tmp_path / "junk.tgz")]) == 2
    assert "runs no suites" in capsys.readouterr().err


def test_quack_chunk_size_never_equals_the_hidden_size():
    # QuACK 0.6.5 refused d = 4096 with its default chunk of 4096 rows on the H200 ("m == n makes row/col
    # inference ambiguous"); the benchmark must pass a chunk with unequal sides and keep the default elsewhere.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "ops"))
    try:
        import anchors_torch
    finally:
        sys.path.pop(0)
    assert anchors_torch.quack_chunk_size(2048) == 4096
    assert anchors_torch.quack_chunk_size(4096) == 8192
    assert anchors_torch.quack_chunk_size(8192) == 4096
    for d in (1024, 2048, 3072, 4096, 5120, 8192):
        assert anchors_torch.quack_chunk_size(d) != d
