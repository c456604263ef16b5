#!/usr/bin/env python
"""Benchmark CGGR's selective cross-entropy (fwd + bwd, Triton) against full cross-entropy kernels on a GPU.

Default: N = 16384 tokens, V = 128256 and 131072, bfloat16 logits (a leaf tensor that requires grad, as a
model's output would), selection ratio 0.25. Every row is one forward + backward producing ``logits.grad``:

* ``cggr triton``            - the whole CGGR path on the device, no host sync: one-pass scoring
  (:func:`score_tokens_triton`: statistics, combined difficulty, eligibility) → :func:`select_tokens`
  (``topk``, ratio 0.25) → :func:`selective_cross_entropy_triton` (``lse`` from the scoring pass) → backward
  (selected rows read once, every row of the gradient written once);
* ``cggr triton inplace``    - the same with ``inplace_backward=True`` (gradient written into the logits);
* ``CGGRLoss``               - the package module (``selection='fixed_quota'``, ratio 0.25) as wired now;
* ``liger CE``               - Liger-Kernel's fused cross-entropy (skipped when ``liger_kernel`` is absent);
* ``torch.compile CE``       - ``torch.compile`` of ``F.cross_entropy(logits.float(), targets)``;
* ``eager CE``               - ``F.cross_entropy(logits, targets)``;
* a breakdown of the CGGR path: scoring, selection, backward kernel alone.

Columns: median/p10/p90 ms (``triton.testing.do_bench``, L2 flushed, ``--buffers`` logit buffers used
round-robin), ``× liger`` (goal for ``cggr triton``: ≤ 0.65), ``floor ms`` (bytes the method must move at
the copy bandwidth: CGGR reads N·V once for scoring, re-reads the selected rows and writes N·V of gradient;
a full CE reads N·V and writes N·V), and the peak extra memory of one call above what was allocated before
it (the gradient included). Writes JSON to ``--out``.

Run on the H200 from the repository root::

    python benchmarks/bench_selective_ce_torch.py --out bench_selective_ce_torch.json

``--smoke`` runs tiny shapes on CPU with the kernels interpreted (checks the script only).
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


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--buffers", type=int, default=2, help="independent logit buffers used round-robin")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench_selective_ce_torch.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernels interpreted")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.n, args.vocab, args.buffers, args.no_compile = 24, [300], 2, True
    return args


def load_liger() -> tuple[Optional[Callable[..., Any]], str]:
    """Liger's cross-entropy as ``loss_fn(logits2d, targets) -> loss``, or None and the reason."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        mod = LigerCrossEntropyLoss()
        return (lambda x, t: mod(x, t)), "liger_kernel.transformers.cross_entropy.LigerCrossEntropyLoss"
    except Exception as err_t:  # noqa: BLE001 - any import problem means "not available here"
        try:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
            return (lambda x, t: LigerCrossEntropyFunction.apply(x, t)[0]), \
                "liger_kernel.ops.cross_entropy.LigerCrossEntropyFunction"
        except Exception as err_o:  # noqa: BLE001
            return None, f"liger_kernel not importable ({type(err_t).__name__}: {err_t}; {type(err_o).__name__})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from cggr_torch import CGGRLoss
    from cggr_torch.kernels.cross_entropy import launch_selective_backward, selective_cross_entropy_triton
    from cggr_torch.kernels.scoring import flat_targets, row_geometry, score_tokens_triton
    from cggr_torch.selection import select_tokens

    if not args.smoke:
        if not torch.cuda.is_available():
            sys.exit("error: this benchmark needs a CUDA GPU; use --smoke to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elsize = torch.finfo(dtype).bits // 8
    liger, liger_note = load_liger()
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "python": platform.python_version(), "liger": liger_note, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# Selective CE benchmark (fwd+bwd) - {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"N={args.n}, {args.dtype}, ratio {args.ratio}")
    print(f"_liger: {liger_note}_")

    def timed(fn: Callable[[], Any], grad_to_none: Optional[list] = None) -> dict[str, float]:
        if args.smoke:
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            return {"median_ms": ts[1], "p10_ms": ts[0], "p90_ms": ts[2]}
        med, p10, p90 = do_bench(fn, warmup=10, rep=args.rep_ms, grad_to_none=grad_to_none,
                                 quantiles=[0.5, 0.1, 0.9])
        return {"median_ms": med, "p10_ms": p10, "p90_ms": p90}

    def peak_extra_bytes(fn: Callable[[], Any]) -> Optional[int]:
        if device != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ratio_t = torch.tensor(args.ratio, dtype=torch.float32, device=device)

    def cggr_fwd_bwd(x: torch.Tensor, t: torch.Tensor, inplace: bool) -> None:
        with torch.no_grad():
            sc = score_tokens_triton(x.detach(), t)
            mask, _k = select_tokens(sc.difficulty, sc.eligible, ratio_t)
        loss = selective_cross_entropy_triton(x, t, mask, lse=sc.stats.lse, inplace_backward=inplace)
        loss.backward()

    ce_compiled = None if args.no_compile else torch.compile(lambda x, t: F.cross_entropy(x.float(), t))
    results: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for v in args.vocab:
        bufs = []
        for _ in range(args.buffers):
            x = torch.empty((args.n, v), dtype=dtype, device=device)
            for s in range(0, args.n, 2048):
                x[s:s + 2048] = (3.0 * torch.randn((min(2048, args.n - s), v), generator=gen, device=device)).to(dtype)
            bufs.append(x.requires_grad_(True))
        tgts = [torch.randint(0, v, (args.n,), generator=gen, device=device) for _ in bufs]
        nbytes = args.n * v * elsize
        cyc = itertools.cycle(range(args.buffers))
        rows: list[dict[str, Any]] = []

        dst = torch.empty((args.n, v), dtype=dtype, device=device)
        copy = timed(lambda: dst.copy_(bufs[next(cyc)].detach()))
        del dst
        copy_bw = 2 * nbytes / (copy["median_ms"] * 1e-3)  # bytes/s moved by a d2d copy (read + write)

        def record(name: str, fn: Callable[[torch.Tensor, torch.Tensor], Any], floor_bytes: Optional[float],
                   grads: bool = True, **extra: Any) -> None:
            def call() -> Any:
                i = next(cyc)
                return fn(bufs[i], tgts[i])
            r = timed(call, grad_to_none=bufs if grads else None)
            for b in bufs:
                b.grad = None
            r["peak_extra_GB"] = (lambda p: None if p is None else p / 1e9)(peak_extra_bytes(call))
            for b in bufs:
                b.grad = None
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype,
                     floor_ms=None if floor_bytes is None else floor_bytes / copy_bw * 1e3, **extra)
            rows.append(r)

        full_floor = 2 * nbytes                                   # read N·V, write N·V
        cggr_floor = nbytes * (2 + args.ratio)                    # scoring read, selected re-read, gradient write
        record("cggr triton (score+select+CE, fwd+bwd)", lambda x, t: cggr_fwd_bwd(x, t, False), cggr_floor)
        record("cggr triton inplace_backward", lambda x, t: cggr_fwd_bwd(x, t, True), cggr_floor)
        crit = CGGRLoss(selection="fixed_quota", min_tokens_ratio=args.ratio, warmup_steps=0)
        try:
            record("CGGRLoss module (fixed_quota)", lambda x, t: crit(x, t).backward(), cggr_floor)
        except Exception as err:  # noqa: BLE001 - report and continue: the module is wired elsewhere
            print(f"  CGGRLoss failed: {type(err).__name__}: {err}"[:300])
        if liger is not None:
            record("liger CE (full)", lambda x, t: liger(x, t).backward(), full_floor)
        if ce_compiled is not None:
            record("torch.compile CE (full, fp32 upcast)", lambda x, t: ce_compiled(x, t).backward(), full_floor)
        record("eager CE (full)", lambda x, t: F.cross_entropy(x, t).backward(), full_floor)

        # breakdown of the CGGR path (no autograd)
        xs = [b.detach() for b in bufs]
        with torch.no_grad():
            scs = [score_tokens_triton(x, t) for x, t in zip(xs, tgts)]
            masks = [select_tokens(s.difficulty, s.eligible, ratio_t)[0] for s in scs]
        record("  part: scoring (score_tokens_triton)", lambda x, t: score_tokens_triton(x.detach(), t), nbytes,
               grads=False)
        record("  part: selection (select_tokens)",
               lambda x, t: select_tokens(scs[0].difficulty, scs[0].eligible, ratio_t), None, grads=False)
        g_buf = torch.empty_like(xs[0])
        scale = torch.full((1,), 1.0, device=device)

        def bwd_only(x: torch.Tensor, t: torch.Tensor) -> None:
            i = next(cyc)
            tf = flat_targets(tgts[i])
            sel = masks[i].to(torch.uint8)
            launch_selective_backward(row_geometry(xs[i]), tf, sel, scs[i].stats.lse, scale, g_buf)

        record("  part: backward kernel (incl. target/mask prep)", bwd_only, nbytes * (1 + args.ratio), grads=False)
        del g_buf, xs, scs, masks

        liger_ms = next((r["median_ms"] for r in rows if r["name"].startswith("liger")), None)
        for r in rows:
            r["x_liger"] = None if liger_ms is None else r["median_ms"] / liger_ms
            r["x_floor"] = None if r["floor_ms"] is None else r["median_ms"] / r["floor_ms"]
        results += rows
        print(f"\n## V = {v}  (logits {nbytes / 1e9:.2f} GB, copy {copy['median_ms']:.3f} ms = "
              f"{copy_bw / 1e9:.0f} GB/s moved; goal: cggr triton ≤ 0.65 × liger)\n")
        print("| method | median ms | p10 | p90 | × liger | floor ms | × floor | peak extra GB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        fmt = lambda v_, f: "-" if v_ is None else format(v_, f)  # noqa: E731
        for r in rows:
            print(f"| {r['name']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{fmt(r['x_liger'], '.2f')} | {fmt(r['floor_ms'], '.3f')} | {fmt(r['x_floor'], '.2f')} | "
                  f"{fmt(r['peak_extra_GB'], '.2f')} |")
        del bufs, tgts
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"benchmark": "selective_ce_torch", "env": env, "args": vars(args), "results": results}, f,
                  indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
