#!/usr/bin/env python
"""The whole training step users run (issue 16): ``python benchmarks/step.py --framework torch|jax [--quick]
[--shapes 1b,135m,qwen] [--deadline-s S]``.

One forward + backward + AdamW step of a whole model, for every way of computing the loss, in one process per
framework, measured against the standard step of the same run:

* PyTorch (``benchmarks/ops/step_torch.py``): Hugging Face Llama models built from configs, bf16 weights,
  ``torch.optim.AdamW``; rows ``standard``, ``liger_flce``, ``cggr_loss``, ``cggr_fused``,
  ``batch_split_L{1,2,4}`` (``CGGRModel``), the cheaper routers of SPEC §9.3 (``ROUTER_OPTION_ROWS``), and
  ``random_subset``, each eager and compiled (``torch.compile``; ``CGGRModel`` with ``buckets="auto"`` and
  the default ``kept_rows="auto"``, which is ``"bound"`` here, the threshold being off: no host synchronisation
  per step, SPEC §9.4; each record's ``kept_rows`` says which ran);
* JAX (``benchmarks/ops/step_jax.py``): ``cggr_jax.models.DecoderLM`` of the same shapes, bf16, optax AdamW,
  ``jit``; rows ``standard``, ``cggr_loss``, ``cggr_fused``, ``batch_split_L{1,2,4}``, the cheaper routers
  (``BatchSplitConfig``; no ``compiled_router`` row: the JAX router is always jitted), ``random_subset``.

**The cheaper routers** (issue 16 point 3, SPEC §9.3): ``CGGRModel`` / ``BatchSplitConfig`` with a 1-layer
router and one option each (``ROUTER_OPTION_ROWS``; ``--quick`` uses smaller values that still take effect at
``T = 16``):

* ``batch_split_L1_stride``          ``router_positions=16`` (score every 16th position);
* ``batch_split_L1_samples``         ``router_samples=64`` (64 evenly spaced positions);
* ``batch_split_L1_prefix``          ``router_prefix=256`` (the router reads the first 256 columns);
* ``batch_split_L1_stride4``         ``router_positions=4`` (every 4th position: the stride the quality study's
  gate chose, ``benchmarks/quality/RESULTS.md`` "Round 3 (S2) — interim"; the recommended router);
* ``batch_split_L1_compiled_router`` ``router_compile=True`` (PyTorch only: the router's layers compiled);
* ``batch_split_L1_stride4_compiled_router`` ``router_positions=4, router_compile=True`` (PyTorch only: the
  recommended router with its layers compiled);
* ``batch_split_L1_combined``        ``router_prefix=256, router_samples=64`` (+ ``router_compile=True`` in
  PyTorch, which matches JAX's always-jitted router). Not in the default selection.

**Rows run by default** (``--rows`` not given; ``DEFAULT_ROWS`` of each ops module): every row except
``batch_split_L1_combined``. PyTorch at the 1B shape: 26 rows (13 eager, 13 compiled), estimated ~4.8 min on
the H200 (run 8aea2f4 measured 235 s for the 16 rows before the cheaper routers: the compiled rows that compile a
new model graph take ~40 s each, ``standard``, ``cggr_fused``, ``random_subset``, ``cggr_loss``; the compiled
``CGGRModel`` rows reuse ``random_subset``'s graph, their kept count being one of the buckets, and take 2-3 s, as
do the eager ones; ``compiled_router`` compiles the 1-layer router once more, ~10-20 s, not yet measured).
The runner gives it ``--deadline-s 300``; what does not fit (the last row, ``cggr_loss`` compiled, first) is
recorded as skipped. ``--rows all`` runs every row, ``--rows a,b`` the rows named (both variants of each in PyTorch).

Shapes (``SHAPES``; ``--shapes`` picks, default all three, in this order):

* ``1b``   the Llama-3.2-1B shape: d 2048, 16 layers, 32 heads / 8 kv heads, SwiGLU 8192, V 128256, tied;
  B 16 × T 1024;
* ``135m`` the SmolLM-135M shape: d 576, 30 layers, 9 heads / 3 kv heads, SwiGLU 1536, V 49152, tied;
  B 64 × T 1024;
* ``qwen`` a Qwen-style vocabulary, the Qwen2.5-0.5B shape as a Llama (no qkv bias): d 896, 24 layers,
  14 heads / 2 kv heads, SwiGLU 4864, V 151936, tied; B 16 × T 1024.

CGGR settings: ``cggr.CGGRConfig``'s defaults except ``warmup_steps=0`` (the steady state, ratio 0.25, is what
is measured) and the dynamic threshold off (``--dynamic-threshold`` turns it on): at random init the mean
confidence is ~1/V and the SPEC §5.2 threshold would keep 0.375 instead of the 0.25 a trained model keeps.
With it off every CGGR row keeps exactly ``num_selected(·, 0.25)``, and ``random_subset`` trains the full
model on that many random sequences. Each record says so (``extra.cggr``).

Columns (record metrics): ``median_ms`` and the IQR of ``--steps`` timed steps after ``--warmup`` untimed ones
(the first compiles), ``input_tokens_per_s`` (``B·T`` per step), ``trained_tokens_per_s`` (tokens that get a
loss), ``peak_memory_gib``; ratios ``× standard`` (this step / the standard step of the same run: eager rows
against the eager standard, compiled rows against the compiled standard, JAX rows against the JAX standard)
and, for the batch-split rows, ``× random_subset``. Skipped rows (a failed import, the deadline) and failed
rows (out of memory, a crash) are records too, with their reason.

**Budget.** ``--deadline-s`` bounds the script: a row starts only when its expected time (the last row of its
kind, else a prior) fits both what is left and the shape's share of it (what is left / shapes left), so every
shape gets its baselines; rows run most important first (baselines, then the issue's goals). What does not fit
is recorded as skipped. The GPU runner's suite ``step`` has one step per framework and shape, with deadlines
such that one shape in both frameworks fits one device call (~8.5 min: ``python -m benchmarks.run step
--deadline-min 9`` runs the 1B shape, ``--only step_torch_135m,step_jax_135m`` the next). For every row of one
shape in one framework, call this script with a longer deadline (``--shapes 135m --deadline-s 540``).

Outputs (one file per shape, so runs of different shapes in one run folder do not replace each other):
``<run folder>/step/step_<shape>_<framework>.jsonl`` (records, rewritten after every row: a run cut short keeps
what it measured), ``raw/step_<shape>_<framework>.json`` (configuration, environment, every row) and
``step_<shape>_<framework>.meta.json`` (GPU clocks and power before and after). ``--quick``: tiny shapes on
CPU, one warm-up and two timed steps, ``torch.compile(backend="aot_eager")`` — every row's code path in
seconds (``tests/test_benchmarks.py``), written under ``out/bench/`` unless ``--run-folder`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)  # benchmarks/<op>.py must not shadow top-level modules of the same name
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root

from benchmarks.harness import env as _env  # noqa: E402
from benchmarks.harness.budget import Budget  # noqa: E402
from benchmarks.harness import profiles  # noqa: E402
from benchmarks.harness.records import RunContext, command_line, write_records  # noqa: E402

SUITE = "step"
OP = "step"
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(d=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True, batch_size=16,
               seq_len=1024, note="Llama-3.2-1B shape"),
    "135m": dict(d=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, tied=True, batch_size=64,
                 seq_len=1024, note="SmolLM-135M shape"),
    "qwen": dict(d=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936, tied=True, batch_size=16,
                 seq_len=1024, note="Qwen2.5-0.5B shape as a Llama (no qkv bias), V = 151936"),
}
#: ``--quick``: the same structure (GQA, tied head, as many layers as the deepest router), tiny and distinct.
QUICK_SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(d=32, layers=4, heads=4, kv_heads=2, ffn=64, vocab=97, tied=True, batch_size=8, seq_len=16,
               note="tiny stand-in of the 1b shape"),
    "135m": dict(d=24, layers=4, heads=3, kv_heads=1, ffn=48, vocab=89, tied=True, batch_size=8, seq_len=16,
                 note="tiny stand-in of the 135m shape"),
    "qwen": dict(d=32, layers=4, heads=4, kv_heads=1, ffn=64, vocab=151, tied=True, batch_size=8, seq_len=16,
                 note="tiny stand-in of the qwen shape"),
}
#: How much longer a row of each shape takes than at the 1B shape (the priors of the ops modules are for 1B):
#: the 135m shape has 30 layers to compile and B = 64, the qwen shape 24 layers and the largest vocabulary.
SHAPE_FACTOR = {"1b": 1.0, "135m": 1.3, "qwen": 1.1}
#: The cheaper-router rows (SPEC §9.3): row -> the options ``CGGRModel`` / ``BatchSplitConfig`` gets besides
#: ``router_layers=1``. ``router_compile`` is PyTorch's only (the JAX step drops it: its router is jitted).
ROUTER_OPTION_ROWS: dict[str, dict[str, Any]] = {
    "batch_split_L1_stride": dict(router_positions=16),
    "batch_split_L1_samples": dict(router_samples=64),
    "batch_split_L1_prefix": dict(router_prefix=256),
    "batch_split_L1_stride4": dict(router_positions=4),
    "batch_split_L1_compiled_router": dict(router_compile=True),
    "batch_split_L1_stride4_compiled_router": dict(router_positions=4, router_compile=True),
    "batch_split_L1_combined": dict(router_prefix=256, router_samples=64, router_compile=True),
}
#: ``--quick`` (T = 16): values that still score / read a strict subset of the positions.
QUICK_ROUTER_OPTION_ROWS: dict[str, dict[str, Any]] = {
    "batch_split_L1_stride": dict(router_positions=4),
    "batch_split_L1_samples": dict(router_samples=4),
    "batch_split_L1_prefix": dict(router_prefix=8),
    "batch_split_L1_stride4": dict(router_positions=4),
    "batch_split_L1_compiled_router": dict(router_compile=True),
    "batch_split_L1_stride4_compiled_router": dict(router_positions=4, router_compile=True),
    "batch_split_L1_combined": dict(router_prefix=8, router_samples=4, router_compile=True),
}
CGGR_NOTE = ("cggr.CGGRConfig defaults except warmup_steps=0 (steady state) and dynamic_threshold={dyn} "
             "(at random init the SPEC 5.2 threshold would keep ratio*1.5); kept sequences k = {k} of {B}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/step.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--framework", choices=("torch", "jax"), required=True)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (script check; numbers mean nothing)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of %(default)s (in the order given)")
    p.add_argument("--rows", default=None, help="comma list of rows to run, or 'all' (default: the ops module's "
                                                "DEFAULT_ROWS, every row but batch_split_L1_combined)")
    p.add_argument("--given-order", action="store_true",
                   help="run the rows in the order of --rows (default: the ops module's ROWS order), e.g. to "
                        "see whether a row's time depends on the rows run before it in the same process")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each row's timed steps, trace N more steps and store and print its kernels "
                        "(benchmarks/harness/profiles.py; default 0: no trace)")
    p.add_argument("--eager-only", action="store_true", help="PyTorch: skip the compiled rows")
    p.add_argument("--deadline-s", type=float, default=None, help="wall-clock budget of the whole script")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (default 3; "
                                                            "--quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; --quick 2)")
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio (default %(default)s)")
    p.add_argument("--dynamic-threshold", action="store_true", help="turn the SPEC §5.2 threshold on")
    p.add_argument("--batch-size", type=int, default=None, help="override every shape's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override every shape's sequence length")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --quick "
                                                           "aot_eager)")
    p.add_argument("--attention", choices=("auto", "cudnn", "xla"), default="auto", help="JAX attention")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-folder", type=Path, default=None,
                   help="write under this folder (default benchmarks/results/<gpu>/<date>_<commit>; with "
                        "--quick: out/bench/<gpu>/<date>_<commit>)")
    p.add_argument("--commit", default=None, help="commit of the figures (default $CGGR_COMMIT or git)")
    return p


def order_plan(plan: list[tuple[str, bool]], rows_wanted: Sequence[str], given_order: bool) -> list[tuple[str, bool]]:
    """The ``(row, compiled)`` pairs of ``plan`` whose row is wanted: in ``plan``'s order (the ops module's
    ``ROWS``), or with ``given_order`` in the order of ``rows_wanted`` (a row's variants keep ``plan``'s order)."""
    kept = [(r, c) for r, c in plan if r in rows_wanted]
    if given_order:
        kept.sort(key=lambda rc: list(rows_wanted).index(rc[0]))  # stable: a row's variants as in plan
    return kept


def parse_list(text: Optional[str], allowed: Sequence[str], name: str) -> Optional[list[str]]:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{name}: expected a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def records_of(raw: dict[str, Any], fw: str, ctx: RunContext, quick: bool) -> list[dict[str, Any]]:
    """The records of one shape's rows: ratios against the baselines of the same run (see the docstring)."""
    shape_name = raw["shape_name"]
    shape = raw["shape"]
    rows = raw["rows"]

    def median_of(row: str, compiled: bool) -> Optional[float]:
        for r in rows:
            if r["row"] == row and bool(r.get("compiled")) == compiled and r.get("status") == "ok":
                return r["median_ms"]
        return None
    out = []
    for r in rows:
        compiled = bool(r.get("compiled"))
        status = r.get("status")
        extra: dict[str, Any] = {"row": r["row"], "label": r.get("label"), "compiled": compiled, "status": status,
                                 "shape_name": shape_name, "cggr": raw["cggr"]}
        for k in ("reason", "api", "compile_error", "router_layers", "router_options", "buckets", "router_path",
                  "nominal_kept", "kept_rows", "kept_rows_bound"):
            if r.get(k) is not None:
                extra[k] = r[k]
        if quick:
            extra["quick"] = True  # a script check: report.py leaves these out
        if status == "ok":
            metrics = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and v is not None}
            ratios = {}
            base = median_of("standard", compiled)
            if base and r["row"] != "standard":
                ratios["standard"] = r["median_ms"] / base
            rand = median_of("random_subset", compiled)
            if rand and r["row"].startswith("batch_split"):
                ratios["random_subset"] = r["median_ms"] / rand
            extra["timing_method"] = r.get("method")
        else:
            metrics = {status or "failed": 1.0, "wall_s": r.get("wall_s", 0.0)}
            ratios = {}
        if fw == "jax":
            case = r["row"]
        else:
            case = r["row"] + (" (compiled)" if compiled else "")
        out.append(ctx.record(op=OP, framework=fw, case=case,
                              shape={"model": shape_name, "batch_size": shape["batch_size"],
                                     "seq_len": shape["seq_len"], "vocab": shape["vocab"], "d": shape["d"],
                                     "layers": shape["layers"]},
                              dtype=raw["config"]["dtype"], metrics=metrics, ratios=ratios,
                              baseline=r["row"] in ("standard", "random_subset", "liger_flce"), extra=extra))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    table = QUICK_SHAPES if args.quick else SHAPES
    shapes = parse_list(args.shapes, list(table), "--shapes")
    fw = args.framework
    if args.quick and fw == "jax" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # A script check on CPU: compile time only (numerics unchanged), as tests/conftest.py does.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if fw == "torch":
        from benchmarks.ops import step_torch as impl
        all_rows = sorted({r for r, _ in impl.ROWS})
    else:
        from benchmarks.ops import step_jax as impl
        all_rows = list(impl.ROWS)
    if args.rows is None:
        rows_wanted = list(impl.DEFAULT_ROWS)
    elif args.rows.strip() == "all":
        rows_wanted = list(all_rows)
    else:
        rows_wanted = parse_list(args.rows, all_rows + ["all"], "--rows")
        rows_wanted = list(all_rows) if "all" in rows_wanted else rows_wanted
    cfg: dict[str, Any] = dict(
        router_options=QUICK_ROUTER_OPTION_ROWS if args.quick else ROUTER_OPTION_ROWS,
        ratio=args.ratio, dynamic_threshold=bool(args.dynamic_threshold), lr=args.lr, seed=args.seed,
        warmup=max(1, args.warmup if args.warmup is not None else 1 if args.quick else 3),
        steps=max(1, args.steps if args.steps is not None else 2 if args.quick else 8), dtype="bf16",
        compile_backend=args.compile_backend or ("aot_eager" if args.quick else "inductor"),
        attention=args.attention, profile_steps=max(0, args.profile))
    cmd = command_line(["benchmarks/step.py"] + argv)
    root = _env.REPO_ROOT / "out" / "bench" if args.quick and args.run_folder is None else None
    ctx = RunContext(suite=SUITE, commit=args.commit, command=cmd, results_root=root, run_folder=args.run_folder)
    budget = Budget(args.deadline_s)
    if fw == "torch":
        device = impl.device_for(args.quick)
        environment = impl.environment(device)
    else:
        environment = impl.environment()
    software = (_env.software("torch", "triton", "transformers") if fw == "torch"
                else _env.software("jax", "jaxlib", "flax", "optax"))
    print(f"[step_{fw}] shapes {shapes}, warmup {cfg['warmup']}, steps {cfg['steps']}, "
          f"deadline {args.deadline_s} s -> {ctx.suite_dir}", flush=True)
    failures = 0
    for i, name in enumerate(shapes):
        shape = dict(table[name])
        if args.batch_size:
            shape["batch_size"] = args.batch_size
        if args.seq_len:
            shape["seq_len"] = args.seq_len
        B = shape["batch_size"]
        scfg = dict(cfg, kept=impl.kept_count(B, cfg))
        share_end = budget.elapsed() + budget.left() / (len(shapes) - i)  # this shape's share of what is left
        kind = f"{fw}:{name}"
        raw: dict[str, Any] = {
            "benchmark": f"step_{fw}", "shape_name": name, "shape": shape, "config": {**scfg, "quick": args.quick},
            "cggr": CGGR_NOTE.format(dyn=cfg["dynamic_threshold"], k=scfg["kept"], B=B),
            "environment": environment, "software": software, "command": cmd, "rows": []}
        stem = f"{OP}_{name}_{fw}"
        raw_path = ctx.suite_dir / "raw" / f"{stem}.json"
        rec_path = ctx.suite_dir / f"{stem}.jsonl"
        meta = {"op": OP, "framework": fw, "shape": name, "suite": SUITE, "command": cmd, "commit": ctx.commit,
                "gpu": ctx.gpu, "date": ctx.date, "telemetry_before": _env.telemetry()}
        t_shape = time.time()
        prepared: Any = None
        if fw == "torch":
            plan = [(r, c) for r, c in impl.ROWS if not (args.eager_only and c)]
        else:
            import jax.numpy as jnp

            attention, note = impl.attention_for(shape, jnp.bfloat16, args.attention)
            scfg["attention"] = attention
            raw["config"]["attention"] = attention
            if note:
                raw["attention_note"] = note
            plan = [(r, True) for r in impl.ROWS]
        plan = order_plan(plan, rows_wanted, args.given_order)
        for row, compiled in plan:
            prior = (impl.PRIOR_S[(row, compiled)] if fw == "torch" else impl.PRIOR_S[row]) * SHAPE_FACTOR.get(name, 1)
            why = budget.fits(prior, share_left=share_end - budget.elapsed())
            label = row + (" (compiled)" if compiled and fw == "torch" else "")
            if why is not None:
                res = {"row": row, "compiled": compiled, "status": "skipped", "reason": why, "wall_s": 0.0}
                print(f"  [{name}] {label}: SKIPPED ({why})", flush=True)
            else:
                print(f"  [{name}] {label} ...", flush=True)
                if prepared is None:  # the shape's model and batches, built by its first row that runs
                    prepared = (impl.prepare_shape(shape, scfg, device) if fw == "torch"
                                else impl.prepare_shape(shape, scfg))
                if fw == "torch":
                    res = impl.run_row(row, compiled, shape, scfg, device, prepared)
                else:
                    res = impl.run_row(row, shape, scfg, prepared)
                budget.observe(prior, res["wall_s"])  # the row itself, not the shape's model build
                if res["status"] == "ok":
                    print(f"  [{name}] {label}: {res['median_ms']:.1f} ms/step (IQR {res['iqr_ms']:.1f}), "
                          f"{res['input_tokens_per_s']:,.0f} input tok/s, "
                          f"{res.get('trained_tokens_per_s', float('nan')):,.0f} trained tok/s"
                          + (f"; compile error: {res['compile_error']}" if res.get("compile_error") else "")
                          + f" [{res['wall_s']:.0f} s]", flush=True)
                    if res.get("profile"):
                        print(profiles.table(res["profile"], f"  [{name}] {label} kernel families", "families"),
                              flush=True)
                    elif res.get("profile_error"):
                        print(f"  [{name}] {label}: profile failed ({res['profile_error']})", flush=True)
                else:
                    failures += int(res["status"] == "failed")
                    print(f"  [{name}] {label}: {res['status'].upper()} ({res.get('reason')})", flush=True)
            raw["rows"].append(res)
            # Rewritten after every row: a run cut short (the runner's timeout) keeps what it measured.
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(raw, indent=2, default=str) + "\n")
            if rec_path.exists():
                rec_path.unlink()
            write_records(records_of(raw, fw, ctx, args.quick), rec_path)
        if prepared is not None:
            if fw == "torch":
                impl.release_shape(prepared, device)
            else:
                impl.release_shape(prepared)
        del prepared
        meta.update(wall_s=time.time() - t_shape, telemetry_after=_env.telemetry(), rows=len(raw["rows"]),
                    software=software)
        (ctx.suite_dir / f"{stem}.meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        print(summary(raw, fw), flush=True)
    print(f"[step_{fw}] done in {budget.elapsed():.0f} s, {failures} failed row(s) -> {ctx.suite_dir}", flush=True)
    return 0


def summary(raw: dict[str, Any], fw: str) -> str:
    """A markdown table of one shape's rows for the log."""
    lines = [f"\n{fw} · {raw['shape_name']} ({raw['shape']['note']}, B={raw['shape']['batch_size']}, "
             f"T={raw['shape']['seq_len']}); {raw['cggr']}", "",
             "| row | compiled | step ms | IQR | input tok/s | trained tok/s | peak GiB | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in raw["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r.get('compiled')} | — | — | — | — | — | {r.get('status')}: "
                         f"{str(r.get('reason'))[:120]} |")
            continue
        mem = r.get("peak_memory_gib")
        lines.append(f"| {r['row']} | {r.get('compiled')} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{r['input_tokens_per_s']:,.0f} | {r.get('trained_tokens_per_s', float('nan')):,.0f} | "
                     f"{'—' if mem is None else f'{mem:.1f}'} | {str(r.get('compile_error') or '')[:80]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
