"""Quality study v2 (issue 15, PROTOCOL.md): does CGGR reach a target held-out loss sooner, on `pycode`?

One invocation runs a *plan* of tasks in priority order (reference model, LR sweeps, the gate, paired-seed arms,
controls), each writing its JSON as soon as it finishes, and skipping tasks whose JSON already exists (resume =
run the same command again). ``--deadline-s`` starts no task whose estimated cost would end past that many
seconds after start, so a device call ends inside its limit with whole runs written.

    python -m benchmarks.quality.study --scale S --round round1 --out benchmarks/quality/results/round1
    python -m benchmarks.quality.study --scale tiny --out /tmp/q --device cpu     # the CPU smoke
    python -m benchmarks.quality.study --scale S2 --round round3 --out benchmarks/quality/results/round3 \
        --deadline-s 480 --export $OUT/round3.tar.gz                               # one round-3 device call
    python -m benchmarks.quality.study --scale S2 --round round3 --out x --plan-only   # its estimated calls

Round 3 (S2, PROTOCOL.md "Round 3"): ``--plan-only`` at std_B = 65 ms/step (assumed) and ``--deadline-s 480``
estimates 6 calls, ~37 min of device time on fresh machines (~32 min when the machine stays warm between calls
and keeps the per-token stores): (1) reference + stores, sweeps, gate ~420 s; (2) seed 0's sequence arms and
std_k budgets ~300 s; (3) seed 0's token pair (with a store rebuild) and seed 1's sequence arms ~435 s;
(4) seed 1's budgets and token pair ~415 s; (5) seed 2's sequence arms and budgets ~380 s; (6) seed 2's token
pair ~250 s. PROTOCOL.md's "How to run round 3" note has the exact commands.

Round 4 (M, PROTOCOL.md "Round 4"): ``--round round4``, in ``round4.py`` (the plan, the `test` split, the schedule)
and ``jax_arm.py`` (the JAX arm, a child process); this file only hosts its hooks (``READS_TEST``,
``Evaluator.test_loss``, ``Study.after_run``, ``Study.cost_factor``, ``--ref-dir``).

Only public APIs of the packages are used (``cggr_torch``: ``CGGRModel``, ``CGGRLoss``, ``create_truncated_router``,
``score_tokens``, ``batch_split.select_sequences``, ``reference.score_chunks``; ``cggr.reference.load_reference``,
``cggr.config.RouterPositions``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.quality import pycode

try:  # progress bars are optional (the GPU image has tqdm; keep working without it)
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

SCHEMA = "cggr-quality-v2-run/1"
ARMS = ("std_B", "std_k", "random_subset", "oracle_loss", "oracle_excess", "ref_only", "cggr_matched",
        "cggr_shipped", "router_excess_r1", "router_excess_r2", "router_excess_r4", "cggr_excess_r1",
        "cggr_excess_r4", "random_token", "cggr_token", "excess_token", "excess_token_sampled",
        "cggr_excess_r1_s16", "cggr_excess_r1_s4")
#: Round 2: the router-excess arms (PROTOCOL.md §9): the truncated router's per-chunk mean NLL (its first n layers,
#: the model's final norm and head, ``create_truncated_router``) minus the stored reference NLL; top-k trained.
ROUTER_EXCESS = {"router_excess_r1": 1, "router_excess_r2": 2, "router_excess_r4": 4}
#: Round 2b: the same selection through the library, ``CGGRModel(scoring="excess")`` with the stored per-chunk
#: reference as its per-sequence ``reference_nll`` (count-matched: no curriculum, no dynamic threshold).
CGGR_EXCESS = {"cggr_excess_r1": 1, "cggr_excess_r4": 4}
#: Round 3: the cheaper library router of SPEC §9.3 (1 layer, every 16th position; every 4th when the gate's
#: rho for stride 16 is below 0.5, :func:`choose_r1_stride`): arm -> (router_layers, router_positions).
CGGR_EXCESS_STRIDE = {"cggr_excess_r1_s16": (1, 16), "cggr_excess_r1_s4": (1, 4)}
#: Round 3's gate: the router options of SPEC §9.3 compared at each router depth (name -> CGGRModel keywords).
ROUTER_OPTIONS = {"all": {}, "s4": {"router_positions": 4}, "s16": {"router_positions": 16},
                  "n64": {"router_samples": 64}, "p256": {"router_prefix": 256}}
#: Round 3's gate: router depths (clipped to the model's layers at the tiny scale).
GATE3_ROUTERS = (1, 4)
#: PROTOCOL.md round 3, item 4: the stride-16 router is kept when its gate rho to oracle excess is >= this.
STRIDE16_MIN_RHO = 0.5
#: Round 2b: token-level arms. Each step runs the model on all B candidates and puts ratio k/B of their tokens in
#: the loss (as many loss tokens as the k-arms train on): random tokens, CGGR's shipped token scoring, excess tokens
#: (the reference model's per-token NLL, computed on the fly), and excess with unbiased sampled selection.
TOKEN_ARMS = ("random_token", "cggr_token", "excess_token", "excess_token_sampled")
#: Cost of one step relative to a std_B step, for the deadline estimate of an arm not yet measured in this output
#: folder (measured at scale S on an H200 in round 1: std_B 35.6 ms/step).
COST_FACTOR = {"std_B": 1.0, "std_k": 0.55, "random_subset": 0.6, "oracle_loss": 1.7, "oracle_excess": 1.75,
               "ref_only": 0.6, "cggr_matched": 0.85, "cggr_shipped": 1.25,
               "router_excess_r1": 0.65, "router_excess_r2": 0.72, "router_excess_r4": 0.85,
               "cggr_excess_r1": 0.7, "cggr_excess_r4": 0.85, "random_token": 1.1, "cggr_token": 1.2,
               "excess_token": 1.5, "excess_token_sampled": 1.5, "cggr_excess_r1_s16": 0.62,
               "cggr_excess_r1_s4": 0.65}
#: --assume-ms-std-B's default per scale (std_B ms/step before one is measured; S measured on an H200 in round 1,
#: S2 and M scaled by their FLOPs per step with a launch-bound floor: a guess until round 3's first runs).
ASSUME_MS_STD_B = {"S": 40.0, "S2": 65.0, "M": 160.0, "tiny": 5.0}
#: The plans that read the `test` split (PROTOCOL.md §1: not before the final round; "Round 4 (M)", item 5). Every
#: other plan loads neither the split nor a test number (tests/test_quality_round4.py checks it).
READS_TEST = ("round4",)


# ----------------------------------------------------------------------------------------------- scales
@dataclass(frozen=True)
class Scale:
    name: str
    d_model: int
    layers: int
    heads: int
    ffn: int
    seq_len: int = 1024
    batch: int = 32          # candidates per step (B)
    keep: int = 8            # trained rows per step of the k-arms (k)
    steps: int = 600         # N
    eval_points: int = 10
    eval_chunks: int = 256   # val subset of the learning curves
    eval_batch: int = 32
    gate_chunks: int = 2048
    gate_routers: tuple = (1, 2, 4)
    ref_epochs: int = 2
    es_ref_epochs: int = 4      # round 3's reference: up to this many epochs of `ref` ...
    es_ref_eval_every: int = 100  # ... evaluated on the val subset every this many steps; the best is kept
    ref_lr: float = 2e-3
    noise_frac: float = 0.1
    lr_grid_B: tuple = (1e-3, 2e-3, 4e-3, 8e-3)
    lr_grid_k: tuple = (5e-4, 1e-3, 2e-3, 4e-3)
    seeds: tuple = (0, 1, 2)
    ood_chunks: int = 64
    val_chunks: Optional[int] = None    # None = all of val for the final numbers
    ref_chunks: Optional[int] = None    # None = the whole ref split
    train_chunks: Optional[int] = None  # None = the whole train split (tiny uses a slice)


SCALES = {
    "S": Scale("S", 384, 6, 6, 1024),
    # Round 3 (PROTOCOL.md "Round 3 (S2)"): the grids of its item 2 (rule 1 adds a point at an edge)
    "S2": Scale("S2", 512, 8, 8, 1376, lr_grid_B=(1e-3, 2e-3, 4e-3), lr_grid_k=(1e-3, 2e-3, 4e-3)),
    # Round 4 (PROTOCOL.md "Round 4 (M)", item 2): larger models want lower rates (rule 1 adds a point at an edge)
    "M": Scale("M", 768, 12, 12, 2048, lr_grid_B=(5e-4, 1e-3, 2e-3), lr_grid_k=(5e-4, 1e-3, 2e-3)),
    # CPU smoke: checks the harness, not the science. Short chunks (first 33 tokens of each), tiny model.
    "tiny": Scale("tiny", 32, 2, 2, 64, seq_len=32, batch=8, keep=2, steps=6, eval_points=2, eval_chunks=8,
                  eval_batch=8, gate_chunks=40, gate_routers=(1, 2), ref_epochs=1, lr_grid_B=(1e-3, 3e-3),
                  lr_grid_k=(1e-3, 3e-3), seeds=(0, 1), ood_chunks=4, val_chunks=16, ref_chunks=32, train_chunks=400,
                  es_ref_epochs=3, es_ref_eval_every=3),
}


def n_noise(scale: Scale) -> int:
    """Noise chunks per candidate batch: round(noise_frac * B) (3 of 32 at S: 9.4 %)."""
    return int(round(scale.noise_frac * scale.batch))


# ----------------------------------------------------------------------------------------------- model
def build_model(scale: Scale, vocab: int, seed: int, device: torch.device) -> torch.nn.Module:
    """Llama-style model from a config (no downloads), initialised under ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=scale.d_model, intermediate_size=scale.ffn,
                      num_hidden_layers=scale.layers, num_attention_heads=scale.heads,
                      num_key_value_heads=scale.heads, max_position_embeddings=scale.seq_len + 1,
                      tie_word_embeddings=False, initializer_range=0.02, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, use_cache=False)
    cfg._attn_implementation = "sdpa"  # flash/mem-efficient SDPA kernels with is_causal, no mask tensor
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]     # weight decay on matrices only
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05, final_frac: float = 0.1) -> float:
    """Linear warm-up over the run's first 5 % of steps, cosine to 10 % of peak at its own last step."""
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    w = max(1, int(round(warmup_frac * total)))
    if step < w:
        return peak * (step + 1) / w
    p = min(1.0, (step - w) / max(1, total - 1 - w))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class Ctx:
    """Device, autocast and the tensors shared by every run of an invocation."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.amp = self.device.type == "cuda"
        if self.amp:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=True) if self.amp else _Null()

    def tokens(self, toks: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(toks.astype(np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def token_nll(model: torch.nn.Module, toks: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """(B, T) next-token NLL (float32 softmax) of chunks ``toks`` (B, T+1), no grad."""
    with torch.no_grad(), ctx.autocast():
        logits = model(input_ids=toks[:, :-1]).logits
    return F.cross_entropy(logits.float().transpose(1, 2), toks[:, 1:], reduction="none")


def chunk_nll(model: torch.nn.Module, rows: np.ndarray, ctx: Ctx, batch: int, seq_len: int,
              desc: str = "", progress: bool = False) -> np.ndarray:
    """Per-chunk mean NLL of ``rows`` (n, >= seq_len+1) under ``model`` (no grad), float32 numpy."""
    out = []
    it = range(0, rows.shape[0], batch)
    for s in _bar(it, desc, progress):
        t = ctx.tokens(rows[s:s + batch, :seq_len + 1])
        out.append(token_nll(model, t, ctx).mean(1))
    return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def _bar(it, desc: str, on: bool, total: Optional[int] = None):
    if on and _tqdm is not None:
        return _tqdm(it, desc=desc, total=total, leave=False, mininterval=2.0, file=sys.stdout)
    return it


# ----------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Held-out loss: the fixed val subset (curves), all of val + OOD sets + frequency buckets (final)."""

    BUCKETS = ((0, 100), (100, 1000), (1000, 5000), (5000, None))

    def __init__(self, corpus: pycode.Corpus, scale: Scale, ctx: Ctx, probs: np.ndarray) -> None:
        self.scale, self.ctx = scale, ctx
        val = corpus["val"]
        if scale.val_chunks:
            val = val[pycode.eval_subset(val.shape[0], scale.val_chunks)]
        self.val = val[:, :scale.seq_len + 1]
        self.subset = self.val[pycode.eval_subset(val.shape[0], min(scale.eval_chunks, val.shape[0]))]
        self.ood = {k: v[:scale.ood_chunks, :scale.seq_len + 1] for k, v in pycode.load_ood(corpus.data_dir).items()}
        # Round 4 only (READS_TEST): all of `test` (at tiny a slice, as val is sliced), else never loaded.
        self.test = None
        if "test" in corpus.splits:
            test = corpus["test"]
            if scale.val_chunks:
                test = test[pycode.eval_subset(test.shape[0], min(scale.val_chunks, test.shape[0]))]
            self.test = test[:, :scale.seq_len + 1]
        rank = np.empty(len(probs), np.int64)
        rank[np.argsort(-probs, kind="stable")] = np.arange(len(probs))   # 0 = most frequent train token
        self.rank = torch.from_numpy(rank).to(ctx.device)

    def curve_loss(self, model) -> float:
        return float(chunk_nll(model, self.subset, self.ctx, self.scale.eval_batch, self.scale.seq_len).mean())

    def test_loss(self, model) -> dict:
        """Round 4 (PROTOCOL.md "Round 4", item 5): mean NLL over all `test` chunks, computed as ``final``'s
        ``val_loss`` is (per-chunk means of float32 NLL in eval_batch batches, then their mean)."""
        if self.test is None:
            raise ValueError("test_loss: the `test` split is not loaded (only the plans in READS_TEST read it)")
        s = self.scale
        pc = torch.cat([token_nll(model, self.ctx.tokens(self.test[i:i + s.eval_batch]), self.ctx).mean(1)
                        for i in range(0, self.test.shape[0], s.eval_batch)])
        return {"test_loss": float(pc.mean()), "test_chunks": int(pc.numel())}

    def final(self, model) -> dict:
        s, ctx = self.scale, self.ctx
        tot = torch.zeros(len(self.BUCKETS), dtype=torch.float64, device=ctx.device)
        cnt = torch.zeros(len(self.BUCKETS), dtype=torch.float64, device=ctx.device)
        per_chunk = []
        for i in range(0, self.val.shape[0], s.eval_batch):
            t = ctx.tokens(self.val[i:i + s.eval_batch])
            nll = token_nll(model, t, ctx)
            per_chunk.append(nll.mean(1))
            r = self.rank[t[:, 1:]]
            for b, (lo, hi) in enumerate(self.BUCKETS):
                m = (r >= lo) if hi is None else ((r >= lo) & (r < hi))
                tot[b] += (nll * m).sum().double()
                cnt[b] += m.sum().double()
        pc = torch.cat(per_chunk)
        out = {"val_loss": float(pc.mean()), "val_chunks": int(pc.numel()),
               "val_loss_subset": self.curve_loss(model),
               "val_loss_by_freq_bucket": {f"rank_{lo}_{hi if hi else 'end'}":
                                           float(tot[b] / cnt[b]) if cnt[b] else None
                                           for b, (lo, hi) in enumerate(self.BUCKETS)},
               "val_token_share_by_freq_bucket": {f"rank_{lo}_{hi if hi else 'end'}": float(cnt[b] / cnt.sum())
                                                  for b, (lo, hi) in enumerate(self.BUCKETS)},
               "ood": {k: float(chunk_nll(model, v, ctx, s.eval_batch, s.seq_len).mean()) for k, v in self.ood.items()}}
        return out


