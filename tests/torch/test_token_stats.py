"""``cggr_torch.token_stats`` (SPEC §14.1-§14.4) against the float64 oracle and autograd on materialised logits.

The oracle receives the logits the fused path computes block by block, ``F.linear(hidden, weight, bias)`` in the
inputs' dtype; gradients are compared with ``oracle.token_stats_grad`` chained through ``∂h = G W``,
``∂W = Gᵀ h``, ``∂b = Σ G`` (float64), and with ``torch.autograd`` on float64 materialised logits. Shapes are
odd (N = 37, d = 23, V = 301) with chunk sizes that divide neither N nor V.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cggr_torch import fused_linear_token_stats
from cggr_torch.token_stats import (
    DEFAULT_MEMORY_BUDGET,
    fused_linear_statistics,
    plan_token_stats,
    token_stats_on_rows,
)
from tests import oracle
from tests.torch import as_f64

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (atol, rtol) of the statistics: SPEC §11 for float32 logits; half-precision inputs are upcast exactly, so the
# same holds up to the rounding of the block matmul (one ulp of the logit in the input dtype at most).
STAT_TOL = {"float32": (1e-4, 1e-5), "float16": (2e-3, 1e-3), "bfloat16": (2e-2, 1e-2)}
# Gradients relative to the largest reference entry: the per-logit gradient is rounded to the input dtype
# before the backward matmuls.
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
CHUNKS = dict(row_chunk_size=10, vocab_chunk_size=64)
TRANSFORMS = [(1.0, None), (0.7, None), (1.6, None), (1.0, 3.0), (0.6, 2.0)]


def _inputs(seed, shape, d=23, V=301, dtype=torch.float32, bias=True, p_ignore=0.2):
    rng = np.random.default_rng(seed)
    temps = rng.uniform(0.3, 3.0, size=shape + (1,))
    h = (rng.standard_normal(shape + (d,)) * temps).astype(np.float32)
    w = (rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))).astype(np.float32)
    b = (rng.standard_normal(V) * 0.5).astype(np.float32)
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < p_ignore] = -100
    return (torch.from_numpy(h).to(dtype), torch.from_numpy(w).to(dtype),
            torch.from_numpy(b).to(dtype) if bias else None, torch.from_numpy(t))


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _close(actual, expected, tol, name, where=None):
    a = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if where is not None:
        a, e = a[where], e[where]
    np.testing.assert_allclose(a, e, atol=tol[0], rtol=tol[1], err_msg=name)


def _grad_close(actual, expected, rel, name):
    e = np.asarray(expected, np.float64)
    scale = max(1e-30, float(np.abs(e).max()))
    err = float(np.abs(actual.detach().double().numpy() - e).max())
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("temperature, softcap", TRANSFORMS)
def test_statistics_match_the_oracle(dtype, temperature, softcap):
    h, w, b, t = _inputs(1, (37,), dtype=DT[dtype])
    out = fused_linear_token_stats(h, w, t, b, temperature=temperature, softcap=softcap, **CHUNKS)
    ref = oracle.token_stats(as_f64(F.linear(h, w, b)), t.numpy(), temperature, softcap)
    tol = STAT_TOL[dtype]
    assert out.logprob.dtype == out.entropy.dtype == out.lse.dtype == torch.float32
    np.testing.assert_array_equal(out.finite.numpy(), ref["finite"])
    assert (out.logprob[t == -100] == 0).all()
    _close(out.logprob, ref["logprob"], tol, "logprob")
    _close(out.entropy, ref["entropy"], tol, "entropy")
    _close(out.lse, ref["lse"], tol, "lse")
    for key in ("confidence", "runner_up"):
        _close(getattr(out.statistics, key), ref["stats"][key], (max(1e-5, tol[0] / 10), tol[1]), key)
    _close(out.statistics.nll, np.where(t.numpy() == -100, 0.0, ref["stats"]["nll"]), tol, "nll")


@pytest.mark.parametrize("shape", [(37,), (3, 11)])
def test_three_d_and_default_plan(shape):
    h, w, b, t = _inputs(2, shape)
    out = fused_linear_token_stats(h, w, t, b)
    ref = oracle.token_stats(as_f64(F.linear(h, w, b)), t.numpy())
    assert tuple(out.logprob.shape) == shape
    _close(out.logprob, ref["logprob"], STAT_TOL["float32"], "logprob")
    _close(out.entropy, ref["entropy"], STAT_TOL["float32"], "entropy")
    stats = fused_linear_statistics(h, w, t, b)
    assert torch.equal(stats.entropy, out.statistics.entropy)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("need", [("logprob",), ("entropy",), ("logprob", "entropy")])
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, 2.5)])
def test_gradients_match_the_oracle(dtype, need, temperature, softcap):
    h, w, b, t = _inputs(3, (37,), dtype=DT[dtype])
    rng = np.random.default_rng(4)
    g_lp, g_h = rng.standard_normal(37), rng.standard_normal(37)
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = fused_linear_token_stats(hl, wl, t, bl, need=need, temperature=temperature, softcap=softcap, **CHUNKS)
    assert (out.logprob is None) == ("logprob" not in need) and (out.entropy is None) == ("entropy" not in need)
    total = sum(getattr(out, n) * torch.from_numpy({"logprob": g_lp, "entropy": g_h}[n]).float() for n in need)
    total.sum().backward()
    G = oracle.token_stats_grad(as_f64(F.linear(h, w, b)), t.numpy(), g_lp if "logprob" in need else 0 * g_lp,
                                g_h if "entropy" in need else 0 * g_h, temperature, softcap)
    rel = GRAD_TOL[dtype]
    _grad_close(hl.grad, G @ as_f64(w), rel, "d hidden")
    _grad_close(wl.grad, G.T @ as_f64(h), rel, "d weight")
    _grad_close(bl.grad, G.sum(axis=0), rel, "d bias")
    assert hl.grad.dtype == h.dtype and wl.grad.dtype == w.dtype


def test_gradients_match_autograd_on_materialised_logits():
    """Independent reference: float64 autograd of log_softmax/gather and -Σ p log p of the transformed logits."""
    h, w, b, t = _inputs(5, (2, 13))
    T, cap = 0.8, 4.0
    g_lp, g_h = torch.randn(2, 13, dtype=torch.float64), torch.randn(2, 13, dtype=torch.float64)
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (h, w, b))
    y = cap * torch.tanh(F.linear(h64, w64, b64) / cap) / T
    logp = torch.log_softmax(y, dim=-1)
    has = t != -100
    lp = torch.where(has, logp.gather(-1, t.clamp(min=0)[..., None])[..., 0], torch.zeros((), dtype=torch.float64))
    ent = -(logp.exp() * logp).sum(-1)
    ((lp * g_lp) + (ent * g_h)).sum().backward()
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = fused_linear_token_stats(hl, wl, t, bl, temperature=T, softcap=cap, **CHUNKS)
    ((out.logprob * g_lp.float()) + (out.entropy * g_h.float())).sum().backward()
    _close(out.logprob, lp.detach().numpy(), (1e-5, 1e-5), "logprob")
    _close(out.entropy, ent.detach().numpy(), (1e-5, 1e-5), "entropy")
    for name, a, e in (("hidden", hl, h64), ("weight", wl, w64), ("bias", bl, b64)):
        _grad_close(a.grad, e.grad.numpy(), 2e-5, name)


def test_finite_differences_of_the_entropy():
    h, w, b, t = _inputs(6, (5,), d=4, V=9)
    h, w, b = h.double(), w.double(), b.double()
    hl = _leaf(h.float())
    out = fused_linear_token_stats(hl, w.float(), t, b.float(), temperature=0.9, softcap=2.0)
    out.entropy.sum().backward()

    def f(hh):
        return fused_linear_token_stats(hh.float(), w.float(), t, b.float(), temperature=0.9,
                                        softcap=2.0).entropy.double().sum()

    eps = 1e-2
    for i, j in [(0, 0), (2, 3), (4, 1)]:
        e = torch.zeros_like(h)
        e[i, j] = eps
        fd = (f(h + e) - f(h - e)) / (2 * eps)
        assert abs(float(hl.grad[i, j]) - float(fd)) <= 2e-3 * max(1.0, abs(float(fd)))


def test_ignore_index_and_all_ignored():
    h, w, b, t = _inputs(7, (37,))
    t_all = torch.full_like(t, -7)
    hl, wl = _leaf(h), _leaf(w)
    out = fused_linear_token_stats(hl, wl, t_all, b, ignore_index=-7, **CHUNKS)
    assert (out.logprob == 0).all() and torch.isfinite(out.entropy).all() and out.finite.all()
    (out.logprob * 3.0).sum().backward()          # an upstream gradient on ignored log-probs: no effect
    assert (hl.grad == 0).all() and (wl.grad == 0).all()
    # Ignored rows of a mixed batch contribute nothing through logprob either.
    hl = _leaf(h)
    out = fused_linear_token_stats(hl, w, t, b, need=("logprob",), **CHUNKS)
    out.logprob.sum().backward()
    assert (hl.grad[t == -100] == 0).all() and (hl.grad[t != -100] != 0).any()


def test_empty_input():
    h, w, b, _ = _inputs(8, (37,))
    hl = _leaf(h[:0])
    out = fused_linear_token_stats(hl, w, torch.zeros(0, dtype=torch.long), b)
    assert out.logprob.shape == (0,) and out.entropy.shape == (0,)
    out.logprob.sum().backward()
    assert hl.grad.shape == (0, 23)


def test_non_finite_rows():
    """NaN hidden row; a -inf logit (legal, p = 0) and a target whose logit is -inf; +inf without and with a
    soft-cap (which maps it to the cap: finite)."""
    h, w, b, t = _inputs(9, (37,))
    h = h.clone()
    h[4] = math.nan
    b = b.clone()
    b[5] = -math.inf
    t = t.clone()
    t[6], t[7] = 5, 11
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = fused_linear_token_stats(hl, wl, t, bl, **CHUNKS)
    ref = oracle.token_stats(as_f64(F.linear(h, w, b)), t.numpy())
    np.testing.assert_array_equal(out.finite.numpy(), ref["finite"])
    assert not out.finite[4] and not out.finite[6] and out.finite[7]
    assert math.isnan(out.logprob[6].item()) and math.isnan(out.entropy[4].item()) and math.isnan(out.lse[4].item())
    ok = out.finite.numpy()
    _close(out.entropy, ref["entropy"], STAT_TOL["float32"], "entropy", where=ok)
    loss = torch.where(out.finite, out.logprob + out.entropy, torch.zeros(()))
    # upstream gradients on the NaN rows too: they must still receive exactly zero, and nothing becomes NaN
    (loss.sum() + (out.logprob * 0).nan_to_num().sum()).backward()
    assert torch.isfinite(hl.grad).all() and torch.isfinite(wl.grad).all()
    assert (hl.grad[4] == 0).all() and (hl.grad[6] == 0).all()
    assert torch.isfinite(bl.grad).all() and bl.grad[5] == 0
    b2 = b.clone()
    b2[9] = math.inf
    out = fused_linear_token_stats(h, w, t, b2, **CHUNKS)
    assert not out.finite.any()
    capped = fused_linear_token_stats(h, w, t, b2, softcap=5.0, **CHUNKS)
    ref = oracle.token_stats(as_f64(F.linear(h, w, b2)), t.numpy(), softcap=5.0)
    np.testing.assert_array_equal(capped.finite.numpy(), ref["finite"])
    assert capped.finite.sum() >= 30
    _close(capped.logprob, ref["logprob"], STAT_TOL["float32"], "logprob", where=ref["finite"])


def test_token_stats_on_rows_matches_the_full_call():
    h, w, b, t = _inputs(10, (3, 11))
    stats = fused_linear_statistics(h, w, t, b, temperature=0.9, **CHUNKS)
    rows = torch.tensor([5, 0, 17, 32, 3, 3], dtype=torch.long)
    live = torch.tensor([True, True, True, True, False, False])
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    sub = token_stats_on_rows(hl, wl, t, bl, stats, rows, live, temperature=0.9, **CHUNKS)
    hf, wf, bf = _leaf(h), _leaf(w), _leaf(b)
    full = fused_linear_token_stats(hf, wf, t, bf, temperature=0.9, **CHUNKS)
    r = rows[:4]
    assert torch.equal(sub.logprob[:4].detach(), full.logprob.reshape(-1)[r].detach())
    assert (sub.logprob[4:] == 0).all() and not sub.finite[4:].any()
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, 7.0, 7.0])
    (sub.logprob * g + sub.entropy * g).sum().backward()
    gf = torch.zeros(33)
    gf[r] = g[:4]
    (full.logprob.reshape(-1) * gf + full.entropy.reshape(-1) * gf).sum().backward()
    for a, e in ((hl, hf), (wl, wf), (bl, bf)):
        torch.testing.assert_close(a.grad, e.grad, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- memory
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an op allocates while it is alive (views and in-place results are the
    storage of another tensor and are not counted again)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs: set[int] = set()

    def _release(self, ptr: int, nbytes: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (detach, in-place ops, aliases) allocates nothing
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor) and x.numel() > 0}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and not x._is_view() and x.numel() > 0:
                ptr = x.untyped_storage().data_ptr()
                if ptr in self._ptrs or ptr in inputs:
                    continue
                nbytes = x.untyped_storage().nbytes()
                self._ptrs.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(x, self._release, ptr, nbytes)
        return out


@pytest.mark.parametrize("need", [("logprob",), ("logprob", "entropy")])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_working_memory_stays_within_the_budget(need, softcap, dtype):
    """Forward and backward at N = 300, V = 2000 with a 256 KiB budget: the full logits alone would be 2.4 MB.
    Everything allocated beyond the gradients (∂h, ∂W, ∂b) and the per-token outputs counts."""
    torch.manual_seed(0)
    N, d, V = 300, 16, 2000
    dt = DT[dtype]
    h = torch.randn(N, d).to(dt).requires_grad_(True)
    w = (torch.randn(V, d) * 0.25).to(dt).requires_grad_(True)
    b = torch.randn(V).to(dt).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    budget = 256 * 1024
    with _LiveBytes() as mem:
        out = fused_linear_token_stats(h, w, t, b, need=need, softcap=softcap, temperature=0.9,
                                       memory_budget_bytes=budget)
        after_forward, forward_peak = mem.live, mem.peak
        loss = sum(getattr(out, n).sum() for n in need)
        loss.backward()
    grads = (N * d + V * d + V) * torch.empty((), dtype=dt).element_size()
    outputs = after_forward          # the per-token outputs and saved statistics (a few floats per token)
    assert outputs <= 128 * N
    assert forward_peak <= budget + outputs, (forward_peak, budget, outputs)
    assert mem.peak <= budget + grads + outputs, (mem.peak, budget, grads, outputs)
    assert forward_peak >= budget // 2        # the plan uses the budget: the check measures real blocks
    assert N * V * 4 > 4 * budget      # the test can fail: materialised logits would not fit


def test_plan_at_the_issue_shape():
    """N = 16384, V = 151936, d = 4096 bf16: the forward and the backward each within 0.22 GiB."""
    N, V, d, e = 16384, 151936, 4096, 2
    for k in (None, 3277):
        plan = plan_token_stats(N, d, V, torch.bfloat16, grad_rows=k)
        fwd = plan.row_chunk * plan.vocab_chunk * (e + 20) + 32 * plan.row_chunk
        bwd = plan.backward_row_chunk * d * (4 + 2 * e) + plan.backward_vocab_chunk * (
            plan.backward_row_chunk * (2 * e + 24) + d * e) + 4 * V
        assert fwd <= 0.22 * 2**30 and bwd <= 0.22 * 2**30
        assert plan.row_chunk == N and plan.vocab_chunk >= 512 and plan.backward_vocab_chunk >= 512
    assert plan_token_stats(16384, 4096, 151936, torch.bfloat16) == (16384, 640, 3584, 1024)
    assert DEFAULT_MEMORY_BUDGET == 2**28


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature=True), "temperature"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=math.nan), "softcap"),
    (dict(need="logprob"), "need"), (dict(need=("nll",)), "need"),
    (dict(row_chunk_size=0), "row_chunk_size"), (dict(vocab_chunk_size=-3), "vocab_chunk_size"),
    (dict(memory_budget_bytes=0), "memory_budget_bytes"), (dict(ignore_index=1.5), "ignore_index"),
])
def test_bad_arguments(kwargs, match):
    h, w, b, t = _inputs(11, (7,))
    with pytest.raises(ValueError, match=match):
        fused_linear_token_stats(h, w, t, b, **kwargs)


def test_bad_tensors():
    h, w, b, t = _inputs(12, (7,))
    cases = [
        ((h[0], w, t, b), "hidden"), ((h.long(), w, t, b), "hidden"), ((h, w[:, :5], t, b), "weight"),
        ((h, w.double(), t, b), "weight"), ((h, w, t, b[:5]), "bias"), ((h, w, t.float(), b), "targets"),
        ((h, w, t[:3], b), "targets"), ((h, w, torch.full_like(t, 301), b), "targets"),
        ((h, w, t.to(torch.uint8), b), "targets"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_token_stats(*args)
    stats = fused_linear_statistics(h, w, t, b)
    with pytest.raises(ValueError, match="rows"):
        token_stats_on_rows(h, w, t, b, stats, torch.zeros(2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="live"):
        token_stats_on_rows(h, w, t, b, stats, torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="statistics"):
        token_stats_on_rows(h, w, t, b, (1, 2), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, 2.0)])
def test_oracle_gradient_is_the_finite_difference_of_the_oracle(temperature, softcap):
    rng = np.random.default_rng(20)
    z = rng.standard_normal((4, 9)) * 2
    z[1, 3] = -np.inf
    t = np.array([2, -100, 5, 3])
    g_lp, g_h = rng.standard_normal(4), rng.standard_normal(4)

    def f(zz):
        r = oracle.token_stats(zz, t, temperature, softcap)
        return float((g_lp * r["logprob"] + g_h * r["entropy"]).sum())

    G = oracle.token_stats_grad(z, t, g_lp, g_h, temperature, softcap)
    eps = 1e-6
    for i in range(4):
        for j in range(9):
            if not np.isfinite(z[i, j]):
                assert G[i, j] == 0
                continue
            e = np.zeros_like(z)
            e[i, j] = eps
            assert abs((f(z + e) - f(z - e)) / (2 * eps) - G[i, j]) <= 1e-6
