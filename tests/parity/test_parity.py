"""SPEC §11 parity levels: cggr_torch and cggr_jax select the same tokens.

Both frameworks run in this one process on CPU. Level 1 is fuzzed with hypothesis; levels 2-4 run on seeded
random batches of logits. The number of level-3 batches whose selections were fully identical is printed in
the terminal summary (see tests/conftest.py).

Shape buckets (compile time): PyTorch runs every batch at its own shape; JAX runs it padded to one bucket shape
per dimension set (tokens that take no part: ``ignore_index`` targets / ineligible difficulties, appended
after every row and below the last row, so the flat order of the real tokens — SPEC §6 — and every count are
unchanged) and the results are cut back to the real shape. Each bucket compiles once instead of every fuzzed
shape compiling anew; the assertions are unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import cggr_jax  # noqa: E402
import cggr_torch  # noqa: E402
from cggr_jax import curriculum as jcur  # noqa: E402
from cggr_jax import scoring as jsc  # noqa: E402
from cggr_jax import selection as jsel  # noqa: E402
from cggr_torch import curriculum as tcur  # noqa: E402
from cggr_torch import scoring as tsc  # noqa: E402
from cggr_torch import selection as tsel  # noqa: E402
from tests import oracle  # noqa: E402
from tests.parity.cases import pad_to  # noqa: E402

PARITY_REPORT: dict[str, list[int]] = {}  # strategy -> [identical batches, total batches]

#: JAX bucket shapes: level 1 (1-D, 2-D) and levels 2-4 (B, T); V is not padded (the logits' rows are whole).
BUCKET_1D, BUCKET_2D, BUCKET_BT = (40,), (5, 9), (3, 11)


def cut(x, shape: tuple[int, ...]) -> np.ndarray:
    """The real region ``x[:shape[0], :shape[1], ...]`` of a bucketed JAX result."""
    return np.asarray(x)[tuple(slice(0, n) for n in shape)]

STRATEGIES = oracle.SELECTION_STRATEGIES


# ------------------------------------------------------------------------------------------------ level 1
@st.composite
def selection_problems(draw):
    two_d = draw(st.booleans())
    if two_d:
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 9)))
    else:
        shape = (draw(st.integers(0, 40)),)
    size = int(np.prod(shape))
    # A small pool of values forces ties; NaN, +-inf and -0.0 are in the pool on purpose.
    pool = draw(st.lists(st.sampled_from([0.0, -0.0, 1.0, 1.0000001, 2.5, -3.0, np.inf, -np.inf, np.nan,
                                          0.3, 7.0, 1e-30]), min_size=1, max_size=6))
    d = np.array([draw(st.sampled_from(pool)) for _ in range(size)], dtype=np.float32).reshape(shape)
    eligible = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), dtype=bool).reshape(shape)
    ratio = np.float32(draw(st.floats(2.0**-20, 1.0, width=32)))
    selection = draw(st.sampled_from(STRATEGIES))
    num_strata = draw(st.integers(1, 5))
    min_tps = draw(st.integers(0, 3))
    return d, eligible, ratio, selection, num_strata, min_tps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(selection_problems())
def test_level1_masks_bit_identical(problem):
    d, eligible, ratio, selection, num_strata, min_tps = problem
    kw = dict(selection=selection, num_strata=num_strata, min_tokens_per_sequence=min_tps)
    m_t, k_t = tsel.select_tokens(torch.from_numpy(d), torch.from_numpy(eligible),
                                  torch.tensor(ratio, dtype=torch.float32), **kw)
    bucket = BUCKET_2D if d.ndim == 2 else BUCKET_1D
    m_j, k_j = jsel.select_tokens(jnp.asarray(pad_to(d, bucket, 0.0)), jnp.asarray(pad_to(eligible, bucket, False)),
                                  jnp.float32(ratio), **kw)
    m_j = cut(m_j, d.shape)
    m_o, k_o = oracle.select_tokens(d, eligible, ratio, **kw)
    m_t = m_t.numpy()
    assert m_t.shape == m_j.shape == d.shape
    assert int(k_t) == int(k_j) == k_o
    np.testing.assert_array_equal(m_t, m_o)
    np.testing.assert_array_equal(m_j, m_o)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 2**31 - 1), ratio=st.floats(2.0**-20, 1.0, width=32))
def test_level1_num_selected_identical(n, ratio):
    r = np.float32(ratio)
    k_o = oracle.num_selected(n, r)
    assert int(tcur.num_selected(torch.tensor(n), torch.tensor(r))) == k_o
    assert int(jcur.num_selected(jnp.asarray(n, dtype=jnp.int32), jnp.float32(r))) == k_o


def test_level1_curriculum_identical_over_warmup():
    t_sched = tcur.linear_warmup_ratio(0.25, 1000)
    j_sched = jax.jit(jcur.linear_warmup_ratio(0.25, 1000))
    steps = np.arange(0, 1200, 7)
    t_vals = np.array([np.float32(t_sched(int(s))) for s in steps])
    j_vals = np.array([np.float32(j_sched(jnp.int32(s))) for s in steps])
    o_vals = np.array([oracle.linear_warmup_ratio(0.25, 1000)(int(s)) for s in steps])
    np.testing.assert_array_equal(t_vals, o_vals)
    np.testing.assert_array_equal(j_vals, o_vals)


# ------------------------------------------------------------------------------------------ levels 2 - 4
def _random_batch(rng: np.random.Generator, dtype: str):
    B, T = int(rng.integers(1, 4)), int(rng.integers(1, 12))
    V = int(rng.choice([2, 7, 33, 101, 257]))
    temps = rng.uniform(0.3, 3.0, size=(B, T, 1))
    logits = (rng.standard_normal((B, T, V)) * 2.0 / temps).astype(np.float32)
    if dtype == "bfloat16":
        logits = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()  # bf16-representable values
    targets = rng.integers(0, V, size=(B, T))
    targets[rng.random((B, T)) < 0.15] = -100
    return logits, targets


def _to_torch(logits: np.ndarray, dtype: str):
    return torch.from_numpy(logits).to(getattr(torch, dtype))


def _to_jax(logits: np.ndarray, dtype: str):
    return jnp.asarray(logits).astype(getattr(jnp, dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scoring", oracle.SCORING_MODES)
def test_level2_scores_within_tolerance(dtype, scoring):
    rng = np.random.default_rng(hash((dtype, scoring)) % 2**32)
    for _ in range(6):
        logits, targets = _random_batch(rng, dtype)
        s_t = tsc.score_tokens(_to_torch(logits, dtype), torch.from_numpy(targets), scoring=scoring)
        s_j = jsc.score_tokens(_to_jax(pad_to(logits, BUCKET_BT, 0.0), dtype),
                               jnp.asarray(pad_to(targets, BUCKET_BT, -100)), scoring=scoring)
        s_j = jax.tree_util.tree_map(lambda x: cut(x, targets.shape), s_j)
        np.testing.assert_array_equal(s_t.eligible.numpy(), np.asarray(s_j.eligible))
        e = s_t.eligible.numpy()
        d_t, d_j = s_t.difficulty.numpy()[e], np.asarray(s_j.difficulty)[e]
        np.testing.assert_allclose(d_t, d_j, atol=oracle.SCORE_PARITY_ATOL, rtol=oracle.SCORE_PARITY_RTOL)
        for name in ("lse", "entropy", "confidence", "runner_up", "nll"):
            a = getattr(s_t.stats, name).numpy()[e]
            b = np.asarray(getattr(s_j.stats, name))[e]
            atol, rtol = oracle.SCORE_TOL[name]
            np.testing.assert_allclose(a, b, atol=2 * atol, rtol=2 * rtol, err_msg=name)


def _pipeline_torch(logits, targets, step, cfg):
    sc = tsc.score_tokens(logits, targets, scoring=cfg["scoring"])
    base = tcur.linear_warmup_ratio(cfg["min_tokens_ratio"], cfg["warmup_steps"])(step)
    e = sc.eligible
    n = e.sum()
    mean_conf = torch.where(e, sc.stats.confidence, 0).sum() / n.clamp(min=1)
    ratio = tcur.dynamic_ratio(torch.tensor(np.float32(base)), mean_conf, cfg["threshold_sensitivity"])
    mask, k = tsel.select_tokens(sc.difficulty, e, ratio, selection=cfg["selection"],
                                 num_strata=cfg["num_strata"],
                                 min_tokens_per_sequence=cfg["min_tokens_per_sequence"])
    return sc.difficulty.numpy(), e.numpy(), mask.numpy(), int(k), np.float32(ratio)


def _pipeline_jax(logits, targets, step, cfg):
    sc = jsc.score_tokens(logits, targets, scoring=cfg["scoring"])
    base = jcur.linear_warmup_ratio(cfg["min_tokens_ratio"], cfg["warmup_steps"])(step)
    e = sc.eligible
    n = e.sum()
    mean_conf = jnp.where(e, sc.stats.confidence, 0).sum() / jnp.maximum(n, 1)
    ratio = jcur.dynamic_ratio(base, mean_conf, cfg["threshold_sensitivity"])
    mask, k = jsel.select_tokens(sc.difficulty, e, ratio, selection=cfg["selection"],
                                 num_strata=cfg["num_strata"],
                                 min_tokens_per_sequence=cfg["min_tokens_per_sequence"])
    return np.asarray(mask), int(k), np.float32(ratio)


def _allowed_disagreements(d, eligible, selection, k, min_tps, band_of):
    """Tokens whose selection may legitimately differ (SPEC §11 level 3), from one side's scores."""
    flat_d, flat_e = d.reshape(-1), eligible.reshape(-1)
    allowed = np.zeros(flat_d.size, dtype=bool)
    vals = np.sort(flat_d[flat_e])[::-1]
    if selection == "stratified":
        for i in np.nonzero(flat_e)[0]:
            others = np.abs(flat_d[flat_e] - flat_d[i]) <= band_of(flat_d[i])
            allowed[i] = others.sum() > 1
        return allowed.reshape(d.shape)
    if k > 0:
        cut = vals[k - 1]
        allowed |= flat_e & (np.abs(flat_d - cut) <= band_of(cut))
        if k < vals.size:
            nxt = vals[k]
            allowed |= flat_e & (np.abs(flat_d - nxt) <= band_of(nxt))
    if selection == "sequence_aware" and min_tps > 0:
        d2 = d.reshape(d.shape[0], -1) if d.ndim == 2 else d.reshape(1, -1)
        e2 = eligible.reshape(d2.shape)
        a2 = allowed.reshape(d2.shape)
        for b in range(d2.shape[0]):
            v = np.sort(d2[b][e2[b]])[::-1]
            if v.size:
                c = v[min(min_tps, v.size) - 1]
                a2[b] |= e2[b] & (np.abs(d2[b] - c) <= band_of(c))
        allowed = a2.reshape(-1)
    return allowed.reshape(d.shape)


