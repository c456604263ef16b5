"""The ONE timing method of the benchmarks.

Every op benchmark times its calls through :func:`measure`, whatever the framework:

* PyTorch on a GPU: CUDA events around each call (``start.record(); fn(); end.record()``), all calls enqueued
  back to back and one synchronisation at the end, so the host's own time does not count unless it makes the
  GPU wait (the same as ``triton.testing.do_bench`` without its L2 flush: the benchmarks stream buffers of
  gigabytes, far beyond the 60 MB L2, and rotate several input buffers themselves);
* JAX (any backend) and PyTorch on the CPU: the host clock around ``fn()`` followed by
  ``jax.block_until_ready`` / ``torch.cuda.synchronize`` (JAX has no event API; dispatch is asynchronous, so the
  wait is what makes the interval the device time plus a few microseconds of dispatch).

Both warm up first (``warmup`` calls: compilation, autotuning, allocator), then estimate one call's time and
run as many calls as fit ``budget_ms`` (clamped to ``[min_reps, max_reps]``). The result is the median with the
inter-quartile range (p25, p75) and p10/p90; the benchmarks report the median and keep the rest in the record.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

__all__ = ["Timing", "measure", "summarize", "ratio", "ratios", "throughput"]


@dataclass(frozen=True)
class Timing:
    """Summary of one measurement, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    reps: int
    warmup: int
    method: str  # "cuda-events" | "cuda-graph+cuda-events" | "host-clock+block_until_ready" | "host-clock"

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iqr_ms"] = self.iqr_ms
        return d


def _quantile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if len(sorted_ms) == 1:
        return float(sorted_ms[0])
    pos = q * (len(sorted_ms) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo))


def summarize(times_ms: Sequence[float], *, warmup: int = 0, method: str = "given") -> Timing:
    """:class:`Timing` of a list of per-call times (ms). Also used for timings measured elsewhere (a training
    step timed by the model benchmarks) so that every record has the same fields."""
    if not times_ms:
        raise ValueError("times_ms: expected at least one time")
    ts = sorted(float(t) for t in times_ms)
    return Timing(median_ms=float(statistics.median(ts)), p25_ms=_quantile(ts, 0.25), p75_ms=_quantile(ts, 0.75),
                  p10_ms=_quantile(ts, 0.10), p90_ms=_quantile(ts, 0.90), min_ms=ts[0], reps=len(ts),
                  warmup=warmup, method=method)


def _framework_of(framework: str) -> str:
    if framework not in ("torch", "jax", "host"):
        raise ValueError(f"framework: expected 'torch', 'jax' or 'host', got {framework!r}")
    return framework


def _torch_cuda() -> Optional[Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover - the harness itself needs no framework
        return None
    return torch if torch.cuda.is_available() else None


def measure(fn: Callable[[], Any], *, framework: str, warmup: int = 3, budget_ms: float = 100.0,
            min_reps: int = 5, max_reps: int = 200, reps: Optional[int] = None,
            device: Optional[str] = None, before_each: Optional[Callable[[], Any]] = None,
            cuda_graph: bool = False) -> Timing:
    """Time ``fn()`` (no arguments: close over the inputs, rotate buffers inside ``fn`` if needed).

    ``framework``: ``"torch"`` (CUDA events when ``device`` is a CUDA device, or ``device`` is None and CUDA is
    available), ``"jax"`` (``jax.block_until_ready`` on the result), ``"host"`` (the host clock alone: the
    host's enqueue cost of an asynchronous call, pure-Python helpers, the tests). ``reps`` fixes the number of
    timed calls instead of ``budget_ms``. ``before_each`` runs before every call, outside the timed interval
    (e.g. ``x.grad = None`` so that a backward does not accumulate). ``cuda_graph=True`` (PyTorch on CUDA)
    captures ``fn`` once in a CUDA graph and times its replays: the device time alone, without the host's
    launch cost (the selection and CE parts are host-bound when called eagerly); raises if capture fails.
    """
    framework = _framework_of(framework)
    torch = _torch_cuda() if framework == "torch" else None
    use_events = torch is not None and (device is None or str(device).startswith("cuda"))
    if cuda_graph:
        if not use_events:
            raise ValueError("cuda_graph: needs framework='torch' on a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, autotuning), as CUDA graphs require
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        fn, warmup = graph.replay, 1
    if framework == "jax":
        import jax

        def call() -> None:
            jax.block_until_ready(fn())
        method = "host-clock+block_until_ready"
    elif framework == "torch" and not use_events:
        def call() -> None:
            fn()
        method = "host-clock"
    else:
        call = fn  # type: ignore[assignment]
        method = "cuda-events" if use_events else "host-clock"

    prep = before_each if before_each is not None else (lambda: None)
    for _ in range(max(0, warmup)):
        prep()
        call()
    if use_events:
        torch.cuda.synchronize()
    # one call's estimate decides the count
    if reps is None:
        prep()
        t0 = time.perf_counter()
        call()
        if use_events:
            torch.cuda.synchronize()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        reps = int(min(max_reps, max(min_reps, budget_ms // est_ms)))
    if use_events:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            prep()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            prep()
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, warmup=warmup, method=("cuda-graph+" + method) if cuda_graph else method)


def ratio(value_ms: Optional[float], baseline_ms: Optional[float]) -> Optional[float]:
    """``value / baseline`` (lower is faster), None when either is missing or the baseline is 0."""
    if value_ms is None or baseline_ms is None or not baseline_ms:
        return None
    return float(value_ms) / float(baseline_ms)


def ratios(value_ms: Optional[float], baselines_ms: dict[str, Optional[float]]) -> dict[str, float]:
    """``{baseline name: value / baseline}`` for every baseline measured in the same run."""
    out = {}
    for name, b in baselines_ms.items():
        r = ratio(value_ms, b)
        if r is not None:
            out[name] = r
    return out


def throughput(median_ms: float, *, input_tokens: Optional[float] = None,
               trained_tokens: Optional[float] = None) -> dict[str, float]:
    """Tokens per second: ``input_tokens_per_s`` (what the call consumes) and, where the benchmark selects
    tokens, ``trained_tokens_per_s`` (what the loss/gradient is computed on). Both, never one for the other."""
    out: dict[str, float] = {}
    if median_ms and median_ms > 0:
        if input_tokens is not None:
            out["input_tokens_per_s"] = float(input_tokens) / (median_ms * 1e-3)
        if trained_tokens is not None:
            out["trained_tokens_per_s"] = float(trained_tokens) / (median_ms * 1e-3)
    return out
