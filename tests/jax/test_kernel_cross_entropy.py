"""The Pallas selective cross-entropy (``cggr_jax.kernels.cross_entropy``) in interpreter mode.

Loss and ∂loss/∂logits against ``jax.grad`` of a plain-JAX reference and against the float64 oracle formula
(SPEC §8: ``(softmax − onehot)/|S|`` on selected rows, exactly 0 elsewhere); the scores → selection → loss
pipeline against ``oracle.select_tokens`` fed with the kernel's own float32 difficulties. The backward
kernel's tiles: several rows per program with N not a multiple of ``block_rows``, ragged column tiles, a
tile wider than V; on the GPU path (Triton IR inspected on CPU) every store of a ragged tile is masked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax.kernels import Launch, selective_cross_entropy_pallas, token_statistics_pallas
from cggr_jax.pipeline import scored_selective_cross_entropy as scored_selective_cross_entropy_pallas
from cggr_jax.scoring import TokenStatistics, difficulty_from_statistics
from tests import oracle

IGNORE = -100
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# gradient tolerance (atol, rtol) by logits dtype: SPEC §11 level 4 for fp32; the rounding of the stored
# gradient (2^-11, 2^-8 relative) for fp16/bf16
GRAD_TOL = {"float32": (1e-5, 1e-4), "float16": (1e-5, 2e-3), "bfloat16": (1e-5, 8e-3)}


def make_batch(dtype, n: int = 23, v: int = 203, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, size=(n, v)).astype(np.float32)
    t = rng.integers(0, v, size=n).astype(np.int32)
    mask = rng.random(n) < 0.45
    z[0, v - 1] = 20.0; t[0] = v - 1; mask[0] = True      # target and maximum in the ragged block
    z[1, ::4] = -np.inf; t[1] = 1; mask[1] = True          # masked vocabulary entries in a selected row
    t[2] = IGNORE; mask[2] = True                          # ignored token inside the mask: never selected
    z[3, 7] = np.nan; mask[3] = False                      # non-finite rows outside the selection
    z[4, 9] = np.inf; mask[4] = False
    z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32))
    return z, t, mask


def oracle_loss_grad(z: np.ndarray, t: np.ndarray, sel: np.ndarray) -> tuple[float, np.ndarray]:
    """SPEC §8 in float64 for a given selection ``sel`` (already restricted to valid finite tokens)."""
    z64 = z.astype(np.float64).reshape(-1, z.shape[-1])
    tf, sf = t.reshape(-1), sel.reshape(-1)
    count = int(sf.sum())
    grad = np.zeros_like(z64)
    total = 0.0
    for i in np.nonzero(sf)[0]:
        row = z64[i]
        m = row.max()
        lse = m + np.log(np.exp(row - m).sum())
        total += lse - row[tf[i]]
        p = np.exp(row - lse)
        p[tf[i]] -= 1.0
        grad[i] = p / count
    return total / max(1, count), grad.reshape(z.shape)


def xla_reference(logits: jax.Array, targets: jax.Array, sel: jax.Array) -> jax.Array:
    """Plain JAX masked-mean cross-entropy (differentiated with jax.grad as the reference)."""
    x = logits.astype(jnp.float32)
    x = jnp.where(sel[..., None], x, 0.0)  # unselected (possibly non-finite) rows carry no gradient
    safe_t = jnp.where(sel, targets, 0)
    lse = jax.nn.logsumexp(x, axis=-1)
    z_t = jnp.take_along_axis(x, safe_t[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(sel), 1)
    return jnp.sum(jnp.where(sel, lse - z_t, 0.0)) / count


def check_against_references(loss, grad, z, t, sel, dtype: str, logits) -> None:
    ref_loss, ref_grad = oracle_loss_grad(z, t, sel)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, atol=1e-5, rtol=1e-5)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    g = np.asarray(grad.astype(jnp.float32), np.float64)
    atol, rtol = GRAD_TOL[dtype]
    np.testing.assert_allclose(g, ref_grad, atol=atol, rtol=rtol)
    assert (g[~sel] == 0).all(), "unselected rows must have an exactly zero gradient"
    x_loss, x_grad = jax.value_and_grad(xla_reference)(jnp.asarray(z), jnp.asarray(t), jnp.asarray(sel))
    np.testing.assert_allclose(float(loss), float(x_loss), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(g, np.asarray(x_grad, np.float64), atol=atol, rtol=rtol)


#: Per dtype (23 × 203 batch): the backward tiles — R = 4 (23 = 5·4 + 3: a ragged last row block) with ragged
#: 64-wide column tiles; R = 2 with one 256-wide tile per row block (wider than V); R = 8 with 32-wide tiles —
#: and the launch of the row-masked forward (single- and multi-row programs).
CASES = {
    "float32": (dict(block_rows=4, block_v=64, num_warps=2), Launch(block_v=64)),
    "bfloat16": (dict(block_rows=2, block_v=256, num_warps=4), Launch(block_rows=4, block_v=64, num_warps=4)),
    "float16": (dict(block_rows=8, block_v=32, num_warps=1), Launch(block_v=32)),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_loss_and_grad(dtype: str) -> None:
    backward, forward = CASES[dtype]
    z, t, mask = make_batch(DTYPES[dtype])
    assert z.shape[0] % backward["block_rows"] != 0
    logits = jnp.asarray(z, DTYPES[dtype])
    fn = jax.jit(jax.value_and_grad(
        lambda x: selective_cross_entropy_pallas(x, jnp.asarray(t), jnp.asarray(mask), interpret=True,
                                                 scoring_launch=forward, **backward)))
    loss, grad = fn(logits)
    sel = mask & (t != IGNORE)
    assert sel[-3:].any()  # the ragged last row block holds selected rows
    check_against_references(loss, grad, z, t, sel, dtype, logits)


def test_default_launches_bf16() -> None:
    """The default launches (scoring: 1024-column steps; backward: one 4096-column tile per program, so V =
    4099 gives a full tile and a 3-column ragged one) on bf16 logits, with the statistics reused."""
    rng = np.random.default_rng(9)
    z = rng.normal(0.0, 3.0, size=(5, 4099)).astype(np.float32)
    z[0, 4098] = 20.0
    z = np.asarray(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32))
    t = np.array([4098, 4097, 5, IGNORE, 2], np.int32)
    mask = np.array([True, True, False, True, True])
    logits, tj, mj = jnp.asarray(z, jnp.bfloat16), jnp.asarray(t), jnp.asarray(mask)

    def fn(x):
        stats = token_statistics_pallas(jax.lax.stop_gradient(x), tj, interpret=True)
        return selective_cross_entropy_pallas(x, tj, mj, stats=stats, interpret=True)

    loss, grad = jax.jit(jax.value_and_grad(fn))(logits)
    check_against_references(loss, grad, z, t, mask & (t != IGNORE), "bfloat16", logits)


def test_reusing_stats_equals_recomputing() -> None:
    """``stats=`` from the scoring kernel (no second read) gives the same loss and gradient."""
    z, t, mask = make_batch(jnp.float32, seed=1)
    logits, tj, mj = jnp.asarray(z), jnp.asarray(t), jnp.asarray(mask)

    def with_stats(x):
        stats = token_statistics_pallas(jax.lax.stop_gradient(x), tj, interpret=True, block_v=64)
        return selective_cross_entropy_pallas(x, tj, mj, stats=stats, interpret=True, block_v=64)

    loss_a, grad_a = jax.jit(jax.value_and_grad(with_stats))(logits)
    # the row-masked forward with 4-row programs: programs without a selected row read nothing
    loss_b, grad_b = jax.jit(jax.value_and_grad(
        lambda x: selective_cross_entropy_pallas(x, tj, mj, interpret=True, block_v=64, scoring_launch=Launch(
            block_rows=4, block_v=64, num_warps=4))))(logits)
    np.testing.assert_array_equal(np.asarray(grad_a), np.asarray(grad_b))
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    check_against_references(loss_a, grad_a, z, t, mask & (t != IGNORE), "float32", logits)


def test_nothing_selected_and_all_ignored() -> None:
    z, t, _ = make_batch(jnp.float32, n=9, v=70, seed=2)
    logits = jnp.asarray(z)
    fn = jax.jit(jax.value_and_grad(lambda x, tt, m: selective_cross_entropy_pallas(
        x, tt, m, interpret=True, block_rows=2, block_v=32, scoring_launch=Launch(block_rows=2, block_v=32))))
    for tt, m in ((t, np.zeros(9, bool)), (np.full(9, IGNORE, np.int32), np.ones(9, bool))):
        loss, grad = fn(logits, jnp.asarray(tt), jnp.asarray(m))
        assert float(loss) == 0.0
        assert not np.isnan(np.asarray(grad)).any() and (np.asarray(grad) == 0).all()
    loss, grad = jax.value_and_grad(lambda x: selective_cross_entropy_pallas(
        x, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool), interpret=True))(jnp.zeros((0, 5)))
    assert float(loss) == 0.0 and grad.shape == (0, 5)


def test_nonfinite_selected_row_is_dropped() -> None:
    """A mask that (against the contract) selects a non-finite row: the row is left out, no NaN anywhere."""
    z, t, mask = make_batch(jnp.float32, n=9, v=70, seed=3)
    mask = mask.copy()
    mask[3] = mask[4] = True  # NaN row and +inf row
    loss, grad = jax.jit(jax.value_and_grad(lambda x: selective_cross_entropy_pallas(
        x, jnp.asarray(t), jnp.asarray(mask), interpret=True, block_v=32,
        scoring_launch=Launch(block_v=32))))(jnp.asarray(z))
    sel = mask & (t != IGNORE)
    sel[3] = sel[4] = False
    ref_loss, ref_grad = oracle_loss_grad(z, t, sel)
    np.testing.assert_allclose(float(loss), ref_loss, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=1e-5, rtol=1e-4)


def test_scored_pipeline_matches_oracle_selection() -> None:
    """3-D input: kernel scores → device selection → loss; the mask equals the oracle's selection given the
    kernel's float32 difficulties, the scores are within SPEC bounds, loss/grad follow SPEC §8."""
    rng = np.random.default_rng(5)
    b, tt, v = 3, 11, 97
    z = rng.normal(0.0, 2.0, size=(b, tt, v)).astype(np.float32)
    t = rng.integers(0, v, size=(b, tt)).astype(np.int32)
    t[0, :4] = IGNORE
    z[1, 2, 5] = np.nan
    ratio = np.float32(0.3)
    logits, tj = jnp.asarray(z), jnp.asarray(t)

    def fn(x, r):  # the ratio is a device value in the loss (after the dynamic threshold)
        loss, mask, k = scored_selective_cross_entropy_pallas(
            x, tj, r, selection="topk", interpret=True, scoring_launch=Launch(block_v=32),
            backward_launch=Launch(block_rows=2, block_v=32, num_warps=2))
        stats = token_statistics_pallas(jax.lax.stop_gradient(x), tj, interpret=True, block_v=32)
        return loss, (mask, k, difficulty_from_statistics(stats, "combined"))

    (loss, (mask, k, d)), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(logits, jnp.float32(ratio))
    d = np.asarray(d)
    ref_scores = oracle.score_tokens(z, t)
    ok = ref_scores["eligible"]
    np.testing.assert_allclose(d[ok], ref_scores["difficulty"][ok], atol=3e-4, rtol=1e-5)
    ref_mask, ref_k = oracle.select_tokens(d, ok, ratio, "topk")
    assert 0 < ref_k < ok.sum()
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    assert int(k) == ref_k
    check_against_references(loss, grad, z, t, ref_mask, "float32", logits)


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": np.ones((4,), bool)}, "mask"),
    ({"mask": np.ones((5,), np.int32)}, "mask"),
    ({"targets": np.zeros((5,), np.float32)}, "targets"),
    ({"targets": np.full((5,), 9, np.int32)}, "targets"),
    ({"block_rows": 6}, "block_rows"),
    ({"block_v": 100}, "block_v"),
    ({"scoring_launch": {"block_v": 64}}, "scoring_launch"),
    ({"scoring_launch": Launch(num_warps=5)}, "num_warps"),
])
def test_bad_arguments(kwargs, match: str) -> None:
    args = {"logits": jnp.zeros((5, 9)), "targets": jnp.zeros((5,), jnp.int32), "mask": jnp.ones((5,), bool)}
    args.update(kwargs)
    logits, targets, mask = args.pop("logits"), args.pop("targets"), args.pop("mask")
    with pytest.raises(ValueError, match=match):
        selective_cross_entropy_pallas(logits, targets, mask, interpret=True, **args)


