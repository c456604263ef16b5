"""Throughput of CGGR batch splitting (``CGGRModel``) against standard training, PyTorch.

GPU run (the default is the ~135M Llama-style SmolLM shape, built from a config, random init, random tokens)::

    python benchmarks/batch_split.py --framework torch --batch-size 64 --out bench_batch_split_torch.json
    python benchmarks/batch_split.py --framework torch --find-batch --out ...      # largest power-of-two batch that fits
    python benchmarks/batch_split.py --framework torch --quick                     # CPU smoke test, tiny model

Modes (each starts from the same initial weights and a fresh AdamW):

* ``standard``        forward + backward of the whole batch;
* ``random_sequence`` the same number of sequences as CGGR keeps (``num_selected(B, ratio)``), chosen at
  random: the cost of the main pass alone, without the router;
* ``cggr``            ``CGGRModel``: 4-layer truncated router under ``no_grad`` on the whole batch, then forward +
  backward of the kept sequences. ``--router-layers 1,2,4,8`` and ``--router-path auto,logits`` (comma lists)
  run one ``cggr[L=…,path]`` row per combination (a sweep in one process, same batches and weights).

**Cheaper routers** (SPEC §9.3): ``--router-options`` (default ``s4,s16,m64,p256``) adds one
``cggr[L=…,path,<option>]`` row per option beside the rows above, with the deepest ``--router-layers`` and the
first ``--router-path``: ``s<n>`` scores every n-th position (``router_positions=n``), ``m<n>`` n evenly
spaced positions (``router_samples=n``), ``p<n>`` reads an n-token prefix (``router_prefix=n``); tokens
combine (``p256s4``). ``--router-options ''`` runs none. ``--router-compile`` runs every cggr row's router
layers under ``torch.compile`` (``CGGRModel(router_compile=True)``; off by default, as in the library).

**Router time.** After a cggr row's timed steps, the router pass alone (``CGGRModel.select``: router forward,
scoring, sequence selection; no main pass, no host sync inside) is timed ``--steps`` times in the same
process and reported as ``router_ms_median``; ``router_path`` says whether the router was scored on the fused
path (final hidden states + blockwise LM-head scoring, the ``(B, T, V)`` logits never exist) or from its
logits. The summary lines give ``cggr / standard``, ``cggr / random_sequence`` (goals: ≥ 2.5× and ≥ 0.9×),
the measured overhead ``cggr − random_sequence`` and the router's share of it.

One timed step = the loss forward, backward, ``AdamW.step()``, ``zero_grad`` (and ``CGGRModel.step()``).
Steps are timed with ``torch.cuda.synchronize()`` around each step after ``--warmup`` untimed steps; the median
of ``--steps`` is reported. **tokens/s counts the tokens of the input batch** (``B·T`` per step, what the data
loader consumes), so a mode that trains on fewer sequences of the same batch shows as faster. The curriculum is
skipped (``warmup_steps=0``) and the dynamic threshold is off by default so that CGGR keeps exactly
``num_selected(B, ratio)`` sequences (``--dynamic-threshold`` turns it on).

Outputs: a markdown table on stdout (and ``--md FILE``) and, with ``--out FILE``, a JSON record of the
configuration, the environment and every mode's numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The SmolLM-135M shape (Llama architecture).
FULL = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152)
QUICK = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=97)
MODES = ("standard", "random_sequence", "cggr")
#: SPEC §9.3's settings of the default option rows (``--router-options``).
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


def build_model(shape: dict[str, int], seq_len: int, device: torch.device, dtype: torch.dtype, seed: int,
                attn: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 64), tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=dtype).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor],
             shape: dict[str, int], router_layers: int | None = None, router_path: str = "auto",
             label: str | None = None, positions: dict[str, int] | None = None) -> dict[str, Any]:
    from benchmarks.harness import measure
    from cggr_torch import CGGRModel, num_selected

    param_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build_model(shape, args.seq_len, device, param_dtype, args.seed, args.attn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if args.precision == "bf16-autocast" else None)
    params_millions = sum(p.numel() for p in model.parameters()) / 1e6
    B = batches[0].shape[0]
    keep = num_selected(B, args.ratio)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    cggr = None
    if mode == "cggr":
        cggr = CGGRModel(model, router_layers=router_layers, min_tokens_ratio=args.ratio, warmup_steps=0,
                         dynamic_threshold=args.dynamic_threshold,
                         router_batch_size=args.router_batch_size or None, router_path=router_path,
                         router_memory_budget_bytes=args.router_memory_budget, **(positions or {}),
                         **({"router_compile": True} if getattr(args, "router_compile", False) else {}))
    kept_counts: list[int] = []

    def step(ids: torch.Tensor) -> None:
        ctx = autocast if autocast is not None else torch.autocast(device_type=device.type, enabled=False)
        with ctx:
            if mode == "standard":
                loss = model(input_ids=ids, labels=ids).loss
                kept_counts.append(B)
            elif mode == "random_sequence":
                idx = torch.randperm(B, generator=gen)[:keep].sort().values.to(device)
                sub = ids.index_select(0, idx)
                loss = model(input_ids=sub, labels=sub).loss
                kept_counts.append(keep)
            else:
                loss = cggr(ids, labels=ids)
                kept_counts.append(int(cggr.last_num_kept))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cggr is not None:
            cggr.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync(device)
    # The harness times each step (CUDA events on a GPU); the GPU is drained before every step (untimed), so a
    # step's time is the whole step from an idle GPU, as before the harness.
    counter = iter(range(10**9))

    def timed_step() -> None:
        step(batches[(args.warmup + next(counter)) % len(batches)])
    t = measure(timed_step, framework="torch", device=device.type, warmup=0, reps=args.steps,
                before_each=lambda: sync(device))
    med = t.median_ms / 1e3
    step_timing = t.as_dict()
    router_timing = None
    if cggr is not None:   # the router pass alone, same batches, same precision
        ctx = autocast if autocast is not None else torch.autocast(device_type=device.type, enabled=False)
        rcounter = iter(range(10**9))

        def route() -> None:
            ids = batches[next(rcounter) % len(batches)]
            with ctx:
                cggr.select(ids, labels=ids)
        router_timing = measure(route, framework="torch", device=device.type, warmup=0, reps=args.steps,
                                before_each=lambda: sync(device))
    tokens = B * args.seq_len
    result = {
        "mode": label or mode,
        "params_millions": params_millions,
        "batch_size": B,
        "seq_len": args.seq_len,
        "sequences_trained_median": statistics.median(kept_counts[args.warmup:]),
        "step_ms_median": 1e3 * med,
        "step_ms_min": step_timing["min_ms"],
        "step_ms_p25": step_timing["p25_ms"],
        "step_ms_p75": step_timing["p75_ms"],
        "step_ms_p90": step_timing["p90_ms"],
        "tokens_per_s": tokens / med,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
    }
    if cggr is not None:
        result["cggr_metrics"] = cggr.get_metrics()
        result["router_layers"] = router_layers
        result["router_path"] = result["cggr_metrics"]["router_path"]
        result["router_path_reason"] = cggr.router_path_reason
        result["router_options"] = dict(positions or {})
        result["router_ms_median"] = router_timing.median_ms
        result["router_ms_min"] = router_timing.min_ms
    del model, opt, cggr
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def find_batch(args: argparse.Namespace, device: torch.device, shape: dict[str, int]) -> int:
    """Largest power of two (<= --max-batch) for which one standard training step fits in memory."""
    best = 0
    B = 1
    while B <= args.max_batch:
        try:
            probe = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
            ids = torch.randint(0, shape["vocab_size"], (B, args.seq_len), device=device)
            run_mode("standard", probe, device, [ids], shape)
            best = B
            B *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if best == 0:
        raise SystemExit("--find-batch: even a batch of 1 does not fit")
    return best


def markdown(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["mode"] == "standard"), None)
    rand = next((r for r in results if r["mode"] == "random_sequence"), None)
    lines = ["| mode | batch | sequences trained | step (ms, median) | tokens/s | speed-up | router path | "
             "router alone (ms) | peak mem (GiB) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        router = f"{r['router_ms_median']:.1f}" if "router_ms_median" in r else "-"
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['sequences_trained_median']:g} | "
                     f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {speed:.2f}x | "
                     f"{r.get('router_path', '-')} | {router} | {mem} |")
    for r in results:
        if "router_ms_median" not in r:
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--find-batch", action="store_true", help="use the largest power-of-two batch that fits")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio (fraction of sequences kept)")
    p.add_argument("--router-layers", default="4",
                   help="router depth, or a comma list (e.g. 1,2,4,8) for a sweep: one cggr row per value")
    p.add_argument("--router-path", default="auto",
                   help="auto | fused | logits, or a comma list (e.g. auto,logits): one cggr row per value")
    p.add_argument("--router-memory-budget", type=int, default=None,
                   help="bytes of logit blocks on the fused router path (default: CGGRModel's, 1 GiB)")
    p.add_argument("--router-batch-size", type=int, default=0,
                   help="score the batch in chunks of this many sequences (bounds the (B, T, V) router-logit "
                        "memory of the logits path); 0 (default) = the whole batch at once")
    p.add_argument("--router-options", default=DEFAULT_ROUTER_OPTIONS,
                   help="extra cggr rows with SPEC §9.3's cheaper routers: s<n> (stride), m<n> (sample), "
                        "p<n> (prefix), combinable (p256s4); '' for none")
    p.add_argument("--router-compile", action="store_true",
                   help="the cggr rows' router layers under torch.compile (CGGRModel(router_compile=True))")
    p.add_argument("--dynamic-threshold", action="store_true")
    p.add_argument("--precision", choices=("bf16-autocast", "bf16", "fp32"), default="bf16-autocast",
                   help="bf16-autocast: fp32 weights + bf16 autocast; bf16: bf16 weights")
    p.add_argument("--attn", default=None, help="attn_implementation (default: the transformers default, sdpa)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    p.add_argument("--md", default=None, help="markdown output file")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; expected a subset of {MODES}")
    from benchmarks.harness import compat

    ROUTER_MEMORY_BUDGET, ROUTER_PATHS = compat.torch_router_constants()

    try:
        layer_list = [int(x) for x in str(args.router_layers).split(",") if x]
    except ValueError:
        raise SystemExit(f"--router-layers: expected an int or a comma list of ints, got {args.router_layers!r}")
    path_list = [x for x in str(args.router_path).split(",") if x]
    for x in path_list:
        if x not in ROUTER_PATHS:
            raise SystemExit(f"--router-path: expected values in {ROUTER_PATHS}, got {x!r}")
    if not layer_list or not path_list or min(layer_list) < 1:
        raise SystemExit("--router-layers / --router-path: need at least one value (layers >= 1)")
    if args.router_memory_budget is None:
        args.router_memory_budget = ROUTER_MEMORY_BUDGET
    option_rows = parse_router_options(args.router_options)
    if args.quick:
        device = torch.device("cpu")
        shape = QUICK
        args.seq_len = min(args.seq_len, 32)
        args.batch_size = min(args.batch_size, 8)
        layer_list = sorted({min(x, QUICK["num_hidden_layers"] - 1) for x in layer_list})
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.precision = "fp32"
        args.find_batch = False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --quick for the CPU smoke test")
        device = torch.device("cuda")
        shape = FULL
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.find_batch:
        args.batch_size = find_batch(args, device, shape)
        print(f"--find-batch: batch size {args.batch_size}")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    batches = [torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), generator=g).to(device)
               for _ in range(4)]
    results = []
    variants = [(L, path) for L in layer_list for path in path_list]
    for mode in modes:
        runs = [(None, "auto", mode, None)] if mode != "cggr" else [
            (L, path, "cggr" if len(variants) == 1 else f"cggr[L={L},{path}]", None) for L, path in variants] + [
            (max(layer_list), path_list[0], f"cggr[L={max(layer_list)},{path_list[0]},{name}]", kw)
            for name, kw in option_rows]
        for L, path, label, positions in runs:
            r = run_mode(mode, args, device, batches, shape, router_layers=L, router_path=path, label=label,
                         positions=positions)
            results.append(r)
            extra = (f", router alone {r['router_ms_median']:.1f} ms ({r['router_path']})"
                     if "router_ms_median" in r else "")
            print(f"{label:>16}: {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s{extra}",
                  flush=True)
    table = markdown(results)
    print()
    print(table)
    import transformers

    record = {
        "config": {**vars(args), "router_layers_list": layer_list, "router_paths": path_list, "model_shape": shape,
                   "params_millions": None},
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        },
        "results": results,
        "markdown": table,
    }
    record["config"]["params_millions"] = results[0]["params_millions"] if results else None
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
        print(f"\nJSON: {args.out}")
    if args.md:
        Path(args.md).write_text(table + "\n")
    return record


if __name__ == "__main__":
    main()
