"""The oracle against hand-computed values and the docs' examples, and the committed conformance vectors.

These checks do not use the oracle to compute their expectations: they pin it to closed forms, so that both
packages are tested against something that is itself tested.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests import oracle
from tests.conformance.generate import build_cases

CASES = json.loads((Path(__file__).parent / "conformance" / "cases.json").read_text())["cases"]


def test_uniform_row_closed_forms():
    V = 7
    st = oracle.token_statistics(np.zeros((1, V)), np.array([3]))
    assert st["lse"][0] == pytest.approx(math.log(V))
    assert st["entropy"][0] == pytest.approx(math.log(V))
    assert st["confidence"][0] == pytest.approx(1 / V)
    assert st["runner_up"][0] == pytest.approx(1 / V)  # ties counted: margin term exactly 1
    assert st["nll"][0] == pytest.approx(math.log(V))


def test_two_point_row_and_masked_entries():
    # p = (e^2, e^0) / Z over the finite entries; -inf entries contribute nothing.
    z = np.array([[2.0, -np.inf, 0.0, -np.inf]])
    st = oracle.token_statistics(z, np.array([2]))
    Z = math.exp(2) + 1
    p = np.array([math.exp(2) / Z, 1 / Z])
    assert st["lse"][0] == pytest.approx(math.log(Z))
    assert st["entropy"][0] == pytest.approx(-(p * np.log(p)).sum())
    assert st["confidence"][0] == pytest.approx(p[0])
    assert st["runner_up"][0] == pytest.approx(p[1])
    assert st["nll"][0] == pytest.approx(-math.log(p[1]))
    assert st["row_finite"][0]


@pytest.mark.parametrize("row", [[np.nan, 0.0], [np.inf, 0.0], [-np.inf, -np.inf]])
def test_nonfinite_rows_are_not_eligible(row):
    sc = oracle.score_tokens(np.array([row, [0.0, 1.0]]), np.array([1, 1]))
    assert not sc["eligible"][0] and sc["eligible"][1]
    assert sc["nonfinite"][0]


def test_target_logit_minus_inf_is_not_finite():
    sc = oracle.score_tokens(np.array([[0.0, -np.inf, 1.0]]), np.array([1]))
    assert not sc["eligible"][0]


def test_difficulty_modes():
    stats = {"entropy": np.array([1.5]), "confidence": np.array([0.6]), "runner_up": np.array([0.3]),
             "nll": np.array([2.0]), "lse": np.array([0.0])}
    assert oracle.difficulty_from_statistics(stats, "entropy")[0] == 1.5
    assert oracle.difficulty_from_statistics(stats, "margin")[0] == pytest.approx(0.7)
    assert oracle.difficulty_from_statistics(stats, "loss")[0] == 2.0
    assert oracle.difficulty_from_statistics(stats, "combined")[0] == pytest.approx(4.2)
    assert oracle.difficulty_from_statistics(stats, "combined", has_targets=False)[0] == pytest.approx(2.2)
    with pytest.raises(ValueError):
        oracle.difficulty_from_statistics(stats, "loss", has_targets=False)


def test_curriculum_docs_example():
    sched = oracle.linear_warmup_ratio(0.25, 1000)
    assert sched(0) == 1.0
    assert sched(500) == np.float32(0.625)
    assert sched(1000) == np.float32(0.25) and sched(5000) == np.float32(0.25)
    assert oracle.linear_warmup_ratio(0.3, 0)(0) == np.float32(0.3)


@pytest.mark.parametrize("conf,expected", [(0.3, 0.3375), (0.7, 0.2875), (0.9, 0.2625)])
def test_dynamic_threshold_docs_table(conf, expected):
    assert oracle.dynamic_ratio(0.25, conf, 0.5) == pytest.approx(expected, abs=1e-7)


def test_dynamic_ratio_capped_at_one():
    assert oracle.dynamic_ratio(0.9, 0.0, 1.0) == 1.0


@pytest.mark.parametrize("n,ratio,k", [(256, 0.625, 160), (10, 0.25, 3), (10, 0.3, 3), (1, 0.01, 1),
                                       (0, 0.5, 0), (7, 1.0, 7), (3, 1e-9, 1), (100, 0.335, 34)])
def test_num_selected(n, ratio, k):
    assert oracle.num_selected(n, ratio) == k


def test_rank_ties_and_nan():
    d = np.array([1.0, 3.0, 1.0, np.nan, 3.0, -0.0, 0.0])
    e = np.array([True, True, True, True, True, True, True])
    rank = oracle.rank_tokens(d, e)
    assert rank.tolist() == [2, 0, 3, -1, 1, 4, 5]


def test_topk_exactly_k_on_ties():
    d = np.ones(10)
    mask, k = oracle.select_tokens(d, np.ones(10, bool), 0.35)
    assert k == 4 and mask.tolist() == [True] * 4 + [False] * 6


def test_stratified_docs_weights():
    # 4 strata over 100 ranks, k = 20: quotas 8/6/4/2, spread evenly inside each stratum.
    m, e = oracle.stratum_counts(100, 20, 4)
    assert m == [25, 25, 25, 25] and e == [8, 6, 4, 2]
    d = np.arange(100, 0, -1).astype(float)  # rank == index
    mask, k = oracle.select_tokens(d, np.ones(100, bool), 0.2, "stratified")
    chosen = np.nonzero(mask)[0].tolist()
    assert k == 20 and len(chosen) == 20
    assert chosen[:8] == [(2 * j + 1) * 25 // 16 for j in range(8)]
    assert chosen[-2:] == [75 + 6, 75 + 18]


def test_stratified_spill_over():
    m, e = oracle.stratum_counts(10, 9, 4)   # quotas 4,3,2,1 (remainder 0 -> 3,2,1,0 +1,1,1)
    assert sum(e) == 9 and all(es <= ms for es, ms in zip(e, m))
    m, e = oracle.stratum_counts(3, 1, 4)
    assert m == [0, 1, 1, 1] and e == [0, 1, 0, 0]


def test_sequence_aware_tops_up():
    d = np.array([[9.0, 8.0, 7.0], [1.0, 2.0, 0.5], [-1.0, -2.0, -3.0]])
    e = np.ones_like(d, dtype=bool)
    e[2] = False
    mask, k = oracle.select_tokens(d, e, 0.3, "sequence_aware", min_tokens_per_sequence=2)
    assert k == 2
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, False]]


def test_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5))
    targets = rng.integers(0, 5, 6)
    res = oracle.cggr_loss(logits, targets, 10_000, dynamic_threshold=False)
    mask = res["mask"]
    eps = 1e-6
    for i, j in [(i, j) for i in range(6) for j in range(5)][::4]:
        lp, lm = logits.copy(), logits.copy()
        lp[i, j] += eps
        lm[i, j] -= eps
        # hold the selection fixed, as the spec says (no gradient through it)
        def masked_loss(x):
            st = oracle.token_statistics(x, targets)
            return st["nll"][mask].sum() / mask.sum()
        fd = (masked_loss(lp) - masked_loss(lm)) / (2 * eps)
        assert res["grad"][i, j] == pytest.approx(fd, abs=1e-6)


def test_all_ignored_loss_zero():
    res = oracle.cggr_loss(np.zeros((3, 4)), np.full(3, -100), 0)
    assert res["loss"] == 0.0 and not res["grad"].any() and res["metrics"]["tokens_total"] == 0


def test_conformance_vectors_are_reproduced():
    regenerated = json.loads(json.dumps(build_cases(), default=float).replace("NaN", '"nan"'))
    assert len(regenerated) == len(CASES)
    for new, old in zip(regenerated, CASES):
        assert new["name"] == old["name"]
        assert new["expected"]["mask"] == old["expected"]["mask"], new["name"]
        assert new["expected"]["k"] == old["expected"]["k"], new["name"]
        assert new["expected"]["loss"] == pytest.approx(old["expected"]["loss"], rel=1e-12), new["name"]


def test_conformance_covers_the_required_cases():
    names = {c["name"] for c in CASES}
    for required in ("docs_metrics_example", "ties_topk", "all_ignored", "nonfinite_rows",
                     "selection_sequence_aware_ignored", "stratified_spill", "vocab_one"):
        assert required in names
    docs = next(c for c in CASES if c["name"] == "docs_metrics_example")["expected"]["metrics"]
    assert (docs["token_ratio"], docs["tokens_selected"], docs["tokens_total"]) == (0.625, 160, 256)


# ------------------------------------------------------------------------- SPEC §3.1: scoring='excess'
def test_excess_closed_forms():
    V = 7
    ref = np.array([0.5, np.nan, np.inf, -np.inf, 2.0])
    targets = np.array([3, 1, 2, 0, -100])
    sc = oracle.score_tokens(np.zeros((5, V)), targets, "excess", reference_nll=ref)
    assert sc["difficulty"][0] == pytest.approx(math.log(V) - 0.5)
    # a non-finite reference: valid, not eligible, counted (never an infinite difficulty that ranks)
    assert np.isnan(sc["difficulty"][1:4]).all()
    np.testing.assert_array_equal(sc["eligible"], [True, False, False, False, False])
    np.testing.assert_array_equal(sc["nonfinite"], [False, True, True, True, False])
    assert not sc["valid"][4]                     # ignored: not valid, not counted


def test_excess_selection_follows_the_reference():
    # equal losses (uniform logits): topk keeps the token with the smallest reference
    out = oracle.cggr_loss(np.zeros((4, 5)), np.array([0, 1, 2, 3]), 0, scoring="excess", selection="topk",
                           dynamic_threshold=False, min_tokens_ratio=0.25, warmup_steps=0,
                           reference_nll=np.array([3.0, 0.0, 1.0, 2.0]))
    np.testing.assert_array_equal(out["mask"], [False, True, False, False])
    assert out["loss"] == pytest.approx(math.log(5))
    assert out["metrics"]["avg_difficulty"] == pytest.approx(math.log(5) - 1.5)


def test_excess_reference_rules():
    with pytest.raises(ValueError, match="reference_nll"):
        oracle.score_tokens(np.zeros((2, 3)), np.array([0, 1]), "excess")
    with pytest.raises(ValueError, match="reference_nll"):
        oracle.score_tokens(np.zeros((2, 3)), np.array([0, 1]), "loss", reference_nll=np.zeros(2))
    with pytest.raises(ValueError, match="targets"):
        oracle.difficulty_from_statistics(oracle.token_statistics(np.zeros((2, 3))), "excess", has_targets=False,
                                          reference_nll=np.zeros(2))
