#!/usr/bin/env python
"""CGGR demo: a tiny GPT trained with ``CGGRLoss`` vs plain cross-entropy, in PyTorch and in JAX/Flax.

``make demo`` (``python examples/demo.py``) runs four short trainings on real text, on CPU, offline:

=============  =========================================================================================
run            what
=============  =========================================================================================
torch-ce       ``transformers`` Llama built from a config, ``torch.optim.AdamW``, mean cross-entropy
torch-cggr     the same model/initialisation/batches, ``cggr_torch.CGGRLoss`` + ``criterion.step()``
jax-ce         ``cggr_jax.models.DecoderLM`` (Flax NNX), ``nnx.Optimizer(optax.adamw)``, mean CE
jax-cggr       the same, ``cggr_jax.CGGRLoss`` with ``optax.chain(advance_curriculum(), adamw)``;
               the curriculum step is read from the optimizer state, all inside one ``nnx.jit`` step
=============  =========================================================================================

CGGR's training loss is the mean cross-entropy over the *selected* (hardest) tokens only,
``loss = Σ_{i∈S} ce_i / |S|`` with ``|S| = k ≈ ratio · n``, so it is not comparable with the full
cross-entropy ``Σ_i ce_i / n`` of the baseline. The comparable quantity is the **held-out cross-entropy
over all tokens** of the last 10 % of the text, measured every ``--eval-every`` steps; that is what the
plot and the summary compare. The curriculum ratio falls linearly from 1 to ``min_tokens_ratio`` over
``warmup_steps`` (SPEC §5.1); the dynamic threshold then raises it by ``(1 − c̄)·sensitivity`` (§5.2).

Outputs (``--out``, default ``out/demo``): ``demo.png`` (held-out CE vs step, token ratio vs step),
``demo_curves.json`` (every curve and the configuration) and a summary table on stdout.
The exit status is 1 when any recorded curve is not finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python examples/demo.py` puts only examples/ on the path
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from examples.data import (  # noqa: E402
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TextSource,
    Tokenizer,
    batch_iterator,
    eval_batches,
    load_text,
    split_train_eval,
)

FRAMEWORKS = ("torch", "jax")
TOKENIZERS = ("char", "byte", "bpe")
PLOT_NAME = "demo.png"
CURVES_NAME = "demo_curves.json"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a run (identical for the four runs except the framework and the loss).

    The defaults train a ~0.4 M-parameter, 2-layer, d=128 decoder for 200 steps of 16 × 64 characters:
    about 1-2 minutes for all four runs on 2 CPU cores. The CGGR warmup is 30 % of the run, so the
    ratio reaches ``min_tokens_ratio`` with 70 % of the steps still to go.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_hidden: int = 384
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 60
    threshold_sensitivity: float = 0.5
    eval_every: int = 20
    eval_batches: int = 4
    log_every: int = 1
    seed: int = 0
    tokenizer: str = "char"
    bpe_vocab_size: int = 512

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "d_model", "num_layers", "num_heads", "mlp_hidden", "eval_every",
                    "eval_batches", "log_every", "bpe_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {self.seq_len!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (0.0 < self.min_tokens_ratio <= 1.0):
            raise ValueError(f"min_tokens_ratio must lie in (0, 1], got {self.min_tokens_ratio!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive finite float, got {self.learning_rate!r}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) with an even "
                "head dimension (rotary embeddings)")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.bpe_vocab_size < 256:
            raise ValueError(f"bpe_vocab_size must be >= 256, got {self.bpe_vocab_size!r}")


#: ``--quick``: a smaller model and a few steps (a smoke test of the whole pipeline, a few seconds).
QUICK: dict[str, int] = dict(steps=6, batch_size=4, seq_len=32, d_model=64, num_layers=2, num_heads=2,
                             mlp_hidden=128, eval_batches=1)


# --------------------------------------------------------------------------------------------------
# Run records
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """The curves of one run. ``steps[j]`` is the 0-based optimizer step of the j-th training record;
    ``eval_steps[j]`` the number of optimizer updates done before the j-th held-out evaluation."""

    name: str
    framework: str
    loss: str
    num_params: int = 0
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    token_ratio: list[float] = field(default_factory=list)
    effective_ratio: list[float] = field(default_factory=list)
    tokens_selected: list[int] = field(default_factory=list)
    tokens_total: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    first_step_seconds: float = 0.0
    eval_seconds: float = 0.0

    def add_step_time(self, seconds: float) -> None:
        """Account the time of the step just recorded; the first one (JIT compilation, lazy init) is also
        kept apart."""
        if len(self.steps) == 1:
            self.first_step_seconds = seconds
        self.train_seconds += seconds

    def steps_per_second(self) -> float:
        """Steady-state speed: the steps after the first over their time (NaN with a single step)."""
        rest = self.train_seconds - self.first_step_seconds
        return (len(self.steps) - 1) / rest if len(self.steps) > 1 and rest > 0 else float("nan")

    def record(self, step: int, loss: float, metrics: dict[str, Any]) -> None:
        self.steps.append(int(step))
        self.train_loss.append(float(loss))
        self.token_ratio.append(float(metrics["token_ratio"]))
        self.effective_ratio.append(float(metrics["effective_ratio"]))
        self.tokens_selected.append(int(metrics["tokens_selected"]))
        self.tokens_total.append(int(metrics["tokens_total"]))

    def curves(self) -> dict[str, list[float] | list[int]]:
        return {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, list)}

    def nonfinite_curves(self) -> list[str]:
        return [k for k, v in self.curves().items() if not all(math.isfinite(x) for x in v)]


def _full_metrics(n_tokens: int) -> dict[str, Any]:
    """Metrics of a plain cross-entropy step: every token is in the loss."""
    return {"token_ratio": 1.0, "effective_ratio": 1.0, "tokens_selected": n_tokens, "tokens_total": n_tokens}


class _Progress:
    """A tqdm bar with the live metrics: loss, ratio/effective ratio, selected/total tokens, last eval."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{name:>10}", unit="step", disable=not enabled, dynamic_ncols=True,
                        leave=True, file=sys.stderr)
        self.eval_loss: float | None = None

    def update(self, n: int, loss: float, metrics: dict[str, Any]) -> None:
        text = (f"loss={loss:.3f} ratio={float(metrics['token_ratio']):.3f} "
                f"eff={float(metrics['effective_ratio']):.3f} "
                f"sel={int(metrics['tokens_selected'])}/{int(metrics['tokens_total'])}")
        if self.eval_loss is not None:
            text += f" eval_ce={self.eval_loss:.3f}"
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _eval_schedule(cfg: DemoConfig) -> set[int]:
    """Update counts after which the held-out CE is measured: 0, every ``eval_every``, and the end."""
    return set(range(0, cfg.steps, cfg.eval_every)) | {cfg.steps}


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------


