r"""Does CGGR beat random selection at equal compute? Train small causal LMs on real text and compare.

One command trains every requested variant (see :mod:`benchmarks.quality.modes`) for every seed, evaluates
the full held-out cross-entropy on a fixed eval set along the way, writes one JSON per run, then the
markdown table ``results.md`` and the PNG plots (:mod:`benchmarks.quality.report`)::

    python -m benchmarks.quality.run --scale cpu-smoke --out out/quality-smoke            # CI: seconds
    python -m benchmarks.quality.run --scale gpu --frameworks torch --modes main --out out/quality
    python -m benchmarks.quality.run --scale gpu --frameworks jax --modes main --out out/quality
    python -m benchmarks.quality.run --scale gpu --frameworks torch --modes ablations --seeds 0,1 --out out/quality
    python -m benchmarks.quality.report out/quality                                       # re-render only

Runs of several invocations that share ``--out`` are reported together (``--resume`` skips finished runs).

**Budgets** (``--budget``): ``steps`` — every variant makes ``--steps`` optimizer steps (equal data and steps);
``flops`` — every variant trains until its *executed* FLOPs reach those of ``--steps`` standard steps (so a
cheaper variant gets more steps); ``time`` — every variant trains for ``--time-budget`` seconds of measured
training time. The learning rate follows the run's progress ``p`` (steps, FLOPs or seconds consumed over the
budget): linear warm-up over the first ``--lr-warmup`` fraction, then cosine decay to 10 % of ``--lr``; so each
variant completes its own full schedule within its budget. The eval set is scored at ``p = 0`` and each time
``p`` crosses ``i/--evals``.

**Timing.** Each step is timed on the host around the whole step, which ends with one synchronisation (reading
the loss) in every mode; evaluation is not timed. The first step (JAX compilation, CUDA initialisation) is
reported separately as ``first_step_s`` and excluded from the wall-clock axis and from tokens/s. tokens/s counts
the *input* tokens ``B·T`` per step (the data the run consumes), whatever the mode keeps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # ``python benchmarks/quality/run.py``: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

import numpy as np

from benchmarks.quality import report
from benchmarks.quality.data import eval_windows, find_data_dir, load_corpus, train_batches
from benchmarks.quality.flops import ModelShape, describe, step_flops
from benchmarks.quality.modes import OptimConfig, Variant, VariantDefaults, parse_variants

__all__ = ["Scale", "SCALES", "lr_at", "train_run", "main", "build_parser"]

RUN_SCHEMA = "cggr-quality-run/1"


@dataclass(frozen=True)
class Scale:
    """Model, data and schedule sizes of one scale (every field can be overridden on the command line)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    seq_len: int
    batch_size: int
    steps: int
    evals: int
    eval_sequences: int
    eval_batch_size: int
    lr: float
    lr_warmup: float
    curriculum_fraction: float
    router_layers: int
    seeds: tuple[int, ...]
    max_chars_per_file: Optional[int]
    max_eval_chars: Optional[int]
    jax_buckets: Optional[tuple[int, ...]]
    fast_compile: bool
    cpu_threads: Optional[int]


SCALES: dict[str, Scale] = {
    # Seconds on a laptop CPU: checks that the harness works, says nothing about CGGR.
    "cpu-smoke": Scale(vocab_size=320, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, ffn_dim=64,
                       seq_len=32, batch_size=8, steps=8, evals=2, eval_sequences=16, eval_batch_size=16,
                       lr=3e-3, lr_warmup=0.1, curriculum_fraction=0.5, router_layers=1, seeds=(0, 1),
                       max_chars_per_file=40_000, max_eval_chars=20_000, jax_buckets=(4, 8), fast_compile=True,
                       cpu_threads=1),
    # ~20.5M-parameter Llama-style model (14.2M in the blocks), 8192-token BPE, 32 x 256 tokens per step.
    # 300 steps = 2.46M tokens, about 3.8 passes over the 0.65M training tokens.
    "gpu": Scale(vocab_size=8192, d_model=384, num_layers=8, num_heads=6, num_kv_heads=6, ffn_dim=1024,
                 seq_len=256, batch_size=32, steps=300, evals=10, eval_sequences=128, eval_batch_size=32,
                 lr=1e-3, lr_warmup=0.05, curriculum_fraction=0.25, router_layers=2, seeds=(0, 1, 2),
                 max_chars_per_file=None, max_eval_chars=None, jax_buckets=None, fast_compile=False,
                 cpu_threads=None),
}


