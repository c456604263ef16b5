#!/usr/bin/env python
"""Benchmark per-token log-probs + entropy + the policy-gradient backward of an LM head (SPEC §14), JAX.

The JAX side of ``benchmarks/ops/token_stats_torch.py`` (same shape and rows, where they exist in JAX): every
method is ``jax.jit(jax.value_and_grad(loss, argnums=(hidden, weight)))``:

* ``materialised[ρ]``          - ``logits = h Wᵀ`` (float32 accumulation, bf16), ``log_softmax`` → gather,
  entropy, the top-ρ entropy mask, the token-mean on-policy loss (TRL's classic path written in JAX);
* ``cggr_token_stats[ρ]``      - :func:`cggr_jax.fused_linear_token_stats`, then the same mask and loss;
* ``cggr_policy_gradient[ρ]``  - :func:`cggr_jax.policy_gradient_loss` (``min_tokens_ratio = ρ``).

Columns: median / p10 / p90 (ms, ``block_until_ready``) and the compiled program's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``, GiB: the working memory beyond inputs and outputs).

``python benchmarks/token_stats.py --framework jax [--quick]`` (the shared front: records in the ``heads``
suite; the temporary memory is the records' ``peak_extra_gib``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)

GIB = 2**30


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 1.0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-ms", type=float, default=2000.0)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default="bench_token_stats_jax.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU backend (script check only)")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.n, args.seq, args.d, args.vocab, args.warmup, args.budget_ms = 256, 64, 32, 1003, 1, 20.0
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks.harness import measure
    from cggr_jax import fused_linear_token_stats, policy_gradient_loss

    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    S, d, V = args.seq, args.d, args.vocab
    B = max(1, args.n // S)
    N = B * S
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
    temps = jax.random.uniform(k1, (B, S, 1), minval=0.3, maxval=3.0)
    hidden = (jax.random.normal(k2, (B, S, d)) * temps).astype(dtype)
    weight = (jax.random.normal(k3, (V, d)) * (1.5 / d**0.5)).astype(dtype)
    targets = jax.random.randint(k4, (B, S), 0, V, dtype=jnp.int32).at[:, : S // 8].set(-100)
    adv = jax.random.normal(k5, (B,))
    valid = targets != -100
    n_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    n_host = int(jax.device_get(jnp.sum(valid)))       # the mask size is static (read once, outside the trace)

    def top_mask(ent: Any, rho: float) -> Any:
        if rho >= 1.0:
            return valid
        k = max(1, int(round(rho * n_host)))
        e = jnp.where(valid, jax.lax.stop_gradient(ent), -jnp.inf).reshape(-1)
        idx = jax.lax.top_k(e, k)[1]
        return jnp.zeros((N,), bool).at[idx].set(True).reshape(B, S)

    def pg(lp: Any, mask: Any) -> Any:
        ratio = jnp.exp(lp - jax.lax.stop_gradient(lp))
        return -jnp.sum(jnp.where(mask, ratio * adv[:, None], 0.0)) / n_valid

    def materialised(rho: float) -> Callable[..., Any]:
        def loss(h: Any, w: Any) -> Any:
            z = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32).astype(h.dtype).astype(jnp.float32)
            logp = jax.nn.log_softmax(z, axis=-1)
            lp = jnp.where(valid, jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
            ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
            return pg(lp, top_mask(ent, rho))
        return loss

    def ours_stats(rho: float) -> Callable[..., Any]:
        def loss(h: Any, w: Any) -> Any:
            out = fused_linear_token_stats(h, w, targets, need=("logprob",))
            return pg(out.logprob, top_mask(out.statistics.entropy, rho))
        return loss

    def ours_pg(rho: float) -> Callable[..., Any]:
        def loss(h: Any, w: Any) -> Any:
            return policy_gradient_loss(h, w, targets, adv, min_tokens_ratio=rho).loss
        return loss

    losses: dict[str, Callable[..., Any]] = {}
    for rho in args.ratios:
        losses[f"materialised[{rho:g}]"] = materialised(rho)
        losses[f"cggr_token_stats[{rho:g}]"] = ours_stats(rho)
        losses[f"cggr_policy_gradient[{rho:g}]"] = ours_pg(rho)
    if args.methods:
        losses = {k: v for k, v in losses.items() if k in args.methods or k.split("[")[0] in args.methods}
    results: dict[str, Any] = {}
    for name, fn in losses.items():
        try:
            prog = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
            compiled = prog.lower(hidden, weight).compile()
            mem = compiled.memory_analysis()
            temp = None if mem is None else mem.temp_size_in_bytes / GIB
            value = prog(hidden, weight)
            timing = measure(lambda: prog(hidden, weight), framework="jax", warmup=args.warmup,
                             budget_ms=args.budget_ms, min_reps=3, max_reps=50)
            results[name] = {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                             "reps": timing.reps, "temp_gib": temp, "loss": float(value[0])}
        except Exception as err:  # noqa: BLE001 - an out-of-memory baseline is a result, not a crash
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        line = results[name]
        print(f"{name:32s} " + (f"{line['median_ms']:10.2f} ms  temp {line['temp_gib']}" if "median_ms" in line
                                 else line["error"]), flush=True)
    for name, line in results.items():  # the same check as the PyTorch script's, against the materialised path
        ref = results.get(f"materialised[{name.split('[')[-1]}")
        if "loss" in line and ref and "loss" in ref:
            line["check_loss_vs_materialised"] = abs(line["loss"] - ref["loss"]) / max(1e-12, abs(ref["loss"]))
    out = {"op": "token_stats", "framework": "jax", "backend": jax.default_backend(),
           "devices": [str(x) for x in jax.devices()], "jax": jax.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shape": {"N": N, "B": B, "T": S, "d": d, "V": V, "dtype": args.dtype, "valid_tokens": n_host},
           "results": results,
           "quick": args.quick}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
