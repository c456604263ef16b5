#!/usr/bin/env python
"""Benchmark the Triton scoring kernel (``cggr_torch.kernels.token_statistics_triton``) on a GPU.

For each vocabulary size (default N = 16384 tokens, V = 128256 and 131072, bfloat16 logits) it times

* ``copy``        - a device-to-device copy of the logits (``dst.copy_(src)``): reads and writes the logits
  once, so **half its time is the read-once floor** of any scoring pass (goal: kernel ≤ 1.15 × floor);
* ``triton``      - the kernel with its default launch shape (:func:`cggr_torch.kernels.scoring.scoring_config`),
  the fused loss's variant (difficulty + sort key + status), ``score_tokens_triton`` (kernel difficulty +
  eligibility) and the public dispatcher ``cggr_torch.scoring.token_statistics``;
* a short sweep of launch variants (``--no-sweep`` to skip; :data:`SWEEP`, 12 entries): rows/warps, the
  ``ex2.approx.ftz`` stream (``ftz``), the lazy top-2 (``lazy``), a persistent grid of ``p`` programs per SM
  (``p16``, ``p24``) and the eviction hint. The best is reported; to adopt it set ``_STREAM_ROWS``/
  ``_STREAM_WARPS``/``_STREAM_FTZ``/``_STREAM_LAZY_TOP2``/``_STREAM_PERSISTENT`` in
  ``cggr_torch/kernels/scoring.py`` (the only place launch shapes are chosen).
  ``benchmarks/gpu_check_torch.py`` checks every sweep variant against the oracle, so a winner can be
  adopted from one GPU session;
* ``--compile`` / ``--reference`` add ``torch.compile`` of the naive PyTorch code and the eager reference
  (29.7 ms and 60.3 ms on the H200 at V = 128256: slow, so off by default).

Timing: the harness (:func:`benchmarks.harness.measure`: CUDA events, warm-up, median and IQR) over
``--buffers`` independent random N(0, 3²) logit buffers used round-robin. Prints a markdown table and writes
JSON to ``--out``; ``benchmarks/scoring.py --framework torch`` runs this and turns the JSON into records.

Run on the H200 from the repository root::

    python benchmarks/scoring.py --framework torch

``--smoke`` (``--quick``) runs tiny shapes on CPU with the kernel interpreted (checks the script only).
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens (rows)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    ap.add_argument("--buffers", type=int, default=3, help="independent logit buffers used round-robin")
    ap.add_argument("--rep-ms", type=int, default=150, help="timed work per method (ms)")
    ap.add_argument("--sweep-rep-ms", type=int, default=100, help="timed work per sweep variant (ms)")
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch shape")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile naive baseline")
    ap.add_argument("--reference", action="store_true", help="add the eager PyTorch reference")
    ap.add_argument("--out", default="bench_scoring_torch.json", help="JSON output path")
    ap.add_argument("--smoke", "--quick", action="store_true",
                    help="tiny shapes on CPU, kernel interpreted (script check)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # must precede the first import of triton
        args.n, args.vocab, args.buffers = 24, [300], 2
        args.compile = args.reference = False
    return args


#: The sweep: (rows, warps, ftz, lazy top-2, persistent programs per SM, eviction hint); GROUP is one 16-byte
#: vector. Entry 0 is the shipped default. ``ftz`` entries need CUDA (inline PTX) and are skipped by ``--smoke``.
SWEEP: tuple[tuple[int, int, bool, bool, int, str], ...] = (
    (128, 1, False, False, 0, "evict_first"),
    (64, 1, False, False, 0, "evict_first"),
    (128, 1, True, False, 0, "evict_first"),
    (128, 1, False, True, 0, "evict_first"),
    (128, 1, True, True, 0, "evict_first"),
    (64, 1, True, True, 0, "evict_first"),
    (256, 1, True, True, 0, "evict_first"),
    (256, 2, True, True, 0, "evict_first"),
    (128, 1, True, True, 16, "evict_first"),
    (128, 1, True, True, 24, "evict_first"),
    (128, 1, True, True, 0, ""),
    (512, 4, True, True, 0, "evict_first"),
)


def sweep_configs(vocab: int, elsize: int, cuda: bool) -> list[Any]:
    """The :data:`SWEEP` entries as ``LaunchConfig`` (rows clipped to the vocabulary; ftz only on CUDA)."""
    from benchmarks.harness import compat

    LaunchConfig = compat.torch_launch().LaunchConfig
    group = max(1, 16 // elsize)
    out = []
    for rows, warps, ftz, lazy, persistent, evict in SWEEP:
        if ftz and not cuda:
            continue
        rows = max(1, min(rows, compat.torch_next_pow2(vocab) // group))
        c = LaunchConfig(rows=rows, group=group, num_warps=warps, ftz=ftz, lazy_top2=lazy, persistent=persistent,
                         evict=evict)
        if c not in out:
            out.append(c)
    return out


def environment(torch: Any, triton: Any) -> dict[str, Any]:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "triton": triton.__version__, "device": dev,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import triton

    from benchmarks.harness import compat, measure
    from cggr_torch import score_tokens, token_statistics
    from cggr_torch.kernels import score_tokens_triton, token_statistics_triton

    ks = compat.torch_scoring_kernels()
    launch = compat.torch_launch()
    LaunchConfig, scoring_config = launch.LaunchConfig, launch.scoring_config
    flat_targets, launch_scoring, row_geometry = ks.flat_targets, ks.launch_scoring, ks.row_geometry

    if not args.smoke:
        if not torch.cuda.is_available():
            sys.exit("error: this benchmark needs a CUDA GPU; use --smoke to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elsize = torch.finfo(dtype).bits // 8

    def timed(fn: Callable[[], Any], rep_ms: Optional[int] = None) -> dict[str, float]:
        if args.smoke:  # interpreted kernels on CPU: one host-clock call, no warm-up (numbers mean nothing)
            return measure(fn, framework="torch", device=device, warmup=0, reps=1).as_dict()
        return measure(fn, framework="torch", device=device, warmup=10, budget_ms=rep_ms or args.rep_ms).as_dict()

    def naive_statistics(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = x.float()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        entropy = lse - (p * z).sum(-1)
        top2 = torch.topk(z, 2, dim=-1).values
        nll = lse - torch.gather(z, 1, t[:, None])[:, 0]
        return lse, entropy, torch.exp(top2[:, 0] - lse), torch.exp(top2[:, 1] - lse), nll

    compiled = torch.compile(naive_statistics) if args.compile else None
    env = environment(torch, triton)
    print(f"# Scoring benchmark (PyTorch/Triton) - {env['device']}, torch {env['torch']}, triton "
          f"{env['triton']}, N={args.n}, {args.dtype}")
    results: list[dict[str, Any]] = []
    summary: list[str] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for v in args.vocab:
        bufs = []
        for _ in range(args.buffers):
            x = torch.empty((args.n, v), dtype=dtype, device=device)
            for s in range(0, args.n, 2048):  # chunks keep each random call well below 2^31 elements
                x[s:s + 2048] = (3.0 * torch.randn((min(2048, args.n - s), v), generator=gen, device=device)).to(dtype)
            bufs.append(x)
        tgts = [torch.randint(0, v, (args.n,), generator=gen, device=device) for _ in bufs]
        tflat = [flat_targets(t) for t in tgts]
        geoms = [row_geometry(x) for x in bufs]
        dst = torch.empty_like(bufs[0])
        nbytes = args.n * v * elsize
        cyc = itertools.cycle(range(args.buffers))
        rows: list[dict[str, Any]] = []
        out = torch.empty((6, args.n), dtype=torch.float32, device=device)
        fin = torch.empty((args.n,), dtype=torch.int8, device=device)
        key = torch.empty((args.n,), dtype=torch.int32, device=device)
        status = torch.empty((args.n,), dtype=torch.int8, device=device)
        mode = compat.torch_mode_code("combined")

        def record(name: str, fn: Callable[[int], Any], **extra: Any) -> dict[str, Any]:
            r = timed(lambda: fn(next(cyc)))
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype, bytes=nbytes, **extra)
            r["read_GBps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
            rows.append(r)
            return r

        def kernel(i: int, c: Optional[LaunchConfig], fused: bool = False) -> None:
            launch_scoring(geoms[i], tflat[i], -100, mode, out, fin, c,
                           key=key if fused else None, status=status if fused else None)

        copy = record("copy (d2d, read+write)", lambda i: dst.copy_(bufs[i]))
        floor_ms = copy["median_ms"] / 2.0
        if compiled is not None:
            record("torch.compile naive", lambda i: compiled(bufs[i], tgts[i]))
        if args.reference:
            def reference(i: int) -> Any:
                with compat.force("torch", "reference"):
                    return token_statistics(bufs[i], tgts[i])
            record("reference (eager)", reference)
        cfg = scoring_config(v, dtype)
        default = record(f"triton kernel, default ({cfg.describe()})", lambda i: kernel(i, None), kind="default")
        record("triton kernel + key/status (CGGRLoss's pass)", lambda i: kernel(i, None, True), kind="fused")
        record("token_statistics_triton (checks + kernel)", lambda i: token_statistics_triton(bufs[i], tgts[i]))
        record("score_tokens_triton (combined, + eligibility)", lambda i: score_tokens_triton(bufs[i], tgts[i]))
        if not args.smoke:
            record("cggr_torch.scoring.token_statistics (dispatch)", lambda i: token_statistics(bufs[i], tgts[i]))
        # Excess scoring (SPEC §3.1; issue 14's goal: <= 1.05x the same call with a logits-only scoring).
        refs = [torch.rand((args.n,), generator=gen, device=device) * 8 for _ in bufs]
        comb = record("score_tokens (dispatch, combined)", lambda i: score_tokens(bufs[i], tgts[i]), kind="comb")
        exc = record("score_tokens (dispatch, excess + reference_nll)",
                     lambda i: score_tokens(bufs[i], tgts[i], scoring="excess", reference_nll=refs[i]), kind="excess")
        exc["x_combined"] = exc["median_ms"] / comb["median_ms"]
        sweep = []
        if not args.no_sweep:
            for c in sweep_configs(v, elsize, device == "cuda"):
                try:
                    t_ = timed(lambda c=c: kernel(next(cyc), c), rep_ms=args.sweep_rep_ms)
                except Exception as err:  # a variant the compiler rejects: report it, go on
                    print(f"  variant {c.describe()} failed: {type(err).__name__}: {err}"[:300])
                    sweep.append({"config": c.describe(), "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                sweep.append({"config": c.describe(), "rows": c.rows, "group": c.group, "num_warps": c.num_warps,
                              "ftz": c.ftz, "lazy_top2": c.lazy_top2, "persistent": c.persistent,
                              "evict": c.evict, **t_,
                              "x_read_once_floor": t_["median_ms"] / floor_ms})
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
        ok = sorted((c for c in sweep if "median_ms" in c), key=lambda c: c["median_ms"])
        if ok:
            print("\n| sweep variant (kernel only) | median ms | × floor |")
            print("|---|---:|---:|")
            for c in ok:
                print(f"| {c['config']} | {c['median_ms']:.3f} | {c['x_read_once_floor']:.3f} |")
        fused = next(r for r in rows if r.get("kind") == "fused")
        line = (f"V={v}: floor {floor_ms:.3f} ms | default {default['median_ms']:.3f} "
                f"({default['x_read_once_floor']:.3f}x) | +key/status {fused['median_ms']:.3f} "
                f"({fused['x_read_once_floor']:.3f}x)")
        line += f" | excess/combined {exc['x_combined']:.3f}x"
        if ok:
            line += " | sweep: " + ", ".join(f"{c['config']} {c['x_read_once_floor']:.3f}x" for c in ok[:4])
        bad = [c["config"] for c in sweep if "error" in c]
        if bad:
            line += f" | FAILED variants: {bad}"
        summary.append(line)
        del bufs, tgts, dst
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"benchmark": "scoring_torch", "env": env, "args": vars(args), "results": results,
                   "summary": summary}, f, indent=2)
    print(f"\nwrote {args.out}")
    print("\nSUMMARY (× read-once floor = copy/2; goal <= 1.15; best 4 sweep variants)")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
