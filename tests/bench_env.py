"""The environment of a benchmark script run as a subprocess by the CPU tests: the repository on
``PYTHONPATH``, interpreted kernels, JAX on the CPU, and ``cpu`` as the results layout's ``<gpu>`` level."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """A copy of ``os.environ`` for a benchmark subprocess (see the module docstring)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e.setdefault("TRITON_INTERPRET", "1")
    e.setdefault("JAX_PLATFORMS", "cpu")
    e.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    e["CGGR_GPU_NAME"] = "cpu"  # the layout's <gpu> level, whatever this machine has
    return e
