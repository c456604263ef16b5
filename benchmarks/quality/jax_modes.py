r"""The JAX / Flax NNX trainer of the quality harness (same modes and accounting as :mod:`.modes`).

Model: :class:`cggr_jax.models.DecoderLM` with the PyTorch run's dimensions (bf16 compute on GPU, float32 on
CPU; float32 parameters). Optimizer, identical for every mode::

    optax.chain(cggr_jax.advance_curriculum(),            # the curriculum step lives in the optax state
                optax.clip_by_global_norm(grad_clip),
                optax.inject_hyperparams(optax.adamw)(learning_rate, b1, b2, weight_decay))

The learning rate is written into the injected hyper-parameters before every step (the schedule is a
function of the run's progress, see :mod:`.run`), so one compiled step serves the whole run.

* ``standard``, ``random_token``, ``cggr_token``: one ``jax.jit`` step each (``cggr_token`` calls
  ``cggr_jax.CGGRLoss`` and passes its metrics to the optimizer as ``cggr_metrics=``; ``random_token`` keeps
  the same count as CGGR would, with uniform random priorities keyed by ``fold_in(key(seed), step)``).
* ``random_sequence``, ``cggr_sequence``: ``cggr_jax.batch_split.make_batch_split_train_step`` (modes
  ``"random_sequence"`` and ``"cggr"``). The main pass runs a static bucket of ``b ≥ k`` rows; the executed
  FLOPs count ``b``. A train step is compiled once per variant and reused for every seed (the model graph is
  identical); the batch split's random-sequence key (``BatchSplitConfig.seed``) is therefore the same for
  every seed, while the initialisation and the data order differ.

Every step ends with one host read of the step's scalars (loss and counts), as in PyTorch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from .flops import ModelShape, step_flops
from .modes import OptimConfig, StepRecord, Variant

__all__ = ["JaxTrainer", "make_optimizer", "set_learning_rate", "random_token_loss"]

_COMPILED: dict[Any, Any] = {}


def make_optimizer(optim: OptimConfig) -> Any:
    """The optax chain of the module docstring."""
    import optax

    from cggr_jax.transform import advance_curriculum

    return optax.chain(
        advance_curriculum(),
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.inject_hyperparams(optax.adamw)(learning_rate=optim.lr, b1=optim.beta1, b2=optim.beta2,
                                              weight_decay=optim.weight_decay),
    )


def set_learning_rate(opt_state: Any, lr: float) -> Any:
    """``opt_state`` of :func:`make_optimizer` with the injected ``learning_rate`` replaced by ``lr``."""
    import jax.numpy as jnp

    if not (isinstance(opt_state, tuple) and len(opt_state) == 3 and hasattr(opt_state[2], "hyperparams")):
        raise ValueError("opt_state: expected the 3-element chain state of make_optimizer()")
    inj = opt_state[2]
    old = inj.hyperparams["learning_rate"]
    hp = dict(inj.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, dtype=jnp.asarray(old).dtype)
    return (opt_state[0], opt_state[1], inj._replace(hyperparams=hp))


def _next_token_ce(logits: Any, ids: Any) -> Any:
    """Per-position float32 cross-entropy ``(B, T−1)`` of ``logits[:, :-1]`` against ``ids[:, 1:]``."""
    import jax
    import jax.numpy as jnp

    z = logits[:, :-1].astype(jnp.float32)
    t = ids[:, 1:].astype(jnp.int32)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
    return lse - picked


def random_token_loss(logits: Any, targets: Any, step: Any, seed: Any, variant: Variant,
                      schedule: Callable[[Any], Any]) -> tuple[Any, Any]:
    """``(loss, count)`` of ``random_token`` on shifted ``logits`` ``(B, T−1, V)`` and ``targets``.

    ``eligible``, ``c̄`` and ``ratio`` follow SPEC §4-§5 as ``CGGRLoss`` computes them from these logits
    (``ratio = dynamic_ratio(schedule(step), c̄, sensitivity)`` when the variant's dynamic threshold is on); the
    ``k`` eligible tokens of highest priority ``uniform(fold_in(key(seed), step))`` are kept and
    ``loss = Σ_{i∈mask} ce_i / max(1, |mask|)`` in float32. Unselectable rows are zeroed first (exact zero
    gradient, no NaN).
    """
    import jax
    import jax.numpy as jnp

    from cggr_jax import curriculum, scoring, selection

    ts = scoring.score_tokens(jax.lax.stop_gradient(logits), targets, scoring="entropy")
    elig = ts.eligible
    n = jnp.sum(elig, dtype=jnp.int32)
    conf = jnp.sum(jnp.where(elig, ts.stats.confidence, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)
    base = schedule(step)
    ratio = curriculum.dynamic_ratio(base, conf, variant.sensitivity) if variant.dynamic else base
    key = jax.random.fold_in(jax.random.key(seed), step)
    priority = jax.random.uniform(key, elig.shape, dtype=jnp.float32)
    mask, _k = selection.select_tokens(priority, elig, ratio, selection="topk")
    z = jnp.where(elig[..., None], logits.astype(jnp.float32), 0.0)
    t = jnp.where(elig, targets, 0).astype(jnp.int32)
    lse = jax.nn.logsumexp(z, axis=-1)
    ce = lse - jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask, dtype=jnp.int32)
    loss = jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)
    return loss, count


def _token_step(graphdef: Any, tx: Any, variant: Variant, compiler_options: dict[str, Any] | None) -> Callable:
    """The jitted ``(state, ids, seed) -> (state, scalars)`` step of a token-level mode."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from cggr_jax import curriculum
    from cggr_jax.loss import CGGRLoss
    from cggr_jax.transform import current_step
    from cggr_jax.utils import shift_for_causal_lm

    v = variant
    loss_obj = None
    schedule = None
    if v.mode == "cggr_token":
        loss_obj = CGGRLoss(scoring=v.scoring, selection=v.selection, dynamic_threshold=v.dynamic,
                            threshold_sensitivity=v.sensitivity, min_tokens_ratio=v.ratio, warmup_steps=v.warmup)
    elif v.mode == "random_token":
        schedule = curriculum.linear_warmup_ratio(v.ratio, v.warmup)
    elif v.mode != "standard":
        raise ValueError(f"variant: {v.mode!r} is not a token-level mode")

    def step(state: Any, ids: Any, seed: Any) -> Any:
        params, rest, opt_state = state
        cstep = current_step(opt_state)

        def loss_fn(p: Any) -> Any:
            logits = nnx.merge(graphdef, p, rest)(ids)
            if v.mode == "standard":
                ce = _next_token_ce(logits, ids)
                return jnp.mean(ce), {"tokens_selected": jnp.int32(ce.size)}
            lg, tg = shift_for_causal_lm(logits, ids)
            if loss_obj is not None:
                return loss_obj(lg, tg, cstep)
            loss, count = random_token_loss(lg, tg, cstep, seed, v, schedule)
            return loss, {"tokens_selected": count}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if loss_obj is not None:
            updates, opt_state = tx.update(grads, opt_state, params, cggr_metrics=aux)
            out = {"loss": loss, "tokens_selected": aux["tokens_selected"],
                   "effective_ratio": aux["effective_ratio"], "avg_confidence": aux["avg_confidence"]}
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
            out = {"loss": loss, "tokens_selected": aux["tokens_selected"]}
        params = optax.apply_updates(params, updates)
        return (params, rest, opt_state), out

    kwargs: dict[str, Any] = {"donate_argnums": (0,)}
    if compiler_options:
        kwargs["compiler_options"] = dict(compiler_options)
    return jax.jit(step, **kwargs)


def _eval_fn(graphdef: Any) -> Callable:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    key = ("eval", graphdef)
    if key not in _COMPILED:
        def ev(params: Any, rest: Any, ids: Any) -> Any:
            ce = _next_token_ce(nnx.merge(graphdef, params, rest)(ids), ids)
            return jnp.sum(ce, dtype=jnp.float32)
        _COMPILED[key] = jax.jit(ev)
    return _COMPILED[key]


class JaxTrainer:
    """One JAX run of one variant; the interface of :class:`benchmarks.quality.modes.TorchTrainer`."""

    def __init__(self, variant: Variant, shape: ModelShape, seq_len: int, seed: int, optim: OptimConfig, *,
                 bf16: bool = False, buckets: Any = None, fast_compile: bool = False) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from cggr_jax.batch_split import BatchSplitConfig, make_batch_split_train_step
        from cggr_jax.models import DecoderConfig, DecoderLM

        if variant.framework != "jax":
            raise ValueError(f"variant: expected a jax variant, got {variant.key()}")
        self.variant = variant
        self.shape = shape
        self.seq_len = seq_len
        self.optim = optim
        self.seed = int(seed)
        cfg = DecoderConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, num_layers=shape.num_layers,
                            num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, max_seq_len=seq_len,
                            mlp_hidden_dim=shape.ffn_dim, dtype=jnp.bfloat16 if bf16 else jnp.float32,
                            param_dtype=jnp.float32, tie_embeddings=False)
        model = DecoderLM(cfg, rngs=nnx.Rngs(self.seed))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.graphdef = graphdef
        # Evaluation runs in float32 whatever the training compute dtype (same parameters, float32 config).
        cfg32 = dataclasses.replace(cfg, dtype=jnp.float32)
        if ("eval_graphdef", cfg32) not in _COMPILED:
            abstract = nnx.eval_shape(lambda: DecoderLM(cfg32, rngs=nnx.Rngs(0)))
            _COMPILED[("eval_graphdef", cfg32)] = nnx.split(abstract, nnx.Param, ...)[0]
        self.eval_graphdef = _COMPILED[("eval_graphdef", cfg32)]
        self.tx = make_optimizer(optim)
        compiler_options = {"xla_backend_optimization_level": 0} if fast_compile else None
        ckey = (variant.key(), variant.options().__repr__(), graphdef, optim, bool(fast_compile), buckets)
        v = variant
        self.batch_split: Any = None
        if v.mode in ("random_sequence", "cggr_sequence"):
            if ckey not in _COMPILED:
                bs_cfg = BatchSplitConfig(
                    router_layers=v.router_layers if v.mode == "cggr_sequence" else 0,
                    scoring=v.scoring if v.mode == "cggr_sequence" else "combined",
                    selection=v.selection if v.mode == "cggr_sequence" else "topk",
                    dynamic_threshold=bool(v.dynamic) if v.mode == "cggr_sequence" else False,
                    threshold_sensitivity=v.sensitivity if v.mode == "cggr_sequence" else 0.5,
                    min_tokens_ratio=v.ratio, warmup_steps=v.warmup, seed=0)
                _COMPILED[ckey] = make_batch_split_train_step(
                    graphdef, bs_cfg, self.tx, mode="cggr" if v.mode == "cggr_sequence" else "random_sequence",
                    buckets=buckets, vocab_size=shape.vocab_size, compiler_options=compiler_options)
            self.batch_split = _COMPILED[ckey]
            self.state = self.batch_split.init(model)
        else:
            if ckey not in _COMPILED:
                _COMPILED[ckey] = _token_step(graphdef, self.tx, v, compiler_options)
            self.step_fn = _COMPILED[ckey]
            params, rest = jax.tree_util.tree_map(jnp.copy, (params, rest))
            self.state = (params, rest, self.tx.init(params))
        self.seed_array = jnp.asarray(1_000_003 * (self.seed + 1) % (2**31 - 1), dtype=jnp.int32)
        self._param_count = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

    def train_step(self, batch: np.ndarray, lr: float) -> StepRecord:
        """One optimizer step on the int32 ``(B, T)`` window batch at learning rate ``lr``."""
        import jax
        import jax.numpy as jnp

        v = self.variant
        B, T = batch.shape
        ids = jnp.asarray(batch, dtype=jnp.int32)
        if self.batch_split is not None:
            st = self.state
            self.state = st._replace(opt_state=set_learning_rate(st.opt_state, lr))
            self.state, metrics = self.batch_split(self.state, ids, ids)
            m = jax.device_get(metrics)  # the step's one synchronisation
            k_seq, rows = int(m["sequences_selected"]), int(m["bucket_size"])
            kept = int(m["tokens_selected"])
            extra = {}
            if v.mode == "cggr_sequence":
                extra = {"effective_ratio": float(m["effective_ratio"]), "avg_confidence": float(m["avg_confidence"])}
            loss = float(m["loss"])
        else:
            params, rest, opt_state = self.state
            self.state, out = self.step_fn((params, rest, set_learning_rate(opt_state, lr)), ids, self.seed_array)
            m = jax.device_get(out)  # the step's one synchronisation
            k_seq = rows = B
            kept = int(m["tokens_selected"])
            extra = {k: float(m[k]) for k in ("effective_ratio", "avg_confidence") if k in m}
            loss = float(m["loss"])
        flops = step_flops(v.mode, self.shape, B, T, kept_sequences=k_seq, main_rows=rows, kept_tokens=kept,
                           router_layers=v.router_layers or 0)
        return StepRecord(loss, k_seq, rows, kept, flops, extra)

    def _params_rest(self) -> tuple[Any, Any]:
        if self.batch_split is not None:
            return self.state.params, self.state.rest
        return self.state[0], self.state[1]

    def evaluate(self, windows: np.ndarray, batch_size: int) -> float:
        """Mean full next-token cross-entropy (nats/token) over the fixed eval windows, in float32."""
        import jax.numpy as jnp

        params, rest = self._params_rest()
        ev = _eval_fn(self.eval_graphdef)
        total = 0.0
        count = 0
        if windows.shape[0] % batch_size:
            raise ValueError(f"windows: {windows.shape[0]} eval windows do not split into batches of {batch_size} "
                             f"(one compiled shape); choose --eval-sequences as a multiple of --eval-batch-size")
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start:start + batch_size]
            total += float(ev(params, rest, jnp.asarray(chunk)))
            count += chunk.shape[0] * (chunk.shape[1] - 1)
        return total / count

    def synchronize(self) -> None:
        """Nothing to do: every step already ends with a host read."""

    def param_count(self) -> int:
        return self._param_count

