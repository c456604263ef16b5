#!/usr/bin/env python
"""Benchmark the CGGR selective cross-entropy (Pallas) forward + backward against the dense optax loss, on a GPU.

For each vocabulary size (default N = 16384 tokens, V = 128256 and 131072, bfloat16 logits, ratio 0.25) it
times ``jax.value_and_grad`` (w.r.t. the logits) under ``jit`` of

* ``optax dense`` — ``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()`` (the logits as
  they are) and ``optax dense (fp32 upcast)`` — the same on ``logits.astype(float32)``;
* ``cggr pallas: score+select+CE`` — the whole pipeline
  (:func:`cggr_jax.kernels.scored_selective_cross_entropy_pallas`: scoring kernel → ``select_tokens`` on
  device → selective CE with the sparse backward);
* its parts: ``scoring kernel`` alone, ``selection`` alone (on precomputed difficulties), and
  ``selective CE given mask+stats`` (fwd + sparse bwd only).

Timing: random data made on the device, ``--warmup`` untimed calls, ``--reps`` timed calls with
``block_until_ready``; median (p10/p90) in ms. Prints a markdown table, writes JSON to ``--out``.

    python benchmarks/bench_selective_ce_jax.py --out bench_selective_ce_jax.json

``--smoke`` runs tiny shapes with the kernels interpreted on any backend (checks the script only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_scoring_jax (shared helpers)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench_scoring_jax import (  # noqa: E402
    DTYPES,
    environment,
    random_logits,
    require_gpu,
    time_fn,
    triton_deprecation_note,
)
from cggr_jax.kernels import (  # noqa: E402
    scored_selective_cross_entropy_pallas,
    selective_cross_entropy_pallas,
    token_statistics_pallas,
)
from cggr_jax.scoring import difficulty_from_statistics  # noqa: E402
from cggr_jax.selection import select_tokens  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--selection", default="topk")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--block-v", type=int, default=None, help="kernel block (default: the package default)")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--out", default="bench_selective_ce_jax.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted (script check)")
    args = ap.parse_args(argv)
    require_gpu(args.smoke)
    if args.smoke:
        args.n, args.vocab, args.reps, args.warmup, args.block_v = 32, [300], 2, 1, 64
    kopts = dict(interpret=True if args.smoke else False, block_v=args.block_v, num_warps=args.num_warps)
    note = triton_deprecation_note()
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")
    dtype = DTYPES[args.dtype]
    env = environment()
    ratio = jnp.float32(args.ratio)
    print(f"# Selective CE fwd+bwd — {env['device']}, jax {env['jax']}, N={args.n}, {args.dtype}, "
          f"ratio={args.ratio}, selection={args.selection}")
    if note:
        print(f"_{note}_")
    results: list[dict[str, Any]] = []
    key = jax.random.PRNGKey(1)
    for v in args.vocab:
        x = random_logits(jax.random.fold_in(key, v), args.n, v, dtype)
        t = jax.random.randint(jax.random.fold_in(key, v + 1), (args.n,), 0, v, jnp.int32)
        jax.block_until_ready((x, t))
        rows: list[dict[str, Any]] = []

        def record(name: str, fn: Any, fargs: Sequence[Any]) -> dict[str, Any]:
            r = time_fn(fn, fargs, warmup=args.warmup, reps=args.reps)
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype, ratio=args.ratio)
            rows.append(r)
            return r

        dense = record("optax dense", jax.jit(jax.value_and_grad(
            lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).mean())), [x, t])
        record("optax dense (fp32 upcast)", jax.jit(jax.value_and_grad(
            lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a.astype(jnp.float32), b).mean())),
            [x, t])

        def pipeline(a, b, r):
            loss, mask, k = scored_selective_cross_entropy_pallas(a, b, r, selection=args.selection, **kopts)
            return loss, k

        record("cggr pallas: score+select+CE", jax.jit(jax.value_and_grad(pipeline, has_aux=True)), [x, t, ratio])

        stats_fn = jax.jit(lambda a, b: token_statistics_pallas(a, b, **kopts))
        record("  scoring kernel", stats_fn, [x, t])
        stats = stats_fn(x, t)
        diff = difficulty_from_statistics(stats, "combined")
        eligible = jnp.isfinite(diff)
        sel_fn = jax.jit(lambda d, e, r: select_tokens(d, e, r, selection=args.selection))
        record("  selection", sel_fn, [diff, eligible, ratio])
        mask, k = sel_fn(diff, eligible, ratio)
        record("  selective CE given mask+stats", jax.jit(jax.value_and_grad(
            lambda a, b, m, s: selective_cross_entropy_pallas(a, b, m, stats=s, **kopts))), [x, t, mask, stats])
        for r in rows:
            r["speedup_vs_optax_dense"] = dense["median_ms"] / r["median_ms"]
        results += rows
        print(f"\n## V = {v}  (k = {int(k)} of {args.n} tokens selected)\n")
        print("| method (the first three: value_and_grad) | median ms | p10 | p90 | speed-up vs optax dense |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{r['speedup_vs_optax_dense']:.2f} |")
        del x, t, stats, mask
    with open(args.out, "w") as f:
        json.dump({"benchmark": "selective_ce_jax", "env": env, "note": note, "args": vars(args),
                   "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
