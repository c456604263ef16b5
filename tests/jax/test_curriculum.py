"""``cggr_jax.curriculum`` (SPEC §5): the schedule, the dynamic threshold and the exact integer ``k``.

The float32 values are compared bit for bit with the oracle's float32 arithmetic (on CPU XLA neither fuses
nor reorders them); ``k`` is compared exactly, including ``n`` up to ``2^31 − 1`` and with x64 switched on.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

from cggr_jax import curriculum  # noqa: E402
from tests import oracle  # noqa: E402


def test_docs_examples():
    sched = curriculum.linear_warmup_ratio(0.25, 1000)
    assert float(sched(0)) == 1.0
    assert float(sched(500)) == 0.625
    assert float(sched(1000)) == 0.25
    assert float(sched(5000)) == 0.25
    assert sched(jnp.int32(500)).dtype == jnp.float32
    # the docs' dynamic-threshold table, exactly SPEC's float32 values
    for conf, want in [(0.3, 0.3375), (0.7, 0.2875), (0.9, 0.2625)]:
        got = curriculum.dynamic_ratio(jnp.float32(0.25), jnp.float32(conf), 0.5)
        assert got.dtype == jnp.float32
        assert float(got) == float(oracle.dynamic_ratio(0.25, conf, 0.5))
        assert float(got) == pytest.approx(want, abs=1e-7)
    assert float(curriculum.dynamic_ratio(0.9, 0.0, 0.5)) == 1.0      # clipped at 1
    assert float(curriculum.dynamic_ratio(0.4, 0.2, 0.0)) == np.float32(0.4)
    assert int(curriculum.num_selected(256, 0.625)) == 160
    assert int(curriculum.num_selected(10, 0.25)) == 3               # 2.5 rounds up
    assert int(curriculum.num_selected(1, 1e-6)) == 1
    assert int(curriculum.num_selected(0, 0.5)) == 0


@pytest.mark.parametrize("min_ratio,warmup", [(0.25, 1000), (0.1, 7), (1.0, 10), (0.3333, 3), (0.5, 0)])
def test_schedule_bit_identical_to_oracle_under_jit(min_ratio, warmup):
    sched = curriculum.linear_warmup_ratio(min_ratio, warmup)
    ref = oracle.linear_warmup_ratio(min_ratio, warmup)
    steps = np.unique(np.concatenate([np.arange(0, 40), np.arange(0, 2 * warmup + 5, max(1, warmup // 37))]))
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32)))
    want = np.array([ref(int(s)) for s in steps], dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_schedule_is_an_optax_schedule():
    sched = curriculum.linear_warmup_ratio(0.25, 100)
    # usable wherever optax takes a schedule, e.g. as a learning rate (the count is an int32 array)
    tx = optax.sgd(learning_rate=sched)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1.0)        # lr = sched(0) = 1
    # and an optax schedule can be the curriculum (tested with the loss in test_loss.py)
    join = optax.join_schedules([optax.constant_schedule(1.0), optax.constant_schedule(0.5)], [10])
    assert float(join(3)) == 1.0 and float(join(12)) == 0.5


def test_dynamic_ratio_bit_identical_to_oracle():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.01, 1.0, 200).astype(np.float32)
    conf = rng.uniform(0.0, 1.0, 200).astype(np.float32)
    sens = 0.37
    got = np.asarray(jax.jit(jax.vmap(lambda b, c: curriculum.dynamic_ratio(b, c, sens)))(base, conf))
    want = np.array([oracle.dynamic_ratio(b, c, sens) for b, c in zip(base, conf)], np.float32)
    np.testing.assert_array_equal(got, want)


_EDGE_N = [0, 1, 2, 3, 10, 255, 256, 257, 65535, 65536, 65537, 2**24 + 1, 2**30, 2**31 - 2, 2**31 - 1]
_EDGE_R = [1e-6, 2**-17, 2**-16, 1.5 * 2**-16, 0.25, 0.3, 0.5, 0.625, 0.999, 1.0 - 2**-24, 1.0]


def _k_table(fn) -> np.ndarray:
    rng = np.random.default_rng(1)
    n = np.concatenate([np.repeat(_EDGE_N, len(_EDGE_R)), rng.integers(0, 2**31, 300)]).astype(np.int64)
    r = np.concatenate([np.tile(_EDGE_R, len(_EDGE_N)), rng.uniform(1e-6, 1.0, 300)]).astype(np.float32)
    return n, r, np.asarray(fn(jnp.asarray(n.astype(np.int32)), jnp.asarray(r)))


def test_num_selected_exact_including_large_n():
    n, r, got = _k_table(jax.jit(jax.vmap(curriculum.num_selected)))
    want = np.array([oracle.num_selected(int(a), b) for a, b in zip(n, r)])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # k in [1, n] for n >= 1
    assert np.all((got >= 1) | (n == 0)) and np.all(got <= n)


def test_num_selected_same_answer_with_x64():
    n, r, want = _k_table(jax.jit(jax.vmap(curriculum.num_selected)))
    with jax.enable_x64(True):
        _, _, got64 = _k_table(jax.jit(jax.vmap(curriculum.num_selected)))
        # int64 inputs too
        assert int(curriculum.num_selected(jnp.asarray(2**31 - 1, jnp.int64), jnp.float32(0.625))) == \
            oracle.num_selected(2**31 - 1, np.float32(0.625))
    np.testing.assert_array_equal(got64, want)


def test_num_selected_traced_out_of_range_ratio_is_clamped():
    f = jax.jit(curriculum.num_selected)
    assert int(f(jnp.int32(100), jnp.float32(1.7))) == 100
    assert int(f(jnp.int32(100), jnp.float32(-0.5))) == 1
    assert int(f(jnp.int32(100), jnp.float32(np.nan))) == 100
    assert int(f(jnp.int32(0), jnp.float32(np.nan))) == 0


def _random_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random bit patterns (every exponent, subnormals, ±0, ±inf, NaN) plus awkward hand-picked values."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38, 3.4028235e38,
                        np.inf, -np.inf, np.nan, 0.5, 1.0 - 2**-24, 1.0 + 2**-23, 2**-24, 2**-25, 3.0],
                       dtype=np.float32)
    return np.concatenate([bits, rng.choice(special, n // 4)]).astype(np.float32)


def _same_bits(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))


def test_exact_add_is_ieee_round_to_nearest_even():
    rng = np.random.default_rng(7)
    x = _random_f32(rng, 40000)
    y = _random_f32(rng, 40000)
    # near-cancellation and ties: y = ±x·(1 + k·2^-23) and 1 − tiny
    x2 = rng.uniform(-2, 2, 20000).astype(np.float32)
    y2 = (-x2 * (1 + rng.integers(-3, 4, x2.size) * 2.0**-23)).astype(np.float32)
    x3 = np.ones(20000, np.float32)
    y3 = (-rng.uniform(0, 1, x3.size) * rng.choice([1.0, 2**-10, 2**-24, 2**-30], x3.size)).astype(np.float32)
    f = jax.jit(curriculum.exact_add)
    with np.errstate(all="ignore"):
        for a, b in [(x, y), (x2, y2), (x3, y3), (y3, x3)]:
            np.testing.assert_array_equal(_same_bits(np.asarray(f(a, b)), a + b), True)


def test_exact_div_is_ieee_round_to_nearest_even():
    rng = np.random.default_rng(8)
    a = np.abs(_random_f32(rng, 40000))
    b = np.abs(_random_f32(rng, 40000))
    keep = np.isfinite(a) & np.isfinite(b) & (b > 0)
    ints_a = rng.integers(0, 2**31, 20000).astype(np.float32)
    ints_b = rng.integers(1, 2**31, 20000).astype(np.float32)
    g = jax.jit(curriculum.exact_div)
    with np.errstate(all="ignore"):
        for x, y in [(a[keep], b[keep]), (ints_a, ints_b), (np.arange(4000, dtype=np.float32), np.float32(1000.0))]:
            x, y = np.broadcast_arrays(x, y)
            np.testing.assert_array_equal(_same_bits(np.asarray(g(x, y)), x / y), True)
