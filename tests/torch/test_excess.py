"""SPEC §3.1 in cggr_torch: ``scoring='excess'`` (d = nll − reference_nll) against the float64 oracle.

Odd shapes, fp32/fp16/bf16 logits, fp16/fp32/bf16/fp64 references, ignore_index, NaN/±inf in the logits and in
the reference (counted in ``tokens_nonfinite``), all-ignored batches, the dispatch rule of the fused path,
and every error message.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cggr_torch  # noqa: E402
from cggr_torch import dispatch  # noqa: E402
from cggr_torch.scoring import difficulty_from_statistics, score_tokens, token_statistics  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, kernel_test_device, random_logits, random_targets  # noqa: E402

REF_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float64": torch.float64}


def excess_bound(d_ref: np.ndarray, nll_ref: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SPEC §11 for excess: 3e-4 + 1e-5·|d| + 1e-5·|nll| + 2^-24·|ref| (the reference's float32 rounding)."""
    return 3e-4 + 1e-5 * np.abs(d_ref) + 1e-5 * np.abs(nll_ref) + 2.0 ** -24 * np.abs(ref)


def reference_for(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(-1.0, 6.0, shape)).to(REF_DTYPES[dtype])


def ref_values(ref: torch.Tensor) -> np.ndarray:
    """The reference's exact values (float64 stays float64: the oracle sees what the caller passed)."""
    return ref.double().numpy() if ref.dtype == torch.float64 else as_f64(ref)


def check_against_oracle(logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor) -> None:
    got = score_tokens(logits, targets, scoring="excess", reference_nll=ref)
    exp = oracle.score_tokens(as_f64(logits), targets.numpy(), "excess", reference_nll=ref_values(ref))
    assert got.difficulty.dtype == torch.float32 and got.difficulty.shape == targets.shape
    np.testing.assert_array_equal(got.valid.numpy(), exp["valid"])
    np.testing.assert_array_equal(got.eligible.numpy(), exp["eligible"])
    e = exp["eligible"]
    err = np.abs(got.difficulty.double().numpy() - exp["difficulty"])[e]
    bound = excess_bound(exp["difficulty"], exp["stats"]["nll"], ref_values(ref))[e]
    assert (err <= bound).all(), float((err - bound).max())
    # the difficulty is exactly nll ⊖ float32(ref) of the package's own statistics
    r32 = ref.to(torch.float32)
    np.testing.assert_array_equal(got.difficulty.numpy()[e], (got.stats.nll - r32).numpy()[e])


@pytest.mark.parametrize("logits_dtype", list(DTYPES))
@pytest.mark.parametrize("ref_dtype", list(REF_DTYPES))
@pytest.mark.parametrize("shape", [(3, 7, 33), (13, 5), (1, 1, 1), (2, 9, 257)])
def test_excess_matches_oracle(logits_dtype, ref_dtype, shape):
    rng = np.random.default_rng(hash((logits_dtype, ref_dtype, shape)) % 2**32)
    logits = random_logits(rng, shape, DTYPES[logits_dtype])
    targets = random_targets(rng, shape[:-1], shape[-1])
    check_against_oracle(logits, targets, reference_for(rng, shape[:-1], ref_dtype))


def test_float64_reference_is_rounded_to_float32():
    logits = torch.zeros(2, 4)
    targets = torch.tensor([0, 1])
    ref = torch.tensor([1.0 + 2.0 ** -30, 0.1], dtype=torch.float64)   # not float32-representable
    d = score_tokens(logits, targets, scoring="excess", reference_nll=ref).difficulty
    stats = token_statistics(logits, targets)
    np.testing.assert_array_equal(d.numpy(), (stats.nll - ref.to(torch.float32)).numpy())


