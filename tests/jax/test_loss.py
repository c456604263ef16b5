"""``cggr_jax.CGGRLoss`` against the float64 oracle (SPEC §5, §8, §10): loss, ``∂loss/∂logits``, selection
and metrics, for every strategy and scoring, fp32/fp16/bf16, NaN/±inf rows, ``−inf`` entries,
``ignore_index`` and batches with nothing selectable.

The oracle is given the package's own float32 difficulties (``difficulty_override``) so that the selection is
compared exactly; the loss and gradient are compared within SPEC §11 level 4 (1e-5 abs + 1e-4 rel).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import cggr_jax  # noqa: E402
from cggr_jax import scoring  # noqa: E402
from tests import oracle  # noqa: E402

B, T, V = 3, 7, 33


def _batch(seed: int, specials: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    temps = rng.uniform(0.3, 3.0, size=(B, T, 1))
    z = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
    t = rng.integers(0, V, size=(B, T))
    t[rng.random((B, T)) < 0.15] = -100
    if specials:
        z[0, 1, 0] = np.nan                     # NaN row
        t[0, 1] = 3
        z[1, 2, 5] = np.inf                     # +inf row
        t[1, 2] = 4
        z[2, 3, :10] = -np.inf                  # masked entries, finite row
        t[2, 3] = 12
        z[2, 4, 7] = -np.inf                    # target logit -inf: not finite
        t[2, 4] = 7
    return z, t


@functools.partial(jax.jit, static_argnums=0)
def _jitted_value_and_grad(loss_fn, z, t, step):
    (loss, metrics), grad = jax.value_and_grad(lambda x: loss_fn(x, t, step), has_aux=True)(z)
    return loss, metrics, grad


def _value_and_grad(loss_fn, z, t, step):
    """Loss, metrics and d loss/d logits in one compiled function per configuration (keeps the suite fast)."""
    return _jitted_value_and_grad(loss_fn, jnp.asarray(z), jnp.asarray(t), jnp.int32(step))


def _check_against_oracle(loss_fn, z, t, step, *, z_dtype=jnp.float32, grad_rtol=1e-4, grad_atol=1e-5):
    zj = jnp.asarray(z).astype(z_dtype)
    z_up = np.asarray(zj.astype(jnp.float32))
    loss, metrics, grad = _value_and_grad(loss_fn, zj, t, step)
    sc = scoring.score_tokens(zj, jnp.asarray(t), scoring=loss_fn.scoring)
    cfg = {f.name: getattr(loss_fn, f.name) for f in dataclasses.fields(loss_fn) if f.name != "ratio_schedule"}
    ref = oracle.cggr_loss(z_up, t, int(step), difficulty_override=np.asarray(sc.difficulty), **cfg)
    m = cggr_jax.metrics_to_dict(metrics, loss_fn)
    assert loss.dtype == jnp.float32 and grad.dtype == z_dtype and grad.shape == zj.shape
    assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))
    assert m["effective_ratio"] == pytest.approx(float(ref["ratio"]), abs=1e-6)
    assert m["tokens_selected"] == ref["metrics"]["tokens_selected"]
    for key in ("step", "tokens_total", "tokens_nonfinite", "tokens_out_of_range"):
        assert m[key] == ref["metrics"][key], key
    assert m["token_ratio"] == ref["metrics"]["token_ratio"]             # bit-identical curriculum
    for key in ("avg_confidence", "avg_entropy", "avg_difficulty"):
        assert m[key] == pytest.approx(ref["metrics"][key], abs=1e-4, rel=1e-5), key
    assert m["selection"] == loss_fn.selection and m["scoring"] == loss_fn.scoring
    assert float(loss) == pytest.approx(ref["loss"], abs=1e-5, rel=1e-4)
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), ref["grad"], atol=grad_atol, rtol=grad_rtol)
    # only the selected rows have a gradient
    rows_with_grad = np.asarray(jnp.any(grad != 0, axis=-1))
    np.testing.assert_array_equal(rows_with_grad, ref["mask"])
    return loss, m, ref


@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware", "fixed_quota"])
def test_loss_and_grad_every_strategy(strategy):
    loss_fn = cggr_jax.CGGRLoss(selection=strategy, warmup_steps=100, min_tokens_per_sequence=2, num_strata=3)
    for seed, step in [(0, 0), (1, 37), (2, 100), (3, 1000)]:
        _, m, ref = _check_against_oracle(loss_fn, *_batch(seed), step)
        assert m["tokens_nonfinite"] == 3


@pytest.mark.parametrize("mode", ["entropy", "margin", "loss"])
def test_loss_and_grad_every_scoring(mode):
    loss_fn = cggr_jax.CGGRLoss(scoring=mode, warmup_steps=10, threshold_sensitivity=0.9)
    for seed, step in [(4, 3), (5, 50)]:
        _check_against_oracle(loss_fn, *_batch(seed), step)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits(dtype):
    loss_fn = cggr_jax.CGGRLoss(warmup_steps=10)
    z, t = _batch(6)
    # the gradient is float32 arithmetic cast to the logits' dtype: compare at that dtype's resolution
    rtol = 1e-2 if dtype == "bfloat16" else 2e-3
    _check_against_oracle(loss_fn, z, t, 4, z_dtype=getattr(jnp, dtype), grad_rtol=rtol, grad_atol=1e-4)


def test_two_dimensional_logits_and_dynamic_threshold_off():
    z, t = _batch(7)
    loss_fn = cggr_jax.CGGRLoss(dynamic_threshold=False, selection="sequence_aware", warmup_steps=4)
    loss, m, ref = _check_against_oracle(loss_fn, z.reshape(B * T, V), t.reshape(B * T), 2)
    assert m["effective_ratio"] == m["token_ratio"]


def test_docs_example_step_500_keeps_160_of_256():
    rng = np.random.default_rng(8)
    z = jnp.asarray(rng.standard_normal((2, 128, 11)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 11, (2, 128)))
    loss_fn = cggr_jax.CGGRLoss(selection="topk", dynamic_threshold=False, min_tokens_ratio=0.25, warmup_steps=1000)
    loss, metrics = loss_fn(z, t, 500)
    m = cggr_jax.metrics_to_dict(metrics, loss_fn)
    assert m["step"] == 500 and m["token_ratio"] == 0.625
    assert m["tokens_selected"] == 160 and m["tokens_total"] == 256
    assert list(m) == list(cggr_jax.METRIC_KEYS)
    assert m["selection"] == "topk" and m["scoring"] == "combined"
    assert isinstance(m["tokens_selected"], int) and isinstance(m["avg_entropy"], float)
    # after warmup the default ratio is 0.25 (dynamic threshold off): 64 of 256
    _, metrics = loss_fn(z, t, 5000)
    assert int(metrics["tokens_selected"]) == 64 and float(metrics["token_ratio"]) == 0.25


@pytest.mark.parametrize("case", ["all_ignored", "all_nonfinite", "empty"])
def test_nothing_selectable_gives_zero_loss_and_zero_grad(case):
    rng = np.random.default_rng(9)
    if case == "empty":
        z = np.zeros((2, 0, V), np.float32)
        t = np.zeros((2, 0), np.int64)
    else:
        z = rng.standard_normal((2, 5, V)).astype(np.float32)
        t = rng.integers(0, V, (2, 5))
        if case == "all_ignored":
            t[:] = -100
        else:
            z[0, :, 0] = np.nan
            z[1, :, 3] = np.inf
    loss_fn = cggr_jax.CGGRLoss(selection="stratified")
    loss, metrics, grad = _value_and_grad(loss_fn, z, t, 0)
    assert float(loss) == 0.0 and loss.dtype == jnp.float32
    assert grad.shape == z.shape and bool(jnp.all(grad == 0))
    m = cggr_jax.metrics_to_dict(metrics, loss_fn)
    assert m["tokens_selected"] == 0 and m["tokens_total"] == 0
    assert m["avg_confidence"] == 0.0 and m["avg_entropy"] == 0.0 and m["avg_difficulty"] == 0.0
    assert m["tokens_nonfinite"] == (10 if case == "all_nonfinite" else 0)


def test_out_of_range_labels_under_jit_are_ineligible_and_counted():
    z, t = _batch(10, specials=False)
    t_bad = t.copy()
    t_bad[0, 0] = V                     # one past the end
    t_bad[1, 1] = -7                    # negative, not ignore_index
    loss_fn = cggr_jax.CGGRLoss(warmup_steps=0, min_tokens_ratio=1.0)    # keep everything eligible

    @jax.jit
    def f(z, t):
        (loss, metrics), grad = jax.value_and_grad(lambda x: loss_fn(x, t, jnp.int32(0)), has_aux=True)(z)
        return loss, metrics, grad

    loss, metrics, grad = f(jnp.asarray(z), jnp.asarray(t_bad))
    assert int(metrics["tokens_out_of_range"]) == 2
    assert np.isfinite(float(loss))
    assert bool(jnp.all(grad[0, 0] == 0)) and bool(jnp.all(grad[1, 1] == 0))
    # identical to treating those two tokens as ignored
    t_ign = t_bad.copy()
    t_ign[0, 0] = t_ign[1, 1] = -100
    loss2, metrics2, grad2 = f(jnp.asarray(z), jnp.asarray(t_ign))
    assert float(loss) == float(loss2) and int(metrics2["tokens_out_of_range"]) == 0
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad2))
    assert int(metrics["tokens_total"]) == int(metrics2["tokens_total"])


def test_custom_ignore_index_and_ratio_schedule():
    z, t = _batch(11, specials=False)
    t = np.where(t == -100, 0, t)               # 0 is the ignored id now
    sched = optax.linear_schedule(1.0, 0.4, transition_steps=20)
    loss_fn = cggr_jax.CGGRLoss(ignore_index=0, ratio_schedule=sched, dynamic_threshold=False)
    loss, metrics = loss_fn(jnp.asarray(z), jnp.asarray(t), 10)
    m = cggr_jax.metrics_to_dict(metrics, loss_fn)
    assert m["token_ratio"] == pytest.approx(0.7, abs=1e-6)
    n = int((t != 0).sum())
    assert m["tokens_total"] == n
    assert m["tokens_selected"] == int(cggr_jax.num_selected(n, jnp.float32(m["token_ratio"])))


def test_loss_is_hashable_frozen_static_config():
    a = cggr_jax.CGGRLoss(min_tokens_ratio=0.5)
    b = cggr_jax.CGGRLoss(min_tokens_ratio=0.5)
    assert a == b and hash(a) == hash(b) and len({a, b, cggr_jax.CGGRLoss()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.min_tokens_ratio = 0.3  # type: ignore[misc]
    z, t = _batch(12, specials=False)
    f = jax.jit(lambda cfg, z, t, s: cfg(z, t, s), static_argnums=0)
    l1, _ = f(a, jnp.asarray(z), jnp.asarray(t), jnp.int32(3))
    l2, _ = a(jnp.asarray(z), jnp.asarray(t), 3)
    assert float(l1) == float(l2)
    # the functional form is the same computation
    l3, m3 = cggr_jax.cggr_loss(jnp.asarray(z), jnp.asarray(t), 3, min_tokens_ratio=0.5)
    assert float(l3) == float(l2) and set(m3) == set(cggr_jax.loss.NUMERIC_METRIC_KEYS)


def test_shift_for_causal_lm():
    z = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    ids = jnp.arange(10).reshape(2, 5) % 3
    zs, ts = cggr_jax.shift_for_causal_lm(z, ids)
    assert zs.shape == (2, 4, 3) and ts.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(zs), np.asarray(z[:, :-1]))
    np.testing.assert_array_equal(np.asarray(ts), np.asarray(ids[:, 1:]))


# ------------------------------------------------------------------------------------------ GPU backend
_ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a JAX GPU backend (run without JAX_PLATFORMS=cpu)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware"])
def test_gpu_kernel_path_against_oracle(dtype, strategy):
    """On a GPU the statistics and the selective cross-entropy run as Pallas kernels; the loss, gradient,
    metrics and (given the kernel's own difficulties) the selection still match the oracle."""
    from cggr_jax import dispatch

    assert dispatch.use_kernels(jnp.zeros(()))
    rng = np.random.default_rng(20)
    b, t_len, v = 4, 96, 4099                                       # a ragged vocabulary block
    z = (rng.standard_normal((b, t_len, v)) * rng.uniform(0.5, 4.0, (b, t_len, 1))).astype(np.float32)
    t = rng.integers(0, v, (b, t_len))
    t[rng.random((b, t_len)) < 0.1] = -100
    z[0, 3, 17] = np.nan
    z[1, 5, :100] = -np.inf
    loss_fn = cggr_jax.CGGRLoss(selection=strategy, warmup_steps=50, min_tokens_per_sequence=3)
    rtol = 1e-2 if dtype == "bfloat16" else 1e-4
    _check_against_oracle(loss_fn, z, t, 20, z_dtype=getattr(jnp, dtype), grad_rtol=rtol, grad_atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a JAX GPU backend (run without JAX_PLATFORMS=cpu)")
def test_gpu_curriculum_bit_identical():
    """XLA on a GPU contracts multiply-adds; the curriculum's exact float32 operations must not change."""
    steps = jnp.arange(0, 2100, dtype=jnp.int32)
    got = np.asarray(jax.jit(jax.vmap(cggr_jax.linear_warmup_ratio(0.25, 1000)))(steps))
    ref = oracle.linear_warmup_ratio(0.25, 1000)
    np.testing.assert_array_equal(got, np.array([ref(int(s)) for s in np.asarray(steps)], np.float32))
    conf = np.random.default_rng(21).uniform(0, 1, 512).astype(np.float32)
    dyn = np.asarray(jax.jit(jax.vmap(lambda c: cggr_jax.dynamic_ratio(jnp.float32(0.3), c, 0.7)))(conf))
    np.testing.assert_array_equal(dyn, np.array([oracle.dynamic_ratio(0.3, c, 0.7) for c in conf], np.float32))


def test_kernel_path_in_interpret_mode_matches_reference():
    """The GPU dispatch (Pallas statistics + selective cross-entropy), run with the kernels interpreted on
    this backend: the same loss, gradient, metrics and selection as the XLA reference path."""
    pytest.importorskip("cggr_jax.kernels.cross_entropy")
    from cggr_jax import dispatch

    z, t = _batch(13)
    loss_fn = cggr_jax.CGGRLoss(selection="stratified", warmup_steps=10, num_strata=3)

    def run():
        f = jax.jit(jax.value_and_grad(lambda x: loss_fn(x, jnp.asarray(t), jnp.int32(6)), has_aux=True))
        return f(jnp.asarray(z))

    with dispatch.force("reference"):
        (loss_r, m_r), g_r = run()
    with dispatch.force("kernel"):                  # route as on a GPU (a fresh jit: traced in this mode)
        assert dispatch.use_kernels(jnp.asarray(z))
        (loss_k, m_k), g_k = run()
    assert cggr_jax.metrics_to_dict(m_k, loss_fn)["tokens_selected"] == int(m_r["tokens_selected"])
    for key in ("tokens_total", "tokens_nonfinite", "tokens_out_of_range", "step"):
        assert int(m_k[key]) == int(m_r[key]), key
    assert float(loss_k) == pytest.approx(float(loss_r), abs=1e-5, rel=1e-4)
    np.testing.assert_allclose(np.asarray(g_k), np.asarray(g_r), atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(jnp.any(g_k != 0, -1)), np.asarray(jnp.any(g_r != 0, -1)))
