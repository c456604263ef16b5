"""The fused LM head's GEMM-epilogue kernels (``cggr_torch.kernels.fused_head_gemm``, ``head_kernel="gemm"``).

References: the float64 oracle (``tests/oracle.py``) on the float64 logits ``h·Wᵀ + b`` of the exact input
values (the kernels take the float32 GEMM accumulator as the logit, never rounded to the inputs' dtype), a
float64 NumPy ``G = s·(softmax − onehot)``, and today's ``"blocks"`` path. Runs in the Triton interpreter on
CPU tensors (tests/conftest.py), compiled on CUDA when a GPU is present. Shapes are small and odd (tl.dot in
the interpreter is slow): N 1, 7, 37; d 5, 33, 64; V 3, 129, 300, with vocabulary splits that divide neither
V nor the number of column tiles (an empty split included).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cggr_torch import dispatch  # noqa: E402
from cggr_torch.fused_linear import FusedLinearCGGRLoss, fused_linear_cggr, fused_linear_scores  # noqa: E402
from cggr_torch.kernels import fused_head_gemm as hg  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import assert_within, kernel_test_device  # noqa: E402

# NaN rows and the masked rows of a block make NumPy (the interpreter's backend) warn; results are checked.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DEVICE = kernel_test_device()
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The smallest legal tiles; ``splits`` set per case. On CUDA the same shapes run compiled.
TILES = dict(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=1)
STATS = ("lse", "entropy", "confidence", "runner_up", "nll")


def _inputs(seed: int, N: int, d: int, V: int, dtype: torch.dtype, *, bias: bool = True, p_ignore: float = 0.2):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, d)) * rng.uniform(0.3, 2.5, (N, 1))
    w = rng.standard_normal((V, d)) * (1.5 / np.sqrt(d))
    b = rng.standard_normal(V) * 0.5
    t = rng.integers(0, V, N)
    t[rng.random(N) < p_ignore] = -100
    as_t = (lambda x: torch.from_numpy(x.astype(np.float32)).to(dtype))
    return as_t(h), as_t(w), (as_t(b) if bias else None), torch.from_numpy(t)


def _f64(x):
    return None if x is None else x.detach().cpu().to(torch.float64).numpy()


def _logits64(h, w, b):
    z = _f64(h) @ _f64(w).T
    return z if b is None else z + _f64(b)[None, :]


def _statistics(h, w, b, t, splits: int, partials=None, out=None):
    N = h.shape[0]
    out = torch.empty((6, N), dtype=torch.float32, device=DEVICE) if out is None else out
    hg.launch_head_statistics(h.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE),
                              None if t is None else t.to(DEVICE), -100, out,
                              hg.HeadGemmConfig(**TILES, splits=splits), partials)
    return out.cpu()


# ------------------------------------------------------------------------------------ forward statistics
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("N,d,V,splits,bias", [(1, 5, 3, 1, True), (7, 33, 129, 4, False), (37, 64, 300, 3, True)])
def test_statistics_match_the_oracle(dtype, N, d, V, splits, bias):
    """SPEC §11's bounds against the float64 oracle of the unrounded logits, every dtype, odd shapes,
    ignore_index; V = 129 with BN = 32 has 5 column tiles in 4 splits of 2: the last split is empty."""
    h, w, b, t = _inputs(N * d + V, N, d, V, DT[dtype], bias=bias)
    out = _statistics(h, w, b, t, splits)
    ref = oracle.token_statistics(_logits64(h, w, b), t.numpy())
    for k, q in enumerate(STATS):
        assert_within(out[k], ref[q], q)
    assert (out[5] == 0).all()
    assert (out[4][t == -100] == 0).all()              # ignored targets: nll 0, the target never read


def test_statistics_equal_for_every_split_count():
    """The split count changes only the float32 summation order (SPEC §12): within the score bounds."""
    h, w, b, t = _inputs(3, 7, 33, 300, torch.float32)
    ref = oracle.token_statistics(_logits64(h, w, b), t.numpy())
    base = _statistics(h, w, b, t, 1)
    for splits in (2, 5, 10):
        out = _statistics(h, w, b, t, splits)
        if splits == 5:  # the flattened (tile, K) loop: the same arithmetic in the same order
            flat = torch.empty((6, 7), device=DEVICE)
            hg.launch_head_statistics(h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), t.to(DEVICE), -100, flat,
                                      hg.HeadGemmConfig(**TILES, splits=5, flatten=True))
            assert torch.equal(flat.cpu(), out)
        for k, q in enumerate(STATS):
            assert_within(out[k], ref[q], q)
            torch.testing.assert_close(out[k], base[k], rtol=2e-5, atol=2e-4)


def test_statistics_match_the_blocks_path():
    """fp32: the epilogue's statistics equal today's path (cuBLAS blocks + the chunked statistics kernel)
    within twice the SPEC §11 bounds; the eligibility is identical."""
    h, w, b, t = (x.to(DEVICE) for x in _inputs(5, 37, 33, 300, torch.float32))
    with dispatch.force("kernel"):
        got = fused_linear_scores(h, w, t, b, head_kernel="gemm")
        blocks = fused_linear_scores(h, w, t, b, head_kernel="blocks", vocab_chunk_size=100)
    assert torch.equal(got.eligible, blocks.eligible)
    for q in got.stats._fields:
        atol, rtol = oracle.SCORE_TOL["lse" if q in ("lse", "entropy", "nll") else "confidence"]
        torch.testing.assert_close(getattr(got.stats, q), getattr(blocks.stats, q), atol=2 * atol, rtol=2 * rtol)
    torch.testing.assert_close(got.difficulty, blocks.difficulty, atol=oracle.SCORE_PARITY_ATOL, rtol=2e-5)


def test_ties_and_minus_infinity_in_the_runner_up():
    """Two equal maxima give p2 = p1 (ties count), across tiles and splits (rows 0, 1) and inside one tile
    (row 2); a −∞ bias column adds nothing."""
    N, d, V = 3, 16, 100
    h = torch.zeros((N, d))
    h[:2, 0] = 1.0
    h[2, 1] = 1.0
    w = torch.zeros((V, d))
    w[5, 0] = 4.0
    w[90, 0] = 4.0          # the same maximum in another tile and another split
    w[10, 1] = 3.0
    w[11, 1] = 3.0          # the same maximum twice in one tile
    b = torch.zeros(V)
    b[7] = float("-inf")
    t = torch.tensor([5, 7, -100])
    out = _statistics(h, w, b, t, 3)
    ref = oracle.token_statistics(_logits64(h, w, b), t.numpy())
    assert torch.equal(out[2], out[3])
    for k, q in enumerate(STATS):
        if q == "nll":
            continue
        assert_within(out[k], ref[q], q)
    assert out[4][1] == float("inf")          # the target's logit is −∞: nll = +∞, the row is not finite
    assert_within(out[4][:1], ref["nll"][:1], "nll")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_hidden_rows_and_all_ignored(dtype):
    """A NaN or ±∞ hidden state makes its row (and only it) not finite; all-ignored targets give nll = 0."""
    h, w, b, t = _inputs(7, 7, 33, 129, DT[dtype])
    h[1, 3] = float("nan")
    h[4, 0] = float("inf")
    h[5, 2] = float("-inf")
    out = _statistics(h, w, b, t, 2)
    finite = torch.isfinite(out[:5]).all(0)
    assert not finite[1] and not finite[4] and not finite[5]
    ok = [0, 2, 3, 6]
    ref = oracle.token_statistics(_logits64(h[ok], w, b), t[ok].numpy())
    for k, q in enumerate(STATS):
        assert_within(out[k][ok], ref[q], q)
    ignored = torch.full_like(t, -100)
    out = _statistics(h, w, b, ignored, 2)
    assert (out[4] == 0).all()
    nothing = _statistics(h, w, b, None, 2)                     # no targets: nll 0 too, same other rows
    assert (nothing[4] == 0).all()
    assert torch.equal(nothing[:4][:, ok], out[:4][:, ok])


def test_out_of_range_target_is_never_read():
    """A valid target outside [0, V) (the CUDA device assertion's case) gives nll = NaN; nothing is read."""
    h, w, b, _t = _inputs(9, 7, 5, 3, torch.float32)
    t = torch.tensor([0, 3, -100, 2, 1000, -1, 1])
    out = _statistics(h, w, b, t, 1)
    assert torch.isnan(out[4][[1, 4, 5]]).all()
    ref = oracle.token_statistics(_logits64(h, w, b), np.where(np.isin(np.arange(7), [1, 4, 5]), -100, t.numpy()))
    for i in (0, 3, 6):
        assert_within(out[4][i:i + 1], ref["nll"][i:i + 1], "nll")


def test_poisoned_partials_and_outputs_are_overwritten():
    """Every partial entry the combine reads and every output entry is written by the launch (NaN-filled
    buffers, an empty split included): bit-identical to fresh buffers."""
    h, w, b, t = _inputs(11, 7, 33, 129, torch.bfloat16)
    clean = _statistics(h, w, b, t, 4)
    partials = torch.full((hg.HEAD_PARTIAL_ROWS, 4, 7), float("nan"), device=DEVICE)
    out = torch.full((6, 7), float("nan"), device=DEVICE)
    poisoned = _statistics(h, w, b, t, 4, partials=partials, out=out)
    assert torch.equal(poisoned, clean)
    assert not torch.isnan(partials).any()


def test_statistics_launcher_rejects_bad_arguments():
    h, w, b, t = (x.to(DEVICE) for x in _inputs(1, 4, 16, 40, torch.float32))
    out = torch.empty((6, 4), device=DEVICE)
    cfg = hg.HeadGemmConfig(**TILES, splits=2)
    with pytest.raises(ValueError, match="hidden: expected a 2-D float32/float16/bfloat16"):
        hg.launch_head_statistics(h.double(), w.double(), None, t, -100, out, cfg)
    with pytest.raises(ValueError, match="weight"):
        hg.launch_head_statistics(h, w[:, :5], None, t, -100, out, cfg)
    with pytest.raises(ValueError, match="bias"):
        hg.launch_head_statistics(h, w, b[:3], t, -100, out, cfg)
    with pytest.raises(ValueError, match="targets"):
        hg.launch_head_statistics(h, w, b, t.to(torch.int32), -100, out, cfg)
    with pytest.raises(ValueError, match="out"):
        hg.launch_head_statistics(h, w, b, t, -100, out[:5], cfg)
    with pytest.raises(ValueError, match="partials"):
        hg.launch_head_statistics(h, w, b, t, -100, out, cfg, torch.empty((5, 3, 4), device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        hg.HeadGemmConfig(block_n=48)
    with pytest.raises(ValueError, match="splits"):
        hg.HeadGemmConfig(splits=-1)
    with pytest.raises(ValueError, match="flatten"):
        hg.HeadGemmConfig(flatten=1)
    hg.launch_head_statistics(h[:0], w, b, t[:0], -100, torch.empty((6, 0), device=DEVICE), cfg)  # N = 0


def test_split_heuristic():
    """Two programs per SM at the benchmark shape (N = 16384, BM = 128, 132 SMs: S = 3); capped by tiles."""
    cfg = hg.HEAD_GEMM_CONFIGS[0]
    assert hg.head_splits(16384, 128256, cfg, 132) == 3
    assert hg.head_splits(16384, 128256, cfg, 132) * 16384 // cfg.block_m >= 2 * 132
    assert hg.head_splits(1, 3, cfg, 132) == 1
    assert hg.head_splits(100, 128256, hg.HeadGemmConfig(splits=7), 132) == 7
    assert hg.head_gemm_config(torch.bfloat16, torch.device("cuda")) == cfg


# ------------------------------------------------------------------------------------- backward gradient
def _reference_gradient(h, w, b, lse, t, v0, scale):
    z = _logits64(h, w, b)
    g = np.exp(z - lse[:, None])
    g -= (np.arange(w.shape[0])[None, :] + v0 == t[:, None]).astype(np.float64)
    return g * scale


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("K,d,C,v0,bias", [(1, 5, 3, 0, True), (19, 33, 70, 37, False), (37, 64, 129, 1000, True)])
def test_gradient_matches_float64_reference(dtype, K, d, C, v0, bias):
    h, w, b, _ = _inputs(K + d + C, K, d, C, DT[dtype], bias=bias)
    rng = np.random.default_rng(C)
    z = _logits64(h, w, b)
    lse = np.log(np.exp(z).sum(1) + rng.uniform(0.5, 50.0, K)).astype(np.float32)  # plus the rest of V
    t = rng.integers(0, v0 + C + 40, K)
    t[: min(K, 3)] = v0 + np.array([0, C - 1, C // 2])[: min(K, 3)]
    scale = 0.37
    expected = _reference_gradient(h, w, b, lse.astype(np.float64), t, v0, scale)
    cfg = hg.HeadGemmConfig(**TILES)
    grad = torch.full((K, C), float("nan"), dtype=DT[dtype], device=DEVICE)
    colsum = torch.full((-(-K // cfg.block_m), C), float("nan"), device=DEVICE) if bias else None
    hg.launch_head_gradient(h.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE),
                            torch.from_numpy(lse).to(DEVICE), torch.from_numpy(t).to(DEVICE), v0,
                            torch.tensor([scale], device=DEVICE), grad, colsum, cfg)
    got = _f64(grad)
    rounding = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(got, expected, atol=scale * (rounding + 1e-5), rtol=0)
    if bias:
        np.testing.assert_allclose(_f64(colsum).sum(0), expected.sum(0), rtol=1e-4, atol=1e-5 * scale * K)


def test_gradient_writes_only_its_chunk_of_a_wider_buffer():
    """``grad`` as a column slice of a wider buffer (row stride > C): only its own columns change."""
    h, w, b, _ = _inputs(2, 17, 16, 70, torch.bfloat16)
    base = torch.full((17, 97), 123.0, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.full((17,), 3.0, device=DEVICE)
    t = torch.zeros(17, dtype=torch.int64, device=DEVICE)
    hg.launch_head_gradient(h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), lse, t, 5,
                            torch.ones(1, device=DEVICE), base[:, 10:80], None, hg.HeadGemmConfig(**TILES))
    out = base.cpu()
    assert (out[:, :10] == 123.0).all() and (out[:, 80:] == 123.0).all()
    expected = _reference_gradient(h, w, b, np.full(17, 3.0), np.zeros(17, dtype=np.int64), 5, 1.0)
    np.testing.assert_allclose(_f64(out[:, 10:80]), expected, atol=8e-3 * max(1.0, np.abs(expected).max()))


def test_gradient_launcher_rejects_bad_arguments():
    h = torch.zeros((4, 16), device=DEVICE)
    w = torch.zeros((8, 16), device=DEVICE)
    lse = torch.zeros(4, device=DEVICE)
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    s = torch.ones(1, device=DEVICE)
    g = torch.empty((4, 8), device=DEVICE)
    with pytest.raises(ValueError, match="grad"):
        hg.launch_head_gradient(h, w, None, lse, t, 0, s, g.t())
    with pytest.raises(ValueError, match="grad"):
        hg.launch_head_gradient(h, w, None, lse, t, 0, s, g.bfloat16())
    with pytest.raises(ValueError, match="lse"):
        hg.launch_head_gradient(h, w, None, lse[:3], t, 0, s, g)
    with pytest.raises(ValueError, match="targets"):
        hg.launch_head_gradient(h, w, None, lse, t.float(), 0, s, g)
    with pytest.raises(ValueError, match="v0"):
        hg.launch_head_gradient(h, w, None, lse, t, -1, s, g)
    with pytest.raises(ValueError, match="scale"):
        hg.launch_head_gradient(h, w, None, lse, t, 0, torch.ones(2, device=DEVICE), g)
    with pytest.raises(ValueError, match="colsum"):
        hg.launch_head_gradient(h, w, None, lse, t, 0, s, g, torch.empty((2, 8), device=DEVICE))
    hg.launch_head_gradient(h[:0], w, None, lse[:0], t[:0], 0, s, g[:0])            # K = 0: no launch


# ---------------------------------------------------------------------------------- inside the fused loss
def _grads(h, w, b, t, head_kernel, **kw):
    leaves = [None if x is None else x.detach().clone().to(DEVICE).requires_grad_(True) for x in (h, w, b)]
    with dispatch.force("kernel"):
        out = fused_linear_cggr(leaves[0], leaves[1], t.to(DEVICE), 0, bias=leaves[2], warmup_steps=0,
                                head_kernel=head_kernel, vocab_chunk_size=100, **kw)
        out.loss.backward()
    grads = [None if x is None else x.grad.cpu().to(torch.float64) for x in leaves]
    return out, grads


def _close(a, b, rel, name):
    scale = float(b.abs().max())
    assert scale > 0, name
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{name}: {err:.3g} > {rel} × {scale:.3g}"


def test_fused_loss_gemm_equals_blocks_fp32():
    """fp32, stratified selection: same selection, loss and gradients as today's path."""
    h, w, b, t = _inputs(21, 37, 33, 300, torch.float32)
    out_g, grads_g = _grads(h, w, b, t, "gemm")
    out_b, grads_b = _grads(h, w, b, t, "blocks")
    assert torch.equal(out_g.mask, out_b.mask) and int(out_g.mask.sum()) > 0
    torch.testing.assert_close(out_g.loss.detach(), out_b.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, gg, gb in zip(("hidden", "weight", "bias"), grads_g, grads_b):
        _close(gg, gb, 2e-5, name)
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite"):
        assert int(out_g.metrics[key]) == int(out_b.metrics[key]), key


@pytest.mark.parametrize("dtype, bias", [("bfloat16", True), ("float16", False)])
def test_fused_loss_gemm_against_float64_and_blocks_half(dtype, bias):
    """Half precision, every valid row selected (ratio 1: the selection cannot depend on the rounding of the
    logits): the loss and gradients equal the float64 reference of the unrounded logits, and today's path
    (whose logits are rounded to the inputs' dtype) within that rounding."""
    h, w, b, t = _inputs(22, 37, 64, 300, DT[dtype], bias=bias)
    cfg = dict(selection="fixed_quota", min_tokens_ratio=1.0)
    out_g, grads_g = _grads(h, w, b, t, "gemm", **cfg)
    out_b, grads_b = _grads(h, w, b, t, "blocks", **cfg)
    valid = (t != -100).to(DEVICE)
    assert torch.equal(out_g.mask, valid) and torch.equal(out_b.mask, valid)
    z = _logits64(h, w, b)
    mask = valid.cpu().numpy()
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    safe = np.where(mask, t.numpy(), 0)
    nll = lse - z[np.arange(len(t)), safe]
    loss = float(nll[mask].sum() / mask.sum())
    G = np.exp(z - lse[:, None])
    G[np.arange(len(t)), safe] -= 1.0
    G = np.where(mask[:, None], G, 0.0) / mask.sum()
    np.testing.assert_allclose(float(out_g.loss.detach()), loss, rtol=1e-5, atol=1e-4)
    rel = {"float16": 4e-3, "bfloat16": 3e-2}[dtype]
    refs = [G @ _f64(w), G.T @ _f64(h), G.sum(0)]
    for name, got, ref in zip(("hidden", "weight", "bias"), grads_g, refs):
        if got is not None:
            _close(got, torch.from_numpy(ref), rel, name)
    np.testing.assert_allclose(float(out_b.loss.detach()), float(out_g.loss.detach()), rtol=2e-2)
    for name, gg, gb in zip(("hidden", "weight", "bias"), grads_g, grads_b):
        if gg is not None:
            _close(gg, gb, 2 * rel, name)


def test_fused_loss_gemm_all_ignored_and_nonfinite_rows():
    """All targets ignored: loss 0, zero gradients; a NaN hidden row is counted, never selected, and its
    gradient is exactly zero."""
    h, w, b, t = _inputs(23, 7, 16, 129, torch.bfloat16)
    out, grads = _grads(h, w, b, torch.full_like(t, -100), "gemm")
    assert float(out.loss.detach()) == 0.0 and not out.mask.any()
    assert all((g == 0).all() for g in grads)
    h[2, 0] = float("nan")
    t[2] = 4
    out, grads = _grads(h, w, b, t, "gemm", min_tokens_ratio=1.0)
    assert not out.mask[2] and int(out.metrics["tokens_nonfinite"]) == 1
    assert torch.isfinite(out.loss) and (grads[0][2] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_module_and_reference_dispatch():
    """The module takes ``head_kernel``; where dispatch selects the reference, ``"gemm"`` runs it too."""
    h, w, b, t = (x.to(DEVICE) for x in _inputs(24, 3 * 5, 16, 40, torch.float32))
    h3, t3 = h.reshape(3, 5, 16), t.reshape(3, 5)
    crit = FusedLinearCGGRLoss(warmup_steps=0, head_kernel="gemm")
    assert "head_kernel='gemm'" in repr(crit)
    with dispatch.force("kernel"):
        a = crit(h3, w, t3, b)
        c = FusedLinearCGGRLoss(warmup_steps=0, head_kernel="blocks")(h3, w, t3, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    with dispatch.force("reference"):
        r_gemm = crit(h3, w, t3, b)
        r_ref = FusedLinearCGGRLoss(warmup_steps=0)(h3, w, t3, b)
    assert torch.equal(r_gemm, r_ref)


def test_bad_head_kernel_is_a_value_error():
    h, w, b, t = _inputs(25, 4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="head_kernel: expected one of"):
        fused_linear_cggr(h, w, t, 0, head_kernel="cublas")
    with pytest.raises(ValueError, match="head_kernel: expected one of"):
        FusedLinearCGGRLoss(head_kernel=None)
    with pytest.raises(ValueError, match="head_kernel: expected one of"):
        fused_linear_scores(h, w, t, head_kernel="GEMM")
    with pytest.raises(ValueError, match="head_kernel: 'gemm' needs float32"):
        fused_linear_cggr(h.double(), w.double(), t, 0, head_kernel="gemm")
    with pytest.raises(ValueError, match="head_kernel: 'gemm' needs float32"):
        FusedLinearCGGRLoss(head_kernel="gemm")(h.double(), w.double(), t)


def test_custom_ops_pass_opcheck():
    h, w, b, t = _inputs(26, 5, 16, 11, torch.float32)
    h, w, b, t = (x.to(DEVICE) for x in (h, w, b, t))
    t = torch.where(t < 0, torch.zeros_like(t), t)
    lse = torch.logsumexp(h @ w.t() + b, 1).float()
    ops = [
        (torch.ops.cggr.head_gemm_statistics.default, (h, w, b, t, -100)),
        (torch.ops.cggr.head_gemm_statistics.default, (h, w, None, None, -100)),
        (torch.ops.cggr.head_gemm_gradient.default,
         (h, w, b, lse, t, 0, torch.tensor([0.5], device=DEVICE), torch.empty((5, 11), device=DEVICE),
          torch.empty((hg.colsum_rows(5, torch.float32, h.device), 11), device=DEVICE))),
        (torch.ops.cggr.head_gemm_gradient.default,
         (h, w[3:], None, lse, t, 3, torch.tensor([0.5], device=DEVICE), torch.empty((5, 8), device=DEVICE), None)),
    ]
    for op, args in ops:
        result = torch.library.opcheck(op, args, raise_exception=False)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_compiled_module_matches_eager():
    """SPEC §12.1: ``cggr::head_gemm_statistics`` and the selected-rows op with the epilogue backward compile
    with ``fullgraph=True`` and compute what the eager call computes."""
    h, w, b, t = (x.to(DEVICE) for x in _inputs(27, 2 * 6, 16, 40, torch.float32))
    h3, t3 = h.reshape(2, 6, 16), t.reshape(2, 6)
    crit, twin = (FusedLinearCGGRLoss(warmup_steps=0, head_kernel="gemm") for _ in range(2))
    with dispatch.force("kernel"):
        f = torch.compile(lambda hh, ww, tt, bb: crit(hh, ww, tt, bb), backend="aot_eager", fullgraph=True)
        results = []
        for fn in (f, twin):
            leaves = [x.detach().clone().requires_grad_(True) for x in (h3, w, b)]
            loss = fn(leaves[0], leaves[1], t3, leaves[2])
            loss.backward()
            results.append((loss.detach(), *[x.grad for x in leaves]))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
