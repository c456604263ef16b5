"""``cggr_jax.selection`` (SPEC §6–§7): the total order and every strategy, bit-identical to the oracle.

The oracle is given exactly the float32 difficulties the package sees, so masks and ``k`` must be identical
(SPEC §11 level 1). Problems are drawn from small value pools (ties, ±0, ±inf, NaN) on a few fixed shapes,
so each (shape, strategy) compiles once.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cggr_jax import selection  # noqa: E402
from tests import oracle  # noqa: E402

POOL = np.array([0.0, -0.0, 1.0, 1.0000001, 2.5, -3.0, np.inf, -np.inf, np.nan, 0.3, 7.0, 1e-30], np.float32)
SHAPES = [(37,), (4, 9), (1, 6), (5, 1)]


def _problem(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.float32]:
    pool = rng.choice(POOL, size=int(rng.integers(1, 7)))
    d = rng.choice(pool, size=shape).astype(np.float32)
    eligible = rng.random(shape) < rng.uniform(0.2, 1.0)
    ratio = np.float32(rng.choice([rng.uniform(1e-6, 1.0), 1.0, 0.25, 0.5, 1e-6]))
    return d, eligible, ratio


def test_rank_tokens_matches_oracle():
    rng = np.random.default_rng(0)
    for i in range(40):
        d, e, _ = _problem(rng, SHAPES[i % 2])
        got = np.asarray(selection.rank_tokens(jnp.asarray(d), jnp.asarray(e)))
        assert got.dtype == np.int32 and got.shape == d.shape
        np.testing.assert_array_equal(got, oracle.rank_tokens(d, e))


def test_order_rules():
    d = jnp.asarray([1.0, -0.0, 0.0, np.inf, -np.inf, np.nan, 1.0, 0.0], jnp.float32)
    e = jnp.asarray([True, True, True, True, True, True, True, False])
    r = np.asarray(selection.rank_tokens(d, e))
    # inf first, then the two 1.0s by index, then -0.0/+0.0 by index (equal), then -inf; NaN / ineligible: -1
    np.testing.assert_array_equal(r, [1, 3, 4, 0, 5, -1, 2, -1])


@pytest.mark.parametrize("strategy", ["topk", "fixed_quota", "stratified", "sequence_aware"])
def test_select_tokens_bit_identical_to_oracle(strategy):
    rng = np.random.default_rng(hash(strategy) % 2**32)
    configs = {"topk": [(4, 1)], "fixed_quota": [(4, 1)], "stratified": [(1, 1), (3, 1), (4, 1)],
               "sequence_aware": [(4, 0), (4, 1), (4, 3)]}[strategy]
    shapes = SHAPES if len(configs) == 1 else SHAPES[:2]
    for num_strata, min_tps in configs:
        for i in range(24):
            d, e, ratio = _problem(rng, shapes[i % len(shapes)])
            kw = dict(selection=strategy, num_strata=num_strata, min_tokens_per_sequence=min_tps)
            mask, k = selection.select_tokens(jnp.asarray(d), jnp.asarray(e), jnp.float32(ratio), **kw)
            m_o, k_o = oracle.select_tokens(d, e, ratio, **kw)
            assert mask.dtype == jnp.bool_ and mask.shape == d.shape
            assert int(k) == k_o
            np.testing.assert_array_equal(np.asarray(mask), m_o, err_msg=f"{kw} {ratio}")
            if strategy != "sequence_aware":
                assert int(mask.sum()) == k_o                    # exactly k, never more on ties


def test_docs_example_160_of_256():
    d = jnp.asarray(np.random.default_rng(1).standard_normal(256), jnp.float32)
    mask, k = selection.select_tokens(d, jnp.ones(256, bool), jnp.float32(0.625))
    assert int(k) == 160 and int(mask.sum()) == 160
    # the 160 hardest
    assert float(jnp.min(jnp.where(mask, d, jnp.inf))) >= float(jnp.max(jnp.where(mask, -jnp.inf, d)))


def test_stratified_weights_40_30_20_10():
    n = 1000
    d = jnp.asarray(np.random.default_rng(2).permutation(n).astype(np.float32))
    mask, k = selection.select_tokens(d, jnp.ones(n, bool), jnp.float32(0.1), selection="stratified")
    assert int(k) == 100
    rank = np.asarray(selection.rank_tokens(d, jnp.ones(n, bool)))
    per_stratum = np.bincount(rank[np.asarray(mask)] // 250, minlength=4)
    np.testing.assert_array_equal(per_stratum, [40, 30, 20, 10])
    # evenly spread inside a stratum: the hardest stratum keeps in-stratum ranks floor((2j+1)·250/80)
    chosen = np.sort(rank[np.asarray(mask)])[:40]
    np.testing.assert_array_equal(chosen, [(2 * j + 1) * 250 // 80 for j in range(40)])


def test_stratified_spill_over_and_counts():
    # k close to n forces quotas above stratum sizes (spill-over walks); n varies through the eligibility
    # mask on one fixed shape, so each S compiles once
    rng = np.random.default_rng(3)
    size = 16
    for n, ratio, S in [(10, 0.9, 4), (7, 1.0, 3), (5, 0.8, 9), (13, 0.95, 3), (3, 0.5, 4), (16, 0.99, 9)]:
        d = rng.standard_normal(size).astype(np.float32)
        e = np.zeros(size, bool)
        e[rng.permutation(size)[:n]] = True
        mask, k = selection.select_tokens(jnp.asarray(d), jnp.asarray(e), jnp.float32(ratio),
                                          selection="stratified", num_strata=S)
        m_o, k_o = oracle.select_tokens(d, e, np.float32(ratio), "stratified", S)
        assert int(k) == k_o and int(mask.sum()) == k_o
        np.testing.assert_array_equal(np.asarray(mask), m_o)


def test_stratified_exact_beyond_32_bit_products():
    # m_s = 75 000 > 46 341: (2j+1)·m_s overflows 32 bits, so the uint32 (hi, lo) arithmetic is exercised
    n = 300_000
    rng = np.random.default_rng(4)
    d = rng.permutation(n).astype(np.float32)
    ratio = np.float32(0.7071)
    mask, k = selection.select_tokens(jnp.asarray(d), jnp.ones(n, bool), jnp.float32(ratio),
                                      selection="stratified", num_strata=4)
    k_o = oracle.num_selected(n, ratio)
    m, e = oracle.stratum_counts(n, k_o, 4)
    chosen = set()
    start = 0
    for s in range(4):
        chosen.update(start + ((2 * j + 1) * m[s]) // (2 * e[s]) for j in range(e[s]))
        start += m[s]
    want_ranks = np.array(sorted(chosen))
    rank = (n - 1 - d).astype(np.int64)              # distinct values: rank = position in descending order
    got_ranks = np.sort(rank[np.asarray(mask)])
    assert int(k) == k_o
    np.testing.assert_array_equal(got_ranks, want_ranks)


def test_wide_integer_helpers_exact():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2**32, 5000, dtype=np.uint64)
    b = rng.integers(0, 2**32, 5000, dtype=np.uint64)
    add = rng.integers(0, 2**32, 5000, dtype=np.uint64)
    prod = [int(x) * int(y) + int(z) for x, y, z in zip(a, b, add)]
    # divisors that keep the quotient below 2^32
    dvs = np.array([max(1, p >> 32) + int(r) for p, r in zip(prod, rng.integers(1, 2**20, 5000))], np.uint64)
    dvs = np.minimum(dvs, 2**32 - 1)
    want = np.array([p // int(dv) for p, dv in zip(prod, dvs)], dtype=np.uint64)
    ok = want < 2**32
    f = jax.jit(selection._muldiv)
    got = np.asarray(f(jnp.asarray(a.astype(np.uint32)), jnp.asarray(b.astype(np.uint32)),
                       jnp.asarray(dvs.astype(np.uint32)), jnp.asarray(add.astype(np.uint32))))
    np.testing.assert_array_equal(got[ok].astype(np.uint64), want[ok])
    hi, lo = jax.jit(selection._mul_wide)(jnp.asarray(a.astype(np.uint32)), jnp.asarray(b.astype(np.uint32)))
    full = (np.asarray(hi).astype(object) << 32) + np.asarray(lo).astype(object)
    assert list(full) == [int(x) * int(y) for x, y in zip(a, b)]


def test_sequence_aware_total_exceeds_k():
    # sequence 0 holds every hard token; the others are topped up to min_tokens_per_sequence
    d = np.zeros((4, 8), np.float32)
    d[0] = np.arange(100, 108)
    d[1:] = np.random.default_rng(6).uniform(0, 1, (3, 8))
    e = np.ones((4, 8), bool)
    e[3] = False                                         # a sequence with no eligible token gets nothing
    e[2, 3:] = False                                     # n_b = 3 < min_tokens_per_sequence
    ratio = np.float32(0.25)
    mask, k = selection.select_tokens(jnp.asarray(d), jnp.asarray(e), jnp.float32(ratio),
                                      selection="sequence_aware", min_tokens_per_sequence=4)
    m_o, k_o = oracle.select_tokens(d, e, ratio, "sequence_aware", min_tokens_per_sequence=4)
    np.testing.assert_array_equal(np.asarray(mask), m_o)
    assert int(k) == k_o == 5
    per_row = np.asarray(mask).sum(axis=1)
    np.testing.assert_array_equal(per_row, [5, 4, 3, 0])
    assert per_row.sum() > int(k)


def test_nothing_eligible_and_empty():
    for strategy in selection.SELECTION_STRATEGIES:
        mask, k = selection.select_tokens(jnp.ones((4, 9)), jnp.zeros((4, 9), bool), 0.5, selection=strategy)
        assert int(k) == 0 and not bool(mask.any())
    for strategy in ("topk", "stratified"):
        mask, k = selection.select_tokens(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), bool), 0.5,
                                          selection=strategy)
        assert int(k) == 0 and mask.shape == (0,)
    # NaN difficulty is never selected even when marked eligible, and never displaces another token
    d = jnp.asarray([np.nan, 1.0, 2.0], jnp.float32)
    mask, k = selection.select_tokens(d, jnp.ones(3, bool), 0.5)
    assert int(k) == 1
    np.testing.assert_array_equal(np.asarray(mask), [False, False, True])


def test_traced_ratio_and_low_precision_difficulty():
    d16 = jnp.asarray(np.random.default_rng(7).standard_normal((3, 5)), jnp.bfloat16)
    e = jnp.ones((3, 5), bool)

    @jax.jit
    def f(d, e, r):
        return selection.select_tokens(d, e, r, selection="stratified", num_strata=2)

    for r in (0.2, 0.5, 1.0):
        mask, k = f(d16, e, jnp.float32(r))
        m_o, k_o = oracle.select_tokens(np.asarray(d16.astype(jnp.float32)), np.ones((3, 5), bool),
                                        np.float32(r), "stratified", 2)
        assert int(k) == k_o
        np.testing.assert_array_equal(np.asarray(mask), m_o)
    assert f._cache_size() == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.sampled_from(list(POOL)), min_size=18, max_size=18),
       eligible=st.lists(st.booleans(), min_size=18, max_size=18),
       ratio=st.floats(float(np.float32(1e-6)), 1.0, width=32),
       strategy=st.sampled_from(list(selection.SELECTION_STRATEGIES)))
def test_select_tokens_property(values, eligible, ratio, strategy):
    """Hypothesis over one (3, 6) shape: identical to the oracle; only eligible, non-NaN tokens selected;
    exactly k except sequence_aware, which keeps at least min(1, n_b) per sequence."""
    d = np.array(values, np.float32).reshape(3, 6)
    e = np.array(eligible).reshape(3, 6)
    mask, k = selection.select_tokens(jnp.asarray(d), jnp.asarray(e), jnp.float32(ratio), selection=strategy)
    m_o, k_o = oracle.select_tokens(d, e, np.float32(ratio), strategy)
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask, m_o)
    assert int(k) == k_o
    assert not (mask & ~(e & ~np.isnan(d))).any()
    if strategy == "sequence_aware":
        assert mask.sum() >= k_o
        assert np.all(mask.sum(1) >= np.minimum(1, (e & ~np.isnan(d)).sum(1)))
    elif strategy != "sampled":   # SPEC §7.4: the count is random, k in expectation
        assert mask.sum() == k_o


def test_float64_difficulties_are_rounded_to_float32_before_ranking():
    """SPEC §6: a float64 difficulty is first rounded to float32 (to nearest), then ranked - so both packages
    select the same tokens from the same array, with or without jax_enable_x64. 1 + 2^-30 and 1 round to the
    same float32: the tie goes to the lower index, although the float64 values differ."""
    d = np.array([1.0, 1.0 + 2.0**-30, 0.5, 1.0 + 2.0**-20], np.float64)
    e = np.ones(4, bool)
    rank = np.asarray(selection.rank_tokens(d, e))
    np.testing.assert_array_equal(rank, oracle.rank_tokens(d.astype(np.float32), e))
    np.testing.assert_array_equal(rank, [1, 2, 3, 0])
    mask, k = selection.select_tokens(d, e, 0.5)
    assert k.dtype == jnp.int32 and int(k) == 2
    np.testing.assert_array_equal(np.asarray(mask), [True, False, False, True])
