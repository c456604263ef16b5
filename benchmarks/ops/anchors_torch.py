#!/usr/bin/env python
"""Issue 18's anchors beside ours, in one process: QuACK's and Liger's cross-entropy and fused linear
cross-entropy against ``CGGRLoss`` topk, the in-place selective CE and the fused LM head.

    python benchmarks/ops/anchors_torch.py [--run-folder DIR] [--commit SHA] [--d 2048 4096] [--quick]

Shapes (issue 18): N = 16384 tokens, V = 128256, bfloat16; the linear rows at d = 2048 and 4096. Every row is
one forward + backward, timed by the harness (``benchmarks/harness/timing.py``) exactly as its neighbours: the
CE rows as ``benchmarks/ops/selective_ce_torch.py`` (CUDA events, 10 warm-up calls, ``--budget-ms`` of timed
calls, ``logits.grad`` reset outside the timed interval, two logit buffers used in turn), the linear rows as
``benchmarks/ops/fused_linear_torch.py`` (3 warm-up calls, ``--iters`` timed calls, the GPU drained before
each, ``∂hidden`` and ``∂weight`` by ``torch.autograd.grad``).

CE rows (``op = anchor_ce``), logits a leaf that requires grad as a model's output would:

* ``cggr_topk``                  - ``CGGRLoss(selection='topk', dynamic_threshold=False, min_tokens_ratio=0.25,
  warmup_steps=0)`` (the ``CGGRLoss topk`` row of the kernels suite);
* ``cggr_selective_inplace``     - the raw pipeline (scoring kernel → ``select_tokens`` → selective CE with
  ``inplace_backward=True``), ``loss.backward()``; ``…_grad``: the same through ``torch.autograd.grad``;
* ``quack_ce``                   - ``quack.cross_entropy.cross_entropy`` (autograd path);
* ``quack_ce_inplace``           - the same with ``inplace_backward=True``, ``loss.backward()`` (issue 18's
  5.31 ms: the gradient aliases the leaf, so autograd copies it into ``.grad``); ``quack_ce_inplace_grad``:
  through ``torch.autograd.grad``, which hands the aliased gradient back without that copy;
* ``liger_ce``                   - Liger-Kernel's cross-entropy (``load_liger`` of the selective CE benchmark;
  it writes the gradient into the logits during the forward);
* ``eager_ce``                   - ``F.cross_entropy``.

The in-place rows (Liger's included) overwrite their logits with the gradient: they run last, the buffers are
refilled before each of them, and their timed calls run on the previous call's gradients (the same work).

Linear rows (``op = anchor_linear_ce``), per d:

* ``cggr_fused``        - ``cggr_torch.fused_linear.fused_linear_cggr_loss`` (``fixed_quota``, ratio 0.25,
  ``warmup_steps=0``, default 0.25 GiB plan: the fused_linear benchmark's ``cggr_fused``);
* ``quack_linear_ce``   - ``quack.linear_cross_entropy.chunked_linear_cross_entropy`` (chunk 4096, 8192 at d = 4096
  where a square chunk GEMM is refused: :func:`quack_chunk_size`; its
  autotuned GEMMs; ``--quack-untuned``: ``tuned=False``);
* ``liger_flce``        - Liger's ``LigerFusedLinearCrossEntropyLoss``;
* ``torch_linear_ce``   - ``F.cross_entropy(F.linear(h, W).float(), t)``;
* ``matmul``            - one ``(N, d) × (d, V)`` GEMM: the FLOP unit (ratio ``one_matmul``).

QuACK's linear CE runs after every other linear row of both widths (its first call autotunes its GEMMs), and
the records are rewritten after every row, so a step cut at its timeout keeps what it measured.

An anchor that does not import is a record with ``status: skipped`` and the import error as its reason; one
that fails while running, ``status: failed`` with the error; ``benchmarks/report.py`` prints "not run: <reason>"
in its ratio lines. Each full-CE anchor's loss is checked against the float32 eager loss of the same inputs
(``loss_rel_err``); ``first_call_s`` is the first call's wall time (compilation, QuACK's autotuning). Ratios
of our rows: ``× quack_ce``, ``× liger_ce``, … (this row's median / the anchor's,
same process). Records: ``<run folder>/anchors/anchors_torch.jsonl``, the raw JSON under ``raw/``, the GPU's
clocks before and after in ``anchors_torch.meta.json``. QuACK needs the cutlass DSL, carried as wheels:
``benchmarks/ANCHORS.md``. ``--quick``: tiny shapes on CPU (our rows; the anchors are recorded as skipped
where they do not import or need CUDA) - a script check, the numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 2**30
CE_ROWS = ("cggr_topk", "quack_ce", "eager_ce", "liger_ce", "cggr_selective_inplace",
           "cggr_selective_inplace_grad", "quack_ce_inplace", "quack_ce_inplace_grad")
LINEAR_ROWS = ("cggr_fused", "quack_linear_ce", "liger_flce", "torch_linear_ce", "matmul")
#: our rows and the anchors their ratios are taken against (``benchmarks/report.py`` reads these names)
OURS = {"cggr_topk": ("quack_ce", "quack_ce_inplace", "quack_ce_inplace_grad", "liger_ce", "eager_ce"),
        "cggr_selective_inplace": ("quack_ce", "quack_ce_inplace", "liger_ce"),
        "cggr_selective_inplace_grad": ("quack_ce", "quack_ce_inplace_grad", "liger_ce"),
        "cggr_fused": ("quack_linear_ce", "liger_flce", "torch_linear_ce", "matmul")}
RATIO_NAME = {"matmul": "one_matmul"}
BASELINES = {"quack_ce", "quack_ce_inplace", "quack_ce_inplace_grad", "liger_ce", "eager_ce", "quack_linear_ce",
             "liger_flce", "torch_linear_ce", "matmul"}
PACKAGES = ("quack-kernels", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu12",
            "nvidia-cutlass-dsl-libs-cu13", "apache-tvm-ffi", "liger-kernel")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--d", type=int, nargs="+", default=[2048, 4096], help="hidden sizes of the linear rows")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25, help="CGGR selection ratio")
    ap.add_argument("--budget-ms", type=int, default=200, help="timed calls of a CE row (ms)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls of a linear row")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    ap.add_argument("--quack-untuned", action="store_true",
                    help="QuACK's linear CE with tuned=False (its default GEMM configs, no autotuning at the first "
                         "call) when the autotuned first call does not fit the device call")
    ap.add_argument("--run-folder", type=Path, default=None,
                    help="default benchmarks/results/<gpu>/<date>_<commit> (--quick: out/bench/...)")
    ap.add_argument("--commit", default=None, help="commit of the figures (default $CGGR_COMMIT or git)")
    ap.add_argument("--quick", "--smoke", action="store_true", help="tiny shapes on CPU (script check only)")
    args = ap.parse_args(argv)
    for name in ("n", "vocab", "budget_ms", "iters"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if any(d <= 0 for d in args.d):
        ap.error(f"--d: expected positive hidden sizes, got {args.d}")
    if not 0.0 < args.ratio <= 1.0:
        ap.error(f"--ratio: expected a fraction in (0, 1], got {args.ratio}")
    if args.rows is not None:
        unknown = sorted(set(args.rows.split(",")) - set(CE_ROWS) - set(LINEAR_ROWS))
        if unknown:
            ap.error(f"--rows: unknown rows {unknown}; expected names among {CE_ROWS + LINEAR_ROWS}")
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: our kernels interpreted
        args.n, args.vocab, args.d, args.budget_ms, args.iters = 24, 300, [16], 1, 1
    return args


def versions() -> dict[str, str]:
    """Installed versions of the anchors' packages (metadata only: nothing imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:600]


