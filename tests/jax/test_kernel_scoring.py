"""The Pallas scoring kernel (``cggr_jax.kernels.scoring``) in interpreter mode against the float64 oracle.

Small odd shapes with a vocabulary block smaller than V, so every row spans several blocks and a ragged last
block: maxima in the ragged block, ties across blocks (runner-up = max), −∞ entries, NaN/±∞ rows, targets
whose logit is −∞, ignore_index and out-of-range targets, fp32/fp16/bf16 input. Multi-row programs
(``block_rows`` R > 1, N not a multiple of R, several sub-tiles per step) must give the single-row results;
rows whose maximum is near ``FLT_MAX`` are exact. The Triton IR of the GPU path is inspected on CPU: a
ragged last row block masks every logits load and every output store (nothing out of bounds).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax.kernels import Launch, kernel_config, token_statistics_pallas
from cggr_jax.kernels.launch import SCORING_DEFAULTS, tile_columns
from cggr_jax.scoring import TokenStatistics, difficulty_from_statistics
from tests import oracle

IGNORE = -100
FIELDS = ("lse", "entropy", "confidence", "runner_up", "nll")


@functools.partial(jax.jit, static_argnames=("ignore_index", "block_rows", "block_v", "num_warps"))
def stats_of(x, t, ignore_index: int = IGNORE, block_rows=None, block_v=None, num_warps=None) -> TokenStatistics:
    """The interpreted kernel under one shared ``jit`` (tests with the same shapes and launch share the
    compilation, which dominates the run time of this module)."""
    return token_statistics_pallas(x, t, ignore_index, interpret=True, block_rows=block_rows, block_v=block_v,
                                   num_warps=num_warps)


DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def crafted_batch(dtype, n: int = 37, v: int = 259, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (already rounded to ``dtype``, returned as float32) and int32 targets with every edge case."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.5, size=(n, v)).astype(np.float32)
    t = rng.integers(0, v, size=n).astype(np.int32)
    z[0, v - 1] = 30.0                     # maximum in the ragged last block (block 64 → tail of 3 columns)
    z[1, 2] = z[1, v - 2] = 25.0           # tie of the maximum across the first and the ragged block
    z[2, 70] = z[2, 130] = 9.0             # tie across two full blocks, a third value close below
    z[2, 131] = 8.5
    z[3, 10] = 20.0; z[3, 11] = 19.0       # runner-up in the same block as the maximum
    z[4, 5] = 20.0; z[4, 200] = 19.5       # runner-up in a later block than the maximum
    z[5, 200] = 20.0; z[5, 5] = 19.5       # runner-up in an earlier block than the maximum
    z[6, ::3] = -np.inf                    # masked vocabulary entries (incl. in the ragged block)
    z[7, :] = -np.inf; z[7, 100] = 1.0     # a single finite entry: p1 = 1, p2 = 0, H = 0
    z[8, :] = np.nan                       # NaN row
    z[9, 17] = np.nan                      # one NaN
    z[10, 40] = np.inf                     # +inf entry
    z[11, :] = -np.inf                     # only −inf: not finite
    z[12, 33] = -np.inf; t[12] = 33        # target logit −inf: nll = +inf, not finite
    z[13] += 1000.0                        # large offset (cancellation in lse − Σ p z)
    z[14, :] = 0.0                         # uniform row: H = log V, p1 = p2 = 1/V
    z[15] = rng.integers(-2, 3, size=v)    # integer logits: many ties everywhere
    z[16, :] = -np.inf; z[16, 0] = z[16, v - 1] = 3.0  # only two finite entries, tied, far apart
    z[21, 40] = z[21, 41] = 15.0           # tie of the maximum inside one block only
    z[22, v - 1] = z[22, v - 3] = 15.0     # tie of the maximum inside the ragged block only
    t[17] = IGNORE; t[18] = IGNORE; t[8] = IGNORE
    t[19] = v - 1                          # target in the ragged block
    t[20] = 0
    z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32))
    return z, t


def assert_matches_oracle(stats: TokenStatistics, z: np.ndarray, t: np.ndarray | None) -> None:
    ref = oracle.token_statistics(z, t, IGNORE)
    got = {f: np.asarray(getattr(stats, f), dtype=np.float64) for f in FIELDS}
    for f in FIELDS:
        assert getattr(stats, f).dtype == jnp.float32, f
        assert getattr(stats, f).shape == z.shape[:-1], f
    finite = np.isfinite(got["lse"]) & np.isfinite(got["entropy"]) & np.isfinite(got["confidence"]) \
        & np.isfinite(got["runner_up"])
    if t is not None:
        finite &= np.isfinite(got["nll"]) | (t == IGNORE)
    np.testing.assert_array_equal(finite, ref["row_finite"], err_msg="row finiteness differs from the oracle")
    ok = ref["row_finite"]
    for f in FIELDS:
        atol, rtol = oracle.SCORE_TOL[f]
        np.testing.assert_allclose(got[f][ok], ref[f][ok], atol=atol, rtol=rtol, err_msg=f)
    # Rows the oracle gives NaN statistics (NaN, +inf, only −inf) are NaN in the kernel's four row statistics.
    bad_row = np.isnan(ref["lse"])
    for f in FIELDS[:4]:
        assert np.isnan(got[f][bad_row]).all(), f
    if t is None:
        assert (got["nll"] == 0).all()
    else:
        assert (got["nll"][t == IGNORE] == 0).all()
    # margin and difficulty (SPEC §3) from the kernel's statistics stay within the SPEC bounds
    margin = 1.0 - (got["confidence"] - got["runner_up"])
    ref_margin = 1.0 - (ref["confidence"] - ref["runner_up"])
    np.testing.assert_allclose(margin[ok], ref_margin[ok], atol=oracle.SCORE_TOL["margin"][0],
                               rtol=oracle.SCORE_TOL["margin"][1])
    d = np.asarray(difficulty_from_statistics(stats, "combined", has_targets=t is not None), np.float64)
    ref_d = oracle.difficulty_from_statistics(ref, "combined", has_targets=t is not None)
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(d[ok], ref_d[ok], atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_statistics_match_oracle(dtype: str) -> None:
    z, t = crafted_batch(DTYPES[dtype])
    x = jnp.asarray(z, DTYPES[dtype])
    stats = stats_of(x, jnp.asarray(t), block_v=64)
    assert_matches_oracle(stats, z, t)
    p1, p2 = np.asarray(stats.confidence), np.asarray(stats.runner_up)
    for row in (1, 2, 16, 21, 22):  # tied maxima (across blocks, inside one block): p2 equals p1 exactly
        assert p2[row] == p1[row], row
    assert p2[7] == 0.0 and p1[7] == 1.0 and np.asarray(stats.entropy)[7] == 0.0
    assert np.isposinf(np.asarray(stats.nll)[12])


def test_ties_and_masks_random() -> None:
    """Integer-valued logits (ties everywhere, across blocks) with random −∞ masks, three seeds, one shape."""
    fn = functools.partial(stats_of, block_v=32)
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        z = rng.integers(-3, 4, size=(29, 101)).astype(np.float32)
        z[rng.random(z.shape) < 0.2] = -np.inf
        t = rng.integers(0, 101, size=29).astype(np.int32)
        t[rng.random(29) < 0.2] = IGNORE
        assert_matches_oracle(fn(jnp.asarray(z), jnp.asarray(t)), z, t)


#: Multi-row launches on the 37-row crafted batch (a ragged last program each): R = 4 with one sub-tile per
#: step, R = 8 with fewer warps than rows, R = 2 with two (R, 128) fp32 sub-tiles per 256-column step. Each
#: is compared with the single-row kernel of the same block (the same sub-tiles).
MULTI_ROW = {
    "R4_w4_bv64": (jnp.float32, dict(block_rows=4, block_v=64, num_warps=4)),
    "R8_w2_bv64_bf16": (jnp.bfloat16, dict(block_rows=8, block_v=64, num_warps=2)),
    "R2_w1_bv256_2subtiles": (jnp.float32, dict(block_rows=2, block_v=256, num_warps=1)),
}


@pytest.mark.parametrize("name", list(MULTI_ROW))
def test_multi_row_matches_oracle_and_single_row(name: str) -> None:
    dtype, launch = MULTI_ROW[name]
    z, t = crafted_batch(dtype)
    assert z.shape[0] % launch["block_rows"] != 0  # the last program has rows past N
    x, tj = jnp.asarray(z, dtype), jnp.asarray(t)
    multi = stats_of(x, tj, **launch)
    assert_matches_oracle(multi, z, t)
    single = stats_of(x, tj, block_v=launch["block_v"])
    # Same per-row arithmetic in the same order: the grouping of rows into programs changes nothing.
    for f in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(multi, f)), np.asarray(getattr(single, f)),
                                   rtol=2e-7, atol=0, equal_nan=True, err_msg=f)


def test_huge_logits() -> None:
    """Maxima near FLT_MAX (``z − m`` and ``m + log d`` must not overflow or cancel): exact statistics, also
    next to ordinary rows of the same program; uniform huge rows against the closed form (the float64 oracle
    cancels there)."""
    rng = np.random.default_rng(11)
    n, v = 7, 45
    z = rng.normal(0.0, 2.0, size=(n, v)).astype(np.float32)
    t = rng.integers(0, v, size=n).astype(np.int32)
    z[1, 5] = 3.0e38; t[1] = 5                     # one huge entry: p1 = 1, p2 = 0, H = 0, nll = 0
    z[1, 6] = -3.0e38                              # z − m = −6e38 overflows to −∞: a zero term
    z[2, 7] = z[2, 30] = 3.3e38                    # tied huge maxima: p1 = p2 = 1/2, H = log 2
    z[3] = 2.0e38; z[3, 0] = 1.0                   # 44 equal huge entries and one ordinary one
    z[4] = 3.2e38                                  # uniform huge row
    z[5] = -3.2e38                                 # uniform hugely negative row
    stats = stats_of(jnp.asarray(z), jnp.asarray(t), block_rows=4, block_v=16, num_warps=4)
    got = {f: np.asarray(getattr(stats, f), np.float64) for f in FIELDS}
    oracle_rows = [0, 1, 6]  # row 2's float64 oracle entropy cancels (lse − Σ p z at |z| = 3e38)
    ref = oracle.token_statistics(z[oracle_rows], t[oracle_rows], IGNORE)
    for f in FIELDS:
        atol, rtol = oracle.SCORE_TOL[f]
        np.testing.assert_allclose(got[f][oracle_rows], ref[f], atol=atol, rtol=rtol, err_msg=f)
    assert got["confidence"][1] == 1.0 and got["runner_up"][1] == 0.0 and got["entropy"][1] == 0.0
    np.testing.assert_allclose([got["confidence"][2], got["runner_up"][2]], 0.5, rtol=1e-6)
    np.testing.assert_allclose(got["entropy"][2], np.log(2), atol=1e-6)
    np.testing.assert_allclose(got["lse"][2], np.float32(3.3e38), rtol=1e-6)
    # Row 3: 44 entries equal to 2e38 and one far below: log of 44 equal terms.
    np.testing.assert_allclose(got["lse"][3], 2.0e38 + np.log(v - 1), rtol=1e-6)
    np.testing.assert_allclose(got["entropy"][3], np.log(v - 1), atol=1e-5)
    for row, m in ((4, 3.2e38), (5, -3.2e38)):
        np.testing.assert_allclose(got["lse"][row], np.float32(m), rtol=1e-6)
        np.testing.assert_allclose([got["entropy"][row], got["nll"][row]], np.log(v), atol=1e-5)
        np.testing.assert_allclose([got["confidence"][row], got["runner_up"][row]], 1.0 / v, rtol=1e-6)


def test_three_dim_without_targets() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, size=(3, 7, 45)).astype(np.float32)
    z[1, 3, 44] = 40.0
    stats = jax.jit(lambda a: token_statistics_pallas(a, None, interpret=True, block_v=16))(jnp.asarray(z))
    assert stats.lse.shape == (3, 7)
    assert_matches_oracle(stats, z, None)


@pytest.mark.parametrize("v,block_v,rows", [(300, 16, 1), (256, 64, 2), (100, 128, 1), (1, 16, 4)])
def test_block_geometry(v: int, block_v: int, rows: int) -> None:
    """Many blocks, no ragged block, one block larger than V (all masked tail), and V = 1; 11 rows, so the
    2- and 4-row programs end with a ragged row block."""
    rng = np.random.default_rng(v)
    z = rng.normal(0.0, 4.0, size=(11, v)).astype(np.float32)
    z[0, v - 1] = 50.0
    t = rng.integers(0, v, size=11).astype(np.int32)
    t[3] = IGNORE
    stats = stats_of(jnp.asarray(z), jnp.asarray(t), block_v=block_v, block_rows=rows, num_warps=rows)
    assert_matches_oracle(stats, z, t)
    if v == 1:
        assert (np.asarray(stats.runner_up) == 0).all() and (np.asarray(stats.confidence) == 1).all()


def test_default_block_and_float64_input() -> None:
    """Default launch parameters, a float64 input (computed in float32), other ignore_index."""
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 2.0, size=(5, 33)).astype(np.float32)
    t = np.array([0, 32, 7, -1, 5], dtype=np.int32)
    stats = token_statistics_pallas(np.asarray(z, np.float64), jnp.asarray(t), ignore_index=-1, interpret=True)
    ref = oracle.token_statistics(z, t, -1)
    np.testing.assert_allclose(np.asarray(stats.nll), ref["nll"], atol=1e-4, rtol=1e-5)
    assert float(stats.nll[3]) == 0.0


def test_default_launch_bf16_many_steps() -> None:
    """The default launch on a GPU-like row: bf16, V = 4099 → 2048-column steps of eight (1, 256) sub-tiles,
    two full steps (register prefetch, the last one re-reading itself) and a ragged step of 3 columns."""
    rng = np.random.default_rng(8)
    z = rng.normal(0.0, 3.0, size=(3, 4099)).astype(np.float32)
    z[0, 4098] = 25.0                                  # the maximum in the ragged step
    z[1, 1000] = z[1, 3000] = 22.0                     # tied maxima in different steps
    z[2, 1500:1600] = -np.inf
    z = np.asarray(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32))
    t = np.array([4098, 7, IGNORE], np.int32)
    cfg = kernel_config(4099, 2, interpret=True)
    assert cfg.block_v == 2048 and tile_columns(cfg, 2) == 256
    stats = stats_of(jnp.asarray(z, jnp.bfloat16), jnp.asarray(t))
    assert_matches_oracle(stats, z, t)
    assert np.asarray(stats.runner_up)[1] == np.asarray(stats.confidence)[1]


def test_out_of_range_targets() -> None:
    z = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="targets"):
        token_statistics_pallas(jnp.asarray(z), jnp.asarray([0, 10, 1, 2]), interpret=True)
    with pytest.raises(ValueError, match="targets"):
        token_statistics_pallas(jnp.asarray(z), jnp.asarray([0, -5, 1, 2]), interpret=True)
    # Under jit values cannot raise: the token gets nll = 0 (no valid target) and is never an index.
    stats = jax.jit(lambda a, b: token_statistics_pallas(a, b, interpret=True, block_v=16))(
        jnp.asarray(z), jnp.asarray([0, 10, -5, 2], jnp.int32))
    np.testing.assert_allclose(np.asarray(stats.nll), [np.log(10), 0.0, 0.0, np.log(10)], rtol=1e-6)


def test_empty_and_all_ignored() -> None:
    empty = token_statistics_pallas(jnp.zeros((0, 17), jnp.bfloat16), jnp.zeros((0,), jnp.int32), interpret=True)
    assert all(a.shape == (0,) and a.dtype == jnp.float32 for a in empty)
    empty3 = token_statistics_pallas(jnp.zeros((2, 0, 17)), None, interpret=True)
    assert empty3.lse.shape == (2, 0)
    z = np.random.default_rng(3).normal(size=(6, 21)).astype(np.float32)
    # one program of 8 rows holds all 6: every program is ragged
    stats = token_statistics_pallas(jnp.asarray(z), jnp.full((6,), IGNORE, jnp.int32), interpret=True,
                                    block_rows=8, block_v=16, num_warps=2)
    assert (np.asarray(stats.nll) == 0).all()
    assert_matches_oracle(stats, z, np.full(6, IGNORE, np.int32))


@pytest.mark.parametrize("args,match", [
    ((np.zeros((4,), np.float32), None), "logits"),
    ((np.zeros((2, 3, 4, 5), np.float32), None), "logits"),
    ((np.zeros((4, 5), np.int32), None), "logits"),
    ((np.zeros((4, 0), np.float32), None), "logits"),
    ((np.zeros((4, 5), np.float32), np.zeros((3,), np.int32)), "targets"),
    ((np.zeros((4, 5), np.float32), np.zeros((4,), np.float32)), "targets"),
])
def test_bad_arguments(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        token_statistics_pallas(*args, interpret=True)


@pytest.mark.parametrize("kwargs,match", [
    ({"block_v": 48}, "block_v"), ({"num_warps": 3}, "num_warps"), ({"num_warps": 64}, "num_warps"),
    ({"num_stages": 0}, "num_stages"), ({"block_rows": 3}, "block_rows"), ({"block_rows": 0}, "block_rows"),
    ({"block_rows": True}, "block_rows"), ({"interpret": "yes"}, "interpret"),
    ({"ignore_index": 1.5}, "ignore_index"),
])
def test_bad_options(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        token_statistics_pallas(jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32), **kwargs)


def lower_for_cuda(fn, *shapes) -> str:
    """Lower ``jit(fn)`` for the CUDA platform on this (CPU) machine: runs the Pallas → Triton IR lowering
    (every primitive of the kernel must have a Triton lowering rule) without a GPU."""
    from jax._src.lib import version as jaxlib_version

    if jaxlib_version > (0, 10, 2) and not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jaxlib > 0.10.2 compiles the Triton module while lowering, which needs a GPU")
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def test_triton_lowering_large_shapes() -> None:
    """The GPU path: the kernel lowers through the Triton backend for N·V > 2^31 bf16 logits."""
    n, v = 17_000, 128_256
    assert n * v > 2**31
    text = lower_for_cuda(
        lambda a, b: token_statistics_pallas(a, b, interpret=False),
        jax.ShapeDtypeStruct((n, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32))
    assert "triton" in text
    text = lower_for_cuda(lambda a: token_statistics_pallas(a, None, interpret=False, block_v=256),
                          jax.ShapeDtypeStruct((5, 1000), jnp.float16))
    assert "triton" in text


def test_launch_geometry() -> None:
    """Defaults and the sub-tile width C = 32·vec·max(1, num_warps // block_rows), capped at block_v."""
    cfg = kernel_config(128_256, 2, interpret=True)
    assert (cfg.block_rows, cfg.block_v, cfg.num_warps) == (
        SCORING_DEFAULTS.block_rows, SCORING_DEFAULTS.block_bytes // 2, SCORING_DEFAULTS.num_warps)
    assert kernel_config(128_256, 4, interpret=True).block_v == SCORING_DEFAULTS.block_bytes // 4
    assert kernel_config(100, 2, interpret=True).block_v == 128   # next power of two >= V
    assert kernel_config(3, 4, interpret=True).block_v == 16
    geo = lambda r, bv, w, size: tile_columns(kernel_config(10**5, size, block_rows=r, block_v=bv,  # noqa: E731
                                                            num_warps=w, interpret=True), size)
    assert geo(1, 1024, 1, 2) == 256 and geo(1, 1024, 1, 4) == 128   # one 16-byte vector per lane
    assert geo(4, 1024, 4, 2) == 256 and geo(8, 512, 2, 2) == 256    # warps own rows
    assert geo(1, 2048, 4, 2) == 1024 and geo(2, 2048, 8, 4) == 512  # spare warps split the columns
    assert geo(1, 64, 1, 2) == 64                                     # never wider than block_v
    assert Launch(block_rows=2).kwargs() == {"block_rows": 2, "block_v": None, "num_warps": None,
                                             "num_stages": None}


def triton_ir(fn, *shapes) -> list[str]:
    """The Triton IR (TTIR text) of every ``pallas_call`` in ``jit(fn)`` lowered for CUDA on this machine."""
    lower_for_cuda(lambda: None)  # skips where lowering needs a GPU
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError as err:  # internal module moved: nothing to inspect on this jax
        pytest.skip(f"jax internals changed ({err})")
    captured: list[str] = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        lower_for_cuda(fn, *shapes)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    return captured


def memory_ops(ttir: str, op: str) -> list[tuple[int, str]]:
    """``(operand count, element type)`` of every ``tt.load``/``tt.store`` on a tensor of pointers. Loads of a
    pointer that is then stored to (the read half of Pallas' swap lowering of a store, dead code that Triton
    removes) are left out."""
    lines = [line.strip() for line in ttir.splitlines()]
    stored = {line.split("tt.store ", 1)[1].split(",")[0].strip() for line in lines if "tt.store " in line}
    out = []
    for line in lines:
        if f"{op} " not in line or "tensor<" not in line.split(":")[-1]:
            continue
        body = line.split(f"{op} ", 1)[1].split(" :")[0].split(" evictionPolicy")[0].split(" {")[0]
        if op == "tt.load" and body.split(",")[0].strip() in stored:
            continue
        out.append((len(body.split(",")), line.split("!tt.ptr<")[-1].split(">")[0]))
    return out


@pytest.mark.parametrize("n,rows,ragged", [(37, 4, True), (40, 4, False), (17_000, 8, False)])
def test_triton_ir_masks_ragged_row_block(n: int, rows: int, ragged: bool) -> None:
    """GPU path: with N mod R ≠ 0 every tile load of the logits and every output store carries a mask (the
    rows past N are neither read nor written); with N mod R = 0 the full steps load without a mask. The
    last case is N·V > 2^31 bf16 (64-bit offsets)."""
    v = 128_256 if n > 1000 else 300
    [ttir] = triton_ir(lambda a, b: token_statistics_pallas(a, b, interpret=False, block_rows=rows,
                                                            block_v=256, num_warps=rows),
                       jax.ShapeDtypeStruct((n, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32))
    tile_loads = [k for k, ty in memory_ops(ttir, "tt.load") if ty == "bf16"]
    stores = memory_ops(ttir, "tt.store")
    assert tile_loads and len(stores) == 5
    if ragged:
        assert all(k >= 2 for k in tile_loads), "an unmasked logits load in a ragged row block"
        assert all(k == 3 for k, _ in stores), "an unmasked output store in a ragged row block"
    else:
        assert any(k == 1 for k in tile_loads) and all(k == 2 for k, _ in stores)
    if n * v > 2**31:
        assert "i64" in ttir


def test_few_rows_get_wider_programs_with_the_same_statistics() -> None:
    """A launch of few rows (the fused LM head's blocks) widens each row's program; the statistics agree."""
    from cggr_jax.kernels.launch import scoring_config_for_rows

    assert scoring_config_for_rows(16384, 128256, 2, 132) == Launch()
    wide = scoring_config_for_rows(896, 128256, 2, 132)
    assert (wide.num_warps, wide.block_v) == (2, 2 * SCORING_DEFAULTS.block_bytes // 2)
    assert scoring_config_for_rows(1, 128256, 2, 132).num_warps == 8
    assert scoring_config_for_rows(2, 301, 4, 132).num_warps == 1       # one default step covers the row
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((6, 1201)) * 4).astype(np.float32)
    z[2, 1200] = 40.0                                   # the row maximum in the ragged last step
    z[4] = np.nan
    t = jnp.asarray([0, 1200, 1200, 5, 7, -100])
    launch = scoring_config_for_rows(6, 1201, 4, 64)
    assert launch.num_warps > 1 and launch.block_v > kernel_config(1201, 4, interpret=True).block_v
    want = token_statistics_pallas(jnp.asarray(z), t, interpret=True)
    got = token_statistics_pallas(jnp.asarray(z), t, interpret=True, **launch.kwargs())
    for name, a, b in zip(TokenStatistics._fields, got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- vocabulary-chunked launches
from cggr_jax.kernels.scoring import CHUNK_STATE_ROWS, chunk_statistics  # noqa: E402

CHUNK_V = 37


def chunk_crafted(dtype, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """15 rows of ``CHUNK_V = 37`` columns (rounded to ``dtype``, returned as float32) with the edge cases of a
    row that arrives in column chunks; with the widths ``[16, 16, 5]`` the chunks are ``[0, 16)``,
    ``[16, 32)``, ``[32, 37)``."""
    rng = np.random.default_rng(seed)
    v = CHUNK_V
    z = rng.normal(0.0, 2.0, size=(15, v)).astype(np.float32)
    t = rng.integers(0, v, size=15).astype(np.int32)
    z[0, ::4] = -np.inf                     # −∞ columns in every chunk
    z[1, :16] = -np.inf                     # a whole −∞ first chunk (and a −∞ 1-column chunk)
    z[2, 3] = z[2, 30] = 9.0                # tie of the maximum across chunks: p2 = p1
    z[3, 20] = np.nan                       # NaN in a middle chunk
    z[4, 35] = np.inf                       # +∞ in a later chunk (after finite chunks)
    z[5, :] = -np.inf                       # only −∞: not finite
    t[6] = 0                                # target in the first chunk (the first column)
    t[7] = v - 1                            # target in the last chunk (the last column)
    t[8] = 17                               # target in a middle chunk
    z[9, 33] = -np.inf; t[9] = 33           # target logit −∞ in a later chunk: nll = +∞
    t[10] = IGNORE                          # ignored target: nll = 0, never read
    z[11, 36] = 12.0; z[11, 0] = 11.5       # maximum in the last chunk, runner-up in the first
    z[12] += 1000.0                         # large offset (relative sums)
    z[13, 32:] = -np.inf                    # a whole −∞ last chunk after finite ones
    z[14, :] = -np.inf; z[14, 20] = 1.0     # a single finite entry in a middle chunk
    z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32))
    return z, t


def chunked(x: jax.Array, t, widths: tuple[int, ...], *, block_rows: int = 1, num_warps: int = 1,
            block_v: int = 16) -> tuple[tuple[jax.Array, ...], list[jax.Array]]:
    """Statistics of ``x`` streamed in column chunks of the given widths (one interpreted launch each):
    ``(final statistics, [states after each non-final chunk])``."""
    vocab = x.shape[1]
    assert sum(widths) == vocab
    itemsize = jnp.dtype(x.dtype).itemsize
    state, states, v0 = None, [], 0
    for w in widths:
        cfg = kernel_config(w, itemsize, block_rows=block_rows, block_v=block_v, num_warps=num_warps,
                            interpret=True)
        state = chunk_statistics(x[:, v0:v0 + w], t, ignore_index=IGNORE, v0=v0, vocab_size=vocab, state=state,
                                 cfg=cfg)
        v0 += w
        if v0 < vocab:
            assert state.shape == (CHUNK_STATE_ROWS, x.shape[0]) and state.dtype == jnp.float32
            states.append(state)
    return state, states


@functools.partial(jax.jit, static_argnames=("widths", "block_rows", "num_warps", "block_v"))
def chunked_jit(x, t, widths: tuple[int, ...], block_rows: int = 1, num_warps: int = 1, block_v: int = 16):
    """:func:`chunked` under one ``jit`` (one compilation per shape and widths)."""
    return chunked(x, t, widths, block_rows=block_rows, num_warps=num_warps, block_v=block_v)


CHUNK_WIDTHS = {"block-aligned": (16, 16, 5), "one-column-first": (1, 30, 6), "odd": (3, 1, 1, 32),
                "whole-row": (37,)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CHUNK_WIDTHS))
def test_chunked_statistics_match_the_oracle(dtype: str, name: str) -> None:
    """Every edge case of :func:`chunk_crafted` (−∞ columns and whole −∞ chunks, ties of the maximum across
    chunks, NaN, +∞ in a later chunk, targets in the first/middle/last chunk, ignored targets, 1-column
    chunks) gives the oracle's statistics when the row arrives in chunks."""
    z, t = chunk_crafted(DTYPES[dtype])
    stats, _ = chunked_jit(jnp.asarray(z, DTYPES[dtype]), jnp.asarray(t), CHUNK_WIDTHS[name])
    assert len(stats) == 5
    stats = TokenStatistics(*stats)
    assert_matches_oracle(stats, z, t)
    p1, p2, nll = (np.asarray(a) for a in (stats.confidence, stats.runner_up, stats.nll))
    assert p2[2] == p1[2]                                  # equal maxima in two chunks: p2 = p1 exactly
    assert nll[10] == 0 and np.isposinf(nll[9])
    assert p1[14] == 1.0 and p2[14] == 0.0 and np.asarray(stats.entropy)[14] == 0.0
    assert np.isnan(p1[[3, 4, 5]]).all()                   # NaN, +∞, only −∞: not finite


@pytest.mark.parametrize("launch", [dict(), dict(block_rows=4, num_warps=4)], ids=["single-row", "R4-ragged"])
def test_chunked_statistics_equal_the_whole_row_kernel(launch: dict) -> None:
    """Same kernel body, same rows: chunking changes only the summation order of ``d`` and ``s`` - nothing
    in the top-2, the target logit or the finiteness. A 4-row program over 15 rows has a ragged last
    program in every chunk."""
    z, t = chunk_crafted(jnp.float32, seed=4)
    x, tj = jnp.asarray(z), jnp.asarray(t)
    whole_row = stats_of(x, tj, block_v=16, **launch)
    got, states = chunked_jit(x, tj, (7, 9, 21), **launch)
    got = TokenStatistics(*got)
    for f in FIELDS:
        a, b = np.asarray(getattr(got, f)), np.asarray(getattr(whole_row, f))
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f)
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6, equal_nan=True, err_msg=f)
    # The carried state after the second chunk: the running maximum and target logit of the first 16 columns.
    m, r, _d, _s, z_t = (np.asarray(a) for a in states[1])
    finite = np.isfinite(z[:, :16]).all(axis=1)
    np.testing.assert_array_equal(m[finite], z[finite, :16].max(axis=1))
    np.testing.assert_array_equal(r[finite], np.sort(z[finite, :16], axis=1)[:, -2])
    early = (t >= 0) & (t < 16)
    np.testing.assert_array_equal(z_t[early], z[early, t[early]])
    assert (z_t[~early] == 0).all()                        # not read yet (or ignored): still 0


