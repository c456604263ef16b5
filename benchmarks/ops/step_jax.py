"""The whole training step, JAX / Flax NNX: forward + backward + optax AdamW update of
``cggr_jax.models.DecoderLM`` (the Llama-style model of the ``models`` suite) at the shapes of
``benchmarks/step.py``, bf16 weights and compute, random init, random tokens, one ``jax.jit`` per row.

Run through ``benchmarks/step.py --framework jax``; this module measures the rows of one shape. Rows
(``ROWS``, in the order they run; each from the same initial weights and a fresh
``optax.chain(cggr_jax.advance_curriculum(), optax.adamw(...))``):

* ``standard``       mean next-token cross-entropy of the model's float32 logits (``optax``);
* ``cggr_loss``      ``cggr_jax.CGGRLoss`` on the same logits;
* ``cggr_fused``     the fused CGGR head, ``cggr_jax.fused_linear.fused_linear_cggr_loss`` on
                     ``model.hidden_states(ids)`` and the (tied) embedding (the logits never exist);
* ``batch_split_L{1,2,4}`` ``cggr_jax.batch_split.make_batch_split_train_step`` (``mode="cggr"``), a truncated
                     router of 1, 2, 4 layers, buckets ``(k, B)`` (``k`` = the kept count; ``B`` is always added);
* ``batch_split_L1_<option>`` the cheaper routers of SPEC §9.3: ``BatchSplitConfig(router_layers=1, **options)``
                     with ``cfg["router_options"][row]`` (``benchmarks/step.py`` ``ROUTER_OPTION_ROWS``) less
                     PyTorch's ``router_compile`` (the JAX router is jitted with the step);
* ``random_subset``  the full model on ``k`` random sequences of the batch (a permutation keyed by the step).

CGGR settings as in the PyTorch rows (``benchmarks/ops/step_torch.py``): defaults except ``warmup_steps=0`` and
the dynamic threshold off unless asked.

Each row's step is lowered and compiled once ahead of time (``jit(...).lower(...).compile()``, timed as
``compile_s``) and that compiled step is what runs; XLA's memory analysis of it gives the peak memory
(arguments + outputs − donated aliases + temporaries: JAX has no resettable peak counter). The batch-split
rows lower the step's own jitted function (``benchmarks.harness.compat.jax_batch_split_jitted``), so the
host-side label range check of ``BatchSplitTrainStep.__call__`` (a host read of the labels) is not timed.
``warmup`` untimed calls, then ``steps`` timed calls, each ended by ``block_until_ready``.
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROWS: list[str] = ["standard", "cggr_fused", "random_subset", "batch_split_L4", "cggr_loss", "batch_split_L2",
                   "batch_split_L1", "batch_split_L1_stride4", "batch_split_L1_stride", "batch_split_L1_samples",
                   "batch_split_L1_prefix", "batch_split_L1_combined"]
#: The rows ``benchmarks/step.py`` runs without ``--rows``: all but the combined router (as in PyTorch). At the
#: 1B shape the runner's 190 s budget reaches the first rows only (the rest are recorded as skipped); the
#: cheaper routers need a call of their own (``--rows random_subset,batch_split_L1,batch_split_L1_stride,...``).
DEFAULT_ROWS: list[str] = [r for r in ROWS if r != "batch_split_L1_combined"]
#: Expected seconds of each row on one H200 at the 1B shape (build, compile, 3 + 8 steps) before any row ran
#: (rescaled by ``benchmarks.harness.budget.Budget``): a batch-split step compiles the model's forward and
#: backward once per bucket (two) plus the router.
PRIOR_S: dict[str, float] = {"standard": 45, "cggr_fused": 50, "random_subset": 40, "batch_split_L4": 80,
                             "cggr_loss": 50, "batch_split_L2": 75, "batch_split_L1": 70,
                             "batch_split_L1_stride": 70, "batch_split_L1_stride4": 70,
                             "batch_split_L1_samples": 70, "batch_split_L1_prefix": 70,
                             "batch_split_L1_combined": 70}
LABELS = {
    "standard": "standard (optax CE, jit)", "cggr_loss": "CGGRLoss on logits", "cggr_fused": "fused CGGR head",
    "random_subset": "random subset (same kept count)", "batch_split_L1": "batch split, 1-layer router",
    "batch_split_L2": "batch split, 2-layer router", "batch_split_L4": "batch split, 4-layer router",
    "batch_split_L1_stride": "batch split, 1-layer router, router_positions (stride)",
    "batch_split_L1_stride4": "batch split, 1-layer router, router_positions=4 (the recommended router)",
    "batch_split_L1_samples": "batch split, 1-layer router, router_samples",
    "batch_split_L1_prefix": "batch split, 1-layer router, router_prefix",
    "batch_split_L1_combined": "batch split, 1-layer router, router_prefix + router_samples",
}
IGNORE = -100


def attention_for(shape: dict[str, Any], dtype: Any, requested: str) -> tuple[str, Optional[str]]:
    """``(attention implementation, note)``: ``auto`` = cuDNN flash attention on a GPU when a causal call of
    the model's head layout compiles there (else XLA's, with the error as the note)."""
    if requested != "auto":
        return requested, None
    if jax.default_backend() != "gpu" or dtype == jnp.float32:
        return "xla", None
    try:
        hd = shape["d"] // shape["heads"]
        q = jnp.zeros((1, shape["seq_len"], shape["heads"], hd), dtype)
        kv = jnp.zeros((1, shape["seq_len"], shape["kv_heads"], hd), dtype)
        fn = jax.jit(lambda q, kv: jax.nn.dot_product_attention(q, kv, kv, is_causal=True, implementation="cudnn"))
        jax.block_until_ready(fn(q, kv))
        return "cudnn", None
    except Exception as err:  # noqa: BLE001 - unavailable here: reported, XLA attention used
        return "xla", f"cuDNN attention unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"


def decoder_config(shape: dict[str, Any], dtype: Any, attention: str):
    from cggr_jax.models import DecoderConfig

    return DecoderConfig(vocab_size=shape["vocab"], d_model=shape["d"], num_layers=shape["layers"],
                         num_heads=shape["heads"], num_kv_heads=shape["kv_heads"], mlp_hidden_dim=shape["ffn"],
                         max_seq_len=shape["seq_len"], tie_embeddings=shape["tied"], dtype=dtype,
                         param_dtype=dtype, attention_implementation=attention)


def _short(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _head(model: Any) -> tuple[jax.Array, str]:
    """The LM head's weight and layout: the tied embedding ``(V, d)`` or the untied kernel ``(d, V)``."""
    if model.lm_head is None:
        return model.embed.embedding[...], "vd"
    return model.lm_head.kernel[...], "dv"