def load_quack_ce() -> tuple[Optional[Callable[..., Any]], str]:
    """QuACK's ``cross_entropy(x, target, inplace_backward=...)``, or None and the import error."""
    try:
        from quack.cross_entropy import cross_entropy
    except Exception as err:  # noqa: BLE001 - any import problem means "not available here", with the reason
        return None, f"quack.cross_entropy not importable ({_why(err)})"
    return cross_entropy, "quack.cross_entropy.cross_entropy"


def load_quack_linear_ce() -> tuple[Optional[Callable[..., Any]], str]:
    """QuACK's ``chunked_linear_cross_entropy(x, weight, target, chunk_size=...)`` (every release since 0.2
    has it), or None and the import error (issue 18: with quack-kernels 0.6.5 installed outside a
    ``site-packages`` folder it fails at import; ``benchmarks/harness/wheels.py`` says why)."""
    try:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        return None, f"quack.linear_cross_entropy not importable ({_why(err)})"
    return chunked_linear_cross_entropy, "quack.linear_cross_entropy.chunked_linear_cross_entropy"


#: QuACK's own default chunk of rows per GEMM.
QUACK_CHUNK = 4096


def quack_chunk_size(d: int, chunk: int = QUACK_CHUNK) -> int:
    """The ``chunk_size`` for QuACK's linear CE at hidden size ``d``: its default, doubled when it equals ``d``.

    quack-kernels 0.6.5 infers a row/column vector operand of its GEMM epilogue from the shapes and refuses a
    square chunk GEMM (H200, 2026-12-03, d = 4096, chunk 4096: "operand 'v': m == n makes row/col inference
    ambiguous"); a chunk of 8192 rows keeps the same kernels with unequal sides."""
    return 2 * chunk if chunk == d else chunk


