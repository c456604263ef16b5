"""``benchmarks/harness/profiles.py``: the per-kernel summaries of ``benchmarks/step.py --profile`` (issue 16's
JAX-against-PyTorch question), from a hand-made Chrome trace, a real CPU JAX trace and a CPU PyTorch profile."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from benchmarks.harness import profiles


def _write_trace(folder: Path, events: list[dict]) -> None:
    path = folder / "plugins" / "profile" / "run1"
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summary_of_a_gpu_trace(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 3, "args": {"name": "XLA Modules"}}]
    kernels = [("gemm_fusion_3", 400.0), ("gemm_fusion_3", 400.0), ("loop_add_fusion.12", 50.0),
               ("loop_add_fusion.7", 150.0), ("sm90_xmma_gemm", 1000.0)]
    events = meta + [{"ph": "X", "pid": 7, "tid": 1, "name": n, "dur": d} for n, d in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "dur": 9000.0}]  # host: left out
    # the derived lines span the same kernels again: left out
    events += [{"ph": "X", "pid": 7, "tid": 2, "name": n, "dur": d} for n, d in kernels]
    events += [{"ph": "X", "pid": 7, "tid": 3, "name": "jit_step", "dur": 2000.0}]
    _write_trace(tmp_path, events)
    s = profiles.jax_trace_summary(tmp_path, steps=2, top=2)
    assert s["source"].endswith("/device:GPU stream kernels") and s["steps"] == 2
    assert s["device_ms_per_step"] == pytest.approx(2000.0 / 1e3 / 2)
    names = [k["name"] for k in s["kernels"]]
    assert names == ["sm90_xmma_gemm", "gemm_fusion_3", "(other kernels: 2)"]
    assert s["kernels"][1]["ms_per_step"] == pytest.approx(0.4) and s["kernels"][1]["calls_per_step"] == 1.0
    assert s["kernels"][2]["ms_per_step"] == pytest.approx(0.1) and s["kernels"][2]["calls_per_step"] == 1.0
    assert sum(k["share"] for k in s["kernels"]) == pytest.approx(1.0)
    fams = {f["name"]: f["ms_per_step"] for f in s["families"]}
    assert fams == pytest.approx({"sm90_xmma_gemm": 0.5, "gemm_fusion": 0.4})  # top 2 families
    text = profiles.table(s, "row", "families")
    assert text.startswith("row: 1.00 ms/step busy over 2 step(s)") and "| gemm_fusion | 0.400 | 1.0 | 40.0 % |" in text


def test_a_gpu_trace_without_stream_lines_is_refused(tmp_path):
    _write_trace(tmp_path, [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
                            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "XLA Ops"}},
                            {"ph": "X", "pid": 7, "tid": 2, "name": "fusion", "dur": 5.0}])
    with pytest.raises(ValueError, match="no 'Stream' lines.*XLA Ops"):
        profiles.jax_trace_summary(tmp_path, steps=1)


def test_family_and_errors(tmp_path):
    assert profiles.family("add_convert_fusion.141") == "add_convert_fusion"
    assert profiles.family("loop_add_fusion_3") == "loop_add_fusion"
    assert profiles.family("input_reduce_fusion_2.1") == "input_reduce_fusion"
    assert profiles.family("sm90_xmma_gemm_bf16") == "sm90_xmma_gemm_bf16"
    assert profiles.family("42") == "42"
    with pytest.raises(FileNotFoundError, match="trace_dir"):
        profiles.jax_trace_summary(tmp_path, steps=1)
    with pytest.raises(ValueError, match="steps"):
        profiles.summarise([], 0, "x")


def test_real_jax_and_torch_profiles_on_cpu(tmp_path):
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    f = jax.jit(lambda x: jax.numpy.tanh(x @ x).sum())
    x = jax.numpy.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            f(x).block_until_ready()
    s = profiles.jax_trace_summary(tmp_path, steps=2)
    assert s["kernels"] and s["device_ms_per_step"] > 0 and "no device process" in s["source"]

    a = torch.ones((64, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.tanh(a @ a).sum()
    s = profiles.torch_profile_summary(prof, steps=3)
    assert "CPU self time" in s["source"]
    mm = next(k for k in s["kernels"] if k["name"] == "aten::mm")
    assert mm["calls_per_step"] == 1.0 and mm["ms_per_step"] > 0
