"""Tests of ``cggr_torch`` against the float64 oracle ``tests/oracle.py``; shared helpers below."""
from __future__ import annotations

import numpy as np
import torch

from tests import oracle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_logits(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  scale: float = 2.0) -> torch.Tensor:
    """Logits with per-row temperatures (a spread of difficulties), exactly representable in ``dtype``."""
    temps = rng.uniform(0.3, 3.0, size=shape[:-1] + (1,))
    x = rng.standard_normal(shape) * scale / temps
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def random_targets(rng: np.random.Generator, shape: tuple[int, ...], V: int, p_ignore: float = 0.15,
                   ignore_index: int = -100) -> torch.Tensor:
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < p_ignore] = ignore_index
    return torch.from_numpy(t)


def as_f64(x: torch.Tensor) -> np.ndarray:
    """The exact values of a (possibly half-precision) tensor, on any device, as a float64 NumPy array."""
    return x.detach().cpu().to(torch.float32).double().numpy()


def assert_within(actual: torch.Tensor, expected: np.ndarray, quantity: str, where: np.ndarray | None = None,
                  scale: float = 1.0) -> None:
    """``|a − e| ≤ atol + rtol·|e|`` with SPEC §11's bounds for ``quantity`` (times ``scale``); ``actual`` may
    live on any device (the kernel tests' tensors are CUDA tensors on a GPU)."""
    atol, rtol = oracle.SCORE_TOL[quantity]
    a = actual.detach().cpu().double().numpy()
    e = np.asarray(expected, dtype=np.float64)
    if where is not None:
        a, e = a[where], e[where]
    np.testing.assert_allclose(a, e, atol=scale * atol, rtol=scale * rtol, err_msg=quantity)


def kernel_test_device() -> str:
    """Where the Triton kernel tests run: ``"cpu"`` under the interpreter (``TRITON_INTERPRET=1``, set by
    tests/conftest.py on machines without an NVIDIA GPU), ``"cuda"`` on a GPU; skips the calling module
    otherwise."""
    import pytest

    from cggr_torch.kernels import scoring as ks

    if ks.interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
    raise AssertionError("unreachable")  # pragma: no cover



def assert_fails_in_a_child(source: str, match: str) -> None:
    """Runs ``source`` in a child Python and checks that it fails with ``match`` (a regex) on its stderr.

    On a GPU a failed ``torch._assert_async`` is a device-side assertion: it is reported asynchronously and
    leaves the process's CUDA context unusable, so every later test in the same worker would fail too. Such a
    call can only be tested in a process of its own."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode != 0, f"the child should have failed; stdout: {proc.stdout[-2000:]}"
    assert re.search(match, proc.stderr), proc.stderr[-4000:]


def assert_range_check_fails(snippet: str, match: str) -> None:
    """Runs ``snippet`` (Python source whose tensors live on the device named ``dev``; ``torch`` is imported) and
    checks that a range check (SPEC §1, §11: ``cggr_torch.utils.check_target_range``, the kernels' ``ok`` slot)
    rejects it with a message matching ``match``, wherever the kernel tests run.

    Under the interpreter (``dev = "cpu"``) the check raises ``ValueError`` at once: the snippet runs here, inside
    any ``dispatch.force`` block of the caller. On a GPU (``dev = "cuda"``) it is a device-side assertion, which
    leaves the CUDA context unusable: the snippet runs in a child process (:func:`assert_fails_in_a_child`, default
    dispatch) followed by a synchronisation that reports the assertion. The same source runs in both places, so
    the CPU run checks the text of the GPU one."""
    import pytest

    dev = kernel_test_device()
    source = f"import torch\ndev = {dev!r}\n{snippet}"
    if dev == "cuda":
        assert_fails_in_a_child(source + "\ntorch.cuda.synchronize()\n", match)
        return
    with pytest.raises(ValueError, match=match):
        exec(compile(source, "<range-check snippet>", "exec"), {})


def head_inputs(seed: int, dtype: torch.dtype, device: str, N: int = 37, d: int = 23, V: int = 301,
                p_ignore: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, weight, bias, targets)`` of an LM head at odd sizes: hidden rows of varied scale, a weight of
    unit-order logits, a bias, ``p_ignore`` of the targets ``-100`` (the token-stats kernel tests)."""
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((N, d)) * rng.uniform(0.3, 3.0, size=(N, 1))).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=N)
    t[rng.random(N) < p_ignore] = -100
    return (torch.from_numpy(h).to(dtype).to(device), torch.from_numpy(w).to(dtype).to(device),
            torch.from_numpy(b).to(dtype).to(device), torch.from_numpy(t).to(device))

