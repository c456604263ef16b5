#!/usr/bin/env python
"""Benchmark the CGGR selective cross-entropy (Pallas) forward + backward against the dense optax loss, on a GPU.

For each vocabulary size (default N = 16384 tokens, V = 128256 and 131072, bfloat16 logits, ratio 0.25) it
times ``jax.value_and_grad`` (w.r.t. the logits) under ``jit`` of

* ``optax dense`` — ``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()`` (the logits as
  they are) and ``optax dense (fp32 upcast)`` — the same on ``logits.astype(float32)``;
* ``cggr pallas: score+select+CE`` — the whole pipeline
  (:func:`cggr_jax.pipeline.scored_selective_cross_entropy`: scoring kernel → ``select_tokens`` on
  device → selective CE with the sparse backward), with the default launches and, when a scoring benchmark
  JSON is given (``--scoring-json``, written by ``benchmarks/scoring.py --framework jax``), with the best scoring launch
  found there and the best backward launch found here;
* its parts: ``scoring kernel`` alone, ``selection`` alone (on precomputed difficulties; both for the first
  vocabulary only), and ``selective CE given mask+stats`` (fwd + sparse bwd only);
* the same pipelines and CE part with the backward kernel on a flat row-major 1-D grid (``flat backward
  grid`` rows: ``cggr_jax.kernels.cross_entropy.BACKWARD_FLAT_GRID = True`` while a fresh ``jit`` is traced
  and timed, restored afterwards; the grid actually traced is checked and recorded as ``backward_grid``, the
  CE part's gradient is compared with the 2-D grid's);
* the backward's floor: ``write floor`` (XLA writing N·V zeros in the logits' dtype) + the selected fraction
  of ``read floor`` (XLA row max);
* a sweep of ≤ 12 backward launches ``(block_rows, block_v, num_warps)`` of the selective CE given
  mask+stats (first vocabulary only), each checked against the default's gradient before it may win.

Timing: random data made on the device, 2 untimed calls, then timed calls with ``block_until_ready`` until
``--budget-ms`` of timed work (at least 5, at most ``--reps``); median (p10/p90) in ms. The output ends
with a short summary (the scoring benchmark's summary is repeated there when ``--scoring-json`` is given);
``--out`` gets the JSON (with the scoring benchmark's JSON embedded under ``"scoring"``).

    python benchmarks/selective_ce.py --framework jax --scoring-json <run>/kernels/raw/scoring_jax.json

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

from benchmarks.harness import compat  # noqa: E402
from benchmarks.ops.scoring_jax import (  # noqa: E402
    DTYPES,
    environment,
    launch_name,
    random_logits,
    require_gpu,
    time_fn,
    triton_deprecation_note,
)
from cggr_jax.kernels import (  # noqa: E402
    BACKWARD_DEFAULTS,
    Launch,
    kernel_config,
    selective_cross_entropy_pallas,
    token_statistics_pallas,
)
from cggr_jax import difficulty_from_statistics, select_tokens  # noqa: E402

#: Backward sweep as (block_rows, bytes of gradient per row of the tile, num_warps): block_v = bytes //
#: itemsize (bf16: 4096 for 8 KiB). The default (one row, 8 KiB, 4 warps: four 16-byte stores per thread);
#: 2-16 KiB tiles of one row with 1-8 warps; 2-8 rows per tile (fewer, larger programs).
SWEEP = [(1, 8192, 4), (1, 4096, 2), (1, 8192, 8), (1, 16384, 8), (1, 16384, 4), (1, 4096, 1), (1, 2048, 1),
         (2, 8192, 8), (2, 4096, 4), (4, 4096, 8), (4, 2048, 4), (8, 2048, 8)]


def backward_grids(fn: Any, fargs: Sequence[Any]) -> list[tuple[int, ...]]:
    """Grids of the backward kernel's ``pallas_call`` (``cggr_selective_ce_grad``) in the jaxpr of ``fn``."""
    return compat.jax_backward_grids(fn, *fargs)