def lr_at(progress: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    """Learning rate at run progress ``p ∈ [0, 1]``: ``peak·p/warmup`` during warm-up, then
    ``peak·(floor + (1 − floor)·(1 + cos(π·(p − warmup)/(1 − warmup)))/2)``."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return peak * max(p / warmup, 1e-3)
    span = max(1e-12, 1.0 - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / span)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def setup_tag(scale: Scale, budget: str, time_budget: Optional[float]) -> str:
    """``<budget>-<hash>``: the budget kind and a short hash of the scale (seeds aside) and budget, so runs of
    different setups sharing an output directory never overwrite each other."""
    setup = asdict(scale)
    setup.pop("seeds")
    setup["budget"] = budget
    setup["time_budget"] = time_budget if budget == "time" else None
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{budget}-{digest}"


def run_path(out_dir: Path, variant: Variant, seed: int, tag: str) -> Path:
    """``<out>/runs/<framework>__<label>__<tag>__seed<seed>.json`` (``tag`` from :func:`setup_tag`)."""
    return out_dir / "runs" / f"{variant.framework}__{_slug(variant.label)}__{tag}__seed{seed}.json"


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "jax", "jaxlib", "flax", "optax", "transformers", "triton", "tokenizers", "numpy"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _torch_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch")
    return requested


def _device_name(framework: str, device: str) -> str:
    """The hardware a run used, named the same way by both frameworks (so their runs share a report section)."""
    if framework == "torch":
        import torch

        if device == "cuda":
            return torch.cuda.get_device_name()
    else:
        import jax

        d = jax.devices()[0]
        if d.platform != "cpu":
            return str(getattr(d, "device_kind", d.platform))
    return f"cpu ({os.cpu_count()} cores visible)"


def _use_amp(amp: str, framework: str, device: str) -> bool:
    if amp == "fp32":
        return False
    if framework == "torch":
        on_gpu = device == "cuda"
    else:
        import jax

        on_gpu = jax.default_backend() == "gpu"
    if amp == "bf16" and not on_gpu:
        raise ValueError(f"--amp bf16: {framework} has no GPU here; use --amp auto or fp32")
    return on_gpu


def train_run(variant: Variant, seed: int, scale: Scale, corpus: Any, eval_set: np.ndarray, *, budget: str,
              time_budget: Optional[float], device: str, amp: str, optim: OptimConfig, progress_bar: bool = True,
              max_steps_factor: int = 20) -> dict[str, Any]:
    """Train one variant for one seed; return the JSON-able run record (see ``README.md``)."""
    from tqdm.auto import tqdm

    shape = ModelShape(vocab_size=corpus.vocab_size, d_model=scale.d_model, num_layers=scale.num_layers,
                       num_heads=scale.num_heads, num_kv_heads=scale.num_kv_heads, ffn_dim=scale.ffn_dim)
    B, T = scale.batch_size, scale.seq_len
    use_amp = _use_amp(amp, variant.framework, device)
    if variant.framework == "torch":
        from benchmarks.quality.modes import TorchTrainer

        trainer: Any = TorchTrainer(variant, shape, T, seed, optim, device=device, amp=use_amp)
    else:
        from benchmarks.quality.jax_modes import JaxTrainer

        trainer = JaxTrainer(variant, shape, T, seed, optim, bf16=use_amp, buckets=scale.jax_buckets,
                             fast_compile=scale.fast_compile)

    standard_step = step_flops("standard", shape, B, T).executed
    if budget == "steps":
        total: float = float(scale.steps)
    elif budget == "flops":
        total = standard_step * scale.steps
    elif budget == "time":
        if time_budget is None or not time_budget > 0:
            raise ValueError("--time-budget: required (seconds > 0) with --budget time")
        total = float(time_budget)
    else:
        raise ValueError(f"--budget: expected steps, flops or time, got {budget!r}")
    max_steps = scale.steps if budget == "steps" else max_steps_factor * scale.steps

    batches = train_batches(corpus.train_ids, B, T, seed)
    curve: list[dict[str, Any]] = []
    per_step: dict[str, list[Any]] = {k: [] for k in ("loss", "kept_tokens", "kept_sequences", "main_rows",
                                                       "time_s", "lr")}
    extras: dict[str, list[float]] = {}
    flops = flops_nom = wall = 0.0
    first_step_s: Optional[float] = None
    steps = 0
    next_eval = 1
    since_eval: list[float] = []

    def consumed() -> float:
        return float(steps) if budget == "steps" else (flops if budget == "flops" else wall)

    def record_eval() -> None:
        trainer.synchronize()
        loss = trainer.evaluate(eval_set, scale.eval_batch_size)
        curve.append({"step": steps, "progress": min(1.0, consumed() / total), "tokens_seen": steps * B * T,
                      "flops": flops, "flops_nominal": flops_nom, "wall_s": wall, "eval_loss": loss,
                      "eval_ppl": math.exp(min(loss, 50.0)),
                      "train_loss": float(np.mean(since_eval)) if since_eval else None})
        since_eval.clear()

    record_eval()
    bar = tqdm(total=100, desc=f"{variant.key()} seed {seed}", unit="%", disable=not progress_bar, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    shown = 0
    done_at = total * (1.0 - 1e-9)  # a FLOPs budget is a sum of per-step floats: absorb rounding
    while consumed() < done_at and steps < max_steps:
        lr = lr_at(consumed() / total, optim.lr, scale.lr_warmup)
        batch = next(batches)
        t0 = time.perf_counter()
        rec = trainer.train_step(batch, lr)
        dt = time.perf_counter() - t0
        if first_step_s is None:
            first_step_s = dt
        else:
            wall += dt
        steps += 1
        flops += rec.flops.executed
        flops_nom += rec.flops.nominal
        for key, value in (("loss", rec.loss), ("kept_tokens", rec.kept_tokens),
                           ("kept_sequences", rec.kept_sequences), ("main_rows", rec.main_rows),
                           ("time_s", dt), ("lr", lr)):
            per_step[key].append(value)
        for key, value in rec.extra.items():
            extras.setdefault(key, []).append(value)
        since_eval.append(rec.loss)
        p = consumed() / total
        if not math.isfinite(rec.loss):
            bar.close()
            raise FloatingPointError(f"{variant.key()} seed {seed}: training loss {rec.loss} at step {steps}")
        while next_eval <= scale.evals and p >= next_eval / scale.evals:
            next_eval += 1
            if next_eval <= scale.evals:  # the last one is taken after the loop
                record_eval()
        pct = min(100, int(100 * p))
        if pct > shown:
            bar.update(pct - shown)
            shown = pct
        bar.set_postfix_str(f"step {steps} loss {rec.loss:.3f} eval {curve[-1]['eval_loss']:.3f}", refresh=False)
    bar.close()
    record_eval()

    timed_steps = max(0, steps - 1)
    final = curve[-1]
    kept_tok = np.asarray(per_step["kept_tokens"], dtype=np.float64)
    kept_seq = np.asarray(per_step["kept_sequences"], dtype=np.float64)
    return {
        "schema": RUN_SCHEMA,
        "framework": variant.framework,
        "mode": variant.mode,
        "label": variant.label,
        "key": variant.key(),
        "variant": variant.to_json(),
        "seed": seed,
        "scale": {**asdict(scale), "seeds": list(scale.seeds)},
        "budget": {"kind": budget, "total": total, "standard_step_flops": standard_step, "max_steps": max_steps,
                   "hit_step_cap": bool(consumed() < done_at)},
        "device": _device_name(variant.framework, device),
        "amp": "bf16" if use_amp else "fp32",
        "optim": asdict(optim),
        "model": {**describe(shape, T), "params": trainer.param_count(), "batch_size": B, "seq_len": T},
        "data": corpus.description,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "steps": steps,
        "curve": curve,
        "per_step": per_step,
        "per_step_extra": extras,
        "final": {
            "eval_loss": final["eval_loss"],
            "eval_ppl": final["eval_ppl"],
            "flops": flops,
            "flops_nominal": flops_nom,
            "train_wall_s": wall,
            "first_step_s": first_step_s,
            "tokens_per_s": (timed_steps * B * T / wall) if wall > 0 else None,
            "kept_token_fraction": float(kept_tok.sum() / (steps * B * (T - 1))) if steps else None,
            "kept_sequence_fraction": float(kept_seq.sum() / (steps * B)) if steps else None,
            "epochs": steps * B * T / corpus.description["train_tokens"],
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu-smoke")
    p.add_argument("--out", type=Path, default=None, help="output directory (default out/quality/<scale>)")
    p.add_argument("--data-dir", default=None, help="directory laid out like shared/data (default: $CGGR_DATA_DIR "
                                                    "or <repo>/../shared/data)")
    p.add_argument("--frameworks", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--modes", default=None,
                   help="comma-separated variant specs mode[:key=value...] and presets (main, ablations, smoke); "
                        "default: smoke for cpu-smoke, main for gpu")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    p.add_argument("--budget", choices=("steps", "flops", "time"), default="steps")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training per run (--budget time)")
    # ablation defaults (a variant spec overrides them)
    p.add_argument("--scoring", choices=("entropy", "margin", "loss", "combined"), default="combined",
                   help="difficulty of cggr_token variants without scoring=")
    p.add_argument("--sequence-scoring", choices=("entropy", "margin", "loss", "combined"), default="combined",
                   help="token difficulty averaged into the sequence difficulty of cggr_sequence (loss = mean "
                        "next-token loss)")
    p.add_argument("--selection", choices=("topk", "stratified", "sequence_aware", "fixed_quota"), default="topk",
                   help="selection of cggr_token variants without selection=; cggr_sequence takes it only when it is "
                        "topk or fixed_quota (SPEC §9: the other two are token strategies) and uses topk otherwise")
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio of every selecting mode")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="CGGR curriculum warm-up in steps (0 = off; default: curriculum_fraction of --steps)")
    p.add_argument("--router-layers", type=int, default=None, help="truncated router depth (default: the scale's)")
    p.add_argument("--router-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="score the router's logits against the next token (SPEC §9); --no-router-shift is the "
                        "unshifted ablation (PyTorch)")
    p.add_argument("--dynamic-threshold", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threshold-sensitivity", type=float, default=0.5)
    # scale overrides
    for name, typ in (("steps", int), ("batch-size", int), ("seq-len", int), ("evals", int),
                      ("eval-sequences", int), ("eval-batch-size", int), ("lr", float), ("lr-warmup", float),
                      ("vocab-size", int), ("d-model", int), ("num-layers", int), ("num-heads", int),
                      ("num-kv-heads", int), ("ffn-dim", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the scale's value")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="PyTorch device")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 (autocast in PyTorch, bf16 compute in JAX) on GPU, fp32 on CPU")
    p.add_argument("--shard", default=None, help="i/n: run only the runs whose index mod n is i (one GPU each)")
    p.add_argument("--resume", action="store_true", help="skip runs whose JSON already exists with this config")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="start no new run after this many minutes (the remaining runs are listed as skipped)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write results.md and the plots")
    return p


def _resolve_scale(args: argparse.Namespace) -> Scale:
    scale = SCALES[args.scale]
    over: dict[str, Any] = {}
    for field in ("steps", "batch_size", "seq_len", "evals", "eval_sequences", "eval_batch_size", "lr", "lr_warmup",
                  "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "router_layers"):
        value = getattr(args, field)
        if value is not None:
            over[field] = value
    if args.seeds is not None:
        try:
            over["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError as err:
            raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from err
        if not over["seeds"]:
            raise ValueError("--seeds: expected at least one seed")
    scale = replace(scale, **over)
    for field in ("steps", "batch_size", "evals", "eval_sequences", "eval_batch_size", "d_model", "num_layers",
                  "num_heads", "num_kv_heads", "ffn_dim", "router_layers"):
        if getattr(scale, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}: expected >= 1, got {getattr(scale, field)}")
    if scale.seq_len < 2:
        raise ValueError(f"--seq-len: expected >= 2, got {scale.seq_len}")
    if not (scale.lr > 0 and 0 <= scale.lr_warmup < 1):
        raise ValueError(f"--lr must be > 0 and --lr-warmup in [0, 1), got {scale.lr}, {scale.lr_warmup}")
    if scale.eval_sequences % scale.eval_batch_size:
        raise ValueError(f"--eval-sequences ({scale.eval_sequences}) must be a multiple of --eval-batch-size "
                         f"({scale.eval_batch_size})")
    if scale.router_layers > scale.num_layers:
        raise ValueError(f"--router-layers ({scale.router_layers}) exceeds --num-layers ({scale.num_layers})")
    return scale


def _parse_shard(text: Optional[str]) -> tuple[int, int]:
    if text is None:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    scale = _resolve_scale(args)
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    warmup = args.warmup_steps if args.warmup_steps is not None else int(round(scale.curriculum_fraction *
                                                                               scale.steps))
    defaults = VariantDefaults(scoring=args.scoring, sequence_scoring=args.sequence_scoring,
                               selection=args.selection, ratio=args.ratio, warmup=warmup,
                               router_layers=scale.router_layers, shift=args.router_shift,
                               dynamic=args.dynamic_threshold, sensitivity=args.threshold_sensitivity)
    modes = args.modes if args.modes is not None else ("smoke" if args.scale == "cpu-smoke" else "main")
    variants = parse_variants(modes, frameworks, defaults, scale.num_layers)
    shard_i, shard_n = _parse_shard(args.shard)
    out_dir = args.out if args.out is not None else Path("out") / "quality" / args.scale
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs").mkdir(exist_ok=True)

    if "jax" in frameworks:
        if "torch" in frameworks:  # one process, two allocators: JAX must not pre-allocate most of the GPU
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        if jax.default_backend() == "gpu":  # reuse compilations across invocations (a process-wide setting)
            jax.config.update("jax_compilation_cache_dir", str((out_dir / "cache" / "jax").resolve()))
    device = _torch_device(args.device) if "torch" in frameworks else "cpu"
    restore_threads: Optional[int] = None
    if device == "cpu" and "torch" in frameworks and scale.cpu_threads is not None:
        import torch

        restore_threads = torch.get_num_threads()
        torch.set_num_threads(scale.cpu_threads)  # tiny matmuls: extra threads only add contention
    try:
        return _run_all(args, scale, frameworks, variants, shard_i, shard_n, out_dir, device)
    finally:
        if restore_threads is not None:
            import torch

            torch.set_num_threads(restore_threads)


def _run_all(args: argparse.Namespace, scale: Scale, frameworks: tuple[str, ...], variants: list[Variant],
             shard_i: int, shard_n: int, out_dir: Path, device: str) -> int:
    if device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir = find_data_dir(args.data_dir)
    corpus = load_corpus(data_dir, out_dir / "cache", scale.vocab_size, max_chars_per_file=scale.max_chars_per_file,
                         max_eval_chars=scale.max_eval_chars)
    eval_set = eval_windows(corpus.eval_ids, scale.eval_sequences, scale.seq_len)
    optim = OptimConfig(lr=scale.lr)
    print(f"[quality] {corpus.description['split']}", flush=True)
    print(f"[quality] train {corpus.description['train_tokens']} tokens, eval set {eval_set.shape[0]} x "
          f"{eval_set.shape[1]} tokens of {corpus.description['eval_tokens']}; {corpus.description['tokenizer']}",
          flush=True)

    plan = [(seed, v) for seed in scale.seeds for v in variants]
    plan = [item for i, item in enumerate(plan) if i % shard_n == shard_i]
    start = time.perf_counter()
    skipped: list[dict[str, Any]] = []
    done = 0
    tag = setup_tag(scale, args.budget, args.time_budget)
    for seed, variant in plan:
        path = run_path(out_dir, variant, seed, tag)
        if args.resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("variant") == variant.to_json():
                print(f"[quality] resume: {path.name} exists, skipped", flush=True)
                continue
        if args.deadline_min is not None and (time.perf_counter() - start) / 60.0 > args.deadline_min:
            skipped.append({"key": variant.key(), "seed": seed, "reason": f"--deadline-min {args.deadline_min}"})
            continue
        record = train_run(variant, seed, scale, corpus, eval_set, budget=args.budget, time_budget=args.time_budget,
                           device=device, amp=args.amp, optim=optim, progress_bar=not args.no_progress)
        record["setup_tag"] = tag
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        done += 1
        f = record["final"]
        tps = f"{f['tokens_per_s']:.0f}" if f["tokens_per_s"] is not None else "n/a"
        print(f"[quality] {variant.key():45s} seed {seed}: eval loss {f['eval_loss']:.4f} (ppl {f['eval_ppl']:.1f}), "
              f"{record['steps']} steps, {f['flops']:.3g} FLOPs, {f['train_wall_s']:.1f} s, {tps} tok/s", flush=True)
    (out_dir / "skipped.json").unlink(missing_ok=True)
    if skipped:
        (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
        print(f"[quality] {len(skipped)} runs skipped by --deadline-min: {[s['key'] for s in skipped]}", flush=True)
    print(f"[quality] {done} runs in {time.perf_counter() - start:.1f} s -> {out_dir}", flush=True)
    if not args.no_report:
        written = report.write_report(out_dir)
        for p in written:
            print(f"[quality] wrote {p}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
