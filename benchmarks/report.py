#!/usr/bin/env python
"""Regenerate ``benchmarks/RESULTS.md`` from the result records.

    python -m benchmarks.report                       # reads benchmarks/results, writes benchmarks/RESULTS.md
    python -m benchmarks.report --results DIR --out FILE

For every suite, GPU and (op, framework) it shows the LATEST run that measured it (run folders are ordered by
their manifest's start time, else by date): one row per case with the median, the inter-quartile range, the
ratios against the baselines measured in the same run, and tokens/s (input and, where the benchmark selects
tokens, trained); under each table the commit, the run folder and the command that produced it. Launch-sweep
variants are summarised (the fastest three), quick CPU script checks and ``benchmarks/results/archive`` are
left out. The text before runs 21+ lives in ``RESULTS_ARCHIVE.md`` (runs 1-20, unchanged); design decisions
with their evidence in ``DECISIONS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path.pop(0)
    sys.path.insert(0, os.path.dirname(_here))

from benchmarks.harness.convert import TOKEN_STATS_OURS  # noqa: E402
from benchmarks.harness.records import RESULTS_ROOT, SUITES, load_records  # noqa: E402

SUITE_TITLES = {"verify": "verify: GPU tests and real-size checks",
                "kernels": "kernels: scoring, selective CE, selection",
                "heads": "heads: fused LM head + selective CE; per-token log-probs + entropy (token_stats)",
                "models": "models: batch splitting, whole step",
                "quality": "quality", "step": "step: the whole training step, both frameworks",
                "anchors": "anchors: QuACK and Liger CE / linear CE beside ours, one process (issue 18)"}
MAX_ROWS = 40


def _run_key(folder: Path) -> tuple[str, str]:
    """Order of run folders: the manifest's start time, else the folder name (``<date>_<commit>``)."""
    m = folder / "manifest.json"
    started = ""
    if m.exists():
        try:
            started = json.loads(m.read_text()).get("started") or ""
        except (OSError, ValueError):
            started = ""
    return (started or folder.name[:10], folder.name)


def _run_folder(rec: dict[str, Any], root: Path) -> Path:
    """``<root>/<gpu>/<date>_<commit>`` of a record, from its file's path."""
    p = Path(rec["_file"]).resolve()
    rel = p.relative_to(root.resolve())
    return root.resolve() / rel.parts[0] / rel.parts[1]


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M"
    if abs(x) >= 1e4:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.{digits}f}"


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out.parent).replace(os.sep, "/")


