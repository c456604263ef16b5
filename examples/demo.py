#!/usr/bin/env python
"""CGGR demo with a verdict: standard training vs random vs CGGR selection, at token level and by batch splitting,
in PyTorch and in JAX/Flax, compared on held-out loss against optimizer steps *and* against wall-clock time.

``make demo`` (``python examples/demo.py``) trains a tiny decoder on real text (Tiny Shakespeare when present,
else the Python standard library's sources), on CPU, offline. Seven arms per framework, from the same
initialisation and the same batches (``ratio`` = ``--min-tokens-ratio``, 0.25):

================  ==============================================================================================
arm               what one training step does
================  ==============================================================================================
``standard``      mean cross-entropy over every token of the batch
``random_token``  the fair baseline of token selection: the loss is the mean cross-entropy of a uniformly random
                  (seeded) subset of the tokens whose size follows CGGR's count rule: the curriculum ratio raised
                  by the dynamic threshold from the batch's mean confidence (SPEC §5.1-§5.3)
``cggr_token``    ``CGGRLoss`` with its defaults (``combined`` scoring, ``stratified`` selection, dynamic
                  threshold 0.5) except a short curriculum: the ratio falls from 1 to ``ratio`` over the first
                  ``warmup_steps`` (20 % of the run) instead of 1000 steps
``random_seq``    a uniformly random (seeded) ``ratio`` of the *sequences* of each batch, forward + backward on
                  those rows only (the baseline of batch splitting)
``cggr_split``    batch splitting (SPEC §9): PyTorch ``CGGRModel``, JAX ``make_batch_split_train_step``; a router
                  made of the model's first ``router_layers`` block(s) scores the sequences and the full model
                  trains only the hardest ``ratio`` of them (``selection="fixed_quota"``, so it keeps exactly
                  as many sequences as ``random_seq``; same curriculum)
``excess_token``  ``CGGRLoss(scoring="excess", selection="topk")`` with ``cggr_token``'s count rule (curriculum and
                  dynamic threshold): the tokens whose learner loss most exceeds a reference model's loss on them
                  (SPEC §3.1), with the reference's per-token NLL of the batch as ``reference_nll``
``excess_split``  ``cggr_split`` with ``scoring="excess"`` (SPEC §9.1): the router's mean loss of a sequence minus
                  the reference's mean loss of it (a per-sequence ``(B,)`` ``reference_nll``)
================  ==============================================================================================

The reference model of the excess arms (one per framework, the arms' own architecture and initial weights) is
trained by the toolkit's ``train_reference_model`` for ``reference_steps`` updates on the **reference slice**:
the last ``reference_fraction`` (10 %) of the text *before* the held-out tail, carved from the training part, so
the arms never train on it and it is never evaluated. Its per-token NLL of every training batch is computed once
(``token_nll``) before the arms start; that time and the reference's training time are reported apart
(``reference`` in the JSON and the summary), not counted in any arm's wall-clock.

PyTorch trains a ``transformers`` Llama built from a config with ``torch.optim.AdamW``; JAX trains
``cggr_jax.models.DecoderLM`` (Flax NNX) with ``optax.adamw`` (chained after ``advance_curriculum()``), with
the batch-split arms in ``BatchSplitTrainStep``. Within a framework every arm starts from the same weights.

What is compared: the **held-out cross-entropy over all tokens** of the last 10 % of the text (the training
losses of the selection arms cover only the selected tokens and are not comparable), against the optimizer step
and against the training wall-clock (evaluation excluded). The arms of a framework run **interleaved**, one
step of each in turn, so that the load of a shared machine falls on all of them alike; before timing, each arm
makes one warm-up step on a throwaway copy (JAX compilation, lazy initialisation), reported apart.

Outputs (``--out``, default ``out/demo``): ``demo.png`` (held-out CE vs step and vs wall-clock, and the share of
tokens trained per step), ``demo_curves.json`` (every curve, the configuration and the verdict), and on stdout
a summary table and the **verdict**, computed from the numbers. The exit status is 1 when a curve is not finite.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
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
ARMS = ("standard", "random_token", "cggr_token", "random_seq", "cggr_split", "excess_token", "excess_split")
TOKEN_ARMS = ("random_token", "cggr_token", "excess_token")
SEQUENCE_ARMS = ("random_seq", "cggr_split", "excess_split")
#: The arms that read the reference model's loss (``scoring="excess"``).
EXCESS_ARMS = ("excess_token", "excess_split")
TOKENIZERS = ("char", "byte", "bpe")
PLOT_NAME = "demo.png"
CURVES_NAME = "demo_curves.json"

#: Two held-out CEs closer than this count as a tie in the verdict's wording (one seed, no significance test).
TIE_NATS = 0.01

#: The project's quality study (benchmarks/quality/RESULTS.md, round 1: a real code corpus, 23 M-parameter
#: model, 3 seeds). Quoted in the verdict as the study's finding, never as something this demo measured.
STUDY_CGGR_VS_RANDOM_NATS = +0.21
STUDY_EXCESS_VS_RANDOM_NATS = -0.21
#: The same study at token level: excess top-k tokens against random tokens (6 seeds).
STUDY_EXCESS_TOKEN_VS_RANDOM_NATS = -0.10
#: Round 3, the next scale (S2, 3 seeds, a stronger reference): the 1-layer excess router against a random subset,
#: and excess tokens against random tokens (they lost).
STUDY_S2_EXCESS_VS_RANDOM_NATS = -0.037
STUDY_S2_EXCESS_TOKEN_VS_RANDOM_NATS = +0.215
#: Round 4, the last (M, 110 M parameters, 3 seeds): the same router against a random subset on val, and on the
#: held-out test split (read once), where the gain was not resolved.
STUDY_M_EXCESS_VS_RANDOM_NATS = -0.097
STUDY_M_EXCESS_VS_RANDOM_TEST_NATS = -0.025


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines the runs (identical for all arms except the arm itself).

    ``min_tokens_ratio`` is the demo's ``ratio``: the share of tokens (token arms) or of sequences (sequence
    arms) trained once the curriculum of ``warmup_steps`` steps is over. ``router_layers`` is the depth of the
    batch-split router (the model's first block(s)). The excess arms' reference model trains ``reference_steps``
    updates of ``reference_batch_size`` chunks on the last ``reference_fraction`` of the text before the held-out
    tail (taken out of the training part).
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_hidden: int = 192
    router_layers: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 40
    threshold_sensitivity: float = 0.5
    eval_every: int = 10
    eval_batches: int = 4
    seed: int = 0
    tokenizer: str = "char"
    bpe_vocab_size: int = 512
    reference_steps: int = 60
    reference_batch_size: int = 32
    reference_fraction: float = 0.1

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "d_model", "num_layers", "num_heads", "mlp_hidden", "router_layers",
                    "eval_every", "eval_batches", "bpe_vocab_size", "reference_steps", "reference_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {self.seq_len!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.router_layers > self.num_layers:
            raise ValueError(f"router_layers ({self.router_layers}) must not exceed num_layers ({self.num_layers})")
        if not (0.0 < self.min_tokens_ratio <= 1.0):
            raise ValueError(f"min_tokens_ratio must lie in (0, 1], got {self.min_tokens_ratio!r}")
        if not (0.0 < self.reference_fraction < 0.9):
            raise ValueError(f"reference_fraction must lie in (0, 0.9), got {self.reference_fraction!r}")
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

    @property
    def predictions(self) -> int:
        """Next-token predictions (= trainable tokens) of one batch: ``batch_size · (seq_len − 1)``."""
        return self.batch_size * (self.seq_len - 1)


#: ``--quick``: a smaller model and a few steps (a smoke test of the whole pipeline).
QUICK: dict[str, int] = dict(steps=8, batch_size=8, seq_len=32, d_model=32, num_layers=1, num_heads=2,
                             mlp_hidden=64, eval_batches=1, reference_steps=4, reference_batch_size=8)


# --------------------------------------------------------------------------------------------------
# Run records
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """The curves of one arm in one framework.

    ``steps[j]`` is the 0-based optimizer step of the j-th training record and ``step_seconds[j]`` its wall-clock
    time; ``eval_steps[j]`` is the number of updates done before the j-th held-out evaluation and
    ``eval_wallclock[j]`` the training seconds spent until then (evaluations and the warm-up excluded).
    ``tokens_total``: next-token predictions in the batch (the input); ``tokens_selected``: those in the loss
    (trained); ``sequences_selected``: rows that ran forward + backward.
    """

    name: str
    framework: str
    arm: str
    num_params: int = 0
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    token_ratio: list[float] = field(default_factory=list)
    effective_ratio: list[float] = field(default_factory=list)
    tokens_selected: list[int] = field(default_factory=list)
    tokens_total: list[int] = field(default_factory=list)
    sequences_selected: list[int] = field(default_factory=list)
    sequences_total: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_wallclock: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def train_seconds(self) -> float:
        return float(sum(self.step_seconds))

    def record(self, step: int, loss: float, metrics: dict[str, Any], seconds: float) -> None:
        self.steps.append(int(step))
        self.train_loss.append(float(loss))
        for key in ("token_ratio", "effective_ratio"):
            getattr(self, key).append(float(metrics[key]))
        for key in ("tokens_selected", "tokens_total", "sequences_selected", "sequences_total"):
            getattr(self, key).append(int(metrics[key]))
        self.step_seconds.append(float(seconds))

    def record_eval(self, step: int, loss: float, seconds: float) -> None:
        self.eval_steps.append(int(step))
        self.eval_wallclock.append(self.train_seconds)
        self.eval_loss.append(float(loss))
        self.eval_seconds += seconds

    def ms_per_step(self, first: int = 0) -> float:
        """Mean milliseconds per step over the steps ``>= first`` (NaN when there is none)."""
        times = [t for s, t in zip(self.steps, self.step_seconds) if s >= first]
        return 1000.0 * sum(times) / len(times) if times else float("nan")

    def tokens_per_second(self) -> tuple[float, float]:
        """(input, trained) next-token predictions per training second."""
        seconds = self.train_seconds
        if seconds <= 0:
            return float("nan"), float("nan")
        return sum(self.tokens_total) / seconds, sum(self.tokens_selected) / seconds

    def curves(self) -> dict[str, list[float] | list[int]]:
        return {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, list)}

    def summary(self, warmup_steps: int) -> dict[str, float]:
        inp, trained = self.tokens_per_second()
        return {"train_seconds": self.train_seconds, "warmup_seconds": self.warmup_seconds,
                "eval_seconds": self.eval_seconds, "ms_per_step": self.ms_per_step(),
                "ms_per_step_after_curriculum": self.ms_per_step(warmup_steps),
                "input_tokens_per_s": inp, "trained_tokens_per_s": trained,
                "final_eval_loss": self.eval_loss[-1] if self.eval_loss else float("nan")}

    def nonfinite_curves(self) -> list[str]:
        return [k for k, v in self.curves().items() if not all(math.isfinite(x) for x in v)]


def _all_tokens(cfg: DemoConfig) -> dict[str, Any]:
    """Metrics of a step that trains every token of every sequence."""
    return {"token_ratio": 1.0, "effective_ratio": 1.0, "tokens_selected": cfg.predictions,
            "tokens_total": cfg.predictions, "sequences_selected": cfg.batch_size, "sequences_total": cfg.batch_size}


def _eval_schedule(cfg: DemoConfig) -> set[int]:
    """Update counts after which the held-out CE is measured: 0, every ``eval_every``, and the end."""
    return set(range(0, cfg.steps, cfg.eval_every)) | {cfg.steps}


class _Progress:
    """A tqdm bar per framework with the live metrics of the arm that stepped last."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{name:>6}", unit="step", disable=not enabled, dynamic_ncols=True,
                        leave=True, file=sys.stderr)

    def update(self, runs: Sequence[RunResult]) -> None:
        parts = []
        for run in runs:
            text = f"{run.arm}: sel={run.tokens_selected[-1]}/{run.tokens_total[-1]}"
            if run.eval_loss:
                text += f" eval_ce={run.eval_loss[-1]:.3f}"
            parts.append(text)
        self.bar.set_postfix_str("; ".join(parts), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------


def torch_model(cfg: DemoConfig, vocab_size: int, device: str) -> Any:
    """The demo's Llama, initialised from ``cfg.seed`` (the same initial weights at every call)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(cfg.seed)
    model_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=False, use_cache=False,
    )
    return AutoModelForCausalLM.from_config(model_config).to(device)


class TorchArm:
    """One PyTorch arm: the model, its optimizer and the arm's training step (public ``cggr_torch`` API only)."""

    def __init__(self, arm: str, cfg: DemoConfig, vocab_size: int, device: str) -> None:
        import torch

        from cggr_torch import CGGRLoss, CGGRModel, linear_warmup_ratio

        self.arm, self.cfg, self.device = arm, cfg, device
        self.model = torch_model(cfg, vocab_size, device)  # the same initial weights in every arm
        self.model.train()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                           eps=1e-8, weight_decay=cfg.weight_decay)
        self.schedule = linear_warmup_ratio(cfg.min_tokens_ratio, cfg.warmup_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the random arms' choices
        self.step_count = 0
        self.criterion = None
        if arm == "cggr_token":
            self.criterion = CGGRLoss(min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps)
        elif arm == "excess_token":  # cggr_token's count rule, excess scores, the top-k of them
            self.criterion = CGGRLoss(scoring="excess", selection="topk", min_tokens_ratio=cfg.min_tokens_ratio,
                                      warmup_steps=cfg.warmup_steps)
        # fixed_quota: exactly num_selected(B, base ratio) sequences, the count random_seq keeps.
        self.split = (CGGRModel(self.model, router_layers=cfg.router_layers, selection="fixed_quota",
                                scoring="excess" if arm == "excess_split" else "combined",
                                min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps)
                      if arm in ("cggr_split", "excess_split") else None)

    def _ce(self, logits: Any, labels: Any, reduction: str = "mean") -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction=reduction)

    def train_step(self, batch: np.ndarray, reference_nll: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
        """One optimizer step; returns the training loss and the step's counts (read back for logging).
        ``reference_nll``: the reference model's float32 NLL ``(B, T − 1)`` of the batch's predictions (aligned
        with the shifted targets), read by the excess arms only."""
        import torch

        from cggr_torch import dynamic_ratio, num_selected, select_tokens, shift_for_causal_lm, token_statistics

        cfg = self.cfg
        ids = torch.from_numpy(batch).long().to(self.device)
        metrics = _all_tokens(cfg)
        if self.arm == "standard":
            logits, labels = shift_for_causal_lm(self.model(input_ids=ids).logits, ids)
            loss = self._ce(logits, labels)
        elif self.arm == "cggr_token":
            logits, labels = shift_for_causal_lm(self.model(input_ids=ids).logits, ids)
            loss = self.criterion(logits, labels)
        elif self.arm == "excess_token":
            logits, labels = shift_for_causal_lm(self.model(input_ids=ids).logits, ids)
            loss = self.criterion(logits, labels, reference_nll=torch.from_numpy(reference_nll).to(self.device))
        elif self.arm == "random_token":
            logits, labels = shift_for_causal_lm(self.model(input_ids=ids).logits, ids)
            ce = self._ce(logits, labels, "none").reshape(labels.shape)
            with torch.no_grad():
                # CGGR's count rule (curriculum, then the dynamic threshold from the batch's mean confidence),
                # but the tokens are a uniformly random subset: top-k of uniform noise.
                confidence = token_statistics(logits.detach()).confidence
                base = self.schedule(self.step_count)
                ratio = dynamic_ratio(base, confidence.mean(), cfg.threshold_sensitivity)
                noise = torch.rand(labels.shape, generator=self.generator).to(self.device)
                mask, k = select_tokens(noise, torch.ones_like(labels, dtype=torch.bool), ratio, selection="topk")
            loss = torch.where(mask, ce, torch.zeros_like(ce)).sum() / k.clamp(min=1)
            metrics.update(token_ratio=float(base), effective_ratio=float(ratio), tokens_selected=int(k))
        elif self.arm == "random_seq":
            base = self.schedule(self.step_count)
            k = int(num_selected(ids.shape[0], base))
            rows = torch.randperm(ids.shape[0], generator=self.generator)[:k].sort().values.to(self.device)
            sub = ids.index_select(0, rows)
            logits, labels = shift_for_causal_lm(self.model(input_ids=sub).logits, sub)
            loss = self._ce(logits, labels)
            metrics.update(token_ratio=float(base), effective_ratio=float(base), tokens_selected=labels.numel(),
                           sequences_selected=k)
        elif self.arm == "excess_split":  # per sequence: the reference's mean loss of each row (SPEC §9.1)
            ref = torch.from_numpy(reference_nll.mean(axis=1, dtype=np.float32)).to(self.device)
            loss = self.split(ids, labels=ids, reference_nll=ref)
        else:  # cggr_split
            loss = self.split(ids, labels=ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # Logging reads values back (one host sync per step); the forward/backward above never do.
        if self.criterion is not None:
            m = self.criterion.get_metrics()
            metrics.update(token_ratio=m["token_ratio"], effective_ratio=m["effective_ratio"],
                           tokens_selected=m["tokens_selected"], tokens_total=m["tokens_total"])
            self.criterion.step()  # advance the curriculum after the optimizer step
        if self.split is not None:
            m = self.split.get_metrics()
            metrics.update(token_ratio=m["token_ratio"], effective_ratio=m["effective_ratio"],
                           tokens_selected=m["tokens_selected"], tokens_total=m["tokens_total"],
                           sequences_selected=m["sequences_selected"], sequences_total=m["sequences_total"])
            self.split.step()
        self.step_count += 1
        return loss.item(), metrics

    def held_out_ce(self, held_out: list[np.ndarray]) -> float:
        """Mean cross-entropy over every held-out prediction (float64 accumulation)."""
        import torch

        from cggr_torch import shift_for_causal_lm

        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in held_out:
                ids = torch.from_numpy(batch).long().to(self.device)
                logits, labels = shift_for_causal_lm(self.model(input_ids=ids).logits, ids)
                total += float(self._ce(logits, labels, "sum").double())
                count += labels.numel()
        self.model.train()
        return total / count


def _torch_warmup(arm: str, cfg: DemoConfig, vocab_size: int, device: str, batch: np.ndarray,
                  reference_nll: np.ndarray | None) -> float:
    """Seconds of one step of a throwaway copy of the arm (lazy initialisation happens outside the timing)."""
    t0 = time.perf_counter()
    TorchArm(arm, cfg, vocab_size, device).train_step(batch, reference_nll)
    return time.perf_counter() - t0


def reference_chunks(reference_ids: np.ndarray, cfg: DemoConfig) -> np.ndarray:
    """The reference slice cut into consecutive, non-overlapping chunks ``(n, seq_len)`` (inputs ``row[:-1]``,
    targets ``row[1:]``: the arms' ``seq_len − 1`` predictions per row)."""
    n = len(reference_ids) // cfg.seq_len
    if n < 1:
        raise ValueError(f"the reference slice ({len(reference_ids)} tokens) holds no chunk of seq_len "
                         f"{cfg.seq_len}: use a longer text or a larger reference_fraction")
    return np.ascontiguousarray(reference_ids[:n * cfg.seq_len].reshape(n, cfg.seq_len))


def torch_reference(cfg: DemoConfig, vocab_size: int, device: str, reference_ids: np.ndarray,
                    batches: Sequence[np.ndarray], held_out: Sequence[np.ndarray]
                    ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Train the PyTorch reference model on the reference slice and return its float32 NLL ``(B, T − 1)`` of
    every training batch (``cggr_torch.reference.token_nll``) and what it cost (seconds, held-out CE)."""
    import torch

    from cggr_torch.reference import token_nll, train_reference_model

    chunks = reference_chunks(reference_ids, cfg)
    model = torch_model(cfg, vocab_size, device)
    t0 = time.perf_counter()
    train_reference_model(model, chunks, steps=cfg.reference_steps, batch_size=cfg.reference_batch_size,
                          lr=cfg.learning_rate, seed=cfg.seed)
    t1 = time.perf_counter()

    def nll(batch: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(batch).long().to(device)
        return token_nll(model(input_ids=ids[:, :-1]).logits, ids[:, 1:]).cpu().numpy()

    with torch.no_grad():
        refs = [nll(b) for b in batches]
        t2 = time.perf_counter()
        held = float(np.mean(np.concatenate([nll(b).ravel() for b in held_out]), dtype=np.float64))
    return refs, _reference_info(cfg, chunks, t1 - t0, t2 - t1, held)


def _reference_info(cfg: DemoConfig, chunks: np.ndarray, train_s: float, score_s: float,
                    held_out_ce: float) -> dict[str, Any]:
    return {"steps": cfg.reference_steps, "batch_size": cfg.reference_batch_size, "chunks": int(chunks.shape[0]),
            "train_seconds": train_s, "score_seconds": score_s, "held_out_ce": held_out_ce}


# --------------------------------------------------------------------------------------------------
# JAX / Flax NNX
# --------------------------------------------------------------------------------------------------


@functools.cache
def _jax_eval_sum() -> Any:
    """``nnx.jit``-ed sum of the token cross-entropies of one batch (full CE, every prediction)."""
    import optax
    from flax import nnx

    from cggr_jax import shift_for_causal_lm

    @nnx.jit
    def eval_sum(model: Any, ids: Any) -> Any:
        logits, labels = shift_for_causal_lm(model(ids), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    return eval_sum


@functools.cache
def _jax_token_step(arm: str, cfg: DemoConfig) -> Any:
    """The ``nnx.jit`` step ``(model, optimizer, ids, reference_nll) -> (loss, metrics)`` of a token-level JAX arm
    (``reference_nll``: ``(B, T − 1)`` for ``excess_token``, else None); cached so that
    the warm-up copy and the timed run share one compilation. The curriculum step is read from the optimizer
    state (``advance_curriculum``), everything inside one jitted step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cggr_jax import (CGGRLoss, current_step, dynamic_ratio, linear_warmup_ratio, select_tokens,
                          shift_for_causal_lm, token_statistics)

    loss_fn = None
    if arm == "cggr_token":
        loss_fn = CGGRLoss(min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps)
    elif arm == "excess_token":  # cggr_token's count rule, excess scores, the top-k of them
        loss_fn = CGGRLoss(scoring="excess", selection="topk", min_tokens_ratio=cfg.min_tokens_ratio,
                           warmup_steps=cfg.warmup_steps)
    schedule = linear_warmup_ratio(cfg.min_tokens_ratio, cfg.warmup_steps)

    @nnx.jit
    def train_step(model: Any, optimizer: Any, ids: jax.Array, reference_nll: jax.Array | None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
        step = current_step(optimizer.opt_state)

        def loss_of(model: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            logits, labels = shift_for_causal_lm(model(ids), ids)
            n = jnp.int32(labels.size)
            if arm == "cggr_token":
                return loss_fn(logits, labels, step)
            if arm == "excess_token":
                return loss_fn(logits, labels, step, reference_nll)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            if arm == "standard":
                return ce.mean(), {"token_ratio": jnp.float32(1.0), "effective_ratio": jnp.float32(1.0),
                                   "tokens_selected": n, "tokens_total": n}
            # random_token: CGGR's count rule (curriculum + dynamic threshold), uniformly random tokens.
            confidence = token_statistics(jax.lax.stop_gradient(logits)).confidence
            base = schedule(step)
            ratio = dynamic_ratio(base, jnp.mean(confidence), cfg.threshold_sensitivity)
            noise = jax.random.uniform(jax.random.fold_in(jax.random.key(cfg.seed), step), labels.shape)
            mask, k = select_tokens(noise, jnp.ones(labels.shape, dtype=bool), ratio, selection="topk")
            loss = jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(k, 1).astype(jnp.float32)
            return loss, {"token_ratio": base, "effective_ratio": ratio, "tokens_selected": k, "tokens_total": n}

        (loss, metrics), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
        if loss_fn is not None:
            optimizer.update(model, grads, cggr_metrics=metrics)
        else:
            optimizer.update(model, grads)
        return loss, metrics

    return train_step, loss_fn


class JaxArm:
    """One JAX arm: ``cggr_jax.models.DecoderLM`` (a copy of ``base_model``: the same initial weights in every
    arm) with ``optax.chain(advance_curriculum(), adamw)``; the sequence arms run in ``BatchSplitTrainStep``."""

    def __init__(self, arm: str, cfg: DemoConfig, base_model: Any) -> None:
        import jax
        import optax
        from flax import nnx

        from cggr_jax import advance_curriculum
        from cggr_jax.batch_split import BatchSplitConfig, make_batch_split_train_step

        self.arm, self.cfg = arm, cfg
        self.num_params = sum(int(np.prod(x.shape)) for x in
                              jax.tree_util.tree_leaves(nnx.state(base_model, nnx.Param)))
        self.tx = optax.chain(advance_curriculum(),
                              optax.adamw(cfg.learning_rate, b1=0.9, b2=0.95, eps=1e-8,
                                          weight_decay=cfg.weight_decay))
        self.model = nnx.clone(base_model)
        self.split = None
        if arm in SEQUENCE_ARMS:
            graphdef = nnx.split(self.model, nnx.Param, ...)[0]
            # fixed_quota: exactly num_selected(B, base ratio) sequences in both modes; "random_sequence" uses the
            # same curriculum without a router. Buckets: the final count and B (the curriculum's early steps);
            # each bucket is one compiled forward/backward.
            k_final = max(1, round(cfg.min_tokens_ratio * cfg.batch_size))
            config = BatchSplitConfig(router_layers=cfg.router_layers, selection="fixed_quota",
                                      scoring="excess" if arm == "excess_split" else "combined",
                                      min_tokens_ratio=cfg.min_tokens_ratio, warmup_steps=cfg.warmup_steps,
                                      seed=cfg.seed)
            self.split = make_batch_split_train_step(
                graphdef, config, self.tx, mode="random_sequence" if arm == "random_seq" else "cggr",
                buckets=(k_final,))
            self.state = self.split.init(self.model)
        else:
            self.optimizer = nnx.Optimizer(self.model, self.tx, wrt=nnx.Param)
            self.step_fn, self.loss_fn = _jax_token_step(arm, cfg)

    def _reference(self, reference_nll: np.ndarray | None) -> Any:
        """The arm's ``reference_nll``: per token ``(B, T − 1)`` (excess_token), per sequence ``(B,)`` (the
        reference's mean loss of each row, excess_split), else None."""
        import jax.numpy as jnp

        if self.arm == "excess_token":
            return jnp.asarray(reference_nll)
        if self.arm == "excess_split":
            return jnp.asarray(reference_nll.mean(axis=1, dtype=np.float32))
        return None

    def warmup(self, batch: np.ndarray, reference_nll: np.ndarray | None) -> float:
        """Seconds of one step on a throwaway copy: compiles the step outside the timed run."""
        import jax.numpy as jnp
        from flax import nnx

        t0 = time.perf_counter()
        ids, ref = jnp.asarray(batch), self._reference(reference_nll)
        if self.split is not None:  # self.model keeps the initial weights
            _, metrics = self.split(self.split.init(self.model), ids, ids, reference_nll=ref)
            metrics["loss"].block_until_ready()
        else:
            model = nnx.clone(self.model)
            optimizer = nnx.Optimizer(model, self.tx, wrt=nnx.Param)
            loss, _ = self.step_fn(model, optimizer, ids, ref)
            loss.block_until_ready()
        return time.perf_counter() - t0

    def current_model(self) -> Any:
        return self.split.model(self.state) if self.split is not None else self.model

    def train_step(self, batch: np.ndarray, reference_nll: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
        """One optimizer step (``reference_nll`` as :meth:`TorchArm.train_step`)."""
        import jax.numpy as jnp

        from cggr_jax import metrics_to_dict

        ids, ref = jnp.asarray(batch), self._reference(reference_nll)
        metrics = _all_tokens(self.cfg)
        if self.split is not None:
            self.state, m = self.split(self.state, ids, ids, reference_nll=ref)
            loss = m["loss"]
            metrics.update({key: m[key] for key in ("token_ratio", "effective_ratio", "tokens_selected",
                                                    "tokens_total", "sequences_selected", "sequences_total")})
        else:
            loss, m = self.step_fn(self.model, self.optimizer, ids, ref)
            if self.loss_fn is not None:
                m = metrics_to_dict(m, self.loss_fn)  # host read-back, for logging only
            metrics.update({key: m[key] for key in ("token_ratio", "effective_ratio", "tokens_selected",
                                                    "tokens_total")})
        metrics = {k: np.asarray(v).item() for k, v in metrics.items()}  # host read-back, for logging only
        return float(loss), metrics

    def held_out_ce(self, held_out: list[Any]) -> float:
        eval_sum = _jax_eval_sum()  # shared by every JAX arm: compiled once for the model's structure
        model = self.current_model()
        total = sum(float(eval_sum(model, b)) for b in held_out)
        return total / sum(b.shape[0] * (b.shape[1] - 1) for b in held_out)


# --------------------------------------------------------------------------------------------------
# Training loop (the arms of one framework, interleaved)
# --------------------------------------------------------------------------------------------------


def jax_reference(cfg: DemoConfig, base_model: Any, reference_ids: np.ndarray, batches: Sequence[np.ndarray],
                  held_out: Sequence[np.ndarray]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """:func:`torch_reference` in JAX: a copy of ``base_model`` trained by ``cggr_jax.reference``'s
    ``train_reference_model``; its NLLs by ``token_nll`` in one jitted function."""
    import jax.numpy as jnp
    from flax import nnx

    from cggr_jax.reference import token_nll, train_reference_model

    chunks = reference_chunks(reference_ids, cfg)
    model = nnx.clone(base_model)
    t0 = time.perf_counter()
    train_reference_model(model, chunks, steps=cfg.reference_steps, batch_size=cfg.reference_batch_size,
                          lr=cfg.learning_rate, seed=cfg.seed)
    t1 = time.perf_counter()

    @nnx.jit
    def nll_of(model: Any, ids: Any) -> Any:
        return token_nll(model(ids[:, :-1]), ids[:, 1:])

    refs = [np.asarray(nll_of(model, jnp.asarray(b))) for b in batches]
    t2 = time.perf_counter()
    held = float(np.mean(np.concatenate([np.asarray(nll_of(model, jnp.asarray(b))).ravel() for b in held_out]),
                         dtype=np.float64))
    return refs, _reference_info(cfg, chunks, t1 - t0, t2 - t1, held)


def train_framework(framework: str, arms: Sequence[str], cfg: DemoConfig, train_ids: np.ndarray,
                    held_out: list[np.ndarray], vocab_size: int, *, device: str, progress: bool,
                    reference_ids: np.ndarray | None = None) -> tuple[list[RunResult], dict[str, Any] | None]:
    """Train every arm of ``framework`` on the same batch stream, one step of each arm in turn. With an excess arm,
    first train the reference model on ``reference_ids`` and score every batch of the stream with it (timed
    apart: the returned dict, None without an excess arm)."""
    batches = list(itertools.islice(batch_iterator(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed),
                                    cfg.steps))  # the same stream for all arms
    needs_reference = any(arm in EXCESS_ARMS for arm in arms)
    if needs_reference and reference_ids is None:
        raise ValueError(f"reference_ids: the arms {[a for a in arms if a in EXCESS_ARMS]} need the reference slice")
    refs: list[Any] = [None] * len(batches)
    reference = None
    if framework == "torch":
        if needs_reference:
            refs, reference = torch_reference(cfg, vocab_size, device, reference_ids, batches, held_out)
        trainers: list[Any] = [TorchArm(arm, cfg, vocab_size, device) for arm in arms]
        held: list[Any] = held_out
    else:
        import jax.numpy as jnp
        from flax import nnx

        from cggr_jax.models import DecoderConfig, DecoderLM

        base_model = DecoderLM(  # initialised once; every arm trains a copy
            DecoderConfig(vocab_size=vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, max_seq_len=cfg.seq_len, mlp_hidden_dim=cfg.mlp_hidden),
            rngs=nnx.Rngs(cfg.seed),
        )
        if needs_reference:
            refs, reference = jax_reference(cfg, base_model, reference_ids, batches, held_out)
        trainers = [JaxArm(arm, cfg, base_model) for arm in arms]
        held = [jnp.asarray(b) for b in held_out]
    runs = [RunResult(name=f"{framework}-{arm}", framework=framework, arm=arm, num_params=t.num_params)
            for arm, t in zip(arms, trainers)]
    for arm, trainer, run in zip(arms, trainers, runs):
        run.warmup_seconds = (_torch_warmup(arm, cfg, vocab_size, device, batches[0], refs[0])
                              if framework == "torch" else trainer.warmup(batches[0], refs[0]))

    evals = _eval_schedule(cfg)
    bar = _Progress(framework, cfg.steps, progress)
    try:
        for step in range(cfg.steps + 1):
            if step in evals:
                for trainer, run in zip(trainers, runs):
                    t0 = time.perf_counter()
                    ce = trainer.held_out_ce(held)
                    run.record_eval(step, ce, time.perf_counter() - t0)
            if step == cfg.steps:
                break
            batch, ref = batches[step], refs[step]
            for trainer, run in zip(trainers, runs):
                t0 = time.perf_counter()
                loss, metrics = trainer.train_step(batch, ref)  # returns after reading the loss: the step is done
                run.record(step, loss, metrics, time.perf_counter() - t0)
            bar.update(runs)
    finally:
        bar.close()
    return runs, reference


# --------------------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------------------


def time_to_reach(run: RunResult, target: float) -> float | None:
    """Training seconds at which the held-out CE first reaches ``target`` (linear between evaluations), or None."""
    for j, (t, loss) in enumerate(zip(run.eval_wallclock, run.eval_loss)):
        if loss <= target:
            if j == 0:
                return t
            t_prev, loss_prev = run.eval_wallclock[j - 1], run.eval_loss[j - 1]
            return t_prev + (t - t_prev) * (loss_prev - target) / (loss_prev - loss)
    return None


def trained_share(run: RunResult, first: int) -> tuple[float, float]:
    """(trained tokens / input tokens, trained sequences / sequences) over the steps ``>= first``."""
    idx = [i for i, s in enumerate(run.steps) if s >= first] or list(range(len(run.steps)))
    tok = sum(run.tokens_selected[i] for i in idx) / max(1, sum(run.tokens_total[i] for i in idx))
    seq = sum(run.sequences_selected[i] for i in idx) / max(1, sum(run.sequences_total[i] for i in idx))
    return tok, seq


def _compare(delta: float) -> str:
    if delta < -TIE_NATS:
        return f"beat random selection here (Δ = {delta:+.4f} nats)"
    if delta > TIE_NATS:
        return f"did not beat random selection here: it ended worse (Δ = {delta:+.4f} nats)"
    return f"did not beat random selection here (Δ = {delta:+.4f} nats, within ±{TIE_NATS} nats: a tie)"


#: The verdict's Δs: (key, selection arm, its random baseline, the label of the line, the words of the conclusion).
DELTAS = (("delta_token", "cggr_token", "random_token", "token level: ", "loss-based CGGR token selection"),
          ("delta_split", "cggr_split", "random_seq", "batch split: ", "CGGR batch splitting"),
          ("delta_excess_token", "excess_token", "random_token", "excess token:", "excess token selection"),
          ("delta_excess_split", "excess_split", "random_seq", "excess split:", "excess batch splitting"))


def compute_verdict(runs: Sequence[RunResult], cfg: DemoConfig,
                    references: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The verdict's numbers per framework and its text, all computed from the runs (``references``: the reference
    model's record per framework, quoted when an excess arm ran)."""
    references = references or {}
    out: dict[str, Any] = {"frameworks": {}}
    excess_deltas: list[float] = []
    lines = [f"VERDICT (computed from this run: one seed, a {cfg.num_layers}-layer d={cfg.d_model} model, "
             f"{cfg.steps} steps; ratio {cfg.min_tokens_ratio} after a {cfg.warmup_steps}-step curriculum)"]
    conclusions = []
    for framework in dict.fromkeys(run.framework for run in runs):
        by_arm = {run.arm: run for run in runs if run.framework == framework}
        final = {arm: run.eval_loss[-1] for arm, run in by_arm.items()}
        v: dict[str, Any] = {"final_eval_loss": final, "at_step": cfg.steps,
                             "ms_per_step_after_curriculum": {a: r.ms_per_step(cfg.warmup_steps)
                                                              for a, r in by_arm.items()},
                             "trained_token_share_after_curriculum": {a: trained_share(r, cfg.warmup_steps)[0]
                                                                      for a, r in by_arm.items()},
                             "trained_sequence_share_after_curriculum": {a: trained_share(r, cfg.warmup_steps)[1]
                                                                         for a, r in by_arm.items()}}
        lines.append(f"{framework}: final held-out CE (nats/token) at step {cfg.steps}: "
                     + ", ".join(f"{arm} {loss:.4f}" for arm, loss in final.items()))
        best = min(final, key=final.__getitem__)
        v["lowest_at_equal_steps"] = best
        parts = [f"{best} ended lowest at equal steps ({final[best]:.4f})"]
        for key, arm, baseline, label, words in DELTAS:
            if arm in final and baseline in final:
                v[key] = final[arm] - final[baseline]
                lines.append(f"  {label} {arm} − {baseline:<12} = {v[key]:+.4f} nats")
                parts.append(f"{words} {_compare(v[key])}")
                if arm in EXCESS_ARMS:
                    excess_deltas.append(v[key])
        if framework in references and any(arm in EXCESS_ARMS for arm in by_arm):
            ref = references[framework]
            v["reference_held_out_ce"] = ref["held_out_ce"]
            lines.append(f"  reference model of the excess arms: held-out CE {ref['held_out_ce']:.4f} after "
                         f"{ref['steps']} steps ({ref['train_seconds']:.1f} s + {ref['score_seconds']:.1f} s scoring, "
                         "outside the arms' wall-clock)")
        ms = v["ms_per_step_after_curriculum"]
        if "standard" in by_arm and "cggr_split" in by_arm:
            v["split_speedup_per_step"] = ms["standard"] / ms["cggr_split"]
            share = v["trained_token_share_after_curriculum"]["cggr_split"]
            speed = v["split_speedup_per_step"]
            lines.append(f"  per step after the curriculum: standard {ms['standard']:.1f} ms, cggr_split "
                         f"{ms['cggr_split']:.1f} ms ({speed:.2f}× standard's speed), trains {share:.1%} of the "
                         f"tokens" + (f"; random_seq {ms['random_seq']:.1f} ms" if "random_seq" in ms else ""))
            parts.append(f"batch splitting trains {share:.0%} of the tokens per step and is "
                         + (f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× slower")
                         + " per step than standard (router included)")
        if "standard" in by_arm:
            target = final["standard"]
            reach = {arm: time_to_reach(run, target) for arm, run in by_arm.items()}
            v["reach_standard_final_seconds"] = reach
            reached = {a: t for a, t in reach.items() if t is not None}
            soonest = min(reached, key=reached.__getitem__) if reached else None
            v["soonest_to_standard_final"] = soonest
            others = {a: t for a, t in reached.items() if a != "standard"}
            lines.append(f"  soonest to standard's final CE {target:.4f} in training wall-clock: "
                         + (f"{soonest} at {reached[soonest]:.1f} s" if soonest else "none")
                         + (" (selection arms: " + ", ".join(f"{a} {t:.1f} s" for a, t in others.items()) + ")"
                            if others else " (no selection arm reached it)"))
            if soonest == "standard" or soonest is None:
                parts.append("no selection arm reached standard's final held-out CE sooner in wall-clock")
            else:
                parts.append(f"{soonest} reached standard's final held-out CE first in wall-clock "
                             f"({reached[soonest]:.1f} s against {reach['standard']:.1f} s)")
        out["frameworks"][framework] = v
        if parts:
            conclusions.append(f"{framework}: " + "; ".join(parts) + ".")
    lines.append("Conclusion:")
    lines.extend("  " + c for c in conclusions)
    lines.append(f"  One seed: the demo measures no seed-to-seed spread, so a Δ of a few hundredths of a nat here is "
                 "weak evidence either way.")
    lines.append(
        f"  The project's quality study (benchmarks/quality/RESULTS.md: a real code corpus, a 23 M-parameter model, "
        f"3 seeds) found loss-based CGGR selection of sequences {STUDY_CGGR_VS_RANDOM_NATS:.2f} nats worse than a "
        f"random subset, while excess scoring (learner loss minus a reference model's loss) was "
        f"{-STUDY_EXCESS_VS_RANDOM_NATS:.2f} nats better (at token level {-STUDY_EXCESS_TOKEN_VS_RANDOM_NATS:.2f} "
        f"nats better, 6/6 seeds); at the next scale (S2) excess sequences were only "
        f"{-STUDY_S2_EXCESS_VS_RANDOM_NATS:.3f} nats better and excess tokens {STUDY_S2_EXCESS_TOKEN_VS_RANDOM_NATS:.3f} "
        f"nats worse than random tokens; at 110 M parameters excess sequences were "
        f"{-STUDY_M_EXCESS_VS_RANDOM_NATS:.3f} nats better on the validation split but only "
        f"{-STUDY_M_EXCESS_VS_RANDOM_TEST_NATS:.3f} (not significant) on the held-out test split. Its conclusion: "
        "selection by loss/entropy does not beat random; excess scoring of sequences (scoring=\"excess\" with a "
        "reference model, reference_nll=) beat a random subset per trained token on validation at every scale, a "
        "small gain the test split did not confirm; no configuration reached a standard run's loss sooner in "
        "wall-clock.")
    if not excess_deltas:
        lines.append("  This demo did not run excess scoring.")
    elif all(d < -TIE_NATS for d in excess_deltas):
        lines.append("  Here excess scoring beat its random baseline in every comparison, as in the study (one seed, "
                     "a tiny model: an illustration, not evidence).")
    else:
        won = sum(d < -TIE_NATS for d in excess_deltas)
        lines.append(f"  Here excess scoring beat its random baseline in {won} of {len(excess_deltas)} comparisons "
                     f"(beyond ±{TIE_NATS} nats): on this tiny character-level task excess scoring does not win"
                     + (" consistently" if won else "") + "; the study's evidence is at 23 M parameters on real "
                     "code, with a reference model trained far longer than this demo's.")
    out["excess_beats_random"] = [d < -TIE_NATS for d in excess_deltas]
    out["text"] = "\n".join(lines)
    return out


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


ARM_COLORS = {"standard": "black", "random_token": "tab:blue", "cggr_token": "tab:orange",
              "random_seq": "tab:green", "cggr_split": "tab:red",
              "excess_token": "tab:purple", "excess_split": "tab:brown"}
#: torch solid with round markers, JAX dashed with crosses: coincident curves stay visibly two.
FRAMEWORK_STYLE = {"torch": dict(ls="-", marker="o", ms=4, mfc="none"), "jax": dict(ls="--", marker="x", ms=5)}


def plot_curves(runs: Sequence[RunResult], cfg: DemoConfig, source: TextSource, path: Path) -> None:
    """Held-out CE vs step and vs training wall-clock (every run), and the share of tokens trained per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time, ax_share) = plt.subplots(1, 3, figsize=(19, 5.4))
    for run in runs:
        style = dict(FRAMEWORK_STYLE[run.framework], color=ARM_COLORS[run.arm], lw=1.3, label=run.name)
        ax_step.plot(run.eval_steps, run.eval_loss, **style)
        ax_time.plot(run.eval_wallclock, run.eval_loss, **style)
        share = [s / t if t else 0.0 for s, t in zip(run.tokens_selected, run.tokens_total)]
        ax_share.plot(run.steps, share, ls=FRAMEWORK_STYLE[run.framework]["ls"], color=ARM_COLORS[run.arm],
                      lw=1.2, label=run.name)
    # Zoom on where the arms differ: every run starts near ln V, far above the rest of the curves.
    later = [loss for run in runs for loss in run.eval_loss[2:]] or [loss for run in runs for loss in run.eval_loss]
    low, high = min(later), max(later)
    for ax in (ax_step, ax_time):
        ax.set_ylabel("held-out cross-entropy, all tokens (nats/token)")
        ax.set_ylim(low - 0.03 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
        ax.grid(alpha=0.3)
    ax_step.set_xlabel("optimizer step")
    ax_step.set_title("Held-out CE vs step (the comparable metric; training losses of the selection\n"
                      "arms cover only their selected tokens). y zoomed: every run starts near ln V", fontsize=9)
    ax_time.set_xlabel("training wall-clock (s; evaluation and warm-up/compilation excluded)")
    ax_time.set_title("Held-out CE vs wall-clock (arms interleaved step by step on a shared CPU)", fontsize=9)
    ax_step.legend(fontsize=7, ncol=2)
    ax_share.axvline(cfg.warmup_steps, color="k", lw=0.8, alpha=0.4)
    ax_share.set_ylim(0.0, 1.05)
    ax_share.set_xlabel("optimizer step")
    ax_share.set_ylabel("trained tokens / input tokens")
    ax_share.set_title(f"Tokens trained per step: curriculum 1 → {cfg.min_tokens_ratio} over {cfg.warmup_steps} "
                       f"steps (line);\ntoken arms × (1 + (1 − c̄)·{cfg.threshold_sensitivity}) by the dynamic "
                       "threshold", fontsize=9)
    ax_share.grid(alpha=0.3)
    ax_share.legend(fontsize=7, ncol=2)
    fig.suptitle(f"CGGR demo — {source.name}, {cfg.tokenizer} tokens, {cfg.num_layers}-layer d={cfg.d_model} "
                 f"decoder, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len}; torch solid (o), JAX dashed (x)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(runs: Sequence[RunResult], cfg: DemoConfig) -> str:
    """A plain-text table: final/best held-out CE, what is trained after the curriculum, speed."""
    head = (f"{'run':<20}{'params':>9}{'held-out CE':>12}{'best':>8}{'tok trained':>12}{'seq trained':>12}"
            f"{'ms/step':>9}{'ms/step*':>9}{'in tok/s':>10}{'tr tok/s':>10}{'train s':>9}{'warm-up s':>10}")
    lines = [head, "-" * len(head)]
    for run in runs:
        tok, seq = trained_share(run, cfg.warmup_steps)
        inp, trained = run.tokens_per_second()
        lines.append(f"{run.name:<20}{run.num_params:>9,}{run.eval_loss[-1]:>12.4f}{min(run.eval_loss):>8.4f}"
                     f"{tok:>12.1%}{seq:>12.1%}{run.ms_per_step():>9.1f}{run.ms_per_step(cfg.warmup_steps):>9.1f}"
                     f"{inp:>10,.0f}{trained:>10,.0f}{run.train_seconds:>9.1f}{run.warmup_seconds:>10.1f}")
    lines.append(f"held-out CE: mean cross-entropy over all {cfg.eval_batches}×{cfg.batch_size}×{cfg.seq_len - 1} "
                 "held-out predictions (last 10 % of the text); tok/seq trained: share of the batch's predictions /\n"
                 f"sequences in the loss after the {cfg.warmup_steps}-step curriculum; ms/step*: after the curriculum; "
                 "in/tr tok/s: input / trained predictions per training second;\ntrain s: every timed step "
                 "(evaluation excluded); warm-up s: one step on a throwaway copy before timing (JIT compilation).")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by ``None`` (strict JSON has no NaN/inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per run (default {DemoConfig.steps}; {QUICK['steps']} with --quick)")
    p.add_argument("--frameworks", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--text", default=None, help="train on this text file instead of the default corpus")
    p.add_argument("--out", default=str(REPO_ROOT / "out" / "demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, batch order and random-arm seed")
    p.add_argument("--quick", action="store_true", help="a few steps of a smaller model (smoke test)")
    p.add_argument("--warmup-steps", type=int, default=None, help="curriculum length (default 20%% of --steps)")
    p.add_argument("--min-tokens-ratio", type=float, default=0.25,
                   help="ratio of tokens / sequences trained after the curriculum")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="default: every 5%% of --steps")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    p.add_argument("--device", default="cpu", help="PyTorch device (JAX uses its default backend)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> DemoConfig:
    """The run configuration from the command line (``--quick`` shrinks the model and the run).

    Unless given, the curriculum lasts 20 % of the steps and the held-out CE is measured every 5 % of them.
    """
    base: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    steps = int(base.get("steps", DemoConfig.steps))
    base["warmup_steps"] = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.2 * steps))
    base["eval_every"] = args.eval_every if args.eval_every is not None else max(1, steps // 20)
    base.update(seed=args.seed, min_tokens_ratio=args.min_tokens_ratio, tokenizer=args.tokenizer)
    return DemoConfig(**base)


def _subset(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    chosen = [f.strip() for f in value.split(",") if f.strip()]
    if not chosen or any(c not in allowed for c in chosen):
        raise ValueError(f"{flag} must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return [a for a in allowed if a in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = make_config(args)
        frameworks = _subset(args.frameworks, FRAMEWORKS, "--frameworks")
        arms = _subset(args.arms, ARMS, "--arms")
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    if args.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # --quick is dominated by XLA's CPU compilation (~5 s per JAX step function: 7 arms and the reference);
        # the backend's optimisation level 0 halves it (measured) and only slows the few steps that follow. Set before jax is
        # first imported (lazily, below); an explicit XLA_FLAGS setting wins. The full demo keeps the default,
        # which runs its steps ~2× faster.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    source = load_text(args.text)
    tokenizer = build_tokenizer(cfg, source)
    ids = tokenizer.encode(source.text)
    train_ids, eval_ids = split_train_eval(ids, 0.1)
    # The reference slice: the end of the training part, just before the held-out tail; the arms never train on
    # it (carved whether or not an excess arm runs, so that the other arms see the same text either way).
    n_reference = max(1, round(cfg.reference_fraction * len(ids)))
    train_ids, reference_ids = train_ids[:-n_reference], train_ids[-n_reference:]
    held_out = eval_batches(eval_ids, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)
    print(f"text: {source.name} ({source.origin}), {len(source.text):,} chars -> {len(ids):,} {cfg.tokenizer} "
          f"tokens, vocab {tokenizer.vocab_size}; train {len(train_ids):,} / reference {len(reference_ids):,} / "
          f"held-out {len(eval_ids):,} tokens")
    print(f"config: {cfg}")
    print(f"arms: {', '.join(arms)}; frameworks: {', '.join(frameworks)} (cggr_token: CGGRLoss defaults with "
          f"warmup_steps={cfg.warmup_steps}; the split arms keep {cfg.min_tokens_ratio} of the sequences)", flush=True)

    runs: list[RunResult] = []
    references: dict[str, Any] = {}
    t_start = time.perf_counter()
    for framework in frameworks:
        framework_runs, reference = train_framework(framework, arms, cfg, train_ids, held_out, tokenizer.vocab_size,
                                                    device=args.device, progress=not args.no_progress,
                                                    reference_ids=reference_ids)
        runs.extend(framework_runs)
        if reference is not None:
            references[framework] = reference
    total_seconds = time.perf_counter() - t_start
    verdict = compute_verdict(runs, cfg, references)

    result = {
        "config": dataclasses.asdict(cfg),
        "frameworks": frameworks,
        "arms": arms,
        "text": {"name": source.name, "origin": source.origin, "chars": len(source.text), "tokens": int(len(ids)),
                 "tokenizer": cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                 "train_tokens": int(len(train_ids)), "reference_tokens": int(len(reference_ids)),
                 "eval_tokens": int(len(eval_ids)),
                 "eval_predictions": int(sum(b.shape[0] * (b.shape[1] - 1) for b in held_out))},
        "notes": "eval_loss is the held-out mean cross-entropy over all tokens (comparable across runs), measured "
                 "after eval_steps updates and eval_wallclock training seconds (evaluation and warm-up excluded); "
                 "train_loss of the selection arms covers only the selected tokens and is not comparable. tokens_* "
                 "count next-token predictions: tokens_total the batch's (input), tokens_selected those in the loss "
                 "(trained).",
        "total_seconds": total_seconds,
        "runs": {run.name: {"framework": run.framework, "arm": run.arm, "num_params": run.num_params,
                            **run.summary(cfg.warmup_steps), **run.curves()}
                 for run in runs},
        "reference": references,
        "verdict": verdict,
    }
    curves_path = out / CURVES_NAME
    curves_path.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot_path = out / PLOT_NAME
    plot_curves(runs, cfg, source, plot_path)

    print()
    print(summary_table(runs, cfg))
    for framework, ref in references.items():
        print(f"{framework} reference model (excess arms; not in any arm's wall-clock): {ref['steps']} steps of "
              f"{ref['batch_size']} chunks from {ref['chunks']:,} reference-slice chunks, trained in "
              f"{ref['train_seconds']:.1f} s, scored the {cfg.steps} training batches in {ref['score_seconds']:.1f} s; "
              f"held-out CE {ref['held_out_ce']:.4f}")
    print(f"\nall runs: {total_seconds:.1f} s (reference models included); plot: {plot_path}; curves: {curves_path}\n")
    print(verdict["text"])
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
