"""Throughput of CGGR batch splitting against standard training, JAX / Flax NNX (``cggr_jax.batch_split``).

GPU run (default: the ~135M SmolLM shape — 30 layers, d 576, 9 heads / 3 kv heads, SwiGLU 1536, vocab 49152,
tied embeddings — built from a config with random init and random tokens; seq 1024; bf16 compute)::

    python benchmarks/batch_split.py --framework jax --batch-size 64 --out bench_batch_split_jax.json
    python benchmarks/batch_split.py --framework jax --quick            # CPU smoke test, tiny model

Modes (each from the same initial weights, a fresh ``optax.chain(advance_curriculum(), optax.adamw(...))``):

* ``standard``        forward + backward of the whole batch;
* ``random_sequence`` the number of sequences CGGR keeps, chosen at random, no router: the cost of the main
  pass alone (``mode="random_sequence"``);
* ``cggr``            the truncated router (first ``--router-layers`` blocks, shared weights, no gradient) on
  the whole batch, SPEC §9 selection, forward + backward of the kept sequences padded to the smallest bucket.

``--router-layers 1,2,4,8`` and ``--router-path auto,logits`` (comma lists) run one ``cggr[L=…,path]`` row per
combination. **Cheaper routers** (SPEC §9.3): ``--router-options`` (default ``s4,s16,m64,p256``) adds one
``cggr[L=…,path,<option>]`` row per option with the deepest ``--router-layers`` and the first ``--router-path``:
``s<n>`` = ``router_positions=n`` (stride), ``m<n>`` = ``router_samples=n``, ``p<n>`` = ``router_prefix=n``;
tokens combine (``p256s4``); ``--router-options ''`` runs none. **Router time**: after a router mode's timed steps, the router pass alone (the step's own
``_route``: truncated forward, scoring — fused or from the logits, ``router_path`` in the row — and the
sequence selection, jitted on its own) is timed ``--steps`` times in the same process (``router_ms_median``);
the summary lines give ``cggr / standard`` and ``cggr / random_sequence`` (goals ≥ 2.5× and ≥ 0.9×), the
overhead ``cggr − random_sequence`` and the router's share of it.

One timed step is one call of the jitted training step (router, selection, forward, backward, AdamW update),
ended by ``jax.block_until_ready`` on the new state and metrics; ``--warmup`` untimed calls (the first one
compiles) precede ``--steps`` timed ones and the median is reported. **tokens/s counts the tokens of the
input batch** (``B·T`` per step), so a mode that trains on fewer sequences of the same batch shows as faster.
The curriculum is skipped (``warmup_steps=0``) and the dynamic threshold is off by default, so CGGR keeps
exactly ``num_selected(B, ratio)`` sequences and the buckets default to ``(that count, B)``: two compiled
branches (``--dynamic-threshold`` turns the threshold on and adds buckets up to ``1.5·ratio·B``).

Attention: ``--attention auto`` (default) uses cuDNN flash attention on GPU when a probe call compiles, and
says so in the output; otherwise XLA's attention (which materialises ``B·H·T²`` scores).

Outputs: a markdown table on stdout (and ``--md FILE``) and, with ``--out FILE``, a JSON record of the
configuration, the environment and every mode's numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from cggr_jax import batch_split as bs  # noqa: E402
from cggr_jax.curriculum import num_selected  # noqa: E402
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402

# The SmolLM-135M shape (Llama architecture).
FULL = dict(num_layers=30, d_model=576, num_heads=9, num_kv_heads=3, mlp_hidden_dim=1536, vocab_size=49152,
            tie_embeddings=True)
QUICK = dict(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, mlp_hidden_dim=64, vocab_size=97,
             tie_embeddings=True)
MODES = ("standard", "random_sequence", "cggr")
#: SPEC §9.3's settings of the default option rows (``--router-options``), as in ``batch_split_torch.py``.
DEFAULT_ROUTER_OPTIONS = "s4,s16,m64,p256"
_OPTION_KEYS = {"s": "router_positions", "m": "router_samples", "p": "router_prefix"}


def parse_router_options(text: str) -> list[tuple[str, dict[str, int]]]:
    """``'s4,m64,p256s4'`` -> ``[('s4', {'router_positions': 4}), ...]`` (SPEC §9.3 settings per row)."""
    out = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        parts = re.findall(r"([smp])(\d+)", token)
        if not parts or "".join(k + v for k, v in parts) != token:
            raise SystemExit(f"--router-options: expected tokens like s4, m64, p256 or p256s4, got {token!r}")
        out.append((token, {_OPTION_KEYS[k]: int(v) for k, v in parts}))
    return out


def _probe_cudnn(dtype: Any, num_heads: int, kv_heads: int, head_dim: int, seq_len: int) -> str | None:
    """``None`` if cuDNN flash attention runs a causal call of the model's head layout here, else the error."""
    try:
        q = jnp.zeros((1, seq_len, num_heads, head_dim), dtype)
        kv = jnp.zeros((1, seq_len, kv_heads, head_dim), dtype)
        fn = jax.jit(lambda q, kv: jax.nn.dot_product_attention(q, kv, kv, is_causal=True, implementation="cudnn"))
        jax.block_until_ready(fn(q, kv))
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"; it is reported
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def build_config(args: argparse.Namespace) -> tuple[DecoderConfig, dict[str, Any]]:
    shape = QUICK if args.quick else FULL
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    notes: dict[str, Any] = {}
    attention = args.attention
    if attention == "auto":
        if jax.default_backend() == "gpu" and dtype != jnp.float32:
            d = shape["d_model"] // shape["num_heads"]
            err = _probe_cudnn(dtype, shape["num_heads"], shape["num_kv_heads"], d, args.seq_len)
            attention = "cudnn" if err is None else "xla"
            if err is not None:
                notes["attention_fallback"] = f"cuDNN attention unavailable ({err}); using XLA attention"
                print(f"NOTE: {notes['attention_fallback']}", flush=True)
        else:
            attention = "xla"
    notes["attention"] = attention
    cfg = DecoderConfig(**shape, max_seq_len=args.seq_len, dtype=dtype, param_dtype=jnp.float32,
                        attention_implementation=attention)
    return cfg, notes


