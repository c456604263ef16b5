"""The in-place selective cross-entropy backward (SPEC §8.1): ``CGGRLoss(inplace_backward=True)``
on the fused (topk / sampled) and composable kernel paths, the raw kernels, and its autograd safety.

References: the float64 oracle's ``cggr_loss`` (fed the kernels' own float32 difficulties, so that selections
compare exactly), the allocating (dense-buffer) path of the same kernels (bit for bit: the in-place backward
is the same kernel writing into another buffer), and a float64 PyTorch cross-entropy for the raw kernels.
Runs in the Triton interpreter on CPU tensors, or on CUDA when a GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from cggr_torch import CGGRLoss, cggr_loss, dispatch  # noqa: E402
from cggr_torch.distributed import DistributedCGGRLoss  # noqa: E402
from cggr_torch.kernels import cross_entropy as kce  # noqa: E402
from cggr_torch.kernels import scoring as ks  # noqa: E402
from cggr_torch.scoring import score_tokens  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch import DTYPES, as_f64, kernel_test_device, random_logits, random_targets  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = kernel_test_device()
IGN = -100
STEP = 7
CFG = dict(warmup_steps=10, min_tokens_ratio=0.3, threshold_sensitivity=0.5, num_strata=3,
           min_tokens_per_sequence=1, sample_seed=5)
GRAD_TOL = {"float32": (1e-5, 1e-4), "float16": (1e-5, 2e-3), "bfloat16": (1e-5, 1.6e-2)}
PATHS = {"fused": dict(mode="kernel", fused_loss=True), "composable": dict(mode="kernel", fused_loss=False)}


def _batch(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
           poison: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Odd-shaped logits with ignored targets and (``poison``) NaN / +inf / -inf rows whose targets are valid:
    those rows are ineligible, so their gradient must be written as exact zeros over the non-finite values."""
    rng = np.random.default_rng(seed)
    x = random_logits(rng, shape, dtype)
    t = random_targets(rng, shape[:-1], shape[-1], p_ignore=0.2, ignore_index=IGN)
    flat_x, flat_t = x.view(-1, shape[-1]), t.view(-1)
    flat_t[0] = IGN                                      # at least one ignored row
    if poison:
        flat_t[1:4] = torch.tensor([2, 3, 4])
        flat_x[1, 5] = float("nan")
        flat_x[2, 0] = float("inf")
        flat_x[3, :] = float("-inf")
    return x, t


def _run(path: str, x: torch.Tensor, t: torch.Tensor, inplace: bool, **cfg):
    """``cggr_loss`` on non-leaf logits (as a model's output) on ``path``; returns the loss, the gradient that
    reached the leaf, the logits buffer after backward and the metrics."""
    leaf = x.detach().clone().to(DEVICE).requires_grad_(True)
    y = leaf * 1
    with dispatch.force(**PATHS[path]) if path in PATHS else dispatch.force("reference"):
        loss, metrics = cggr_loss(y, t.to(DEVICE), STEP, inplace_backward=inplace, **cfg)
        loss.backward()
    return loss.detach().cpu(), leaf.grad.cpu(), y.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}


def _oracle(x: torch.Tensor, t: torch.Tensor, **cfg) -> dict:
    """The oracle fed the kernels' float32 difficulties (the fused path's are bit-identical to them)."""
    with dispatch.force("kernel"):
        d = score_tokens(x.to(DEVICE), t.to(DEVICE), scoring=cfg.get("scoring", "combined"),
                         ignore_index=IGN).difficulty.cpu().numpy()
    return oracle.cggr_loss(as_f64(x), t.numpy(), STEP, ignore_index=IGN, difficulty_override=d, **cfg)