# ----------------------------------------------------------------------------------------------- one run
@dataclass
class RunSpec:
    arm: str
    seed: int
    lr: float
    steps: int
    noise: bool = False
    tag: str = ""           # e.g. "sweep", "repeat", "budget"

    def key(self) -> str:
        t = f"__{self.tag}" if self.tag else ""
        n = "+noise" if self.noise else ""
        return f"{self.arm}{n}__lr{self.lr:g}__N{self.steps}__s{self.seed}{t}"


class Study:
    """Everything one invocation shares: corpus, unigram, evaluator, reference tables, the output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale: Scale = args.scale_obj
        self.out = Path(args.out)
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        self.ctx = Ctx(args.device)
        self.t_start = time.time()
        self.progress = not args.no_progress
        self.log_path = self.out / "log.txt"
        data_dir = pycode.find_pycode_dir(args.data_dir)
        t = time.time()
        splits = ("train", "ref", "val") + (("test",) if getattr(args, "round", None) in READS_TEST else ())
        corpus = pycode.load_corpus(data_dir, splits, verify=not args.no_verify)
        s = self.scale
        if s.train_chunks:
            corpus.splits["train"] = corpus["train"][:s.train_chunks]
        if s.ref_chunks:
            corpus.splits["ref"] = corpus["ref"][:s.ref_chunks]
        self.corpus = corpus
        self.V = corpus.vocab_size
        self.probs = pycode.unigram(corpus["train"], self.V)
        self.evaluator = Evaluator(corpus, s, self.ctx, self.probs)
        self.log(f"corpus {data_dir}: train {corpus['train'].shape} ref {corpus['ref'].shape} val "
                 f"{corpus['val'].shape}" + (f" test {corpus['test'].shape}" if "test" in corpus.splits else "") +
                 f" V={self.V}, OOD sets {sorted(self.evaluator.ood)} ({time.time() - t:.1f} s)")
        self.ref_train: Optional[np.ndarray] = None
        self.ref_noise: dict[int, np.ndarray] = {}
        self.ref_gate_noise: Optional[np.ndarray] = None
        self.device_name = torch.cuda.get_device_name(0) if self.ctx.device.type == "cuda" else "cpu"
        self.measured_ms: dict[str, float] = {}
        for p in (self.out / "runs").glob("*.json"):    # a resumed folder: estimate from what was measured there
            r = json.loads(p.read_text())
            if r.get("device") == self.device_name and r["scale"]["name"] == s.name:
                ms = r["accounting"]["ms_per_step"]
                self.measured_ms[r["arm"]] = max(ms, self.measured_ms.get(r["arm"], ms))   # plan for the slowest
        self.best_B_state: Optional[dict] = None
        self.last_state: Optional[dict] = None
        # Round 3: the per-token reference stores (train chunks, noise banks) and how they were (re)built.
        self.ref_store = None
        self.noise_stores: dict = {}
        self.ref_store_info: Optional[dict] = None
        # Round 3 orders its work in paired units: the first unit that does not fit stops the plan (stop_at_miss),
        # so that a call never starts a later, smaller task out of order.
        self.stop_at_miss = False
        self.stopped = False
        self.dry_total = 0.0
        # Hooks of later plans (round4.py): the step-cost factors of arms not yet measured, and a call made with
        # (spec, model, result) just before a run's JSON is written (round 4 adds the `test` loss there).
        self.cost_factor: dict = dict(COST_FACTOR)
        self.after_run: Optional[Callable] = None
        self.versions = {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": _version("transformers"), "numpy": np.__version__}
        self.commit = _git_commit()

    # -------------------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - getattr(self, 't_start', time.time()):6.1f}s] {msg}"
        print(line, flush=True)
        if not self.args.dry_run:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def elapsed(self) -> float:
        return time.time() - self.t_start

    def export(self) -> None:
        """Tar the output folder to --export (atomically), so a device call killed later still returns it."""
        if not self.args.export:
            return
        dst = Path(self.args.export)
        tmp = dst.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(self.out, arcname=self.out.name)
        os.replace(tmp, dst)

    def noise_rows(self, seed: int) -> np.ndarray:
        s = self.scale
        return pycode.noise_bank(self.probs, max(1, n_noise(s)) * s.steps * 2, s.seq_len, seed)

    def gate_noise_rows(self) -> np.ndarray:
        s = self.scale
        return pycode.noise_bank(self.probs, max(1, int(round(s.noise_frac * s.gate_chunks))), s.seq_len, 10_000)

    def stream(self, seed: int, batch: int, steps: int, noise: bool, offset: int = 0) -> pycode.CandidateStream:
        s = self.scale
        return pycode.CandidateStream(self.corpus["train"], seed, batch, steps, s.seq_len,
                                      noise_frac=s.noise_frac if noise else 0.0,
                                      noise=self.noise_rows(seed) if noise else None, offset=offset)

    def ref_of(self, ids: np.ndarray, seed: int) -> np.ndarray:
        out = np.empty(len(ids), np.float32)
        pos = ids >= 0
        out[pos] = self.ref_train[ids[pos]]
        if (~pos).any():
            out[~pos] = self.ref_noise[seed][pycode.NOISE_ID_BASE - ids[~pos]]
        if not np.isfinite(out).all():   # round 3's table covers only the chunks its seeds read (NaN elsewhere)
            raise ValueError(f"ids: chunks without a stored reference NLL: {ids[~np.isfinite(out)][:8].tolist()} "
                             f"(the reference tables cover the chunks of seeds {list(self.scale.seeds)}; "
                             f"rebuild them for other seeds)")
        return out

    def ref_tokens_of(self, ids: np.ndarray, seed: int) -> np.ndarray:
        """(len(ids), T) float32 per-token reference NLL from round 3's stores (``cggr-reference-v1``, float16 on
        disk), aligned with the targets ``row[1:]``; noise chunk ``-1 - j`` reads row ``j`` of the seed's bank."""
        if self.ref_store is None:
            raise ValueError("ref_tokens_of: no per-token reference store is loaded (round 3's "
                             "ensure_reference_es builds it)")
        out = np.empty((len(ids), self.scale.seq_len), np.float32)
        pos = ids >= 0
        if pos.any():
            out[pos] = self.ref_store.token_nll_of(ids[pos])
        if (~pos).any():
            out[~pos] = self.noise_stores[seed].token_nll_of(pycode.NOISE_ID_BASE - ids[~pos])
        return out

    def estimate_s(self, spec: RunSpec) -> float:
        ms = self.measured_ms.get(spec.arm)
        if ms is None:
            base = self.measured_ms.get("std_B", self.args.assume_ms_std_B)
            ms = base * self.cost_factor[spec.arm]
        return spec.steps * ms / 1000 + run_overhead_s(self.scale, self.measured_ms.get("std_B",
                                                                                       self.args.assume_ms_std_B))

    def run_unit(self, specs: list, what: str) -> bool:
        """Round 3: run ``specs`` as one unit (paired runs that belong together) only if all of its missing runs
        fit before the deadline; otherwise stop the plan here (``stopped``). Returns True when the unit is done."""
        todo = [sp for sp in specs if self.args.no_resume or not (self.out / "runs" / f"{sp.key()}.json").exists()]
        est = sum(self.estimate_s(sp) for sp in todo)
        if self.stopped:
            return False
        store = self.stopped is False and any(sp.arm in ("excess_token", "excess_token_sampled") for sp in todo) \
            and self.ref_store is None and self.stop_at_miss
        if store:   # round 3's token-level excess reads the per-token store: (re)build it inside this unit
            est += reference_estimate_s(self.scale, self.measured_ms.get("std_B", self.args.assume_ms_std_B)) - 30
        if todo and not self.args.dry_run and not self.fits(est):
            self.log(f"deadline: not starting the unit {what} ({len(todo)} runs, ~{est:.0f} s); the plan stops here")
            self.stopped = True
            return False
        if todo and self.args.dry_run:
            self.log(f"unit {what}: {len(todo)} runs (~{est:.0f} s)")
        if store and not self.args.dry_run:
            self.ensure_reference_es(stores=True)
        for sp in specs:
            self.run(sp)
        return not self.stopped

    def fits(self, seconds: float) -> bool:
        return self.args.deadline_s is None or self.elapsed() + seconds <= self.args.deadline_s

    # -------------------------------------------------------------------------- reference model
    def ensure_reference(self) -> None:
        s, d = self.scale, self.out / "ref"
        d.mkdir(exist_ok=True)
        f_train, f_meta = d / "refnll_train.npy", d / "ref.json"
        seeds = sorted(set(s.seeds) | {0})
        if f_train.exists() and f_meta.exists() and all((d / f"refnll_noise_s{x}.npy").exists() for x in seeds) \
                and (d / "refnll_gate_noise.npy").exists():
            self.ref_train = np.load(f_train)
            self.ref_noise = {x: np.load(d / f"refnll_noise_s{x}.npy") for x in seeds}
            self.ref_gate_noise = np.load(d / "refnll_gate_noise.npy")
            self.log(f"reference tables loaded from {d}")
            return
        if self.args.dry_run:
            self.log("would train the reference model and score every train chunk (~90 s at S on an H200)")
            return
        t0 = time.time()
        ref = self.corpus["ref"]
        steps_per_epoch = max(1, ref.shape[0] // s.batch)
        total = steps_per_epoch * s.ref_epochs
        model = build_model(s, self.V, 1000, self.ctx.device)
        opt = make_optimizer(model, s.ref_lr, self.ctx.device)
        rng = np.random.default_rng(1000)
        order = np.concatenate([rng.permutation(ref.shape[0])[:steps_per_epoch * s.batch] for _ in range(s.ref_epochs)])
        losses = []
        for i in _bar(range(total), "reference", self.progress):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, total, s.ref_lr)
            t = self.ctx.tokens(ref[order[i * s.batch:(i + 1) * s.batch], :s.seq_len + 1])
            losses.append(self._train_rows(model, opt, t))
        self.ctx.sync()
        train_s = time.time() - t0
        model.eval()
        val = self.evaluator.final(model)
        t1 = time.time()
        self.ref_train = chunk_nll(model, self.corpus["train"], self.ctx, max(s.eval_batch, 64), s.seq_len,
                                   "ref NLL of train", self.progress)
        for x in seeds:
            self.ref_noise[x] = chunk_nll(model, self.noise_rows(x), self.ctx, max(s.eval_batch, 64), s.seq_len)
            np.save(d / f"refnll_noise_s{x}.npy", self.ref_noise[x])
        self.ref_gate_noise = chunk_nll(model, self.gate_noise_rows(), self.ctx, s.eval_batch, s.seq_len)
        np.save(d / "refnll_gate_noise.npy", self.ref_gate_noise)
        np.save(f_train, self.ref_train)
        meta = {"arch": asdict(s), "seed": 1000, "split": "ref", "chunks": int(ref.shape[0]), "epochs": s.ref_epochs,
                "steps": total, "lr": s.ref_lr, "train_s": train_s, "score_s": time.time() - t1,
                "train_loss_last50": float(np.mean([float(x) for x in losses[-50:]])), "final": val,
                "refnll_train_mean": float(self.ref_train.mean()),
                "refnll_noise_mean": {str(x): float(v.mean()) for x, v in self.ref_noise.items()},
                "device": self.device_name, "commit": self.commit}
        f_meta.write_text(json.dumps(meta, indent=1))
        self.log(f"reference: {total} steps in {train_s:.1f} s, val {val['val_loss']:.4f}, ref NLL train mean "
                 f"{self.ref_train.mean():.3f}, noise mean {np.mean([v.mean() for v in self.ref_noise.values()]):.3f}")
        del model, opt
        self.export()

    # -------------------------------------------------------------------------- round 3's reference
    @property
    def ref_store_dir(self) -> Path:
        """Where round 3's per-token stores live: ``--ref-store``, else ``.refstore/round3/<scale>`` (git-ignored:
        float16 per token is ~90 MB at S2, too large for the results folder and for a device call's carry; rebuilt
        when missing). Not under ``.data``: a device call that carries ``.data`` replaces that folder there, which
        would delete a store built by the previous call on a warm machine."""
        if getattr(self.args, "ref_store", None):
            return Path(self.args.ref_store)
        return pycode.REPO / ".refstore" / "round3" / self.scale.name

    def train_reference_es(self) -> tuple:
        """Round 3's reference (PROTOCOL.md "Round 3", item 1): the run's architecture, seed 1000, trained on
        ``ref`` at B for up to ``es_ref_epochs`` epochs (warm-up and cosine over that whole budget, peak
        ``ref_lr``), evaluated on the val subset every ``es_ref_eval_every`` steps and at the end; the checkpoint
        with the lowest val-subset loss is kept (early stopping), not the last. Returns (model in eval mode, info)."""
        s, ctx = self.scale, self.ctx
        ref = self.corpus["ref"]
        steps_per_epoch = max(1, ref.shape[0] // s.batch)
        total = steps_per_epoch * s.es_ref_epochs
        t0 = time.time()
        model = build_model(s, self.V, 1000, ctx.device)
        opt = make_optimizer(model, s.ref_lr, ctx.device)
        rng = np.random.default_rng(1000)
        order = np.concatenate([rng.permutation(ref.shape[0])[:steps_per_epoch * s.batch]
                                for _ in range(s.es_ref_epochs)])
        history, best, losses = [], None, []
        step_s, t_seg = 0.0, time.time()   # training time without the evaluations (a std_B step: same model, B)
        for i in _bar(range(total), "reference (early stopping)", self.progress):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, total, s.ref_lr)
            losses.append(self._train_rows(model, opt, ctx.tokens(ref[order[i * s.batch:(i + 1) * s.batch],
                                                                       :s.seq_len + 1])))
            if (i + 1) % s.es_ref_eval_every == 0 or i + 1 == total:
                ctx.sync()
                step_s += time.time() - t_seg
                model.eval()
                v = self.evaluator.curve_loss(model)
                model.train()
                tl = float(torch.stack(losses).float().mean())
                losses = []
                history.append({"step": i + 1, "epoch": (i + 1) / steps_per_epoch, "val_subset": v, "train_loss": tl})
                if math.isfinite(v) and (best is None or v < best[1]):
                    best = (i + 1, v, {k: t.detach().clone() for k, t in model.state_dict().items()})
                ctx.sync()
                t_seg = time.time()
        if best is None:
            raise RuntimeError("reference: no finite val-subset loss at any evaluation (diverged); lower ref_lr")
        model.load_state_dict(best[2])
        model.eval()
        del opt
        ctx.sync()
        info = {"seed": 1000, "split": "ref", "chunks": int(ref.shape[0]), "epochs": s.es_ref_epochs,
                "steps": total, "steps_per_epoch": steps_per_epoch, "lr": s.ref_lr,
                "eval_every": s.es_ref_eval_every, "history": history, "best_step": best[0],
                "best_val_subset": best[1], "train_s": time.time() - t0, "ms_per_step": 1000 * step_s / total}
        # Until a std_B run is measured, the deadline plans with the reference's step time (same model and B).
        self.measured_ms.setdefault("std_B", info["ms_per_step"])
        self.log(f"reference: {total} steps in {info['train_s']:.1f} s; best val subset {best[1]:.4f} at step "
                 f"{best[0]} (" + ", ".join(f"{h['step']}: {h['val_subset']:.3f}" for h in history) + ")")
        return model, info

    def _reference_model_es(self) -> tuple:
        """The early-stopped reference: loaded from the store folder's ``model.pt`` when there, else trained and
        saved there (so covering more chunks rescores without retraining)."""
        d = self.ref_store_dir
        ckpt, info_f = d / "model.pt", d / "train_info.json"
        if ckpt.exists() and info_f.exists():
            model = build_model(self.scale, self.V, 1000, self.ctx.device)
            model.load_state_dict(torch.load(ckpt, map_location=self.ctx.device))
            model.eval()
            self.log(f"reference checkpoint loaded from {ckpt}")
            return model, json.loads(info_f.read_text())
        model, info = self.train_reference_es()
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), ckpt)
        info_f.write_text(json.dumps(info, indent=1))
        return model, info

    def _load_stores(self, needed: np.ndarray, seeds: list) -> Optional[tuple]:
        """(train store, {seed: noise store}, gate-noise store) when all exist, verify and cover ``needed``."""
        from cggr.reference import load_reference

        d = self.ref_store_dir
        try:
            train = load_reference(str(d / "train"))
            noise = {x: load_reference(str(d / f"noise_s{x}")) for x in seeds}
            gate = load_reference(str(d / "gate_noise"))
        except (FileNotFoundError, ValueError, OSError) as e:
            if d.exists():
                self.log(f"reference store at {d} unusable ({e}); rebuilding it")
            return None
        if train.seq_len != self.scale.seq_len or not np.isin(needed, train.chunk_ids).all():
            self.log(f"reference store at {d} does not cover this plan's chunks; rescoring")
            return None
        return train, noise, gate

    def ensure_reference_es(self, stores: bool = True) -> None:
        """Round 3's reference tables and stores. Committed in ``<out>/ref/``: ``ref.json`` (training log, the
        stores' manifests), per-chunk means ``refnll_train.npy`` (train length; NaN for chunks no seed of the plan
        reads), ``refnll_noise_s<seed>.npy``, ``refnll_gate_noise.npy``. Outside the repo (``ref_store_dir``):
        ``cggr-reference-v1`` stores of per-token NLL (``cggr_torch.reference.score_chunks``) for the train chunks
        the plan reads (its seeds' candidates, std_k's 4N budget, the gate's chunks) and the noise banks, and
        the checkpoint. A missing store is rebuilt (from the checkpoint, else by retraining the reference); the
        committed means stay authoritative for the sequence arms and the rebuilt store's difference to them is
        logged and recorded in the token arms' JSON (``reference``). ``stores=False``: when the committed tables
        exist, load only them (the sequence arms need no store; a cold device call skips the rebuild until a
        token arm runs)."""
        from cggr_torch.reference import score_chunks

        s, d = self.scale, self.out / "ref"
        d.mkdir(exist_ok=True)
        seeds = sorted(set(s.seeds) | {0})
        train_ids, gate_ids = round3_chunk_ids(s, self.corpus["train"].shape[0])
        needed = np.union1d(train_ids, gate_ids)
        # "committed": the reference was trained and recorded; more seeds (rule 2) only add chunks and noise
        # banks to its tables (from the store, scored by the same checkpoint or a retrain), never change a value.
        committed = (d / "ref.json").exists() and (d / "refnll_train.npy").exists() and \
            (d / "refnll_gate_noise.npy").exists()
        incomplete = False
        if committed:
            self.ref_train = np.load(d / "refnll_train.npy")
            self.ref_noise = {x: np.load(d / f"refnll_noise_s{x}.npy") for x in seeds
                              if (d / f"refnll_noise_s{x}.npy").exists()}
            self.ref_gate_noise = np.load(d / "refnll_gate_noise.npy")
            incomplete = len(self.ref_noise) < len(seeds) or not np.isfinite(self.ref_train[needed]).all()
            if not stores and not incomplete:
                self.log(f"reference tables loaded from {d} (per-token stores: when a token arm runs)")
                return
        stores = self._load_stores(needed, seeds)
        if stores is not None:
            self.ref_store, self.noise_stores, gate_store = stores
        if committed and stores is not None and not incomplete:
            diff = float(np.max(np.abs(self.ref_store.chunk_mean_of(needed) - self.ref_train[needed])))
            self.ref_store_info = self._store_info(False, diff)
            self.log(f"reference tables loaded from {d}, per-token stores from {self.ref_store_dir}")
            return
        if self.args.dry_run:
            self.log(f"would {'rebuild the per-token reference stores' if committed else 'train the reference'} "
                     f"(~{reference_estimate_s(s, self.args.assume_ms_std_B):.0f} s at the assumed std_B cost)")
            return
        model, info = self._reference_model_es()
        t1 = time.time()
        sd = self.ref_store_dir
        bs = max(s.eval_batch, 64)
        meta = {"study": "quality round 3", "scale": s.name, "seed": 1000, "split": "ref",
                "best_step": info["best_step"], "commit": self.commit}
        with self.ctx.autocast():   # the learner's precision (bf16 autocast, float32 NLL)
            train_store = score_chunks(model, self.corpus["train"][needed, :s.seq_len + 1], needed, str(sd / "train"),
                                       batch_size=bs, meta={**meta, "chunks": "train"})
            noise_stores = {}
            for x in seeds:
                rows = self.noise_rows(x)[:, :s.seq_len + 1]
                noise_stores[x] = score_chunks(model, rows, np.arange(rows.shape[0]), str(sd / f"noise_s{x}"),
                                               batch_size=bs, meta={**meta, "chunks": f"noise bank of seed {x}"})
            rows = self.gate_noise_rows()[:, :s.seq_len + 1]
            gate_store = score_chunks(model, rows, np.arange(rows.shape[0]), str(sd / "gate_noise"),
                                      batch_size=bs, meta={**meta, "chunks": "gate noise"})
        score_s = time.time() - t1
        self.ref_store, self.noise_stores = train_store, noise_stores
        table = np.full(self.corpus["train"].shape[0], np.nan, np.float32)
        table[train_store.chunk_ids] = train_store.chunk_mean
        if committed:   # a rebuild: the committed means stay; say how far the rebuilt store is from them
            old = np.isfinite(self.ref_train)
            both = needed[old[needed]]
            diff = float(np.max(np.abs(table[both] - self.ref_train[both]))) if both.size else 0.0
            add = needed[~old[needed]]
            if add.size or len(self.ref_noise) < len(seeds):   # new seeds: add their chunks, keep every value
                self.ref_train[add] = table[add]
                np.save(d / "refnll_train.npy", self.ref_train)
                for x in seeds:
                    if x not in self.ref_noise:
                        self.ref_noise[x] = noise_stores[x].chunk_mean.copy()
                        np.save(d / f"refnll_noise_s{x}.npy", self.ref_noise[x])
                self.log(f"reference tables extended by {add.size} train chunks and the noise banks of seeds "
                         f"{seeds} (existing values kept)")
            self.ref_store_info = self._store_info(True, diff)
            self.log(f"reference stores rebuilt in {score_s:.1f} s; max |chunk mean - committed| = {diff:.2e}")
        else:
            self.ref_train = table
            self.ref_noise = {x: st.chunk_mean.copy() for x, st in noise_stores.items()}
            self.ref_gate_noise = gate_store.chunk_mean.copy()
            for x in seeds:
                np.save(d / f"refnll_noise_s{x}.npy", self.ref_noise[x])
            np.save(d / "refnll_gate_noise.npy", self.ref_gate_noise)
            np.save(d / "refnll_train.npy", self.ref_train)
            manifests = {}
            for name in ["train", "gate_noise"] + [f"noise_s{x}" for x in seeds]:
                manifests[name] = json.loads((sd / name / "manifest.json").read_text())
            val = self.evaluator.final(model)
            meta_out = {"arch": asdict(s), **info, "final": val, "score_s": score_s,
                        "covered_train_chunks": int(len(needed)), "gate_chunks": int(len(gate_ids)),
                        "refnll_train_mean": float(np.nanmean(self.ref_train)),
                        "refnll_noise_mean": {str(x): float(v.mean()) for x, v in self.ref_noise.items()},
                        "store": {"format": "cggr-reference-v1", "dtype": "float16",
                                  "location": "ref_store_dir (default .data/round3_ref/<scale>, git-ignored)",
                                  "bytes": int(sum(f.stat().st_size for f in sd.rglob("*.npy"))),
                                  "manifests": manifests},
                        "device": self.device_name, "commit": self.commit}
            (d / "ref.json").write_text(json.dumps(meta_out, indent=1))
            self.ref_store_info = self._store_info(True, 0.0)
            self.log(f"reference: val {val['val_loss']:.4f} (best step {info['best_step']} of {info['steps']}); "
                     f"stores of {len(needed)} train chunks in {score_s:.1f} s at {sd}")
        del model
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        self.export()

    def _store_info(self, rebuilt: bool, diff: Optional[float]) -> dict:
        """What a token arm's JSON records about the per-token store it read: its hash, whether this invocation
        (re)built it, and the largest difference of its chunk means to the committed per-chunk table."""
        man = json.loads((self.ref_store_dir / "train" / "manifest.json").read_text())
        return {"store_token_nll_sha256": man["sha256"]["token_nll.npy"], "store_built_this_call": rebuilt,
                "store_max_abs_chunk_mean_diff_vs_committed": diff}

    # -------------------------------------------------------------------------- training
    def _train_rows(self, model, opt, toks: torch.Tensor) -> torch.Tensor:
        """One optimizer step of mean next-token CE on ``toks`` (b, T+1). Returns the loss (device, no sync)."""
        with self.ctx.autocast():
            logits = model(input_ids=toks[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _train_tokens(self, model, opt, toks: torch.Tensor, spec: RunSpec, i: int, crit, ref_model,
                      sel: dict, ref_tok: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One optimizer step of a token-level arm on all candidates ``toks`` (B, T+1): ratio k/B of the tokens
        are in the loss (random, CGGR's scoring, or excess against ``ref_model`` run on the fly, or against the
        stored per-token reference ``ref_tok`` (B, T) of round 3). Device-side bookkeeping only."""
        s = self.scale
        inputs, targets = toks[:, :-1], toks[:, 1:]
        if ref_model is not None:
            ref_tok = token_nll(ref_model, toks, self.ctx)                   # (B, T) float32, no grad
        with self.ctx.autocast():
            logits = model(input_ids=inputs).logits
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = targets.reshape(-1)
        if crit is None:   # random_token: exactly round(n·k/B) uniformly random tokens, seeded per (seed, step)
            g = torch.Generator(device=toks.device).manual_seed(int(spec.seed) * 1_000_003 + i)
            n_keep = int(round(tgt.numel() * s.keep / s.batch))
            idx = torch.topk(torch.rand(tgt.numel(), generator=g, device=toks.device), n_keep).indices
            loss = F.cross_entropy(flat[idx].float(), tgt[idx])
            sel["loss_tokens"] += n_keep
        else:
            extra = {} if ref_tok is None else {"reference_nll": ref_tok.reshape(-1)}
            loss = crit(flat, tgt, **extra)
            if crit.config.selection == "sampled":   # a random count: read it (one device read per step)
                sel["loss_tokens"] += crit.get_metrics()["tokens_selected"]
            else:                                    # exactly k of SPEC §5.3: every token is eligible here
                sel["loss_tokens"] += int(round(tgt.numel() * s.keep / s.batch))
            if ref_tok is not None and getattr(crit, "last_mask", None) is not None:
                msk = crit.last_mask.reshape(-1)
                sel["tok_ref_sel"] += ref_tok.reshape(-1)[msk].sum()
                sel["tok_n_sel"] += msk.sum()
        if ref_tok is not None:
            sel["tok_ref_all"] += ref_tok.sum()
            sel["tok_n_all"] += ref_tok.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def reference_model(self) -> torch.nn.Module:
        """The reference model itself (token-level excess needs per-token reference losses, which the stored
        per-chunk tables do not hold): trained once per invocation with ensure_reference's recipe, kept in memory."""
        if getattr(self, "_ref_model", None) is None:
            s = self.scale
            ref = self.corpus["ref"]
            steps_per_epoch = max(1, ref.shape[0] // s.batch)
            total = steps_per_epoch * s.ref_epochs
            t0 = time.time()
            model = build_model(s, self.V, 1000, self.ctx.device)
            opt = make_optimizer(model, s.ref_lr, self.ctx.device)
            rng = np.random.default_rng(1000)
            order = np.concatenate([rng.permutation(ref.shape[0])[:steps_per_epoch * s.batch]
                                    for _ in range(s.ref_epochs)])
            for j in range(total):
                for g in opt.param_groups:
                    g["lr"] = lr_at(j, total, s.ref_lr)
                self._train_rows(model, opt, self.ctx.tokens(ref[order[j * s.batch:(j + 1) * s.batch], :s.seq_len + 1]))
            model.eval()
            v = self.evaluator.curve_loss(model)
            self.log(f"reference model retrained in memory ({total} steps, {time.time() - t0:.1f} s): val subset "
                     f"{v:.4f}")
            del opt
            self._ref_model = model
        return self._ref_model

    def run(self, spec: RunSpec, keep_state: Any = False) -> Optional[dict]:
        """Train one run (skipped when its JSON exists). ``keep_state``: True = keep the weights in memory when
        they beat the kept ones (the std_B sweep, for the gate); "last" = keep them as ``last_state``."""
        path = self.out / "runs" / f"{spec.key()}.json"
        if path.exists() and not self.args.no_resume:
            self.log(f"skip {spec.key()} (done)")
            return json.loads(path.read_text())
        if self.stopped:
            return None
        est = self.estimate_s(spec)
        if self.args.dry_run:
            listed = self.__dict__.setdefault("_dry_listed", set())
            if spec.key() in listed:    # e.g. seed 0's tuned std_B/std_k: the sweep runs, listed once
                return None
            listed.add(spec.key())
            self.dry_total += est
            self.log(f"would run {spec.key()} (~{est:.0f} s; {self.dry_total:.0f} s so far)")
            return None
        if not self.fits(est):
            self.log(f"deadline: not starting {spec.key()} (~{est:.0f} s)")
            self.stopped = self.stop_at_miss
            return None
        if spec.arm not in ARMS:
            raise ValueError(f"arm: expected one of {ARMS}, got {spec.arm!r}")
        s, ctx = self.scale, self.ctx
        t_build = time.time()
        model = build_model(s, self.V, spec.seed, ctx.device)
        opt = make_optimizer(model, spec.lr, ctx.device)
        cggr = None
        if spec.arm in ("cggr_matched", "cggr_shipped"):
            from cggr_torch import CGGRModel

            opts = {} if spec.arm == "cggr_shipped" else {"warmup_steps": 0, "dynamic_threshold": False}
            cggr = CGGRModel(model, router_layers=min(4, s.layers), **opts)
        if spec.arm in CGGR_EXCESS:
            from cggr_torch import CGGRModel

            cggr = CGGRModel(model, router_layers=min(CGGR_EXCESS[spec.arm], s.layers), scoring="excess",
                             selection="topk", warmup_steps=0, dynamic_threshold=False,
                             min_tokens_ratio=s.keep / s.batch)
        if spec.arm in CGGR_EXCESS_STRIDE:   # round 3: the cheaper router of SPEC §9.3 through the library
            from cggr_torch import CGGRModel

            n_layers, stride = CGGR_EXCESS_STRIDE[spec.arm]
            cggr = CGGRModel(model, router_layers=min(n_layers, s.layers), router_positions=stride,
                             scoring="excess", selection="topk", warmup_steps=0, dynamic_threshold=False,
                             min_tokens_ratio=s.keep / s.batch)
        crit = None
        if spec.arm in TOKEN_ARMS and spec.arm != "random_token":
            from cggr_torch import CGGRLoss

            opts = {"scoring": "combined", "selection": "stratified"} if spec.arm == "cggr_token" else \
                {"scoring": "excess", "selection": "topk" if spec.arm == "excess_token" else "sampled"}
            crit = CGGRLoss(warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=s.keep / s.batch, **opts)
        excess_tok = spec.arm in ("excess_token", "excess_token_sampled")
        # Round 3 reads the stored per-token reference (no reference forward in the step); earlier rounds
        # retrain round 1's reference in memory and run it on the fly.
        ref_model = self.reference_model() if excess_tok and self.ref_store is None else None
        ref_tok_fn = (lambda ids_, seed_=spec.seed: self.ref_tokens_of(ids_, seed_)) \
            if excess_tok and self.ref_store is not None else None
        router = None
        if spec.arm in ROUTER_EXCESS:
            from cggr_torch import create_truncated_router

            router = create_truncated_router(model, min(ROUTER_EXCESS[spec.arm], s.layers))
        B = s.keep if spec.arm == "std_k" else s.batch
        token_level = spec.arm in TOKEN_ARMS
        stream = self.stream(spec.seed, B, spec.steps, spec.noise)
        ref_dev = None
        if ref_tok_fn is not None:
            # The run's whole per-token reference on the device before the clock starts (steps·B·T float16: 39 MB
            # at S2; float16 is what the store holds, so nothing is rounded): a step then only indexes it, as a
            # data loader that ships the stored scores with the batch would, and pays no host copy.
            ids_all = np.concatenate([stream.batch(j)[0] for j in range(spec.steps)])
            ref_dev = torch.from_numpy(ref_tok_fn(ids_all).astype(np.float16)).to(ctx.device).view(
                spec.steps, B, s.seq_len)
        k = s.keep
        evals = sorted({max(1, round(spec.steps * (j + 1) / s.eval_points)) for j in range(s.eval_points)})
        curve, trained_ids, losses = [], [], []
        n_drained = 0
        cand_tokens = trained_rows = 0
        sel = {"cand_ref": 0.0, "trained_ref": 0.0, "cand_full": 0.0, "trained_full": 0.0, "n_full": 0,
               "loss_tokens": 0.0, "tok_ref_sel": 0.0, "tok_ref_all": 0.0, "tok_n_sel": 0.0, "tok_n_all": 0.0,
               "noise_trained_by_quarter": [0, 0, 0, 0], "rows_by_quarter": [0, 0, 0, 0]}
        wall = 0.0
        t_first = None
        ctx.sync()
        t_build_s = time.time() - t_build
        t0 = time.time()
        bar = _bar(range(spec.steps), spec.key(), self.progress)
        for i in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(i, spec.steps, spec.lr)
            ids, toks_np = stream.batch(i)
            toks = ctx.tokens(toks_np)
            cand_tokens += toks_np.shape[0] * s.seq_len
            ref = self.ref_of(ids, spec.seed)
            sel["cand_ref"] += float(ref.sum())
            if spec.arm in ("std_B", "std_k"):
                chosen = np.arange(len(ids))
                losses.append(self._train_rows(model, opt, toks))
            elif spec.arm in ("random_subset", "ref_only"):
                if spec.arm == "random_subset":
                    chosen = np.sort(np.random.default_rng([spec.seed, i, 0x72]).choice(len(ids), k, replace=False))
                else:
                    chosen = np.sort(np.argsort(ref, kind="stable")[:k])     # lowest reference NLL
                losses.append(self._train_rows(model, opt, toks[torch.from_numpy(chosen).to(ctx.device)]))
            elif spec.arm in ("oracle_loss", "oracle_excess"):
                full = token_nll(model, toks, ctx).mean(1)                  # no-grad forward on all candidates
                score = full if spec.arm == "oracle_loss" else full - torch.from_numpy(ref).to(ctx.device)
                idx = torch.topk(score, k).indices
                sel["cand_full"] += full.sum()
                sel["trained_full"] += full[idx].sum()
                sel["n_full"] += 1
                chosen = None                                               # read back at the next eval (no sync)
                trained_ids.append((i, idx, ids))
                losses.append(self._train_rows(model, opt, toks[idx]))
            elif router is not None:   # router excess: no-grad truncated forward on all candidates
                with torch.no_grad(), ctx.autocast():
                    lg = router(toks[:, :-1])
                rl = F.cross_entropy(lg.float().transpose(1, 2), toks[:, 1:], reduction="none").mean(1)
                idx = torch.topk(rl - torch.from_numpy(ref).to(ctx.device), k).indices
                chosen = None                                               # read back at the next eval (no sync)
                trained_ids.append((i, idx, ids))
                losses.append(self._train_rows(model, opt, toks[idx]))
            elif token_level:
                chosen = np.arange(len(ids))
                ref_tok = None if ref_dev is None else ref_dev[i].float()   # (B, T) stored reference of step i
                losses.append(self._train_tokens(model, opt, toks, spec, i, crit, ref_model, sel, ref_tok))
            else:  # cggr_matched / cggr_shipped / cggr_excess_*: the shipped batch-splitting path, 1025 tokens in so
                # the targets are exactly the other arms' 1024 (CGGRModel shifts internally)
                extra = {}
                if spec.arm in CGGR_EXCESS or spec.arm in CGGR_EXCESS_STRIDE:   # per-sequence reference: the
                    # stored per-chunk mean NLL
                    extra["reference_nll"] = torch.from_numpy(ref).to(ctx.device)
                with ctx.autocast():
                    loss = cggr(toks, labels=toks, **extra)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                cggr.step()
                losses.append(loss.detach())
                chosen = cggr.last_kept.cpu().numpy()   # CGGRModel already synchronised to slice the batch
            if chosen is not None:
                trained_ids.append((i, chosen, ids))
            if i == 0:
                ctx.sync()
                t_first = time.time() - t0
                t0 = time.time()
            if i + 1 in evals:
                ctx.sync()
                seg = time.time() - t0
                # The first step (CUDA/cuBLAS start-up) is reported apart; it is counted at the mean step time.
                wall += seg
                steps_timed = i  # steps 1..i
                wall_axis = wall * (i + 1) / max(1, steps_timed)
                trained_rows += self._drain(trained_ids, n_drained, sel, spec)
                if token_level:   # loss tokens, not rows: k/B of the candidates' tokens (sampled: the realised count)
                    trained_rows = int(sel["loss_tokens"]) / s.seq_len
                n_drained = len(trained_ids)
                model.eval()
                vl = self.evaluator.curve_loss(model)
                model.train()
                tl = float(torch.stack(losses).float().mean()) if losses else None   # mean since the last eval
                curve.append({"step": i + 1, "trained_tokens": trained_rows * s.seq_len,
                              "candidate_tokens": cand_tokens, "wall_s": wall_axis, "val_loss": vl, "train_loss": tl})
                losses = []
                if not math.isfinite(vl):
                    self.log(f"{spec.key()}: non-finite val loss at step {i + 1}; stopping this run")
                    break
                ctx.sync()
                t0 = time.time()
        model.eval()
        final = self.evaluator.final(model)
        ms = 1000 * wall / max(1, spec.steps - 1)
        self.measured_ms[spec.arm] = max(ms, self.measured_ms.get(spec.arm, ms))
        all_ids = np.concatenate([ids[c] for _, c, ids in trained_ids]) if trained_ids else np.zeros(0, np.int64)
        rows = max(1, sum(sel["rows_by_quarter"]))
        n_full = sel["n_full"]
        res = {
            "schema": SCHEMA, "key": spec.key(), "arm": spec.arm, "noise": spec.noise, "seed": spec.seed,
            "lr": spec.lr, "tag": spec.tag, "scale": asdict(s), "params": n_params(model),
            "accounting": {"optimizer_steps": spec.steps, "candidate_tokens": cand_tokens,
                           "trained_tokens": int(round(trained_rows * s.seq_len)), "trained_rows": trained_rows,
                           "level": "token" if token_level else "sequence",
                           "train_wall_s": wall * spec.steps / max(1, spec.steps - 1), "first_step_s": t_first,
                           "ms_per_step": ms, "build_s": t_build_s},
            "curve": curve, "final": final,
            "selection": {"noise_share_trained": sum(sel["noise_trained_by_quarter"]) / rows,
                          "noise_share_trained_by_quarter": [
                              n / max(1, r) for n, r in zip(sel["noise_trained_by_quarter"], sel["rows_by_quarter"])],
                          "noise_share_candidates": (n_noise(s) / s.batch) if spec.noise else 0.0,
                          "ref_nll_trained_mean": sel["trained_ref"] / rows,
                          "ref_nll_candidates_mean": sel["cand_ref"] / max(1, cand_tokens // s.seq_len),
                          "full_nll_trained_mean": float(sel["trained_full"]) / (n_full * k) if n_full else None,
                          "full_nll_candidates_mean": float(sel["cand_full"]) / (n_full * s.batch) if n_full else None,
                          "token_ref_nll_selected_mean": (float(sel["tok_ref_sel"]) / float(sel["tok_n_sel"])
                                                          if excess_tok and float(sel["tok_n_sel"]) else None),
                          "token_ref_nll_all_mean": (float(sel["tok_ref_all"]) / float(sel["tok_n_all"])
                                                     if excess_tok and float(sel["tok_n_all"]) else None)},
            "device": self.device_name, "amp": "bf16" if ctx.amp else "fp32", "versions": self.versions,
            "commit": self.commit, "protocol_commit": self.args.protocol_commit,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if excess_tok:
            res["reference"] = {"source": "store" if ref_tok_fn is not None else "on-the-fly"}
            if ref_tok_fn is not None:
                res["reference"].update(self.ref_store_info or {})
        if spec.arm in CGGR_EXCESS_STRIDE:
            res["router"] = {"layers": CGGR_EXCESS_STRIDE[spec.arm][0],
                             "router_positions": CGGR_EXCESS_STRIDE[spec.arm][1]}
        if cggr is not None:
            res["cggr_metrics_last"] = {k2: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                                        for k2, v in cggr.get_metrics().items()}
        if spec.arm not in ("std_B", "std_k"):
            np.save(self.out / "runs" / f"{spec.key()}.ids.npy", all_ids.astype(np.int32))
        if self.after_run is not None:
            self.after_run(spec, model, res)
        path.write_text(json.dumps(res, indent=1))
        sub = curve[-1]["val_loss"] if curve else float("nan")
        self.log(f"done {spec.key()}: val {final['val_loss']:.4f} (subset {sub:.4f}), {ms:.1f} ms/step, trained "
                 f"{trained_rows} rows, noise share {res['selection']['noise_share_trained']:.3f}")
        if keep_state == "last":
            self.last_state = {"spec": spec, "val": final["val_loss"],
                               "state": {k2: v.detach().cpu().clone() for k2, v in model.state_dict().items()}}
        elif keep_state and (self.best_B_state is None or final["val_loss"] < self.best_B_state["val"]):
            self.best_B_state = {"spec": spec, "val": final["val_loss"],
                                 "state": {k2: v.detach().cpu().clone() for k2, v in model.state_dict().items()}}
        del model, opt, cggr
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        self.export()
        return res

    def _drain(self, trained, start: int, sel: dict, spec: RunSpec) -> int:
        """Book the choices ``trained[start:]`` (``(step, chosen, ids)``; the oracle arms' ``chosen`` is still a
        device tensor, read back here, at an evaluation, so that their steps never wait for the host).
        Returns the rows added."""
        added = 0
        for j in range(start, len(trained)):
            i, c, ids = trained[j]
            if isinstance(c, torch.Tensor):
                c = np.sort(c.cpu().numpy())
                trained[j] = (i, c, ids)
            q = min(3, 4 * i // spec.steps)
            sel["rows_by_quarter"][q] += len(c)
            sel["noise_trained_by_quarter"][q] += int((ids[c] < 0).sum())
            sel["trained_ref"] += float(self.ref_of(ids[c], spec.seed).sum())
            added += len(c)
        return added

    # -------------------------------------------------------------------------- the gate
    def gate(self, name: str = "gate.json", state: Optional[dict] = None) -> Optional[dict]:
        """PROTOCOL.md §4 on ``state`` (default: the tuned std_B seed-0 checkpoint), written to ``name``."""
        path = self.out / name
        if path.exists() and not self.args.no_resume:
            self.log(f"skip {name} (done)")
            return json.loads(path.read_text())
        if self.args.dry_run:
            self.log(f"would run the gate {name} (~20 s at S on an H200, plus a std_B retrain if not in memory)")
            return None
        if state is None and self.best_B_state is None:
            self.log("gate: no std_B checkpoint in memory (resumed run?); retraining it")
            best = self.best_lr("std_B")
            if best is None:
                return None
            spec = RunSpec("std_B", 0, best, self.scale.steps, tag="gate-retrain")
            if not self.fits(self.estimate_s(spec) + 20):
                return None
            old = self.args.no_resume
            self.args.no_resume = True
            self.run(spec, keep_state=True)
            self.args.no_resume = old
        from cggr_torch import create_truncated_router, score_tokens

        s, ctx = self.scale, self.ctx
        t0 = time.time()
        state = state if state is not None else self.best_B_state
        model = build_model(s, self.V, 0, ctx.device)
        model.load_state_dict(state["state"])
        model.eval()
        stream = self.stream(0, s.gate_chunks, 1, False, offset=s.batch * s.steps)   # unused by seed-0 runs
        ids, rows = stream.batch(0)
        noise = self.gate_noise_rows()
        routers = [n for n in s.gate_routers if n <= s.layers]
        res = {"checkpoint": state["spec"].key(), "checkpoint_val": state["val"],
               "chunks": int(len(ids)), "noise_chunks": int(noise.shape[0]), "routers": routers, "sets": {}}
        for setname in ("clean", "noise"):
            r = rows.copy()
            ref = self.ref_train[ids].copy()
            is_noise = np.zeros(len(ids), bool)
            if setname == "noise":
                pos = np.random.default_rng(77).choice(len(ids), noise.shape[0], replace=False)
                r[pos] = noise[:, :s.seq_len + 1]
                ref[pos] = self.ref_gate_noise
                is_noise[pos] = True
            scores: dict[str, list] = {"full_loss": []}
            for n in routers:
                scores[f"r{n}_loss"] = []
                scores[f"r{n}_combined"] = []
            routers_m = {n: create_truncated_router(model, n) for n in routers}
            for b in range(0, len(r), s.eval_batch):
                t = ctx.tokens(r[b:b + s.eval_batch])
                scores["full_loss"].append(token_nll(model, t, ctx).mean(1))
                for n, rm in routers_m.items():
                    with torch.no_grad(), ctx.autocast():
                        lg = rm(t[:, :-1])
                    lg = lg.float()
                    scores[f"r{n}_loss"].append(F.cross_entropy(lg.transpose(1, 2), t[:, 1:], reduction="none").mean(1))
                    ts = score_tokens(lg, t[:, 1:], scoring="combined")
                    e = ts.eligible.float()
                    scores[f"r{n}_combined"].append((ts.difficulty.nan_to_num(0.0) * e).sum(1) / e.sum(1).clamp_min(1))
            sc = {k2: torch.cat(v).cpu().numpy().astype(np.float64) for k2, v in scores.items()}
            sc["ref_loss"] = ref.astype(np.float64)
            sc["oracle_excess"] = sc["full_loss"] - sc["ref_loss"]
            for n in routers:
                sc[f"r{n}_excess"] = sc[f"r{n}_loss"] - sc["ref_loss"]
            out = {"spearman_vs_full_loss": {k2: spearman(v, sc["full_loss"]) for k2, v in sc.items()},
                   "spearman_vs_oracle_excess": {k2: spearman(v, sc["oracle_excess"]) for k2, v in sc.items()},
                   "means": {k2: float(v.mean()) for k2, v in sc.items()}}
            if setname == "noise":
                out["noise_share_top25"] = {k2: top_share(v, is_noise, 0.25) for k2, v in sc.items()}
                out["noise_share_top25_of_lowest_ref"] = top_share(-sc["ref_loss"], is_noise, 0.25)
                out["noise_mean"] = {k2: float(v[is_noise].mean()) for k2, v in sc.items()}
                out["clean_mean"] = {k2: float(v[~is_noise].mean()) for k2, v in sc.items()}
            res["sets"][setname] = out
        res["seconds"] = time.time() - t0
        res["commit"] = self.commit
        path.write_text(json.dumps(res, indent=1))
        g = res["sets"]
        rho_l = ", ".join(f"r{n}={g['clean']['spearman_vs_full_loss'][f'r{n}_loss']:.3f}" for n in routers)
        rho_e = ", ".join(f"r{n}={g['clean']['spearman_vs_oracle_excess'][f'r{n}_excess']:.3f}" for n in routers)
        top = g["noise"]["noise_share_top25"]
        self.log(f"{name} ({state['spec'].key()}): rho(router loss, full loss) {rho_l}; rho(router excess, oracle "
                 f"excess) {rho_e}; noise top25 full_loss {top['full_loss']:.2f} "
                 f"oracle_excess {top['oracle_excess']:.2f}")
        del model
        self.export()
        return res

    def gate_r3(self, name: str = "gate.json") -> Optional[dict]:
        """Round 3's gate (PROTOCOL.md "Round 3", item 3) on the tuned std_B seed-0 checkpoint: for router depths
        1 and 4 and each router option of SPEC §9.3 (:data:`ROUTER_OPTIONS`), the router's per-chunk loss and
        excess (its per-chunk mean NLL over the scored positions minus the stored per-chunk reference) computed
        by the library: ``create_truncated_router(model, n, **option)`` reads the columns its ``.positions``
        say, ``cggr_torch.batch_split.select_sequences`` scores them (``difficulty`` = D_b of SPEC §9/§9.3).
        Spearman rho to the full model's loss and to oracle excess (clean set), noise share in the top 25 %
        (noise set), and the stride rule of :func:`choose_r1_stride`."""
        path = self.out / name
        if path.exists() and not self.args.no_resume:
            self.log(f"skip {name} (done)")
            return json.loads(path.read_text())
        if self.args.dry_run:
            self.log(f"would run the gate {name} (~{gate_estimate_s(self.scale, self.args.assume_ms_std_B):.0f} s, "
                     f"plus a std_B retrain if not in memory)")
            return None
        if self.best_B_state is None:
            self.log("gate: no std_B checkpoint in memory (resumed run?); retraining it")
            best = self.best_lr("std_B")
            if best is None:
                return None
            spec = RunSpec("std_B", 0, best, self.scale.steps, tag="gate-retrain")
            if not self.fits(self.estimate_s(spec) + gate_estimate_s(self.scale, self.args.assume_ms_std_B)):
                self.log("deadline: not retraining std_B for the gate; the plan stops here")
                self.stopped = True
                return None
            old = self.args.no_resume
            self.args.no_resume = True
            self.run(spec, keep_state=True)
            self.args.no_resume = old
        from cggr_torch import create_truncated_router
        from cggr_torch.batch_split import select_sequences

        s, ctx = self.scale, self.ctx
        t0 = time.time()
        state = self.best_B_state
        model = build_model(s, self.V, 0, ctx.device)
        model.load_state_dict(state["state"])
        model.eval()
        stream = self.stream(0, s.gate_chunks, 1, False, offset=s.batch * s.steps)   # unused by seed-0 runs
        ids, rows = stream.batch(0)
        noise = self.gate_noise_rows()
        routers = sorted({min(n, s.layers) for n in GATE3_ROUTERS})
        ratio = s.keep / s.batch
        T = s.seq_len + 1      # the batch width CGGRModel gets in training (it shifts internally)
        from cggr.config import RouterPositions

        res = {"checkpoint": state["spec"].key(), "checkpoint_val": state["val"], "chunks": int(len(ids)),
               "noise_chunks": int(noise.shape[0]), "routers": routers, "router_options": ROUTER_OPTIONS,
               "scored_positions": {o: len(RouterPositions(**kw).scored(T) or range(T - 1))
                                    for o, kw in ROUTER_OPTIONS.items()}, "sets": {}}
        routers_m = {(n, o): create_truncated_router(model, n, **kw) for n in routers
                     for o, kw in ROUTER_OPTIONS.items()}
        for setname in ("clean", "noise"):
            r = rows.copy()
            ref = self.ref_train[ids].copy()
            is_noise = np.zeros(len(ids), bool)
            if setname == "noise":
                pos = np.random.default_rng(77).choice(len(ids), noise.shape[0], replace=False)
                r[pos] = noise[:, :s.seq_len + 1]
                ref[pos] = self.ref_gate_noise
                is_noise[pos] = True
            scores: dict[str, list] = {"full_loss": []}
            for n, o in routers_m:
                scores[f"r{n}_{o}_loss"] = []
                scores[f"r{n}_{o}_excess"] = []
            for b in range(0, len(r), s.eval_batch):
                t = ctx.tokens(r[b:b + s.eval_batch])
                rb = torch.from_numpy(ref[b:b + s.eval_batch].astype(np.float32)).to(ctx.device)
                scores["full_loss"].append(token_nll(model, t, ctx).mean(1))
                for (n, o), rm in routers_m.items():
                    p = rm.positions
                    kw = {"router_positions": p.router_positions, "router_samples": p.router_samples,
                          "router_prefix": p.router_prefix}
                    with torch.no_grad():
                        with ctx.autocast():
                            lg = rm(t[:, :p.read_length(t.shape[1])])   # what CGGRModel's router reads
                        loss_sel = select_sequences(lg, t, ratio=ratio, scoring="loss", **kw)
                        exc_sel = select_sequences(lg, t, ratio=ratio, scoring="excess", reference_nll=rb, **kw)
                    scores[f"r{n}_{o}_loss"].append(loss_sel.difficulty.float())
                    scores[f"r{n}_{o}_excess"].append(exc_sel.difficulty.float())
            sc = {k2: torch.cat(v).cpu().numpy().astype(np.float64) for k2, v in scores.items()}
            sc["ref_loss"] = ref.astype(np.float64)
            sc["oracle_excess"] = sc["full_loss"] - sc["ref_loss"]
            out = {"spearman_vs_full_loss": {k2: spearman(v, sc["full_loss"]) for k2, v in sc.items()},
                   "spearman_vs_oracle_excess": {k2: spearman(v, sc["oracle_excess"]) for k2, v in sc.items()},
                   "means": {k2: float(v.mean()) for k2, v in sc.items()}}
            if setname == "noise":
                out["noise_share_top25"] = {k2: top_share(v, is_noise, 0.25) for k2, v in sc.items()}
                out["noise_share_top25_of_lowest_ref"] = top_share(-sc["ref_loss"], is_noise, 0.25)
                out["noise_mean"] = {k2: float(v[is_noise].mean()) for k2, v in sc.items()}
                out["clean_mean"] = {k2: float(v[~is_noise].mean()) for k2, v in sc.items()}
            res["sets"][setname] = out
        res["r1_stride"] = choose_r1_stride(res)
        res["seconds"] = time.time() - t0
        res["commit"] = self.commit
        path.write_text(json.dumps(res, indent=1))
        rho = res["sets"]["clean"]["spearman_vs_oracle_excess"]
        top = res["sets"]["noise"]["noise_share_top25"]
        self.log(f"{name} ({state['spec'].key()}): rho(router excess, oracle excess) " +
                 ", ".join(f"{k2[:-7]}={v:.3f}" for k2, v in rho.items() if k2.endswith("_excess") and
                           k2.startswith("r")) +
                 f"; noise top25 full_loss {top['full_loss']:.2f} oracle_excess {top['oracle_excess']:.2f}; "
                 f"r1 stride {res['r1_stride']}")
        del model, routers_m
        self.export()
        return res

    # -------------------------------------------------------------------------- LR choice
    def best_lr(self, arm: str) -> Optional[float]:
        """argmin of final full-val loss over the seed-0 sweep runs of ``arm`` (PROTOCOL.md §3)."""
        best = None
        for lr, v in self.sweep_results(arm).items():
            if math.isfinite(v) and (best is None or v < best[1]):
                best = (lr, v)
        return None if best is None else best[0]

    def sweep_results(self, arm: str) -> dict:
        """{lr: final val loss} of the seed-0, N-step runs of ``arm`` in the folder: its grid plus any point rule 1
        added (round 3)."""
        out = {}
        for p in sorted((self.out / "runs").glob(f"{arm}__lr*__N{self.scale.steps}__s0.json")):
            r = json.loads(p.read_text())
            if r["arm"] == arm and not r["noise"] and not r["tag"] and r["seed"] == 0:
                out[r["lr"]] = r["final"]["val_loss"]
        return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0


def top_share(score: np.ndarray, flag: np.ndarray, frac: float) -> float:
    """Share of flagged items among the top ``frac`` by score."""
    n = max(1, int(round(frac * len(score))))
    top = np.argsort(-score, kind="stable")[:n]
    return float(flag[top].mean())


def round3_chunk_ids(scale: Scale, n_train: int) -> tuple:
    """(train chunk ids the plan's seeds read, the gate's chunk ids), both sorted. A seed reads the first
    ``max(B·N, k·4N)`` chunks of its permutation (its B-arms and std_k's 4N budget: ``CandidateStream`` takes
    prefixes of one permutation); the gate reads seed 0's ``gate_chunks`` after offset B·N."""
    reads = min(n_train, max(scale.batch * scale.steps, scale.keep * scale.steps * 4))
    ids = np.unique(np.concatenate([np.random.default_rng(x).permutation(n_train)[:reads] for x in scale.seeds]))
    off = scale.batch * scale.steps
    gate = np.sort(np.random.default_rng(0).permutation(n_train)[off:off + scale.gate_chunks])
    return ids.astype(np.int64), gate.astype(np.int64)


def choose_r1_stride(gate: dict) -> int:
    """PROTOCOL.md "Round 3", item 4: the 1-layer router scores every 16th position when the gate's Spearman rho
    of its excess to oracle excess (clean set) is >= :data:`STRIDE16_MIN_RHO`, else every 4th."""
    try:
        rho = gate["sets"]["clean"]["spearman_vs_oracle_excess"]["r1_s16_excess"]
    except (KeyError, TypeError):
        raise ValueError("gate: expected round 3's gate JSON with sets.clean.spearman_vs_oracle_excess."
                         "r1_s16_excess") from None
    return 16 if math.isfinite(rho) and rho >= STRIDE16_MIN_RHO else 4


def edge_extension(results: dict, grid: tuple) -> Optional[float]:
    """Rule 1 (PROTOCOL.md §3/§6): when the argmin of ``results`` ({lr: val}) lies at an edge of ``grid``, the one
    more grid point beyond that edge (half the lowest or twice the highest rate); else None."""
    if not results or any(lr not in results for lr in grid):
        return None
    best = min(grid, key=lambda lr: results[lr])
    if best == min(grid):
        return min(grid) / 2
    if best == max(grid):
        return max(grid) * 2
    return None


def run_overhead_s(scale: Scale, ms_B: float) -> float:
    """Per-run seconds beside the timed steps: model build, the curve evaluations and the final one (forwards of
    eval_batch rows, ~1/3 of a B-row training step each)."""
    n_val = scale.val_chunks or 953
    batches = scale.eval_points * math.ceil(scale.eval_chunks / scale.eval_batch) + \
        math.ceil(n_val / scale.eval_batch) + 2 * math.ceil(scale.ood_chunks / scale.eval_batch)
    return 6.0 + batches * ms_B / 3 * scale.eval_batch / scale.batch / 1000


def reference_estimate_s(scale: Scale, ms_B: float, ref_chunks: int = 7507, train_chunks: int = 69172) -> float:
    """Round 3's reference: corpus start-up, the early-stopped training, its evaluations, and scoring the stores."""
    steps = max(1, (scale.ref_chunks or ref_chunks) // scale.batch) * scale.es_ref_epochs
    n_train = scale.train_chunks or train_chunks
    reads = min(n_train, max(scale.batch * scale.steps, scale.keep * scale.steps * 4))
    covered = n_train * (1 - (1 - reads / n_train) ** len(scale.seeds)) + scale.gate_chunks
    covered += 2 * n_noise(scale) * scale.steps * (len(set(scale.seeds) | {0}))
    fwd_chunk_ms = ms_B / 3 / scale.batch
    evals = math.ceil(steps / scale.es_ref_eval_every) * scale.eval_chunks
    return 30.0 + steps * ms_B / 1000 + (evals + covered + (scale.val_chunks or 953)) * fwd_chunk_ms / 1000


def gate_estimate_s(scale: Scale, ms_B: float) -> float:
    """Round 3's gate: per set (clean, noise), the full forward plus 5 options × the routers (≈ 0.3 and 0.6 of a
    full forward at 1 and 4 layers, head included) over gate_chunks."""
    fwd = math.ceil(scale.gate_chunks / scale.eval_batch) * ms_B / 3 * scale.eval_batch / scale.batch / 1000
    return 10.0 + 2 * fwd * (1 + len(ROUTER_OPTIONS) * 0.9)


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def _git_commit() -> Optional[str]:
    if os.environ.get("CGGR_COMMIT"):   # a device copy's git HEAD can differ from the tree that was sent
        return os.environ["CGGR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pycode.REPO).stdout.strip() or None
    except Exception:
        return os.environ.get("CGGR_COMMIT")


# ----------------------------------------------------------------------------------------------- the plan
def plan_round1(st: Study) -> None:
    """PROTOCOL.md §8 round 1, in priority order; every step is skipped when its output exists."""
    s = st.scale
    st.ensure_reference()
    # LR sweeps (seed 0). The best std_B model is kept in memory for the gate.
    for lr in s.lr_grid_B:
        spec = RunSpec("std_B", 0, lr, s.steps)
        st.run(spec, keep_state=True)    # keeps the best-so-far weights in memory
    _keep_best_only(st)
    for lr in s.lr_grid_k:
        st.run(RunSpec("std_k", 0, lr, s.steps))
    lr_B, lr_k = st.best_lr("std_B"), st.best_lr("std_k")
    st.log(f"tuned LR: std_B {lr_B}, std_k {lr_k}")
    if lr_B is None or lr_k is None:
        st.log("sweeps incomplete: stopping the plan here")
        return
    st.gate()
    arm_lr = {a: lr_k for a in ARMS}
    arm_lr["std_B"] = arm_lr["cggr_shipped"] = lr_B
    main_arms = ("std_B", "std_k", "random_subset", "oracle_loss", "oracle_excess", "ref_only", "cggr_matched",
                 "cggr_shipped")
    noise_arms = ("random_subset", "oracle_excess", "oracle_loss", "cggr_matched")
    seeds = list(s.seeds)
    for a in main_arms:
        st.run(RunSpec(a, seeds[0], arm_lr[a], s.steps))
    for a in noise_arms:
        st.run(RunSpec(a, seeds[0], arm_lr[a], s.steps, noise=True))
    for seed in seeds[1:]:
        for a in main_arms:
            st.run(RunSpec(a, seed, arm_lr[a], s.steps))
    st.run(RunSpec("std_k", seeds[0], lr_k, s.steps, tag="repeat"))
    for seed in seeds:
        for steps in (s.steps // 2, s.steps * 2):
            st.run(RunSpec("std_k", seed, lr_k, steps, tag="budget"))
    for seed in seeds[1:]:
        for a in noise_arms:
            st.run(RunSpec(a, seed, arm_lr[a], s.steps, noise=True))


def _resumed_rates(st: Study, plan: str) -> Optional[tuple[float, float]]:
    """The preamble of every plan after round 1: the reference tables, then round 1's tuned rates (std_B, std_k)
    from its sweeps; None (logged) when the sweeps are not in the output folder."""
    st.ensure_reference()
    lr_B, lr_k = st.best_lr("std_B"), st.best_lr("std_k")
    if lr_B is None or lr_k is None:
        st.log(f"{plan} needs round1's sweeps: stopping")
        return None
    st.log(f"tuned LR: std_B {lr_B}, std_k {lr_k}")
    return lr_B, lr_k


def plan_round1b(st: Study) -> None:
    """Round 1, second device call: what the first left, re-prioritised after it (RESULTS.md says why): the
    nondeterminism floor doubling as a second gate checkpoint (a model *weaker* than the reference), then the
    paired seeds 1-2 of the arms that decide round 2, then the rest of plan_round1 in its order."""
    s = st.scale
    rates = _resumed_rates(st, "round1b")
    if rates is None:
        return
    lr_B, lr_k = rates
    seeds = list(s.seeds)
    if not (st.out / "gate_std_k.json").exists():
        st.run(RunSpec("std_k", seeds[0], lr_k, s.steps, tag="repeat"), keep_state="last")
        if st.last_state is not None:
            st.gate("gate_std_k.json", st.last_state)
    arm_lr = {a: lr_k for a in ARMS}
    arm_lr["std_B"] = arm_lr["cggr_shipped"] = lr_B
    for seed in seeds[1:]:
        for a in ("std_k", "random_subset", "oracle_excess", "cggr_matched"):
            st.run(RunSpec(a, seed, arm_lr[a], s.steps))
    for seed in seeds[1:]:
        st.run(RunSpec("oracle_loss", seed, arm_lr["oracle_loss"], s.steps))
    plan_round1(st)


def _keep_best_only(st: Study) -> None:
    """After the std_B sweep: the kept checkpoint must be the tuned one. run() keeps the best of the runs it trained
    in this invocation; a resumed sweep skips finished runs, so the tuned one may not be among them."""
    best = st.best_lr("std_B")
    if st.best_B_state is not None and best is not None and st.best_B_state["spec"].lr != best:
        st.log(f"kept std_B checkpoint (lr {st.best_B_state['spec'].lr}) is not the tuned one ({best}); "
               f"the gate will retrain it")
        st.best_B_state = None


def plan_round2a(st: Study) -> None:
    """PROTOCOL.md §9, round 2a (same scale, reference and tuned rates as round 1, so it writes into round 1's
    folder): router-excess arms at 4 and 1 layers (3 seeds), more seeds of std_k / random_subset, std_k's budget
    curve for m, router excess at 2 layers, then its noise control."""
    s = st.scale
    rates = _resumed_rates(st, "round2a")
    if rates is None:
        return
    lr_B, lr_k = rates
    seeds = list(s.seeds)
    for a in ("router_excess_r4", "router_excess_r1"):
        for seed in seeds:
            st.run(RunSpec(a, seed, lr_k, s.steps))
    for seed in (3, 4, 5):
        for a in ("std_k", "random_subset"):
            st.run(RunSpec(a, seed, lr_k, s.steps))
    st.run(RunSpec("std_k", seeds[0], lr_k, s.steps * 2, tag="budget"))
    for seed in seeds[1:]:
        for steps in (s.steps // 2, s.steps * 2):
            st.run(RunSpec("std_k", seed, lr_k, steps, tag="budget"))
    for seed in seeds:
        st.run(RunSpec("router_excess_r2", seed, lr_k, s.steps))
    st.run(RunSpec("router_excess_r4", seeds[0], lr_k, s.steps, noise=True))


def plan_round2b(st: Study) -> None:
    """PROTOCOL.md §9, round 2b: the promoted router-excess selection through the library (``CGGRModel``), then
    the token-level arms (3 seeds each), then what round 2a left."""
    s = st.scale
    rates = _resumed_rates(st, "round2b")
    if rates is None:
        return
    lr_B, lr_k = rates
    seeds = list(s.seeds)
    # One seed of each library arm first (its step cost, and P14's check), then the token arms seed-major so
    # that a deadline leaves paired seeds, then the rest.
    for a in ("cggr_excess_r4", "cggr_excess_r1"):
        st.run(RunSpec(a, seeds[0], lr_k, s.steps))
    for seed in seeds:
        for a in ("random_token", "excess_token", "cggr_token"):
            st.run(RunSpec(a, seed, lr_B, s.steps))
    if getattr(st.args, "with_sampled", False):
        for seed in seeds:
            st.run(RunSpec("excess_token_sampled", seed, lr_B, s.steps))
    for a in ("cggr_excess_r4", "cggr_excess_r1"):
        for seed in seeds[1:]:
            st.run(RunSpec(a, seed, lr_k, s.steps))
    st.run(RunSpec("router_excess_r4", seeds[0], lr_k, s.steps, noise=True))
    for seed in seeds[1:]:
        st.run(RunSpec("router_excess_r2", seed, lr_k, s.steps))


def plan_round3a(st: Study) -> None:
    """PROTOCOL.md §9 "Round 3a": seeds 3-5 of the token-level excess comparison (rule 2), then what round 2b left
    (the library's excess arms at seeds 1-2, router excess's noise control, router_excess_r2 seeds 1-2)."""
    s = st.scale
    rates = _resumed_rates(st, "round3a")
    if rates is None:
        return
    lr_B, lr_k = rates
    for seed in (3, 4, 5):
        for a in ("random_token", "excess_token"):
            st.run(RunSpec(a, seed, lr_B, s.steps))
    seeds = list(s.seeds)
    for a in ("cggr_excess_r4", "cggr_excess_r1"):
        for seed in seeds[1:]:
            st.run(RunSpec(a, seed, lr_k, s.steps))
    st.run(RunSpec("router_excess_r4", seeds[0], lr_k, s.steps, noise=True))
    for seed in seeds[1:]:
        st.run(RunSpec("router_excess_r2", seed, lr_k, s.steps))


def round3_units(scale: Scale, lr_B: float, lr_k: float, r1_arm: str) -> list:
    """Round 3's arm units after the sweeps and the gate, in order: per seed, the paired core (every arm that
    compared at the sequence level (std_B's step time for R, std_k, random_subset, the two library routers),
    std_k's budgets (m), the token pair (random_token, excess_token; it needs the per-token store, which a cold
    call rebuilds). A unit runs whole or not at all (``Study.run_unit``), so every device call ends with
    complete, paired units."""
    N = scale.steps
    units = []
    for seed in scale.seeds:
        units.append((f"seed {seed}: sequence arms",
                      [RunSpec("std_B", seed, lr_B, N), RunSpec("std_k", seed, lr_k, N),
                       RunSpec("random_subset", seed, lr_k, N), RunSpec(r1_arm, seed, lr_k, N),
                       RunSpec("cggr_excess_r4", seed, lr_k, N)]))
        units.append((f"seed {seed}: std_k budgets N/2, 2N, 4N",
                      [RunSpec("std_k", seed, lr_k, steps, tag="budget") for steps in (N // 2, 2 * N, 4 * N)]))
        units.append((f"seed {seed}: token arms",
                      [RunSpec("random_token", seed, lr_B, N), RunSpec("excess_token", seed, lr_B, N)]))
    return units


def plan_round3(st: Study) -> None:
    """PROTOCOL.md "Round 3 (S2)": the early-stopped reference and its per-token stores, the LR sweeps of std_B
    and std_k (rule 1: one more point at an edge), the gate with SPEC §9.3's router options (it decides the
    1-layer router's stride), then per seed the paired arms and std_k's budgets, each as a unit that runs whole
    or stops the plan (resume = run the same command again). Token arms read the stored per-token reference."""
    s = st.scale
    st.stop_at_miss = True
    st.ensure_reference_es(stores=False)   # the first call builds all; later ones load the tables
    if st.ref_train is None and not st.args.dry_run:
        return
    sweep = [RunSpec("std_B", 0, lr, s.steps) for lr in s.lr_grid_B] + \
        [RunSpec("std_k", 0, lr, s.steps) for lr in s.lr_grid_k]
    for sp in sweep:   # the std_B runs keep the best weights in memory for the gate
        st.run(sp, keep_state=sp.arm == "std_B")
    for arm, grid in (("std_B", s.lr_grid_B), ("std_k", s.lr_grid_k)):
        ext = edge_extension(st.sweep_results(arm), grid)
        if ext is not None:
            st.log(f"rule 1: {arm}'s argmin is at an edge of {grid}; adding lr {ext:g}")
            st.run(RunSpec(arm, 0, ext, s.steps), keep_state=arm == "std_B")
    if st.stopped:
        return
    _keep_best_only(st)
    lr_B, lr_k = st.best_lr("std_B"), st.best_lr("std_k")
    if st.args.dry_run and (lr_B is None or lr_k is None):
        lr_B, lr_k = lr_B or s.lr_grid_B[len(s.lr_grid_B) // 2], lr_k or s.lr_grid_k[len(s.lr_grid_k) // 2]
        st.log(f"(dry run: the sweeps are not done; listing the arms at placeholder rates {lr_B:g}/{lr_k:g})")
    elif lr_B is None or lr_k is None:
        st.log("sweeps incomplete: stopping the plan here")
        return
    for arm, lr in (("std_B", lr_B), ("std_k", lr_k)):
        res = st.sweep_results(arm)
        if lr in (min(res, default=lr), max(res, default=lr)) and len(res) > 1:
            st.log(f"rule 1: {arm}'s tuned lr {lr:g} is still at an edge of {sorted(res)}: a claim against it "
                   f"needs the grid extended again")
    st.log(f"tuned LR: std_B {lr_B}, std_k {lr_k}")
    gate = st.gate_r3()
    if gate is None and not st.args.dry_run:
        st.log("gate not done: stopping the plan here")
        return
    stride = choose_r1_stride(gate) if gate is not None else 16
    r1_arm = f"cggr_excess_r1_s{stride}"
    if gate is not None:
        st.log(f"gate: rho(r1 stride-16 excess, oracle excess) = "
               f"{gate['sets']['clean']['spearman_vs_oracle_excess']['r1_s16_excess']:.3f} -> {r1_arm}")
    for what, specs in round3_units(s, lr_B, lr_k, r1_arm):
        if not st.run_unit(specs, what):
            return


def round3_schedule(scale: Scale, ms_B: float, deadline_s: float) -> list:
    """The estimated device calls of the whole round-3 plan from scratch at ``ms_B`` ms per std_B step: a list of
    calls, each a list of (task, seconds), packed in plan order as ``--deadline-s`` packs them (a task that does
    not fit starts the next call; a cold machine pays the corpus load and the reference-store rebuild again)."""
    ref_s = reference_estimate_s(scale, ms_B)
    overhead = run_overhead_s(scale, ms_B)

    def run_s(sp: RunSpec) -> float:
        return sp.steps * ms_B * COST_FACTOR[sp.arm] / 1000 + overhead

    tasks = [("reference (train + stores)", ref_s, False)]
    for arm, grid in (("std_B", scale.lr_grid_B), ("std_k", scale.lr_grid_k)):
        tasks += [(f"sweep {arm} lr {lr:g}", run_s(RunSpec(arm, 0, lr, scale.steps)), False) for lr in grid]
    tasks.append(("rule 1: a possible extra sweep point (std_k cost)", run_s(RunSpec("std_k", 0, 1, scale.steps)),
                  False))
    tasks.append(("gate (std_B in memory)", gate_estimate_s(scale, ms_B), False))
    for what, specs in round3_units(scale, 1.0, 1.0, "cggr_excess_r1_s16"):
        if scale.seeds and what.startswith(f"seed {scale.seeds[0]}:"):   # seed 0's std_B/std_k are sweep runs
            specs = [sp for sp in specs if sp.tag or sp.arm not in ("std_B", "std_k")]
        tasks.append((f"{what} ({len(specs)} runs)", sum(run_s(sp) for sp in specs),
                      any(sp.arm == "excess_token" for sp in specs)))
    start = 30.0    # a fresh call: imports, corpus load and checks
    calls, cur, t, have_store = [], [], 0.0, True
    for name, sec, needs_store in tasks:
        extra = ref_s - start if needs_store and not have_store else 0.0
        if cur and t + sec + extra > deadline_s:
            calls.append(cur)
            cur, t, have_store = [("start: corpus load", start)], start, False    # assume a cold machine
            extra = ref_s - start if needs_store else 0.0
        if extra:
            cur.append(("rebuild the reference and its per-token stores", extra))
            t += extra
            have_store = True
        cur.append((name, sec))
        t += sec
    if cur:
        calls.append(cur)
    return calls


def plan_round4(st: Study) -> None:
    """PROTOCOL.md "Round 4 (M)": in ``round4.py`` (imported here, when the plan runs)."""
    from benchmarks.quality import round4

    round4.plan_round4(st)


PLANS: dict[str, Callable[[Study], None]] = {"round1": plan_round1, "round1b": plan_round1b,
                                             "round2a": plan_round2a, "round2b": plan_round2b,
                                             "round3a": plan_round3a, "round3": plan_round3,
                                             "round4": plan_round4}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="S", help=f"one of {sorted(SCALES)}")
    p.add_argument("--round", default="round1", help=f"the plan to run: one of {sorted(PLANS)}")
    p.add_argument("--out", required=True, help="output folder (runs/*.json, ref/, gate.json, log.txt)")
    p.add_argument("--data-dir", default=None, help="the pycode folder (default: $CGGR_PYCODE_DIR, .data/pycode, "
                                                     "../shared/data/pycode)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="override N (optimizer steps of the main runs)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's, 0,1,2)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no task that would end later than this many seconds after start")
    p.add_argument("--assume-ms-std-B", type=float, default=None,
                   help=f"std_B ms/step assumed for the deadline before one is measured (default per scale: "
                        f"{ASSUME_MS_STD_B})")
    p.add_argument("--ref-store", default=None,
                   help="round 3: folder of the per-token reference stores (default .refstore/round3/<scale>); "
                        "round 4: its sweep/ subfolder keeps the sweep runs' weights (default "
                        ".refstore/round4/<scale>/sweep)")
    p.add_argument("--ref-dir", default=None,
                   help="round 4: the folder of the per-chunk reference table it reads (refnll_train.npy, "
                        "ref.json; default benchmarks/quality/results/round3/ref)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the round's estimated device calls (round3, round4; --deadline-s per call, default "
                        "480) and exit without loading the corpus")
    p.add_argument("--export", default=None, help="tar.gz path refreshed after every task (device calls)")
    p.add_argument("--protocol-commit", default=os.environ.get("CGGR_PROTOCOL_COMMIT"),
                   help="the commit of PROTOCOL.md the runs follow (recorded in every JSON)")
    p.add_argument("--no-resume", action="store_true", help="re-run tasks whose output exists")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs the plan would start (with estimated seconds) and run nothing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--with-sampled", action="store_true",
                   help="round2b: add the excess_token_sampled arm (needs selection='sampled', issue 14)")
    p.add_argument("--no-verify", action="store_true", help="skip the corpus sha256 checks")
    a = p.parse_args(argv)
    if a.scale not in SCALES:
        raise ValueError(f"--scale: expected one of {sorted(SCALES)}, got {a.scale!r}")
    if a.round not in PLANS:
        raise ValueError(f"--round: expected one of {sorted(PLANS)}, got {a.round!r}")
    scale = SCALES[a.scale]
    if a.steps is not None:
        if a.steps < 2:
            raise ValueError(f"--steps: expected an integer >= 2, got {a.steps}")
        scale = replace(scale, steps=a.steps)
    if a.seeds is not None:
        try:
            seeds = tuple(int(x) for x in a.seeds.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
        if not seeds or any(x < 0 for x in seeds):
            raise ValueError(f"--seeds: expected non-negative integers, got {a.seeds!r}")
        scale = replace(scale, seeds=seeds)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected cuda or cpu, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if a.deadline_s is not None and a.deadline_s <= 0:
        raise ValueError(f"--deadline-s: expected > 0, got {a.deadline_s}")
    if a.assume_ms_std_B is None:
        a.assume_ms_std_B = ASSUME_MS_STD_B.get(scale.name, 40.0)
    if a.assume_ms_std_B <= 0:
        raise ValueError(f"--assume-ms-std-B: expected > 0, got {a.assume_ms_std_B}")
    if a.plan_only and a.round not in ("round3", "round4"):
        raise ValueError(f"--plan-only: only the round3 and round4 plans have a static schedule, got --round "
                         f"{a.round}")
    a.scale_obj = scale
    return a


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        deadline = args.deadline_s or 480.0
        if args.round == "round4":
            from benchmarks.quality import round4

            calls = round4.round4_schedule(args.scale_obj, args.assume_ms_std_B, deadline)
        else:
            calls = round3_schedule(args.scale_obj, args.assume_ms_std_B, deadline)
        total = sum(sec for c in calls for _, sec in c)
        print(f"{args.round} at scale {args.scale_obj.name}, std_B assumed {args.assume_ms_std_B:g} ms/step, "
              f"--deadline-s {deadline:g}: {len(calls)} calls, ~{total / 60:.1f} min of device time")
        for j, c in enumerate(calls, 1):
            print(f"call {j} (~{sum(sec for _, sec in c):.0f} s):")
            for name, sec in c:
                print(f"    {name}: ~{sec:.0f} s")
        return 0
    st = Study(args)
    st.log(f"plan {args.round} at scale {args.scale_obj.name} on {st.device_name}; commit {st.commit}; "
           f"protocol {args.protocol_commit}")
    PLANS[args.round](st)
    st.log(f"plan finished or stopped at its deadline after {st.elapsed():.0f} s")
    st.export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
