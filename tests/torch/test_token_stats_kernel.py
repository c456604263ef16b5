"""``cggr_torch.token_stats``'s kernel forward (the fused head's statistics op, SPEC §14.1 with temperature 1 and
no soft-cap) against the float64 oracle and against the PyTorch block path of the same call.

Runs in the Triton interpreter on CPU tensors (tests/conftest.py), or compiled on CUDA when a GPU is present.
Odd shapes (N = 37, d = 23, V = 301) with chunks that divide neither N nor V; NaN hidden rows, ``-inf`` and
``+inf`` logits, a target whose logit is ``-inf``, ignored and all-ignored targets; the three input dtypes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cggr_torch import dispatch, fused_linear_token_stats  # noqa: E402
from cggr_torch import token_stats as ts  # noqa: E402
from cggr_torch.policy_gradient import policy_gradient_loss  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import as_f64, head_inputs, kernel_test_device  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DEVICE = kernel_test_device()
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# As tests/torch/test_token_stats.py: SPEC §11 on the logits the blocks compute in the inputs' dtype.
STAT_TOL = {"float32": (1e-4, 1e-5), "float16": (2e-3, 1e-3), "bfloat16": (2e-2, 1e-2)}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)


def _inputs(seed, dtype, **kw):
    return head_inputs(seed, dtype, DEVICE, **kw)


def _np(x):
    return x.detach().cpu().double().numpy()


def _no_blocks(monkeypatch):
    """Under the kernel path the PyTorch block statistics must not run at all."""
    def boom(*args, **kwargs):
        raise AssertionError("the PyTorch block statistics ran on the kernel path")
    monkeypatch.setattr(ts, "_block_statistics", boom)


@pytest.mark.parametrize("dtype", list(DT))
def test_kernel_forward_matches_the_oracle_and_the_blocks(dtype, monkeypatch):
    h, w, b, t = _inputs(1, DT[dtype])
    with dispatch.force("reference"):
        ref_out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    _no_blocks(monkeypatch)
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    orc = oracle.token_stats(as_f64(F.linear(h, w, b).cpu()), t.cpu().numpy())
    assert out.finite.all()
    tol = STAT_TOL[dtype]
    for name in ("logprob", "entropy", "lse"):
        np.testing.assert_allclose(_np(getattr(out, name)), orc[name], atol=tol[0], rtol=tol[1], err_msg=name)
        np.testing.assert_allclose(_np(getattr(out, name)), _np(getattr(ref_out, name)), atol=tol[0],
                                   rtol=tol[1], err_msg=f"{name} vs blocks")
    for field in ("confidence", "runner_up", "nll"):
        np.testing.assert_allclose(_np(getattr(out.statistics, field)), _np(getattr(ref_out.statistics, field)),
                                   atol=tol[0], rtol=tol[1], err_msg=field)
    assert (out.logprob[t == -100] == 0).all()
    for x in (out.logprob, out.entropy, out.lse):
        assert x.dtype == torch.float32 and tuple(x.shape) == (37,)


@pytest.mark.parametrize("dtype", list(DT))
def test_kernel_forward_gradients_match_the_blocks(dtype, monkeypatch):
    h, w, b, t = _inputs(2, DT[dtype])
    g = torch.Generator().manual_seed(0)
    g_lp = torch.randn(37, generator=g).to(DEVICE)
    g_h = torch.randn(37, generator=g).to(DEVICE)

    def grads(mode):
        leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
        with dispatch.force(mode):
            out = fused_linear_token_stats(*leaves[:2], t, leaves[2], **CHUNKS)
        ((out.logprob * g_lp).sum() + (out.entropy * g_h).sum()).backward()
        return [x.grad for x in leaves]

    expected = grads("reference")
    _no_blocks(monkeypatch)
    actual = grads("kernel")
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        scale = max(1e-30, float(e.abs().max()))
        err = float((a.double() - e.double()).abs().max())
        assert err <= GRAD_TOL[dtype] * scale, f"{name}: {err:.3g} > {GRAD_TOL[dtype]} x {scale:.3g}"


def test_kernel_forward_non_finite_rows(monkeypatch):
    h, w, b, t = _inputs(3, torch.float32)
    h, b, t = h.clone(), b.clone(), t.clone()
    h[4] = math.nan
    h[8, 0] = math.inf
    b[5] = -math.inf
    t[6], t[7] = 5, 11              # row 6's target logit is -inf: not finite; row 7 is fine (p = 0 elsewhere)
    with dispatch.force("reference"):
        ref_out = fused_linear_token_stats(h, w, t, b, **CHUNKS)
    _no_blocks(monkeypatch)
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(*leaves[:2], t, leaves[2], **CHUNKS)
    assert torch.equal(out.finite, ref_out.finite)
    assert not out.finite[4] and not out.finite[6] and not out.finite[8] and out.finite[7]
    for name in ("logprob", "entropy", "lse"):
        a, e = getattr(out, name), getattr(ref_out, name)
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        np.testing.assert_allclose(_np(a)[_np(out.finite) > 0], _np(e)[_np(out.finite) > 0], atol=1e-4, rtol=1e-5)
    assert torch.isnan(out.statistics.lse[4]) and torch.isnan(out.statistics.entropy[6])
    loss = torch.where(out.finite, out.logprob + out.entropy, torch.zeros((), device=DEVICE))
    (loss.sum() + (out.logprob * 0).nan_to_num().sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert (leaves[0].grad[4] == 0).all() and (leaves[0].grad[6] == 0).all() and (leaves[0].grad[8] == 0).all()
    b2 = b.clone()
    b2[9] = math.inf                # +inf logit in every row: no row is finite
    with dispatch.force("kernel"):
        assert not fused_linear_token_stats(h, w, t, b2, **CHUNKS).finite.any()


def test_kernel_forward_all_ignored_and_default_plan(monkeypatch):
    h, w, b, t = _inputs(4, torch.bfloat16)
    _no_blocks(monkeypatch)
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(h, w, torch.full_like(t, -100), b)
        full = fused_linear_token_stats(h.reshape(1, 37, -1), w, t.reshape(1, 37), None)
    assert (out.logprob == 0).all() and out.finite.all() and torch.isfinite(out.entropy).all()
    assert tuple(full.logprob.shape) == (1, 37)


def test_a_transform_keeps_the_blocks(monkeypatch):
    """Temperature or soft-cap: the kernel has no transform, so the PyTorch blocks run even under the kernels."""
    h, w, b, t = _inputs(5, torch.float32)
    calls = []
    real = ts._block_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(ts, "_block_statistics", counting)
    with dispatch.force("kernel"):
        out = fused_linear_token_stats(h, w, t, b, temperature=0.7, **CHUNKS)
        capped = fused_linear_token_stats(h, w, t, b, softcap=3.0, **CHUNKS)
    assert len(calls) >= 2
    orc = oracle.token_stats(as_f64(F.linear(h, w, b).cpu()), t.cpu().numpy(), temperature=0.7)
    np.testing.assert_allclose(_np(out.logprob), orc["logprob"], atol=1e-4, rtol=1e-5)
    assert capped.finite.all()


def test_policy_gradient_loss_on_the_kernel_forward(monkeypatch):
    """The policy-gradient loss reads its statistics through the same forward: equal loss and gradients."""
    h, w, _, t = _inputs(6, torch.float32, p_ignore=0.0)
    rng = np.random.default_rng(0)
    adv = torch.from_numpy(rng.standard_normal(37).astype(np.float32)).to(DEVICE)
    old = torch.from_numpy(-rng.uniform(0.5, 6.0, 37).astype(np.float32)).to(DEVICE)

    def run(mode):
        hl, wl = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        with dispatch.force(mode):
            out = policy_gradient_loss(hl, wl, t, adv, old)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach(), hl.grad, wl.grad

    ref = run("reference")
    _no_blocks(monkeypatch)
    got = run("kernel")
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, e in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, e, atol=2e-5 * float(e.abs().max()), rtol=0)
