"""Test-session set-up shared by every test module.

The interpreters must be chosen before triton or jax is first imported, so they are set here, at collection
time, unless the caller already chose; on a machine with an NVIDIA GPU neither is forced.
"""
from __future__ import annotations

import os
import shutil
import sys

if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia"):  # no GPU: interpreters
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA:CPU compiles the test programs with LLVM at optimisation level 0: compiling dominates the JAX tests'
    # time on CPU (a ~1.7x faster run); the HLO passes, and so the computed values, are those of any level.
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX: a persistent compilation cache shared by the run's workers (and the next run), so that a computation
# compiled by one test or worker is loaded, not recompiled, by the others; every entry is kept (CPU compiles
# are mostly under jax's default 1 s threshold). Set through the environment: no jax import here.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# PyTorch's OpenMP threads spin-wait by default; on a loaded 2-core machine that costs >10x per step.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    # Read from the test reports (user_properties), which also reach the controller under pytest-xdist.
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "cggr_parity":
                rows.append(tuple(value))
    if not rows:
        return
    terminalreporter.section("CGGR parity (SPEC §11 level 3)")
    for strategy, identical, total in sorted(rows):
        terminalreporter.write_line(
            f"{strategy:>15}: {identical}/{total} generated batches selected identical tokens in torch and jax")


def cuda_context_poisoned(torch=None) -> bool:
    """Whether this process's CUDA context has a sticky error (a device-side assertion, i.e. a failed
    ``torch._assert_async`` on CUDA tensors, or an illegal address). False without torch, CUDA or an initialised
    context: the check never imports torch or initialises CUDA itself. ``torch``: the module (tests pass a fake)."""
    torch = sys.modules.get("torch") if torch is None else torch
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
    except Exception as exc:   # torch.AcceleratorError (torch >= 2.8) or RuntimeError: both say "CUDA error"
        return "CUDA error" in str(exc)
    return False


def pytest_runtest_teardown(item, nextitem):  # noqa: ARG001
    # A sticky CUDA error makes every later test of the process fail with it (one GPU run lost 143 tests to one
    # device-side assertion). Under pytest-xdist, end the worker instead: xdist reports the test as crashed and
    # runs the rest of the worker's tests in a fresh process. Without xdist, the session goes on (and shows it).
    if os.environ.get("PYTEST_XDIST_WORKER") and cuda_context_poisoned():
        sys.stderr.write(f"\n{item.nodeid} left the CUDA context with a sticky error: ending this worker so that "
                         "pytest-xdist replaces it\n")
        sys.stderr.flush()
        os._exit(3)
