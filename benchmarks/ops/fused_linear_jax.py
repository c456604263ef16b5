#!/usr/bin/env python
"""Benchmark the fused LM head + CGGR selective cross-entropy (``cggr_jax.fused_linear``) on a GPU.

Shape (default): ``N = 16384``, ``d = 2048``, ``V = 128256``, bfloat16 hidden states and weight ``(V, d)``,
ratio 0.25 (``selection='fixed_quota'``, ``warmup_steps=0``, ``capacity = k = N/4``). Every method is
``jax.jit(jax.value_and_grad(loss, argnums=(hidden, weight)))``:

* ``cggr_fused``            - :func:`cggr_jax.fused_linear.fused_linear_cggr_loss` (default 0.25 GiB plan:
  with the Pallas statistics kernel, blocks of all ``N`` rows × ``forward_vocab_chunk`` columns whose rows
  carry their streaming state between blocks; ``cggr_fused[B=…]`` other ``memory_budget_bytes``, ``--budgets``);
* ``cggr_fused[896-row blocks]`` - the previous forward for comparison: ``row_chunk_size=896`` (``--row-blocks``),
  for which the plan keeps whole vocabulary rows (``896 × V`` logits per block, one whole-row statistics
  launch each);
* ``cggr_fused[logits=f32]`` - the same with float32 logits (``logits_dtype``);
* ``cggr_materialised``     - full logits ``h Wᵀ`` then ``cggr_jax.loss.cggr_loss`` (if that module exists);
* ``xla_linear_optax_ce``   - full logits (float32 accumulation) + ``optax.softmax_cross_entropy_with_integer_labels``
  mean (the plain full-gradient baseline);
* ``matmul``                - one ``(N, d) × (d, V)`` GEMM (the FLOP unit; the fused loss needs ≈ 1.75 of them).

The plan (``row_chunk``, ``forward_vocab_chunk``, ``vocab_chunk``) of each ``cggr_fused`` variant is printed
and saved. Columns: median / p10 / p90 (ms, ``block_until_ready``, after ``--warmup`` calls) and the compiled program's
memory (``compiled.memory_analysis()``): ``temp`` = XLA's temporary buffers (the working memory) and ``out`` =
outputs (loss + gradients), in GiB. ``check``: the fused loss and gradients against ``cggr_materialised`` (same
selection) when both run.

Run on the H200 from the repository root::

    python benchmarks/fused_linear.py --framework jax --out bench_fused_linear_jax.json

``--quick`` runs tiny shapes on the CPU backend (checks the script; numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

GIB = 2**30


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.125, 0.5], help="extra budgets in GiB")
    ap.add_argument("--row-blocks", type=int, default=896,
                    help="rows per block of the whole-row forward variant (0: leave it out)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="also time the forward alone, its statistics and its GEMMs (where the time goes)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default="bench_fused_linear_jax.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU backend (script check only)")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.n, args.d, args.vocab, args.warmup, args.iters, args.budgets = 300, 64, 1001, 1, 2, [0.0001]
        args.row_blocks = 128
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks.harness import compat, measure

    fl = compat.jax_fused_linear_module()  # the diagnostics call its internals (see compat.py)
    fused_linear_cggr_loss = fl.fused_linear_cggr_loss
    plan_chunks = compat.jax_plan_chunks
    DEFAULT_MEMORY_BUDGET = compat.jax_default_memory_budget()

    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    N, d, V = args.n, args.d, args.vocab
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    temps = jax.random.uniform(k1, (N, 1), minval=0.3, maxval=3.0)
    hidden = (jax.random.normal(k2, (N, d)) * temps).astype(dtype)
    weight = (jax.random.normal(k3, (V, d)) * (1.5 / d**0.5)).astype(dtype)
    labels = jax.random.randint(k4, (N,), 0, V, dtype=jnp.int32)
    cfg = dict(selection="fixed_quota", warmup_steps=0, min_tokens_ratio=args.ratio)
    cap = int(round(args.ratio * N))

    kernel = compat.jax_fused_statistics_kernel()   # the Pallas statistics kernel: on a GPU backend unless disabled
    plans: dict[str, dict[str, int]] = {}

    def fused(name: str, budget: int, ldt: Any = None, row_chunk_size: Optional[int] = None) -> Callable[..., Any]:
        plan, rows, cols = compat.jax_fused_forward_blocks(N, d, V, dtype, jnp.dtype(dtype if ldt is None else ldt).name,
                                              kernel, row_chunk_size, None, budget, selected_rows=cap)
        plans[name] = {"row_chunk": rows, "forward_vocab_chunk": cols, "vocab_chunk": plan.vocab_chunk,
                       "forward_blocks": -(-N // rows) * -(-V // cols)}

        def loss(h: Any, w: Any) -> Any:
            return fused_linear_cggr_loss(h, w, labels, 0, capacity=cap, memory_budget_bytes=budget,
                                          logits_dtype=ldt, row_chunk_size=row_chunk_size, **cfg)[0]
        return loss

    def dense_ce(h: Any, w: Any) -> Any:
        z = jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

    losses: dict[str, Callable[..., Any]] = {"cggr_fused": fused("cggr_fused", DEFAULT_MEMORY_BUDGET)}
    if args.row_blocks > 0:
        # The previous forward: row blocks of the whole vocabulary (896 × 128256 bf16 logits fit the budget).
        name = f"cggr_fused[{args.row_blocks}-row blocks]"
        losses[name] = fused(name, DEFAULT_MEMORY_BUDGET, row_chunk_size=args.row_blocks)
    for b in args.budgets:
        name = f"cggr_fused[B={b:g}GiB]"
        losses[name] = fused(name, max(1, int(b * GIB)))
    losses["cggr_fused[logits=f32]"] = fused("cggr_fused[logits=f32]", DEFAULT_MEMORY_BUDGET, jnp.float32)
    notes: dict[str, str] = {}
    try:
        from cggr_jax import cggr_loss

        def materialised(h: Any, w: Any) -> Any:
            z = jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32).astype(h.dtype)
            return cggr_loss(z, labels, 0, **cfg)[0]
        losses["cggr_materialised"] = materialised
    except ImportError as err:
        notes["cggr_materialised"] = f"cggr_jax.loss not importable ({err})"
    losses["xla_linear_optax_ce"] = dense_ce
    if args.methods:
        losses = {k: v for k, v in losses.items() if k in args.methods or k.split("[")[0] in args.methods}

    programs: dict[str, Any] = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1))) for name, fn in losses.items()}
    if not args.methods or "matmul" in args.methods:
        programs["matmul"] = jax.jit(lambda h, w: jnp.einsum("nd,vd->nv", h, w))
    if args.diagnostics:
        # Where the time goes: the loss value alone (XLA drops the backward), the forward's blocks + statistics
        # alone, and the forward's GEMMs alone (each block reduced by a max so that it is computed in full).
        from cggr_jax.fused_linear import fused_linear_scores
        cols = plans["cggr_fused"]["forward_vocab_chunk"]
        programs["diag: cggr_fused forward only"] = jax.jit(losses["cggr_fused"])
        programs["diag: forward blocks + statistics (fused_linear_scores)"] = jax.jit(
            lambda h, w: fused_linear_scores(h, w, labels).difficulty)

        def gemm_blocks(h: Any, w: Any) -> Any:
            acc = jnp.zeros((), jnp.float32)
            for v0 in range(0, V, cols):
                z = jnp.einsum("nd,vd->nv", h, w[v0:v0 + cols], preferred_element_type=jnp.float32).astype(h.dtype)
                acc = acc + jnp.max(z).astype(jnp.float32)
            return acc
        programs[f"diag: forward GEMMs in {cols}-column blocks (+ a max pass)"] = jax.jit(gemm_blocks)

    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name, prog in programs.items():
        try:
            compiled = prog.lower(hidden, weight).compile()
            mem = compiled.memory_analysis()
            cell: list[Any] = [None]

            def call(compiled: Any = compiled) -> Any:
                cell[0] = compiled(hidden, weight)
                return cell[0]
            t = measure(call, framework="jax", warmup=args.warmup, reps=args.iters)
            if name in ("cggr_fused", "cggr_materialised"):
                results[name] = cell[0]
        except Exception as err:  # reported, not fatal (e.g. out of memory for a baseline)
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        row = {"method": name, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
               "p25_ms": t.p25_ms, "p75_ms": t.p75_ms}
        if mem is not None:
            row["temp_gib"] = getattr(mem, "temp_size_in_bytes", 0) / GIB
            row["out_gib"] = getattr(mem, "output_size_in_bytes", 0) / GIB
        rows.append(row)
    mm = next((r["median_ms"] for r in rows if r["method"] == "matmul" and "median_ms" in r), None)
    for r in rows:
        if "median_ms" in r:
            r["matmul_equivalents"] = r["median_ms"] / mm if mm else None

    check: dict[str, Any] = {}
    if "cggr_fused" in results and "cggr_materialised" in results:
        (la, (gha, gwa)), (lb, (ghb, gwb)) = results["cggr_fused"], results["cggr_materialised"]
        check["loss_abs_diff"] = float(abs(la - lb))
        for nm, x, y in (("grad_hidden", gha, ghb), ("grad_weight", gwa, gwb)):
            x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
            check[f"{nm}_max_err_rel"] = float(np.abs(x32 - y32).max() / max(np.abs(y32).max(), 1e-30))

    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "device": str(jax.devices()[0].device_kind), "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    env["statistics_kernel"] = kernel
    plan_kernel = plan_chunks(N, d, V, dtype, selected_rows=cap, statistics_kernel=True)
    plan_reference = plan_chunks(N, d, V, dtype, selected_rows=cap, statistics_kernel=False)
    result = {"env": env, "shape": {"N": N, "d": d, "V": V, "dtype": args.dtype, "ratio": args.ratio},
              "plans": plans, "plan_default_with_kernel": plan_kernel._asdict(),
              "plan_default_without_kernel": plan_reference._asdict(), "rows": rows, "notes": notes,
              "check": check}
    print(f"\n### JAX fused linear + CGGR CE, N={N} d={d} V={V} {args.dtype}, ratio {args.ratio} ({env['device']})\n")
    print(f"statistics kernel: {kernel}; default plan with the kernel {dict(plan_kernel._asdict())}, "
          f"without {dict(plan_reference._asdict())}\n")
    print("| variant | forward block (rows × cols) | forward blocks | backward cols |")
    print("|---|---:|---:|---:|")
    for name, p in plans.items():
        print(f"| {name} | {p['row_chunk']} × {p['forward_vocab_chunk']} | {p['forward_blocks']} | "
              f"{p['vocab_chunk']} |")
    print()
    print("| method | median ms | p10 | p90 | temp GiB | out GiB | × matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | | |")
            continue

        def fmt(v: Optional[float], digits: int = 2) -> str:
            return "-" if v is None else f"{v:.{digits}f}"
        print(f"| {r['method']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{fmt(r.get('temp_gib'), 3)} | {fmt(r.get('out_gib'), 3)} | {fmt(r['matmul_equivalents'])} |")
    for name, why in notes.items():
        print(f"\n* {name}: {why}")
    if check:
        print(f"\ncheck (fused vs materialised): {json.dumps(check)}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
