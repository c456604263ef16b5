"""Where and what a benchmark ran on: the commit, the GPU (name, slug for the results layout), the software,
and the GPU's clocks and power (``nvidia-smi``) so that a slow run can be told apart from a throttled GPU.
No framework is imported here unless asked (``software(...)``)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["REPO_ROOT", "commit", "gpu_name", "gpu_slug", "telemetry", "software", "today"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit(explicit: Optional[str] = None) -> str:
    """The commit the figures belong to: ``explicit`` (``--commit``), else ``$CGGR_COMMIT`` (the GPU machine
    gets a copy of the working tree without ``.git``), else ``git rev-parse --short HEAD`` with ``+dirty``
    when the tree has uncommitted changes, else ``unknown``."""
    if explicit:
        return explicit
    env = os.environ.get("CGGR_COMMIT")
    if env:
        return env
    head = _run(["git", "rev-parse", "--short=7", "HEAD"])
    if not head:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def gpu_name() -> str:
    """The first GPU's name from ``nvidia-smi`` (no framework import), or ``cpu``."""
    if os.environ.get("CGGR_GPU_NAME"):
        return os.environ["CGGR_GPU_NAME"]
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
        if out:
            return out.splitlines()[0].strip()
    return "cpu"


def gpu_slug(name: Optional[str] = None) -> str:
    """``NVIDIA H200`` → ``h200``; ``NVIDIA GeForce RTX 4090`` → ``rtx-4090``; ``cpu`` → ``cpu``: the first level
    of ``benchmarks/results/<gpu>/``."""
    name = gpu_name() if name is None else name
    s = name.lower()
    for word in ("nvidia", "geforce", "tesla"):
        s = s.replace(word, " ")
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown-gpu"


def telemetry() -> Optional[dict[str, Any]]:
    """SM clock (MHz), power draw (W), temperature and utilisation of every GPU now, or None without
    ``nvidia-smi``. Sampled before and after each benchmark so throttling under sustained load is visible
    (run 17 could not tell: the clocks were not logged)."""
    if not shutil.which("nvidia-smi"):
        return None
    fields = "clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"
    out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if not out:
        return None
    gpus = []
    for line in out.splitlines():
        vals = [v.strip() for v in line.split(",")]
        rec: dict[str, Any] = {}
        for k, v in zip(fields.split(","), vals):
            try:
                rec[k] = float(v)
            except ValueError:
                rec[k] = v
        gpus.append(rec)
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpus": gpus}


def software(*names: str) -> dict[str, str]:
    """Versions of the named, already importable packages (``torch``, ``triton``, ``jax``, ...)."""
    out = {}
    for n in names:
        try:
            mod = __import__(n)
            out[n] = str(getattr(mod, "__version__", "?"))
        except Exception:  # not installed here: say so rather than fail a benchmark over a version string
            out[n] = "absent"
    return out


def today() -> str:
    """UTC date, the first part of ``<date>_<commit>``."""
    return time.strftime("%Y-%m-%d", time.gmtime())
