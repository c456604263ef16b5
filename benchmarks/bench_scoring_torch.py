#!/usr/bin/env python
"""Benchmark the Triton scoring kernel (``cggr_torch.kernels.token_statistics_triton``) on a GPU.

For each vocabulary size (default N = 16384 tokens, V = 128256 and 131072, bfloat16 logits) it times

* ``copy``        - a device-to-device copy of the logits (``dst.copy_(src)``): reads and writes the logits
  once, so **half its time is the read-once floor** of any scoring pass (goal: kernel ≤ 1.15 × floor);
* ``compile_naive`` - ``torch.compile`` of the straightforward PyTorch code (logsumexp, softmax, topk, gather);
* ``reference``   - the package's eager reference ``cggr_torch.scoring.token_statistics_reference``;
* ``triton``      - the kernel with its default launch shape (:func:`cggr_torch.kernels.scoring.scoring_config`),
  ``score_tokens_triton`` (kernel difficulty + eligibility) and the public dispatcher
  ``cggr_torch.scoring.token_statistics``;
* a sweep of ``ROWS × GROUP × num_warps`` (``--no-sweep`` to skip); the best is reported - use it to update
  the heuristic in ``cggr_torch/kernels/scoring.py`` (the only place launch shapes are chosen).

Timing: ``triton.testing.do_bench`` (median, p10, p90 in ms; it flushes L2 between calls) over ``--buffers``
independent random N(0, 3²) logit buffers used round-robin. Prints a markdown table and writes JSON to
``--out``.

Run on the H200 from the repository root::

    python benchmarks/bench_scoring_torch.py --out bench_scoring_torch.json

``--smoke`` runs tiny shapes on CPU with the kernel interpreted (checks the script only; numbers mean nothing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens (rows)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    ap.add_argument("--buffers", type=int, default=3, help="independent logit buffers used round-robin")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measurement time per method (ms)")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--groups", type=int, nargs="+", default=None,
                    help="GROUP values to sweep (default: 1 and one 16-byte vector)")
    ap.add_argument("--num-warps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch shape")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default="bench_scoring_torch.json", help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernel interpreted (script check)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # must precede the first import of triton
        args.n, args.vocab, args.buffers, args.rows, args.num_warps = 24, [300], 2, [16, 32], [1]
        args.no_compile = True
    return args


def environment(torch: Any, triton: Any) -> dict[str, Any]:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "triton": triton.__version__, "device": dev,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import triton
    from triton.testing import do_bench

    from cggr_torch.kernels.scoring import LaunchConfig, score_tokens_triton, scoring_config, token_statistics_triton
    from cggr_torch.scoring import token_statistics, token_statistics_reference

    if not args.smoke:
        if not torch.cuda.is_available():
            sys.exit("error: this benchmark needs a CUDA GPU; use --smoke to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elsize = torch.finfo(dtype).bits // 8

    def timed(fn: Callable[[], Any]) -> dict[str, float]:
        if args.smoke:  # no CUDA events on CPU: a plain wall-clock median of a few calls
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            return {"median_ms": ts[1], "p10_ms": ts[0], "p90_ms": ts[2]}
        med, p10, p90 = do_bench(fn, warmup=25, rep=args.rep_ms, quantiles=[0.5, 0.1, 0.9])
        return {"median_ms": med, "p10_ms": p10, "p90_ms": p90}

    def naive_statistics(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = x.float()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        entropy = lse - (p * z).sum(-1)
        top2 = torch.topk(z, 2, dim=-1).values
        nll = lse - torch.gather(z, 1, t[:, None])[:, 0]
        return lse, entropy, torch.exp(top2[:, 0] - lse), torch.exp(top2[:, 1] - lse), nll

    compiled = None if args.no_compile else torch.compile(naive_statistics)
    env = environment(torch, triton)
    print(f"# Scoring benchmark (PyTorch/Triton) - {env['device']}, torch {env['torch']}, triton "
          f"{env['triton']}, N={args.n}, {args.dtype}")
    results: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for v in args.vocab:
        bufs = []
        for _ in range(args.buffers):
            x = torch.empty((args.n, v), dtype=dtype, device=device)
            for s in range(0, args.n, 2048):  # chunks keep each random call well below 2^31 elements
                x[s:s + 2048] = (3.0 * torch.randn((min(2048, args.n - s), v), generator=gen, device=device)).to(dtype)
            bufs.append(x)
        tgts = [torch.randint(0, v, (args.n,), generator=gen, device=device) for _ in bufs]
        dst = torch.empty_like(bufs[0])
        nbytes = args.n * v * elsize
        cyc = itertools.cycle(range(args.buffers))
        rows: list[dict[str, Any]] = []

        def record(name: str, fn: Callable[[torch.Tensor, torch.Tensor], Any], **extra: Any) -> dict[str, Any]:
            def call() -> Any:
                i = next(cyc)
                return fn(bufs[i], tgts[i])
            r = timed(call)
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype, bytes=nbytes, **extra)
            r["read_GBps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
            rows.append(r)
            return r

        copy = record("copy (d2d, read+write)", lambda x, t: dst.copy_(x))
        floor_ms = copy["median_ms"] / 2.0
        if compiled is not None:
            record("torch.compile naive", compiled)
        record("reference (eager)", lambda x, t: token_statistics_reference(x, t))
        cfg = scoring_config(v, dtype)
        record(f"triton token_statistics (default {cfg.rows}x{cfg.group}, {cfg.num_warps}w)",
               lambda x, t: token_statistics_triton(x, t), rows=cfg.rows, group=cfg.group, num_warps=cfg.num_warps)
        record("triton score_tokens (combined, + eligibility)", lambda x, t: score_tokens_triton(x, t))
        if not args.smoke:
            record("cggr_torch.scoring.token_statistics (dispatch)", lambda x, t: token_statistics(x, t))
        if not args.no_sweep:
            groups = args.groups or sorted({1, max(1, 16 // elsize)})
            best: Optional[tuple[float, LaunchConfig]] = None
            sweep = []
            for r_, g_, w_ in itertools.product(args.rows, groups, args.num_warps):
                if r_ < 32 * w_ and not args.smoke:
                    continue  # fewer lanes than threads
                c = LaunchConfig(rows=r_, group=g_, num_warps=w_)
                try:
                    t_ = timed(lambda c=c: token_statistics_triton(bufs[next(cyc)], tgts[0], config=c))
                except Exception as err:  # a shape the compiler rejects: report it, go on
                    print(f"  config {r_}x{g_} {w_}w failed: {type(err).__name__}: {err}"[:300])
                    continue
                sweep.append({"rows": r_, "group": g_, "num_warps": w_, **t_})
                if best is None or t_["median_ms"] < best[0]:
                    best = (t_["median_ms"], c)
            if best is not None:
                c = best[1]
                record(f"triton best ({c.rows}x{c.group}, {c.num_warps}w)",
                       lambda x, t: token_statistics_triton(x, t, config=c),
                       rows=c.rows, group=c.group, num_warps=c.num_warps)
            results.append({"name": "sweep", "vocab": v, "configs": sweep})
        for r in rows:
            r["x_read_once_floor"] = r["median_ms"] / floor_ms
        results += rows
        print(f"\n## V = {v}  (logits {nbytes / 1e9:.2f} GB; read-once floor = copy/2 = {floor_ms:.3f} ms; "
              f"goal: triton ≤ 1.15 × floor)\n")
        print("| method | median ms | p10 | p90 | read GB/s | × floor |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{r['read_GBps']:.0f} | {r['x_read_once_floor']:.2f} |")
        del bufs, tgts, dst
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"benchmark": "scoring_torch", "env": env, "args": vars(args), "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