def buckets_for(args: argparse.Namespace, B: int) -> tuple[int, ...]:
    if args.buckets:
        return tuple(int(b) for b in args.buckets.split(","))
    k = int(num_selected(jnp.int32(B), jnp.float32(args.ratio)))
    if not args.dynamic_threshold:
        return (k, B)
    # With the threshold on, ratio ∈ [r, r·(1 + σ)] (σ = 0.5): quarter steps up to that bound.
    hi = min(B, math.ceil(args.ratio * 1.5 * B))
    return tuple(sorted({k, min(B, math.ceil((k + hi) / 2)), hi, B}))


def peak_memory_gb() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run_mode(mode: str, cfg: DecoderConfig, args: argparse.Namespace, batches: list[jax.Array],
             router_layers: int | None = None, router_path: str = "auto", label: str | None = None,
             positions: dict[str, int] | None = None) -> dict[str, Any]:
    from benchmarks.harness import compat, measure
    from cggr_jax import advance_curriculum

    model = DecoderLM(cfg, rngs=nnx.Rngs(args.seed))
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    split_cfg = bs.BatchSplitConfig(router_layers=args.router_layers if router_layers is None else router_layers,
                                    min_tokens_ratio=args.ratio, warmup_steps=0,
                                    dynamic_threshold=args.dynamic_threshold, seed=args.seed,
                                    router_path=router_path,
                                    router_memory_budget_bytes=args.router_memory_budget or bs.ROUTER_MEMORY_BUDGET,
                                    **(positions or {}))
    B = batches[0].shape[0]
    buckets = buckets_for(args, B)
    tx = optax.chain(advance_curriculum(), optax.adamw(args.lr, weight_decay=0.1))
    step = bs.make_batch_split_train_step(graphdef, split_cfg, tx, mode=mode, buckets=buckets)
    state = step.init(model)
    del model  # init copied the parameters

    t0 = time.perf_counter()
    state, metrics = step(state, batches[0], batches[0])
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        state, metrics = step(state, batches[i % len(batches)], batches[i % len(batches)])
    jax.block_until_ready((state, metrics))

    # Timed by the harness (block_until_ready after each step); each step's metrics are kept and read after
    # the timed loop, outside the timed interval.
    cell = [state]
    all_metrics: list[Any] = []
    counter = iter(range(10**9))

    def timed_step() -> Any:
        ids = batches[(args.warmup + next(counter)) % len(batches)]
        cell[0], metrics_i = step(cell[0], ids, ids)
        all_metrics.append(metrics_i)
        return cell[0], metrics_i
    step_timing = measure(timed_step, framework="jax", warmup=0, reps=args.steps)
    state = cell[0]
    kept, bucket = [], []
    for i, m in enumerate(jax.device_get(all_metrics)):
        kept.append(int(m["sequences_selected"]))
        bucket.append(int(m["bucket_size"]))
        if not np.isfinite(float(m["loss"])):
            raise RuntimeError(f"{mode}: non-finite loss {float(m['loss'])} at timed step {i}")
    med = step_timing.median_ms / 1e3
    router: dict[str, Any] = {}
    if mode in ("cggr", "random_sequence_router"):
        # The router pass alone: the step's own routing code, jitted by itself, on the trained parameters.
        route_fn = compat.jax_batch_split_route(step)
        route = jax.jit(lambda params, rest, ids: route_fn(params, rest, ids, ids, None, jnp.int32(0))[:2])
        jax.block_until_ready(route(state.params, state.rest, batches[0]))    # compile
        rcounter = iter(range(10**9))
        rt = measure(lambda: route(state.params, state.rest, batches[next(rcounter) % len(batches)]),
                     framework="jax", warmup=0, reps=args.steps)
        router = {"router_layers": split_cfg.router_layers, "router_path": step.router_path,
                  "router_path_reason": step.router_path_reason,
                  "router_ms_median": rt.median_ms, "router_ms_min": rt.min_ms,
                  "router_options": dict(positions or {})}
    tokens = B * args.seq_len
    return {
        **router,
        "mode": label or mode,
        "step_ms_median": 1e3 * med,
        "step_ms_min": step_timing.min_ms,
        "step_ms_p25": step_timing.p25_ms,
        "step_ms_p75": step_timing.p75_ms,
        "step_ms_p90": step_timing.p90_ms,
        "tokens_per_s": tokens / med,
        "sequences_kept_median": statistics.median(kept),
        "bucket_size_median": statistics.median(bucket),
        "buckets": list(step.bucket_sizes(B)) if mode != "standard" else [B],
        "compile_plus_first_step_s": compile_s,
        "num_compilations": step.num_traces,
        "final_loss": float(jax.device_get(metrics)["loss"]),
        "peak_memory_gb": peak_memory_gb(),
    }


