"""Every bad input of SPEC §1, §3, §5, §7 and §11 raises ``ValueError`` naming the argument (shape, dtype and
configuration errors at construction / trace time; out-of-range labels when they are concrete), and under
``jit`` out-of-range labels make their token ineligible instead of raising or reading out of bounds.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import cggr_jax  # noqa: E402
from cggr_jax import curriculum, scoring, selection  # noqa: E402

Z = jnp.zeros((2, 3, 5), jnp.float32)
T = jnp.zeros((2, 3), jnp.int32)
LOSS = cggr_jax.CGGRLoss()


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


# ------------------------------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("fn", [
    lambda z, t: scoring.token_statistics(z, t),
    lambda z, t: scoring.score_tokens(z, t),
    lambda z, t: LOSS(z, t, 0),
    lambda z, t: jax.jit(lambda a, b: LOSS(a, b, 0))(z, t),        # also at trace time under jit
], ids=["token_statistics", "score_tokens", "CGGRLoss", "CGGRLoss-jit"])
def test_shape_and_dtype_errors(fn):
    with _raises("targets|labels"):
        fn(Z, jnp.zeros((2, 4), jnp.int32))                         # shape mismatch
    with _raises("targets|labels"):
        fn(Z, jnp.zeros((6,), jnp.int32))                           # rank mismatch
    with _raises("targets|labels"):
        fn(Z, jnp.zeros((2, 3), jnp.float32))                       # float labels
    with _raises("targets|labels"):
        fn(Z, jnp.zeros((2, 3), bool))                              # bool labels
    with _raises("logits"):
        fn(jnp.zeros((2, 3, 5), jnp.int32), T)                      # integer logits
    with _raises("logits"):
        fn(jnp.zeros((5,), jnp.float32), jnp.zeros((), jnp.int32))  # rank 1
    with _raises("logits"):
        fn(jnp.zeros((1, 2, 3, 5), jnp.float32), jnp.zeros((1, 2, 3), jnp.int32))   # rank 4
    with _raises("logits"):
        fn(jnp.zeros((2, 3, 0), jnp.float32), T)                    # V = 0


@pytest.mark.parametrize("bad", [5, 6, -1, -101])
def test_out_of_range_labels_raise_when_concrete(bad):
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = bad
    for fn in (lambda: scoring.token_statistics(Z, jnp.asarray(t)),
               lambda: scoring.score_tokens(Z, t),                   # NumPy labels are concrete too
               lambda: LOSS(Z, jnp.asarray(t), 0),
               lambda: jax.grad(lambda z: LOSS(z, jnp.asarray(t), 0)[0])(Z)):   # grad traces only the logits
        with _raises(r"\[0, 5\)"):
            fn()


def test_out_of_range_labels_under_jit_do_not_raise():
    t = jnp.asarray([[0, 1, 5], [-3, -100, 4]])
    loss, metrics = jax.jit(lambda z, t: LOSS(z, t, 0))(Z, t)
    assert int(metrics["tokens_out_of_range"]) == 2
    assert int(metrics["tokens_total"]) == 3 and np.isfinite(float(loss))
    sc = jax.jit(lambda z, t: scoring.score_tokens(z, t))(Z, t)
    # SPEC §4: valid = target != ignore_index; the out-of-range ones are valid but never eligible (SPEC §11)
    np.testing.assert_array_equal(np.asarray(sc.valid), [[True, True, True], [True, False, True]])
    np.testing.assert_array_equal(np.asarray(sc.eligible), [[True, True, False], [False, False, True]])


def test_ignore_index_is_not_out_of_range():
    t = jnp.asarray([[0, -100, 4], [-100, -100, 1]])
    LOSS(Z, t, 0)
    loss, m = cggr_jax.CGGRLoss(ignore_index=7)(Z, jnp.asarray([[0, 7, 4], [7, 7, 1]]), 0)
    assert int(m["tokens_total"]) == 3
    with _raises("targets"):
        cggr_jax.CGGRLoss(ignore_index=7)(Z, t, 0)                  # -100 is now out of range


def test_loss_scoring_needs_labels():
    with _raises("loss"):
        scoring.score_tokens(Z, None, scoring="loss")
    st = scoring.token_statistics(Z)
    with _raises("loss"):
        scoring.difficulty_from_statistics(st, "loss", has_targets=False)


def test_valid_mask_checks():
    with _raises("valid_mask"):
        scoring.score_tokens(Z, None, valid_mask=jnp.ones((2, 4), bool))
    with _raises("valid_mask"):
        scoring.score_tokens(Z, None, valid_mask=jnp.ones((2, 3), jnp.int32))


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs,name", [
    (dict(min_tokens_ratio=0.0), "min_tokens_ratio"),
    (dict(min_tokens_ratio=-0.1), "min_tokens_ratio"),
    (dict(min_tokens_ratio=1.5), "min_tokens_ratio"),
    (dict(min_tokens_ratio=float("nan")), "min_tokens_ratio"),
    (dict(min_tokens_ratio="0.5"), "min_tokens_ratio"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=10.0), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(threshold_sensitivity=-0.5), "threshold_sensitivity"),
    (dict(threshold_sensitivity=float("inf")), "threshold_sensitivity"),
    (dict(num_strata=0), "num_strata"),
    (dict(num_strata=selection.MAX_STRATA + 1), "num_strata"),
    (dict(min_tokens_per_sequence=-1), "min_tokens_per_sequence"),
    (dict(scoring="perplexity"), "scoring"),
    (dict(selection="random"), "selection"),
    (dict(dynamic_threshold="yes"), "dynamic_threshold"),
    (dict(ignore_index=-100.0), "ignore_index"),
    (dict(ratio_schedule=0.5), "ratio_schedule"),
])
def test_configuration_errors_at_construction(kwargs, name):
    with _raises(name):
        cggr_jax.CGGRLoss(**kwargs)
    with _raises(name):
        cggr_jax.cggr_loss(Z, T, 0, **kwargs)


def test_schedule_and_ratio_errors():
    with _raises("min_tokens_ratio"):
        curriculum.linear_warmup_ratio(0.0, 10)
    with _raises("warmup_steps"):
        curriculum.linear_warmup_ratio(0.5, -3)
    with _raises("threshold_sensitivity"):
        curriculum.dynamic_ratio(0.5, 0.5, -1.0)
    # a custom schedule whose value leaves (0, 1] is caught when the step is concrete
    bad = cggr_jax.CGGRLoss(ratio_schedule=optax.constant_schedule(1.5))
    with _raises("ratio_schedule"):
        bad(Z, T, 0)
    with _raises("ratio_schedule"):
        cggr_jax.CGGRLoss(ratio_schedule=lambda s: jnp.ones(3))(Z, T, 0)


@pytest.mark.parametrize("step", [-1, 1.5, jnp.float32(2.0), jnp.zeros(2, jnp.int32), True, "3", 2**31])
def test_step_errors(step):
    with _raises("step"):
        LOSS(Z, T, step)


def test_selection_argument_errors():
    d = jnp.zeros(6, jnp.float32)
    e = jnp.ones(6, bool)
    for ratio in (0.0, -0.2, 1.5, float("nan"), jnp.float32(2.0)):
        with _raises("ratio"):
            selection.select_tokens(d, e, ratio)
    with _raises("difficulty"):
        selection.select_tokens(jnp.zeros(6, jnp.int32), e, 0.5)
    with _raises("difficulty"):
        selection.select_tokens(jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3), bool), 0.5)
    with _raises("eligible"):
        selection.select_tokens(d, jnp.ones(6, jnp.int32), 0.5)
    with _raises("eligible"):
        selection.select_tokens(d, jnp.ones(5, bool), 0.5)
    with _raises("selection"):
        selection.select_tokens(d, e, 0.5, selection="top_k")
    with _raises("num_strata"):
        selection.select_tokens(d, e, 0.5, selection="stratified", num_strata=0)
    with _raises("min_tokens_per_sequence"):
        selection.select_tokens(d, e, 0.5, selection="sequence_aware", min_tokens_per_sequence=-2)
    with _raises("eligible"):
        selection.rank_tokens(d, jnp.ones(5, bool))
    with _raises("n"):
        curriculum.num_selected(jnp.float32(3.0), 0.5)


def test_shift_transform_and_metrics_errors():
    with _raises("logits"):
        cggr_jax.shift_for_causal_lm(jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32))
    with _raises("labels"):
        cggr_jax.shift_for_causal_lm(Z, jnp.zeros((2, 4), jnp.int32))
    with _raises("CurriculumState"):
        cggr_jax.current_step(optax.adamw(1e-3).init({"w": jnp.ones(2)}))
    tx = cggr_jax.advance_curriculum()
    state = tx.init({"w": jnp.ones(2)})
    with _raises("cggr_metrics"):
        tx.update({"w": jnp.ones(2)}, state, cggr_metrics={"step": 1})
    _, metrics = LOSS(Z, T, 0)
    with _raises("metrics"):
        cggr_jax.metrics_to_dict({"step": 1}, LOSS)
    with _raises("loss_fn"):
        cggr_jax.metrics_to_dict(metrics, "topk")


# --------------------------------------------------------------------------------- label dtypes (SPEC §1.1)
def test_int64_host_labels_beyond_int32_raise_before_conversion():
    """Without 64-bit mode ``jnp.asarray`` would wrap 2**32 + 3 to 3 (in range): the host values are checked
    first, in every entry point, and the error names the caller's argument."""
    t = np.zeros((2, 3), np.int64)
    t[0, 1] = 2**32 + 3
    for fn, name in ((lambda: LOSS(Z, t, 0), "targets"), (lambda: scoring.score_tokens(Z, t), "targets"),
                     (lambda: scoring.token_statistics(Z, t), "targets"),
                     (lambda: LOSS(*cggr_jax.shift_for_causal_lm(Z, t), 0), "targets")):
        with _raises(rf"{name}: values must lie in \[0, 5\).*{2**32 + 3}"):
            fn()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_labels_with_negative_ignore_index_are_refused(dtype):
    t = np.zeros((2, 3), dtype)
    for given in (t, jnp.asarray(t)):
        with _raises(rf"targets: dtype {np.dtype(dtype).name} .*ignore_index=-100"):
            LOSS(Z, given, 0)
        with _raises(rf"targets: dtype {np.dtype(dtype).name} .*ignore_index=-100"):
            jax.jit(lambda z, tt: LOSS(z, tt, 0))(Z, given)         # a static rule: raises under jit too
    loss, m = cggr_jax.CGGRLoss(ignore_index=0)(Z, t + 1, 0)        # an ignore_index the dtype holds
    assert int(m["tokens_total"]) == 6 and np.isfinite(float(loss))
