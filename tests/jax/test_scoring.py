"""``cggr_jax.scoring`` against the float64 oracle (SPEC §2–§4, tolerances of §11).

Odd vocabularies (V = 1, 2, 7, 33, 257), fp32/fp16/bf16 logits (the oracle gets the exactly upcast values),
ties, ``−inf`` entries, NaN/±inf rows, ``ignore_index`` and all-ignored batches. Shapes are fixed per V so
that each (V, dtype) compiles once.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from cggr_jax import dispatch, scoring  # noqa: E402
from tests import oracle  # noqa: E402

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
STAT_NAMES = ("lse", "entropy", "confidence", "runner_up", "nll")


def _hard_batch(V: int, dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B=3, T=6, V) logits with special rows, as values exactly representable in ``dtype``.

    Returns (logits in dtype as jnp, float32 upcast for the oracle, targets)."""
    rng = np.random.default_rng(seed + V)
    B, T = 3, 6
    scale = rng.uniform(0.3, 4.0, size=(B, T, 1))
    z = (rng.standard_normal((B, T, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 0] = -100                      # ignored
    z[0, 1] = 0.0                             # uniform row: every value tied
    if V >= 2:
        z[0, 2, :2] = z[0, 2].max() + 1.0     # two equal maxima: p2 = p1
        z[0, 3, 1:] = -np.inf                 # one finite entry, the rest masked: p1 = 1, p2 = 0, H = 0
        targets[0, 3] = 0
        z[0, 4, V // 2] = -np.inf             # one masked entry ...
        targets[0, 4] = V // 2                # ... that is the target: nll = +inf, not finite
    z[1, 0, 0] = np.nan                       # NaN row
    z[1, 1, -1] = np.inf                      # +inf row
    z[1, 2] = -np.inf                         # all -inf row
    z[2, 0] += 300.0                          # large offset: lse ~ 300, H must not cancel
    zj = jnp.asarray(z).astype(DTYPES[dtype])
    z_up = np.asarray(zj.astype(jnp.float32))  # the exact values the package sees
    return zj, z_up, targets


def _assert_stats_close(stats: scoring.TokenStatistics, ref: dict, where: np.ndarray) -> None:
    for name in STAT_NAMES:
        got = np.asarray(getattr(stats, name))
        assert got.dtype == np.float32, name
        atol, rtol = oracle.SCORE_TOL[name]
        np.testing.assert_allclose(got[where], ref[name][where], atol=atol, rtol=rtol, err_msg=name)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("V", [1, 2, 7, 33, 257])
def test_scores_match_oracle(V, dtype):
    zj, z_up, targets = _hard_batch(V, dtype)
    sc = scoring.score_tokens(zj, jnp.asarray(targets))           # scoring="combined"
    so = oracle.score_tokens(z_up, targets, "combined")
    finite = so["stats"]["row_finite"]
    assert finite.sum() >= 10
    np.testing.assert_array_equal(np.asarray(sc.valid), so["valid"])
    np.testing.assert_array_equal(np.asarray(sc.eligible), so["eligible"])
    np.testing.assert_array_equal(np.asarray(sc.valid & ~sc.eligible), so["nonfinite"])
    _assert_stats_close(sc.stats, so["stats"], finite)
    e = so["eligible"]
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    assert np.asarray(sc.difficulty).dtype == np.float32
    np.testing.assert_allclose(np.asarray(sc.difficulty)[e], so["difficulty"][e], atol=atol, rtol=rtol)
    assert np.all(np.asarray(sc.stats.nll)[targets == -100] == 0.0)   # no valid target: exactly 0
    if dtype == "float32":                                           # the public statistics entry point
        st = scoring.token_statistics(zj, jnp.asarray(targets))
        np.testing.assert_array_equal(np.asarray(scoring.row_finite(st, jnp.asarray(targets != -100))), finite)
        _assert_stats_close(st, so["stats"], finite)


@pytest.mark.parametrize("mode", scoring.SCORING_MODES)
def test_every_scoring_mode_matches_oracle(mode):
    zj, z_up, targets = _hard_batch(33, "float32", seed=11)
    # SPEC §3.1: 'excess' needs a reference (float32, so the oracle's float64 value is the same number)
    ref = (np.random.default_rng(5).uniform(0, 4, targets.shape).astype(np.float32) if mode == "excess"
           else None)
    sc = scoring.score_tokens(zj, jnp.asarray(targets), scoring=mode,
                              reference_nll=None if ref is None else jnp.asarray(ref))
    so = oracle.score_tokens(z_up, targets, mode, reference_nll=ref)
    np.testing.assert_array_equal(np.asarray(sc.eligible), so["eligible"])
    e = so["eligible"]
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(np.asarray(sc.difficulty)[e], so["difficulty"][e], atol=atol, rtol=rtol)
    # and from the statistics directly
    d = scoring.difficulty_from_statistics(sc.stats, mode,
                                           reference_nll=None if ref is None else jnp.asarray(ref))
    np.testing.assert_array_equal(np.asarray(d)[e], np.asarray(sc.difficulty)[e])


def test_closed_forms_and_special_rows():
    V = 7
    z = np.zeros((5, V), np.float32)
    z[1, :] = -np.inf
    z[1, 3] = 2.0                                # single finite entry
    z[2, :2] = 5.0                               # tie at the top
    z[3, 4] = -np.inf                            # masked entry, uniform elsewhere
    z[4] = np.arange(V, dtype=np.float32) + 1e4  # huge logits
    t = np.array([3, 3, 0, 0, 6])
    st = scoring.token_statistics(jnp.asarray(z), jnp.asarray(t))
    lse, H, p1, p2, nll = (np.asarray(x) for x in st)
    assert lse[0] == pytest.approx(np.log(V), abs=1e-6) and H[0] == pytest.approx(np.log(V), abs=1e-6)
    assert p1[0] == pytest.approx(1 / V, abs=1e-7) and p2[0] == pytest.approx(1 / V, abs=1e-7)
    assert lse[1] == 2.0 and H[1] == 0.0 and p1[1] == 1.0 and p2[1] == 0.0 and nll[1] == 0.0
    assert p1[2] == p2[2]                          # ties count: margin term exactly 1
    assert H[3] == pytest.approx(np.log(V - 1), abs=1e-6) and np.isfinite(H[3])
    ref = oracle.token_statistics(z, t)
    _assert_stats_close(st, ref, np.ones(5, bool))


def test_v1_vocabulary():
    z = jnp.asarray([[3.0], [-1.0], [-np.inf]], jnp.float32)
    st = scoring.token_statistics(z, jnp.asarray([0, 0, -100]))
    np.testing.assert_array_equal(np.asarray(st.confidence)[:2], [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(st.runner_up)[:2], [0.0, 0.0])
    # The all -inf row is not finite (SPEC §2): its statistics only have to be non-finite somewhere. The
    # reference also gives p2 = 0 there; the Pallas kernel (on a GPU) may give NaN, and the row is never eligible.
    assert not np.isfinite(np.asarray(st.lse)[2])
    with dispatch.force("reference"):
        st_ref = scoring.token_statistics(z, jnp.asarray([0, 0, -100]))
    np.testing.assert_array_equal(np.asarray(st_ref.runner_up), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(st.entropy)[:2], [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(st.nll)[:2], [0.0, 0.0])
    sc = scoring.score_tokens(z, jnp.asarray([0, 0, -100]), scoring="margin")
    np.testing.assert_array_equal(np.asarray(sc.difficulty)[:2], [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(sc.eligible), [True, True, False])


def test_no_targets_and_valid_mask():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 5, 7)).astype(np.float32)
    vm = rng.random((2, 5)) < 0.6
    for mode in ("entropy", "margin", "combined"):
        sc = scoring.score_tokens(jnp.asarray(z), None, scoring=mode, valid_mask=jnp.asarray(vm))
        so = oracle.score_tokens(z, None, mode, valid_mask=vm)
        np.testing.assert_array_equal(np.asarray(sc.valid), vm)
        np.testing.assert_array_equal(np.asarray(sc.eligible), so["eligible"])
        np.testing.assert_allclose(np.asarray(sc.difficulty), so["difficulty"], atol=3e-4, rtol=1e-5)
        assert np.all(np.asarray(sc.stats.nll) == 0.0)
    sc = scoring.score_tokens(jnp.asarray(z))
    assert bool(jnp.all(sc.valid)) and bool(jnp.all(sc.eligible))


def test_difficulty_evaluation_order_is_float32():
    st = scoring.TokenStatistics(*(jnp.asarray([v], jnp.float32) for v in (0.0, 1.5, 0.6, 0.3, 2.0)))
    f = np.float32
    margin = f(1) - (f(0.6) - f(0.3))
    assert float(scoring.difficulty_from_statistics(st, "entropy")[0]) == f(1.5)
    assert float(scoring.difficulty_from_statistics(st, "margin")[0]) == margin
    assert float(scoring.difficulty_from_statistics(st, "loss")[0]) == f(2.0)
    assert float(scoring.difficulty_from_statistics(st, "combined")[0]) == (f(1.5) + margin) + f(2.0)
    assert float(scoring.difficulty_from_statistics(st, "combined", has_targets=False)[0]) == f(1.5) + margin


def test_all_ignored_and_empty():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5)), jnp.float32)
    sc = scoring.score_tokens(z, jnp.full((2, 3), -100))
    assert not bool(jnp.any(sc.valid)) and not bool(jnp.any(sc.eligible))
    assert bool(jnp.all(sc.stats.nll == 0))
    empty = scoring.score_tokens(jnp.zeros((0, 5), jnp.float32), jnp.zeros((0,), jnp.int32))
    assert empty.difficulty.shape == (0,) and empty.eligible.shape == (0,)


def test_custom_ignore_index_and_narrow_target_dtypes():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((6, 300)).astype(np.float32)
    t = np.array([0, 299, 7, 0, 150, 299])
    sc = scoring.score_tokens(jnp.asarray(z), jnp.asarray(t), ignore_index=0)
    np.testing.assert_array_equal(np.asarray(sc.valid), t != 0)
    # uint8 targets cannot hold -100 (it would wrap onto token 156): refused, host or device (SPEC §1.1)
    t8 = np.array([1, 2, 255, 0, 9, 3], np.uint8)
    for given in (t8, jnp.asarray(t8)):
        with pytest.raises(ValueError, match=r"targets: dtype uint8 .*ignore_index=-100"):
            scoring.score_tokens(jnp.asarray(z), given)
    # with an ignore_index the dtype holds (255), uint8 cannot reach V = 300: nothing out of range
    sc8 = scoring.score_tokens(jnp.asarray(z), jnp.asarray(t8), ignore_index=255)
    so = oracle.score_tokens(z, t8.astype(np.int64), ignore_index=255)
    np.testing.assert_array_equal(np.asarray(sc8.eligible), so["eligible"])
    np.testing.assert_allclose(np.asarray(sc8.stats.nll), so["stats"]["nll"], atol=1e-4, rtol=1e-5)
    # uint16 labels are widened before the range check: 65535 is out of range for V = 300
    with pytest.raises(ValueError, match=r"targets: values must lie in \[0, 300\).*65535"):
        scoring.score_tokens(jnp.asarray(z), np.array([1, 2, 65535, 0, 9, 3], np.uint16), ignore_index=0)


def test_jit_grad_compatible_and_out_of_range_under_jit():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((4, 9)), jnp.float32)
    t = jnp.asarray([1, 9, -5, -100])        # 9 and -5 are out of range

    @jax.jit
    def f(z, t):
        sc = scoring.score_tokens(z, t)
        return sc.eligible, sc.valid, sc.stats.nll

    eligible, valid, nll = f(z, t)
    np.testing.assert_array_equal(np.asarray(eligible), [True, False, False, False])
    # SPEC §4: valid = target != ignore_index; a traced out-of-range target is valid, never eligible
    np.testing.assert_array_equal(np.asarray(valid), [True, True, True, False])
    assert np.all(np.asarray(nll)[1:] == 0.0)
    # the reference statistics are differentiable (entropy gradient vs central differences)
    # (the Pallas kernel behind token_statistics on a GPU has no autodiff rule: SPEC §12, the loss takes its
    # statistics under stop_gradient; the reference is what is differentiable)
    with dispatch.force("reference"):
        g = jax.grad(lambda x: jnp.sum(scoring.token_statistics(x).entropy))(z)
    eps = 1e-3
    e = np.zeros((4, 9), np.float32)
    e[2, 4] = eps
    num = (float(jnp.sum(scoring.token_statistics(z + e).entropy))
           - float(jnp.sum(scoring.token_statistics(z - e).entropy))) / (2 * eps)
    assert float(g[2, 4]) == pytest.approx(num, abs=2e-3)


