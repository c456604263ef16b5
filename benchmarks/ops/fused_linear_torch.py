#!/usr/bin/env python
"""Benchmark the fused LM head + CGGR selective cross-entropy (``cggr_torch.fused_linear``) on a GPU.

Shape (default): ``N = 16384`` tokens, ``d = 2048``, ``V = 128256``, bfloat16 hidden states and weight, ratio
0.25 (``selection='fixed_quota'``, ``warmup_steps=0``: exactly ``k = N/4`` rows, no dynamic threshold).
Every method runs forward + backward to ``∂hidden`` and ``∂weight`` (``torch.autograd.grad``):

* ``cggr_fused``          - :func:`cggr_torch.fused_linear.fused_linear_cggr_loss` (default 0.25 GiB plan);
  ``cggr_fused[B=…]`` - the same with other ``memory_budget_bytes`` (``--budgets``);
* ``cggr_fused[elementwise-grad]`` - the backward's chunk gradient with PyTorch element-wise ops instead of
  the in-place Triton kernel (the pre-kernel implementation, for comparison);
* ``cggr_fused forward only`` - the forward alone under ``no_grad`` (the backward is the difference);
* ``cggr_fused[head_kernel=gemm]``, ``cggr_fused forward only [head_kernel=gemm]`` - the same with the CGGR work
  in Triton GEMM epilogues (``cggr_torch.kernels.fused_head_gemm``: split-V forward statistics, the backward's
  chunk gradient written by its GEMM), beside today's ``head_kernel="blocks"`` rows above, so that one run
  decides the default (DECISIONS.md: gemm-epilogue-head); ``diag: gemm-epilogue ...`` rows time its two
  kernels alone with the default tile shape and (``--gemm-sweep``: ~10 more Triton compilations, beyond the
  runner's step budget) every tile shape of ``HEAD_GEMM_CONFIGS`` and several split counts;
* ``cggr_materialised``   - ``cggr_loss(F.linear(h, W), t)``: full logits, then the CGGR loss (Triton kernels);
* ``torch_linear_ce``     - ``F.cross_entropy(F.linear(h, W).float(), t)``: plain full cross-entropy;
* ``liger_flce``          - Liger's ``LigerFusedLinearCrossEntropyLoss`` (full gradient), if importable;
* ``cce``                 - Apple's ``cut_cross_entropy.linear_cross_entropy`` (full gradient), if importable;
* ``matmul``              - one ``(N, d) × (d, V)`` GEMM: the FLOP unit (the fused loss needs ≈ 1 + 3·0.25 = 1.75
  of them; full-gradient fused kernels 3).

Columns: median / p10 / p90 time (ms, CUDA events, after warm-up), ``peak_extra`` = ``max_memory_allocated``
during the call minus the memory allocated before it (inputs), ``working`` = ``peak_extra`` minus the
gradients the call returns (``∂h``: ``N·d``, ``∂W``: ``V·d`` elements, the unavoidable outputs), ``vs_liger`` =
time / Liger's time. The goal: ``cggr_fused`` ≤ 0.5 × Liger's time with ``working`` ≤ 0.25 GiB.
``check`` compares ``cggr_fused`` with ``cggr_materialised`` (same selection): loss difference and the largest
gradient error relative to the largest gradient entry.

Run on the H200 from the repository root::

    python benchmarks/fused_linear.py --framework torch --out bench_fused_linear_torch.json

``--quick`` runs tiny shapes on CPU (checks the script; numbers mean nothing).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

GIB = 2**30
DTYPES = ("bf16", "fp16", "fp32")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens N")
    ap.add_argument("--d", type=int, default=2048, help="hidden size d")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary V")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of tokens selected (fixed_quota)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.125, 0.5],
                    help="extra memory_budget_bytes values to time, in GiB (the default 0.25 is always timed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods to run")
    ap.add_argument("--out", default="bench_fused_linear_torch.json", help="JSON output path")
    ap.add_argument("--forward-columns", type=int, nargs="*", default=[],
                    help="extra forward-only runs with these vocabulary block widths (vocab_chunk_size)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler kernel breakdown (CUDA)")
    ap.add_argument("--gemm-sweep", action="store_true",
                    help="also time the GEMM-epilogue kernels alone for every candidate tile shape and split count")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (script check only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.d, args.vocab, args.warmup, args.iters, args.budgets = 300, 64, 1001, 1, 2, [0.0001]
    return args


def environment(torch: Any) -> dict[str, Any]:
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "cuda": torch.version.cuda, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import torch.nn.functional as F

    from benchmarks.harness import compat, measure
    from cggr_torch import cggr_loss

    fl = compat.torch_fused_linear_module()  # the diagnostics patch / call its internals (see compat.py)
    fused_linear_cggr = fl.fused_linear_cggr
    plan_chunks = compat.torch_plan_chunks
    DEFAULT_MEMORY_BUDGET = compat.torch_default_memory_budget()

    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    N, d, V = args.n, args.d, args.vocab
    g = torch.Generator(device="cpu").manual_seed(0)
    temps = torch.empty(N, 1).uniform_(0.3, 3.0, generator=g)
    hidden = (torch.randn(N, d, generator=g) * temps).to(dev, dtype).requires_grad_(True)
    weight = (torch.randn(V, d, generator=g) * (1.5 / d**0.5)).to(dev, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).to(dev)
    cfg = dict(selection="fixed_quota", warmup_steps=0, min_tokens_ratio=args.ratio)

    # head_kernel (issue 18): "blocks" is today's path and the default of "auto"; older commits lack it.
    import inspect
    has_head_kernel = "head_kernel" in inspect.signature(fused_linear_cggr).parameters

    def fused(budget: int, **extra: Any) -> Callable[[], tuple]:
        def run() -> tuple:
            loss = fused_linear_cggr(hidden, weight, labels, 0, memory_budget_bytes=budget, **cfg, **extra).loss
            return (loss,) + torch.autograd.grad(loss, (hidden, weight))
        return run

    def fused_rows(budget: int, rows: int) -> Callable[[], tuple]:
        """The fused loss with the forward in blocks of ``rows`` whole rows (the pre-chunked forward)."""
        def run() -> tuple:
            loss = fused_linear_cggr(hidden, weight, labels, 0, memory_budget_bytes=budget, row_chunk_size=rows,
                                     **cfg).loss
            return (loss,) + torch.autograd.grad(loss, (hidden, weight))
        return run

    def variant(run: Callable[[], tuple]) -> Callable[[], tuple]:
        """``run`` with the element-wise PyTorch chunk gradient instead of the Triton pass."""
        def patched() -> tuple:
            with compat.torch_fused_without_gradient_kernel():
                return run()
        return patched

    def fused_forward_only(cols: Optional[int] = None, **extra: Any) -> Callable[[], tuple]:
        def run() -> tuple:
            with torch.no_grad():
                return (fused_linear_cggr(hidden, weight, labels, 0, vocab_chunk_size=cols, **cfg, **extra).loss,)
        return run

    def materialised() -> tuple:
        loss, _ = cggr_loss(F.linear(hidden, weight), labels, 0, **cfg)
        return (loss,) + torch.autograd.grad(loss, (hidden, weight))

    def full_ce() -> tuple:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
        return (loss,) + torch.autograd.grad(loss, (hidden, weight))

    def matmul() -> tuple:
        with torch.no_grad():
            return (hidden @ weight.t(),)

    notes: dict[str, str] = {}
    methods: dict[str, Callable[[], tuple]] = {"cggr_fused": fused(DEFAULT_MEMORY_BUDGET)}
    for b in args.budgets:
        methods[f"cggr_fused[B={b:g}GiB]"] = fused(max(1, int(b * GIB)))
    # Variant of the default plan: the PyTorch element-wise chunk gradient instead of the in-place Triton kernel.
    methods["cggr_fused[elementwise-grad]"] = variant(fused(DEFAULT_MEMORY_BUDGET))
    methods["cggr_fused forward only"] = fused_forward_only()
    if has_head_kernel:
        methods["cggr_fused[head_kernel=gemm]"] = fused(DEFAULT_MEMORY_BUDGET, head_kernel="gemm")
        methods["cggr_fused forward only [head_kernel=gemm]"] = fused_forward_only(head_kernel="gemm")
    else:
        notes["cggr_fused[head_kernel=gemm]"] = "this commit has no head_kernel argument"
    for cols in args.forward_columns:
        methods[f"cggr_fused forward only [{cols} columns]"] = fused_forward_only(cols)
    methods["cggr_materialised"] = materialised
    methods["torch_linear_ce"] = full_ce
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_run() -> tuple:
            loss = liger(weight, hidden, labels)
            loss = loss[0] if isinstance(loss, tuple) else loss
            return (loss,) + torch.autograd.grad(loss, (hidden, weight))
        if cuda:
            methods["liger_flce"] = liger_run
        else:
            notes["liger_flce"] = "needs CUDA"
    except ImportError as err:
        notes["liger_flce"] = f"not importable ({err})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_run() -> tuple:
            loss = linear_cross_entropy(hidden, weight, labels)
            return (loss,) + torch.autograd.grad(loss, (hidden, weight))
        if cuda:
            methods["cce"] = cce_run
        else:
            notes["cce"] = "needs CUDA"
    except ImportError as err:
        notes["cce"] = f"not importable ({err})"
    methods["matmul"] = matmul

    # Diagnostics of the forward: the blockwise GEMMs alone (no statistics), by row blocks as the previous plan
    # (896 rows of the whole vocabulary) and by vocabulary blocks of all rows (the plan's width and others) -
    # how much of the forward is GEMM shape - and the statistics launches alone over the plan's blocks.
    def gemm_rows(rows: int) -> Callable[[], tuple]:
        def run() -> tuple:
            with torch.no_grad():
                last = None
                for r0 in range(0, N, rows):
                    last = F.linear(hidden[r0:r0 + rows], weight)
                    del last
                return (hidden[:1].sum(),)
        return run

    def gemm_vocab(cols: int) -> Callable[[], tuple]:
        def run() -> tuple:
            with torch.no_grad():
                for v0 in range(0, V, cols):
                    z = F.linear(hidden, weight[v0:v0 + cols])
                    del z
                return (hidden[:1].sum(),)
        return run

    def stats_chunks(cols: int, warps: Optional[int], **change: Any) -> Callable[[], tuple]:
        """The forward's chunked statistics launches alone over the ceil(V / cols) blocks of all N rows, read
        from one (N, cols) logits buffer: the default launch (warps None) or ``warps`` warps per row, with
        other LaunchConfig fields changed by ``change``."""
        import dataclasses
        ks, launch = compat.torch_scoring_kernels(), compat.torch_launch()
        with torch.no_grad():
            z = F.linear(hidden, weight[:cols])
        state = torch.empty((launch.CHUNK_STATE_ROWS, N), dtype=torch.float32, device=dev)
        out = torch.empty((6, N), dtype=torch.float32, device=dev)
        fin = torch.empty((N,), dtype=torch.int8, device=dev)
        t = labels.contiguous()
        if warps is None:
            cfg = launch.scoring_config_for_rows(N, cols, dtype, launch.num_sms(z))
        else:
            base = launch.scoring_config(cols, dtype)
            cfg = dataclasses.replace(base, rows=min(128 * warps, compat.torch_next_pow2(cols) // base.group),
                                      num_warps=warps)
        cfg = dataclasses.replace(cfg, **change)

        def run() -> tuple:
            for v0 in range(0, V, cols):
                w = min(cols, V - v0)
                ks.launch_scoring_chunk(z[:, :w], t, -100, v0, V, state, out, fin, cfg)
            return (out[0, :1].sum(),)
        run.describe = cfg.describe()  # type: ignore[attr-defined]
        return run

    def profile_breakdown(fn: Callable[[], tuple], label: str) -> None:
        """CUDA kernel time per kernel name over 3 calls (torch.profiler), printed as a table."""
        from torch.profiler import ProfilerActivity, profile
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"\n#### profile: {label} (3 calls; CUDA time per kernel)\n")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
        # The GPU timeline: busy time against the span of the three calls, and the longest idle gaps with
        # the kernels on either side (host-bound stretches show up here, not in the per-kernel table).
        from torch.autograd import DeviceType
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
        if spans:
            busy, gaps, cur_end, prev = 0.0, [], spans[0][0], spans[0][2]
            for start, end, name in spans:
                if start > cur_end:
                    gaps.append((start - cur_end, prev[:60], name[:60]))
                busy += max(0.0, end - max(start, cur_end))
                if end > cur_end:
                    cur_end, prev = end, name
            span = cur_end - spans[0][0]
            print(f"GPU timeline of the 3 calls: span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle "
                  f"{(span - busy) / 1e3:.2f} ms in {len(gaps)} gaps; the longest:")
            for gap, before, after in sorted(gaps, reverse=True)[:12]:
                print(f"  {gap:8.1f} us  after {before}  before {after}")

    plan_now = plan_chunks(N, d, V, dtype)
    c_plan = plan_now.forward_vocab_chunk
    if c_plan < V and plan_now.row_chunk == N:
        methods[f"cggr_fused[896-row blocks]"] = fused_rows(DEFAULT_MEMORY_BUDGET, 896)
    methods["diag: forward GEMMs, 896-row blocks"] = gemm_rows(896)
    methods["diag: forward GEMMs, 1792-row blocks"] = gemm_rows(1792)
    for cols in sorted({c_plan, 4096, 6144, 8192, 16384}):
        methods[f"diag: forward GEMMs, {cols}-column blocks"] = gemm_vocab(cols)
    if cuda and c_plan < V:
        for warps, change in ((None, {}), (2, {}), (None, dict(rows=64)), (None, dict(evict="evict_first")),
                              (None, dict(lazy_top2=False))):
            fn = stats_chunks(c_plan, warps, **change)
            label = "default" if warps is None and not change else "variant"
            methods[f"diag: chunked statistics only, {-(-V // c_plan)}x {N}x{c_plan}, {label} "
                    f"({fn.describe})"] = fn

    # Floors of the parts that move memory, and the backward's GEMMs alone (same shapes as the plan's).
    def copy_blocks(rows: int, cols: int, blocks: int) -> Callable[[], tuple]:
        """``blocks`` copies of a (rows, cols) buffer: each reads and writes rows·cols elements once."""
        src = torch.empty((rows, cols), dtype=dtype, device=dev).normal_()
        dst = torch.empty_like(src)

        def run() -> tuple:
            for _ in range(blocks):
                dst.copy_(src)
            return (dst[:1, :1].float().sum(),)
        return run

    k_sel = round(args.ratio * N)
    methods[f"diag: copy N x V in {-(-V // c_plan)} blocks (statistics read floor = half)"] = \
        copy_blocks(N, c_plan, -(-V // c_plan))
    methods["diag: copy K x V once (in-place gradient pass floor)"] = copy_blocks(k_sel, V, 1)

    def backward_gemms() -> tuple:
        with torch.no_grad():
            bplan = plan_chunks(N, d, V, dtype, selected_rows=k_sel,
                                gradient_kernel=compat.torch_fused_gradient_kernel(hidden) is not None,
                                inplace_accumulation=compat.torch_fused_accumulates_in_place(dev, dtype))
            h_sel = hidden[:k_sel]
            acc = torch.zeros((k_sel, d), dtype=torch.float32, device=dev)
            gw = torch.empty_like(weight)
            for v0 in range(0, V, bplan.vocab_chunk):
                w_c = weight[v0:v0 + bplan.vocab_chunk]
                z = F.linear(h_sel, w_c)
                acc = compat.torch_fused_accumulate_matmul(acc, z, w_c)
                torch.mm(z.t(), h_sel, out=gw[v0:v0 + bplan.vocab_chunk])
                del z
            return (acc[:1, :1].sum(),)
    methods["diag: backward GEMMs alone (recompute, dh, dW over the plan's chunks)"] = backward_gemms

    # The GEMM-epilogue kernels alone (issue 18): the forward statistics over all N rows (no logits buffer)
    # for each candidate tile shape and several split counts, and the backward's chunk gradient over the
    # K selected rows (its G chunks; the two cuBLAS matmuls are in "backward GEMMs alone" above).
    if cuda and has_head_kernel:
        import dataclasses

        from cggr_torch import kernels as hg  # the public names of the GEMM-epilogue kernels
        t_flat = labels.reshape(-1).to(torch.int64).contiguous()
        stat_out = torch.empty((6, N), dtype=torch.float32, device=dev)

        def gemm_statistics(config: Any) -> Callable[[], tuple]:
            def run() -> tuple:
                with torch.no_grad():
                    hg.launch_head_statistics(hidden, weight, None, t_flat, -100, stat_out, config)
                return (stat_out[0, :1].sum(),)
            return run

        default_cfg = hg.head_gemm_config(dtype, dev)
        sweep = [default_cfg]
        if args.gemm_sweep:
            sweep = list(dict.fromkeys((default_cfg,) + hg.HEAD_GEMM_CONFIGS))
            sweep += [dataclasses.replace(default_cfg, splits=s) for s in (1, 2, 4, 8)]
        for c in sweep:
            s_eff = hg.head_splits(N, V, c, compat.torch_launch().num_sms(hidden))
            methods[f"diag: gemm-epilogue statistics alone, {c.describe()} (S={s_eff})"] = gemm_statistics(c)

        def gemm_gradient(config: Any) -> Callable[[], tuple]:
            bplan = plan_chunks(N, d, V, dtype, selected_rows=k_sel, gradient_kernel=True,
                                inplace_accumulation=compat.torch_fused_accumulates_in_place(dev, dtype))
            h_sel = hidden.detach()[:k_sel]
            lse = torch.full((k_sel,), 12.0, dtype=torch.float32, device=dev)
            t_sel = t_flat[:k_sel]
            scale = torch.ones(1, dtype=torch.float32, device=dev)
            g_buf = torch.empty((k_sel, bplan.vocab_chunk), dtype=dtype, device=dev)

            def run() -> tuple:
                for v0 in range(0, V, bplan.vocab_chunk):
                    v1 = min(V, v0 + bplan.vocab_chunk)
                    hg.launch_head_gradient(h_sel, weight.detach()[v0:v1], None, lse, t_sel, v0, scale,
                                            g_buf[:, :v1 - v0], None, config)
                return (g_buf[:1, :1].float().sum(),)
            return run

        for c in (dict.fromkeys((default_cfg,) + hg.HEAD_GEMM_CONFIGS) if args.gemm_sweep else (default_cfg,)):
            methods[f"diag: gemm-epilogue gradient chunks alone (K x V), {c.describe()}"] = gemm_gradient(c)
    if args.methods:  # a name, its part before "[", or a shell pattern ("diag: gemm-epilogue*")
        methods = {k: v for k, v in methods.items()
                   if any(k == m or k.split("[")[0] == m or fnmatch.fnmatchcase(k, m) for m in args.methods)}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], tuple]) -> tuple[list[float], int, int]:
        out = None
        for _ in range(args.warmup):
            out = fn()
            del out
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        out = fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
        grad_bytes = sum(x.numel() * x.element_size() for x in out[1:])
        del out
        # the harness (CUDA events), the GPU drained before each call as before the harness
        t = measure(fn, framework="torch", device=dev.type, warmup=0, reps=args.iters, before_each=sync)
        return t, peak, grad_bytes

    rows: list[dict[str, Any]] = []
    for name, fn in methods.items():
        try:
            t, peak, grad_bytes = timed(fn)
        except Exception as err:  # a baseline that fails (e.g. out of memory) is reported, not fatal
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"[:300]})
            if cuda:
                torch.cuda.empty_cache()
            continue
        print(f"{name}: {t.median_ms:.3f} ms", flush=True)  # a run cut by its timeout still shows its rows
        rows.append({"method": name, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                     "p25_ms": t.p25_ms, "p75_ms": t.p75_ms,
                     "peak_extra_gib": peak / GIB if cuda else None,
                     "working_gib": (peak - grad_bytes) / GIB if cuda else None})
    liger_ms = next((r["median_ms"] for r in rows if r["method"] == "liger_flce" and "median_ms" in r), None)
    mm_ms = next((r["median_ms"] for r in rows if r["method"] == "matmul" and "median_ms" in r), None)
    for r in rows:
        if "median_ms" in r:
            r["vs_liger"] = r["median_ms"] / liger_ms if liger_ms else None
            r["matmul_equivalents"] = r["median_ms"] / mm_ms if mm_ms else None

    check: dict[str, Any] = {}
    if "cggr_fused" in methods and "cggr_materialised" in methods:
        b = methods["cggr_materialised"]()
        # The GEMM-epilogue path takes the float32 accumulator as the logit (no rounding to the inputs' dtype),
        # so it may select a few different tokens than the rounded materialised logits: compare, do not assert.
        for prefix, key in (("", "cggr_fused"), ("gemm_", "cggr_fused[head_kernel=gemm]")):
            if key not in methods:
                continue
            a = methods[key]()
            check[f"{prefix}loss_abs_diff"] = float((a[0] - b[0]).detach().abs())
            for nm, x, y in (("grad_hidden", a[1], b[1]), ("grad_weight", a[2], b[2])):
                scale = float(y.float().abs().max())
                check[f"{prefix}{nm}_max_err_rel"] = float((x.float() - y.float()).abs().max()) / max(scale, 1e-30)
            del a
        del b
        # Scores: the fused forward's statistics against the scoring of the materialised logits.
        from cggr_torch import score_tokens
        from cggr_torch.fused_linear import fused_linear_scores
        with torch.no_grad():
            fs = fused_linear_scores(hidden, weight, labels)
            ms = score_tokens(F.linear(hidden, weight), labels)
            for nm in ("difficulty",) + tuple(fs.stats._fields):
                x = fs.difficulty if nm == "difficulty" else getattr(fs.stats, nm)
                y = ms.difficulty if nm == "difficulty" else getattr(ms.stats, nm)
                check[f"scores_{nm}_max_abs_err"] = float((x - y).abs().nan_to_num(0.0).max())
            check["scores_eligible_equal"] = bool(torch.equal(fs.eligible, ms.eligible))
            if has_head_kernel:
                gs = fused_linear_scores(hidden, weight, labels, head_kernel="gemm")
                for nm in ("difficulty",) + tuple(gs.stats._fields):
                    x = gs.difficulty if nm == "difficulty" else getattr(gs.stats, nm)
                    y = ms.difficulty if nm == "difficulty" else getattr(ms.stats, nm)
                    check[f"gemm_scores_{nm}_max_abs_err"] = float((x - y).abs().nan_to_num(0.0).max())
                check["gemm_scores_eligible_equal"] = bool(torch.equal(gs.eligible, ms.eligible))
                del gs
            del fs, ms

    if cuda and args.profile:
        # Where the wall time goes beyond the kernels: the default call timed alone (as above), ten calls
        # back to back (the next call's host work overlaps the previous call's GPU tail), the host time of
        # one call, and - a diagnostic only - the backward without its wait for the selected-row count
        # (the count is the known k of this configuration, pre-filled into the pinned buffer).
        base_fn = methods.get("cggr_fused") or fused(DEFAULT_MEMORY_BUDGET)
        k_known = round(args.ratio * N)

        def no_count_wait() -> tuple:
            real_empty, real_sync = torch.empty, torch.cuda.Event.synchronize

            def prefilled(*a: Any, **kw: Any) -> Any:
                t = real_empty(*a, **kw)
                if kw.get("pin_memory"):
                    t.fill_(k_known)
                return t
            torch.empty, torch.cuda.Event.synchronize = prefilled, (lambda self: None)
            try:
                return base_fn()
            finally:
                torch.empty, torch.cuda.Event.synchronize = real_empty, real_sync

        def per_call(fn: Callable[[], tuple], calls: int) -> float:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / calls

        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            base_fn()
            host.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        print("\n#### wall time per call (ms)\n")
        print(f"* default, each call timed alone: {per_call(base_fn, 1):.2f} (x10 median below)")
        print(f"* default, 10 calls back to back: {per_call(base_fn, 10):.2f}")
        print(f"* host time of one call (returns after the backward is queued): "
              f"{statistics.median(host):.2f}")
        print(f"* backward without the count wait (diagnostic), alone: {per_call(no_count_wait, 1):.2f}; "
              f"10 back to back: {per_call(no_count_wait, 10):.2f}")
        alone = [per_call(no_count_wait, 1) for _ in range(5)]
        base = [per_call(base_fn, 1) for _ in range(5)]
        print(f"* medians of 5 single calls: default {statistics.median(base):.2f}, without the count wait "
              f"{statistics.median(alone):.2f}")
        profile_breakdown(methods["cggr_fused"] if "cggr_fused" in methods else fused(DEFAULT_MEMORY_BUDGET),
                          "cggr_fused fwd+bwd, default plan")

    k = round(args.ratio * N)
    plan_fwd = plan_chunks(N, d, V, dtype, selected_rows=k,
                           gradient_kernel=compat.torch_fused_gradient_kernel(hidden) is not None)
    result = {"env": environment(torch), "shape": {"N": N, "d": d, "V": V, "dtype": args.dtype, "ratio": args.ratio},
              "plan_default": plan_fwd._asdict(), "rows": rows, "notes": notes, "check": check,
              "goal": {"time_vs_liger_max": 0.5, "working_gib_max": 0.25}}
    print(f"\n### fused linear + CGGR CE, N={N} d={d} V={V} {args.dtype}, ratio {args.ratio} "
          f"({result['env']['device']})\n")
    print("| method | median ms | p10 | p90 | peak extra GiB | working GiB | × Liger | × matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | | | |")
            continue
        def fmt(v: Optional[float], digits: int = 2) -> str:
            return "-" if v is None else f"{v:.{digits}f}"
        print(f"| {r['method']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{fmt(r['peak_extra_gib'], 3)} | {fmt(r['working_gib'], 3)} | {fmt(r['vs_liger'])} | "
              f"{fmt(r['matmul_equivalents'])} |")
    for name, why in notes.items():
        print(f"\n* {name}: {why}")
    if check:
        print(f"\ncheck (fused vs materialised): {json.dumps(check)}")
    print(f"default plan at K={k}: {plan_fwd}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