def test_nonfinite_logits_and_reference_are_not_eligible_and_counted():
    rng = np.random.default_rng(3)
    logits = random_logits(rng, (3, 6, 11))
    targets = random_targets(rng, (3, 6), 11, p_ignore=0.0)
    targets[0, 0] = -100                       # ignored, with a NaN reference: not valid, not counted
    logits[1, 2, 4] = float("nan")             # non-finite row
    logits[2, 3, :] = float("-inf")            # all −inf row
    ref = torch.from_numpy(rng.uniform(0, 3, (3, 6))).float()
    ref[0, 0] = float("nan")
    ref[0, 1], ref[1, 1], ref[2, 1] = float("nan"), float("inf"), float("-inf")
    check_against_oracle(logits, targets, ref)
    sc = score_tokens(logits, targets, scoring="excess", reference_nll=ref)
    for pos in [(0, 1), (1, 1), (2, 1), (1, 2), (2, 3)]:
        assert sc.valid[pos] and not sc.eligible[pos], pos
    assert not sc.valid[0, 0]
    loss_fn = cggr_torch.CGGRLoss(scoring="excess", warmup_steps=0, min_tokens_ratio=0.5)
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, targets, reference_nll=ref)
    loss.backward()
    m = loss_fn.get_metrics()
    exp = oracle.cggr_loss(as_f64(logits), targets.numpy(), 0, scoring="excess", warmup_steps=0,
                           min_tokens_ratio=0.5, reference_nll=ref_values(ref))
    assert m["tokens_nonfinite"] == exp["metrics"]["tokens_nonfinite"] == 5
    assert m["tokens_total"] == exp["metrics"]["tokens_total"] == 3 * 6 - 1 - 5
    assert m["scoring"] == "excess"
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    for pos in [(0, 1), (1, 1), (2, 1), (1, 2), (2, 3), (0, 0)]:
        assert not x.grad[pos].any(), pos


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware", "fixed_quota"])
def test_loss_and_gradient_match_oracle(dtype, selection):
    rng = np.random.default_rng(17)
    logits = random_logits(rng, (3, 7, 29), DTYPES[dtype])
    targets = random_targets(rng, (3, 7), 29)
    ref = reference_for(rng, (3, 7), "float32")
    cfg = dict(scoring="excess", selection=selection, warmup_steps=10, min_tokens_ratio=0.3)
    x = logits.clone().requires_grad_(True)
    loss, metrics = cggr_torch.cggr_loss(x, targets, 4, reference_nll=ref, **cfg)
    loss.backward()
    # the selection from the package's own float32 difficulties, compared exactly
    d = score_tokens(logits, targets, scoring="excess", reference_nll=ref).difficulty.double().numpy()
    exp = oracle.cggr_loss(as_f64(logits), targets.numpy(), 4, reference_nll=ref_values(ref),
                           difficulty_override=d, **cfg)
    assert int(metrics["tokens_selected"]) == exp["metrics"]["tokens_selected"]
    np.testing.assert_allclose(float(loss.detach()), exp["loss"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(x.grad.float().numpy(), exp["grad"], atol=1e-4 if dtype == "bfloat16" else 1e-5,
                               rtol=1e-2 if dtype == "bfloat16" else 1e-4)
    np.testing.assert_allclose(float(metrics["avg_difficulty"]), exp["metrics"]["avg_difficulty"], atol=1e-4)


def test_excess_selects_by_loss_minus_reference():
    # equal losses everywhere (uniform logits): the reference alone decides (SPEC §3.1, §7.1)
    logits = torch.zeros(4, 5)
    targets = torch.tensor([0, 1, 2, 3])
    ref = torch.tensor([3.0, 0.0, 1.0, 2.0])
    cfg = dict(selection="topk", warmup_steps=0, min_tokens_ratio=0.25, dynamic_threshold=False)
    loss_fn = cggr_torch.CGGRLoss(scoring="excess", **cfg)
    x = logits.clone().requires_grad_(True)
    loss_fn(x, targets, reference_nll=ref).backward()
    assert x.grad[1].abs().sum() > 0 and not x.grad[[0, 2, 3]].any()


def test_all_ignored_batch_is_zero_loss_and_zero_grad():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets = torch.full((2, 3), -100)
    ref = torch.full((2, 3), float("nan"))
    loss_fn = cggr_torch.CGGRLoss(scoring="excess")
    loss = loss_fn(logits, targets, reference_nll=ref)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not logits.grad.any()
    m = loss_fn.get_metrics()
    assert (m["tokens_total"], m["tokens_selected"], m["tokens_nonfinite"]) == (0, 0, 0)


def test_difficulty_from_statistics_excess():
    rng = np.random.default_rng(4)
    logits, targets = random_logits(rng, (5, 9)), random_targets(rng, (5,), 9, p_ignore=0.0)
    stats = token_statistics(logits, targets)
    ref = torch.tensor([0.5, float("nan"), 1.0, float("inf"), 2.0])
    d = difficulty_from_statistics(stats, "excess", reference_nll=ref)
    np.testing.assert_array_equal(d.numpy()[[0, 2, 4]], (stats.nll - ref).numpy()[[0, 2, 4]])
    assert torch.isnan(d[[1, 3]]).all()   # not a rankable number: never eligible


def test_fused_path_routes_excess_to_the_composable_path():
    x = torch.zeros(3, 4)
    with dispatch.force("kernel"):
        assert dispatch.use_fused_loss(x, "combined")
        assert not dispatch.use_fused_loss(x, "excess")
        assert dispatch.use_kernels(x)


def test_excess_under_forced_kernels_takes_the_composable_path():
    # CPU tensors under force("kernel") run the Triton interpreter: the scoring kernel computes the statistics,
    # the subtraction follows, and the fused plan (select_from_scores) is never called for excess.
    pytest.importorskip("triton")
    dev = kernel_test_device()   # compiled kernels (a GPU) need CUDA tensors
    rng = np.random.default_rng(21)
    logits, targets = random_logits(rng, (2, 5, 17)), random_targets(rng, (2, 5), 17)
    ref = reference_for(rng, (2, 5), "float32")
    cfg = dict(scoring="excess", warmup_steps=0, min_tokens_ratio=0.4)
    expected, exp_metrics = cggr_torch.cggr_loss(logits, targets, 0, reference_nll=ref, **cfg)
    with dispatch.force("kernel") as log:
        got, metrics = cggr_torch.cggr_loss(logits.to(dev), targets.to(dev), 0, reference_nll=ref.to(dev), **cfg)
    assert log.calls["token_statistics_triton"] == 1 and log.calls["select_from_scores"] == 0
    assert int(metrics["tokens_selected"]) == int(exp_metrics["tokens_selected"])
    np.testing.assert_allclose(float(got.detach()), float(expected.detach()), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def _args():
    rng = np.random.default_rng(8)
    return random_logits(rng, (2, 3, 5)), random_targets(rng, (2, 3), 5)


def test_missing_reference_names_it():
    logits, targets = _args()
    for call in (lambda: score_tokens(logits, targets, scoring="excess"),
                 lambda: cggr_torch.cggr_loss(logits, targets, 0, scoring="excess"),
                 lambda: cggr_torch.CGGRLoss(scoring="excess")(logits, targets)):
        with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs .*\(2, 3\)"):
            call()


def test_reference_with_another_scoring_is_refused():
    logits, targets = _args()
    ref = torch.zeros(2, 3)
    for call in (lambda: score_tokens(logits, targets, scoring="loss", reference_nll=ref),
                 lambda: cggr_torch.cggr_loss(logits, targets, 0, reference_nll=ref),
                 lambda: cggr_torch.CGGRLoss(scoring="entropy")(logits, targets, reference_nll=ref)):
        with pytest.raises(ValueError,
                           match=r"reference_nll: only scoring='excess'.*scoring='(loss|combined|entropy)'"):
            call()


def test_wrong_shape_dtype_and_type_name_reference_nll():
    logits, targets = _args()
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 3\).*got \(3, 2\)"):
        cggr_torch.CGGRLoss(scoring="excess")(logits, targets, reference_nll=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 3\).*got \(6,\)"):
        score_tokens(logits, targets, scoring="excess", reference_nll=torch.zeros(6))
    with pytest.raises(ValueError, match="reference_nll: expected a floating dtype"):
        score_tokens(logits, targets, scoring="excess", reference_nll=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="reference_nll: expected a floating tensor"):
        score_tokens(logits, targets, scoring="excess", reference_nll=[[0.0] * 3] * 2)
    with pytest.raises(ValueError, match="targets: scoring='excess' needs targets"):
        score_tokens(logits, None, scoring="excess", reference_nll=torch.zeros(2, 3))


def test_score_next_tokens_points_to_the_sequence_reference():
    # The fused LM head, the distributed loss (tests/torch/test_excess_heads.py) and batch splitting
    # (tests/torch/test_split_excess.py) take reference_nll; the router's token scorer leaves it to its caller.
    with pytest.raises(ValueError, match="apply_sequence_reference"):
        cggr_torch.scoring.score_next_tokens(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), None,
                                             scoring="excess", ignore_index=-100)


def test_cggr_model_takes_excess_with_a_reference_and_the_scorer_refuses_it():
    # batch splitting takes reference_nll (SPEC §9.1; tests/torch/test_split_excess.py): a missing one names it
    model = torch.nn.Linear(2, 2)
    cggr = cggr_torch.CGGRModel(model, cggr_torch.PassthroughRouter(model), scoring="excess")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reference_nll: scoring='excess' needs the reference model's loss"):
        cggr(ids, labels=ids)
    # the scorer's routing mask has no reference: refused at construction
    with pytest.raises(ValueError, match="not supported by CGGRScorer"):
        cggr_torch.CGGRScorer(cggr_torch.PassthroughRouter(model), scoring="excess")
