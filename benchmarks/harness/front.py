"""The common command line of the op benchmarks (``benchmarks/<op>.py --framework torch|jax``).

Each op has one implementation module per framework under ``benchmarks/ops/`` (the measurement logic: data,
baselines measured in the same run, sweeps, checks), timed through :func:`benchmarks.harness.measure`. This
front runs one of them, keeps its own JSON under ``<run folder>/<suite>/raw/``, converts it into records
(:mod:`benchmarks.harness.convert`) written to ``<run folder>/<suite>/<op>_<framework>.jsonl``, and logs the
GPU's clocks and power before and after (``<op>_<framework>.meta.json``). Every argument it does not know
goes to the implementation (``--help`` shows both).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.harness import env as _env
from benchmarks.harness.convert import SUITE_OF_OP, convert
from benchmarks.harness.records import RunContext, command_line, write_records

__all__ = ["IMPLEMENTATIONS", "NOT_AVAILABLE", "QUICK_FLAG", "main"]

#: op → framework → implementation module (``main(argv) -> int``, writes its JSON to ``--out``)
IMPLEMENTATIONS = {
    "scoring": {"torch": "benchmarks.ops.scoring_torch", "jax": "benchmarks.ops.scoring_jax"},
    "selective_ce": {"torch": "benchmarks.ops.selective_ce_torch", "jax": "benchmarks.ops.selective_ce_jax"},
    "selection": {"torch": "benchmarks.ops.selection_torch"},
    "fused_linear": {"torch": "benchmarks.ops.fused_linear_torch", "jax": "benchmarks.ops.fused_linear_jax"},
    "batch_split": {"torch": "benchmarks.ops.batch_split_torch", "jax": "benchmarks.ops.batch_split_jax"},
    "token_stats": {"torch": "benchmarks.ops.token_stats_torch", "jax": "benchmarks.ops.token_stats_jax"},
}
#: why an (op, framework) pair has no benchmark
NOT_AVAILABLE = {
    ("selection", "jax"): "n/a: JAX selection is select_tokens' XLA sort inside the jitted loss; it has no "
                          "kernel of its own and is timed as part of `benchmarks/selective_ce.py --framework jax`",
}
#: the CPU script-check flag each implementation understands (the front accepts ``--quick`` for all)
QUICK_FLAG = {"scoring": "--smoke", "selective_ce": "--smoke", "selection": "--smoke", "fused_linear": "--quick",
              "batch_split": "--quick", "token_stats": "--quick"}


def build_parser(op: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python benchmarks/{op}.py", add_help=False,
                                description=f"{op} benchmark; other options go to the implementation (listed below)")
    p.add_argument("--framework", choices=("torch", "jax"), required=True)
    p.add_argument("--suite", default=SUITE_OF_OP[op], help="suite the records belong to (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (script check; numbers mean nothing)")
    p.add_argument("--run-folder", type=Path, default=None,
                   help="write under this folder (default benchmarks/results/<gpu>/<date>_<commit>; "
                        "with --quick: out/bench/<gpu>/<date>_<commit>)")
    p.add_argument("--commit", default=None, help="commit of the figures (default $CGGR_COMMIT or git)")
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(op: str, argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser(op)
    if "-h" in argv or "--help" in argv:
        p.print_help()
        fw = argv[argv.index("--framework") + 1] if "--framework" in argv else "torch"
        if (op, fw) in NOT_AVAILABLE:
            print(f"\n{NOT_AVAILABLE[(op, fw)]}")
            return 0
        print(f"\n--- implementation options ({IMPLEMENTATIONS[op][fw]}) ---")
        try:
            importlib.import_module(IMPLEMENTATIONS[op][fw]).main(["--help"])
        except SystemExit:
            pass
        return 0
    args, rest = p.parse_known_args(argv)
    if (op, args.framework) in NOT_AVAILABLE:
        print(f"{op} --framework {args.framework}: {NOT_AVAILABLE[(op, args.framework)]}")
        return 0
    cmd = command_line([f"benchmarks/{op}.py"] + argv)
    # quick runs are script checks: they go to out/ (ignored by git), never into benchmarks/results
    root = _env.REPO_ROOT / "out" / "bench" if args.quick and args.run_folder is None else None
    ctx = RunContext(suite=args.suite, commit=args.commit, command=cmd, results_root=root,
                     run_folder=args.run_folder)
    kind = f"{op}_{args.framework}"
    raw_path = ctx.suite_dir / "raw" / f"{kind}.json"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    impl_argv = list(rest) + (["--out", str(raw_path)] if "--out" not in rest else [])
    if args.quick:
        impl_argv.append(QUICK_FLAG[op])
    meta = {"op": op, "framework": args.framework, "suite": args.suite, "command": cmd, "impl_argv": impl_argv,
            "commit": ctx.commit, "gpu": ctx.gpu, "date": ctx.date, "telemetry_before": _env.telemetry()}
    t0 = time.time()
    mod = importlib.import_module(IMPLEMENTATIONS[op][args.framework])
    try:
        rc = mod.main(impl_argv)
    except SystemExit as e:  # the implementations exit with a message when the GPU is missing
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    rc = rc if isinstance(rc, int) else 0  # some implementations return their result dict
    meta.update(rc=rc, wall_s=time.time() - t0, telemetry_after=_env.telemetry(),
                software=_env.software("torch", "triton") if args.framework == "torch"
                else _env.software("jax", "jaxlib", "flax", "optax"))
    n_records = 0
    if raw_path.exists():
        raw = json.loads(raw_path.read_text())
        recs = convert(raw, kind, suite=args.suite, commit=ctx.commit, gpu=ctx.gpu, date=ctx.date, command=cmd)
        if args.quick:
            for r in recs:
                r.setdefault("extra", {})["quick"] = True  # a script check: report.py leaves these out
        out = ctx.suite_dir / f"{kind}.jsonl"
        if out.exists():
            out.unlink()  # one invocation = one file; a re-run replaces it
        write_records(recs, out)
        n_records = len(recs)
    meta["records"] = n_records
    (ctx.suite_dir / f"{kind}.meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(f"[{kind}] rc={rc}, {n_records} records -> {ctx.suite_dir}")
    return rc