def test_bad_pipeline_launch() -> None:
    with pytest.raises(ValueError, match="backward_launch"):
        scored_selective_cross_entropy_pallas(jnp.zeros((5, 9)), jnp.zeros((5,), jnp.int32), 0.5,
                                              interpret=True, backward_launch=(1, 64, 4, 1))


def test_triton_lowering_forward_backward() -> None:
    """The GPU path of loss + custom backward lowers through the Triton backend (no GPU needed), N·V > 2^31."""
    from tests.jax.test_kernel_scoring import lower_for_cuda

    n, v = 17_000, 128_256
    text = lower_for_cuda(
        jax.grad(lambda x, t, m: selective_cross_entropy_pallas(x, t, m, interpret=False)),
        jax.ShapeDtypeStruct((n, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.bool_))
    assert text.count("triton") >= 2  # the row-masked forward and the gradient kernel


@pytest.mark.parametrize("flat", [False, True], ids=["grid2d", "flat"])
@pytest.mark.parametrize("n,v,rows,bv,ragged_rows,ragged_cols", [
    (23, 203, 4, 64, True, True), (24, 256, 4, 64, False, False), (17_000, 128_256, 2, 4096, False, True)])
def test_triton_ir_backward_masks(n: int, v: int, rows: int, bv: int, ragged_rows: bool,
                                  ragged_cols: bool, flat: bool) -> None:
    """GPU path of the backward kernel: with a ragged row block every gradient store is masked; otherwise
    only the stores of the ragged column tile are; the logits are only read under the selected-row mask.
    Both grid orders (``flat_grid``): the flat grid reads only program id x."""
    from tests.jax.test_kernel_scoring import memory_ops, triton_ir

    def grad(x, t, m, lse, nll):
        stats = TokenStatistics(lse, lse, lse, lse, nll)
        return jax.grad(lambda a: selective_cross_entropy_pallas(
            a, t, m, stats=stats, interpret=False, block_rows=rows, block_v=bv, num_warps=4, flat_grid=flat))(x)

    f32 = jax.ShapeDtypeStruct((n,), jnp.float32)
    ttirs = triton_ir(grad, jax.ShapeDtypeStruct((n, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32),
                      jax.ShapeDtypeStruct((n,), jnp.bool_), f32, f32)
    [ttir] = [t for t in ttirs if "cggr_selective_ce_grad" in t]
    assert ("tt.get_program_id y" in ttir) is not flat
    stores = [k for k, ty in memory_ops(ttir, "tt.store") if ty == "bf16"]
    loads = [k for k, ty in memory_ops(ttir, "tt.load") if ty == "bf16"]
    assert stores and loads and all(k >= 2 for k in loads)  # x is read only for selected rows
    if ragged_rows:
        assert all(k == 3 for k in stores), "an unmasked gradient store in a ragged row block"
    elif ragged_cols:
        assert sorted(set(k for k in stores)) == [2, 3]  # full column tiles unmasked, the ragged one masked
    else:
        assert all(k == 2 for k in stores)


# ------------------------------------------------------------------------- flat row-major grid (flat_grid)
def ce_grad_grids(fn, *args) -> list[tuple[int, ...]]:
    """The grids of the backward kernel's ``pallas_call`` in the jaxpr of ``fn(*args)``."""
    from cggr_jax.kernels.cross_entropy import backward_grids
    return backward_grids(fn, *args)


def flat_and_grid2d(make_fn, *args) -> tuple[tuple, tuple]:
    """``make_fn(flat)`` run with ``flat_grid`` True and False; the backward kernel's grid is checked to be
    1-D / 2-D."""
    out = []
    for flat in (True, False):
        grids = ce_grad_grids(make_fn(flat), *args)
        assert grids and all(len(g) == (1 if flat else 2) for g in grids), grids
        out.append((grids, jax.jit(make_fn(flat))(*args)))
    return out[0], out[1]


#: (dtype, N, V, backward launch): a ragged last row tile and a ragged last column tile with several rows per
#: program (fp32), one-row programs over 7 column tiles (bf16), 8-row programs (fp16; 23 = 2·8 + 7), and N, V
#: multiples of the tile (no ragged tile at all, fp32).
FLAT_CASES = [
    ("float32", 23, 203, dict(block_rows=4, block_v=64, num_warps=2)),
    ("bfloat16", 23, 203, dict(block_rows=1, block_v=32, num_warps=1)),
    ("float16", 23, 203, dict(block_rows=8, block_v=32, num_warps=4)),
    ("float32", 24, 256, dict(block_rows=4, block_v=64, num_warps=4)),
]


@pytest.mark.parametrize("dtype,n,v,backward", FLAT_CASES,
                         ids=[f"{d}-{n}x{v}-R{b['block_rows']}-bv{b['block_v']}" for d, n, v, b in FLAT_CASES])
def test_flat_grid_loss_and_grad(dtype: str, n: int, v: int, backward: dict) -> None:
    """``flat_grid=True``: a 1-D grid of ``⌈N/R⌉·⌈V/block_v⌉`` programs; loss and gradient
    against the float64 oracle and jax.grad (ignored row in the mask, NaN/+inf rows unselected: exactly zero
    gradient in every unselected row), and bit-identical to the 2-D grid."""
    z, t, mask = make_batch(DTYPES[dtype], n=n, v=v, seed=4)
    logits = jnp.asarray(z, DTYPES[dtype])
    tj, mj = jnp.asarray(t), jnp.asarray(mask)
    stats = token_statistics_pallas(logits, tj, interpret=True, block_v=64)
    make = lambda flat: jax.value_and_grad(lambda x: selective_cross_entropy_pallas(  # noqa: E731
        x, tj, mj, stats=stats, interpret=True, flat_grid=flat, **backward))
    (grids, (loss, grad)), (_, (loss2d, grad2d)) = flat_and_grid2d(make, logits)
    tiles = -(-n // backward["block_rows"]) * -(-v // backward["block_v"])
    assert grids == [(tiles,)]
    sel = mask & (t != IGNORE)
    assert sel[-1] or sel[-2] or sel[-3]  # selected rows in the last row tile
    check_against_references(loss, grad, z, t, sel, dtype, logits)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad2d))
    assert float(loss) == float(loss2d)


def test_flat_grid_nothing_selected_all_ignored_nonfinite() -> None:
    """Flat grid: nothing selected / every token ignored → loss 0 and an all-zero gradient; a mask selecting
    the NaN and +inf rows drops them (zero gradient there, no NaN anywhere, same as the 2-D grid)."""
    z, t, mask = make_batch(jnp.float32, n=9, v=70, seed=2)
    mask = mask.copy()
    mask[3] = mask[4] = True  # NaN row and +inf row
    logits = jnp.asarray(z)
    make = lambda flat: jax.value_and_grad(lambda x, tt, m: selective_cross_entropy_pallas(  # noqa: E731
        x, tt, m, interpret=True, block_rows=2, block_v=32, scoring_launch=Launch(block_rows=2, block_v=32),
        flat_grid=flat))
    (grids, (loss, grad)), (_, (_, grad2d)) = flat_and_grid2d(make, logits, jnp.asarray(t), jnp.asarray(mask))
    assert grids == [(5 * 3,)]
    sel = mask & (t != IGNORE)
    sel[3] = sel[4] = False
    ref_loss, ref_grad = oracle_loss_grad(z, t, sel)
    np.testing.assert_allclose(float(loss), ref_loss, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=1e-5, rtol=1e-4)
    assert (np.asarray(grad)[~sel] == 0).all()
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad2d))
    fn = jax.jit(make(True))
    assert ce_grad_grids(fn, logits, jnp.asarray(t), jnp.asarray(mask)) == [(15,)]
    for tt, m in ((t, np.zeros(9, bool)), (np.full(9, IGNORE, np.int32), np.ones(9, bool))):
        loss, grad = fn(logits, jnp.asarray(tt), jnp.asarray(m))
        assert float(loss) == 0.0
        assert not np.isnan(np.asarray(grad)).any() and (np.asarray(grad) == 0).all()


def test_flat_grid_too_many_programs() -> None:
    """A flat grid of more than 2^31 − 1 programs is refused at trace time with the shapes in the message;
    the same shapes trace with the 2-D grid."""
    n, v = 2**20, 2**17  # 2^20 row tiles × 2^13 column tiles of 16 = 2^33 programs

    def fn(x, t, m, lse, nll, flat=True):
        stats = TokenStatistics(lse, lse, lse, lse, nll)
        return jax.grad(lambda a: selective_cross_entropy_pallas(
            a, t, m, stats=stats, interpret=True, block_rows=1, block_v=16, flat_grid=flat))(x)

    f32 = jax.ShapeDtypeStruct((n,), jnp.float32)
    shapes = (jax.ShapeDtypeStruct((n, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32),
              jax.ShapeDtypeStruct((n,), jnp.bool_), f32, f32)
    with pytest.raises(ValueError, match=rf"flat_grid.*\({n}, {v}\).*{2**33}"):
        jax.eval_shape(lambda *a: fn(*a), *shapes)
    assert jax.eval_shape(lambda *a: fn(*a, flat=False), *shapes).shape == (n, v)