def _shifted(ids: jax.Array) -> jax.Array:
    """``shifted[:, t] = ids[:, t + 1]``, the last position ``-100`` (SPEC §1)."""
    return jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], IGNORE)], axis=1)


def _own_step(graphdef: Any, tx: Any, loss_of: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]):
    """``(state, ids) -> (state, metrics)``: value_and_grad of ``loss_of(model, ids, step)`` (which returns
    ``(loss, trained tokens)``) and the optax update; the state ``(params, rest, opt_state)`` is donated."""
    from cggr_jax import current_step

    def step(state: Any, ids: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        params, rest, opt_state = state
        cur = current_step(opt_state)

        def f(p: Any) -> tuple[jax.Array, Any]:
            return loss_of(nnx.merge(graphdef, p, rest), ids, cur)
        (loss, trained), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, rest, opt_state), {"loss": loss, "tokens_selected": trained}
    return jax.jit(step, donate_argnums=(0,))


def _make_row(row: str, graphdef: Any, model: Any, cfg: dict[str, Any], B: int, T: int) -> tuple[Any, Any, Any,
                                                                                                   dict[str, Any]]:
    """``(jitted step, initial state, argument builder ids -> args after the state, notes)`` of one row."""
    from cggr_jax import CGGRLoss, advance_curriculum
    from cggr_jax import batch_split as bs
    from cggr_jax.fused_linear import fused_linear_cggr_loss

    tx = optax.chain(advance_curriculum(), optax.adamw(cfg["lr"], weight_decay=0.01))
    cggr_kw = dict(min_tokens_ratio=cfg["ratio"], warmup_steps=0, dynamic_threshold=cfg["dynamic_threshold"])
    k = cfg["kept"]
    full = jnp.int32(B * (T - 1))
    notes: dict[str, Any] = {}

    def own_state() -> Any:
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = jax.tree_util.tree_map(jnp.copy, (params, rest))
        return params, rest, tx.init(params)

    def ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    if row == "standard":
        def standard(m: Any, ids: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
            return ce(m(ids)[:, :-1], ids[:, 1:]), full
        notes["api"] = "optax.softmax_cross_entropy_with_integer_labels(model(ids)[:, :-1], ids[:, 1:]).mean()"
        return _own_step(graphdef, tx, standard), own_state(), lambda ids: (ids,), notes
    if row == "cggr_loss":
        loss_fn = CGGRLoss(**cggr_kw)

        def cggr(m: Any, ids: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
            loss, metrics = loss_fn(m(ids), _shifted(ids), step)
            return loss, metrics["tokens_selected"]
        notes["api"] = "CGGRLoss(model(ids), shifted labels, current_step(opt_state))"
        return _own_step(graphdef, tx, cggr), own_state(), lambda ids: (ids,), notes
    if row == "cggr_fused":
        def fused(m: Any, ids: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
            weight, layout = _head(m)
            loss, metrics = fused_linear_cggr_loss(m.hidden_states(ids), weight, _shifted(ids), step,
                                                   weight_layout=layout, **cggr_kw)
            return loss, metrics["tokens_selected"]
        notes["api"] = "fused_linear_cggr_loss(model.hidden_states(ids), tied embedding, shifted labels, step)"
        return _own_step(graphdef, tx, fused), own_state(), lambda ids: (ids,), notes
    if row == "random_subset":
        key = jax.random.key(cfg["seed"])

        def random_subset(m: Any, ids: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
            idx = jnp.sort(jax.random.permutation(jax.random.fold_in(key, step), B)[:k])
            sub = jnp.take(ids, idx, axis=0)
            return ce(m(sub)[:, :-1], sub[:, 1:]), jnp.int32(k * (T - 1))
        notes["api"] = f"standard loss of ids[random {k} of {B}]"
        return _own_step(graphdef, tx, random_subset), own_state(), lambda ids: (ids,), notes
    if row.startswith("batch_split_L"):
        from benchmarks.harness import compat

        layers = int(row[len("batch_split_L"):].split("_")[0])
        options = dict(cfg.get("router_options", {}).get(row, {})) if row != f"batch_split_L{layers}" else {}
        if row != f"batch_split_L{layers}" and not options:
            raise ValueError(f"row: {row!r} has no router options in cfg['router_options']")
        options.pop("router_compile", None)  # PyTorch's option: the JAX router is always jitted
        split_cfg = bs.BatchSplitConfig(router_layers=layers, seed=cfg["seed"], **options, **cggr_kw)
        buckets = (k,)  # k = the steady-state kept count (benchmarks/step.py); B is always added
        step = bs.make_batch_split_train_step(graphdef, split_cfg, tx, mode="cggr", buckets=buckets)
        state = step.init(model)
        args = "".join(f", {k}={v!r}" for k, v in options.items())
        notes.update(api=f"make_batch_split_train_step(mode='cggr', router_layers={layers}{args}, buckets={buckets})",
                     router_layers=layers, buckets=list(step.bucket_sizes(B)), router_path=step.router_path)
        if options:
            notes["router_options"] = options
        return compat.jax_batch_split_jitted(step), state, lambda ids: (ids, ids, None, None), notes
    raise ValueError(f"row: unknown row {row!r}; expected one of {ROWS}")


def _peak_gib(compiled: Any) -> Optional[float]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis: no figure
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    return total / 2**30


def prepare_shape(shape: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The model of one shape (its initial weights; every row copies them into its own state) and batches."""
    from cggr_jax.models import DecoderLM

    dtype = jnp.bfloat16 if cfg["dtype"] == "bf16" else jnp.float32
    model = DecoderLM(decoder_config(shape, dtype, cfg["attention"]), rngs=nnx.Rngs(cfg["seed"]))
    return {"model": model, "graphdef": nnx.split(model, nnx.Param, ...)[0],
            "batches": make_batches(shape, cfg["seed"])}


def release_shape(prepared: dict[str, Any]) -> None:
    prepared.clear()
    gc.collect()


def run_row(row: str, shape: dict[str, Any], cfg: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    """Measure one row from the shape's initial weights; returns its raw result (``status`` ``ok`` /
    ``failed``)."""
    from benchmarks.harness import measure

    B, T = shape["batch_size"], shape["seq_len"]
    batches = prepared["batches"]
    res: dict[str, Any] = {"row": row, "compiled": True, "label": LABELS.get(row, row)}
    t_row = time.perf_counter()
    state = compiled = None
    try:
        jitted, state, args_of, notes = _make_row(row, prepared["graphdef"], prepared["model"], cfg, B, T)
        res.update(notes)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, *args_of(batches[0])).compile()
        res["compile_s"] = time.perf_counter() - t0
        res["peak_memory_gib"] = _peak_gib(compiled)
        cell = [state]
        state = None
        metrics: list[Any] = []

        def step(i: int) -> Any:
            cell[0], m = compiled(cell[0], *args_of(batches[i % len(batches)]))
            metrics.append(m)
            return cell[0], m
        t0 = time.perf_counter()
        for i in range(cfg["warmup"]):
            jax.block_until_ready(step(i))
        res["warmup_s"] = time.perf_counter() - t0
        metrics.clear()
        counter = iter(range(10**9))
        timing = measure(lambda: step(cfg["warmup"] + next(counter)), framework="jax", warmup=0,
                         reps=cfg["steps"])
        host = jax.device_get(metrics)
        losses = [float(m["loss"]) for m in host]
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"non-finite loss in the timed steps: {losses}")
        trained = [float(m["tokens_selected"]) for m in host]
        res.update(status="ok", **{k: v for k, v in timing.as_dict().items() if k != "warmup"})
        res["warmup_steps"] = cfg["warmup"]
        res["input_tokens_per_step"] = B * T
        res["trained_tokens_per_step"] = statistics.median(trained)
        res["input_tokens_per_s"] = B * T / (timing.median_ms * 1e-3)
        res["trained_tokens_per_s"] = res["trained_tokens_per_step"] / (timing.median_ms * 1e-3)
        if row.startswith("batch_split"):
            res["sequences_trained"] = statistics.median(float(m["sequences_selected"]) for m in host)
            res["bucket_size"] = statistics.median(float(m["bucket_size"]) for m in host)
        elif row == "random_subset":
            res["sequences_trained"] = float(cfg["kept"])
        res["final_loss"] = losses[-1]
        if cfg.get("profile_steps"):  # after the timed steps: their timing is unchanged
            import tempfile

            from benchmarks.harness import profiles
            n = int(cfg["profile_steps"])
            try:  # a trace that cannot be read costs the profile, not the row's timing
                with tempfile.TemporaryDirectory() as tmp:
                    with jax.profiler.trace(tmp, create_perfetto_trace=True):
                        for i in range(n):
                            jax.block_until_ready(step(10**6 + i))
                    res["profile"] = profiles.jax_trace_summary(Path(tmp), n)
            except Exception as err:  # noqa: BLE001
                res["profile_error"] = _short(err)
        cell.clear()
    except Exception as err:  # noqa: BLE001 - one failing row (out of memory, ...) must not lose the others
        res.update(status="failed", reason=_short(err), trace=traceback.format_exc()[-3000:])
    finally:
        del state, compiled
        gc.collect()
    res["wall_s"] = time.perf_counter() - t_row
    return res


def make_batches(shape: dict[str, Any], seed: int, n: int = 4) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.integers(0, shape["vocab"], size=(shape["batch_size"], shape["seq_len"]),
                                     dtype=np.int32)) for _ in range(n)]


def environment() -> dict[str, Any]:
    import platform

    import flax

    dev = jax.devices()[0]
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "backend": jax.default_backend(), "device": dev.device_kind}


def kept_count(batch_size: int, cfg: dict[str, Any]) -> int:
    """As ``benchmarks/ops/step_torch.py``'s: ``num_selected(B, ratio)`` (the random-init threshold when on)."""
    from cggr import CGGRConfig
    from cggr_jax import num_selected

    r = cfg["ratio"]
    if cfg["dynamic_threshold"]:
        r = min(1.0, r * (1.0 + CGGRConfig.threshold_sensitivity))
    return int(num_selected(jnp.int32(batch_size), jnp.float32(r)))
