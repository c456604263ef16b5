"""``selection='sampled'`` (SPEC §7.4, §8, §10) in ``cggr_torch`` against the float64 oracle.

The sampler is compared with ``tests/oracle.py`` (π within ``oracle.PI_RTOL``, the draws ``u`` bit-exact,
masks identical outside the band ``|u − π| ≤ PI_RTOL·π``), the loss and gradient with the oracle's
Horvitz–Thompson loss, and the estimator's unbiasedness with a tolerance derived from its variance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cggr import CGGRConfig
from cggr_torch import CGGRLoss, cggr_loss, dispatch
from cggr_torch.pipeline import effective_sample_size
from cggr_torch.scoring import score_tokens
from cggr_torch.selection import sample_tokens, sampling_probabilities, select_tokens, uniform_hash
from tests import oracle
from tests.torch import DTYPES, as_f64, kernel_test_device, random_logits, random_targets

PI_RTOL = oracle.PI_RTOL
GRAD_TOL = {"float32": (1e-5, 1e-4), "float16": (1e-5, 2e-3), "bfloat16": (1e-5, 1.6e-2)}
PARAMS = [(1.0, 0.1), (0.0, 0.1), (2.0, 0.0), (1.0, 1.0), (0.5, 0.3), (3.0, 0.05)]


def _band_equal(mask: np.ndarray, mask_ref: np.ndarray, u: np.ndarray, pi_ref: np.ndarray) -> None:
    """Masks identical except where the draw lies within PI_RTOL·π of the boundary (SPEC §11)."""
    differ = mask != mask_ref
    assert not (differ & ~(np.abs(u - pi_ref) <= PI_RTOL * pi_ref + 1e-12)).any()


# ------------------------------------------------------------------------------------------------ draws
def test_uniform_hash_is_the_oracle_bit_for_bit():
    idx = torch.arange(0, 5000, dtype=torch.int64)
    for seed, step in [(0, 0), (1, 0), (0, 1), (12345, 987), (2**32 - 1, 2**33 + 5)]:
        u = uniform_hash(seed, step, idx).numpy()
        ref = np.array([oracle.uniform_hash(seed, step, i) for i in range(5000)])
        np.testing.assert_array_equal(u.astype(np.float64), ref)
        assert u.dtype == np.float32 and (u > 0).all() and (u < 1).all()
    # A tensor step gives the same bits; the draws look uniform (mean and spread of 5000 draws).
    u = uniform_hash(7, torch.tensor(3), idx).numpy()
    np.testing.assert_array_equal(u, uniform_hash(7, 3, idx).numpy())
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / 5000)
    assert abs((u < 0.25).mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 5000)


# ------------------------------------------------------------------------------------------- π vs oracle
@pytest.mark.parametrize("shape", [(37,), (5, 7), (1, 13), (3, 1)])
@pytest.mark.parametrize("power, mix", PARAMS)
def test_probabilities_match_the_oracle(shape, power, mix):
    rng = np.random.default_rng(hash((shape, power, mix)) % 2**32)
    for _ in range(4):
        d = (rng.standard_normal(shape) * rng.uniform(0.1, 5)).astype(np.float32)
        d[rng.random(shape) < 0.1] = np.nan
        e = rng.random(shape) < rng.uniform(0.3, 1.0)
        n = int((e & ~np.isnan(d)).sum())
        k = int(rng.integers(0, n + 2))
        pi = sampling_probabilities(torch.tensor(d), torch.tensor(e), k, power=power, uniform_mix=mix)
        ref = oracle.sampling_probabilities(d, e, k, power, mix)
        assert pi.dtype == torch.float32 and tuple(pi.shape) == shape
        np.testing.assert_allclose(pi.numpy(), ref, rtol=PI_RTOL, atol=1e-9)
        assert (pi.numpy()[~(e & ~np.isnan(d))] == 0).all()
        assert ((pi >= 0) & (pi <= 1)).all()
        assert abs(float(pi.double().sum()) - min(k, n)) <= 1e-5 * max(k, 1) + 1e-5


def test_probabilities_edge_cases():
    d = torch.tensor([3.0, -1.0, 0.5, np.inf, -np.inf, 2.0, 7.0, 1e-30])
    e = torch.ones(8, dtype=torch.bool)
    # β = 0 and λ = 1: uniform, π = k/n
    for kw in (dict(power=0.0), dict(uniform_mix=1.0)):
        pi = sampling_probabilities(d, e, 3, **kw)
        np.testing.assert_allclose(pi.numpy(), 3 / 8, rtol=1e-6)
    # k = 0 → nothing; k = n → everything with π = 1; k > n counts as n
    assert not sampling_probabilities(d, e, 0).any()
    assert (sampling_probabilities(d, e, 8) == 1).all() and (sampling_probabilities(d, e, 50) == 1).all()
    # ±inf difficulties stay finite (b clamps at FLT_MAX): the +inf token is capped, the others are λ/n-ish
    pi = sampling_probabilities(d, e, 2)
    assert torch.isfinite(pi).all() and float(pi[3]) == 1.0
    np.testing.assert_allclose(pi.numpy(), oracle.sampling_probabilities(d.numpy(), e.numpy(), 2), rtol=PI_RTOL)
    # empty input and nothing eligible
    assert sampling_probabilities(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 3).shape == (0,)
    assert not sampling_probabilities(d, torch.zeros(8, dtype=torch.bool), 3).any()
    # a k tensor on the device gives the same π
    np.testing.assert_array_equal(sampling_probabilities(d, e, torch.tensor(3)).numpy(),
                                  sampling_probabilities(d, e, 3).numpy())


@pytest.mark.parametrize("shape", [(41,), (6, 9)])
def test_sample_tokens_match_the_oracle(shape):
    rng = np.random.default_rng(3)
    for trial in range(12):
        d = (rng.standard_normal(shape) * 3).astype(np.float32)
        e = rng.random(shape) < 0.8
        ratio = np.float32(rng.uniform(0.05, 1.0))
        power, mix = PARAMS[trial % len(PARAMS)]
        seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 10**6))
        mask, w, k = sample_tokens(torch.tensor(d), torch.tensor(e), float(ratio), step=step, seed=seed,
                                   power=power, uniform_mix=mix)
        m_o, w_o, k_o, pi_o, u_o = oracle.sample_tokens(d, e, ratio, step, seed, power, mix)
        assert int(k) == k_o and k.dtype == torch.int32
        _band_equal(mask.numpy(), m_o, u_o, pi_o)
        both = mask.numpy() & m_o
        np.testing.assert_allclose(w.numpy()[both], w_o[both], rtol=PI_RTOL)
        assert (w.numpy()[~mask.numpy()] == 0).all() and (w.numpy()[mask.numpy()] >= 1).all()
        # select_tokens gives the same mask
        m2, k2 = select_tokens(torch.tensor(d), torch.tensor(e), float(ratio), selection="sampled", step=step,
                               seed=seed, power=power, uniform_mix=mix)
        assert torch.equal(m2, mask) and int(k2) == int(k)


def test_effective_sample_size():
    assert float(effective_sample_size(torch.zeros(5))) == 0.0
    assert float(effective_sample_size(torch.tensor([1.0, 1.0, 0.0, 1.0]))) == 3.0
    w = np.array([2.0, 1.0, 4.0, 0.0])
    assert float(effective_sample_size(torch.tensor(w, dtype=torch.float32))) == pytest.approx(
        oracle.sample_ess(w), rel=1e-6)


# ----------------------------------------------------------------------------------------------- the loss
def _run(logits, targets, step, **cfg):
    x = logits.detach().clone().requires_grad_(True)
    loss, metrics = cggr_loss(x, targets, step, **cfg)
    loss.backward()
    return x, loss, metrics


@pytest.mark.parametrize("mode", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 7, 11), (29, 5)])
def test_loss_matches_the_oracle(mode, dtype, shape):
    dev = kernel_test_device() if mode == "kernel" else "cpu"   # compiled kernels (a GPU) need CUDA tensors
    rng = np.random.default_rng(len(shape) * 7 + len(dtype))
    V = shape[-1]
    logits = random_logits(rng, shape, DTYPES[dtype])
    targets = random_targets(rng, shape[:-1], V)
    if len(shape) == 3:
        logits[1, 2, 3] = float("nan")          # a non-finite row: never selected, counted
        logits[2, 0, :] = float("inf")
    cfg = dict(selection="sampled", warmup_steps=10, sample_seed=11, sample_power=1.5, sample_uniform_mix=0.2)
    with dispatch.force(mode) as log:
        x, loss, met = _run(logits.to(dev), targets.to(dev), 4, **cfg)
    if mode == "kernel":
        assert log.calls["select_from_scores"] == 0            # the fused sampled path, not the top-k one
        assert log.calls["sample_from_scores"] == 1
    d = score_tokens(logits, targets).difficulty.numpy()
    ref = oracle.cggr_loss(as_f64(logits), targets.numpy(), 4, difficulty_override=d, **cfg)
    mask = torch.isfinite(x.grad).all(-1).cpu().numpy()  # sanity: the gradient is finite everywhere
    assert mask.all()
    assert int(met["tokens_selected"]) == int(ref["mask"].sum())
    assert int(met["tokens_total"]) == ref["metrics"]["tokens_total"]
    assert int(met["tokens_nonfinite"]) == ref["metrics"]["tokens_nonfinite"]
    assert float(met["sample_ess"]) == pytest.approx(ref["metrics"]["sample_ess"], rel=1e-4)
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)
    atol, rtol = GRAD_TOL[dtype]
    np.testing.assert_allclose(x.grad.float().cpu().numpy(), ref["grad"], atol=atol, rtol=rtol)
    assert x.grad.dtype == DTYPES[dtype]


@pytest.mark.parametrize("mode", ["reference", "kernel"])
def test_all_ignored_and_empty(mode):
    dev = kernel_test_device() if mode == "kernel" else "cpu"
    with dispatch.force(mode):
        for logits, targets in [(torch.randn(4, 6, 5), torch.full((4, 6), -100)),
                                (torch.randn(0, 5), torch.zeros(0, dtype=torch.int64)),
                                (torch.full((3, 5), float("nan")), torch.zeros(3, dtype=torch.int64))]:
            x, loss, met = _run(logits.to(dev), targets.to(dev), 0, selection="sampled")
            assert float(loss) == 0.0 and not x.grad.any() and int(met["tokens_selected"]) == 0
            assert float(met["sample_ess"]) == 0.0


def test_metrics_and_get_metrics():
    rng = np.random.default_rng(5)
    logits, targets = random_logits(rng, (4, 9, 7)), random_targets(rng, (4, 9), 7)
    crit = CGGRLoss(selection="sampled", warmup_steps=0, min_tokens_ratio=0.3, sample_seed=3)
    assert crit.get_metrics()["sample_ess"] == 0.0
    crit(logits, targets)
    m = crit.get_metrics()
    assert m["selection"] == "sampled" and isinstance(m["sample_ess"], float)
    assert 0 < m["sample_ess"] <= m["tokens_selected"]
    # an unweighted strategy reports its count
    crit2 = CGGRLoss(selection="topk")
    crit2(logits, targets)
    m2 = crit2.get_metrics()
    assert m2["sample_ess"] == float(m2["tokens_selected"])


def test_the_draw_depends_on_step_and_seed():
    """Same (seed, step): the same draw (also through CGGRLoss's held step); another step or seed: another."""
    rng = np.random.default_rng(8)
    logits, targets = random_logits(rng, (64, 9)), random_targets(rng, (64,), 9, p_ignore=0.0)
    d = score_tokens(logits, targets).difficulty
    e = torch.ones(64, dtype=torch.bool)
    m00 = sample_tokens(d, e, 0.3, step=0, seed=0)[0]
    assert not torch.equal(m00, sample_tokens(d, e, 0.3, step=1, seed=0)[0])
    assert not torch.equal(m00, sample_tokens(d, e, 0.3, step=0, seed=1)[0])
    assert torch.equal(m00, sample_tokens(d, e, 0.3, step=0, seed=0)[0])
    crit = CGGRLoss(selection="sampled", warmup_steps=0, min_tokens_ratio=0.3, dynamic_threshold=False,
                    sample_seed=4)
    crit.set_step(7)
    crit(logits, targets)
    m_ref = sample_tokens(d, e, 0.3, step=7, seed=4)[0]
    assert crit.get_metrics()["tokens_selected"] == int(m_ref.sum())


# --------------------------------------------------------------------------------------------- unbiasedness
def test_unbiased_loss_and_gradient():
    """E[loss] = full-batch mean CE and E[grad] = full-batch mean gradient (SPEC §7.4, §8).

    Over S independent-looking draws (steps 0..S−1, the curriculum switched off so k is fixed) the sample mean
    of the Horvitz–Thompson loss has variance Var/S with Var = Σ_i ce_i²·(1 − π_i)/π_i / n² (independent
    inclusions); we require |mean − full| ≤ 5·sqrt(Var/S) + 1e-5 (5 sigma). The gradient element (i, j)
    has Var_ij = g_ij²·(1 − π_i)/π_i with g the full-batch gradient row times n; every element must lie
    within 6 sigma (about 200 elements: the largest of that many normals is ~3 sigma).
    """
    rng = np.random.default_rng(21)
    N, V = 40, 5
    logits = random_logits(rng, (N, V))
    targets = random_targets(rng, (N,), V, p_ignore=0.1)
    valid = targets.numpy() != -100
    n = int(valid.sum())
    full = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    full_mean = float(full.sum()) / n
    x = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x, targets, ignore_index=-100, reduction="sum").div(n).backward()
    full_grad = x.grad.numpy()
    cfg = dict(selection="sampled", warmup_steps=0, min_tokens_ratio=0.25, dynamic_threshold=False,
               sample_power=1.0, sample_uniform_mix=0.1)
    d = score_tokens(logits, targets).difficulty
    k = oracle.num_selected(n, np.float32(0.25))
    pi = sampling_probabilities(d, torch.tensor(valid), k).double().numpy()
    S = 600
    losses, grads = [], []
    for step in range(S):
        x, loss, _ = _run(logits, targets, step, **cfg)
        losses.append(float(loss))
        grads.append(x.grad.double().numpy())
    ce = full.detach().double().numpy()
    var = float((ce[valid] ** 2 * (1 - pi[valid]) / pi[valid]).sum()) / n**2
    assert abs(np.mean(losses) - full_mean) <= 5 * math.sqrt(var / S) + 1e-5
    g_var = (full_grad.astype(np.float64) ** 2) * np.where(valid, (1 - pi) / np.where(valid, pi, 1), 0)[:, None]
    sd = np.sqrt(g_var / S)
    err = np.abs(np.mean(grads, axis=0) - full_grad)
    assert (err <= 6 * sd + 1e-6).all()


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field, value", [("sample_power", -0.5), ("sample_power", float("inf")),
                                          ("sample_power", "1"), ("sample_uniform_mix", 1.5),
                                          ("sample_uniform_mix", -0.1), ("sample_floor", 0.0),
                                          ("sample_floor", float("nan")), ("sample_seed", -1),
                                          ("sample_seed", 2**32), ("sample_seed", 1.5), ("sample_seed", True)])
