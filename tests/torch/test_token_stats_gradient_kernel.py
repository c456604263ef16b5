"""``cggr_torch.kernels.token_stats_gradient`` (the per-token log-prob / entropy backward's chunk gradient, SPEC
§14.1) against the float64 oracle, alone and inside :func:`cggr_torch.fused_linear_token_stats`'s backward.

Runs in the Triton interpreter on CPU tensors (tests/conftest.py), or compiled on CUDA when a GPU is present.
Odd shapes (K = 37 rows, C = 301 columns, chunks that divide neither), the three input dtypes, temperature and
soft-cap, targets inside, outside and absent from a chunk, inactive rows with huge logits (exact zeros), the bias
column sums; then the whole backward (plain and gathered rows) against the PyTorch element-wise path.
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
from cggr_torch.kernels.token_stats_gradient import GRADIENT_BLOCK_ROWS, launch_token_stats_gradient  # noqa: E402
from cggr_torch.policy_gradient import policy_gradient_loss  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import as_f64, head_inputs, kernel_test_device  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DEVICE = kernel_test_device()
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The gradient is written in the inputs' dtype: one rounding of values bounded by max|g_lp| + max|g_H|·O(log V).
OUT_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
GRAD_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
TRANSFORMS = [(1.0, None), (0.7, None), (1.3, 4.0)]


def _chunk_case(seed, dtype, K=37, V=301, temperature=1.0, softcap=None):
    """Raw logits of K rows over V columns with the rows' true lse/H of the transformed distribution."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((K, V)) * rng.uniform(0.5, 4.0, size=(K, 1))).astype(np.float32)
    z = torch.from_numpy(z).to(dtype)          # the values the kernel sees, rounded to the dtype
    t = rng.integers(0, V, size=K)
    t[rng.random(K) < 0.2] = -100
    res = oracle.token_stats(as_f64(z), t, temperature=temperature, softcap=softcap)
    g_lp = rng.standard_normal(K)
    g_h = rng.standard_normal(K)
    g_lp[3] = g_h[3] = 0.0                      # an inactive row
    g_h[5] = 0.0                                # log-prob only
    g_lp[7] = 0.0                               # entropy only
    return z, t, res, g_lp, g_h


def _f32(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=DEVICE).contiguous()


