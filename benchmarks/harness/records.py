"""The ONE result record of the benchmarks and the results layout.

A record is one measured figure (one case of one op in one framework), a JSON object::

    {"schema": "cggr-bench/1", "suite": "kernels", "op": "scoring", "framework": "torch",
     "case": "triton kernel, default", "shape": {"n": 16384, "vocab": 128256}, "dtype": "bf16",
     "metrics": {"median_ms": 1.003, "p25_ms": ..., "p75_ms": ..., "iqr_ms": ..., "input_tokens_per_s": ...},
     "ratios": {"read_once_floor": 1.03},           # value / baseline, baselines measured in the same run
     "baseline": false,                              # true for the baselines themselves (copy, Liger, optax...)
     "commit": "4c80170", "gpu": "NVIDIA H200", "date": "2026-11-24", "command": "python benchmarks/...",
     "extra": {...}}                                 # anything else the benchmark wants to keep

Records are written as JSON lines under ``benchmarks/results/<gpu>/<date>_<commit>/<suite>/<op>_<framework>.jsonl``
(:func:`run_dir`, :func:`write_records`); the raw output of the script (its own JSON and log) sits next to it
under ``raw/``. ``benchmarks/report.py`` reads every ``*.jsonl`` below ``benchmarks/results`` and regenerates
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import json
import shlex
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

from benchmarks.harness import env as _env

__all__ = ["SCHEMA", "RESULTS_ROOT", "SUITES", "OPS", "FRAMEWORKS", "RunContext", "make_record",
           "run_dir", "write_records", "load_records", "command_line", "manifest_calls", "merge_manifests",
           "unpack_results"]

SCHEMA = "cggr-bench/1"
RESULTS_ROOT = _env.REPO_ROOT / "benchmarks" / "results"
SUITES = ("verify", "kernels", "heads", "models", "quality", "step", "anchors")
OPS = ("scoring", "selective_ce", "selection", "fused_linear", "batch_split", "step", "token_stats", "anchor_ce",
       "anchor_linear_ce")
FRAMEWORKS = ("torch", "jax")


def command_line(argv: Optional[list[str]] = None) -> str:
    """The command as typed (``python <script> <args>``), for the record and RESULTS.md."""
    argv = sys.argv if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in argv)


class RunContext:
    """What every record of one invocation shares: suite, commit, GPU, date, command, and the run folder."""

    def __init__(self, *, suite: str, commit: Optional[str] = None, gpu: Optional[str] = None,
                 date: Optional[str] = None, command: Optional[str] = None,
                 results_root: Optional[Path] = None, run_folder: Optional[Path] = None):
        if suite not in SUITES:
            raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
        self.suite = suite
        self.commit = _env.commit(commit)
        self.gpu = gpu or _env.gpu_name()
        self.date = date or _env.today()
        self.command = command or command_line()
        root = Path(results_root) if results_root is not None else RESULTS_ROOT
        self.run_folder = Path(run_folder) if run_folder is not None else run_dir(root, self.gpu, self.date,
                                                                                   self.commit)

    @property
    def suite_dir(self) -> Path:
        return self.run_folder / self.suite

    def record(self, **fields: Any) -> dict[str, Any]:
        return make_record(suite=self.suite, commit=self.commit, gpu=self.gpu, date=self.date,
                           command=self.command, **fields)


def make_record(*, suite: str, op: str, framework: str, case: str, metrics: dict[str, Any],
                commit: str, gpu: str, date: str, command: str, shape: Optional[dict[str, Any]] = None,
                dtype: Optional[str] = None, ratios: Optional[dict[str, float]] = None, baseline: bool = False,
                extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One record (see the module docstring); checks the fields every reader relies on."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
    if framework not in FRAMEWORKS + ("both",):
        raise ValueError(f"framework: expected one of {FRAMEWORKS}, got {framework!r}")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError("metrics: expected a non-empty dict of measured values")
    rec = {"schema": SCHEMA, "suite": suite, "op": op, "framework": framework, "case": str(case),
           "shape": dict(shape or {}), "dtype": dtype, "metrics": dict(metrics), "ratios": dict(ratios or {}),
           "baseline": bool(baseline), "commit": commit, "gpu": gpu, "date": date, "command": command}
    if extra:
        rec["extra"] = extra
    return rec


def run_dir(root: Path, gpu: str, date: str, commit: str) -> Path:
    """``<root>/<gpu slug>/<date>_<commit>``: one folder per GPU run; ``+dirty`` becomes ``-dirty``."""
    safe_commit = commit.replace("+", "-").replace("/", "-")
    return Path(root) / _env.gpu_slug(gpu) / f"{date}_{safe_commit}"


def write_records(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """Append records as JSON lines to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every record of every ``*.jsonl`` below ``root`` (skipping lines of another schema)."""
    out = []
    for p in sorted(Path(root).rglob("*.jsonl")):
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("schema") == SCHEMA:
                r.setdefault("_file", str(p))
                out.append(r)
    return out


def manifest_calls(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The device calls a run manifest describes: its earlier calls, then itself (without ``earlier_calls``)."""
    own = {k: v for k, v in manifest.items() if k != "earlier_calls"}
    return list(manifest.get("earlier_calls") or []) + ([own] if own else [])


def merge_manifests(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One manifest for a run folder written by several device calls (the same commit and day, one machine
    or several): every call of both, each once (a call is known by its ``started`` time, ``command`` and
    ``gpu``), ordered by ``started``; the latest call is the top level (``benchmarks/report.py`` orders run
    folders by it) and the others are its ``earlier_calls``."""
    seen, calls = set(), []
    for c in manifest_calls(old) + manifest_calls(new):
        key = (c.get("started"), c.get("command"), c.get("gpu"))
        if key in seen:
            continue
        seen.add(key)
        calls.append(c)
    calls.sort(key=lambda c: str(c.get("started") or ""))
    top = dict(calls[-1])
    if len(calls) > 1:
        top["earlier_calls"] = calls[:-1]
    return top


def unpack_results(archive: Path, root: Path) -> list[Path]:
    """Unpack a device call's results archive (``benchmarks/run.py --out-tar``, paths relative to the
    repository root) at ``root``, merging each ``manifest.json`` with the one already there
    (:func:`merge_manifests`) instead of overwriting it: an earlier call of the same commit and day, on this or
    another machine, keeps its record. Records files of the same name are replaced (one invocation = one
    file, as on the GPU machine). Returns the run folders touched. Raises ``ValueError`` for an archive member
    that is absolute, climbs out of ``root`` or is a link."""
    root = Path(root).resolve()
    folders: list[Path] = []
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            pure = PurePosixPath(m.name)
            if pure.is_absolute() or ".." in pure.parts:
                raise ValueError(f"archive: member {m.name!r} of {archive} is outside the repository root")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"archive: member {m.name!r} of {archive} is a link or special file")
        for m in members:
            dest = root / m.name
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m).read()
            if PurePosixPath(m.name).name == "manifest.json":
                folders.append(dest.parent)
                if dest.exists():
                    try:
                        old = json.loads(dest.read_text())
                    except ValueError:
                        old = None
                    if isinstance(old, dict):
                        merged = merge_manifests(old, json.loads(data))
                        dest.write_text(json.dumps(merged, indent=2) + "\n")
                        continue
            dest.write_bytes(data)
    return folders