@pytest.mark.parametrize("selection", STRATEGIES)
def test_level3_selections_identical_outside_band(selection, record_property):
    rng = np.random.default_rng(1234 + STRATEGIES.index(selection))
    identical = total = 0
    for trial in range(12):
        dtype = "float32" if trial % 2 == 0 else "bfloat16"
        logits, targets = _random_batch(rng, dtype)
        cfg = dict(scoring=str(rng.choice(oracle.SCORING_MODES)), selection=selection,
                   min_tokens_ratio=float(rng.uniform(0.1, 0.9)), warmup_steps=int(rng.integers(0, 50)),
                   threshold_sensitivity=float(rng.uniform(0, 1)), num_strata=int(rng.integers(1, 5)),
                   min_tokens_per_sequence=int(rng.integers(0, 3)))
        step = int(rng.integers(0, 80))
        d_t, e_t, m_t, k_t, r_t = _pipeline_torch(_to_torch(logits, dtype), torch.from_numpy(targets), step, cfg)
        m_j, k_j, r_j = _pipeline_jax(_to_jax(pad_to(logits, BUCKET_BT, 0.0), dtype),
                                      jnp.asarray(pad_to(targets, BUCKET_BT, -100)), step, cfg)
        m_j = cut(m_j, targets.shape)
        total += 1
        if np.array_equal(m_t, m_j) and k_t == k_j:
            identical += 1
            continue
        if k_t != k_j:
            # Only a few-ulp ratio difference that straddles a quantisation boundary may move k.
            assert abs(k_t - k_j) <= 1 and abs(float(r_t) - float(r_j)) <= 4e-7, (k_t, k_j, r_t, r_j)
            continue
        band = lambda x: oracle.SCORE_PARITY_ATOL + oracle.SCORE_PARITY_RTOL * abs(x)  # noqa: E731
        allowed = _allowed_disagreements(d_t, e_t, selection, k_t, cfg["min_tokens_per_sequence"], band)
        differ = m_t != m_j
        assert not (differ & ~allowed).any(), f"selection differs outside the tolerance band ({selection})"
    PARITY_REPORT[selection] = [identical, total]
    record_property("cggr_parity", (selection, identical, total))
    assert total == 12


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("selection", STRATEGIES)
def test_level4_loss_and_gradients_agree(dtype, selection):
    rng = np.random.default_rng(99 + STRATEGIES.index(selection))
    for _ in range(3):
        logits, targets = _random_batch(rng, "bfloat16" if dtype == "bfloat16" else "float32")
        cfg = dict(scoring="combined", selection=selection, min_tokens_ratio=0.4, warmup_steps=10,
                   threshold_sensitivity=0.5, num_strata=3, min_tokens_per_sequence=1)
        lt = torch.from_numpy(logits).requires_grad_(True)
        loss_t, met_t = cggr_torch.cggr_loss(lt, torch.from_numpy(targets), 25, **cfg)
        loss_t.backward()
        padded_targets = jnp.asarray(pad_to(targets, BUCKET_BT, -100))
        fn = lambda x: cggr_jax.cggr_loss(x, padded_targets, jnp.int32(25), **cfg)  # noqa: E731
        (loss_j, met_j), g_j = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(pad_to(logits, BUCKET_BT, 0.0)))
        assert not np.asarray(g_j)[targets.shape[0]:].any() and not np.asarray(g_j)[:, targets.shape[1]:].any()
        g_j = cut(g_j, targets.shape)
        if int(met_t["tokens_selected"]) != int(met_j["tokens_selected"]):
            continue  # a band case: covered by level 3
        np.testing.assert_allclose(float(loss_t.detach()), float(loss_j), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(lt.grad.numpy(), np.asarray(g_j), atol=1e-5, rtol=1e-4)
        # and both against the oracle's analytic gradient given torch's own selection
        ref = oracle.cggr_loss(logits, targets, 25, **cfg)
        if ref["mask"].sum() == int(met_t["tokens_selected"]):
            np.testing.assert_allclose(float(loss_t.detach()), ref["loss"], atol=1e-4, rtol=1e-4)
