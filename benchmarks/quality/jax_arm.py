"""Round 4's JAX arm (PROTOCOL.md "Round 4 (M)", item 4): ``cggr_excess_r1_s4`` through ``cggr_jax``'s public API.

``cggr_excess_r1_s4_jax`` trains the Flax NNX ``cggr_jax.models.DecoderLM`` at the scale's architecture with the
JAX batch-split step (``cggr_jax.batch_split.make_batch_split_train_step``, SPEC §9): a 1-layer router scoring
every 4th position (SPEC §9.3), ``scoring="excess"`` with the per-sequence reference (SPEC §9.1: the stored
per-chunk mean NLL of round 3's reference), ``selection="topk"``, ratio k/B, no warm-up, no dynamic threshold;
optax AdamW (β 0.9/0.95, weight decay 0.1 on matrices only) after global-norm clipping at 1.0, with the schedule
of ``study.lr_at`` (linear warm-up over 5 %, cosine to 10 %); bf16 compute (float32 parameters and optimizer
state) on a GPU, float32 on CPU, as the PyTorch arms autocast only on CUDA. The candidate stream is the PyTorch
arms' (``Study.stream(seed, B, N, noise=False)``), the evaluations are at the same steps on the same val subset,
and the final val / `test` / OOD numbers are float32 NLL means over the same chunks, computed here in JAX.

It runs in its own process, started by ``round4.plan_round4`` (JAX and PyTorch in one process compete for GPU
memory; ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set by the parent anyway)::

    python -m benchmarks.quality.jax_arm --arm-seed 0 --lr 1e-3 -- --scale M --round round4 --out DIR ...

(the arguments after ``--`` are ``study.py``'s, for the corpus, the scale and the output folder). It writes
``runs/<key>.json`` in the PyTorch runs' schema (``analyze.py`` reads it), plus ``"framework": "jax"``, the
jax/jaxlib/flax/optax versions and ``differences_from_pytorch_arm``. The step loop reads nothing back from the
device except at the evaluations (as the PyTorch arms): the per-step metrics stay device arrays until then.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from typing import Optional

import numpy as np

from benchmarks.quality import study

#: The arm's name in the results folder.
ARM = "cggr_excess_r1_s4_jax"
#: The PyTorch arm it repeats, and that arm's router (layers, positions stride).
TORCH_ARM = "cggr_excess_r1_s4"
ROUTER = study.CGGR_EXCESS_STRIDE[TORCH_ARM]


def lr_schedule(total: int, peak: float):
    """``study.lr_at`` as an optax schedule (``count -> lr``, jit-compatible): linear warm-up over the run's first
    5 % of steps, cosine to 10 % of peak at its last step. ``count`` is the number of updates made so far."""
    import jax.numpy as jnp

    if total < 1:
        raise ValueError(f"total: expected >= 1 steps, got {total}")
    w = max(1, int(round(0.05 * total)))
    span = max(1, total - 1 - w)

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        warm = peak * (c + 1.0) / w
        p = jnp.clip((c - w) / span, 0.0, 1.0)
        cos = peak * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * p)))
        return jnp.where(c < w, warm, cos)

    return schedule


def make_optimizer(total: int, peak: float):
    """``advance_curriculum`` (the step reads the curriculum step from it, SPEC §5.1), global-norm clipping at 1.0,
    then AdamW with study §2's betas and weight decay 0.1 on matrices only (``ndim >= 2``, as
    ``study.make_optimizer``)."""
    import jax
    import optax
    from cggr_jax import advance_curriculum

    return optax.chain(advance_curriculum(), optax.clip_by_global_norm(1.0),
                       optax.adamw(lr_schedule(total, peak), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                   mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)))


def build(scale: study.Scale, vocab: int, seed: int, dtype):
    """The scale's architecture as a ``DecoderLM`` (untied head, SwiGLU of width ``ffn``, RMSNorm eps 1e-6 and
    RoPE θ 10^4 as ``LlamaConfig``'s defaults, normal(0.02) initialisation), initialised from ``nnx.Rngs(seed)``."""
    import jax.numpy as jnp
    from flax import nnx
    from cggr_jax.models import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=vocab, d_model=scale.d_model, num_layers=scale.layers, num_heads=scale.heads,
                        max_seq_len=scale.seq_len + 1, mlp_hidden_dim=scale.ffn, dtype=dtype,
                        param_dtype=jnp.float32, norm_eps=1e-6, rope_theta=10000.0, init_std=0.02)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def make_train_step(model, scale: study.Scale, total: int, peak: float):
    """The batch-split step of the arm (SPEC §9): ``(step, state)``. ``buckets=(k,)``: the gathered batch is exactly
    the k kept rows (B is always added as a bucket), so one model forward/backward of k rows runs per step, as
    ``CGGRModel`` slices exactly k, and only two branches compile."""
    from flax import nnx
    from cggr_jax.batch_split import BatchSplitConfig, make_batch_split_train_step

    layers, stride = ROUTER
    cfg = BatchSplitConfig(router_layers=min(layers, scale.layers), router_positions=stride, scoring="excess",
                           selection="topk", warmup_steps=0, dynamic_threshold=False,
                           min_tokens_ratio=scale.keep / scale.batch)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    step = make_batch_split_train_step(graphdef, cfg, make_optimizer(total, peak), buckets=(scale.keep,))
    return step, step.init(model)


