"""The fused LM head's in-place chunk-gradient kernel (``cggr_torch.kernels.fused_linear``).

References: a float64 NumPy computation of ``G = s·(softmax − onehot)`` from the same rounded logits, and the
fused loss with the kernel against the same loss with the PyTorch element-wise backward. Runs in the Triton
interpreter on CPU tensors (tests/conftest.py), or compiled on CUDA when a GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cggr_torch import dispatch  # noqa: E402
from cggr_torch.fused_linear import fused_linear_cggr  # noqa: E402
from cggr_torch.kernels import fused_linear as kfl  # noqa: E402
from cggr_torch.kernels import scoring as ks  # noqa: E402
from tests.torch import kernel_test_device  # noqa: E402

# NaN rows make NumPy (the interpreter's backend) warn about all-NaN reductions; the results are checked.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DEVICE = kernel_test_device()

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The kernel computes in float32 and rounds G once to the logits' dtype: half an ulp of |G| ≤ |s|.
ROUND = {"float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}


def _reference(z: torch.Tensor, lse: np.ndarray, t: np.ndarray, v0: int, scale: float):
    z64 = z.detach().cpu().to(torch.float64).numpy()
    g = np.exp(z64 - lse[:, None])
    cols = np.arange(z.shape[1]) + v0
    g -= (cols[None, :] == t[:, None]).astype(np.float64)
    return g * scale


def _case(K: int, C: int, v0: int, dtype: torch.dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((K, C)).astype(np.float32) * 3).to(dtype)
    # A plausible lse: the row's log-sum-exp over this chunk plus the mass of the rest of the vocabulary.
    lse = np.log(np.exp(z.to(torch.float64).numpy()).sum(1) + rng.uniform(0.5, 50.0, K)).astype(np.float32)
    t = rng.integers(0, v0 + C + 40, size=K)                         # inside and outside the chunk
    t[: min(K, 3)] = v0 + np.array([0, C - 1, C // 2])[: min(K, 3)]  # first, last and middle column
    return z, lse, t


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("K,C,v0", [(19, 600, 37), (5, 37, 0), (33, 513, 1000)])
def test_chunk_gradient_matches_float64_reference(dtype, K, C, v0):
    z, lse, t = _case(K, C, v0, DT[dtype])
    scale = 0.37
    expected = _reference(z, lse.astype(np.float64), t, v0, scale)
    zd = z.to(DEVICE)
    colsum = torch.full((-(-K // kfl.CHUNK_BLOCK_ROWS), C), float("nan"), dtype=torch.float32, device=DEVICE)
    kfl.launch_chunk_gradient(zd, torch.from_numpy(lse).to(DEVICE), torch.from_numpy(t).to(DEVICE), v0,
                              torch.tensor([scale], dtype=torch.float32, device=DEVICE), colsum)
    got = zd.cpu().to(torch.float64).numpy()
    tol = ROUND[dtype] * scale + 1e-6 * scale
    err = np.abs(got - expected)
    assert np.isfinite(got).all()
    assert err.max() <= tol * np.maximum(1.0, np.abs(expected) / scale).max(), err.max()
    # The ∂b partial sums are float32 sums of the unrounded G: one per block of rows, every column written.
    sums = colsum.cpu().to(torch.float64).numpy()
    assert np.isfinite(sums).all()
    np.testing.assert_allclose(sums.sum(0), expected.sum(0), rtol=1e-4, atol=1e-5 * scale * K)


def test_chunk_gradient_leaves_columns_outside_the_chunk_untouched():
    """A chunk that is a column slice of a wider buffer (row stride > C): only its own columns change."""
    K, C, width = 17, 70, 97
    base = torch.full((K, width), 123.0, dtype=torch.bfloat16, device=DEVICE)
    z, lse, t = _case(K, C, 5, torch.bfloat16, seed=3)
    base[:, 10:10 + C] = z.to(DEVICE)
    view = base[:, 10:10 + C]
    kfl.launch_chunk_gradient(view, torch.from_numpy(lse).to(DEVICE), torch.from_numpy(t).to(DEVICE), 5,
                              torch.tensor([1.0], device=DEVICE))
    out = base.cpu()
    assert (out[:, :10] == 123.0).all() and (out[:, 10 + C:] == 123.0).all()
    expected = _reference(z, lse.astype(np.float64), t, 5, 1.0)
    assert np.abs(out[:, 10:10 + C].to(torch.float64).numpy() - expected).max() <= 8e-3


def test_chunk_gradient_rejects_bad_arguments():
    z = torch.zeros((4, 8), dtype=torch.bfloat16, device=DEVICE)
    lse = torch.zeros(4, device=DEVICE)
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    s = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="z: expected a 2-D"):
        kfl.launch_chunk_gradient(z.to(torch.float64), lse, t, 0, s)
    with pytest.raises(ValueError, match="z: expected a unit stride"):
        kfl.launch_chunk_gradient(z.t(), torch.zeros(8, device=DEVICE), torch.zeros(8, dtype=torch.int64,
                                                                                       device=DEVICE), 0, s)
    with pytest.raises(ValueError, match="lse"):
        kfl.launch_chunk_gradient(z, lse[:3], t, 0, s)
    with pytest.raises(ValueError, match="targets"):
        kfl.launch_chunk_gradient(z, lse, t.to(torch.int32), 0, s)
    with pytest.raises(ValueError, match="v0"):
        kfl.launch_chunk_gradient(z, lse, t, -1, s)
    with pytest.raises(ValueError, match="scale"):
        kfl.launch_chunk_gradient(z, lse, t, 0, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="colsum"):
        kfl.launch_chunk_gradient(z, lse, t, 0, s, torch.zeros((1, 7), device=DEVICE))
    kfl.launch_chunk_gradient(z[:0], lse[:0], t[:0], 0, s)          # K = 0: nothing to do, no launch


# ---------------------------------------------------------------------------- inside the fused loss
def _inputs(seed: int, N: int, d: int, V: int, dtype: torch.dtype):
    rng = np.random.default_rng(seed)
    h = torch.from_numpy((rng.standard_normal((N, d)) * rng.uniform(0.3, 2.5, (N, 1))).astype(np.float32))
    w = torch.from_numpy((rng.standard_normal((V, d)) / np.sqrt(d)).astype(np.float32))
    b = torch.from_numpy((rng.standard_normal(V) * 0.3).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, V, N))
    t[rng.random(N) < 0.2] = -100
    return h.to(dtype), w.to(dtype), b.to(dtype), t


def _grads(h, w, b, t, **kw):
    leaves = [x.detach().clone().to(DEVICE).requires_grad_(True) for x in (h, w, b)]
    out = fused_linear_cggr(leaves[0], leaves[1], t.to(DEVICE), 0, bias=leaves[2], warmup_steps=0,
                            row_chunk_size=10, vocab_chunk_size=130, **kw)
    out.loss.backward()
    return out.loss.detach().cpu(), out.mask.cpu(), [x.grad.cpu().to(torch.float64) for x in leaves]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_loss_with_the_kernel_equals_the_elementwise_backward(dtype):
    """Same statistics and selection (the forward is shared); gradients equal within the rounding of G."""
    h, w, b, t = _inputs(11, 37, 24, 301, DT[dtype])
    with dispatch.force("kernel") as log:
        loss_k, mask_k, grads_k = _grads(h, w, b, t)
    with dispatch.force("reference"):
        loss_r, mask_r, grads_r = _grads(h, w, b, t)
    assert torch.equal(mask_k, mask_r)
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    rel = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    for name, gk, gr in zip(("hidden", "weight", "bias"), grads_k, grads_r):
        scale = float(gr.abs().max())
        assert scale > 0, name
        assert float((gk - gr).abs().max()) <= rel * scale, name
        unselected = ~mask_k.reshape(-1)
        if name == "hidden":
            assert (gk[unselected] == 0).all()           # never read, exactly zero


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("blocks", [dict(row_chunk_size=8), dict(vocab_chunk_size=64),
                                    dict(row_chunk_size=20, vocab_chunk_size=101)],
                         ids=["row-blocks", "vocab-blocks", "row-and-vocab-blocks"])
def test_blockwise_statistics_kernel_path_equals_the_reference(with_labels, blocks):
    """The forward writes each block's statistics straight into one buffer - a row split into vocabulary
    blocks carries its state between launches: same scores as the reference (whole rows)."""
    from cggr_torch.fused_linear import fused_linear_scores
    h, w, b, t = _inputs(5, 29, 16, 203, torch.float32)
    h[3] = float("nan")
    b[150:] = float("-inf")     # the last vocabulary block of every row is entirely -inf
    t[t >= 150] = 7
    labels = t.to(DEVICE) if with_labels else None
    args = (h.to(DEVICE), w.to(DEVICE), labels, b.to(DEVICE))
    with dispatch.force("kernel"):
        got = fused_linear_scores(*args, **blocks)
    with dispatch.force("reference"):
        ref = fused_linear_scores(*args, **blocks)
    for name in ("difficulty",) + tuple(got.stats._fields):
        a = (got.difficulty if name == "difficulty" else getattr(got.stats, name)).cpu()
        r = (ref.difficulty if name == "difficulty" else getattr(ref.stats, name)).cpu()
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)
    assert torch.equal(got.eligible.cpu(), ref.eligible.cpu()) and not bool(got.eligible.cpu()[3])
