"""The ρ = 1 policy gradient in one pass over the LM head (``cggr_torch.token_stats_one_pass``,
three GEMMs instead of four) against the two-pass path of the same call (statistics, then the recomputing
backward) and against the pure PyTorch reference.

Runs in the Triton interpreter on CPU tensors (tests/conftest.py), or compiled on CUDA when a GPU is present.
Odd shapes (B = 3 sequences × T = 13, d = 23, V = 301), row blocks that divide neither; ignored targets,
non-finite advantages, a NaN hidden row, an all-ignored batch; clipping active, the KL term, a bias; which
path runs is asserted, not assumed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cggr_torch import dispatch  # noqa: E402
from cggr_torch import policy_gradient as pgm  # noqa: E402
from cggr_torch import token_stats_one_pass as ts  # noqa: E402
from cggr_torch.policy_gradient import PolicyGradientLoss, policy_gradient_loss  # noqa: E402
from tests.torch import kernel_test_device  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DEVICE = kernel_test_device()
B, T, D, V = 3, 13, 23, 301
TOL = {torch.float32: 3e-5, torch.bfloat16: 3e-2}


def _case(seed, dtype=torch.float32, bias=True):
    rng = np.random.default_rng(seed)
    h = torch.from_numpy((rng.standard_normal((B, T, D)) * 1.5).astype(np.float32)).to(dtype).to(DEVICE)
    w = torch.from_numpy((rng.standard_normal((V, D)) / np.sqrt(D) * 2).astype(np.float32)).to(dtype).to(DEVICE)
    b = torch.from_numpy((rng.standard_normal(V) * 0.3).astype(np.float32)).to(dtype).to(DEVICE) if bias else None
    t = rng.integers(0, V, size=(B, T))
    t[:, :3] = -100                                  # prompt positions
    t[rng.random((B, T)) < 0.1] = -100
    adv = torch.from_numpy(rng.standard_normal(B).astype(np.float32)).to(DEVICE)
    # old log-probs around the true ones, some far enough for the clip to be active
    old = torch.from_numpy(-rng.uniform(3.0, 8.0, (B, T)).astype(np.float32)).to(DEVICE)
    ref = torch.from_numpy(-rng.uniform(3.0, 8.0, (B, T)).astype(np.float32)).to(DEVICE)
    return h, w, b, torch.from_numpy(t).to(DEVICE), adv, old, ref


def _run(mode, h, w, b, t, adv, old=None, ref=None, *, grad_scale=1.0, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    kw.setdefault("min_tokens_ratio", 1.0)
    with dispatch.force(mode) as log:
        out = policy_gradient_loss(leaves[0], leaves[1], t, adv, old, ref, leaves[2], **kw)
        (out.loss * grad_scale).backward()
    return out, [None if x is None else x.grad for x in leaves], log


def _forbid(monkeypatch, module, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} ran")
    monkeypatch.setattr(module, name, boom)


def _close(a, e, tol, what):
    scale = max(1e-30, float(e.abs().max()))
    err = float((a.double() - e.double()).abs().max())
    assert err <= tol * scale, f"{what}: {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["on_policy", "clipped_kl", "token_mean_stratified"])
def test_one_pass_equals_the_two_pass_path_and_the_reference(variant, dtype, monkeypatch):
    h, w, b, t, adv, old, ref = _case(1, dtype)
    kw = {}
    args = (None, None)
    if variant == "clipped_kl":
        args = (old, ref)
        kw = dict(beta=0.05, epsilon_low=0.2, epsilon_high=0.28)
        # per-token advantages of both signs: with r far from 1 the clip is active where r·A > clip(r)·A
        adv = torch.linspace(-1.0, 1.0, B * T, device=DEVICE).reshape(B, T)
    if variant == "token_mean_stratified":
        kw = dict(loss_type="token-mean", selection="stratified", num_strata=3)
    expected, e_grads, _ = _run("reference", h, w, b, t, adv, *args, **kw)
    two_pass = None
    if dtype == torch.float32:       # the kernel's two-pass path (ratio just below 1 keeps it): float32 only
        with monkeypatch.context() as m:
            _forbid(m, pgm, "token_stats_with_gradient")
            two_pass, tp_grads, _ = _run("kernel", h, w, b, t, adv, *args, min_tokens_ratio=0.999, **kw)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    _forbid(monkeypatch, pgm, "fused_linear_statistics")
    got, grads, log = _run("kernel", h, w, b, t, adv, *args, row_chunk_size=16, **kw)
    assert log.calls["launch_token_stats_gradient"] == math.ceil(B * T / 16)
    assert torch.equal(got.mask, expected.mask)
    assert got.mask.sum() == ((t != -100)).sum()     # every eligible token kept
    torch.testing.assert_close(got.loss.detach(), expected.loss.detach(), atol=1e-5, rtol=2e-3 if
                               dtype == torch.bfloat16 else 1e-5)
    for k in expected.metrics:
        torch.testing.assert_close(got.metrics[k].float(), expected.metrics[k].float(), atol=1e-5, rtol=2e-3,
                                   msg=k)
    if variant == "clipped_kl":
        assert 0 < float(got.metrics["clip_fraction"]) < 1 and float(got.metrics["kl"]) > 0
    for name, a, e in zip(("hidden", "weight", "bias"), grads, e_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        _close(a, e, TOL[dtype], name)
    if two_pass is not None:
        torch.testing.assert_close(got.loss.detach(), two_pass.loss.detach(), atol=1e-6, rtol=1e-6)
        for name, a, e in zip(("hidden", "weight", "bias"), grads, tp_grads):
            _close(a, e, 2e-5, f"{name} vs the two-pass path")


def test_non_finite_rows_and_grad_scale(monkeypatch):
    h, w, b, t, adv, old, ref = _case(2)
    h = h.clone()
    h[1, 5] = math.nan                                   # a non-finite hidden row: not eligible, zero gradient
    adv_tok = adv[:, None].expand(B, T).clone()
    adv_tok[2, 7] = math.inf                             # a non-finite advantage: not eligible
    t = t.clone()
    t[1, 5], t[2, 7] = 4, 9
    expected, e_grads, _ = _run("reference", h, w, b, t, adv_tok, grad_scale=2.5)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    got, grads, _ = _run("kernel", h, w, b, t, adv_tok, grad_scale=2.5, row_chunk_size=7)
    assert not got.mask[1, 5] and not got.mask[2, 7]
    torch.testing.assert_close(got.loss.detach(), expected.loss.detach(), atol=1e-6, rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1, 5] == 0).all()
    for name, a, e in zip(("hidden", "weight", "bias"), grads, e_grads):
        _close(a, e, 3e-5, name)
    assert torch.isnan(got.entropy[1, 5]) and float(got.metrics["tokens_nonfinite"]) >= 2


def test_all_ignored_batch_is_a_zero_loss_with_zero_gradients(monkeypatch):
    h, w, b, _, adv, _, _ = _case(3)
    t = torch.full((B, T), -100, device=DEVICE)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    got, grads, _ = _run("kernel", h, w, b, t, adv)
    assert float(got.loss) == 0.0 and not got.mask.any()
    assert all((g == 0).all() for g in grads)


def test_only_the_asked_gradients_and_a_frozen_head(monkeypatch):
    h, w, _, t, adv, _, _ = _case(4, bias=False)
    expected, e_grads, _ = _run("reference", h, w, None, t, adv)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    hl = h.detach().clone().requires_grad_(True)
    with dispatch.force("kernel"):
        out = policy_gradient_loss(hl, w, t, adv, min_tokens_ratio=1.0)      # the head is frozen
        out.loss.backward()
    _close(hl.grad, e_grads[0], 3e-5, "hidden")
    assert w.grad is None


@pytest.mark.parametrize("kw", [dict(loss_type="grpo"), dict(min_tokens_ratio=0.5), dict(temperature=0.7),
                                dict(selection="sequence_aware"), dict(dynamic_threshold=True)])
def test_other_settings_keep_the_two_pass_path(kw, monkeypatch):
    h, w, b, t, adv, _, _ = _case(5)
    _forbid(monkeypatch, pgm, "token_stats_with_gradient")
    kw = {"min_tokens_ratio": 1.0, **kw}
    got, grads, _ = _run("kernel", h, w, b, t, adv, **kw)
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in grads)


def test_no_gradient_keeps_the_statistics_pass(monkeypatch):
    h, w, b, t, adv, _, _ = _case(6)
    _forbid(monkeypatch, pgm, "token_stats_with_gradient")
    with dispatch.force("kernel"), torch.no_grad():
        out = policy_gradient_loss(h, w, t, adv, None, None, b, min_tokens_ratio=1.0)
    assert torch.isfinite(out.loss)


def test_the_module_form_takes_the_one_pass(monkeypatch):
    h, w, b, t, adv, _, _ = _case(7)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    loss_fn = PolicyGradientLoss(min_tokens_ratio=1.0)
    hl = h.detach().clone().requires_grad_(True)
    with dispatch.force("kernel"):
        loss = loss_fn(hl, w, t, adv, bias=b)
        loss.backward()
    assert hl.grad is not None and loss_fn.get_metrics()["tokens_selected"] == int((t != -100).sum())


def test_one_pass_rows_and_availability():
    e, d, Vq = 2, 4096, 151936
    R = ts.one_pass_rows(16384, d, Vq, torch.bfloat16)
    assert ts.ONE_PASS_MEMORY_BUDGET == 2 ** 30                   # the default budget (SPEC §14.4)
    assert R % 128 == 0 and R * (Vq * e + d * e + 64) <= 0.875 * 2 ** 30
    assert (R + 128) * (Vq * e + d * e + 64) > 0.875 * 2 ** 30
    assert ts.one_pass_rows(16384, d, Vq, torch.bfloat16, memory_budget_bytes=2 ** 28) == 640
    assert ts.one_pass_rows(16384, d, Vq, torch.bfloat16, bias=True) <= R
    assert ts.one_pass_rows(5, 8, 11, torch.float32) == 5
    h = torch.zeros((2, 8), device=DEVICE)
    with dispatch.force("reference"):
        assert not ts.one_pass_available(h)
        with pytest.raises(ValueError, match="hidden: token_stats_with_gradient needs a kernel device"):
            ts.token_stats_with_gradient(h, torch.zeros((5, 8), device=DEVICE),
                                         torch.zeros(2, dtype=torch.int64, device=DEVICE), None, None)
    with dispatch.force("kernel"):
        assert ts.one_pass_available(h) and not ts.one_pass_available(h, 0.7) and not ts.one_pass_available(h, 1.0, 5.0)
        assert not ts.one_pass_available(h.double())


def test_a_second_backward_is_refused_clearly():
    h, w, b, t, adv, _, _ = _case(8)
    hl = h.detach().clone().requires_grad_(True)
    with dispatch.force("kernel"):
        out = policy_gradient_loss(hl, w, t, adv, min_tokens_ratio=1.0)
        out.loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            out.loss.backward()


def test_a_row_whose_statistics_turn_non_finite_rescales_exactly(monkeypatch):
    """A finite hidden row whose target logit is -inf (the bias) has non-finite statistics: the pass predicted it
    eligible (D' > D), and the backward's D'/D must still give the reference's gradient."""
    h, w, b, t, adv, _, _ = _case(9)
    b = b.clone()
    b[7] = -math.inf
    t = t.clone()
    t[0, 5], t[2, 9] = 7, 7
    expected, e_grads, _ = _run("reference", h, w, b, t, adv)
    _forbid(monkeypatch, pgm, "token_stats_on_rows")
    got, grads, _ = _run("kernel", h, w, b, t, adv, row_chunk_size=8)
    assert not got.mask[0, 5] and not got.mask[2, 9]
    torch.testing.assert_close(got.loss.detach(), expected.loss.detach(), atol=1e-6, rtol=1e-5)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, e_grads):
        if name == "bias":          # column 7's bias gradient: both paths give 0 there (p = 0)
            e, a = e.nan_to_num(), a.nan_to_num()
        _close(a, e, 3e-5, name)


@pytest.mark.parametrize("budget", [None, 3 * 2 ** 20])
def test_memory_budget_reaches_each_path(budget, monkeypatch):
    """``memory_budget_bytes=None``: 1 GiB for the one pass, 0.25 GiB for the statistics and the recompute at
    ρ < 1 (SPEC §14.4); a caller's budget reaches both."""
    h, w, b, t, adv, _, _ = _case(9)
    seen = {}
    for module, name in ((pgm, "token_stats_with_gradient"), (pgm, "fused_linear_statistics"),
                         (pgm, "token_stats_on_rows")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = kwargs.get("memory_budget_bytes")
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    kw = {} if budget is None else {"memory_budget_bytes": budget}
    _run("kernel", h, w, b, t, adv, **kw)
    _run("kernel", h, w, b, t, adv, min_tokens_ratio=0.5, **kw)
    one, two = (2 ** 30, 2 ** 28) if budget is None else (budget, budget)
    assert seen == {"token_stats_with_gradient": one, "fused_linear_statistics": two, "token_stats_on_rows": two}
