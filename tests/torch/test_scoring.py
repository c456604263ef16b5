"""cggr_torch.scoring against the float64 oracle (SPEC §2-§4, tolerances of §11)."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cggr_torch import dispatch, scoring
from cggr_torch.scoring import (
    SCORING_MODES,
    TokenStatistics,
    difficulty_from_statistics,
    score_tokens,
    token_statistics,
)
from tests import oracle
from tests.torch import DTYPES, as_f64, assert_within, random_logits, random_targets

STAT_NAMES = ("lse", "entropy", "confidence", "runner_up", "nll")


def _check_against_oracle(logits: torch.Tensor, targets: torch.Tensor | None, scoring_mode: str = "combined",
                          ignore_index: int = -100, reference_nll: torch.Tensor | None = None) -> None:
    if scoring_mode == "excess" and reference_nll is None:   # SPEC §3.1: the mode needs a reference
        reference_nll = torch.from_numpy(np.random.default_rng(5).uniform(0, 4, tuple(logits.shape[:-1])))
    got = score_tokens(logits, targets, scoring=scoring_mode, ignore_index=ignore_index,
                       reference_nll=reference_nll)
    ref = oracle.score_tokens(as_f64(logits), None if targets is None else targets.numpy(), scoring_mode,
                              ignore_index, reference_nll=None if reference_nll is None else as_f64(reference_nll))
    assert got.difficulty.dtype == torch.float32 and got.difficulty.shape == logits.shape[:-1]
    np.testing.assert_array_equal(got.eligible.numpy(), ref["eligible"])
    np.testing.assert_array_equal(got.valid.numpy(), ref["valid"])
    e = ref["eligible"]
    for name in STAT_NAMES:
        x = getattr(got.stats, name)
        assert x.dtype == torch.float32 and x.shape == logits.shape[:-1], name
        assert_within(x, ref["stats"][name], name, where=e)
    assert_within(got.difficulty, ref["difficulty"], "difficulty", where=e)
    # nll is exactly 0 where there is no valid target
    assert (got.stats.nll[~got.valid] == 0).all()


@pytest.mark.parametrize("V", [1, 2, 7, 33, 257])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_statistics_match_oracle_3d(V, dtype):
    rng = np.random.default_rng(V * 7 + len(dtype))
    shape = (3, 5, V)
    logits = random_logits(rng, shape, DTYPES[dtype])
    targets = random_targets(rng, shape[:-1], V)
    _check_against_oracle(logits, targets)


@pytest.mark.parametrize("scoring_mode", SCORING_MODES)
def test_every_scoring_mode_2d(scoring_mode):
    rng = np.random.default_rng(11)
    logits = random_logits(rng, (13, 33))
    targets = random_targets(rng, (13,), 33)
    _check_against_oracle(logits, targets, scoring_mode)


@pytest.mark.parametrize("scoring_mode", ["entropy", "margin", "combined"])
def test_scoring_without_targets(scoring_mode):
    rng = np.random.default_rng(12)
    logits = random_logits(rng, (2, 5, 7), torch.bfloat16)
    _check_against_oracle(logits, None, scoring_mode)
    sc = score_tokens(logits, None, scoring=scoring_mode)
    assert sc.valid.all() and (sc.stats.nll == 0).all()


def test_float64_logits_are_computed_in_float32():
    rng = np.random.default_rng(13)
    x64 = torch.from_numpy(rng.standard_normal((4, 9)) * 3)
    t = random_targets(rng, (4,), 9, p_ignore=0.0)
    a = token_statistics(x64, t)
    b = token_statistics(x64.to(torch.float32), t)
    for name in STAT_NAMES:
        assert getattr(a, name).dtype == torch.float32
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)


def test_large_magnitude_logits_keep_entropy_accurate():
    # lse ≈ 1e4: the shifted form avoids the cancellation lse − Σ p z of two numbers of size 1e4.
    rng = np.random.default_rng(14)
    logits = torch.from_numpy((1e4 + rng.standard_normal((6, 33)) * 2).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, 33, 6))
    got = token_statistics(logits, targets)
    ref = oracle.token_statistics(as_f64(logits), targets.numpy())
    assert_within(got.entropy, ref["entropy"], "entropy")
    assert_within(got.nll, ref["nll"], "nll")
    assert_within(got.confidence, ref["confidence"], "confidence")


def test_ties_give_margin_term_exactly_one():
    # equal maxima: p2 = p1 bit for bit (ties are counted), so 1 − (p1 − p2) = 1 exactly
    logits = torch.tensor([[3.0, 1.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, float("-inf"), 1.0]])
    for dtype in DTYPES.values():
        st_ = token_statistics(logits.to(dtype))
        assert torch.equal(st_.confidence, st_.runner_up)
        d = difficulty_from_statistics(st_, "margin", has_targets=False)
        assert torch.equal(d, torch.ones(3))
    uniform = token_statistics(torch.zeros(1, 7))
    assert uniform.entropy.item() == pytest.approx(math.log(7), abs=1e-6)
    assert uniform.confidence.item() == pytest.approx(1 / 7, abs=1e-7)


def test_vocab_of_one():
    logits = torch.tensor([[2.5], [-1.0], [float("nan")]])
    st_ = token_statistics(logits, torch.tensor([0, 0, 0]))
    assert torch.equal(st_.runner_up, torch.zeros(3))
    assert st_.confidence[:2].tolist() == [1.0, 1.0]
    assert st_.entropy[:2].tolist() == [0.0, 0.0]
    assert st_.nll[:2].tolist() == [0.0, 0.0]
    sc = score_tokens(logits, torch.tensor([0, 0, 0]))
    assert sc.eligible.tolist() == [True, True, False]


def test_masked_minus_inf_entries_contribute_nothing():
    logits = torch.tensor([[2.0, float("-inf"), 0.0, float("-inf")], [float("-inf")] * 3 + [1.0]])
    targets = torch.tensor([2, 3])
    got = token_statistics(logits, targets)
    z = math.exp(2) + 1
    p = np.array([math.exp(2) / z, 1 / z])
    assert got.entropy[0].item() == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-6)
    assert got.runner_up[0].item() == pytest.approx(p[1], abs=1e-7)
    # one finite entry: a one-hot distribution, runner-up 0, entropy 0
    assert got.entropy[1].item() == 0.0 and got.confidence[1].item() == 1.0 and got.runner_up[1].item() == 0.0
    for name in STAT_NAMES:
        assert torch.isfinite(getattr(got, name)).all(), name
    _check_against_oracle(logits, targets)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nonfinite_rows_are_not_eligible(dtype):
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [nan, 0.0, 1.0],          # NaN
        [inf, 0.0, 1.0],          # +inf
        [-inf, -inf, -inf],       # only -inf
        [0.0, -inf, 1.0],         # target logit -inf (target 1)
        [0.0, -inf, 1.0],         # finite (target 2)
        [0.5, 0.25, -1.0],        # finite
    ]).to(DTYPES[dtype])
    targets = torch.tensor([0, 0, 0, 1, 2, 0])
    sc = score_tokens(logits, targets)
    assert sc.eligible.tolist() == [False, False, False, False, True, True]
    assert sc.valid.all()
    _check_against_oracle(logits, targets)
    # an ignored token with a -inf target logit is just ignored (its target is never read)
    targets2 = torch.tensor([0, 0, 0, -100, 2, 0])
    sc2 = score_tokens(logits, targets2)
    assert sc2.stats.nll[3].item() == 0.0 and not sc2.eligible[3] and not sc2.valid[3]


def test_ignore_index_custom_and_all_ignored():
    rng = np.random.default_rng(15)
    logits = random_logits(rng, (2, 4, 7))
    targets = random_targets(rng, (2, 4), 7, p_ignore=0.4, ignore_index=-1)
    _check_against_oracle(logits, targets, ignore_index=-1)
    all_ignored = torch.full((2, 4), -100)
    sc = score_tokens(logits, all_ignored)
    assert not sc.eligible.any() and not sc.valid.any() and (sc.stats.nll == 0).all()
    _check_against_oracle(logits, all_ignored)


def test_valid_mask_and_empty_input():
    rng = np.random.default_rng(16)
    logits = random_logits(rng, (3, 4, 5))
    vm = torch.from_numpy(rng.random((3, 4)) < 0.5)
    sc = score_tokens(logits, None, valid_mask=vm)
    ref = oracle.score_tokens(as_f64(logits), None, "combined", -100, vm.numpy())
    np.testing.assert_array_equal(sc.valid.numpy(), ref["valid"])
    np.testing.assert_array_equal(sc.eligible.numpy(), ref["eligible"])
    empty = score_tokens(torch.zeros(0, 9), torch.zeros(0, dtype=torch.int64))
    assert empty.difficulty.shape == (0,) and empty.eligible.shape == (0,)
    empty3 = score_tokens(torch.zeros(2, 0, 9), torch.zeros(2, 0, dtype=torch.int64))
    assert empty3.difficulty.shape == (2, 0)


def test_targets_of_any_integer_dtype():
    rng = np.random.default_rng(17)
    logits = random_logits(rng, (6, 7))
    t = torch.from_numpy(rng.integers(0, 7, 6))
    ref = token_statistics(logits, t)
    for dt in (torch.int32, torch.int16, torch.int8):
        got = token_statistics(logits, t.to(dt))
        torch.testing.assert_close(got.nll, ref.nll, atol=0, rtol=0)
    # unsigned labels with an ignore_index they can represent are widened before any comparison (uint16/uint32
    # used to crash in the range check); the ignore marker still works
    t_ign = t.clone()
    t_ign[2] = -100
    ref_ign = token_statistics(logits, t_ign)
    for dt, ignore in ((torch.uint8, 255), (torch.uint16, 65535), (torch.uint32, 2**32 - 1)):
        tu = t.to(dt)
        got = token_statistics(logits, tu, ignore_index=ignore)
        torch.testing.assert_close(got.nll, ref.nll, atol=0, rtol=0)
        tu[2] = ignore
        got = token_statistics(logits, tu, ignore_index=ignore)
        torch.testing.assert_close(got.nll, ref_ign.nll, atol=0, rtol=0)
        sc = score_tokens(logits, tu, ignore_index=ignore)
        assert not bool(sc.valid[2]) and int(sc.valid.sum()) == 5


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_label_dtypes_that_cannot_hold_ignore_index_are_refused(dtype):
    """uint8 labels cannot represent ignore_index=-100: it would wrap to token 156, which would then silently
    never be trained (SPEC §1). Refused with a clear error naming the argument, in every entry point (uint16 and
    uint32 likewise with -100: no crash, the same rule; uint64 always: int64 cannot widen it)."""
    logits = torch.randn(2, 3, 7)
    t = torch.randint(0, 7, (2, 3)).to(dtype)
    match = (f"targets: dtype {dtype} holds .* cannot represent ignore_index=-100" if dtype != torch.uint64
             else "targets: dtype torch.uint64")
    with pytest.raises(ValueError, match=match):
        token_statistics(logits, t)
    with pytest.raises(ValueError, match=match):
        score_tokens(logits, t)
    from cggr_torch import CGGRLoss, cggr_loss

    with pytest.raises(ValueError, match=match):
        cggr_loss(logits, t, 0)
    with pytest.raises(ValueError, match=match):
        CGGRLoss()(logits, t)


def test_uint16_uint32_out_of_range_labels_raise_with_their_true_value():
    logits = torch.randn(4, 7)
    for dt, ignore in ((torch.uint16, 65535), (torch.uint32, 2**32 - 1)):
        with pytest.raises(ValueError, match="targets: every value must lie in \\[0, 7\\).*e.g. 300"):
            token_statistics(logits, torch.tensor([1, 300, 2, 3]).to(dt), ignore_index=ignore)
        with pytest.raises(ValueError, match="targets: every value must lie in \\[0, 7\\).*e.g. 4000000"
                           if dt == torch.uint32 else "targets: every value"):
            token_statistics(logits, torch.tensor([1, 4_000_000 if dt == torch.uint32 else 65534, 2, 3]).to(dt),
                             ignore_index=ignore)


def test_difficulty_modes_and_evaluation_order():
    stats = TokenStatistics(lse=torch.tensor([0.0]), entropy=torch.tensor([1.5]), confidence=torch.tensor([0.6]),
                            runner_up=torch.tensor([0.3]), nll=torch.tensor([2.0]))
    margin = np.float32(1) - (np.float32(0.6) - np.float32(0.3))
    assert difficulty_from_statistics(stats, "entropy").item() == 1.5
    assert difficulty_from_statistics(stats, "margin").item() == float(margin)
    assert difficulty_from_statistics(stats, "loss").item() == 2.0
    assert difficulty_from_statistics(stats, "combined").item() == float((np.float32(1.5) + margin) + np.float32(2))
    assert difficulty_from_statistics(stats, "combined", has_targets=False).item() == float(np.float32(1.5) + margin)
    with pytest.raises(ValueError, match="scoring"):
        difficulty_from_statistics(stats, "loss", has_targets=False)


def test_no_gradient_through_statistics():
    logits = torch.randn(4, 7, requires_grad=True)
    st_ = token_statistics(logits, torch.tensor([1, 2, 3, -100]))
    assert all(not x.requires_grad for x in st_)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_rows_with_special_values(data):
    V = data.draw(st.sampled_from([1, 2, 3, 7]))
    n = data.draw(st.integers(1, 6))
    pool = st.sampled_from([0.0, -0.0, 1.0, -2.5, 7.0, 1e-3, 30.0, float("-inf"), float("inf"), float("nan")])
    vals = data.draw(st.lists(pool, min_size=n * V, max_size=n * V))
    dtype = data.draw(st.sampled_from(list(DTYPES)))
    logits = torch.tensor(vals, dtype=torch.float32).reshape(n, V).to(DTYPES[dtype])
    t = data.draw(st.lists(st.sampled_from(list(range(V)) + [-100]), min_size=n, max_size=n))
    _check_against_oracle(logits, torch.tensor(t), data.draw(st.sampled_from(SCORING_MODES)))


# ------------------------------------------------------------------------------------------ kernel dispatch
class _Recorder:
    def __init__(self, result=None, error: Exception | None = None):
        self.calls = 0
        self.result, self.error = result, error

    def __call__(self, logits, targets, ignore_index):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result


def test_dispatch_uses_kernel_and_propagates_its_errors():
    """dispatch.force("kernel") routes CPU tensors through the kernel hook (CUDA is not available here)."""
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, -100])
    ref = scoring.token_statistics_reference(logits, targets)
    rec = _Recorder(result=ref)
    with dispatch.force("kernel", kernels={"token_statistics_triton": rec}) as log:
        out = token_statistics(logits, targets)
        assert rec.calls == 1 and out is ref
        score_tokens(logits, targets)
        assert rec.calls == 2
    assert log.calls["token_statistics_triton"] == 2
    # a kernel error is raised, never replaced by the reference
    bad = _Recorder(error=RuntimeError("kernel exploded"))
    with dispatch.force("kernel", kernels={"token_statistics_triton": bad}):
        with pytest.raises(RuntimeError, match="kernel exploded"):
            token_statistics(logits, targets)
    # a malformed kernel result is an error too
    wrong = _Recorder(result=TokenStatistics(*(x[:2] for x in ref)))
    with dispatch.force("kernel", kernels={"token_statistics_triton": wrong}):
        with pytest.raises(RuntimeError, match="shape"):
            token_statistics(logits, targets)


def test_env_var_forces_reference(monkeypatch):
    bad = _Recorder(error=RuntimeError("must not be called"))
    with dispatch.force("reference", kernels={"token_statistics_triton": bad}):
        token_statistics(torch.randn(3, 5))
    assert bad.calls == 0
    # under "auto" the environment variable decides (CUDA tensors would use the kernels otherwise)
    monkeypatch.setenv("CGGR_DISABLE_KERNELS", "1")
    assert not dispatch.kernels_enabled() and not dispatch.use_kernels(torch.zeros(1))
    monkeypatch.delenv("CGGR_DISABLE_KERNELS")
    assert dispatch.kernels_enabled() and not dispatch.use_kernels(torch.zeros(1))   # CPU: no kernels
    with pytest.raises(ValueError, match="mode"):
        with dispatch.force("fast"):
            pass
    with pytest.raises(ValueError, match="kernels"):
        with dispatch.force("kernel", kernels={"no_such_kernel": bad}):
            pass


def test_load_kernel_missing_module_vs_broken_module(monkeypatch):
    assert dispatch.load_kernel("cggr_torch.kernels._no_such_module_", "token_statistics_triton") is None
    # a module that exists but fails to import for another reason propagates the error
    broken = "cggr_test_broken_kernel_module_"

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name != broken:
                return None
            import importlib.util

            class _Loader:
                def create_module(self, spec):
                    return None

                def exec_module(self, module):
                    import cggr_nonexistent_dependency_  # noqa: F401

            return importlib.util.spec_from_loader(name, _Loader())

    finder = _Finder()
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    with pytest.raises(ModuleNotFoundError, match="cggr_nonexistent_dependency_"):
        dispatch.load_kernel(broken, "token_statistics_triton")
    # and a module that imports is used
    ok = types.ModuleType("cggr_test_ok_kernel_")
    ok.token_statistics_triton = lambda *a: "sentinel"
    monkeypatch.setitem(sys.modules, "cggr_test_ok_kernel_", ok)
    assert dispatch.load_kernel("cggr_test_ok_kernel_", "token_statistics_triton")() == "sentinel"


def test_out_of_range_target_is_never_read_by_the_reference():
    # CPU raises before this point; on CUDA the check is a device assertion, so the reference itself must
    # neither index out of bounds nor make such a token eligible.
    logits = torch.randn(3, 4)
    st_ = scoring.reference_statistics(logits, torch.tensor([1, 9, -100]), -100)
    assert math.isfinite(st_.nll[0].item()) and math.isnan(st_.nll[1].item()) and st_.nll[2].item() == 0.0
