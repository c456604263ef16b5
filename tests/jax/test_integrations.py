"""The optax integration (``cggr_jax.integrations``) and a complete Flax NNX training step.

The NNX step is the README's pattern: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with
``tx = optax.chain(cggr_jax.advance_curriculum(), optax.adamw(...))``, the step read from
``optimizer.opt_state`` inside ``nnx.jit``, the loss from ``CGGRLoss``, and
``optimizer.update(model, grads, cggr_metrics=metrics)`` advancing the curriculum.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import cggr_jax  # noqa: E402
from cggr_jax.loss import NUMERIC_METRIC_KEYS  # noqa: E402
from tests import oracle  # noqa: E402


def _metrics(step: int, value: float) -> dict:
    return {k: jnp.asarray(step if k == "step" else value) for k in NUMERIC_METRIC_KEYS}


def test_optax_chain_counts_updates_and_keeps_metrics():
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    grads = {"w": jnp.asarray([0.1, -0.2, 0.3]), "b": jnp.asarray(0.5)}
    tx = optax.chain(cggr_jax.advance_curriculum(), optax.adamw(1e-2))
    ref_tx = optax.adamw(1e-2)
    state, ref_state = tx.init(params), ref_tx.init(params)
    assert int(cggr_jax.current_step(state)) == 0
    assert all(float(v) == 0 for v in cggr_jax.latest_metrics(state).values())
    for i in range(3):
        updates, state = tx.update(grads, state, params, cggr_metrics=_metrics(i, 0.5 + i))
        ref_updates, ref_state = ref_tx.update(grads, ref_state, params)
        # the curriculum transform leaves the updates alone
        jax.tree_util.tree_map(np.testing.assert_array_equal, updates, ref_updates)
        assert int(cggr_jax.current_step(state)) == i + 1
        assert cggr_jax.current_step(state).dtype == jnp.int32
        latest = cggr_jax.latest_metrics(state)
        assert int(latest["step"]) == i and float(latest["avg_entropy"]) == 0.5 + i
        assert latest["tokens_total"].dtype == jnp.int32 and latest["avg_entropy"].dtype == jnp.float32
    # an update without metrics advances the step and keeps the previous metrics
    _, state = tx.update(grads, state, params)
    assert int(cggr_jax.current_step(state)) == 4 and int(cggr_jax.latest_metrics(state)["step"]) == 2
    # under jit, nested in another chain, with other extra args flowing past it
    outer = optax.chain(optax.clip_by_global_norm(1.0), tx)
    st = outer.init(params)
    upd = jax.jit(lambda g, s, m: outer.update(g, s, params, cggr_metrics=m, unrelated=3))
    for i in range(2):
        _, st = upd(grads, st, _metrics(i, 1.0))
    assert int(cggr_jax.current_step(st)) == 2


def test_curriculum_follows_the_optimizer_step():
    loss_fn = cggr_jax.CGGRLoss(warmup_steps=4, min_tokens_ratio=0.25, dynamic_threshold=False)
    tx = optax.chain(cggr_jax.advance_curriculum(), optax.sgd(0.0))
    w = {"z": jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 5)), jnp.float32)}
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 5, (2, 8)))
    state = tx.init(w)

    @jax.jit
    def step_fn(w, state):
        step = cggr_jax.current_step(state)
        (loss, metrics), g = jax.value_and_grad(lambda p: loss_fn(p["z"], labels, step), has_aux=True)(w)
        updates, state = tx.update(g, state, w, cggr_metrics=metrics)
        return optax.apply_updates(w, updates), state, metrics

    sched = oracle.linear_warmup_ratio(0.25, 4)
    for i in range(6):
        w, state, metrics = step_fn(w, state)
        assert int(metrics["step"]) == i
        assert float(metrics["token_ratio"]) == float(sched(i))
        assert int(metrics["tokens_selected"]) == oracle.num_selected(16, sched(i))
    assert int(cggr_jax.current_step(state)) == 6


class TinyLM(nnx.Module):
    """Embedding → tanh MLP → vocabulary projection (per position; enough for a training step)."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(self.embed(input_ids))))


def make_train_step(loss_fn: cggr_jax.CGGRLoss, counter: list | None = None):
    """The README's NNX training step."""

    @nnx.jit
    def train_step(model, optimizer, input_ids, labels):
        if counter is not None:
            counter.append(1)                                   # counts traces (see test_recompile.py)
        step = cggr_jax.current_step(optimizer.opt_state)

        def compute(model):
            logits = model(input_ids)
            logits, targets = cggr_jax.shift_for_causal_lm(logits, labels)
            return loss_fn(logits, targets, step)

        (loss, metrics), grads = nnx.value_and_grad(compute, has_aux=True)(model)
        optimizer.update(model, grads, cggr_metrics=metrics)
        return loss, metrics

    return train_step


def _data(vocab: int, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq))
    labels = ids.copy()
    labels[:, :2] = -100                                        # e.g. a prompt that is not trained on
    return jnp.asarray(ids), jnp.asarray(labels)


def test_flax_nnx_training_step():
    vocab, batch, seq = 13, 4, 9
    model = TinyLM(vocab, 16, rngs=nnx.Rngs(0))
    loss_fn = cggr_jax.CGGRLoss(min_tokens_ratio=0.25, warmup_steps=5)
    tx = optax.chain(cggr_jax.advance_curriculum(), optax.adamw(3e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_step = make_train_step(loss_fn)
    ids, labels = _data(vocab, batch, seq)
    n_valid = batch * (seq - 2)                                 # shifted labels[:, 1:] minus one ignored
    sched = oracle.linear_warmup_ratio(0.25, 5)
    before = jax.tree_util.tree_map(jnp.copy, nnx.state(model, nnx.Param))
    losses = []
    for i in range(8):
        assert int(cggr_jax.current_step(optimizer.opt_state)) == i
        loss, metrics = train_step(model, optimizer, ids, labels)
        m = cggr_jax.metrics_to_dict(metrics, loss_fn)
        losses.append(float(loss))
        assert m["step"] == i and m["token_ratio"] == float(sched(i))
        assert m["tokens_total"] == n_valid
        # the dynamic threshold raises the ratio by (1 - confidence)·0.5 over the curriculum
        assert m["effective_ratio"] >= m["token_ratio"]
        assert m["tokens_selected"] == oracle.num_selected(n_valid, np.float32(m["effective_ratio"]))
        # the optimizer state holds the metrics of the last update
        stored = cggr_jax.metrics_to_dict(cggr_jax.latest_metrics(optimizer.opt_state), loss_fn)
        assert stored == m
    assert int(cggr_jax.current_step(optimizer.opt_state)) == 8
    after = nnx.state(model, nnx.Param)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert all(jax.tree_util.tree_leaves(changed))
    assert np.all(np.isfinite(losses))
    # fitting a fixed batch: the loss on all tokens goes down
    full = cggr_jax.CGGRLoss(warmup_steps=0, min_tokens_ratio=1.0)
    logits, targets = cggr_jax.shift_for_causal_lm(model(ids), labels)
    final_all, _ = full(logits, targets, 0)
    fresh = TinyLM(vocab, 16, rngs=nnx.Rngs(0))
    logits0, _ = cggr_jax.shift_for_causal_lm(fresh(ids), labels)
    initial_all, _ = full(logits0, targets, 0)
    assert float(final_all) < float(initial_all)
