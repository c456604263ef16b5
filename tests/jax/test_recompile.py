"""One compilation for a whole warmup: the step, the curriculum ratio and the dynamic threshold are traced.

Traces are counted with a Python side effect inside the traced function (it runs once per trace) and, for
``jax.jit``, with the jitted function's cache size; each loop changes the step, the ratio and the batch (so
the mean confidence, the dynamic ratio and ``k`` all change).
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import cggr_jax  # noqa: E402
from tests.jax.test_integrations import TinyLM, _data, make_train_step  # noqa: E402


@pytest.mark.parametrize("selection", ["topk", "stratified"])
def test_jitted_loss_compiles_once_over_warmup(selection):
    loss_fn = cggr_jax.CGGRLoss(selection=selection, warmup_steps=6, min_tokens_ratio=0.25)
    traces = []

    @jax.jit
    def loss_and_grad(logits, labels, step):
        traces.append(1)
        return jax.value_and_grad(lambda z: loss_fn(z, labels, step), has_aux=True)(logits)

    rng = np.random.default_rng(0)
    ratios, effective, selected = set(), set(), set()
    for step in range(10):
        temp = 0.3 + step / 3                                     # changes the mean confidence
        logits = jnp.asarray(rng.standard_normal((2, 9, 17)) / temp, jnp.float32)
        labels = jnp.asarray(rng.integers(0, 17, (2, 9)))
        (loss, metrics), grad = loss_and_grad(logits, labels, step)   # a Python int step: traced, weak int32
        ratios.add(float(metrics["token_ratio"]))
        effective.add(float(metrics["effective_ratio"]))
        selected.add(int(metrics["tokens_selected"]))
        assert int(metrics["step"]) == step
    assert len(ratios) == 7 and len(effective) >= 7 and len(selected) >= 5
    assert len(traces) == 1
    assert loss_and_grad._cache_size() == 1


def test_eager_loss_reuses_one_executable():
    # the eager call path jits its core with the configuration as a static argument
    loss_fn = cggr_jax.CGGRLoss(warmup_steps=3)
    rng = np.random.default_rng(1)
    from cggr_jax import loss as loss_module

    before = loss_module._loss_impl._cache_size()
    for step in range(5):
        loss_fn(jnp.asarray(rng.standard_normal((3, 11)), jnp.float32), jnp.asarray(rng.integers(0, 11, 3)), step)
    assert loss_module._loss_impl._cache_size() - before == 1


def test_nnx_train_step_compiles_once():
    vocab = 13                                                   # test_integrations's sizes: cached eager ops
    model = TinyLM(vocab, 16, rngs=nnx.Rngs(1))
    loss_fn = cggr_jax.CGGRLoss(warmup_steps=4, selection="sequence_aware", min_tokens_per_sequence=2)
    optimizer = nnx.Optimizer(model, optax.chain(cggr_jax.advance_curriculum(), optax.adamw(1e-2)),
                              wrt=nnx.Param)
    traces = []
    train_step = make_train_step(loss_fn, counter=traces)
    ratios = set()
    for i in range(7):
        ids, labels = _data(vocab, 4, 9, seed=i)
        _, metrics = train_step(model, optimizer, ids, labels)
        ratios.add(float(metrics["token_ratio"]))
        assert int(metrics["step"]) == i
    assert len(ratios) == 5
    assert len(traces) == 1