def with_flat_backward_grid(make_fn: Any, fargs: Sequence[Any], run: Any) -> tuple[Any, list[tuple[int, ...]]]:
    """``run(jax.jit(make_fn()))`` with ``BACKWARD_FLAT_GRID = True`` (restored afterwards, also on error).
    ``make_fn`` must build a new function: a ``jit`` traced before keeps the grid it was traced with. Raises
    ``RuntimeError`` when the traced backward kernel is not on a 1-D grid (a mislabelled measurement)."""
    with compat.jax_backward_flat_grid(True):
        fn = jax.jit(make_fn())
        grids = backward_grids(fn, fargs)
        if not grids or any(len(g) != 1 for g in grids):
            raise RuntimeError(f"BACKWARD_FLAT_GRID = True traced backward grids {grids}, expected 1-D")
        return run(fn), grids


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--selection", default="topk", choices=("topk", "stratified", "sequence_aware",
                                                            "fixed_quota", "sampled"))
    ap.add_argument("--budget-ms", type=float, default=100.0, help="timed work per measurement")
    ap.add_argument("--reps", type=int, default=30, help="most timed calls per measurement")
    ap.add_argument("--no-sweep", action="store_true", help="only the default backward launch")
    ap.add_argument("--scoring-json", default=None,
                    help="bench_scoring_jax.py JSON: its best scoring launch is used for the tuned pipeline and "
                         "its summary is repeated at the end")
    ap.add_argument("--out", default="bench_selective_ce_jax.json")
    ap.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes, kernels interpreted (script check)")
    args = ap.parse_args(argv)
    require_gpu(args.smoke)
    sweep = SWEEP
    if args.smoke:
        args.n, args.vocab, args.reps, args.budget_ms = 32, [300], 5, 1.0
        sweep = [(1, 128, 1), (4, 128, 4)]
    interpret = bool(args.smoke)
    note = triton_deprecation_note()
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    env = environment()
    timing = dict(budget_ms=args.budget_ms, max_reps=args.reps)
    scoring_json: Optional[dict[str, Any]] = None
    if args.scoring_json:
        if os.path.exists(args.scoring_json):
            with open(args.scoring_json) as f:
                scoring_json = json.load(f)
        else:
            print(f"note: --scoring-json {args.scoring_json} does not exist; the tuned pipeline uses the default "
                  f"scoring launch")
    best_scoring = Launch(**scoring_json["best_launch"]) if scoring_json and scoring_json.get("best_launch") \
        else None
    ratio = jnp.float32(args.ratio)
    print(f"# Selective CE fwd+bwd — {env['device']}, jax {env['jax']}, N={args.n}, {args.dtype}, "
          f"ratio={args.ratio}, selection={args.selection}")
    if note:
        print(f"_{note}_")
    results: list[dict[str, Any]] = []
    summary: list[str] = []
    best_backward: Optional[Launch] = None

    def dump(best_line: Optional[str] = None) -> None:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "selective_ce_jax", "env": env, "note": note, "args": vars(args),
                       "backward_flat_grid_default": compat.jax_cross_entropy_kernels().BACKWARD_FLAT_GRID,
                       "best_backward_launch": None if best_backward is None else best_backward.kwargs(),
                       "best_backward_defaults_line": best_line, "summary": summary, "results": results,
                       "scoring": scoring_json}, f, indent=2)

    key = jax.random.PRNGKey(1)
    for vi, v in enumerate(args.vocab):
        x = random_logits(jax.random.fold_in(key, v), args.n, v, dtype)
        t = jax.random.randint(jax.random.fold_in(key, v + 1), (args.n,), 0, v, jnp.int32)
        jax.block_until_ready((x, t))
        rows: list[dict[str, Any]] = []

        def record(name: str, fn: Any, fargs: Sequence[Any], **extra: Any) -> dict[str, Any]:
            r = time_fn(fn, fargs, **timing)
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype, ratio=args.ratio, **extra)
            rows.append(r)
            return r

        dense = record("optax dense", jax.jit(jax.value_and_grad(
            lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).mean())), [x, t])
        if vi == 0:
            record("optax dense (fp32 upcast)", jax.jit(jax.value_and_grad(
                lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a.astype(jnp.float32), b).mean())),
                [x, t])

        def pipeline(a, b, r, scoring_launch=None, backward_launch=None):
            loss, _, k = compat.jax_scored_selective_cross_entropy()(
                a, b, r, selection=args.selection, interpret=interpret, scoring_launch=scoring_launch,
                backward_launch=backward_launch)
            return loss, k

        default_pipe = record("cggr pallas: score+select+CE (default launches)",
                              jax.jit(jax.value_and_grad(pipeline, has_aux=True)), [x, t, ratio])
        flat_pipe, _ = with_flat_backward_grid(
            lambda: jax.value_and_grad(lambda a, b, r: pipeline(a, b, r), has_aux=True), [x, t, ratio],
            lambda fn: record("cggr pallas: score+select+CE (default launches, flat backward grid)", fn,
                              [x, t, ratio], backward_flat_grid=True))

        stats_fn = jax.jit(lambda a, b: token_statistics_pallas(a, b, interpret=interpret))
        stats = stats_fn(x, t)
        diff = difficulty_from_statistics(stats, "combined")
        eligible = jnp.isfinite(diff)
        sel_fn = jax.jit(lambda d, e, r: select_tokens(d, e, r, selection=args.selection))
        if vi == 0:  # the parts once (the other vocabularies: pipelines and the CE part only)
            record("  scoring kernel (default)", stats_fn, [x, t])
            record("  selection", sel_fn, [diff, eligible, ratio])
        mask, k = sel_fn(diff, eligible, ratio)
        frac = float(int(k)) / args.n

        def ce(a, b, m, s, launch):
            return selective_cross_entropy_pallas(a, b, m, stats=s, interpret=interpret, **launch.kwargs())

        ce_default = jax.jit(jax.value_and_grad(lambda a, b, m, s: ce(a, b, m, s, Launch())))
        _, g_ref = jax.block_until_ready(ce_default(x, t, mask, stats))
        ce_part = record("  selective CE given mask+stats (default backward)", ce_default, [x, t, mask, stats])

        @jax.jit
        def max_diff(g: jax.Array, h: jax.Array) -> jax.Array:
            return jnp.max(jnp.abs(g.astype(jnp.float32) - h.astype(jnp.float32)))

        def time_flat_ce(fn: Any) -> dict[str, Any]:
            _, g = jax.block_until_ready(fn(x, t, mask, stats))
            worst = float(max_diff(g, g_ref))
            del g
            r = record("  selective CE given mask+stats (default backward, flat grid)", fn, [x, t, mask, stats],
                       backward_flat_grid=True, max_abs_diff_vs_default=worst)
            r["agrees_with_default"] = worst <= 1e-6
            return r

        ce_flat, grids = with_flat_backward_grid(
            lambda: jax.value_and_grad(lambda a, b, m, s: ce(a, b, m, s, Launch())), [x, t, mask, stats],
            time_flat_ce)
        ce_flat["backward_grid"] = [list(g) for g in grids]
        print(f"  CE given mask+stats, flat backward grid {grids}: {ce_flat['median_ms']:.3f} ms vs 2-D grid "
              f"{ce_part['median_ms']:.3f} ms  " + ("ok" if ce_flat["agrees_with_default"] else
                                                    f"DISAGREES (max |diff| {ce_flat['max_abs_diff_vs_default']:.2e})"),
              flush=True)
        write = record("  write floor (XLA zeros, N·V)", jax.jit(lambda a: jnp.zeros_like(a)), [x])
        read = record("  read floor (XLA row max, N·V)", jax.jit(lambda a: jnp.max(a, axis=-1)), [x])
        bwd_floor = write["median_ms"] + frac * read["median_ms"]

        candidates: list[Launch] = []
        if not args.no_sweep:
            if vi == 0:
                candidates = [Launch(block_rows=r_, block_v=max(16, b_ // itemsize), num_warps=w_)
                              for r_, b_, w_ in sweep]
            elif best_backward is not None:
                candidates = [best_backward]
        best: Optional[tuple[float, Launch]] = None
        for launch in candidates:
            fn = jax.jit(jax.value_and_grad(lambda a, b, m, s, launch=launch: ce(a, b, m, s, launch)))
            try:
                _, g = jax.block_until_ready(fn(x, t, mask, stats))
                worst = float(max_diff(g, g_ref))
                del g
                r = record(f"  sweep backward {launch_name(launch.kwargs())}", fn, [x, t, mask, stats],
                           **launch.kwargs(), max_abs_diff_vs_default=worst)
            except Exception as err:  # a launch the compiler rejects: report it, go on
                print(f"  backward {launch_name(launch.kwargs())}: failed ({type(err).__name__}: {err})"[:240])
                continue
            ok = worst <= 1e-6
            r["agrees_with_default"] = ok
            print(f"  sweep backward {launch_name(launch.kwargs()):>22}: {r['median_ms']:.3f} ms "
                  f"({r['median_ms'] / bwd_floor:.2f}x floor)  "
                  f"{'ok' if ok else f'DISAGREES with the default (max |diff| {worst:.2e})'}", flush=True)
            if ok and (best is None or r["median_ms"] < best[0]):
                best = (r["median_ms"], launch)
        if best is not None and vi == 0:
            best_backward = best[1]
        tuned = tuned_flat = None
        if best_scoring is not None or best_backward is not None:
            tuned = record("cggr pallas: score+select+CE (best launches)", jax.jit(jax.value_and_grad(
                lambda a, b, r: pipeline(a, b, r, best_scoring, best_backward), has_aux=True)), [x, t, ratio],
                scoring_launch=None if best_scoring is None else best_scoring.kwargs(),
                backward_launch=None if best_backward is None else best_backward.kwargs())
            tuned_flat, _ = with_flat_backward_grid(
                lambda: jax.value_and_grad(lambda a, b, r: pipeline(a, b, r, best_scoring, best_backward),
                                           has_aux=True), [x, t, ratio],
                lambda fn: record("cggr pallas: score+select+CE (best launches, flat backward grid)", fn,
                                  [x, t, ratio], backward_flat_grid=True,
                                  scoring_launch=None if best_scoring is None else best_scoring.kwargs(),
                                  backward_launch=None if best_backward is None else best_backward.kwargs()))
        for r in rows:
            r["speedup_vs_optax_dense"] = dense["median_ms"] / r["median_ms"]
            r["x_backward_floor"] = r["median_ms"] / bwd_floor
        results += rows
        print(f"\n## V = {v}  (k = {int(k)} of {args.n} tokens selected; backward floor = write + "
              f"{frac:.2f}·read = {bwd_floor:.3f} ms)\n")
        print("| method (value_and_grad unless a part) | median ms | p10 | p90 | speed-up vs optax dense |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            if "sweep" in r["name"]:
                continue
            print(f"| {r['name'].strip()} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{r['speedup_vs_optax_dense']:.2f} |")
        dcfg = kernel_config(v, itemsize, defaults=BACKWARD_DEFAULTS)
        line = (f"V={v}: optax dense {dense['median_ms']:.3f} ms; pipeline default {default_pipe['median_ms']:.3f} ms"
                f" (flat backward grid {flat_pipe['median_ms']:.3f} ms)"
                + (f", tuned {tuned['median_ms']:.3f} ms" if tuned else "")
                + (f" (flat backward grid {tuned_flat['median_ms']:.3f} ms)" if tuned_flat else "")
                + f"; CE given mask+stats (R={dcfg.block_rows} bv={dcfg.block_v} w={dcfg.num_warps}) "
                f"{ce_part['median_ms']:.3f} ms = {ce_part['median_ms'] / bwd_floor:.2f}x floor {bwd_floor:.3f}"
                f" (flat backward grid {ce_flat['median_ms']:.3f} ms = {ce_flat['median_ms'] / bwd_floor:.2f}x"
                + ("" if ce_flat["agrees_with_default"] else ", DISAGREES with the 2-D grid") + ")")
        if best is not None:
            line += f"; best backward {launch_name(best[1].kwargs())} {best[0]:.3f} ms = {best[0] / bwd_floor:.2f}x"
        summary.append(line)
        del x, t, stats, mask, g_ref
        dump()  # partial results survive a run cut short

    best_line = None
    if best_backward is not None:
        b = best_backward.kwargs()
        best_line = (f"BACKWARD_DEFAULTS = LaunchDefaults(block_rows={b['block_rows']}, "
                     f"block_bytes={b['block_v'] * itemsize}, num_warps={b['num_warps']}, num_stages=1)")
        summary.append(f"best backward launch ({args.dtype}, V={args.vocab[0]}): {launch_name(b)}  "
                       f"-> cggr_jax/kernels/launch.py: {best_line}")
    dump(best_line)
    print(f"\nwrote {args.out}")
    if scoring_json is not None:
        print("\n# summary (scoring, from --scoring-json)")
        for line in scoring_json.get("summary", []):
            print(line)
    print("\n# summary (selective CE)")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