def _telemetry_line(meta_path: Path) -> Optional[str]:
    """``GPU before/after: SM clock, power`` from the benchmark's ``.meta.json`` (nvidia-smi), if logged."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    parts = []
    for when in ("before", "after"):
        t = meta.get(f"telemetry_{when}") or {}
        g = (t.get("gpus") or [{}])[0]
        if "clocks.sm" in g:
            parts.append(f"{when}: SM {g['clocks.sm']:.0f} MHz, {g.get('power.draw', float('nan')):.0f} W, "
                         f"{g.get('temperature.gpu', float('nan')):.0f} °C")
    return ("GPU " + "; ".join(parts) + ".") if parts else None


def _sweep_name(case: str) -> str:
    c = case.strip()
    for prefix in ("pallas sweep ", "sweep "):
        if c.startswith(prefix):
            return c[len(prefix):]
    return c


def _case_table(recs: list[dict[str, Any]]) -> list[str]:
    ratio_names = sorted({k for r in recs for k in r.get("ratios", {})})
    has_iqr = any("iqr_ms" in r["metrics"] for r in recs)
    tok_in = any("input_tokens_per_s" in r["metrics"] for r in recs)
    tok_tr = any("trained_tokens_per_s" in r["metrics"] for r in recs)
    extra_metric = None
    if not any("median_ms" in r["metrics"] for r in recs):  # e.g. selection: device µs / eager ms / host µs
        extra_metric = [k for k in ("gpu_us", "eager_ms", "cpu_us") if any(k in r["metrics"] for r in recs)]
    head = ["case", "shape"]
    if extra_metric:
        head += extra_metric
    else:
        head += ["median ms"] + (["IQR ms"] if has_iqr else [])
    head += [n.replace("_", " ") if n.startswith("speedup_vs_") else f"× {n}" for n in ratio_names]
    head += (["input tok/s"] if tok_in else []) + (["trained tok/s"] if tok_tr else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in recs[:MAX_ROWS]:
        m = r["metrics"]
        shape = ", ".join(f"{k}={v}" for k, v in r.get("shape", {}).items() if v is not None)
        case = r["case"].strip() + (" *(baseline)*" if r.get("baseline") else "")
        row = [case.replace("|", "/"), shape]
        if extra_metric:
            row += [_fmt(m.get(k)) for k in extra_metric]
        else:
            row += [_fmt(m.get("median_ms"))] + ([_fmt(m.get("iqr_ms"))] if has_iqr else [])
        row += [_fmt(r.get("ratios", {}).get(n), 3) for n in ratio_names]
        row += ([_fmt(m.get("input_tokens_per_s"), 0)] if tok_in else [])
        row += ([_fmt(m.get("trained_tokens_per_s"), 0)] if tok_tr else [])
        lines.append("| " + " | ".join(row) + " |")
    if len(recs) > MAX_ROWS:
        lines.append(f"\n({len(recs) - MAX_ROWS} more rows in the records file.)")
    return lines


def _verify_table(recs: list[dict[str, Any]]) -> list[str]:
    lines = ["| step | framework | rc | passed | failed | skipped | wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in recs:
        m = r["metrics"]
        is_pytest = r["op"] == "pytest"

        def n(key: str) -> str:
            return str(int(m.get(key, 0))) if is_pytest else "—"
        failed = str(int(m.get("failed", 0) + m.get("error", 0))) if is_pytest else "—"
        wall = m.get("wall_s", m.get("pytest_s"))
        lines.append(f"| {r['case']} | {r['framework']} | {int(m.get('rc', -1))} | {n('passed')} | {failed} | "
                     f"{n('skipped')} | {_fmt(wall, 0)} |")
    return lines


#: The headline figure of each benchmark: (suite, op, framework, case (prefix), ratio name(s), label)
HEADLINES = [
    ("kernels", "scoring", "torch", "triton kernel, default", "read_once_floor", "Triton scoring × read-once floor"),
    ("kernels", "scoring", "jax", "pallas (default)", ("copy_half", "read_once_floor"),
     "Pallas scoring × read-once floor (copy/2)"),
    ("kernels", "selective_ce", "torch", "CGGRLoss topk", "liger_ce", "CGGRLoss topk fwd+bwd × Liger CE"),
    ("kernels", "selective_ce", "jax", "cggr pallas: score+select+CE (default launches)", "optax_dense",
     "Pallas pipeline fwd+bwd × optax CE"),
    ("heads", "fused_linear", "torch", "cggr_fused", "liger_flce", "fused LM head × Liger FLCE"),
    ("heads", "fused_linear", "jax", "cggr_fused", "one_matmul", "JAX fused LM head × one N·d·V matmul"),
    ("heads", "token_stats", "torch", "cggr_policy_gradient[0.2]", "materialised",
     "policy-gradient loss at ρ = 0.2 × TRL's materialised path"),
    ("heads", "token_stats", "jax", "cggr_policy_gradient[0.2]", "materialised",
     "policy-gradient loss at ρ = 0.2 × materialised path"),
    ("anchors", "anchor_ce", "torch", "cggr_topk", "quack_ce", "CGGRLoss topk fwd+bwd × QuACK CE"),
    ("anchors", "anchor_linear_ce", "torch", "cggr_fused", "quack_linear_ce", "fused LM head × QuACK linear CE"),
    ("models", "batch_split", "torch", "cggr", "speedup_vs_standard", "batch split step speed-up vs standard"),
    ("models", "batch_split", "jax", "cggr", "speedup_vs_standard", "batch split step speed-up vs standard"),
]


def _headlines(latest: dict[tuple[str, str, str, str], list[dict[str, Any]]]) -> list[str]:
    rows = []
    for suite, op, fw, prefix, ratio, label in HEADLINES:
        for (s_, gpu, op_, fw_), recs in sorted(latest.items()):
            if (s_, op_, fw_) != (suite, op, fw):
                continue
            names = (ratio,) if isinstance(ratio, str) else ratio
            hits = [r for r in recs if (r["case"].strip() == prefix or (r["case"].startswith(prefix) and (
                    op == "batch_split" or prefix.endswith("default")))) and any(n in r["ratios"] for n in names)]
            vals = []
            for r in hits:
                value = next(r["ratios"][n] for n in names if n in r["ratios"])
                where = (f" (V={r['shape']['vocab']}, d={r['shape']['d']})" if "d" in r["shape"] and
                         "vocab" in r["shape"] else
                         f" (V={r['shape']['vocab']})" if "vocab" in r["shape"] else
                         f" ({r['case']})" if op == "batch_split" else "")
                vals.append(f"{_fmt(value, 2)}{where}")
            ms = [r["metrics"].get("median_ms") for r in hits if r["metrics"].get("median_ms") is not None]
            if vals:
                rows.append(f"| {label} | {fw} | {gpu} | {', '.join(vals)} | {_fmt(ms[0]) if ms else '—'} | "
                            f"`{hits[0]['commit']}` {hits[0]['date']} |")
    if not rows:
        return []
    return ["## Headlines (latest run of each benchmark)", "",
            "| figure | framework | GPU | ratio | median ms (first row) | commit, date |",
            "|---|---|---|---:|---:|---|"] + rows + [""]


#: The issue-16 goals read off each shape's step table: (label, row, baseline row, compiled, goal as a speed-up
#: baseline / row, shapes it applies to or None for all). ``BEST_ROUTER`` as the row: the fastest batch-split row
#: of that framework and variant (every router: 1/2/4 layers and the SPEC §9.3 options), named in the line.
BEST_ROUTER = "best router"
STEP_GOALS = [
    ("fused CGGR step vs compiled standard", "cggr_fused", "standard", True, 1.15, ("1b",)),
    ("CGGRModel vs random subset, compiled", BEST_ROUTER, "random_subset", True, 0.9, None),
]


def _best_router(ms: dict[tuple[str, str, bool], float], fw: str, compiled: bool) -> Optional[str]:
    """The fastest ``batch_split*`` row of ``fw`` (and variant) measured in this table, or None."""
    rows = [(v, row) for (f, row, c), v in ms.items() if f == fw and c == compiled and row.startswith("batch_split")]
    return min(rows)[1] if rows else None


def _step_note(r: dict[str, Any]) -> str:
    """What a reader must know about a row besides its figures: skipped / failed and why, a compile failure,
    recompilation during the timed steps."""
    e, m = r.get("extra", {}), r["metrics"]
    if e.get("status") not in (None, "ok"):
        return f"{e.get('status')}: {e.get('reason', '')}"[:200]
    parts = []
    if e.get("compile_error"):
        parts.append(f"loss compile failed, loss eager: {e['compile_error']}"[:160])
    if m.get("graphs_compiled_timed"):
        parts.append(f"{int(m['graphs_compiled_timed'])} graph(s) compiled during the timed steps")
    if m.get("graph_breaks_warmup"):
        parts.append(f"{int(m['graph_breaks_warmup'])} graph break(s)")
    if m.get("sequences_trained") is not None:
        parts.append(f"{m['sequences_trained']:g} sequences")
    if e.get("router_options"):
        parts.append(", ".join(f"{k}={v}" for k, v in e["router_options"].items()))
    return "; ".join(parts)


def _step_rows(tables: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[tuple[str, str, bool], float]]:
    """Table rows of one step table (``tables``: framework -> records of one run) and their medians by
    ``(framework, row, compiled)``."""
    lines: list[str] = []
    ms: dict[tuple[str, str, bool], float] = {}
    for fw, compiled in (("torch", False), ("torch", True), ("jax", True)):
        for r in tables.get(fw, []):
            e, m = r.get("extra", {}), r["metrics"]
            if bool(e.get("compiled")) != compiled:
                continue
            row = e.get("row", r["case"])
            if e.get("status", "ok") == "ok" and m.get("median_ms") is not None:
                ms[(fw, row, compiled)] = m["median_ms"]
            mem = m.get("peak_memory_gib")
            lines.append("| " + " | ".join([
                row + (" *(baseline)*" if r.get("baseline") else ""), fw,
                ("jit" if fw == "jax" else "yes") if compiled else "no", _fmt(m.get("median_ms"), 1),
                _fmt(m.get("iqr_ms"), 1), _fmt(r.get("ratios", {}).get("standard"), 3),
                _fmt(r.get("ratios", {}).get("random_subset"), 3), _fmt(m.get("input_tokens_per_s"), 0),
                _fmt(m.get("trained_tokens_per_s"), 0), _fmt(mem, 1) if mem is not None else "—",
                _step_note(r).replace("|", "/")]) + " |")
    return lines, ms


def _step_goals(ms: dict[tuple[str, str, bool], float], shape: str) -> list[str]:
    """Issue 16's goals over one table's medians (each ratio within one run)."""
    goals = []
    for label, row, base, compiled, goal, shapes in STEP_GOALS:
        if shapes is not None and shape not in shapes:
            continue
        for fw in ("torch", "jax") if row == BEST_ROUTER else ("torch",):
            name = _best_router(ms, fw, compiled) if row == BEST_ROUTER else row
            a, b = ms.get((fw, name, compiled)), ms.get((fw, base, compiled))
            if a and b:
                verdict = "met" if b / a >= goal else "not met"
                what = f"{label} ({'JAX, ' if fw == 'jax' else ''}best router row: {name})" \
                    if row == BEST_ROUTER else label
                # three decimals where two would round a miss up to the goal (0.897 is not 0.90)
                digits = 3 if (round(b / a, 2) >= goal) != (b / a >= goal) else 2
                goals.append(f"{what}: {_fmt(b / a, digits)}× (goal ≥ {goal}, {verdict})")
    return goals


def _run_lines(fw: str, folder: Path, recs: list[dict[str, Any]], out: Path, older: int) -> list[str]:
    clocks = _telemetry_line(Path(recs[0]["_file"]).with_suffix("").with_suffix(".meta.json"))
    return ["", f"{fw}: commit {', '.join(f'`{c}`' for c in sorted({r['commit'] for r in recs}))}, "
            f"{recs[0]['date']}; run folder [`{_rel(folder, out)}`]({_rel(folder, out)})"
            + (f"; {older} older run(s) of this shape in the records" if older else "") + "."
            + (f" {clocks}" if clocks else ""),
            "Command: " + "; ".join(f"`{c}`" for c in sorted({r["command"] for r in recs}))]


_STEP_HEADER = ["| row | framework | compiled | step ms | IQR ms | × standard | × random subset | input tok/s | "
                "trained tok/s | peak GiB | note |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]


def _step_section(records: list[dict[str, Any]], root: Path, out: Path) -> list[str]:
    """The ``step`` suite: one table per GPU and model shape with the rows of both frameworks (each framework's
    latest run of that shape with a ``standard`` row), the JAX / PyTorch ratio of each row measured in both, and
    the issue-16 goals; then one table per later *partial* run (a subset of the rows, e.g. the cheaper routers
    with their own random subset), with its goals computed within that run only."""
    by: dict[tuple[str, str, str], dict[Path, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[(r["gpu"], str(r.get("shape", {}).get("model")), r["framework"])][_run_folder(r, root)].append(r)
    lines: list[str] = []
    for gpu, shape in sorted({(g, s) for g, s, _ in by}):
        latest: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
        partial: list[tuple[str, Path, list[dict[str, Any]]]] = []
        for fw in ("torch", "jax"):
            runs = by.get((gpu, shape, fw))
            if runs:
                full = [f for f, recs in runs.items()
                        if any(r.get("extra", {}).get("row", r["case"]) == "standard" for r in recs)]
                folder = max(full or runs, key=_run_key)
                latest[fw] = (folder, runs[folder])
                partial += [(fw, f, runs[f]) for f in sorted(runs, key=_run_key)
                            if f != folder and _run_key(f) > _run_key(folder)]
        first = next(iter(latest.values()))[1][0]
        sh = first.get("shape", {})
        lines += [f"### step · {shape} — {gpu}", "",
                  f"B = {sh.get('batch_size')}, T = {sh.get('seq_len')}, V = {sh.get('vocab')}, d = {sh.get('d')}, "
                  f"{sh.get('layers')} layers, {first.get('dtype')}. {first.get('extra', {}).get('cggr', '')}. "
                  "`× standard` = this step's time / the standard step's of the same run (eager rows: eager "
                  "standard; compiled rows: compiled standard; JAX: JAX standard), lower is faster; `× random "
                  "subset` likewise for the batch-split rows.", ""] + _STEP_HEADER
        rows, ms = _step_rows({fw: recs for fw, (_, recs) in latest.items()})
        lines += rows
        cross = []
        for (fw, row, compiled), v in ms.items():
            if fw != "jax":
                continue
            parts = [f"{_fmt(v / ms[('torch', row, c)], 2)}× {'compiled' if c else 'eager'}"
                     for c in (False, True) if ms.get(("torch", row, c))]
            if parts:
                cross.append(f"{row} {', '.join(parts)}")
        if cross:
            lines += ["", "JAX / PyTorch step time of the same row (lower: JAX faster; goal ≤ 1.2): "
                      + "; ".join(cross) + "."]
        goals = _step_goals(ms, shape)
        if goals:
            lines += ["", "Issue 16 goals (speed-up = baseline step / this step; PyTorch unless marked): "
                      + "; ".join(goals) + "."]
        for fw, (folder, recs) in latest.items():
            lines += _run_lines(fw, folder, recs, out, len(by[(gpu, shape, fw)]) - 1)
        for fw, folder, recs in partial:
            lines += ["", f"#### step · {shape}, a later partial run ({fw}, `{folder.name}`): its rows with "
                      "their own same-run baselines", ""] + _STEP_HEADER
            rows, pms = _step_rows({fw: recs})
            lines += rows
            goals = _step_goals(pms, shape)
            if goals:
                lines += ["", "Issue 16 goals within this run: " + "; ".join(goals) + "."]
            lines += _run_lines(fw, folder, recs, out, 0)
        lines.append("")
    return lines


#: Issue 17's goals: at ρ = 0.2 ≤ 0.6× the time and ≤ 0.1× the extra memory of the materialised path; at ρ = 1
#: no slower than the fastest fused alternative measured.
TOKEN_STATS_GOALS = {"time_at_0.2": 0.6, "memory_at_0.2": 0.1, "fused_at_1": 1.0}


def _token_stats_table(recs: list[dict[str, Any]]) -> list[str]:
    """``heads/token_stats``: one row per method and ρ (time, extra memory, the ratios of
    ``benchmarks.harness.convert._token_stats``, tokens/s) and the issue-17 goal line of each of our methods."""
    lines = ["| method | ρ | median ms | p10–p90 ms | × materialised | extra memory GiB | × materialised memory | "
             "× fastest fused | input tok/s | trained tok/s | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in recs:
        m, e, rat = r["metrics"], r.get("extra", {}), r.get("ratios", {})
        rho = r.get("shape", {}).get("ratio")
        method = e.get("method", r["case"]) + (" *(baseline)*" if r.get("baseline") else "")
        if e.get("status") not in (None, "ok"):
            note = f"{e.get('status')}: {e.get('reason', '')}"[:200]
        else:
            note = str(e.get("note", ""))[:160]
        p = (f"{_fmt(m.get('p10_ms'), 2)}–{_fmt(m.get('p90_ms'), 2)}" if m.get("p10_ms") is not None else "—")
        lines.append("| " + " | ".join([
            method, "—" if rho is None else f"{rho:g}", _fmt(m.get("median_ms"), 2), p,
            _fmt(rat.get("materialised"), 3), _fmt(m.get("peak_extra_gib"), 3),
            _fmt(rat.get("materialised_memory"), 3), _fmt(rat.get("fastest_fused"), 3),
            _fmt(m.get("input_tokens_per_s"), 0), _fmt(m.get("trained_tokens_per_s"), 0),
            note.replace("|", "/")]) + " |")
    goals = []
    for r in recs:
        e, rat = r.get("extra", {}), r.get("ratios", {})
        rho = r.get("shape", {}).get("ratio")
        if e.get("method") not in TOKEN_STATS_OURS or e.get("status") != "ok" or rho is None:
            continue
        parts = []
        if abs(rho - 0.2) < 1e-9:
            t, mem = rat.get("materialised"), rat.get("materialised_memory")
            if t is not None:
                parts.append(f"{_fmt(t, 2)}× the time (goal ≤ {TOKEN_STATS_GOALS['time_at_0.2']}, "
                             f"{'met' if t <= TOKEN_STATS_GOALS['time_at_0.2'] else 'not met'})")
            if mem is not None:
                parts.append(f"{_fmt(mem, 3)}× the extra memory (goal ≤ {TOKEN_STATS_GOALS['memory_at_0.2']}, "
                             f"{'met' if mem <= TOKEN_STATS_GOALS['memory_at_0.2'] else 'not met'})")
            elif t is not None:
                parts.append("extra memory not measured here")
        elif rho >= 1.0:
            f = rat.get("fastest_fused")
            parts.append(f"{_fmt(f, 2)}× the fastest fused alternative (goal ≤ {TOKEN_STATS_GOALS['fused_at_1']}, "
                         f"{'met' if f <= TOKEN_STATS_GOALS['fused_at_1'] else 'not met'})" if f is not None
                         else "no fused alternative measured in this run")
        if parts:
            goals.append(f"{e['method']} at ρ = {rho:g}: " + ", ".join(parts))
    if goals:
        lines += ["", "Issue 17 goals (against the materialised path of the same run, and at ρ = 1 the fastest "
                  "fused alternative): " + "; ".join(goals) + "."]
    return lines


#: Issue 18's same-run ratio lines of the anchors suite: (op, our row, anchor row, label, goal or None).
ANCHOR_RATIOS = [
    ("anchor_ce", "cggr_topk", "quack_ce", "CGGRLoss topk × QuACK CE", None),
    ("anchor_ce", "cggr_selective_inplace_grad", "quack_ce", "in-place selective CE × QuACK CE", 0.5),
    ("anchor_ce", "cggr_selective_inplace", "quack_ce_inplace", "in-place selective CE × QuACK CE in place "
     "(both backward into .grad)", None),
    ("anchor_ce", "cggr_topk", "liger_ce", "CGGRLoss topk × Liger CE", None),
    ("anchor_linear_ce", "cggr_fused", "quack_linear_ce", "fused LM head × QuACK linear CE", None),
    ("anchor_linear_ce", "cggr_fused", "liger_flce", "fused LM head × Liger FLCE", 0.45),
]


def _anchor_status(r: Optional[dict[str, Any]]) -> Optional[str]:
    """None when the row ran, else ``"<status>: <reason>"`` (absent rows: ``not measured in this run``)."""
    if r is None:
        return "not measured in this run"
    e = r.get("extra", {})
    if e.get("status", "ok") == "ok" and r["metrics"].get("median_ms") is not None:
        return None
    return f"{e.get('status', 'no timing')}: {e.get('reason', '')}"


def _anchors_table(recs: list[dict[str, Any]]) -> list[str]:
    """``anchors/anchor_*``: one row per case and shape (time, IQR, extra memory, the loss check against the
    float32 eager loss, the same-process ratios, what ran or why not), then issue 18's ratio lines, each anchor
    that did not run named with its reason ("not run: ...")."""
    ratio_names = sorted({k for r in recs for k in r.get("ratios", {})})
    head = ["row", "shape", "median ms", "IQR ms", "peak extra GiB", "loss rel err"] + [f"× {n}" for n in ratio_names]
    lines = ["| " + " | ".join(head + ["note"]) + " |", "|---|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in recs:
        m, e = r["metrics"], r.get("extra", {})
        shape = ", ".join(f"{k}={v}" for k, v in r.get("shape", {}).items() if v is not None)
        status = _anchor_status(r)
        note = f"not run: {status}" if status else str(e.get("implementation", ""))
        row = [r["case"] + (" *(baseline)*" if r.get("baseline") else ""), shape, _fmt(m.get("median_ms")),
               _fmt(m.get("iqr_ms")), _fmt(m.get("peak_extra_gib"), 3),
               "—" if m.get("loss_rel_err") is None else f"{m['loss_rel_err']:.1e}"]
        row += [_fmt(r.get("ratios", {}).get(n), 3) for n in ratio_names]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in row + [note[:300]]) + " |")
    by = {(r["case"], r.get("shape", {}).get("d")): r for r in recs}
    op = recs[0]["op"] if recs else ""
    ratio_lines = []
    for op_, ours, anchor, label, goal in ANCHOR_RATIOS:
        if op_ != op:
            continue
        for d in sorted({k[1] for k in by}, key=lambda x: x or 0):
            a, b = by.get((ours, d)), by.get((anchor, d))
            if a is None and b is None:
                continue
            where = f" (d = {d})" if d is not None else ""
            why_b, why_a = _anchor_status(b), _anchor_status(a)
            if why_b:
                ratio_lines.append(f"{label}{where}: not run: {anchor} {why_b}"[:400])
            elif why_a:
                ratio_lines.append(f"{label}{where}: not run: {ours} {why_a}"[:400])
            else:
                x = a["metrics"]["median_ms"] / b["metrics"]["median_ms"]
                verdict = f" (goal ≤ {goal}, {'met' if x <= goal else 'not met'})" if goal is not None else ""
                ratio_lines.append(f"{label}{where}: {_fmt(x, 2)}× ({_fmt(a['metrics']['median_ms'])} ms / "
                                   f"{_fmt(b['metrics']['median_ms'])} ms){verdict}")
    if ratio_lines:
        lines += ["", "Issue 18 ratios (same process; our median / the anchor's, lower is faster):", ""]
        lines += [f"- {x}" for x in ratio_lines]
    pkgs = next((r.get("extra", {}).get("packages") for r in recs if r.get("extra", {}).get("packages")), None)
    if pkgs:
        lines += ["", "Anchor packages: " + ", ".join(f"{k} {v}" for k, v in sorted(pkgs.items())) + "."]
    return lines


def render(records: list[dict[str, Any]], root: Path, out: Path) -> str:
    records = [r for r in records if not r.get("extra", {}).get("quick")
               and "archive" not in Path(r["_file"]).resolve().relative_to(root.resolve()).parts[:1]]
    lines = [
        "# Benchmark results",
        "",
        "*Generated by `python -m benchmarks.report` from the records under `benchmarks/results/<gpu>/<date>_<commit>/`"
        " — do not edit by hand.* The log of runs 1–20 (2026-11-24, before the harness) is kept unchanged in "
        f"[RESULTS_ARCHIVE.md]({_rel(out.parent / 'RESULTS_ARCHIVE.md', out)}); where its files went: "
        f"[results/MIGRATION.md]({_rel(root / 'MIGRATION.md', out)}). The design decisions these numbers support, "
        f"with their evidence: [DECISIONS.md]({_rel(out.parent.parent / 'DECISIONS.md', out)}).",
        "",
        "Every ratio is against a baseline measured **in the same run** (`× name` = this case's median / the "
        "baseline's, lower is faster; the model benchmarks' `speedup_vs_*` = baseline step / this step). Times are "
        "medians after warm-up (`benchmarks/harness/timing.py`: CUDA events for PyTorch, `block_until_ready` for "
        "JAX); the IQR is p75 − p25. Figures converted from the pre-harness JSON (runs 1–20) have p10/p90 instead "
        "of an IQR and were timed by the scripts of their time (`triton.testing.do_bench` for most PyTorch rows).",
        "",
        "Reproduce on a GPU machine (repository root, `PYTHONPATH=.`): `python -m benchmarks.run <suite> --commit "
        "<sha> --out-tar $OUT/results.tgz`, suites `verify`, `kernels`, `heads`, `models`, `quality`, `step`, "
        "`anchors` (`python -m benchmarks.run --list`; the anchors' carried wheels: `benchmarks/ANCHORS.md`); then "
        "`python -m benchmarks.run --unpack results.tgz` here (merges the run's manifest with an earlier call's) and "
        "`python -m benchmarks.report`.",
        "",
    ]
    step_records = [r for r in records if r["suite"] == "step"]  # one table per shape: _step_section
    by: dict[tuple[str, str, str, str], dict[Path, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["suite"] != "step":
            by[(r["suite"], r["gpu"], r["op"], r["framework"])][_run_folder(r, root)].append(r)
    latest_of = {key: runs[max(runs, key=_run_key)] for key, runs in by.items()}
    lines += _headlines(latest_of)
    for suite in SUITES:
        if suite == "step":
            if step_records:
                lines += [f"## {SUITE_TITLES['step']}", ""] + _step_section(step_records, root, out)
            continue
        keys = sorted(k for k in by if k[0] == suite)
        if not keys:
            continue
        lines += [f"## {SUITE_TITLES.get(suite, suite)}", ""]
        for key in keys:
            _, gpu, op, fw = key
            runs = by[key]
            latest = max(runs, key=_run_key)
            recs = runs[latest]
            man = _manifest(latest)
            sweep = [r for r in recs if r.get("extra", {}).get("sweep")]
            parts = [r for r in recs if r.get("extra", {}).get("part")]
            main = [r for r in recs if not r.get("extra", {}).get("sweep") and not r.get("extra", {}).get("part")]
            title = f"{op} · {fw}" if suite != "verify" else f"{op} · {fw}"
            label = man.get("archive_run")
            lines += [f"### {title} — {gpu}", ""]
            if suite == "verify":
                lines += _verify_table(main)
            elif op == "token_stats" and main:
                lines += _token_stats_table(main)
            elif suite == "anchors" and main:
                lines += _anchors_table(main)
                # the wheels of the call that ran the anchors: a later call of the same run folder (another
                # suite) may have carried fewer wheels, and its manifest is the top-level one after --unpack
                calls = [man] + list(man.get("earlier_calls") or [])
                calls = ([c for c in calls if "anchors" in (c.get("suites") or [])]
                         + [c for c in calls if "anchors" not in (c.get("suites") or [])])
                carried = [c.get("carried_wheels") for c in calls]
                carried = next((c for c in carried if isinstance(c, dict) and c.get("wheels")), None)
                if carried:  # issue 18: the exact wheels of the anchors, from the run's manifest
                    lines += ["", "Carried wheels (installed with `pip --target " + str(carried.get("target"))
                              + "`): " + ", ".join(f"`{w}`" for w in carried["wheels"]) + "."
                              + (" Errors: " + "; ".join(carried["errors"]) if carried.get("errors") else "")]
            elif main:
                lines += _case_table(main)
            if parts:
                lines += ["", "Parts (device time of each kernel alone, CUDA-graph replays; × floor = its own "
                          "bytes at the same run's copy bandwidth): " + "; ".join(
                              f"{r['case'][6:]} {_fmt(r['metrics']['gpu_us'], 0)} µs"
                              + (f" ({_fmt(r['ratios']['floor'], 2)}×)" if r.get("ratios", {}).get("floor") else "")
                              + f" [V={r['shape'].get('vocab')}]" for r in parts[:12]) + "."]
            if sweep:
                best = sorted(sweep, key=lambda r: r["metrics"].get("median_ms", float("inf")))[:3]
                lines += ["", f"Launch sweep: {len(sweep)} variants in the records; fastest: " + "; ".join(
                    f"`{_sweep_name(r['case'])}` {_fmt(r['metrics'].get('median_ms'))} ms "
                    f"(V={r['shape'].get('vocab')})"
                    for r in best) + "."]
            clocks = _telemetry_line(Path(recs[0]["_file"]).with_suffix("").with_suffix(".meta.json"))
            if clocks:
                lines += ["", clocks]
            commands = sorted({r["command"] for r in recs})
            commits = sorted({r["commit"] for r in recs})
            older = len(runs) - 1
            lines += ["", f"Commit {', '.join(f'`{c}`' for c in commits)}, {recs[0]['date']}"
                      + (f" ({label} of the archive)" if label else "")
                      + f"; run folder [`{_rel(latest, out)}`]({_rel(latest, out)})"
                      + (f"; {older} older run(s) of this benchmark in the records" if older else "") + ".",
                      "Command: " + "; ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_ROOT, help="records root (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS_ROOT.parent / "RESULTS.md", help="default %(default)s")
    args = p.parse_args(argv)
    recs = load_records(args.results)
    text = render(recs, args.results, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} from {len(recs)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
