"""The Pallas scoring kernel (``cggr_jax.kernels.scoring``) in interpreter mode against the float64 oracle.

Small odd shapes with a vocabulary block smaller than V, so every row spans several blocks and a ragged last
block: maxima in the ragged block, ties across blocks (runner-up = max), −∞ entries, NaN/±∞ rows, targets
whose logit is −∞, ignore_index and out-of-range targets, fp32/fp16/bf16 input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cggr_jax.kernels import token_statistics_pallas
from cggr_jax.scoring import TokenStatistics, difficulty_from_statistics
from tests import oracle

IGNORE = -100
FIELDS = ("lse", "entropy", "confidence", "runner_up", "nll")
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
    fn = jax.jit(lambda a, b: token_statistics_pallas(a, b, IGNORE, interpret=True, block_v=64))
    stats = fn(x, jnp.asarray(t))
    assert_matches_oracle(stats, z, t)
    p1, p2 = np.asarray(stats.confidence), np.asarray(stats.runner_up)
    for row in (1, 2, 16, 21, 22):  # tied maxima (across blocks, inside one block): p2 equals p1 exactly
        assert p2[row] == p1[row], row
    assert p2[7] == 0.0 and p1[7] == 1.0 and np.asarray(stats.entropy)[7] == 0.0
    assert np.isposinf(np.asarray(stats.nll)[12])


def test_ties_and_masks_random() -> None:
    """Integer-valued logits (ties everywhere, across blocks) with random −∞ masks, three seeds, one shape."""
    fn = jax.jit(lambda a, b: token_statistics_pallas(a, b, IGNORE, interpret=True, block_v=32))
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        z = rng.integers(-3, 4, size=(29, 101)).astype(np.float32)
        z[rng.random(z.shape) < 0.2] = -np.inf
        t = rng.integers(0, 101, size=29).astype(np.int32)
        t[rng.random(29) < 0.2] = IGNORE
        assert_matches_oracle(fn(jnp.asarray(z), jnp.asarray(t)), z, t)


def test_three_dim_without_targets() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, size=(3, 7, 45)).astype(np.float32)
    z[1, 3, 44] = 40.0
    stats = jax.jit(lambda a: token_statistics_pallas(a, None, interpret=True, block_v=16))(jnp.asarray(z))
    assert stats.lse.shape == (3, 7)
    assert_matches_oracle(stats, z, None)


@pytest.mark.parametrize("v,block_v", [(300, 16), (256, 64), (100, 128), (1, 16)])
def test_block_geometry(v: int, block_v: int) -> None:
    """Many blocks, no ragged block, one block larger than V (all masked tail), and V = 1."""
    rng = np.random.default_rng(v)
    z = rng.normal(0.0, 4.0, size=(11, v)).astype(np.float32)
    z[0, v - 1] = 50.0
    t = rng.integers(0, v, size=11).astype(np.int32)
    t[3] = IGNORE
    stats = jax.jit(lambda a, b: token_statistics_pallas(a, b, IGNORE, interpret=True, block_v=block_v))(
        jnp.asarray(z), jnp.asarray(t))
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
    stats = token_statistics_pallas(jnp.asarray(z), jnp.full((6,), IGNORE, jnp.int32), interpret=True,
                                    block_v=16)
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
    ({"block_v": 48}, "block_v"), ({"num_warps": 3}, "num_warps"), ({"num_stages": 0}, "num_stages"),
    ({"interpret": "yes"}, "interpret"), ({"ignore_index": 1.5}, "ignore_index"),
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
