"""SPEC §3.1 in cggr_jax: ``scoring='excess'`` (d = nll − reference_nll) against the float64 oracle.

Odd shapes, fp32/fp16/bf16 logits, fp16/fp32/bf16/fp64 (host) references, ignore_index, NaN/±inf in the logits
and in the reference (counted in ``tokens_nonfinite``), all-ignored batches, ``jit`` with one compilation,
the entry points that refuse the mode, and every error message.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

import cggr_jax  # noqa: E402
from cggr_jax import scorer, scoring  # noqa: E402
from cggr_jax import loss as loss_module  # noqa: E402
from tests import oracle  # noqa: E402

LOGIT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
REF_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


def _batch(rng, shape, logits_dtype, p_ignore=0.15):
    temps = rng.uniform(0.3, 3.0, size=shape[:-1] + (1,))
    z = (rng.standard_normal(shape) * 2.0 / temps).astype(LOGIT_DTYPES[logits_dtype])
    t = rng.integers(0, shape[-1], size=shape[:-1])
    t[rng.random(shape[:-1]) < p_ignore] = -100
    return z, t


def _check(z, t, ref):
    """Scores of (z, t, ref) against the oracle within SPEC §11's excess bound."""
    sc = scoring.score_tokens(jnp.asarray(z), jnp.asarray(t), scoring="excess", reference_nll=ref)
    ref64 = np.asarray(ref, np.float64)             # float64 stays float64: the oracle sees the caller's values
    exp = oracle.score_tokens(np.asarray(z, np.float64), t, "excess", reference_nll=ref64)
    np.testing.assert_array_equal(np.asarray(sc.valid), exp["valid"])
    np.testing.assert_array_equal(np.asarray(sc.eligible), exp["eligible"])
    e = exp["eligible"]
    err = np.abs(np.asarray(sc.difficulty, np.float64) - exp["difficulty"])[e]
    bound = (3e-4 + 1e-5 * np.abs(exp["difficulty"]) + 1e-5 * np.abs(exp["stats"]["nll"])
             + 2.0 ** -24 * np.abs(ref64))[e]
    assert (err <= bound).all(), float((err - bound).max())
    r32 = np.asarray(ref).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sc.difficulty)[e], (np.asarray(sc.stats.nll) - r32)[e])
    return sc


@pytest.mark.parametrize("logits_dtype", list(LOGIT_DTYPES))
@pytest.mark.parametrize("ref_dtype", list(REF_DTYPES))
@pytest.mark.parametrize("shape", [(3, 7, 33), (13, 5), (1, 1, 1)])
def test_excess_matches_oracle(logits_dtype, ref_dtype, shape):
    rng = np.random.default_rng(hash((logits_dtype, ref_dtype, shape)) % 2**32)
    z, t = _batch(rng, shape, logits_dtype)
    ref = rng.uniform(-1.0, 6.0, shape[:-1]).astype(REF_DTYPES[ref_dtype])
    _check(z, t, ref)


def test_float64_reference_is_rounded_to_float32():
    ref = np.array([1.0 + 2.0 ** -30, 0.1])
    sc = scoring.score_tokens(jnp.zeros((2, 4)), jnp.array([0, 1]), scoring="excess", reference_nll=ref)
    np.testing.assert_array_equal(np.asarray(sc.difficulty),
                                  np.asarray(sc.stats.nll) - ref.astype(np.float32))


