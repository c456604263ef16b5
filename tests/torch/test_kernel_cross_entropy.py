"""The selective cross-entropy kernel (cggr_torch.kernels.cross_entropy): loss and sparse gradient.

References: the float64 oracle's ``cggr_loss`` (loss, gradient and mask given the kernel's own float32
difficulties) and a float64 PyTorch cross-entropy over the selected rows. Runs in the Triton interpreter on
CPU tensors, or on CUDA when the interpreter is off and a GPU is present.
"""
from __future__ import annotations

import os

# tests/conftest.py selects the Triton interpreter on machines without an NVIDIA GPU.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from cggr_torch import selection as ref_selection  # noqa: E402
from cggr_torch.kernels import cross_entropy as kce  # noqa: E402
from cggr_torch.kernels import scoring as ks  # noqa: E402
from tests.torch import assert_range_check_fails, kernel_test_device  # noqa: E402
from tests import oracle  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = kernel_test_device()

V = 37
IGN = -100
FWD = ks.LaunchConfig(rows=4, group=4, num_warps=1)    # 16-wide blocks: 16 + 16 + ragged 5
BWD = ks.LaunchConfig(rows=4, group=4, num_warps=1)    # backward grid (N, 3)
BWD_FLAT = ks.LaunchConfig(rows=4, group=4, num_warps=1, flat_grid=True)    # backward grid (3·N,), row-major


def reference(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, scale: float = 1.0,
              ignore_index: int = IGN) -> tuple[float, torch.Tensor]:
    """float64 loss Σ_S nll / max(1, |S|) and its gradient w.r.t. x (S = mask ∧ target valid)."""
    xd = x.detach().to(torch.float64).cpu().requires_grad_(True)
    tt = t.cpu().reshape(-1)
    sel = mask.cpu().reshape(-1) & (tt != ignore_index)
    z = xd.reshape(-1, x.shape[-1])
    nll = F.cross_entropy(z[sel], tt[sel], reduction="sum") if sel.any() else z.sum() * 0
    loss = nll / max(1, int(sel.sum()))
    (loss * scale).backward()
    return float(loss.detach()), xd.grad


