#!/usr/bin/env python
"""Benchmark CGGR's selective cross-entropy (fwd + bwd) against full cross-entropy kernels on a GPU.

Default: N = 16384 tokens, V = 128256 and 131072, bfloat16 logits (a leaf tensor that requires grad, as a
model's output would), selection ratio 0.25. Every row is one forward + backward producing ``logits.grad``:

* ``raw pipeline``            - the composable public functions: :func:`score_tokens_triton` →
  :func:`select_tokens` (``topk``, device ratio 0.25) → :func:`selective_cross_entropy_triton` (``lse`` from
  the scoring pass) → backward; also with ``inplace_backward=True``;
* ``raw selective CE kernel`` - :func:`selective_cross_entropy_triton` alone, the mask and ``lse`` computed once
  before timing (one gather forward, the backward kernel), dense and ``inplace_backward=True``;
* ``CGGRLoss topk, inplace_backward`` (and ``sampled``) - the fused path writing the gradient into the logits
  (SPEC §8.1; DECISIONS.md: inplace-selective-ce);
* ``CGGRLoss <strategy>``     - the module (fused kernel path) for every strategy, ``dynamic_threshold=False``
  and ``warmup_steps=0`` so that every row keeps the same 25 % (``stratified``: S = 4; ``sequence_aware``:
  the input is viewed as (16, 1024) sequences, one token each); plus the default configuration (its default
  strategy with the dynamic threshold on: it keeps more tokens, so its backward reads more rows);
* ``CGGRLoss sampled``        - SPEC §7.4 on its fused path (``loss.forward_sampled``: scoring kernel →
  ``cggr::sampled_loss_from_scores``: probabilities with every metric, one sort, water-filling, draws writing
  the row weights, a one-program finish; the backward kernel with row weights); ``CGGRLoss sampled,
  composable kernel path`` is the previous path (scoring kernel → ``sample_tokens``, the Triton sampler →
  selective CE kernel with row weights, plus the pipeline's PyTorch glue), and ``CGGRLoss sampled, PyTorch
  sampler`` that path with the PyTorch reference sampler swapped in;
* ``liger CE``                - Liger-Kernel's fused cross-entropy (skipped when ``liger_kernel`` is absent);
* ``eager CE``                - ``F.cross_entropy(logits, targets)``; ``--compile`` adds ``torch.compile``;
* parts of the fused path, device time from CUDA graphs: scoring (+ key/status), plan, sort, mask, masked
  mean, backward kernel, the composable sampled path's ``sample_tokens`` (Triton sampler; a failed capture
  means it synchronises) and the fused sampled path's ``sampled_loss_from_scores`` (everything after the
  scoring kernel, its sort included); and a short sweep of backward launch variants (block bytes, blocks per program,
  store cache modifier, the row-major ``flat`` grid) - pick the fastest for
  ``cggr_torch/kernels/scoring.py`` (``_BACKWARD_*``);
* two reference floors for the backward kernel, timed like the parts (no CGGR work): ``grad.zero_()`` of an
  N×V buffer (the pure write of N·V) and "write N·V + read ratio·N rows" (``zero_`` of the other rows plus a
  copy of the first ratio·N rows: exactly the backward's traffic, laid out sequentially).

The in-place rows overwrite their logits with the gradient, so their buffers are restored from a pristine copy
before every call, outside the timed interval (otherwise the next call would score the previous gradient).
``floor: ...`` rows are not timed: each is its byte count at the run's copy bandwidth (the ``floor ms``
convention below), one per traffic model: CGGR with a dense gradient, in place or not (``(2 + r)·N·V``: the
scoring read, the selected rows' re-read, the whole gradient written); the raw kernel given mask and lse
(``(1 + r)·N·V``); a full CE (``2·N·V``); and issue 18's in-place estimate ``(1 + 2r)·N·V``, which only a
sparse gradient could reach (the unselected rows' zeros are not written).

Columns: median/p10/p90 ms (the harness: CUDA events after warm-up, ``logits.grad`` reset outside the timed
interval, ``--buffers`` logit buffers used round-robin), ``× liger`` (goal for the CGGR rows: ≤ 0.65), ``floor ms`` (bytes the method must move at
the copy bandwidth: CGGR reads N·V once for scoring, re-reads the selected rows and writes N·V of gradient;
a full CE reads N·V and writes N·V), and the peak extra memory of one call above what was allocated before
it (the gradient included). The last lines are a summary (the GPU session shows only the tail). Writes JSON
to ``--out``.

Run on the H200 from the repository root::

    python benchmarks/selective_ce.py --framework torch

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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

STRATEGIES = ("fixed_quota", "topk", "stratified", "sequence_aware", "sampled")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 131072])
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--seq-len", type=int, default=1024, help="sequence length of the sequence_aware row")
    ap.add_argument("--buffers", type=int, default=2, help="independent logit buffers used round-robin")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--compile", action="store_true", help="add the torch.compile CE baseline (slow to compile)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the backward launch sweep")
    ap.add_argument("--out", default="bench_selective_ce_torch.json")
    ap.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes on CPU, kernels interpreted")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.n, args.vocab, args.buffers, args.seq_len = 24, [300], 2, 8
    if args.n % args.seq_len:
        ap.error(f"--n {args.n} must be a multiple of --seq-len {args.seq_len}")
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


def _sample_tokens() -> Optional[Callable[..., Any]]:
    """``cggr_torch.selection.sample_tokens`` (None in a checkout without the sampled selection)."""
    import importlib

    return getattr(importlib.import_module("cggr_torch.selection"), "sample_tokens", None)


def _reference_sampler() -> Optional[Callable[[], Any]]:
    """A context manager factory that puts ``CGGRLoss`` on its composable kernel path (the fused sampled path
    never calls ``sample_tokens``) and routes ``sample_tokens`` to its PyTorch reference, every other kernel
    unchanged (None in a checkout whose sampler has no kernel entry point)."""
    import contextlib

    from cggr_torch import dispatch

    if "sample_tokens_triton" not in getattr(dispatch, "KERNEL_ENTRY_POINTS", {}):
        return None
    sample_tokens = _sample_tokens()

    def reference(*args: Any, **kwargs: Any) -> Any:
        with dispatch.force("reference"):
            return sample_tokens(*args, **kwargs)

    @contextlib.contextmanager
    def swapped() -> Any:
        # the composable path (the fused sampled path never calls sample_tokens_triton)
        with dispatch.force("kernel", fused_loss=False, kernels={"sample_tokens_triton": reference}):
            yield

    return swapped


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import torch
    import torch.nn.functional as F
    import triton

    from benchmarks.harness import compat, measure
    from cggr_torch import CGGRLoss, dispatch, select_tokens

    ks = compat.torch_scoring_kernels()
    kce = compat.torch_cross_entropy_kernels()
    launch = compat.torch_launch()
    ksel = compat.torch_selection_kernels()

    if not args.smoke:
        if not torch.cuda.is_available():
            sys.exit("error: this benchmark needs a CUDA GPU; use --smoke to check the script on CPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: unset TRITON_INTERPRET (the interpreter is for CPU tests)")
    else:  # exercise the CUDA code paths on CPU tensors under the interpreter (for the whole run)
        forced = compat.force("torch", "kernel")
        forced.__enter__()
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

    def timed(fn: Callable[[], Any], grad_to_none: Optional[list] = None,
              prep: Optional[Callable[[], Any]] = None) -> dict[str, float]:
        def reset() -> None:  # a backward must not accumulate into the previous call's gradient
            for b in grad_to_none or ():
                b.grad = None
            if prep is not None:
                prep()
        if args.smoke:  # interpreted kernels: one host-clock call, numbers mean nothing
            return measure(fn, framework="torch", device=device, warmup=0, reps=1, before_each=reset).as_dict()
        return measure(fn, framework="torch", device=device, warmup=10, budget_ms=args.rep_ms,
                       before_each=reset).as_dict()

    def graph_us(fn: Callable[[], Any]) -> Optional[float]:
        """Device time of ``fn`` alone (CUDA graph replay), µs; None on CPU or when capture fails."""
        if args.smoke:
            fn()
            return None
        try:
            return 1e3 * measure(fn, framework="torch", device=device, cuda_graph=True,
                                 budget_ms=max(20, args.rep_ms // 4)).median_ms
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"  graph capture failed: {type(err).__name__}: {err}"[:200])
            torch.cuda.synchronize()
            return None

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

    def raw_fwd_bwd(x: torch.Tensor, t: torch.Tensor, inplace: bool) -> None:
        with torch.no_grad():
            sc = ks.score_tokens_triton(x.detach(), t)
            mask, _k = select_tokens(sc.difficulty, sc.eligible, ratio_t)
        loss = kce.selective_cross_entropy_triton(x, t, mask, lse=sc.stats.lse, inplace_backward=inplace)
        loss.backward()

    ce_compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t)) if args.compile else None
    results: list[dict[str, Any]] = []
    summary: list[str] = []
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

        pristine: list[torch.Tensor] = []   # copies of the logits for the in-place rows, made on first use

        def restore() -> None:
            """Put the original logits back into every buffer (the in-place rows overwrite them)."""
            if not pristine:
                pristine.extend(b.detach().clone() for b in bufs)
            with torch.no_grad():
                for b, p in zip(bufs, pristine):
                    b.copy_(p)

        def record(name: str, fn: Callable[[torch.Tensor, torch.Tensor], Any], floor_bytes: Optional[float],
                   grads: bool = True, inplace: bool = False, **extra: Any) -> None:
            def call() -> Any:
                i = next(cyc)
                return fn(bufs[i], tgts[i])
            r = timed(call, grad_to_none=bufs if grads else None, prep=restore if inplace else None)
            for b in bufs:
                b.grad = None
            if inplace:
                restore()
            r["peak_extra_GB"] = (lambda p: None if p is None else p / 1e9)(peak_extra_bytes(call))
            for b in bufs:
                b.grad = None
            if inplace:
                restore()
            r.update(name=name, n=args.n, vocab=v, dtype=args.dtype,
                     floor_ms=None if floor_bytes is None else floor_bytes / copy_bw * 1e3, **extra)
            rows.append(r)

        full_floor = 2 * nbytes                                   # read N·V, write N·V
        cggr_floor = nbytes * (2 + args.ratio)                    # scoring read, selected re-read, gradient write
        kernel_floor = nbytes * (1 + args.ratio)                 # the CE alone: selected re-read, gradient write
        record("raw pipeline (score+select+CE)", lambda x, t: raw_fwd_bwd(x, t, False), cggr_floor, kind="raw")
        record("raw pipeline, inplace_backward", lambda x, t: raw_fwd_bwd(x, t, True), cggr_floor, kind="raw",
               inplace=True)
        # The raw kernel alone (SPEC §8), mask and lse of each buffer computed once, before timing.
        given = []
        with torch.no_grad():
            for b, t_ in zip(bufs, tgts):
                sc_b = ks.score_tokens_triton(b.detach(), t_)
                given.append((select_tokens(sc_b.difficulty, sc_b.eligible, ratio_t)[0], sc_b.stats.lse))
                del sc_b
        lookup = {id(b): g_ for b, g_ in zip(bufs, given)}

        def raw_kernel(x: torch.Tensor, t: torch.Tensor, inplace: bool) -> None:
            mask_, lse_ = lookup[id(x)]
            kce.selective_cross_entropy_triton(x, t, mask_, lse=lse_, inplace_backward=inplace).backward()
        record("raw selective CE kernel (mask+lse given)", lambda x, t: raw_kernel(x, t, False), kernel_floor,
               kind="raw")
        record("raw selective CE kernel (mask+lse given), inplace_backward", lambda x, t: raw_kernel(x, t, True),
               kernel_floor, kind="raw", inplace=True)
        del given, lookup
        seq = (args.n // args.seq_len, args.seq_len)
        for strategy in STRATEGIES:
            crit = CGGRLoss(selection=strategy, dynamic_threshold=False, min_tokens_ratio=args.ratio,
                            warmup_steps=0, num_strata=4, min_tokens_per_sequence=1)
            if strategy == "sequence_aware":
                fn = (lambda x, t, c=crit: c(x.view(seq + (v,)), t.view(seq)).backward())
            else:
                fn = (lambda x, t, c=crit: c(x, t).backward())
            record(f"CGGRLoss {strategy}", fn, cggr_floor, kind="module", strategy=strategy)
        reference_sampler = _reference_sampler()
        if reference_sampler is not None:
            # SPEC §7.4 with the PyTorch sampler in place of the Triton one (everything else unchanged)
            crit_s = CGGRLoss(selection="sampled", dynamic_threshold=False, min_tokens_ratio=args.ratio,
                              warmup_steps=0)

            def sampled_torch_sampler(x: torch.Tensor, t: torch.Tensor, c: Any = crit_s) -> None:
                with reference_sampler():
                    c(x, t).backward()
            record("CGGRLoss sampled, PyTorch sampler", sampled_torch_sampler, cggr_floor, kind="module",
                   strategy="sampled+torch-sampler")
        if "sample_from_scores" in getattr(dispatch, "KERNEL_ENTRY_POINTS", {}):
            # SPEC §7.4 on the composable kernel path (what "CGGRLoss sampled" measured before the fused path)
            crit_c = CGGRLoss(selection="sampled", dynamic_threshold=False, min_tokens_ratio=args.ratio,
                              warmup_steps=0)

            def sampled_composable(x: torch.Tensor, t: torch.Tensor, c: Any = crit_c) -> None:
                with dispatch.force("kernel", fused_loss=False):
                    c(x, t).backward()
            record("CGGRLoss sampled, composable kernel path", sampled_composable, cggr_floor, kind="module",
                   strategy="sampled+composable")
        # The docs' strategy with the flat (row-major) backward grid instead of the default 2-D grid.
        crit_flat = CGGRLoss(selection="topk", dynamic_threshold=False, min_tokens_ratio=args.ratio, warmup_steps=0)

        def topk_flat(x: torch.Tensor, t: torch.Tensor) -> None:
            with compat.torch_backward_flat_grid(True):
                crit_flat(x, t).backward()
        record("CGGRLoss topk, flat backward grid", topk_flat, cggr_floor, kind="module", strategy="topk+flat")
        for strategy in ("topk", "sampled"):   # SPEC §8's in-place backward on the fused paths
            crit_in = CGGRLoss(selection=strategy, dynamic_threshold=False, min_tokens_ratio=args.ratio,
                               warmup_steps=0, inplace_backward=True)
            record(f"CGGRLoss {strategy}, inplace_backward", lambda x, t, c=crit_in: c(x, t).backward(), cggr_floor,
                   kind="module", strategy=f"{strategy}+inplace", inplace=True)
        crit_dyn = CGGRLoss(min_tokens_ratio=args.ratio, warmup_steps=0)
        record(f"CGGRLoss default ({crit_dyn.selection}, dynamic threshold)", lambda x, t: crit_dyn(x, t).backward(),
               None, kind="module", strategy=f"default={crit_dyn.selection}+dynamic")
        if liger is not None:
            record("liger CE (full)", lambda x, t: liger(x, t).backward(), full_floor, kind="baseline")
        if ce_compiled is not None:
            record("torch.compile CE (full, fp32 upcast)", lambda x, t: ce_compiled(x, t).backward(), full_floor,
                   kind="baseline")
        record("eager CE (full)", lambda x, t: F.cross_entropy(x, t).backward(), full_floor, kind="baseline")

        # ---- parts of the fused path (device time from CUDA graphs; no autograd)
        x0, t0 = bufs[0].detach(), tgts[0]
        geom = ks.row_geometry(x0)
        tf = ks.flat_targets(t0)
        n = geom.n
        out = torch.empty((6, n), dtype=torch.float32, device=device)
        fin = torch.empty((n,), dtype=torch.int8, device=device)
        key = torch.empty((n,), dtype=torch.int32, device=device)
        status = torch.empty((n,), dtype=torch.int8, device=device)
        mode = compat.torch_mode_code("combined")
        parts: list[tuple[str, Optional[float], Optional[float]]] = []

        def part(name: str, fn: Callable[[], Any], floor_bytes: Optional[float] = None) -> None:
            us = graph_us(fn)
            parts.append((name, us, None if floor_bytes is None or us is None else
                          us / (floor_bytes / copy_bw * 1e6)))

        part("scoring kernel (+ key, status)", lambda: ks.launch_scoring(geom, tf, -100, mode, out, fin, key=key,
                                                                         status=status), nbytes)
        ints = torch.empty((8,), dtype=torch.int64, device=device)
        floats = torch.empty((8,), dtype=torch.float32, device=device)
        part("plan kernel", lambda: ksel.launch_plan(ints, floats, None, n, status=status, stats=out,
                                                     ratio=args.ratio))
        part("sort (int32 key, stable)", lambda: ksel.sort_order(key))
        order = ksel.sort_order(key)
        mask = torch.empty((n,), dtype=torch.bool, device=device)
        part("mask kernel", lambda: ksel.launch_mask(order, ints, None, mask))
        sample_fn = _sample_tokens()
        if sample_fn is not None:
            sc0 = ks.score_tokens_triton(x0, t0)
            part("sampler (sample_tokens, sampled)", lambda: sample_fn(sc0.difficulty, sc0.eligible, ratio_t, step=1))
            del sc0
        if "sample_from_scores" in getattr(dispatch, "KERNEL_ENTRY_POINTS", {}):
            from cggr_torch.kernels import sampling as ksam

            base_t = torch.tensor(args.ratio, dtype=torch.float32, device=device)
            step_t = torch.tensor(1, dtype=torch.int64, device=device)
            part("sampled from scores (fused sampled: probabilities, sort, water-filling, draws, finish)",
                 lambda: ksam.sampled_loss_from_scores_op(x0, tf, out, status, None, base_t, step_t, False, 0.0, 0,
                                                          1.0, 0.1, 1e-6))
        loss_buf = torch.empty((), dtype=torch.float32, device=device)
        count = torch.empty((1,), dtype=torch.int64, device=device)
        part("masked mean (loss)", lambda: kce.launch_masked_mean(mask, out[4], loss_buf, count))
        g_buf = torch.empty_like(x0)
        gscale = torch.ones((1,), dtype=torch.float32, device=device)
        bwd_default = launch.backward_config(v, dtype)
        bwd_bytes = nbytes * (1 + args.ratio)
        part(f"backward kernel ({bwd_default.describe()})",
             lambda: kce.launch_selective_backward(geom, tf, mask, out[0], gscale, g_buf, count=count), bwd_bytes)
        # Reference floors (no CGGR work): what the backward's writes alone cost, and its exact traffic as
        # plain sequential copy/fill kernels - how close the kernel can get without changing what it moves.
        n_read = int(args.ratio * n)

        def write_read_floor() -> None:
            g_buf[n_read:].zero_()
            g_buf[:n_read].copy_(x0[:n_read])

        floors: list[dict[str, Any]] = []
        for name, fn, fb in (("write N·V (grad.zero_())", lambda: g_buf.zero_(), nbytes),
                             (f"write N·V + read {args.ratio:g}·N rows (zero_ + copy)", write_read_floor, bwd_bytes)):
            part(f"floor (reference): {name}", fn, fb)
            floors.append({"name": name, "gpu_us": parts[-1][1], "x_floor": parts[-1][2], "bytes": fb})
        sweep: list[dict[str, Any]] = []
        if not args.no_sweep and not args.smoke:
            group = max(1, 16 // elsize)
            variants = [
                launch.LaunchConfig(rows=16384 // elsize // group, group=group, num_warps=8),
                launch.LaunchConfig(rows=4096 // elsize // group, group=group, num_warps=2),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                blocks_per_program=2),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                blocks_per_program=4),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                store_hint=".cs"),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                blocks_per_program=2, store_hint=".cs"),
                # row-major grid: neighbouring programs store along one row instead of one row apart
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                flat_grid=True),
                launch.LaunchConfig(rows=16384 // elsize // group, group=group, num_warps=8, flat_grid=True),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                blocks_per_program=2, flat_grid=True),
                launch.LaunchConfig(rows=bwd_default.rows, group=group, num_warps=bwd_default.num_warps,
                                store_hint=".cs", flat_grid=True),
            ]
            for c in variants:
                us = graph_us(lambda c=c: kce.launch_selective_backward(geom, tf, mask, out[0], gscale, g_buf,
                                                                        c, count=count))
                sweep.append({"config": c.describe(), "gpu_us": us})
                parts.append((f"  backward {c.describe()}", us,
                              None if us is None else us / (bwd_bytes / copy_bw * 1e6)))
        del g_buf, out, fin, key, status, order, mask

        # Floors from bytes (not timed): median_ms is the byte count at this run's copy bandwidth.
        for name, fb in (("floor: CGGR, dense gradient, in place or not ((2+r)·N·V)", cggr_floor),
                         ("floor: selective CE kernel given mask+lse ((1+r)·N·V)", kernel_floor),
                         ("floor: full CE (2·N·V)", full_floor),
                         ("floor: issue 18's in-place estimate ((1+2r)·N·V; needs a sparse gradient)",
                          nbytes * (1 + 2 * args.ratio))):
            ms = fb / copy_bw * 1e3
            rows.append({"name": name, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "peak_extra_GB": None,
                         "n": args.n, "vocab": v, "dtype": args.dtype, "floor_ms": ms, "kind": "floor",
                         "floor_kind": "bytes at the copy bandwidth", "bytes": fb})
        liger_ms = next((r["median_ms"] for r in rows if r["name"].startswith("liger")), None)
        for r in rows:
            r["x_liger"] = None if liger_ms is None else r["median_ms"] / liger_ms
            r["x_floor"] = None if r["floor_ms"] is None else r["median_ms"] / r["floor_ms"]
        results += rows
        results.append({"name": "parts", "vocab": v, "parts": [{"name": p[0], "gpu_us": p[1], "x_floor": p[2]}
                                                               for p in parts], "backward_sweep": sweep,
                        "reference_floors": floors})
        fmt = lambda v_, f: "-" if v_ is None else format(v_, f)  # noqa: E731
        print(f"\n## V = {v}  (logits {nbytes / 1e9:.2f} GB, copy {copy['median_ms']:.3f} ms = "
              f"{copy_bw / 1e9:.0f} GB/s moved; goal: CGGR rows ≤ 0.65 × liger)\n")
        print("| method | median ms | p10 | p90 | × liger | floor ms | × floor | peak extra GB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{fmt(r['x_liger'], '.2f')} | {fmt(r['floor_ms'], '.3f')} | {fmt(r['x_floor'], '.2f')} | "
                  f"{fmt(r['peak_extra_GB'], '.2f')} |")
        print("\n| part (fused path) | gpu µs | × floor |")
        print("|---|---:|---:|")
        for name, us, xf in parts:
            print(f"| {name} | {fmt(us, '.1f')} | {fmt(xf, '.2f')} |")

        by = {r["name"]: r for r in rows}
        raw = by["raw pipeline (score+select+CE)"]
        summary.append(f"V={v}: liger {fmt(liger_ms, '.3f')} ms | raw pipeline {raw['median_ms']:.3f} ms "
                       f"({fmt(raw['x_liger'], '.2f')}x liger)")
        summary.append("  CGGRLoss: " + ", ".join(
            f"{r['strategy']} {r['median_ms']:.3f} ({fmt(r['x_liger'], '.2f')}x)" for r in rows
            if r.get("kind") == "module"))
        smp, tk = by.get("CGGRLoss sampled"), by.get("CGGRLoss topk")
        if smp is not None and tk is not None:     # issue 14's goal: sampled adds <= 5 % at ratio 0.25
            smp_t = by.get("CGGRLoss sampled, PyTorch sampler")
            smp_c = by.get("CGGRLoss sampled, composable kernel path")
            summary.append(f"  sampled {smp['median_ms']:.3f} ms = {smp['median_ms'] / raw['median_ms']:.3f}x raw "
                           f"pipeline (composable topk), {smp['median_ms'] / tk['median_ms']:.3f}x CGGRLoss topk "
                           f"(goal <= 1.05) | composable kernel path "
                           f"{fmt(None if smp_c is None else smp_c['median_ms'], '.3f')} ms | PyTorch sampler "
                           f"{fmt(None if smp_t is None else smp_t['median_ms'], '.3f')} ms")
        tk_in = by.get("CGGRLoss topk, inplace_backward")
        floor_row = by.get("floor: CGGR, dense gradient, in place or not ((2+r)·N·V)")
        if tk is not None and tk_in is not None and floor_row is not None:   # issue 18: in place <= 1.1x its floor
            kin, kd = by["raw selective CE kernel (mask+lse given), inplace_backward"], \
                by["raw selective CE kernel (mask+lse given)"]
            summary.append(f"  in place: CGGRLoss topk {tk_in['median_ms']:.3f} ms vs dense {tk['median_ms']:.3f} "
                           f"({tk_in['median_ms'] / floor_row['median_ms']:.2f}x the (2+r)·N·V floor, goal <= 1.1; "
                           f"peak extra {fmt(tk_in['peak_extra_GB'], '.2f')} vs {fmt(tk['peak_extra_GB'], '.2f')} GB)"
                           f" | raw kernel in place {kin['median_ms']:.3f} vs dense {kd['median_ms']:.3f} ms "
                           f"({fmt(kin['x_floor'], '.2f')}x its (1+r)·N·V floor)")
        line = "  parts gpu µs: " + ", ".join(f"{name.split(' (')[0].replace(' kernel', '').strip()} {fmt(us, '.0f')}"
                                           for name, us, _ in parts
                                           if not name.startswith("  ") and not name.startswith("floor"))
        best = min((s_ for s_ in sweep if s_["gpu_us"] is not None), key=lambda s_: s_["gpu_us"], default=None)
        if best is not None:
            line += f" | best backward {best['config']} {best['gpu_us']:.0f}"
        summary.append(line)
        line = "  reference floors gpu µs (not CGGR work; x = vs copy bandwidth): " + ", ".join(
            f"{f_['name']} {fmt(f_['gpu_us'], '.0f')} ({fmt(f_['x_floor'], '.2f')}x)" for f_ in floors)
        bwd_us = next((us for name, us, _ in parts if name.startswith("backward kernel")), None)
        if bwd_us is not None and floors[-1]["gpu_us"]:
            line += f" | backward default = {bwd_us / floors[-1]['gpu_us']:.2f}x the write+read floor"
        summary.append(line)
        del bufs, tgts
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"benchmark": "selective_ce_torch", "env": env, "args": vars(args), "results": results,
                   "summary": summary}, f,
                  indent=2)
    print(f"\nwrote {args.out}")
    print("\nSUMMARY (ms fwd+bwd, x liger; goal <= 0.65)")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