def test_nonfinite_logits_and_reference_are_not_eligible_and_counted():
    rng = np.random.default_rng(3)
    z, t = _batch(rng, (3, 6, 11), "float32", p_ignore=0.0)
    t[0, 0] = -100
    z[1, 2, 4] = np.nan
    z[2, 3, :] = -np.inf
    ref = rng.uniform(0, 3, (3, 6)).astype(np.float32)
    ref[0, 0] = np.nan
    ref[0, 1], ref[1, 1], ref[2, 1] = np.nan, np.inf, -np.inf
    sc = _check(z, t, ref)
    for pos in [(0, 1), (1, 1), (2, 1), (1, 2), (2, 3)]:
        assert bool(sc.valid[pos]) and not bool(sc.eligible[pos]), pos
    loss_fn = cggr_jax.CGGRLoss(scoring="excess", warmup_steps=0, min_tokens_ratio=0.5)
    (loss, m), g = jax.value_and_grad(lambda x: loss_fn(x, jnp.asarray(t), 0, reference_nll=jnp.asarray(ref)),
                                      has_aux=True)(jnp.asarray(z))
    exp = oracle.cggr_loss(z.astype(np.float64), t, 0, scoring="excess", warmup_steps=0, min_tokens_ratio=0.5,
                           reference_nll=ref.astype(np.float64))
    assert int(m["tokens_nonfinite"]) == exp["metrics"]["tokens_nonfinite"] == 5
    assert int(m["tokens_total"]) == exp["metrics"]["tokens_total"] == 12
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    for pos in [(0, 1), (1, 1), (2, 1), (1, 2), (2, 3), (0, 0)]:
        assert not np.asarray(g)[pos].any(), pos


@pytest.mark.parametrize("selection", ["topk", "stratified", "sequence_aware", "fixed_quota"])
def test_loss_and_gradient_match_oracle(selection):
    rng = np.random.default_rng(17)
    z, t = _batch(rng, (3, 7, 29), "float32")
    ref = rng.uniform(-1.0, 6.0, (3, 7)).astype(np.float32)
    cfg = dict(scoring="excess", selection=selection, warmup_steps=10, min_tokens_ratio=0.3)
    (loss, m), g = jax.value_and_grad(
        lambda x: cggr_jax.cggr_loss(x, jnp.asarray(t), 4, reference_nll=jnp.asarray(ref), **cfg),
        has_aux=True)(jnp.asarray(z))
    d = np.asarray(scoring.score_tokens(jnp.asarray(z), jnp.asarray(t), scoring="excess",
                                        reference_nll=ref).difficulty, np.float64)
    exp = oracle.cggr_loss(z.astype(np.float64), t, 4, reference_nll=ref.astype(np.float64),
                           difficulty_override=d, **cfg)
    assert int(m["tokens_selected"]) == exp["metrics"]["tokens_selected"]
    np.testing.assert_allclose(float(loss), exp["loss"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g), exp["grad"], atol=1e-5, rtol=1e-4)


def test_excess_selects_by_loss_minus_reference():
    loss_fn = cggr_jax.CGGRLoss(scoring="excess", selection="topk", warmup_steps=0, min_tokens_ratio=0.25,
                                dynamic_threshold=False)
    g = jax.grad(lambda x: loss_fn(x, jnp.array([0, 1, 2, 3]), 0,
                                   reference_nll=jnp.array([3.0, 0.0, 1.0, 2.0]))[0])(jnp.zeros((4, 5)))
    g = np.asarray(g)
    assert np.abs(g[1]).sum() > 0 and not g[[0, 2, 3]].any()


def test_all_ignored_batch_is_zero_loss_and_zero_grad():
    loss_fn = cggr_jax.CGGRLoss(scoring="excess")
    t = jnp.full((2, 3), -100)
    ref = jnp.full((2, 3), jnp.nan)
    (loss, m), g = jax.value_and_grad(lambda x: loss_fn(x, t, 0, reference_nll=ref), has_aux=True)(
        jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 7)), jnp.float32))
    assert float(loss) == 0.0 and not np.asarray(g).any()
    assert (int(m["tokens_total"]), int(m["tokens_selected"]), int(m["tokens_nonfinite"])) == (0, 0, 0)


