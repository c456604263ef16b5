"""Sequence-level ``selection="sampled"`` (SPEC §9.2) in JAX: ``scorer.select_sequences`` and the jitted
batch-split step, against the float64 oracle (``tests.oracle.sample_sequences`` on the sequence difficulties,
``tests.oracle.sampled_sequence_loss`` for the Horvitz–Thompson loss), an independent gradient, unbiasedness
over many steps, all-ignored batches, ``excess`` + ``sampled`` and bad input."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from cggr_jax import batch_split as bs  # noqa: E402
from cggr_jax import scorer as jsc  # noqa: E402
from cggr_jax.integrations import latest_metrics  # noqa: E402
from tests import oracle  # noqa: E402
from tests.jax.test_batch_split import (B, BUCKETS, FAST, IGNORE, LR, T, V, _batch, _curriculum_tx,  # noqa: E402
                                        _model, _tokens)

SAMPLE = dict(sample_power=1.5, sample_uniform_mix=0.2, sample_floor=1e-6, sample_seed=7)
SAMPLED = jsc.BatchSplitConfig(selection="sampled", warmup_steps=0, min_tokens_ratio=0.4, **SAMPLE)


def _oracle_draw(sel, step: int, cfg: jsc.BatchSplitConfig = SAMPLED):
    c = cfg.config
    return oracle.sample_sequences(np.asarray(sel.difficulty, np.float64), np.asarray(sel.eligible),
                                   np.float32(sel.ratio), step, c.sample_seed, c.sample_power, c.sample_uniform_mix,
                                   c.sample_floor)


def _assert_same_draw(mask, mask_o, pi, u):
    """Equal inclusions, except where ``u`` lies within the π tolerance of SPEC §11 (float32 vs float64 π)."""
    diff = np.asarray(mask) != mask_o
    assert np.all(np.abs(u[diff] - pi[diff]) <= oracle.PI_RTOL * pi[diff] + 1e-7)
    return diff


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_select_sequences_draw_matches_the_oracle(dtype):
    z, z_exact, labels, mask = _batch(2, dtype=dtype)        # B = 9, T = 7, NaN/inf rows, padding, ignored
    # ratio form: the draw at step 0
    sel = jsc.select_sequences(z, labels, mask, ratio=np.float32(0.45), config=SAMPLED)
    o = oracle.select_sequences(z_exact, np.asarray(labels), np.float32(0.45), attention_mask=np.asarray(mask))
    e = o["sequence_eligible"]
    np.testing.assert_array_equal(np.asarray(sel.eligible), e)
    assert not e[4] and not e[5]
    np.testing.assert_allclose(np.asarray(sel.difficulty)[e], o["sequence_difficulty"][e], atol=6e-4, rtol=1e-5)
    mask_o, _, k_o, pi, u = _oracle_draw(sel, 0)
    assert int(sel.k) == k_o == o["k"]
    _assert_same_draw(sel.mask, mask_o, pi, u)
    # curriculum form at several steps, eager and under jit (one trace: the step is traced)
    jitted = jax.jit(lambda s: jsc.select_sequences(z, labels, mask, step=s, config=SAMPLED))
    counts = set()
    for step in range(8):
        s = jsc.select_sequences(z, labels, mask, step=step, config=SAMPLED)
        sj = jitted(jnp.int32(step))
        np.testing.assert_array_equal(np.asarray(s.mask), np.asarray(sj.mask))
        mask_o, _, k_o, pi, u = _oracle_draw(s, step)
        assert int(s.k) == k_o
        _assert_same_draw(s.mask, mask_o, pi, u)
        assert not np.asarray(s.mask)[~e].any()
        counts.add(int(np.asarray(s.mask).sum()))
    assert len(counts) >= 2


def _run(cfg, batches, lr=LR, buckets=BUCKETS):
    model = _model(1)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    step = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(lr)), buckets=buckets,
                                          donate=False, compiler_options=FAST)
    state = step.init(model)
    states, metrics = [state], []
    for batch in batches:
        state, m = step(state, *batch)
        states.append(state)
        metrics.append(jax.device_get(m))
    return graphdef, step, states, metrics


def _batch_at(i: int):
    ids = _tokens(300 + i)
    labels = ids.at[2, 1:].set(IGNORE).at[3, 2].set(IGNORE)   # row 2 never eligible
    mask = jnp.ones((B, T), jnp.int32).at[5, 5:].set(0).at[6, :2].set(0)
    return ids, labels, mask


def _weighted_loss(graphdef, params, rest, ids, labels, mask, w, n_tok):
    """Σ_b w_b Σ_t ce_{b,t} / N_tok over the full batch, written independently (log_softmax)."""
    logits = nnx.merge(graphdef, params, rest)(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = labels[:, 1:]
    valid = (tgt != IGNORE) & (mask[:, 1:] != 0)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0).sum(1) * w) / n_tok


def test_step_loss_weights_gradient_and_metrics():
    cfg = jsc.BatchSplitConfig(router_layers=1, selection="sampled", warmup_steps=0, min_tokens_ratio=0.4, **SAMPLE)
    batches = [_batch_at(i) for i in range(6)]
    graphdef, step, states, metrics = _run(cfg, batches)
    router_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(graphdef, p, r).router_logits(ids, 1, mask))
    grad_fn = jax.jit(jax.value_and_grad(_weighted_loss, argnums=1), static_argnums=0)
    checked, counts = 0, set()
    for i, m in enumerate(metrics):
        before = states[i]
        ids, labels, mask = batches[i]
        sel = jsc.select_sequences(router_fn(before.params, before.rest, ids, mask), labels, mask, step=i, config=cfg)
        mask_o, w_o, k_o, pi, u = _oracle_draw(sel, i, cfg)
        kept = np.asarray(sel.mask)
        n_kept = int(kept.sum())
        counts.add(n_kept)
        assert int(m["sequences_selected"]) == n_kept                 # the realised count
        assert int(m["bucket_size"]) == (0 if n_kept == 0 else min(b for b in BUCKETS + (B,) if b >= n_kept))
        assert not kept[2]
        if _assert_same_draw(kept, mask_o, pi, u).any():
            continue
        e = np.asarray(sel.eligible)
        logits = nnx.merge(graphdef, before.params, before.rest)(ids, mask)
        ref = oracle.sampled_sequence_loss(np.asarray(logits, np.float64), np.asarray(labels), w_o, e,
                                           attention_mask=np.asarray(mask))
        np.testing.assert_allclose(float(m["loss"]), ref["loss"], rtol=2e-5, atol=1e-6)
        valid = (np.asarray(labels)[:, 1:] != IGNORE) & (np.asarray(mask)[:, 1:] != 0)
        assert int(m["tokens_selected"]) == int(valid[kept].sum())
        assert ref["n_tok"] == int(valid[e].sum())
        # the SGD update is that of the independent weighted loss
        loss, grads = grad_fn(graphdef, before.params, before.rest, ids, labels, mask,
                              jnp.asarray(w_o, jnp.float32), ref["n_tok"])
        np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
        expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, before.params, grads)
        for a, b in zip(jax.tree_util.tree_leaves(states[i + 1].params), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        # SPEC §10: sample_ess of the kept sequences' weights reaches the curriculum's metrics
        lm = latest_metrics(states[i + 1].opt_state)
        np.testing.assert_allclose(float(lm["sample_ess"]), oracle.sample_ess(w_o), rtol=1e-5)
        checked += 1
    assert checked >= 3 and len(counts) >= 2
    assert step.num_traces == 1                                       # the realised count never recompiles


def test_step_loss_is_unbiased():
    """With a frozen model (lr 0), the mean step loss over many draws → the mean token CE of the eligible
    sequences (tolerance from the HT variance Σ_b (1 − π_b)/π_b · (S_b / N_tok)²)."""
    cfg = jsc.BatchSplitConfig(router_layers=1, selection="sampled", warmup_steps=0, min_tokens_ratio=0.3,
                              dynamic_threshold=False, **SAMPLE)
    batch = _batch_at(0)
    S = 200
    graphdef, _, states, metrics = _run(cfg, [batch] * S, lr=0.0)
    ids, labels, mask = batch
    p0 = states[0]
    logits = nnx.merge(graphdef, p0.params, p0.rest)(ids, mask)
    sel = jsc.select_sequences(nnx.merge(graphdef, p0.params, p0.rest).router_logits(ids, 1, mask), labels, mask,
                              step=0, config=cfg)
    _, _, _, pi, _ = _oracle_draw(sel, 0, cfg)
    e = np.asarray(sel.eligible)
    ref = oracle.sampled_sequence_loss(np.asarray(logits, np.float64), np.asarray(labels), np.zeros(B), e,
                                       attention_mask=np.asarray(mask))
    y = ref["row_ce"] / ref["n_tok"]
    var = float(np.sum(np.where(e, (1 - pi) / np.where(pi > 0, pi, 1) * y * y, 0.0)))
    assert var > 0 and np.all(pi[e] > 0)
    losses = np.array([float(m["loss"]) for m in metrics])
    assert abs(losses.mean() - ref["full_mean"]) <= 5 * np.sqrt(var / S) + 1e-5
    assert 0.5 * var <= losses.var() <= 2.0 * var


def test_all_ignored_batch_and_excess_with_sampled():
    cfg = jsc.BatchSplitConfig(router_layers=1, selection="sampled", warmup_steps=0, min_tokens_ratio=0.5,
                              scoring="excess", **SAMPLE)
    ids, labels, mask = _batch_at(1)
    ref = np.random.default_rng(0).uniform(0.5, 3.0, B).astype(np.float32)
    ref[4] = np.nan                                  # sequence 4 is not eligible
    model = _model(1)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    step = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), buckets=BUCKETS,
                                          donate=False, compiler_options=FAST)
    state = step.init(model)
    new, m = step(state, ids, labels, mask, jnp.asarray(ref))
    router_logits = model.router_logits(ids, 1, mask)
    sel = jsc.select_sequences(router_logits, labels, mask, step=0, config=cfg, reference_nll=jnp.asarray(ref))
    o = oracle.select_sequences_excess(np.asarray(router_logits, np.float64), np.asarray(labels), np.float32(sel.ratio),
                                       ref, attention_mask=np.asarray(mask))
    e = o["sequence_eligible"]
    assert not e[4] and not e[2]
    np.testing.assert_array_equal(np.asarray(sel.eligible), e)
    mask_o, w_o, _, pi, u = _oracle_draw(sel, 0, cfg)
    assert int(m["sequences_selected"]) == int(np.asarray(sel.mask).sum())
    if not _assert_same_draw(sel.mask, mask_o, pi, u).any():
        r = oracle.sampled_sequence_loss(np.asarray(model(ids, mask), np.float64), np.asarray(labels), w_o, e,
                                         attention_mask=np.asarray(mask))
        np.testing.assert_allclose(float(m["loss"]), r["loss"], rtol=2e-5, atol=1e-6)
    # every target ignored: loss 0, the parameters do not move, ESS 0
    new2, m2 = step(new, ids, jnp.full_like(labels, IGNORE), mask, jnp.asarray(ref))
    assert float(m2["loss"]) == 0.0 and int(m2["sequences_selected"]) == 0 and int(m2["bucket_size"]) == 0
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(new2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(latest_metrics(new2.opt_state)["sample_ess"]) == 0.0


def test_bad_input():
    for field, bad in [("sample_power", -1.0), ("sample_uniform_mix", 1.5), ("sample_floor", 0.0),
                       ("sample_seed", -1), ("sample_seed", 2**32)]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            jsc.BatchSplitConfig(selection="sampled", **{field: bad})
    with pytest.raises(ValueError, match="^selection: batch splitting"):
        jsc.BatchSplitConfig(selection="stratified")
    with pytest.raises(ValueError, match="^weights:"):
        bs.causal_lm_loss(jnp.zeros((2, 3, V)), jnp.zeros((2, 3), jnp.int32), weighted=True)
