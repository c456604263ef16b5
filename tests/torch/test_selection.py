"""cggr_torch.selection: bit-identical to the oracle given the same float32 difficulties (SPEC §6, §7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cggr_torch.scoring import score_tokens
from cggr_torch.selection import SELECTION_STRATEGIES, rank_tokens, select_tokens, stratum_counts
from tests import oracle
from tests.torch import random_logits, random_targets

INF, NAN = float("inf"), float("nan")


def _same_as_oracle(d: np.ndarray, e: np.ndarray, ratio: np.float32, selection: str, num_strata: int = 4,
                    min_tps: int = 1) -> tuple[np.ndarray, int]:
    mask, k = select_tokens(torch.from_numpy(d), torch.from_numpy(e), torch.tensor(ratio), selection=selection,
                            num_strata=num_strata, min_tokens_per_sequence=min_tps)
    assert mask.dtype == torch.bool and tuple(mask.shape) == d.shape
    assert k.dtype == torch.int32 and k.shape == ()  # k is int32 in both packages
    m_o, k_o = oracle.select_tokens(d, e, ratio, selection, num_strata, min_tps)
    assert int(k) == k_o
    np.testing.assert_array_equal(mask.numpy(), m_o)
    assert not (mask.numpy() & ~e).any()
    return mask.numpy(), int(k)


def test_rank_order_ties_signed_zero_infinities_nan():
    d = np.array([1.0, -0.0, 3.0, 1.0, 0.0, -INF, NAN, INF, 1.0, -INF], dtype=np.float32)
    e = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=bool)
    r = rank_tokens(torch.from_numpy(d), torch.from_numpy(e))
    assert r.dtype == torch.int32
    # inf(7) 3.0(2) 1.0(0) 1.0(3) -0.0(1) 0.0(4) -inf(5) -inf(9); NaN and ineligible → -1
    assert r.tolist() == [2, 4, 1, 3, 5, 6, -1, 0, -1, 7]
    np.testing.assert_array_equal(r.numpy(), oracle.rank_tokens(d, e))


def test_rank_2d_is_row_major():
    d = np.array([[1.0, 2.0, 1.0], [2.0, 1.0, 0.5]], dtype=np.float32)
    e = np.ones_like(d, dtype=bool)
    r = rank_tokens(torch.from_numpy(d), torch.from_numpy(e))
    assert r.tolist() == [[2, 0, 3], [1, 4, 5]]


@pytest.mark.parametrize("selection", SELECTION_STRATEGIES)
def test_topk_exactly_k_on_ties(selection):
    d = np.full(10, 2.0, dtype=np.float32)
    e = np.ones(10, dtype=bool)
    mask, k = _same_as_oracle(d, e, np.float32(0.3), selection, num_strata=3)
    assert k == 3
    if selection != "sampled":   # SPEC §7.4: sampled keeps k tokens in expectation only
        assert mask.sum() == 3
    if selection in ("topk", "fixed_quota", "sequence_aware"):
        assert mask.tolist() == [True] * 3 + [False] * 7  # ties: lower index first


def test_stratified_docs_weights_and_even_spread():
    # n = 100, S = 4, k = 20 → quotas 8/6/4/2 over strata of 25 ranks
    d = np.arange(100, 0, -1).astype(np.float32)  # rank = index
    e = np.ones(100, dtype=bool)
    mask, k = _same_as_oracle(d, e, np.float32(0.2), "stratified")
    assert k == 20
    chosen = np.nonzero(mask)[0]
    per_stratum = [int(((chosen >= 25 * s) & (chosen < 25 * (s + 1))).sum()) for s in range(4)]
    assert per_stratum == [8, 6, 4, 2]
    # systematic sampling in stratum 3 (m = 25, e = 2): in-stratum ranks floor((2j+1)·25/4) = 6, 18
    assert chosen[chosen >= 75].tolist() == [81, 93]


def test_stratified_spill_over():
    # n = 5, S = 4: strata sizes 1/1/1/2; k = 5 → quotas 2/2/1/0 spill over until all are taken
    d = np.array([5, 4, 3, 2, 1], dtype=np.float32)
    mask, k = _same_as_oracle(d, np.ones(5, dtype=bool), np.float32(1.0), "stratified")
    assert k == 5 and mask.all()


def test_stratum_counts_exhaustive_small():
    for S in range(1, 7):
        for n in range(0, 30):
            for k in ([0] if n == 0 else range(1, n + 1)):
                bounds, m, e = stratum_counts(torch.tensor(n), torch.tensor(k), S)
                m_o, e_o = oracle.stratum_counts(n, k, S)
                assert m.tolist() == m_o and e.tolist() == e_o, (S, n, k)
                assert int(e.sum()) == k


def test_sequence_aware_total_exceeds_k_and_fully_ignored_sequence():
    # sequence 0 has all the hard tokens; sequences 1 and 2 still get their hardest token; 3 has none eligible
    d = np.array([[9, 8, 7, 6], [1, 2, 0.5, 0.1], [0.3, 0.2, 0.4, 0.1], [5, 5, 5, 5]], dtype=np.float32)
    e = np.ones_like(d, dtype=bool)
    e[3] = False
    mask, k = _same_as_oracle(d, e, np.float32(0.25), "sequence_aware", min_tps=1)
    assert k == 3  # 0.25 · 12 = 3
    assert mask.sum() == 5 > k
    assert mask[1].tolist() == [False, True, False, False] and mask[2].tolist() == [False, False, True, False]
    assert not mask[3].any()
    mask2, _ = _same_as_oracle(d, e, np.float32(0.25), "sequence_aware", min_tps=2)
    assert mask2.sum() == 7 and mask2[1].tolist() == [True, True, False, False]
    # min_tokens_per_sequence larger than a sequence's eligible count: the whole sequence
    mask3, _ = _same_as_oracle(d, e, np.float32(0.25), "sequence_aware", min_tps=10)
    assert mask3.sum() == 16 - 4 and not mask3[3].any()
    # 1-D input is one sequence
    _same_as_oracle(d.reshape(-1), e.reshape(-1), np.float32(0.1), "sequence_aware", min_tps=3)


@pytest.mark.parametrize("selection", SELECTION_STRATEGIES)
def test_nothing_eligible_and_empty(selection):
    d = np.array([[1.0, NAN], [2.0, 3.0]], dtype=np.float32)
    mask, k = _same_as_oracle(d, np.zeros_like(d, dtype=bool), np.float32(0.5), selection)
    assert k == 0 and not mask.any()
    for shape in ((0,), (2, 0)):
        m, k = select_tokens(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), 0.5, selection=selection)
        assert m.shape == shape and int(k) == 0


@pytest.mark.parametrize("selection", SELECTION_STRATEGIES)
def test_real_difficulties_from_scoring(selection):
    """The package's own float32 scores into the oracle's selection: identical masks and k."""
    rng = np.random.default_rng(SELECTION_STRATEGIES.index(selection))
    for shape, V in [((3, 11), 7), ((17,), 33), ((2, 9), 2)]:
        logits = random_logits(rng, shape + (V,))
        targets = random_targets(rng, shape, V)
        sc = score_tokens(logits, targets)
        for ratio in (np.float32(0.25), np.float32(0.61), np.float32(1.0)):
            for S in (1, 3, 4):
                _same_as_oracle(sc.difficulty.numpy(), sc.eligible.numpy(), ratio, selection, S, 2)


def test_ratio_as_python_float_and_float64_difficulty():
    d = np.array([0.5, 0.25, 0.75, 0.125], dtype=np.float64)
    e = np.ones(4, dtype=bool)
    m, k = select_tokens(torch.from_numpy(d), torch.from_numpy(e), 0.5)
    assert int(k) == 2 and m.tolist() == [True, False, True, False]
    m16, _ = select_tokens(torch.from_numpy(d).half(), torch.from_numpy(e), np.float32(0.5))
    assert torch.equal(m, m16)


@st.composite
def _problems(draw):
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    else:
        shape = (draw(st.integers(1, 30)),)
    size = int(np.prod(shape))
    pool = draw(st.lists(st.sampled_from([0.0, -0.0, 1.0, 1.0000001, 2.5, -3.0, INF, -INF, NAN, 0.3, 7.0]),
                         min_size=1, max_size=5))
    d = np.array(draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size)), np.float32).reshape(shape)
    e = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool).reshape(shape)
    ratio = np.float32(draw(st.floats(2.0**-20, 1.0, width=32)))
    return d, e, ratio, draw(st.sampled_from(SELECTION_STRATEGIES)), draw(st.integers(1, 5)), draw(st.integers(0, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_hypothesis_bit_identical_to_oracle(problem):
    d, e, ratio, selection, S, min_tps = problem
    _same_as_oracle(d, e, ratio, selection, S, min_tps)
    np.testing.assert_array_equal(rank_tokens(torch.from_numpy(d), torch.from_numpy(e)).numpy(),
                                  oracle.rank_tokens(d, e))