def load_liger_flce() -> tuple[Optional[Callable[..., Any]], str]:
    """Liger's fused linear cross-entropy as ``fn(hidden, weight, target) -> loss``, or None and the reason."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as err:  # noqa: BLE001
        return None, f"liger_kernel not importable ({_why(err)})"
    mod = LigerFusedLinearCrossEntropyLoss()

    def run(h: Any, w: Any, t: Any) -> Any:
        loss = mod(w, h, t)
        return loss[0] if isinstance(loss, tuple) else loss
    return run, "liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    import torch
    import torch.nn.functional as F

    from benchmarks.harness import compat, env as henv, measure
    from benchmarks.harness.records import RunContext, command_line, write_records
    from benchmarks.ops.selective_ce_torch import load_liger
    from cggr_torch import CGGRLoss, select_tokens
    from cggr_torch.fused_linear import fused_linear_cggr_loss

    cuda = torch.cuda.is_available() and not args.quick
    if not args.quick:
        if not cuda:
            sys.exit("error: this benchmark needs a CUDA GPU; use --quick to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    N, V = args.n, args.vocab
    wanted = None if args.rows is None else set(args.rows.split(","))
    cmd = command_line(["benchmarks/ops/anchors_torch.py"] + argv)
    root = Path(ROOT) / "out" / "bench" if args.quick and args.run_folder is None else None
    ctx = RunContext(suite="anchors", commit=args.commit, command=cmd, results_root=root,
                     run_folder=args.run_folder)
    meta: dict[str, Any] = {"op": "anchors", "framework": "torch", "suite": "anchors", "command": cmd,
                            "commit": ctx.commit, "gpu": ctx.gpu, "date": ctx.date,
                            "telemetry_before": henv.telemetry()}
    t_start = time.time()
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "packages": versions(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# anchors (fwd+bwd) - {env['device']}, torch {env['torch']}, N={N}, V={V}, d={args.d}, {args.dtype}")
    print("# " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))

    quack_ce, quack_ce_note = load_quack_ce()
    quack_lce, quack_lce_note = load_quack_linear_ce()
    liger_ce, liger_ce_note = load_liger()
    liger_flce, liger_flce_note = load_liger_flce()
    rows: list[dict[str, Any]] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def flush(final: bool = False) -> list[dict[str, Any]]:
        """Write the raw JSON, the records and the meta file of the rows so far (after every row: a step killed
        at its timeout keeps what it measured; ``rc`` stays null until the end)."""
        records = to_records(rows, ctx, dtype=args.dtype, quick=args.quick, packages=env["packages"],
                             ratio=args.ratio)
        out_dir = ctx.suite_dir
        (out_dir / "raw").mkdir(parents=True, exist_ok=True)
        raw = {"benchmark": "anchors_torch", "env": env, "complete": final, "rows": rows,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        (out_dir / "raw" / "anchors_torch.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
        rec_path = out_dir / "anchors_torch.jsonl"
        if rec_path.exists():
            rec_path.unlink()  # one invocation = one file; a re-run (or the next flush) replaces it
        write_records(records, rec_path)
        meta.update(rc=0 if final else None, wall_s=time.time() - t_start, records=len(records),
                    software=dict(env["packages"], torch=torch.__version__))
        if final:
            meta["telemetry_after"] = henv.telemetry()
        (out_dir / "anchors_torch.meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return records

    def skip(group: str, name: str, reason: str, **shape: Any) -> None:
        rows.append({"group": group, "name": name, "status": "skipped", "reason": reason, **shape})
        print(f"| {name} | skipped: {reason} |")
        flush()

    # ------------------------------------------------------------------------------------------------ CE
    ks, kce = compat.torch_scoring_kernels(), compat.torch_cross_entropy_kernels()
    ratio_t = torch.tensor(args.ratio, dtype=torch.float32, device=dev)
    crit = CGGRLoss(selection="topk", dynamic_threshold=False, min_tokens_ratio=args.ratio, warmup_steps=0)

    def cggr_selective(x: torch.Tensor, t: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.no_grad():
            sc = ks.score_tokens_triton(x.detach(), t)
            mask, _k = select_tokens(sc.difficulty, sc.eligible, ratio_t)
        loss = kce.selective_cross_entropy_triton(x, t, mask, lse=sc.stats.lse, inplace_backward=True)
        torch.autograd.grad(loss, x) if grad else loss.backward()
        return loss.detach()

    def backward(loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        return loss.detach()

    def grad_only(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        torch.autograd.grad(loss, x)
        return loss.detach()

    # name -> (fn(x, t) -> loss after its backward, in place?, reason it cannot run or None, implementation)
    ce_rows: dict[str, tuple[Callable[..., Any], bool, Optional[str], str]] = {
        "cggr_topk": (lambda x, t: backward(crit(x, t)), False, None, "cggr_torch.CGGRLoss(selection='topk')"),
        "quack_ce": (lambda x, t: backward(quack_ce(x, t)), False, None if quack_ce else quack_ce_note,
                     quack_ce_note),
        "liger_ce": (lambda x, t: backward(liger_ce(x, t)), True, None if liger_ce else liger_ce_note,
                     liger_ce_note),
        "eager_ce": (lambda x, t: backward(F.cross_entropy(x, t)), False, None, "torch.nn.functional.cross_entropy"),
        "cggr_selective_inplace": (lambda x, t: cggr_selective(x, t, False), True, None,
                                   "score_tokens_triton -> select_tokens -> selective_cross_entropy_triton("
                                   "inplace_backward=True), loss.backward()"),
        "cggr_selective_inplace_grad": (lambda x, t: cggr_selective(x, t, True), True, None,
                                        "the same through torch.autograd.grad"),
        "quack_ce_inplace": (lambda x, t: backward(quack_ce(x, t, inplace_backward=True)), True,
                             None if quack_ce else quack_ce_note, quack_ce_note + "(inplace_backward=True)"),
        "quack_ce_inplace_grad": (lambda x, t: grad_only(quack_ce(x, t, inplace_backward=True), x), True,
                                  None if quack_ce else quack_ce_note,
                                  quack_ce_note + "(inplace_backward=True) through torch.autograd.grad"),
    }
    for name in ("quack_ce", "liger_ce", "quack_ce_inplace", "quack_ce_inplace_grad"):
        fn, inplace, why, impl = ce_rows[name]
        if why is None and not cuda:
            ce_rows[name] = (fn, inplace, "needs CUDA (imported, not run: --quick on CPU)", impl)
    ce_rows = {k: v for k, v in ce_rows.items() if wanted is None or k in wanted}
    gen = torch.Generator(device=dev).manual_seed(0)
    n_buf = 2
    bufs: list[torch.Tensor] = []
    tgts = [torch.randint(0, V, (N,), generator=gen, device=dev) for _ in range(n_buf)]

    def fill() -> None:
        """(Re)fill the logit buffers: 3·N(0, 1) logits, made in blocks of 2048 rows (no float32 N×V copy)."""
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            for x in bufs:
                for s in range(0, N, 2048):
                    x[s:s + 2048] = (3.0 * torch.randn((min(2048, N - s), V), generator=g, device=dev)).to(dtype)
                x.grad = None

    if ce_rows:
        bufs = [torch.empty((N, V), dtype=dtype, device=dev).requires_grad_(True) for _ in range(n_buf)]
        fill()
        with torch.no_grad():  # the loss check's reference: float32 eager CE of buffer 0, in row blocks
            ref0 = sum(F.cross_entropy(bufs[0][s:s + 2048].float(), tgts[0][s:s + 2048], reduction="sum")
                       for s in range(0, N, 2048)) / N
        print(f"\n## CE: N={N}, V={V}, {args.dtype} (logits {N * V * bufs[0].element_size() / 1e9:.2f} GB)\n")
        print("| row | median ms | p10 | p90 | peak extra GiB | loss rel err |\n|---|---:|---:|---:|---:|---:|")
        turn = [0]
        for name, (fn, inplace, why, impl) in ce_rows.items():
            if why is not None:
                skip("ce", name, why, n=N, vocab=V)
                continue
            if inplace:
                fill()

            def call(fn: Callable[..., Any] = fn) -> Any:
                i = turn[0] % n_buf
                turn[0] += 1
                return fn(bufs[i], tgts[i])

            def reset() -> None:
                for b in bufs:
                    b.grad = None
            try:
                t0 = time.perf_counter()
                loss0 = fn(bufs[0], tgts[0])  # first call: compiles, and the loss check on fresh logits
                sync()
                first_s = time.perf_counter() - t0
                err = None if name.startswith("cggr") else float((loss0.float() - ref0).abs() / ref0.abs().clamp_min(1))
                reset()
                if args.quick:
                    t = measure(call, framework="torch", device=dev.type, warmup=0, reps=1, before_each=reset)
                else:
                    t = measure(call, framework="torch", device=dev.type, warmup=10, budget_ms=args.budget_ms,
                                before_each=reset)
                reset()
                peak = None
                if cuda:
                    sync()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    call()
                    sync()
                    peak = (torch.cuda.max_memory_allocated() - base) / GIB
                    reset()
            except Exception as e:  # noqa: BLE001 - an anchor that fails is reported, not fatal
                rows.append({"group": "ce", "name": name, "status": "failed", "reason": _why(e), "n": N, "vocab": V,
                             "implementation": impl})
                print(f"| {name} | failed: {_why(e)[:200]} |")
                flush()
                reset()
                if cuda:
                    torch.cuda.empty_cache()
                continue
            r = {"group": "ce", "name": name, "status": "ok", "n": N, "vocab": V, "implementation": impl,
                 "inplace": inplace, **t.as_dict(), "peak_extra_gib": peak, "loss_rel_err": err,
                 "first_call_s": first_s}
            rows.append(r)
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"| {name} | {t.median_ms:.3f} | {t.p10_ms:.3f} | {t.p90_ms:.3f} | {fmt(peak, '.2f')} | "
                  f"{fmt(err, '.1e')} |")
            flush()
        del bufs
        if cuda:
            torch.cuda.empty_cache()

    # --------------------------------------------------------------------------------------------- linear
    lin_wanted = [r for r in LINEAR_ROWS if wanted is None or r in wanted]
    quack_kw = {"tuned": False} if args.quack_untuned else {}
    if args.quack_untuned:
        quack_lce_note += "(tuned=False)"
    def linear_rows(d: int, names: Sequence[str]) -> None:
        g = torch.Generator(device=dev).manual_seed(d)  # the same inputs in each phase
        temps = torch.empty(N, 1, device=dev).uniform_(0.3, 3.0, generator=g)
        hidden = (torch.randn(N, d, generator=g, device=dev) * temps).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, d, generator=g, device=dev) * (1.5 / d**0.5)).to(dtype).requires_grad_(True)
        labels = torch.randint(0, V, (N,), generator=g, device=dev)
        with torch.no_grad():
            ref = sum(F.cross_entropy(F.linear(hidden[s:s + 2048], weight).float(), labels[s:s + 2048],
                                      reduction="sum") for s in range(0, N, 2048)) / N

        def with_grads(loss_fn: Callable[[], Any]) -> Callable[[], tuple]:
            def run() -> tuple:
                loss = loss_fn()
                return (loss.detach(),) + torch.autograd.grad(loss, (hidden, weight))
            return run

        def matmul() -> tuple:
            with torch.no_grad():
                return (hidden @ weight.t(),)

        lin: dict[str, tuple[Optional[Callable[[], tuple]], Optional[str], str]] = {
            "cggr_fused": (with_grads(lambda: fused_linear_cggr_loss(
                hidden, weight, labels, 0, selection="fixed_quota", warmup_steps=0,
                min_tokens_ratio=args.ratio)[0]), None, "cggr_torch.fused_linear.fused_linear_cggr_loss"),
            "quack_linear_ce": (with_grads(lambda: quack_lce(
                hidden, weight, labels, chunk_size=quack_chunk_size(d), **quack_kw)) if quack_lce
                                else None,
                                None if quack_lce else quack_lce_note,
                                f"{quack_lce_note} (chunk_size={quack_chunk_size(d)})"),
            "liger_flce": (with_grads(lambda: liger_flce(hidden, weight, labels)) if liger_flce else None,
                           None if liger_flce else liger_flce_note, liger_flce_note),
            "torch_linear_ce": (with_grads(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels)), None,
                                "F.cross_entropy(F.linear(h, W).float(), t)"),
            "matmul": (matmul, None, "hidden @ weight.t()"),
        }
        for name in ("quack_linear_ce", "liger_flce"):
            fn, why, impl = lin[name]
            if why is None and not cuda:
                lin[name] = (fn, "needs CUDA (imported, not run: --quick on CPU)", impl)
        print(f"\n## linear CE: N={N}, d={d}, V={V}, {args.dtype}\n")
        print("| row | median ms | p10 | p90 | peak extra GiB | loss rel err |\n|---|---:|---:|---:|---:|---:|")
        for name in names:
            fn, why, impl = lin[name]
            if why is not None or fn is None:
                skip("linear_ce", name, why or "not available", n=N, vocab=V, d=d)
                continue
            try:
                t0 = time.perf_counter()
                out = fn()  # first call: compiles (QuACK: autotunes its GEMMs); the loss check
                sync()
                first_s = time.perf_counter() - t0
                err = (float((out[0].float() - ref).abs() / ref.abs().clamp_min(1))
                       if name in ("quack_linear_ce", "liger_flce", "torch_linear_ce") else None)
                del out
                for _ in range(0 if args.quick else 2):
                    fn()
                sync()
                peak = None
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = fn()
                    sync()
                    peak = (torch.cuda.max_memory_allocated() - base) / GIB
                    del out
                t = measure(fn, framework="torch", device=dev.type, warmup=0, reps=args.iters, before_each=sync)
            except Exception as e:  # noqa: BLE001
                rows.append({"group": "linear_ce", "name": name, "status": "failed", "reason": _why(e), "n": N,
                             "vocab": V, "d": d, "implementation": impl})
                print(f"| {name} | failed: {_why(e)[:200]} |")
                if cuda:
                    torch.cuda.empty_cache()
                flush()
                continue
            rows.append({"group": "linear_ce", "name": name, "status": "ok", "n": N, "vocab": V, "d": d,
                         "implementation": impl, **t.as_dict(), "peak_extra_gib": peak, "loss_rel_err": err,
                         "first_call_s": first_s})
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"| {name} | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | {fmt(peak, '.3f')} | "
                  f"{fmt(err, '.1e')} |")
            flush()
        del hidden, weight, labels
        if cuda:
            torch.cuda.empty_cache()

    # QuACK's linear CE last, after every other row of both widths: its first call autotunes GEMMs (compiles in
    # worker processes) for a time not known in advance, and a step cut at its timeout keeps what came before.
    phases = ([r for r in lin_wanted if r != "quack_linear_ce"], [r for r in lin_wanted if r == "quack_linear_ce"])
    for names in phases:
        for d in args.d if names else []:
            linear_rows(d, names)

    records = flush(final=True)
    print("\nSUMMARY (same process; × = our median / the anchor's)")
    for line in summary(records):
        print(line)
    print(f"[anchors_torch] {len(records)} records -> {ctx.suite_dir / 'anchors_torch.jsonl'}")
    return 0


def to_records(rows: list[dict[str, Any]], ctx: Any, *, dtype: str, quick: bool, packages: dict[str, str],
               ratio: float) -> list[dict[str, Any]]:
    """One record per row: ``op`` ``anchor_ce`` / ``anchor_linear_ce``; metrics the harness timing (median,
    quantiles, IQR), ``peak_extra_gib``, ``loss_rel_err``, ``input_tokens_per_s`` (and ``trained_tokens_per_s``
    for our selective rows); ratios of our rows against every anchor of the same group and ``d`` that ran;
    ``extra.status`` ``ok`` / ``skipped`` / ``failed`` with ``reason``."""
    from benchmarks.harness.timing import ratios as ratios_of
    from benchmarks.harness.timing import throughput

    ms = {(r["group"], r.get("d"), r["name"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    out = []
    for r in rows:
        group, d, name = r["group"], r.get("d"), r["name"]
        shape = {"n": r["n"], "vocab": r["vocab"]} | ({"d": d} if d is not None else {})
        extra: dict[str, Any] = {"status": r["status"], "row": name, "packages": packages}
        if r.get("implementation"):
            extra["implementation"] = r["implementation"]
        if quick:
            extra["quick"] = True  # a script check: report.py leaves these out
        if r["status"] != "ok":
            extra["reason"] = r["reason"]
            metrics: dict[str, Any] = {r["status"]: 1.0}
            rat: dict[str, float] = {}
        else:
            metrics = {k: r[k] for k in ("median_ms", "p25_ms", "p75_ms", "p10_ms", "p90_ms", "min_ms", "iqr_ms",
                                         "reps") if r.get(k) is not None}
            for k in ("peak_extra_gib", "loss_rel_err", "first_call_s"):
                if r.get(k) is not None:
                    metrics[k] = r[k]
            selective = name.startswith("cggr")
            metrics.update(throughput(r["median_ms"], input_tokens=r["n"],
                                      trained_tokens=r["n"] * ratio if selective else None))
            rat = ratios_of(r["median_ms"], {RATIO_NAME.get(b, b): ms.get((group, d, b)) for b in OURS.get(name, ())})
            extra["method"] = "harness measure: " + str(r.get("method"))
        out.append(ctx.record(op=f"anchor_{group}", framework="torch", case=name, shape=shape, dtype=dtype,
                              metrics=metrics, ratios=rat, baseline=name in BASELINES, extra=extra))
    return out


def summary(records: list[dict[str, Any]]) -> list[str]:
    """One line per ratio of our rows (``not run: <reason>`` for an anchor that did not run)."""
    by = {(r["op"], r["shape"].get("d"), r["case"]): r for r in records}
    lines = []
    for (op, d, case), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        if case not in OURS:
            continue
        where = f" (d={d})" if d is not None else ""
        if r["extra"]["status"] != "ok":
            lines.append(f"{case}{where}: not run: {r['extra'].get('reason')}")
            continue
        parts = []
        for b in OURS[case]:
            a = by.get((op, d, b))
            if a is None:
                continue
            name = RATIO_NAME.get(b, b)
            if a["extra"]["status"] != "ok":
                parts.append(f"× {b}: not run: {str(a['extra'].get('reason'))[:160]}")
            elif name in r["ratios"]:
                parts.append(f"× {b} {r['ratios'][name]:.2f} ({a['metrics']['median_ms']:.2f} ms)")
        lines.append(f"{case}{where} {r['metrics']['median_ms']:.3f} ms: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
