"""Where a step's time goes, per kernel: the same summary from a JAX trace and from a PyTorch profile.

Issue 16's open question is why JAX's small-``d`` steps run 1.3-1.7× PyTorch's compiled ones; a same-run,
kernel-by-kernel table of both answers it in one device call. ``benchmarks/step.py --profile N`` traces ``N``
steps of each row after its timed steps (outside them: the timing is unchanged) and stores
:func:`jax_trace_summary` / :func:`torch_profile_summary` in the row's raw result, printed by :func:`table`.

A summary is ``{"source", "steps", "device_ms_per_step", "kernels": [{"name", "ms_per_step",
"calls_per_step", "share"}, ...], "families": [...]}``, the kernels by total time, at most ``top`` of them, the
rest folded into one ``"(other kernels)"`` row, and the same by :func:`family` (XLA numbers its fusions).
``device_ms_per_step`` is the sum of the kernels' times (busy time, not wall time: a gap between kernels is
launch or host time).

JAX: ``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes a Chrome-trace JSON
(``perfetto_trace.json.gz``) that needs neither TensorBoard nor xprof to read; the device's kernels are the
complete events on the stream lines (threads ``Stream #…``) of the processes named ``/device:GPU:…``, not
the derived ``XLA Modules`` / ``XLA Ops`` / ``Steps`` lines, which span the same kernels again. On the CPU
(script checks) there is no device process, and the HLO ops on the XLA client threads stand in for it.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = ["family", "jax_trace_summary", "torch_profile_summary", "summarise", "table"]

TOP = 25


def _ranked(total: dict[str, float], calls: dict[str, int], busy: float, steps: int, top: int,
            fold: bool) -> list[dict[str, Any]]:
    """The ``top`` names by total time as summary rows; with ``fold`` the rest as one ``(other kernels)`` row."""
    names = sorted(total, key=lambda n: (-total[n], n))
    groups = [(n, [n]) for n in names[:top]]
    if fold and names[top:]:
        groups.append((f"(other kernels: {len(names) - top})", names[top:]))
    rows = []
    for label, members in groups:
        t = sum(total[n] for n in members)
        rows.append({"name": label, "ms_per_step": t / 1e3 / steps,
                     "calls_per_step": sum(calls[n] for n in members) / steps, "share": t / busy if busy else 0.0})
    return rows


def summarise(events: Iterable[tuple[str, float, int]], steps: int, source: str, top: int = TOP) -> dict[str, Any]:
    """``events``: ``(kernel name, duration in µs, calls)`` over ``steps`` steps (a name may repeat: its
    durations and calls add) → the summary described above."""
    if steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    total: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    fam_total: dict[str, float] = collections.defaultdict(float)
    fam_calls: dict[str, int] = collections.defaultdict(int)
    for name, dur_us, n in events:
        total[name] += float(dur_us)
        calls[name] += int(n)
        fam_total[family(name)] += float(dur_us)
        fam_calls[family(name)] += int(n)
    busy = sum(total.values())
    return {"source": source, "steps": steps, "device_ms_per_step": busy / 1e3 / steps,
            "kernels": _ranked(total, calls, busy, steps, top, fold=True),
            "families": _ranked(fam_total, fam_calls, busy, steps, top, fold=False)}


_NUMBERED = re.compile(r"([._]\d+)+$")


def family(name: str) -> str:
    """A kernel's name without XLA's trailing fusion numbers (``loop_add_fusion_3``, ``add_convert_fusion.141``
    → ``loop_add_fusion``, ``add_convert_fusion``): one row for the many copies of one kind of kernel."""
    return _NUMBERED.sub("", name) or name


def _perfetto_file(trace_dir: Path) -> Path:
    found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"trace_dir: no perfetto_trace.json.gz under {trace_dir} (was the trace taken "
                                "with create_perfetto_trace=True?)")
    return found[-1]


def jax_trace_summary(trace_dir: Path, steps: int, top: int = TOP) -> dict[str, Any]:
    """The kernels of the newest JAX trace under ``trace_dir`` (GPU processes; on the CPU the XLA client
    threads), summed over the ``steps`` steps it covers."""
    with gzip.open(_perfetto_file(trace_dir), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process = {e.get("pid"): str((e.get("args") or {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e.get("pid"), e.get("tid")): str((e.get("args") or {}).get("name", "")) for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in process.items() if name.startswith("/device:GPU")}
    if device_pids:
        streams = {key for key, name in thread.items() if key[0] in device_pids and name.startswith("Stream")}
        if not streams:
            raise ValueError(f"trace_dir: the GPU process has no 'Stream' lines to read kernels from (its lines: "
                             f"{sorted({n for k, n in thread.items() if k[0] in device_pids})})")

        def keep(e: dict[str, Any]) -> bool:
            return (e.get("pid"), e.get("tid")) in streams
        source = "jax trace, /device:GPU stream kernels"
    else:
        def keep(e: dict[str, Any]) -> bool:  # the HLO ops themselves, not the executor's events around them
            return (thread.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")
                    and "hlo_op" in (e.get("args") or {}))
        source = "jax trace, host XLA ops (no device process)"
    picked = [(str(e["name"]), float(e.get("dur", 0.0)), 1) for e in events
              if e.get("ph") == "X" and keep(e)]
    return summarise(picked, steps, source, top)


def torch_profile_summary(prof: Any, steps: int, top: int = TOP) -> dict[str, Any]:
    """The kernels of a finished ``torch.profiler.profile`` over ``steps`` steps: CUDA kernels by their device
    time when it recorded any, else (CPU script checks) the operators' self CPU time."""
    averages = prof.key_averages()

    def device_us(a: Any) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(a, attr, None)
            if v:
                return float(v)
        return 0.0
    on_device = [(a.key, device_us(a), int(a.count)) for a in averages if device_us(a) > 0]
    if on_device:
        rows, source = on_device, "torch.profiler, device self time"
    else:
        rows = [(a.key, float(a.self_cpu_time_total), int(a.count)) for a in averages
                if a.self_cpu_time_total > 0]
        source = "torch.profiler, CPU self time (no device time recorded)"
    return summarise(rows, steps, source, top)


def table(summary: dict[str, Any], title: str = "", key: str = "kernels") -> str:
    """A summary's ``key`` (``"kernels"`` or ``"families"``) as a markdown table (ms per step, calls per step,
    share of the busy time)."""
    head = (f"{title}: " if title else "") + (f"{summary['device_ms_per_step']:.2f} ms/step busy over "
                                               f"{summary['steps']} step(s) ({summary['source']})")
    lines = [head, "", "| kernel | ms/step | calls/step | share |", "|---|---:|---:|---:|"]
    for k in summary[key]:
        name = k["name"].replace("|", "/")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {name} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} | {100 * k['share']:.1f} % |")
    return "\n".join(lines)