# --------------------------------------------------------------------------- CGGRLoss: values, bit for bit
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("selection", ["topk", "sampled", "sequence_aware"])
@pytest.mark.parametrize("path, shape", [("fused", (3, 7, 37)), ("composable", (13, 29))])
def test_inplace_equals_dense_and_oracle(dtype, selection, path, shape):
    x, t = _batch(hash((dtype, selection, path, shape)) % 2**32, shape, DTYPES[dtype])
    cfg = dict(CFG, selection=selection)
    l_d, g_d, y_d, m_d = _run(path, x, t, False, **cfg)
    l_i, g_i, y_i, m_i = _run(path, x, t, True, **cfg)
    # the same kernel writing into the logits buffer instead of a new one: identical bits
    assert l_i.numpy().tobytes() == l_d.numpy().tobytes()
    assert g_i.dtype == x.dtype and torch.equal(g_i, g_d)
    for key in ("tokens_selected", "tokens_total", "tokens_nonfinite"):
        assert int(m_i[key]) == int(m_d[key]), key
    # the dense path leaves the logits intact; the in-place path leaves the gradient in them
    assert torch.equal(y_d.cpu().isnan(), x.isnan()) and torch.equal(y_d.cpu().nan_to_num(), x.nan_to_num())
    assert torch.equal(y_i, g_i)
    assert torch.isfinite(g_i).all()                     # the NaN/inf rows were overwritten with zeros
    ref = _oracle(x, t, **cfg)
    np.testing.assert_allclose(float(l_i), ref["loss"], atol=1e-5, rtol=1e-4)
    atol, rtol = GRAD_TOL[dtype]
    np.testing.assert_allclose(as_f64(g_i.cpu()), ref["grad"], atol=atol, rtol=rtol)
    sel = torch.from_numpy(ref["mask"])
    assert int(sel.sum()) == int(m_i["tokens_selected"]) > 0
    assert (g_i.cpu()[~sel] == 0).all()


@pytest.mark.parametrize("selection", ["topk", "sampled"])
@pytest.mark.parametrize("path", ["fused", "composable"])
def test_all_ignored_batch(selection, path):
    """Nothing selectable (every target ignored, one row NaN): loss 0 and the whole buffer becomes zeros."""
    x, t = _batch(3, (2, 5, 19))
    t[:] = IGN
    l_i, g_i, y_i, m = _run(path, x, t, True, **dict(CFG, selection=selection))
    assert float(l_i) == 0.0 and int(m["tokens_selected"]) == 0
    assert (g_i == 0).all() and (y_i == 0).all()


def test_reference_path_leaves_the_logits_intact():
    """The permission is unused without a kernel: the PyTorch reference computes a dense gradient."""
    x, t = _batch(4, (2, 6, 23), poison=False)
    l_r, g_r, y_r, _ = _run("reference", x, t, True, **CFG)
    l_k, g_k, _, _ = _run("fused", x, t, True, **CFG)
    assert torch.equal(y_r.cpu(), x)
    np.testing.assert_allclose(float(l_r), float(l_k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_r, g_k, rtol=1e-4, atol=1e-6)


def test_module_form_and_leaf_logits_alias_their_gradient():
    """``CGGRLoss(inplace_backward=True)`` on leaf logits: the gradient is the logits' own storage (no N·V
    allocation), equal to the dense module's; the setting shows in ``repr``."""
    x, t = _batch(5, (3, 4, 31), torch.bfloat16)
    crit = CGGRLoss(inplace_backward=True, **CFG)
    crit.set_step(STEP)
    assert crit.inplace_backward and "inplace_backward=True" in repr(crit)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    with dispatch.force("kernel"):
        crit(leaf, t.to(DEVICE)).backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    _, g_d, _, _ = _run("fused", x, t, False, **CFG)
    assert torch.equal(leaf.grad.cpu(), g_d)
    assert "inplace_backward" not in repr(CGGRLoss(**CFG))


@pytest.mark.parametrize("path", ["fused", "composable"])
def test_sliced_and_permuted_logits(path):
    """``logits[:, :-1]`` of a (B, T+1, V) tensor and a (T, B, V) tensor viewed as (B, T, V): both can hold
    their gradient in place; the gradient reaches the full tensor (zeros in the unused column)."""
    x, t = _batch(6, (2, 6, 17), poison=False)
    want = _run(path, x[:, :-1].contiguous(), t[:, :-1], False, **CFG)[1]
    full = x.clone().to(DEVICE).requires_grad_(True)
    with dispatch.force(**PATHS[path]):
        cggr_loss((full * 1)[:, :-1], t[:, :-1].to(DEVICE), STEP, inplace_backward=True, **CFG)[0].backward()
    assert torch.equal(full.grad[:, :-1].cpu(), want) and (full.grad[:, -1] == 0).all()
    tb = x.transpose(0, 1).contiguous().to(DEVICE).requires_grad_(True)     # (T, B, V) storage
    with dispatch.force(**PATHS[path]):
        cggr_loss((tb * 1).transpose(0, 1), t.to(DEVICE), STEP, inplace_backward=True, **CFG)[0].backward()
    assert torch.equal(tb.grad.transpose(0, 1).cpu(), _run(path, x, t, False, **CFG)[1])


# ------------------------------------------------------------------------------------- autograd safety
def _inplace_loss(y: torch.Tensor, t: torch.Tensor, selection: str = "topk") -> torch.Tensor:
    with dispatch.force("kernel"):
        return cggr_loss(y, t.to(DEVICE), STEP, inplace_backward=True, **dict(CFG, selection=selection))[0]


@pytest.mark.parametrize("selection", ["topk", "sampled"])
@pytest.mark.parametrize("other", ["product", "view", "exp"])
def test_other_users_that_saved_the_logits_raise(selection, other):
    """A node that saved the logits (or a view, or an output that *is* the logits) and runs after the
    in-place backward raises PyTorch's error instead of reading the gradient."""
    x, t = _batch(7, (2, 5, 13), poison=False)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    if other == "exp":
        y = torch.exp(leaf)                              # ExpBackward saved its output: the logits themselves
        extra = torch.zeros((), device=DEVICE)
    else:
        y = leaf * 1
        extra = (y * y).sum() if other == "product" else (y[:, :2, :4] ** 2).sum()
    loss = _inplace_loss(y, t, selection)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + extra).backward()