def test_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        CGGRLoss(selection="sampled", **{field: value})
    with pytest.raises(ValueError, match=field):
        cggr_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 0, selection="sampled", **{field: value})


def test_bad_function_arguments():
    d, e = torch.randn(6), torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="power"):
        sampling_probabilities(d, e, 2, power=-1.0)
    with pytest.raises(ValueError, match="uniform_mix"):
        sample_tokens(d, e, 0.5, uniform_mix=2.0)
    with pytest.raises(ValueError, match="floor"):
        sample_tokens(d, e, 0.5, floor=0.0)
    with pytest.raises(ValueError, match="seed"):
        sample_tokens(d, e, 0.5, seed=-3)
    with pytest.raises(ValueError, match="k"):
        sampling_probabilities(d, e, -1)
    with pytest.raises(ValueError, match="ratio"):
        sample_tokens(d, e, 0.0)
    with pytest.raises(ValueError, match="step"):
        sample_tokens(d, e, 0.5, step=-1)
    with pytest.raises(ValueError, match="index"):
        uniform_hash(0, 0, torch.zeros(3))
    with pytest.raises(ValueError, match="difficulty"):
        sample_tokens(torch.arange(6), e, 0.5)


def test_entry_points_without_weights_refuse_sampled():
    from cggr_torch.distributed import DistributedCGGRLoss
    from cggr_torch.fused_linear import FusedLinearCGGRLoss
    with pytest.raises(ValueError, match="not supported yet by FusedLinearCGGRLoss"):
        FusedLinearCGGRLoss(selection="sampled")
    with pytest.raises(ValueError, match="not supported yet by DistributedCGGRLoss"):
        DistributedCGGRLoss(selection="sampled")
    assert CGGRConfig(selection="sampled").for_sequences().selection == "sampled"   # SPEC §9.2