def train_torch(cfg: DemoConfig, train_batches: Iterator[np.ndarray], held_out: list[np.ndarray],
                vocab_size: int, *, use_cggr: bool, device: str, progress: bool) -> RunResult:
    """Train the ``transformers`` Llama with plain CE or ``cggr_torch.CGGRLoss``; return its curves."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cggr_torch.loss import CGGRLoss
    from cggr_torch.utils import shift_for_causal_lm

    run = RunResult(name="torch-cggr" if use_cggr else "torch-ce", framework="torch",
                    loss="cggr" if use_cggr else "cross_entropy")
    torch.manual_seed(cfg.seed)
    model_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=False, use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(model_config).to(device)
    model.train()
    run.num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    criterion = (CGGRLoss(min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps,
                          threshold_sensitivity=cfg.threshold_sensitivity) if use_cggr else None)

    @torch.no_grad()
    def held_out_ce() -> float:
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for batch in held_out:
            ids = torch.from_numpy(batch).long().to(device)
            logits, labels = shift_for_causal_lm(model(input_ids=ids).logits, ids)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                     reduction="sum").double()
            count += labels.numel()
        model.train()
        return float(total) / count

    evals = _eval_schedule(cfg)
    bar = _Progress(run.name, cfg.steps, progress)
    pending = 0
    try:
        for step in range(cfg.steps + 1):
            if step in evals:
                t0 = time.perf_counter()
                run.eval_steps.append(step)
                run.eval_loss.append(held_out_ce())
                bar.eval_loss = run.eval_loss[-1]
                run.eval_seconds += time.perf_counter() - t0
            if step == cfg.steps:
                break
            t0 = time.perf_counter()
            ids = torch.from_numpy(next(train_batches)).long().to(device)
            logits, labels = shift_for_causal_lm(model(input_ids=ids).logits, ids)
            if criterion is not None:
                loss = criterion(logits, labels)
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Logging reads values back (one host sync per step); forward/backward above never do.
            metrics = criterion.get_metrics() if criterion is not None else _full_metrics(labels.numel())
            if criterion is not None:
                criterion.step()  # advance the curriculum after the optimizer step
            run.record(step, loss.item(), metrics)
            run.add_step_time(time.perf_counter() - t0)
            pending += 1
            if pending == cfg.log_every or step == cfg.steps - 1:
                bar.update(pending, run.train_loss[-1], metrics)
                pending = 0
    finally:
        bar.close()
    return run


# --------------------------------------------------------------------------------------------------
# JAX / Flax NNX
# --------------------------------------------------------------------------------------------------


@functools.cache
def _jax_eval_sum() -> Any:
    """``nnx.jit``-ed sum of the token cross-entropies of one batch (full CE, every prediction)."""
    import optax
    from flax import nnx

    from cggr_jax.utils import shift_for_causal_lm

    @nnx.jit
    def eval_sum(model: Any, ids: Any) -> Any:
        logits, labels = shift_for_causal_lm(model(ids), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    return eval_sum


def train_jax(cfg: DemoConfig, train_batches: Iterator[np.ndarray], held_out: list[np.ndarray],
              vocab_size: int, *, use_cggr: bool, progress: bool) -> RunResult:
    """Train ``cggr_jax.models.DecoderLM`` with plain CE or ``cggr_jax.CGGRLoss``; return its curves."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cggr_jax.loss import CGGRLoss, metrics_to_dict
    from cggr_jax.models import DecoderConfig, DecoderLM
    from cggr_jax.integrations import advance_curriculum, current_step
    from cggr_jax.utils import shift_for_causal_lm

    run = RunResult(name="jax-cggr" if use_cggr else "jax-ce", framework="jax",
                    loss="cggr" if use_cggr else "cross_entropy")
    model = DecoderLM(
        DecoderConfig(vocab_size=vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                      num_heads=cfg.num_heads, max_seq_len=cfg.seq_len, mlp_hidden_dim=cfg.mlp_hidden),
        rngs=nnx.Rngs(cfg.seed),
    )
    run.num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    adamw = optax.adamw(cfg.learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=cfg.weight_decay)

    if use_cggr:
        loss_fn = CGGRLoss(min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps,
                           threshold_sensitivity=cfg.threshold_sensitivity)
        optimizer = nnx.Optimizer(model, optax.chain(advance_curriculum(), adamw), wrt=nnx.Param)

        @nnx.jit
        def train_step(model: DecoderLM, optimizer: nnx.Optimizer, ids: jax.Array):
            step = current_step(optimizer.opt_state)  # the curriculum step lives in the optimizer state

            def loss_of(model: DecoderLM):
                logits, labels = shift_for_causal_lm(model(ids), ids)
                return loss_fn(logits, labels, step)

            (loss, metrics), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
            optimizer.update(model, grads, cggr_metrics=metrics)
            return loss, metrics
    else:
        loss_fn = None
        optimizer = nnx.Optimizer(model, adamw, wrt=nnx.Param)

        @nnx.jit
        def train_step(model: DecoderLM, optimizer: nnx.Optimizer, ids: jax.Array):
            def loss_of(model: DecoderLM):
                logits, labels = shift_for_causal_lm(model(ids), ids)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_of)(model)
            optimizer.update(model, grads)
            return loss, None

    eval_sum = _jax_eval_sum()  # shared by both JAX runs: compiled once for the model's structure
    held_out_dev = [jnp.asarray(b) for b in held_out]
    held_out_count = sum(b.shape[0] * (b.shape[1] - 1) for b in held_out)

    def held_out_ce() -> float:
        total = sum(float(eval_sum(model, b)) for b in held_out_dev)
        return total / held_out_count

    evals = _eval_schedule(cfg)
    bar = _Progress(run.name, cfg.steps, progress)
    pending = 0
    try:
        for step in range(cfg.steps + 1):
            if step in evals:
                t0 = time.perf_counter()
                run.eval_steps.append(step)
                run.eval_loss.append(held_out_ce())
                bar.eval_loss = run.eval_loss[-1]
                run.eval_seconds += time.perf_counter() - t0
            if step == cfg.steps:
                break
            t0 = time.perf_counter()
            ids = jnp.asarray(next(train_batches))
            loss, metrics = train_step(model, optimizer, ids)
            if loss_fn is not None:
                metrics = metrics_to_dict(metrics, loss_fn)  # host read-back, for logging only
                if int(metrics["step"]) != step:
                    raise RuntimeError(f"curriculum step {metrics['step']} read from the optimizer state "
                                       f"disagrees with the loop's update count {step}")
            else:
                metrics = _full_metrics(ids.shape[0] * (ids.shape[1] - 1))
            run.record(step, float(loss), metrics)
            run.add_step_time(time.perf_counter() - t0)
            pending += 1
            if pending == cfg.log_every or step == cfg.steps - 1:
                bar.update(pending, run.train_loss[-1], metrics)
                pending = 0
    finally:
        bar.close()
    if loss_fn is not None and int(current_step(optimizer.opt_state)) != cfg.steps:
        raise RuntimeError(f"advance_curriculum counted {int(current_step(optimizer.opt_state))} updates, "
                           f"expected {cfg.steps}")
    return run