def test_users_that_do_not_need_the_logits_get_the_right_gradient():
    """``log_softmax`` (it saves its output) and a float32 copy in a second loss never read the logits in
    their backward: the summed gradient equals the dense one, whatever the order the engine runs them."""
    x, t = _batch(8, (2, 5, 13), poison=False)
    grads = []
    for inplace in (False, True):
        leaf = x.clone().to(DEVICE).requires_grad_(True)
        y = leaf * 1
        second = F.cross_entropy(y.reshape(-1, 13).float(), t.reshape(-1).clamp(min=0).to(DEVICE))
        third = torch.log_softmax(y, dim=-1)[..., 0].sum()
        with dispatch.force("kernel"):
            loss = cggr_loss(y, t.to(DEVICE), STEP, inplace_backward=inplace, **CFG)[0]
        (second + loss + third).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_second_backward_and_second_loss_raise():
    x, t = _batch(9, (2, 5, 13), poison=False)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    y = leaf * 1
    loss = _inplace_loss(y, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    # two in-place losses on the same logits: whichever runs second finds the logits modified
    leaf2 = x.clone().to(DEVICE).requires_grad_(True)
    y2 = leaf2 * 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (_inplace_loss(y2, t) + _inplace_loss(y2, t, "sampled")).backward()


def test_compile():
    """Eager only: ``fullgraph=True`` raises with the reason; a plain ``torch.compile`` breaks the graph and runs
    the loss eagerly, in place, with the dense values."""
    x, t = _batch(10, (2, 4, 11), poison=False)
    crit = CGGRLoss(inplace_backward=True, **CFG)
    crit.set_step(STEP)
    with dispatch.force("kernel"):
        leaf = x.clone().to(DEVICE).requires_grad_(True)
        with pytest.raises(Exception, match="inplace_backward"):
            torch.compile(lambda a, b: crit(a * 1, b), fullgraph=True)(leaf, t.to(DEVICE))
        torch._dynamo.reset()
        loss = torch.compile(lambda a, b: crit(a * 1, b))(leaf, t.to(DEVICE))
        loss.backward()
    torch._dynamo.reset()
    l_d, g_d, _, _ = _run("fused", x, t, False, **CFG)
    assert float(loss.detach()) == float(l_d) and torch.equal(leaf.grad.cpu(), g_d)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x, t = _batch(11, (13, 29), poison=False)
    xd, td = x.to(DEVICE), t.to(DEVICE)
    for path in ("fused", "composable", "reference"):
        with dispatch.force(**PATHS[path]) if path in PATHS else dispatch.force("reference"):
            with pytest.raises(ValueError, match="logits.*unit stride"):
                cggr_loss(xd.t().contiguous().t(), td, STEP, inplace_backward=True)
            with pytest.raises(ValueError, match="logits.*overlap"):
                cggr_loss(xd[:1].expand(13, 29), td, STEP, inplace_backward=True)
            with pytest.raises(ValueError, match="inplace_backward"):
                cggr_loss(xd, td, STEP, inplace_backward=1)
    with pytest.raises(ValueError, match="inplace_backward"):
        CGGRLoss(inplace_backward="yes")
    with pytest.raises(ValueError, match="inplace_backward.*DistributedCGGRLoss"):
        DistributedCGGRLoss(inplace_backward=True)
    # the fused-path building blocks: the geometry must be of the logits themselves, not of a copy
    geom = ks.row_geometry(xd.detach().clone())
    n = 13
    f32 = torch.zeros(n, device=DEVICE)
    sel = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    tf = ks.flat_targets(td)
    with pytest.raises(ValueError, match="geom"):
        kce.scored_selective_cross_entropy(xd, geom, tf, sel, f32, f32, torch.zeros(1, dtype=torch.int64,
                                                                                     device=DEVICE),
                                           inplace_backward=True)
    with pytest.raises(ValueError, match="row_weights"):
        kce.weighted_selective_cross_entropy(xd, ks.row_geometry(xd), tf, sel, f32, f32[:5], f32[0],
                                             inplace_backward=True)
    with pytest.raises(ValueError, match="loss"):
        kce.weighted_selective_cross_entropy(xd, ks.row_geometry(xd), tf, sel, f32, f32, f32[:2])
    with pytest.raises(ValueError, match="logits.*overlap"):
        kce.check_inplace_logits(xd[:1].expand(13, 29))
    kce.check_inplace_logits(torch.zeros(3, 1, 5)[:, :, :4].transpose(0, 1))   # gaps and permutations are fine


# ------------------------------------------------------------------------------------------ raw kernels
def _f64_reference(x: torch.Tensor, t: torch.Tensor, sel: torch.Tensor, w: torch.Tensor | None,
                   scale: float) -> tuple[float, torch.Tensor]:
    """float64 Σ_S ω·nll (or the mean over S) and its gradient times ``scale``, by autograd on rows of S only."""
    z = x.detach().double().cpu().reshape(-1, x.shape[-1]).requires_grad_(True)
    tt, s = t.reshape(-1).cpu(), sel.reshape(-1).cpu()
    nll = F.cross_entropy(z[s], tt[s], reduction="none")
    loss = (nll * w.reshape(-1).cpu().double()[s]).sum() if w is not None else nll.sum() / max(1, int(s.sum()))
    (loss * scale).backward()
    return float(loss.detach()), z.grad.reshape(x.shape)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_raw_kernel_inplace_with_and_without_row_weights(dtype, weighted):
    """``selective_cross_entropy_triton(inplace_backward=True)`` (default launch shapes) and the fused sampled
    path's ``weighted_selective_cross_entropy``: float64 reference, dense twin, poisoned unselected rows."""
    x, t = _batch(12, (3, 5, 41), DTYPES[dtype])
    g = torch.Generator().manual_seed(0)
    sel = (torch.rand(t.shape, generator=g) < 0.5) & (t != IGN)
    sel.view(-1)[1:4] = False                            # the non-finite rows are never selected
    sel.view(-1)[4] = t.view(-1)[4] != IGN
    w = torch.where(sel, torch.rand(t.shape, generator=g) + 0.5, torch.zeros(()))
    want_loss, want_grad = _f64_reference(x, t, sel, w if weighted else None, 1.7)
    tol = GRAD_TOL[dtype]
    out = {}
    for inplace in (False, True):
        leaf = x.clone().to(DEVICE).requires_grad_(True)
        y = leaf * 1
        kw = dict(row_weights=w.to(DEVICE)) if weighted else {}
        loss = kce.selective_cross_entropy_triton(y, t.to(DEVICE), sel.to(DEVICE), ignore_index=IGN,
                                                  inplace_backward=inplace, **kw)
        (loss * 1.7).backward()
        out[inplace] = (loss.detach(), leaf.grad, y.detach())
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(as_f64(leaf.grad.cpu()), want_grad.numpy(), atol=tol[0], rtol=tol[1])
        assert (leaf.grad.cpu()[~sel] == 0).all()
    assert torch.equal(out[True][1], out[False][1]) and torch.equal(out[True][2], out[True][1])
    if weighted:   # the fused sampled path's building block: the loss value given, the same gradient
        leaf = x.clone().to(DEVICE).requires_grad_(True)
        y = leaf * 1
        lse = torch.logsumexp(y.detach().float(), dim=-1).reshape(-1)
        given = torch.tensor(want_loss, dtype=torch.float32, device=DEVICE)
        loss = kce.weighted_selective_cross_entropy(y, ks.row_geometry(y.detach()), ks.flat_targets(t.to(DEVICE)),
                                                    sel.reshape(-1).to(DEVICE), lse, w.reshape(-1).to(DEVICE),
                                                    given, inplace_backward=True)
        (loss * 1.7).backward()
        assert float(loss.detach()) == float(given) and loss.requires_grad
        np.testing.assert_allclose(as_f64(leaf.grad.cpu()), want_grad.numpy(), atol=tol[0], rtol=tol[1])
        assert torch.equal(y.detach(), leaf.grad) and torch.isfinite(leaf.grad).all()