def test_jitted_excess_compiles_once():
    loss_fn = cggr_jax.CGGRLoss(scoring="excess", warmup_steps=4)
    traces = []

    @jax.jit
    def step_fn(logits, labels, step, ref):
        traces.append(1)
        return jax.value_and_grad(lambda x: loss_fn(x, labels, step, reference_nll=ref), has_aux=True)(logits)

    rng = np.random.default_rng(2)
    selected = set()
    for step in range(6):
        z = jnp.asarray(rng.standard_normal((2, 5, 13)), jnp.float32)
        t = jnp.asarray(rng.integers(0, 13, (2, 5)))
        ref = jnp.asarray(rng.uniform(0, 4, (2, 5)), jnp.float32)
        (_, m), _ = step_fn(z, t, step, ref)
        selected.add(int(m["tokens_selected"]))
    assert len(traces) == 1 and step_fn._cache_size() == 1 and len(selected) >= 2
    # the eager path: one executable for every step and reference of one shape
    before = loss_module._loss_impl._cache_size()
    for step in range(3):
        loss_fn(jnp.zeros((3, 7)), jnp.arange(3), step, reference_nll=jnp.full((3,), float(step)))
    assert loss_module._loss_impl._cache_size() - before == 1


def test_difficulty_from_statistics_excess():
    z = jnp.asarray(np.random.default_rng(4).standard_normal((5, 9)), jnp.float32)
    stats = scoring.token_statistics(z, jnp.arange(5))
    ref = jnp.array([0.5, jnp.nan, 1.0, jnp.inf, 2.0])
    d = np.asarray(scoring.difficulty_from_statistics(stats, "excess", reference_nll=ref))
    np.testing.assert_array_equal(d[[0, 2, 4]], (np.asarray(stats.nll) - np.asarray(ref))[[0, 2, 4]])
    assert np.isnan(d[[1, 3]]).all()


# ------------------------------------------------------------------------------------------------ errors
Z, T = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32)


def test_missing_reference_names_it():
    for call in (lambda: scoring.score_tokens(Z, T, scoring="excess"),
                 lambda: cggr_jax.cggr_loss(Z, T, 0, scoring="excess"),
                 lambda: cggr_jax.CGGRLoss(scoring="excess")(Z, T, 0)):
        with pytest.raises(ValueError, match=r"reference_nll: scoring='excess' needs .*\(2, 3\)"):
            call()


def test_reference_with_another_scoring_is_refused():
    ref = jnp.zeros((2, 3))
    for call in (lambda: scoring.score_tokens(Z, T, scoring="loss", reference_nll=ref),
                 lambda: cggr_jax.cggr_loss(Z, T, 0, reference_nll=ref),
                 lambda: cggr_jax.CGGRLoss(scoring="entropy")(Z, T, 0, reference_nll=ref)):
        with pytest.raises(ValueError,
                           match=r"reference_nll: only scoring='excess'.*scoring='(loss|combined|entropy)'"):
            call()


def test_wrong_shape_dtype_and_type_name_reference_nll():
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 3\).*got \(3, 2\)"):
        cggr_jax.CGGRLoss(scoring="excess")(Z, T, 0, reference_nll=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"reference_nll: expected shape \(2, 3\).*got \(6,\)"):
        scoring.score_tokens(Z, T, scoring="excess", reference_nll=np.zeros(6))
    with pytest.raises(ValueError, match="reference_nll: expected a floating dtype"):
        scoring.score_tokens(Z, T, scoring="excess", reference_nll=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="reference_nll: expected a floating array"):
        scoring.score_tokens(Z, T, scoring="excess", reference_nll=[[0.0] * 3] * 2)
    with pytest.raises(ValueError, match="targets: scoring='excess' needs targets"):
        scoring.score_tokens(Z, None, scoring="excess", reference_nll=jnp.zeros((2, 3)))


def test_batch_split_step_names_a_missing_reference():
    # The fused LM head and the distributed loss take reference_nll (tests/jax/test_excess_heads.py), and so does
    # the batch-split step (SPEC §9.1; tests/jax/test_split_excess.py): a missing one names it.
    cfg = scorer.BatchSplitConfig(router_layers=1, scoring="excess")
    with pytest.raises(ValueError, match="reference_nll: scoring='excess' needs the reference model's loss"):
        scorer.select_sequences(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), ratio=0.5, config=cfg)