def run(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0,
        **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().to(DEVICE).requires_grad_(True)
    y = leaf * 1                                         # non-leaf, like a model's logits
    loss = kce.selective_cross_entropy_triton(y, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN,
                                              forward_config=FWD, backward_config=BWD, **kw)
    (loss * scale).backward()
    return loss.detach(), leaf.grad


def data(n: int = 13, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    mask[0] = mask[1] = True
    mask[2] = False
    t[1] = IGN                                           # masked but ignored: never in the loss
    x[3, 36] = 40.0                                      # max in the ragged last block
    mask[3] = True
    return x, t, mask


def test_end_to_end_against_oracle() -> None:
    """Kernel scores → select_tokens → selective CE equals the oracle's cggr_loss fed the same difficulties."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 11, V, generator=g) * 2
    t = torch.randint(0, V, (3, 11), generator=g)
    t[0, :3] = IGN
    x[2, 4, 9] = float("nan")                            # non-finite valid row: ineligible, zero gradient
    xd, td = x.to(DEVICE), t.to(DEVICE)
    sc = ks.score_tokens_triton(xd, td, scoring="combined", ignore_index=IGN, config=FWD)
    res = oracle.cggr_loss(x.numpy().astype(np.float64), t.numpy(), step=1000, ignore_index=IGN,
                           selection="stratified", difficulty_override=sc.difficulty.cpu().numpy())
    assert np.array_equal(sc.eligible.cpu().numpy(), res["scores"]["eligible"])
    mask, k = ref_selection.select_tokens(sc.difficulty, sc.eligible, torch.tensor(res["ratio"], device=DEVICE),
                                          selection="stratified")
    assert int(k) == res["k"] and np.array_equal(mask.cpu().numpy(), res["mask"])
    assert 0 < int(k) < int(sc.eligible.sum())
    for lse in (None, sc.stats.lse):
        loss, grad = run(x, t, mask, lse=lse)
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert abs(float(loss.detach()) - res["loss"]) <= 1e-5 + 1e-4 * abs(res["loss"])
        want = torch.from_numpy(res["grad"])
        torch.testing.assert_close(grad.cpu().to(torch.float64), want, atol=1e-5, rtol=1e-4)
        assert torch.isfinite(grad).all()
        unselected = ~mask.cpu()
        assert (grad.cpu()[unselected] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dtypes_and_lse_paths(dtype: torch.dtype) -> None:
    x, t, mask = data(seed=1, dtype=dtype)
    want_loss, want_grad = reference(x, t, mask)
    loss, grad = run(x, t, mask)
    assert grad.dtype == dtype
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    tol = {torch.float32: (1e-6, 1e-4), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-6, 8e-3)}[dtype]
    torch.testing.assert_close(grad.cpu().to(torch.float64), want_grad, atol=tol[0], rtol=tol[1])
    sel = mask & (t != IGN)
    assert (grad.cpu()[~sel] == 0).all()
    # with the scoring pass's lse: same loss (one gather) and same gradient
    lse = ks.token_statistics_triton(x.to(DEVICE), t.to(DEVICE), IGN, config=FWD).lse
    loss2, grad2 = run(x, t, mask, lse=lse)
    assert abs(float(loss2) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    torch.testing.assert_close(grad2.cpu().to(torch.float64), want_grad, atol=tol[0], rtol=tol[1])


def test_inplace_backward_overwrites_logits() -> None:
    x, t, mask = data(seed=2)
    want_loss, want_grad = reference(x, t, mask, scale=2.5)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    y = leaf * 1
    loss = kce.selective_cross_entropy_triton(y, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN,
                                              inplace_backward=True, forward_config=FWD, backward_config=BWD)
    assert (y.detach().cpu()[~mask] != 0).any()          # poison: unselected logits rows hold data
    (loss * 2.5).backward(retain_graph=True)
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    torch.testing.assert_close(leaf.grad.cpu().to(torch.float64), want_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(y.detach().cpu(), leaf.grad.cpu(), atol=0, rtol=0)   # the buffer is the gradient
    assert (y.detach().cpu()[~(mask & (t != IGN))] == 0).all()
    with pytest.raises(RuntimeError, match="inplace"):       # the saved logits now hold the gradient
        loss.backward()
    # same values as the allocating backward
    _, grad2 = run(x, t, mask, scale=2.5)
    torch.testing.assert_close(leaf.grad, grad2, atol=0, rtol=0)


def test_inplace_detects_other_users_of_the_logits() -> None:
    """The logits' version counter is bumped, so an autograd node that saved them fails loudly."""
    x, t, mask = data(seed=3)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    y = leaf * 1
    other = (y * y).sum()                                # saves y; its backward runs after ours
    loss = kce.selective_cross_entropy_triton(y, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN,
                                              inplace_backward=True, forward_config=FWD, backward_config=BWD)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_poisoned_gradient_buffer_is_fully_written() -> None:
    x, t, mask = data(seed=4)
    xd = x.to(DEVICE)
    geom = ks.row_geometry(xd)
    tf = ks.flat_targets(t.to(DEVICE))
    sel = (mask.to(DEVICE) & (tf != IGN)).to(torch.uint8)
    lse = torch.logsumexp(xd.float(), dim=-1)
    scale = torch.full((1,), 1.0 / float(sel.sum()), device=DEVICE)
    grad = torch.full_like(xd, float("nan"))
    kce.launch_selective_backward(geom, tf, sel, lse, scale, grad, BWD)
    _, want = reference(x, t, mask)
    assert not torch.isnan(grad).any()
    torch.testing.assert_close(grad.cpu().to(torch.float64), want, atol=1e-6, rtol=1e-4)
    nll = torch.full((13,), float("nan"), device=DEVICE)
    lse_out = torch.full((13,), float("nan"), device=DEVICE)
    kce.launch_selective_forward(geom, tf, sel, None, nll, lse_out, FWD)
    s = sel.bool()
    torch.testing.assert_close(lse_out[s], lse[s], atol=1e-5, rtol=1e-6)
    assert (nll[~s] == 0).all() and (lse_out[~s] == 0).all()


@pytest.mark.parametrize("bwd", [BWD, BWD_FLAT], ids=["grid2d", "flat"])
def test_strided_slice_and_3d(bwd: ks.LaunchConfig) -> None:
    """``logits[:, :-1]`` of a (B, T+1, V) tensor: read in place, the gradient reaches the full tensor."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 6, V, generator=g)
    t = torch.randint(0, V, (2, 5), generator=g)
    t[1, 2] = IGN
    mask = torch.rand(2, 5, generator=g) < 0.6
    mask[0, 0] = True
    want_loss, want_grad = reference(full[:, :-1], t, mask)
    for inplace in (False, True):
        leaf = full.clone().to(DEVICE).requires_grad_(True)
        y = (leaf * 1)[:, :-1]
        loss = kce.selective_cross_entropy_triton(y, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN,
                                                  inplace_backward=inplace, forward_config=FWD, backward_config=bwd)
        loss.backward()
        assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
        torch.testing.assert_close(leaf.grad.cpu()[:, :-1].to(torch.float64), want_grad, atol=1e-6, rtol=1e-4)
        assert (leaf.grad[:, -1] == 0).all()


def test_nothing_selected_and_empty() -> None:
    x, t, _ = data(seed=6)
    x[4, 5] = float("nan")                               # an unselected non-finite row never leaks NaN
    for mask in (torch.zeros(13, dtype=torch.bool), torch.ones(13, dtype=torch.bool) & (torch.arange(13) == 1)):
        loss, grad = run(x, t, mask)                     # row 1 is masked but ignored
        assert float(loss.detach()) == 0.0 and (grad == 0).all()
    t_all = torch.full((13,), IGN)
    loss, grad = run(x, t_all, torch.ones(13, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and (grad == 0).all()
    loss, grad = run(torch.zeros(0, V), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and grad.shape == (0, V)
    x3 = torch.zeros(2, 0, V, device=DEVICE, requires_grad=True)
    loss = kce.selective_cross_entropy_triton(x3, torch.zeros(2, 0, dtype=torch.long, device=DEVICE),
                                              torch.zeros(2, 0, dtype=torch.bool, device=DEVICE),
                                              inplace_backward=True)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_unselected_nonfinite_rows_do_not_poison() -> None:
    x, t, mask = data(seed=7)
    mask[5] = False
    x[5] = float("nan")
    x[6, :] = float("-inf")
    mask[6] = False
    want_loss, want_grad = reference(x, t, mask)
    loss, grad = run(x, t, mask)
    assert np.isfinite(float(loss.detach())) and abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    assert (grad[5] == 0).all() and (grad[6] == 0).all()
    torch.testing.assert_close(grad.cpu().to(torch.float64), want_grad, atol=1e-6, rtol=1e-4)


def test_default_configs() -> None:
    """The heuristic launch shapes (one ragged block per row here)."""
    x, t, mask = data(seed=8, dtype=torch.bfloat16)
    want_loss, want_grad = reference(x, t, mask)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    loss = kce.selective_cross_entropy_triton(leaf, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN)
    loss.backward()
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    torch.testing.assert_close(leaf.grad.cpu().to(torch.float64), want_grad, atol=1e-6, rtol=8e-3)


def test_bad_input() -> None:
    x, t, mask = (a.to(DEVICE) for a in data(seed=9))
    f = kce.selective_cross_entropy_triton
    with pytest.raises(ValueError, match="mask"):
        f(x, t, mask.float())
    with pytest.raises(ValueError, match="mask"):
        f(x, t, mask[:5])
    with pytest.raises(ValueError, match="lse"):
        f(x, t, mask, lse=torch.zeros(13, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="lse"):
        f(x, t, mask, lse=torch.zeros(12, device=DEVICE))
    with pytest.raises(ValueError, match="targets"):
        f(x, t.float(), mask)
    with pytest.raises(ValueError, match="logits"):
        f(x.to(torch.int32), t, mask)
    with pytest.raises(ValueError, match="ignore_index"):
        f(x, t, mask, ignore_index=None)
    with pytest.raises(ValueError, match="inplace_backward"):
        f(x, t, mask, inplace_backward=1)
    with pytest.raises(ValueError, match="unit stride"):
        f(torch.randn(V, 13, device=DEVICE).t(), t, mask, inplace_backward=True)
    with pytest.raises(ValueError, match="overlap"):
        f(torch.randn(1, V, device=DEVICE).expand(13, V), t, mask, inplace_backward=True)
    # a valid target outside [0, V): ValueError under the interpreter, a device-side assertion on CUDA
    assert_range_check_fails(
        "from cggr_torch.kernels import cross_entropy as kce\n"
        f"x = torch.randn(13, {V}, device=dev)\n"
        "t = torch.zeros(13, dtype=torch.int64, device=dev)\n"
        f"t[3] = {V}\n"
        "kce.selective_cross_entropy_triton(x, t, torch.ones(13, dtype=torch.bool, device=dev))\n",
        rf"targets: every value must lie in \[0, {V}\)")


def test_transposed_logits_are_copied_not_misread() -> None:
    g = torch.Generator().manual_seed(10)
    base = torch.randn(V, 9, generator=g)
    t = torch.randint(0, V, (9,), generator=g)
    mask = torch.ones(9, dtype=torch.bool)
    xt = base.t()
    want_loss, want_grad = reference(xt, t, mask)
    leaf = base.clone().to(DEVICE).requires_grad_(True)
    loss = kce.selective_cross_entropy_triton(leaf.t(), t.to(DEVICE), mask.to(DEVICE), forward_config=FWD,
                                              backward_config=BWD)
    loss.backward()
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    torch.testing.assert_close(leaf.grad.cpu().t().to(torch.float64), want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cfg", [ks.LaunchConfig(4, 4, 1, blocks_per_program=2),
                                 ks.LaunchConfig(4, 4, 1, blocks_per_program=4, store_hint=".cs"),
                                 ks.LaunchConfig(2, 4, 1, store_hint=".cg"),
                                 ks.LaunchConfig(4, 4, 1, flat_grid=True),
                                 ks.LaunchConfig(4, 4, 1, blocks_per_program=2, store_hint=".cs", flat_grid=True),
                                 ks.LaunchConfig(4, 4, 1, blocks_per_program=4, flat_grid=True)],
                         ids=["bpp2", "bpp4-cs", "block8-cg", "flat", "flat-bpp2-cs", "flat-bpp4-one-group"])
def test_backward_launch_variants(cfg: ks.LaunchConfig) -> None:
    """Blocks per program, store cache modifiers and the flat grid change the schedule only: the same gradient
    (``flat-bpp4-one-group``: one column group per row, so the flat grid is one program per row)."""
    x, t, mask = data(seed=12, dtype=torch.bfloat16)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    loss = kce.selective_cross_entropy_triton(leaf, t.to(DEVICE), mask.to(DEVICE), ignore_index=IGN,
                                              forward_config=FWD, backward_config=cfg)
    loss.backward()
    _, want = run(x, t, mask)
    torch.testing.assert_close(leaf.grad, want, atol=0, rtol=0)


def test_scored_selective_cross_entropy_and_masked_mean() -> None:
    """The fused path's loss: masked mean of the scoring pass's nll, count written on the device, the
    backward scaled by g/|S| read from that count."""
    x, t, mask = data(seed=13)
    t[1] = 4                                             # every selected row valid (the caller guarantees it)
    xd, td = x.to(DEVICE), t.to(DEVICE)
    geom = ks.row_geometry(xd)
    tf = ks.flat_targets(td)
    out = torch.empty((6, 13), device=DEVICE)
    fin = torch.empty((13,), dtype=torch.int8, device=DEVICE)
    ks.launch_scoring(geom, tf, IGN, -1, out, fin, FWD)
    out[4, ~mask.to(DEVICE)] = float("nan")              # unselected nll never reaches the loss
    want_loss, want_grad = reference(x, t, mask, scale=3.0)
    leaf = x.clone().to(DEVICE).requires_grad_(True)
    count = torch.full((1,), -1, dtype=torch.int64, device=DEVICE)
    loss = kce.scored_selective_cross_entropy(leaf, ks.row_geometry(leaf.detach()), tf, mask.to(DEVICE).contiguous(),
                                              out[0], out[4], count, backward_config=BWD)
    (loss * 3.0).backward()
    assert int(count) == int(mask.sum())
    assert abs(float(loss.detach()) - want_loss) <= 1e-5 + 1e-5 * abs(want_loss)
    torch.testing.assert_close(leaf.grad.cpu().to(torch.float64), want_grad, atol=1e-6, rtol=1e-4)
    # nothing selected: 0 loss, zero gradient; a long masked mean (several program steps) is exact in count
    leaf.grad = None
    none = torch.zeros(13, dtype=torch.bool, device=DEVICE)
    loss0 = kce.scored_selective_cross_entropy(leaf, geom, tf, none, out[0], out[4], count)
    loss0.backward()
    assert float(loss0.detach()) == 0.0 and int(count) == 0 and (leaf.grad == 0).all()
    m = torch.rand(9000, generator=torch.Generator().manual_seed(1)) < 0.3
    v = torch.rand(9000, generator=torch.Generator().manual_seed(2))
    lo = torch.empty((), device=DEVICE)
    kce.launch_masked_mean(m.to(DEVICE), v.to(DEVICE), lo, count)
    assert int(count) == int(m.sum())
    assert abs(float(lo) - float(v[m].double().mean())) <= 1e-6
    with pytest.raises(ValueError, match="selected"):
        kce.scored_selective_cross_entropy(leaf, geom, tf, mask.float().to(DEVICE), out[0], out[4], count)
    with pytest.raises(ValueError, match="count"):
        kce.scored_selective_cross_entropy(leaf, geom, tf, mask.to(DEVICE), out[0], out[4], count.int())


@pytest.mark.parametrize("with_count", [False, True], ids=["scale", "count"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_flat_grid_backward_writes_every_element(dtype: torch.dtype, with_count: bool) -> None:
    """The row-major 1-D grid against the float64 reference and, bit for bit, against the 2-D grid: a NaN
    gradient buffer is fully overwritten (ragged last block included), ignored / unselected rows - NaN and
    ±inf ones among them - get exact zeros, ``g/|S|`` from a host scalar or from the device count."""
    x, t, mask = data(seed=14, dtype=dtype)
    t[0] = V - 1                                         # a selected target in the ragged last block
    x[5] = float("nan")
    x[6] = float("-inf")
    x[7, 2] = float("inf")
    mask[5:8] = False
    xd = x.to(DEVICE)
    geom = ks.row_geometry(xd)
    tf = ks.flat_targets(t.to(DEVICE))
    sel = (mask.to(DEVICE) & (tf != IGN)).to(torch.uint8)
    n_sel = int(sel.sum())
    lse = torch.logsumexp(xd.float(), dim=-1)
    g = 2.5
    if with_count:
        scale = torch.full((1,), g, device=DEVICE)
        kw = {"count": torch.full((1,), n_sel, dtype=torch.int64, device=DEVICE)}
    else:
        scale = torch.full((1,), g / n_sel, device=DEVICE)
        kw = {}
    grads = {}
    for cfg in (BWD_FLAT, BWD):
        grads[cfg.flat_grid] = torch.full_like(xd, float("nan"))
        kce.launch_selective_backward(geom, tf, sel, lse, scale, grads[cfg.flat_grid], cfg, **kw)
    grad = grads[True]
    assert not torch.isnan(grad).any()
    assert (grad.cpu()[~sel.bool().cpu()] == 0).all()
    _, want = reference(x, t, mask, scale=g)
    tol = {torch.float32: (1e-6, 1e-4), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-6, 8e-3)}[dtype]
    torch.testing.assert_close(grad.cpu().to(torch.float64), want, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(grad, grads[False], atol=0, rtol=0)


def test_flat_grid_config_and_grid_limits() -> None:
    """``flat_grid`` is a validated, labelled field (on in the default backward launch); grids beyond CUDA's limits (x ≤ 2^31 − 1,
    y ≤ 65535 programs) raise before any launch (views with stride 0 stand in for huge tensors)."""
    assert ks.LaunchConfig(4, 4, 1, flat_grid=True).describe() == "4x4 1w flat"
    assert BWD.describe() == "4x4 1w"
    with pytest.raises(ValueError, match="LaunchConfig.flat_grid"):
        ks.LaunchConfig(4, 4, 1, flat_grid=1)
    default = ks.backward_config(128256, torch.bfloat16)        # the H200-measured default (run 9)
    assert default.flat_grid and default.store_hint == ".cs"

    def launch(n: int, vocab: int, cfg: ks.LaunchConfig) -> None:
        x = torch.zeros(1, vocab, device=DEVICE).expand(n, vocab)
        small = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        kce.launch_selective_backward(ks.row_geometry(x), small, small.to(torch.uint8),
                                      torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE),
                                      torch.zeros(1, vocab, device=DEVICE).expand(n, vocab), cfg)

    with pytest.raises(ValueError, match="flat grid: N·G"):
        launch(2**30, V, BWD_FLAT)                       # 3 column groups: 3·2^30 programs
    with pytest.raises(ValueError, match="N = 2147483648 rows"):
        launch(2**31, V, BWD)
    v_big = 16 * 65535 + 1                               # 65536 column groups of 16
    with pytest.raises(ValueError, match="y limit 65535"):
        launch(2, v_big, BWD)