def make_nll(graphdef):
    """Jitted ``(params, rest, toks (b, T+1)) -> (b, T)`` float32 next-token NLL (log-softmax of the model's float32
    logits), no gradient: the evaluation of every number of this arm."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def nll(params, rest, toks):
        logits = nnx.merge(graphdef, params, rest)(toks[:, :-1]).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(lp, toks[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]

    return nll


class JaxEvaluator:
    """``study.Evaluator``'s numbers for a JAX model: the same chunks (its val, val subset, `test` and OOD arrays),
    the same batches (``eval_batch`` rows; a short last batch is padded and the padding dropped, so one shape
    compiles), per-chunk means of float32 NLL, then their mean."""

    def __init__(self, ev: study.Evaluator, graphdef) -> None:
        self.ev, self.nll = ev, make_nll(graphdef)
        self.rank = ev.rank.cpu().numpy()

    def token_nll(self, params, rest, rows: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        b = self.ev.scale.eval_batch
        out = []
        for i in range(0, rows.shape[0], b):
            chunk = rows[i:i + b].astype(np.int32)
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, chunk.shape[1]), np.int32)])
            out.append(np.asarray(self.nll(params, rest, jnp.asarray(chunk)))[:n])
        return np.concatenate(out) if out else np.zeros((0, rows.shape[1] - 1), np.float32)

    def mean(self, params, rest, rows: np.ndarray) -> float:
        return float(self.token_nll(params, rest, rows).mean(1).mean())

    def curve_loss(self, params, rest) -> float:
        return self.mean(params, rest, self.ev.subset)

    def final(self, params, rest) -> dict:
        ev = self.ev
        nll = self.token_nll(params, rest, ev.val)
        r = self.rank[ev.val[:, 1:].astype(np.int64)]
        tot, cnt = [], []
        for lo, hi in ev.BUCKETS:
            m = (r >= lo) if hi is None else ((r >= lo) & (r < hi))
            tot.append(float((nll.astype(np.float64) * m).sum()))
            cnt.append(float(m.sum()))
        names = [f"rank_{lo}_{hi if hi else 'end'}" for lo, hi in ev.BUCKETS]
        out = {"val_loss": float(nll.mean(1).mean()), "val_chunks": int(nll.shape[0]),
               "val_loss_subset": self.curve_loss(params, rest),
               "val_loss_by_freq_bucket": {n: (t / c if c else None) for n, t, c in zip(names, tot, cnt)},
               "val_token_share_by_freq_bucket": {n: c / sum(cnt) for n, c in zip(names, cnt)},
               "ood": {k: self.mean(params, rest, v) for k, v in ev.ood.items()}}
        if ev.test is not None:
            out.update(test_loss=self.mean(params, rest, ev.test), test_chunks=int(ev.test.shape[0]))
        return out


def train(st: study.Study, seed: int, lr: float, steps: int, device_name: Optional[str] = None,
          dtype_name: str = "auto") -> dict:
    """Train the arm and write its JSON (skipped when it exists). Returns the result dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    s = st.scale
    spec = study.RunSpec(ARM, seed, lr, steps)
    path = st.out / "runs" / f"{spec.key()}.json"
    if path.exists() and not st.args.no_resume:
        st.log(f"skip {spec.key()} (done)")
        return json.loads(path.read_text())
    if st.ref_train is None:
        raise ValueError("train: the per-chunk reference table is not loaded (round4.load_reference)")
    backend = jax.default_backend()
    if dtype_name == "auto":
        dtype_name = "bfloat16" if backend == "gpu" else "float32"
    if dtype_name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype: expected auto, bfloat16 or float32, got {dtype_name!r}")
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    t_build = time.time()
    model = build(s, st.V, seed, dtype)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    train_step, state = make_train_step(model, s, steps, lr)
    ev = JaxEvaluator(st.evaluator, train_step.graphdef)
    stream = st.stream(seed, s.batch, steps, False)
    # The first step's selection, before the clock starts (route() is the step's own router part, public for
    # this): recorded so that a reader can check the arm's ranking (tests/test_quality_round4.py does).
    ids0, toks0 = stream.batch(0)
    t0_ids = jnp.asarray(toks0.astype(np.int32))
    rank, k0, _ = jax.jit(train_step.route)(state.params, state.rest, t0_ids, t0_ids, None, jnp.int32(0),
                                            jnp.asarray(st.ref_of(ids0, seed)))
    rank, k0 = np.asarray(rank), int(k0)
    first_kept = np.where((rank >= 0) & (rank < k0))[0]
    del model
    evals = sorted({max(1, round(steps * (j + 1) / s.eval_points)) for j in range(s.eval_points)})
    curve, pend_rows, pend_loss, pend_diff = [], [], [], []
    trained_rows, cand_tokens, cand_ref, diff_sum, diff_n = 0, 0, 0.0, 0.0, 0
    wall, t_first = 0.0, None
    metrics = None
    jax.block_until_ready(state)
    t_build_s = time.time() - t_build
    t0 = time.time()
    for i in range(steps):
        ids, toks_np = stream.batch(i)
        # Host (NumPy) arrays go in: the step checks the labels' range on the caller's values before its jitted
        # part (SPEC §11), which for a device array would be a device-to-host copy every step; jit transfers
        # NumPy arguments to the device asynchronously.
        toks = toks_np.astype(np.int32)
        ref = st.ref_of(ids, seed)
        cand_tokens += toks_np.shape[0] * s.seq_len
        cand_ref += float(ref.sum())
        state, metrics = train_step(state, toks, toks, None, ref)
        pend_rows.append(metrics["sequences_selected"])   # device scalars: read at the next evaluation
        pend_loss.append(metrics["loss"])
        pend_diff.append(metrics["avg_sequence_difficulty_selected"])
        if i == 0:   # the first step compiles: reported apart, counted at the mean step time
            jax.block_until_ready(state)
            t_first = time.time() - t0
            t0 = time.time()
        if i + 1 in evals:
            jax.block_until_ready(state)
            wall += time.time() - t0
            wall_axis = wall * (i + 1) / max(1, i)
            rows = np.asarray(jnp.stack(pend_rows))
            trained_rows += int(rows.sum())
            d = np.asarray(jnp.stack(pend_diff), np.float64)
            diff_sum += float(d.sum())
            diff_n += len(d)
            tl = float(np.asarray(jnp.stack(pend_loss), np.float64).mean())
            pend_rows, pend_loss, pend_diff = [], [], []
            vl = ev.curve_loss(state.params, state.rest)
            curve.append({"step": i + 1, "trained_tokens": trained_rows * s.seq_len,
                          "candidate_tokens": cand_tokens, "wall_s": wall_axis, "val_loss": vl, "train_loss": tl})
            if not math.isfinite(vl):
                st.log(f"{spec.key()}: non-finite val loss at step {i + 1}; stopping this run")
                break
            t0 = time.time()
    final = ev.final(state.params, state.rest)
    ms = 1000 * wall / max(1, steps - 1)
    import flax
    import optax

    res = {
        "schema": study.SCHEMA, "key": spec.key(), "arm": ARM, "noise": False, "seed": seed, "lr": lr, "tag": "",
        "scale": asdict(s), "params": n_params, "framework": "jax",
        "accounting": {"optimizer_steps": steps, "candidate_tokens": cand_tokens,
                       "trained_tokens": int(trained_rows * s.seq_len), "trained_rows": trained_rows,
                       "level": "sequence", "train_wall_s": wall * steps / max(1, steps - 1),
                       "first_step_s": t_first, "ms_per_step": ms, "build_s": t_build_s},
        "curve": curve, "final": final,
        "selection": {"noise_share_trained": 0.0, "noise_share_trained_by_quarter": [0.0] * 4,
                      "noise_share_candidates": 0.0,
                      # The jitted step returns no kept ids (it would have to sync or carry them out): the trained
                      # chunks' reference NLL is not known; the router excess of the kept rows (D_b) is.
                      "ref_nll_trained_mean": None,
                      "ref_nll_candidates_mean": cand_ref / max(1, cand_tokens // s.seq_len),
                      "full_nll_trained_mean": None, "full_nll_candidates_mean": None,
                      "token_ref_nll_selected_mean": None, "token_ref_nll_all_mean": None,
                      "router_excess_selected_mean": diff_sum / max(1, diff_n),
                      "first_step_kept_positions": first_kept.tolist(),
                      "first_step_kept_ids": np.sort(ids0[first_kept]).tolist()},
        "router": {"layers": ROUTER[0], "router_positions": ROUTER[1], "router_path": train_step.router_path},
        "batch_split": {"mode": train_step.mode, "buckets": list(train_step.bucket_sizes(s.batch)),
                        "num_traces": train_step.num_traces, "selection": "topk", "scoring": "excess",
                        "ratio": s.keep / s.batch, "warmup_steps": 0, "dynamic_threshold": False},
        "cggr_metrics_last": {k2: float(np.asarray(v)) for k2, v in (metrics or {}).items()},
        "differences_from_pytorch_arm": [
            "weights: JAX's own initialisation (nnx.Rngs(seed), normal(0.02) like LlamaForCausalLM's, not the same "
            "numbers): compare with the PyTorch arm's seed band (PROTOCOL.md round 4, item 4)",
            "model: cggr_jax.models.DecoderLM (Llama-style: RMSNorm eps 1e-6, RoPE rotate-half theta 1e4, SwiGLU, "
            "untied head) with jax.nn.dot_product_attention instead of transformers' LlamaForCausalLM with SDPA",
            f"precision: DecoderConfig(dtype={dtype_name}, param_dtype=float32) (bf16 matmuls, float32 logits and "
            "norms) instead of torch.autocast(bfloat16)",
            "selection log: no per-step kept ids (the jitted step does not return them): no ids.npy, "
            "ref_nll_trained_mean is null; the first step's kept ids and the mean router excess of the kept rows "
            "are recorded instead",
        ],
        "device": device_name or st.device_name, "amp": "bf16" if dtype_name == "bfloat16" else "fp32",
        "jax_backend": backend,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": _version("jaxlib"), "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__},
        "commit": st.commit, "protocol_commit": st.args.protocol_commit,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ref_info = getattr(st, "round4_reference", None)
    if ref_info is not None:
        res["reference"] = ref_info
    path.write_text(json.dumps(res, indent=1))
    sub = curve[-1]["val_loss"] if curve else float("nan")
    test = final.get("test_loss", float("nan"))
    st.log(f"done {spec.key()}: val {final['val_loss']:.4f} (subset {sub:.4f}), test {test:.4f}, {ms:.1f} ms/step "
           f"(first step {t_first:.1f} s), trained {trained_rows} rows, router path {train_step.router_path}")
    return res


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def parse_args(argv: Optional[list] = None) -> tuple:
    """``(arm args, study args)``: the arm's own options, then ``study.parse_args`` of the rest (after ``--``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm-seed", type=int, default=0, help="the run's seed (weights and candidate stream)")
    p.add_argument("--lr", type=float, required=True, help="peak LR (std_k's tuned rate)")
    p.add_argument("--run-steps", type=int, default=None, help="optimizer steps (default: the scale's N)")
    p.add_argument("--device-name", default=None, help="the device name recorded in the JSON (the parent's)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 on a GPU, else float32), "
                                                   "bfloat16 or float32")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        j = argv.index("--")
        own, rest = argv[:j], argv[j + 1:]
    else:
        own, rest = argv, []
    a = p.parse_args(own)
    if a.arm_seed < 0:
        raise ValueError(f"--arm-seed: expected a non-negative integer, got {a.arm_seed}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise ValueError(f"--lr: expected a finite rate > 0, got {a.lr}")
    if a.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype: expected auto, bfloat16 or float32, got {a.dtype!r}")
    if a.run_steps is not None and a.run_steps < 2:
        raise ValueError(f"--run-steps: expected an integer >= 2, got {a.run_steps}")
    sa = study.parse_args(rest)
    if sa.round != "round4":
        raise ValueError(f"--round: the JAX arm belongs to round4, got {sa.round!r}")
    return a, sa


def main(argv: Optional[list] = None) -> int:
    from benchmarks.quality import round4

    a, sa = parse_args(argv)
    sa.device = "cpu"   # the torch side only loads the corpus and the evaluation sets here: JAX trains
    st = study.Study(sa)
    round4.load_reference(st)
    st.log(f"JAX arm {ARM}: seed {a.arm_seed}, lr {a.lr:g}, steps {a.run_steps or st.scale.steps}")
    train(st, a.arm_seed, a.lr, a.run_steps or st.scale.steps, a.device_name, a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