def test_chunked_statistics_without_targets() -> None:
    """No targets: the last chunk returns the four row statistics, the carried ``z_t`` row is 0."""
    z, _ = chunk_crafted(jnp.bfloat16, seed=5)
    stats, states = chunked_jit(jnp.asarray(z, jnp.bfloat16), None, (20, 17))
    assert len(stats) == 4 and (np.asarray(states[0][4]) == 0).all()
    zeros = jnp.zeros((z.shape[0],), jnp.float32)
    assert_matches_oracle(TokenStatistics(*stats, zeros), z, None)


def test_chunked_statistics_out_of_range_targets_under_jit() -> None:
    """Traced targets cannot raise: outside ``[0, vocab_size)`` they give ``nll = 0`` and are never read,
    in whichever chunk; a concrete call raises naming the argument."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(4, 12)).astype(np.float32)
    t = np.array([11, 12, -5, 3], np.int32)
    stats, _ = chunked_jit(jnp.asarray(z), jnp.asarray(t), (5, 7))
    ref = oracle.token_statistics(z, np.where((t >= 0) & (t < 12), t, IGNORE), IGNORE)
    np.testing.assert_allclose(np.asarray(stats[4]), ref["nll"], rtol=1e-6, atol=1e-6)
    assert float(stats[4][1]) == 0.0 and float(stats[4][2]) == 0.0
    with pytest.raises(ValueError, match="targets1d"):
        chunk_statistics(jnp.asarray(z[:, :5]), jnp.asarray(t), ignore_index=IGNORE, v0=0, vocab_size=12)


def test_chunked_statistics_empty_rows() -> None:
    x = jnp.zeros((0, 5), jnp.bfloat16)
    state = chunk_statistics(x, None, ignore_index=IGNORE, v0=0, vocab_size=9)
    assert state.shape == (CHUNK_STATE_ROWS, 0) and state.dtype == jnp.float32
    last = chunk_statistics(x[:, :4], jnp.zeros((0,), jnp.int32), ignore_index=IGNORE, v0=5, vocab_size=9,
                            state=state)
    assert len(last) == 5 and all(a.shape == (0,) and a.dtype == jnp.float32 for a in last)


def test_chunked_statistics_bad_arguments() -> None:
    x = jnp.zeros((4, 10), jnp.float32)
    t = jnp.zeros((4,), jnp.int32)
    state = jnp.zeros((CHUNK_STATE_ROWS, 4), jnp.float32)
    call = functools.partial(chunk_statistics, ignore_index=IGNORE)
    cases = [
        (lambda: call(x, t, v0=5, vocab_size=12, state=state), "v0"),              # past the end of the row
        (lambda: call(x, t, v0=-1, vocab_size=12, state=state), "v0"),
        (lambda: call(x, t, v0=1.0, vocab_size=12, state=state), "v0"),
        (lambda: jax.jit(lambda v: call(x, t, v0=v, vocab_size=12, state=state))(0), "v0"),  # traced
        (lambda: call(x, t, v0=0, vocab_size=12.0), "vocab_size"),
        (lambda: call(x, t, v0=0, vocab_size=0), "vocab_size"),
        (lambda: call(x, t, v0=2, vocab_size=12), "state"),                        # missing after v0 = 0
        (lambda: call(x, t, v0=2, vocab_size=12, state=state[:4]), "state"),
        (lambda: call(x, t, v0=2, vocab_size=12, state=state.astype(jnp.bfloat16)), "state"),
        (lambda: call(x, t, v0=2, vocab_size=12, state=state[:, :3]), "state"),
        (lambda: call(x[0], t, v0=0, vocab_size=12), "logits_chunk"),
        (lambda: call(x.astype(jnp.int32), t, v0=0, vocab_size=12), "logits_chunk"),
        (lambda: call(x[:, :0], t, v0=0, vocab_size=12), "logits_chunk"),
        (lambda: call(x[None], t, v0=0, vocab_size=12), "logits_chunk"),
        (lambda: call(x, t[:3], v0=0, vocab_size=12), "targets1d"),
        (lambda: call(x, t.astype(jnp.float32), v0=0, vocab_size=12), "targets1d"),
        (lambda: call(x, t.at[0].set(12), v0=0, vocab_size=12), "targets1d"),      # concrete, out of range
        (lambda: call(x, t, v0=0, vocab_size=12, cfg=Launch()), "cfg"),
        (lambda: chunk_statistics(x, t, ignore_index=0.5, v0=0, vocab_size=12), "ignore_index"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("n,rows,v0", [(16_384, 1, 0), (16_384, 1, 7168), (16_384, 1, 121_088), (37, 4, 7168)],
                         ids=["first", "middle", "last", "middle-ragged-rows"])
def test_chunk_kernel_triton_ir(n: int, rows: int, v0: int) -> None:
    """GPU path of the chunked launch at the fused LM head's shape (``N = 16384``, ``C = 7168`` bf16 of
    ``V = 128256``): it lowers through the Triton backend; five stores per program (the state or the
    statistics); with a ragged row block every logits load and every store is masked."""
    c, vocab = 7168, 128_256
    cfg = kernel_config(c, 2, block_rows=rows, num_warps=rows, interpret=False)
    first = v0 == 0

    def fn(x, t, *state):
        return chunk_statistics(x, t, ignore_index=IGNORE, v0=v0, vocab_size=vocab,
                                state=None if first else state[0], cfg=cfg)

    shapes = [jax.ShapeDtypeStruct((n, c), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32)]
    if not first:
        shapes.append(jax.ShapeDtypeStruct((CHUNK_STATE_ROWS, n), jnp.float32))
    [ttir] = triton_ir(fn, *shapes)
    tile_loads = [k for k, ty in memory_ops(ttir, "tt.load") if ty == "bf16"]
    stores = memory_ops(ttir, "tt.store")
    assert tile_loads and len(stores) == 5
    if n % rows:
        assert all(k >= 2 for k in tile_loads) and all(k == 3 for k, _ in stores)
    else:
        assert any(k == 1 for k in tile_loads) and all(k == 2 for k, _ in stores)