# --------------------------------------------------------------------------------------------------
# Data, plot, report
# --------------------------------------------------------------------------------------------------


def build_tokenizer(cfg: DemoConfig, source: TextSource) -> Tokenizer:
    """The demo's tokenizer: characters of the whole text, raw bytes, or BPE trained on the train part."""
    if cfg.tokenizer == "char":
        return CharTokenizer.from_text(source.text)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    cut = len(source.text) - len(source.text) // 10  # train the BPE merges on the training 90 % only
    return BPETokenizer.train(source.text[:cut], cfg.bpe_vocab_size)


def plot_curves(runs: Sequence[RunResult], cfg: DemoConfig, source: TextSource, path: Path) -> None:
    """Held-out full cross-entropy vs step (all runs) and the token ratio vs step (CGGR runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"torch": "tab:blue", "jax": "tab:orange"}
    fig, (ax_ce, ax_ratio) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in runs:
        style = "-" if run.loss == "cggr" else "--"
        ax_ce.plot(run.eval_steps, run.eval_loss, style, marker="o", ms=3, color=colors[run.framework],
                   label=run.name)
    ax_ce.set_xlabel("optimizer step")
    ax_ce.set_ylabel("held-out cross-entropy, all tokens (nats/token)")
    ax_ce.set_title("Held-out CE on every token (the comparable metric)\n"
                    "training losses are not comparable: CGGR's loss covers only the selected hard tokens",
                    fontsize=9)
    ax_ce.grid(alpha=0.3)
    ax_ce.legend()

    ax_ratio.axhline(1.0, color="gray", ls="--", lw=1, label="plain CE (all tokens)")
    for run in runs:
        if run.loss != "cggr":
            continue
        c = colors[run.framework]
        ax_ratio.plot(run.steps, run.token_ratio, ":", color=c, label=f"{run.name} token_ratio (curriculum)")
        ax_ratio.plot(run.steps, run.effective_ratio, "-", color=c, lw=1,
                      label=f"{run.name} effective_ratio (dynamic)")
        frac = [s / t if t else 0.0 for s, t in zip(run.tokens_selected, run.tokens_total)]
        ax_ratio.plot(run.steps, frac, ".", color=c, ms=2, alpha=0.6,
                      label=f"{run.name} tokens_selected / tokens_total")
    ax_ratio.axvline(cfg.warmup_steps, color="k", lw=0.8, alpha=0.4)
    ax_ratio.set_ylim(0.0, 1.05)
    ax_ratio.set_xlabel("optimizer step")
    ax_ratio.set_ylabel("fraction of tokens in the loss")
    ax_ratio.set_title(f"Token ratio: 1 → {cfg.min_tokens_ratio} over {cfg.warmup_steps} warmup steps "
                       f"(vertical line), then × (1 + (1 − c̄)·{cfg.threshold_sensitivity})", fontsize=9)
    ax_ratio.grid(alpha=0.3)
    ax_ratio.legend(fontsize=7, loc="center right")
    fig.suptitle(f"CGGR demo — {source.name}, {cfg.tokenizer} tokens, {cfg.num_layers}-layer d={cfg.d_model} "
                 f"decoder, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(runs: Sequence[RunResult], cfg: DemoConfig) -> str:
    """A plain-text table: final/best held-out CE, share of tokens in the loss after warmup, time."""
    head = (f"{'run':<11}{'params':>9}{'held-out CE':>13}{'best':>8}{'tokens in loss':>16}"
            f"{'train s':>9}{'step/s':>8}")
    lines = [head, "-" * len(head)]
    for run in runs:
        after = [i for i, s in enumerate(run.steps) if s >= cfg.warmup_steps] or list(range(len(run.steps)))
        sel = sum(run.tokens_selected[i] for i in after)
        tot = sum(run.tokens_total[i] for i in after)
        share = sel / tot if tot else float("nan")
        rate = run.steps_per_second()
        lines.append(f"{run.name:<11}{run.num_params:>9,}{run.eval_loss[-1]:>13.4f}{min(run.eval_loss):>8.4f}"
                     f"{share:>15.1%} {run.train_seconds:>8.1f}{rate:>8.1f}")
    lines.append(f"held-out CE: mean cross-entropy over all {cfg.eval_batches}×{cfg.batch_size}×{cfg.seq_len - 1} "
                 "held-out predictions (last 10 % of the text); tokens in loss: after warmup;\n"
                 "train s: all training steps incl. the first (JIT compilation); step/s: after the first.")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by ``None`` (strict JSON has no NaN/inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; 6 with --quick)")
    p.add_argument("--frameworks", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--text", default=None, help="train on this text file instead of the default corpus")
    p.add_argument("--out", default=str(REPO_ROOT / "out" / "demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batch-order seed")
    p.add_argument("--quick", action="store_true", help="a few steps of a smaller model (smoke test)")
    p.add_argument("--warmup-steps", type=int, default=None, help="CGGR warmup (default 30%% of --steps)")
    p.add_argument("--min-tokens-ratio", type=float, default=0.25, help="CGGR ratio after warmup")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    p.add_argument("--device", default="cpu", help="PyTorch device (JAX uses its default backend)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> DemoConfig:
    """The run configuration from the command line (``--quick`` shrinks the model and the run).

    Unless given, the warmup is 30 % of the steps and the held-out CE is measured every 10 % of them.
    """
    base: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    steps = int(base.get("steps", DemoConfig.steps))
    base["warmup_steps"] = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.3 * steps))
    base["eval_every"] = args.eval_every if args.eval_every is not None else max(1, steps // 10)
    base.update(seed=args.seed, min_tokens_ratio=args.min_tokens_ratio, tokenizer=args.tokenizer)
    return DemoConfig(**base)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = [f for f in frameworks if f not in FRAMEWORKS]
    if not frameworks or bad:
        print(f"demo.py: error: --frameworks must be a comma-separated subset of {','.join(FRAMEWORKS)}, "
              f"got {args.frameworks!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    source = load_text(args.text)
    tokenizer = build_tokenizer(cfg, source)
    ids = tokenizer.encode(source.text)
    train_ids, eval_ids = split_train_eval(ids, 0.1)
    held_out = eval_batches(eval_ids, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)
    print(f"text: {source.name} ({source.origin}), {len(source.text):,} chars -> {len(ids):,} {cfg.tokenizer} "
          f"tokens, vocab {tokenizer.vocab_size}; train {len(train_ids):,} / held-out {len(eval_ids):,} tokens")
    print(f"config: {cfg}")
    progress = not args.no_progress

    runs: list[RunResult] = []
    t_start = time.perf_counter()
    for framework in frameworks:
        for use_cggr in (False, True):
            batches = batch_iterator(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed)  # same stream
            if framework == "torch":
                runs.append(train_torch(cfg, batches, held_out, tokenizer.vocab_size, use_cggr=use_cggr,
                                        device=args.device, progress=progress))
            else:
                runs.append(train_jax(cfg, batches, held_out, tokenizer.vocab_size, use_cggr=use_cggr,
                                      progress=progress))
    total_seconds = time.perf_counter() - t_start

    result = {
        "config": dataclasses.asdict(cfg),
        "frameworks": frameworks,
        "text": {"name": source.name, "origin": source.origin, "chars": len(source.text), "tokens": int(len(ids)),
                 "tokenizer": cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                 "train_tokens": int(len(train_ids)), "eval_tokens": int(len(eval_ids)),
                 "eval_predictions": int(sum(b.shape[0] * (b.shape[1] - 1) for b in held_out))},
        "notes": "eval_loss is the held-out mean cross-entropy over all tokens (comparable across runs); "
                 "train_loss of CGGR runs covers only the selected tokens and is not comparable.",
        "total_seconds": total_seconds,
        "runs": {run.name: {"framework": run.framework, "loss": run.loss, "num_params": run.num_params,
                            "train_seconds": run.train_seconds,
                            "first_step_seconds": run.first_step_seconds, "eval_seconds": run.eval_seconds, **run.curves()}
                 for run in runs},
    }
    curves_path = out / CURVES_NAME
    curves_path.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot_path = out / PLOT_NAME
    plot_curves(runs, cfg, source, plot_path)

    print()
    print(summary_table(runs, cfg))
    print(f"\nall runs: {total_seconds:.1f} s; plot: {plot_path}; curves: {curves_path}")
    broken = {run.name: run.nonfinite_curves() for run in runs if run.nonfinite_curves()}
    if broken:
        print(f"demo.py: error: non-finite values in {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # OpenMP threads that spin while waiting make PyTorch on a small, shared CPU machine many times slower
    # (measured: 1.1 s instead of 0.08 s of CPU per step on 2 busy cores); passive waiting costs nothing
    # here. Set before torch is first imported (it is imported lazily); an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