@pytest.mark.parametrize("temperature,softcap", TRANSFORMS)
@pytest.mark.parametrize("dtype", list(DT))
def test_launch_matches_the_oracle_over_ragged_chunks(dtype, temperature, softcap):
    z, t, res, g_lp, g_h = _chunk_case(1, DT[dtype], temperature=temperature, softcap=softcap)
    K, V = z.shape
    expected = oracle.token_stats_grad(as_f64(z), t, np.where(t != -100, g_lp, 0.0), g_h,
                                       temperature=temperature, softcap=softcap)
    tgt = torch.from_numpy(np.where(t != -100, t, -1)).to(torch.int64).to(DEVICE)
    g_lp_eff = np.where(t != -100, g_lp, 0.0)   # the caller zeroes g_lp where there is no target
    per_row = [_f32(res["lse"]), _f32(res["entropy"]), _f32(g_lp_eff), _f32(g_h)]
    out = np.empty((K, V))
    bias_sums = np.empty(V)
    for v0, v1 in ((0, 130), (130, 259), (259, V)):       # ragged chunks: a target lands in each, or in none
        chunk = z[:, v0:v1].clone().to(DEVICE)
        colsum = torch.full((-(-K // GRADIENT_BLOCK_ROWS), v1 - v0), math.nan, dtype=torch.float32, device=DEVICE)
        launch_token_stats_gradient(chunk, *per_row, tgt, v0, temperature=temperature, softcap=softcap,
                                    colsum=colsum)
        assert chunk.dtype == DT[dtype]
        out[:, v0:v1] = chunk.double().cpu().numpy()
        bias_sums[v0:v1] = colsum.sum(dim=0).double().cpu().numpy()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(out, expected, atol=OUT_TOL[dtype] * scale, rtol=0)
    np.testing.assert_allclose(bias_sums, expected.sum(axis=0), atol=K * OUT_TOL[dtype] * scale, rtol=0)
    assert (out[3] == 0).all()                                  # inactive: exact zeros


def test_inactive_rows_write_exact_zeros_whatever_their_logits():
    z = torch.tensor([[1e4, -1e4, 0.0, 88.0], [math.inf, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], device=DEVICE)
    zero = torch.zeros(3, device=DEVICE)
    g_lp = torch.tensor([0.0, 0.0, 1.0], device=DEVICE)
    lse = torch.tensor([0.0, 0.0, float(torch.logsumexp(z[2], 0))], device=DEVICE)
    tgt = torch.tensor([0, 1, 2], dtype=torch.int64, device=DEVICE)
    out = z.clone()
    launch_token_stats_gradient(out, lse, zero, g_lp, zero, tgt, 0)
    assert (out[:2] == 0).all()
    p = torch.softmax(z[2], 0)
    torch.testing.assert_close(out[2], torch.nn.functional.one_hot(tgt[2], 4).float() - p)


@pytest.mark.parametrize("bad,match", [
    (dict(z=torch.zeros(4, 6, dtype=torch.float64)), "z: expected a 2-D float32"),
    (dict(z=torch.zeros(6, 4).t()), "z: expected a unit stride"),
    (dict(lse=torch.zeros(3)), "lse: expected a contiguous"),
    (dict(g_h=torch.zeros(4, dtype=torch.float16)), "g_h: expected a contiguous"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), "targets: expected a contiguous"),
    (dict(v0=-1), "v0: expected a host integer"),
    (dict(temperature=0.0), "temperature: expected a finite"),
    (dict(softcap=math.inf), "softcap: expected None or a finite"),
    (dict(colsum=torch.zeros(2, 6)), "colsum: expected a contiguous float32"),
])
def test_launch_rejects_bad_arguments(bad, match):
    args = dict(z=torch.zeros(4, 6), lse=torch.zeros(4), entropy=torch.zeros(4), g_lp=torch.zeros(4),
                g_h=torch.zeros(4), targets=torch.zeros(4, dtype=torch.int64), v0=0)
    kw = dict(temperature=1.0, softcap=None, colsum=None)
    for k, v in bad.items():
        (kw if k in kw else args)[k] = v
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        launch_token_stats_gradient(args["z"], args["lse"], args["entropy"], args["g_lp"], args["g_h"],
                                    args["targets"], args["v0"], **kw)


def _inputs(seed, dtype, **kw):
    return head_inputs(seed, dtype, DEVICE, **kw)


def _grads(mode, h, w, b, t, g_lp, g_h, need=("logprob", "entropy"), **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    with dispatch.force(mode) as log:
        out = fused_linear_token_stats(leaves[0], leaves[1], t, leaves[2], need=need, **kw)
        loss = sum((getattr(out, n) * g).sum() for n, g in (("logprob", g_lp), ("entropy", g_h)) if n in need)
        loss.backward()
    return [x.grad for x in leaves], log


@pytest.mark.parametrize("temperature,softcap", TRANSFORMS)
@pytest.mark.parametrize("dtype", list(DT))
def test_backward_takes_the_kernel_and_matches_the_elementwise_path(dtype, temperature, softcap):
    h, w, b, t = _inputs(2, DT[dtype])
    g = torch.Generator().manual_seed(0)
    g_lp, g_h = torch.randn(37, generator=g).to(DEVICE), torch.randn(37, generator=g).to(DEVICE)
    kw = dict(temperature=temperature, softcap=softcap, row_chunk_size=10, vocab_chunk_size=64)
    expected, _ = _grads("reference", h, w, b, t, g_lp, g_h, **kw)
    actual, log = _grads("kernel", h, w, b, t, g_lp, g_h, **kw)
    # 4 row blocks x 5 vocabulary chunks, each one launch (the user's chunk sizes are kept under the kernels)
    assert log.calls["launch_token_stats_gradient"] == 4 * 5
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        scale = max(1e-30, float(e.abs().max()))
        err = float((a.double() - e.double()).abs().max())
        assert err <= GRAD_TOL[dtype] * scale, f"{name}: {err:.3g} > {GRAD_TOL[dtype]} x {scale:.3g}"
    # and against the oracle, through the materialised logits (float32 only: the tightest)
    if dtype == "float32":
        z = F.linear(h, w, b)
        gz = oracle.token_stats_grad(as_f64(z.cpu()), t.cpu().numpy(), g_lp.cpu().numpy(), g_h.cpu().numpy(),
                                     temperature=temperature, softcap=softcap)
        gz = torch.from_numpy(gz).to(DEVICE)
        np.testing.assert_allclose(actual[0].double().cpu().numpy(), (gz @ w.double()).cpu().numpy(),
                                   atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(actual[2].double().cpu().numpy(), gz.sum(0).cpu().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("need", [("logprob",), ("entropy",)])
def test_backward_of_one_output(need):
    h, w, b, t = _inputs(3, torch.float32)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(37, generator=g).to(DEVICE), torch.randn(37, generator=g).to(DEVICE)
    expected, _ = _grads("reference", h, w, b, t, g_lp, g_h, need=need, vocab_chunk_size=100)
    actual, log = _grads("kernel", h, w, b, t, g_lp, g_h, need=need, vocab_chunk_size=100)
    assert log.calls["launch_token_stats_gradient"] > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=2e-5 * float(e.abs().max()), rtol=0)


def test_non_finite_and_ignored_rows_get_exact_zero_gradient():
    h, w, b, t = _inputs(4, torch.float32)
    h, b, t = h.clone(), b.clone(), t.clone()
    h[4] = math.nan
    b[5] = -math.inf
    t[6] = 5                                   # target logit -inf: not finite
    t[9] = -100
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    with dispatch.force("kernel") as log:
        out = fused_linear_token_stats(leaves[0], leaves[1], t, leaves[2], vocab_chunk_size=64)
        loss = torch.where(out.finite, out.logprob + out.entropy, torch.zeros((), device=DEVICE)).sum()
        loss.backward()
    assert log.calls["launch_token_stats_gradient"] > 0
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert (leaves[0].grad[4] == 0).all() and (leaves[0].grad[6] == 0).all()
    # row 9 has no target: only its entropy term flows
    leaves2 = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    with dispatch.force("reference"):
        out2 = fused_linear_token_stats(leaves2[0], leaves2[1], t, leaves2[2], vocab_chunk_size=64)
        torch.where(out2.finite, out2.logprob + out2.entropy, torch.zeros((), device=DEVICE)).sum().backward()
    for a, e in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, e.grad, atol=2e-5 * float(e.grad.abs().max()), rtol=0)


def test_policy_gradient_on_gathered_rows_takes_the_kernel():
    """``token_stats_on_rows`` (the policy-gradient loss' selected rows): the same backward, index-added."""
    h, w, _, t = _inputs(6, torch.float32, p_ignore=0.1)
    rng = np.random.default_rng(0)
    adv = torch.from_numpy(rng.standard_normal(37).astype(np.float32)).to(DEVICE)
    old = torch.from_numpy(-rng.uniform(0.5, 6.0, 37).astype(np.float32)).to(DEVICE)

    def run(mode):
        hl, wl = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        with dispatch.force(mode) as log:
            out = policy_gradient_loss(hl, wl, t, adv, old, vocab_chunk_size=50)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
        return loss.detach(), hl.grad, wl.grad, log

    ref = run("reference")
    got = run("kernel")
    assert got[3].calls["launch_token_stats_gradient"] > 0
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, e in zip(got[1:3], ref[1:3]):
        torch.testing.assert_close(a, e, atol=2e-5 * float(e.abs().max()), rtol=0)


def test_kernel_plan_widens_the_columns_within_the_same_bytes():
    """Default plan under the kernels: the backward chunk is the logits buffer only (``R'·e`` bytes a column plus
    the bias sums), so more columns fit the bytes the element-wise plan gave; a user's chunk size is kept."""
    N, d, V = 16384, 4096, 151936
    h = torch.zeros((2, d), dtype=torch.bfloat16, device=DEVICE)
    base = ts.plan_token_stats(N, d, V, torch.bfloat16)
    with dispatch.force("kernel"):
        wide = ts._kernel_plan(base, h, V, 1.0, None)
        capped = ts._kernel_plan(base, h, V, 0.7, None)
    with dispatch.force("reference"):
        same = ts._kernel_plan(base, h, V, 1.0, None)
    assert same == base
    R, e = base.backward_row_chunk, 2
    element_wise = base.backward_vocab_chunk * (R * (2 * e + 24) + d * e)
    assert wide.backward_vocab_chunk > 4 * base.backward_vocab_chunk
    assert wide.backward_vocab_chunk * (R * e + 4 * -(-R // 16)) <= element_wise
    assert wide.vocab_chunk * e <= base.vocab_chunk * (e + 20)
    assert capped.vocab_chunk == base.vocab_chunk              # a transform keeps the forward's blocks
    assert capped.backward_vocab_chunk == wide.backward_vocab_chunk