def markdown(results: list[dict[str, Any]], header: str) -> str:
    base = next((r for r in results if r["mode"] == "standard"), None)
    rand = next((r for r in results if r["mode"] == "random_sequence"), None)
    lines = [header, "",
             "| mode | step ms (median) | tokens/s | speed-up vs standard | sequences kept | bucket | router path | "
             "router alone (ms) | compile s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        router = f"{r['router_ms_median']:.1f}" if "router_ms_median" in r else "-"
        lines.append(f"| {r['mode']} | {r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['sequences_kept_median']:g} | {r['bucket_size_median']:g} | {r.get('router_path', '-')} | "
                     f"{router} | {r['compile_plus_first_step_s']:.1f} |")
    for r in results:
        if "router_ms_median" not in r or not r["mode"].startswith("cggr"):
            continue
        parts = []
        if base:
            parts.append(f"cggr/standard = {base['step_ms_median'] / r['step_ms_median']:.2f}x (goal >= 2.5x)")
        if rand:
            over = r["step_ms_median"] - rand["step_ms_median"]
            parts.append(f"cggr/random_sequence = {rand['step_ms_median'] / r['step_ms_median']:.2f}x (goal >= 0.9x)")
            share = f"{100 * r['router_ms_median'] / over:.0f}% of the overhead" if over > 0 else "no overhead"
            parts.append(f"overhead = {over:.1f} ms, router alone = {r['router_ms_median']:.1f} ms ({share})")
        lines.append("")
        lines.append(f"* {r['mode']}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny model")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 64; --quick 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; --quick 32)")
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio (fraction of sequences kept)")
    p.add_argument("--router-layers", default=None,
                   help="router depth (default 4; --quick 1), or a comma list (e.g. 1,2,4,8): one cggr row each")
    p.add_argument("--router-path", default="auto",
                   help="auto | fused | logits, or a comma list (e.g. auto,logits): one cggr row per value")
    p.add_argument("--router-memory-budget", type=int, default=None,
                   help="bytes of logit blocks on the fused router path (default: BatchSplitConfig's, 1 GiB)")
    p.add_argument("--router-options", default=DEFAULT_ROUTER_OPTIONS,
                   help="extra cggr rows with SPEC §9.3's cheaper routers: s<n> (stride), m<n> (sample), "
                        "p<n> (prefix), combinable (p256s4); '' for none")
    p.add_argument("--dynamic-threshold", action="store_true", help="turn the SPEC §5.2 threshold on")
    p.add_argument("--buckets", default=None, help="comma-separated bucket sizes (default: see module doc)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="compute dtype (default bf16; --quick fp32)")
    p.add_argument("--attention", choices=("auto", "cudnn", "xla"), default="auto")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick 3)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    p.add_argument("--md", default=None, help="markdown output file")
    args = p.parse_args(argv)
    q = args.quick
    args.batch_size = args.batch_size or (8 if q else 64)
    args.seq_len = args.seq_len or (32 if q else 1024)
    try:
        layer_list = ([int(x) for x in str(args.router_layers).split(",") if x] if args.router_layers is not None
                      else [1 if q else 4])
    except ValueError:
        raise SystemExit(f"--router-layers: expected an int or a comma list of ints, got {args.router_layers!r}")
    path_list = [x for x in str(args.router_path).split(",") if x]
    for x in path_list:
        if x not in bs.ROUTER_PATHS:
            raise SystemExit(f"--router-path: expected values in {bs.ROUTER_PATHS}, got {x!r}")
    if not layer_list or not path_list:
        raise SystemExit("--router-layers / --router-path: need at least one value")
    args.router_layers = layer_list[0]
    args.dtype = args.dtype or ("fp32" if q else "bf16")
    args.warmup = max(1, args.warmup if args.warmup is not None else 2 if q else 3)
    args.steps = args.steps or (3 if q else 20)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; expected a subset of {MODES}")

    cfg, notes = build_config(args)
    rng = np.random.default_rng(args.seed)
    batches = [jnp.asarray(rng.integers(0, cfg.vocab_size, size=(args.batch_size, args.seq_len), dtype=np.int32))
               for _ in range(4)]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)))
    results: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    variants = [(L, path) for L in layer_list for path in path_list]
    option_rows = parse_router_options(args.router_options)
    runs = []
    for mode in modes:
        if mode == "cggr":
            runs += [(mode, L, path, "cggr" if len(variants) == 1 else f"cggr[L={L},{path}]", None)
                     for L, path in variants]
            runs += [(mode, max(layer_list), path_list[0], f"cggr[L={max(layer_list)},{path_list[0]},{name}]", kw)
                     for name, kw in option_rows]
        else:
            runs.append((mode, layer_list[0], path_list[0], mode, None))
    for mode, L, path, label, positions in runs:
        print(f"[{label}] running ...", flush=True)
        try:
            r = run_mode(mode, cfg, args, batches, router_layers=L, router_path=path, label=label,
                         positions=positions)
        except Exception as err:  # noqa: BLE001 - out of memory is reported per mode, the others still run
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
            failures[label] = f"out of device memory at B={args.batch_size}: {str(err).splitlines()[0][:300]}"
            print(f"[{label}] FAILED: {failures[label]} (try a smaller --batch-size)", flush=True)
            continue
        extra = (f", router alone {r['router_ms_median']:.1f} ms ({r['router_path']})"
                 if "router_ms_median" in r else "")
        print(f"[{label}] {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"kept {r['sequences_kept_median']:g}/{args.batch_size}{extra}", flush=True)
        results.append(r)

    device = jax.devices()[0]
    header = (f"JAX batch splitting: {n_params / 1e6:.2f}M params, B={args.batch_size}, T={args.seq_len}, "
              f"{args.dtype}, ratio {args.ratio}, router layers {layer_list}, paths {path_list}, attention "
              f"{notes['attention']}, device {device.device_kind}")
    table = markdown(results, header)
    for mode, why in failures.items():
        table += f"\n\n{mode}: {why}"
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.out:
        record = {
            "benchmark": "bench_batch_split_jax",
            "config": {k: v for k, v in vars(args).items()},
            "model": {"params": n_params, **{k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
                                             for k, v in vars(cfg).items()}},
            "notes": notes,
            "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                            "device": device.device_kind, "python": platform.python_version()},
            "results": results,
            "failures": failures,
        }
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