class _Spy:
    """Stands in for ``token_statistics_pallas``: records its arguments, answers with the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits, targets, ignore_index):
        self.calls.append((logits.shape, None if targets is None else targets.dtype, ignore_index))
        if targets is not None:
            assert targets.dtype == jnp.int32
        has = None if targets is None else targets != ignore_index
        safe = None if targets is None else jnp.where(has, targets, 0)
        st = scoring.token_statistics_reference(logits, safe, has)
        return st._replace(nll=st.nll + 1.0)   # garbage where no target: the dispatcher must zero it


def test_kernel_dispatch_hook(monkeypatch):
    from cggr_jax import dispatch, kernels

    spy = _Spy()
    monkeypatch.setattr(kernels, "token_statistics_pallas", spy)   # a spy on the kernel entry point
    monkeypatch.delenv("CGGR_DISABLE_KERNELS", raising=False)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 7)), jnp.float32)
    t = jnp.asarray([[1, -100, 3], [9, 0, 6]])            # 9: out of range (allowed under jit)
    with dispatch.force("kernel"):                         # route as on a GPU
        assert dispatch.use_kernels(z)
        st = jax.jit(lambda z, t: scoring.token_statistics(z, t))(z, t)
    assert spy.calls == [((2, 3, 7), jnp.int32, -100)]
    has = (t >= 0) & (t < 7)
    ref = scoring.token_statistics_reference(z, jnp.where(has, t, 0), has)
    np.testing.assert_allclose(np.asarray(st.lse), np.asarray(ref.lse), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.nll)[np.asarray(has)], np.asarray(ref.nll + 1.0)[np.asarray(has)])
    assert float(st.nll[1, 0]) == 0.0 and float(st.nll[0, 1]) == 0.0   # no valid target: exactly 0
    with dispatch.force("kernel"):
        sc = scoring.score_tokens(z, jnp.asarray([[1, -100, 3], [2, 0, 6]]))
    assert len(spy.calls) == 2 and bool(sc.eligible[0, 0])
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("CGGR_DISABLE_KERNELS", value)
        assert not dispatch.kernels_enabled() and not dispatch.use_kernels(z)
        scoring.token_statistics(z, jnp.asarray([[1, -100, 3], [2, 0, 6]]))
        scoring.score_tokens(z, jnp.asarray([[1, -100, 3], [2, 0, 6]]))
        assert len(spy.calls) == 2                     # the reference path: the kernel is not called


@pytest.mark.parametrize("V", [2, 3, 301])
def test_top_two_equals_top_k(V):
    """``scoring.top_two`` (two reductions) against ``lax.top_k(z, 2)`` on random rows, repeated maxima (the
    runner-up ties the maximum), ±inf and all -inf rows, under ``jit``; a NaN row gives a NaN maximum."""
    from cggr_jax.scoring import top_two

    rng = np.random.default_rng(V)
    z = rng.standard_normal((9, V)).astype(np.float32)
    z[1, :2] = 7.0                                   # the maximum twice
    z[2] = -np.inf
    z[3, 0] = np.inf
    z[4, :2] = np.inf
    z[5, 1:] = -np.inf
    z[6] = np.round(z[6])                            # many ties below the maximum
    zj = jnp.asarray(z)
    want = np.asarray(jax.lax.top_k(zj, 2)[0])
    got = np.stack([np.asarray(x) for x in jax.jit(top_two)(zj)], axis=-1)
    np.testing.assert_array_equal(got, want)
    nan_row = zj.at[0, V // 2].set(jnp.nan)
    assert bool(jnp.isnan(top_two(nan_row)[0][0]))
