"""Batch splitting with a reference in JAX (SPEC §9.1): ``select_sequences`` / ``select_sequences_fused`` and the
jitted batch-split step with ``reference_nll`` per token ``(B, T)`` (aligned like the unshifted labels) or per
sequence ``(B,)``, against the float64 oracle (``tests.oracle.select_sequences_excess``) and an independent
computation of the step (the plain loss on exactly the kept sequences)."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from cggr_jax import batch_split as bs  # noqa: E402
from cggr_jax import scorer as jsc  # noqa: E402
from cggr_jax.causal_lm import head_weight  # noqa: E402
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402
from tests import oracle  # noqa: E402
from tests.jax.test_batch_split import FAST, IGNORE, _batch, _curriculum_tx, _plain_loss  # noqa: E402

FORMS = ("token", "sequence")
EXCESS = jsc.BatchSplitConfig(scoring="excess", warmup_steps=0, min_tokens_ratio=0.4)


def _reference(seed: int, labels, mask, form: str, nonfinite: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B, T = labels.shape
    if form == "sequence":
        ref = rng.uniform(0.5, 3.0, B).astype(np.float32)
        if nonfinite:
            ref[6] = np.nan      # sequence 6 (right-padded) is not eligible, its valid tokens counted
            ref[7] = np.inf      # sequence 7 (left-padded) too
        return ref
    ref = rng.uniform(0.0, 3.0, (B, T)).astype(np.float32)
    if nonfinite:
        ref[:, 0] = np.nan                                    # never read (shifted like the labels)
        ref[(np.asarray(labels) == IGNORE) | (np.asarray(mask) == 0)] = np.nan   # never read, never counted
        ref[0, 4] = np.inf
        ref[6, 2] = -np.inf
        ref[7, 5] = np.nan
    return ref


def _check(sel, o, ratio):
    ok = o["sequence_eligible"]
    np.testing.assert_array_equal(np.asarray(sel.eligible), ok)
    sc = o["scores"]
    np.testing.assert_array_equal(np.asarray(sel.token_scores.eligible), sc["eligible"])
    np.testing.assert_allclose(np.asarray(sel.difficulty)[ok], o["sequence_difficulty"][ok], atol=6e-4, rtol=1e-5)
    e = sc["eligible"]
    np.testing.assert_allclose(np.asarray(sel.token_scores.difficulty)[e], sc["difficulty"][e], atol=6e-4,
                               rtol=1e-5)
    mask_o, k_o = oracle.select_tokens(np.asarray(sel.difficulty, np.float64), np.asarray(sel.eligible), ratio)
    np.testing.assert_array_equal(np.asarray(sel.mask), mask_o)
    assert int(sel.k) == k_o == o["k"]
    info = jsc.selection_info(sel)
    assert int(info["tokens_total"]) == int(e.sum())
    assert int(info["tokens_nonfinite"]) == int(sc["nonfinite"].sum())
    np.testing.assert_allclose(float(info["avg_difficulty"]), sc["difficulty"][e].mean(), atol=6e-4)
    return mask_o


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_select_sequences_matches_the_oracle(form, dtype):
    z, z_exact, labels, mask = _batch(5 + FORMS.index(form), dtype=dtype)   # B = 9, T = 7: odd sizes
    ref = _reference(1, labels, mask, form)
    ratio = np.float32(0.45)
    sel = jsc.select_sequences(z, labels, mask, ratio=ratio, config=EXCESS, reference_nll=jnp.asarray(ref))
    o = oracle.select_sequences_excess(z_exact, np.asarray(labels), ratio, ref, attention_mask=np.asarray(mask))
    assert not o["sequence_eligible"][4] and not o["sequence_eligible"][5]   # all-ignored, all-padding
    if form == "sequence":
        assert not o["sequence_eligible"][6] and not o["sequence_eligible"][7]
    assert o["scores"]["nonfinite"].sum() > 3
    _check(sel, o, ratio)
    # under jit: the same selection; a NumPy float64 reference rounds to the same float32
    jitted = jax.jit(lambda zz, r, q: jsc.select_sequences(zz, labels, mask, ratio=q, config=EXCESS,
                                                          reference_nll=r))
    sj = jitted(z, jnp.asarray(ref), jnp.float32(ratio))
    np.testing.assert_array_equal(np.asarray(sj.mask), np.asarray(sel.mask))
    # SPEC §9: the mean's summation order is free (a GPU's jit and eager reductions differ in the last bit)
    np.testing.assert_allclose(np.asarray(sj.difficulty), np.asarray(sel.difficulty), rtol=1e-6, atol=1e-6)
    s64 = jsc.select_sequences(z, labels, mask, ratio=ratio, config=EXCESS, reference_nll=ref.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(s64.difficulty), np.asarray(sel.difficulty))
    # at a curriculum step: c̄ over the eligible tokens (the reference's non-finite tokens excluded)
    st = jsc.select_sequences(z, labels, mask, step=0, config=EXCESS, reference_nll=jnp.asarray(ref))
    e = o["scores"]["eligible"]
    cbar = o["scores"]["stats"]["confidence"][e].mean()
    assert abs(float(st.ratio) - float(oracle.dynamic_ratio(np.float32(0.4), cbar, 0.5))) < 1e-6


def test_custom_ignore_index():
    z, z_exact, labels, mask = _batch(9)
    labels = jnp.where(labels == IGNORE, -1, labels)
    cfg = jsc.BatchSplitConfig(scoring="excess", ignore_index=-1)
    ref = _reference(2, jnp.where(labels == -1, IGNORE, labels), mask, "token")
    sel = jsc.select_sequences(z, labels, mask, ratio=np.float32(0.5), config=cfg, reference_nll=jnp.asarray(ref))
    o = oracle.select_sequences_excess(z_exact, np.asarray(labels), np.float32(0.5), ref, ignore_index=-1,
                                       attention_mask=np.asarray(mask))
    _check(sel, o, np.float32(0.5))


def test_per_token_and_per_sequence_forms_agree():
    z, _, labels, mask = _batch(3)
    ref_tok = _reference(4, labels, mask, "token", nonfinite=False)
    tok = jsc.select_sequences(z, labels, mask, ratio=0.5, config=EXCESS, reference_nll=jnp.asarray(ref_tok))
    elig = np.asarray(tok.token_scores.eligible)            # (B, T − 1): column t predicts labels[:, t + 1]
    per_seq = np.where(elig, ref_tok[:, 1:].astype(np.float64), 0.0).sum(1) / np.maximum(elig.sum(1), 1)
    seq = jsc.select_sequences(z, labels, mask, ratio=0.5, config=EXCESS, reference_nll=per_seq)
    np.testing.assert_array_equal(np.asarray(tok.eligible), np.asarray(seq.eligible))
    np.testing.assert_array_equal(elig, np.asarray(seq.token_scores.eligible))
    ok = np.asarray(tok.eligible)
    np.testing.assert_allclose(np.asarray(tok.difficulty)[ok], np.asarray(seq.difficulty)[ok], atol=2e-5, rtol=1e-5)
    assert int(tok.k) == int(seq.k)
    diff = np.asarray(tok.mask) != np.asarray(seq.mask)
    if diff.any():   # only within the band of the cut-off
        d = np.asarray(tok.difficulty)
        cut = np.sort(d[ok])[::-1][int(tok.k) - 1]
        assert np.all(np.abs(d[diff] - cut) <= 2 * oracle.SCORE_PARITY_ATOL)


@pytest.mark.parametrize("form", FORMS)
def test_fused_router_path_selects_like_the_logits_path(form):
    cfg = DecoderConfig(vocab_size=29, d_model=16, num_layers=3, num_heads=2, max_seq_len=9, mlp_ratio=2)
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    ids = jax.random.randint(jax.random.key(7), (9, 9), 0, 29, dtype=jnp.int32)
    labels = ids.at[1, 1:].set(IGNORE).at[3, 4].set(IGNORE)
    mask = jnp.ones_like(ids).at[2, 6:].set(0).at[4, :].set(0).at[5, :2].set(0)
    ref = _reference(3, labels, mask, form)
    config = jsc.BatchSplitConfig(router_layers=2, scoring="excess", warmup_steps=0, min_tokens_ratio=0.4)
    logits = model.router_logits(ids, 2, mask)
    weight, layout = head_weight(model)
    a = jsc.select_sequences(logits, labels, mask, step=0, config=config, vocab_size=29, reference_nll=ref)
    b = jsc.select_sequences_fused(model.hidden_states(ids, mask, 2), weight, labels, mask, step=0, config=config,
                                  vocab_size=29, weight_layout=layout, reference_nll=ref)
    o = oracle.select_sequences_excess(np.asarray(logits, np.float64), np.asarray(labels), np.float32(b.ratio), ref,
                                       attention_mask=np.asarray(mask))
    _check(b, o, np.float32(b.ratio))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_allclose(np.asarray(a.difficulty), np.asarray(b.difficulty), atol=6e-4, rtol=2e-5)


# ------------------------------------------------------------------------------------------ training step
V, T, B = 23, 7, 9   # odd batch and length
LR = 0.5


def _model(seed: int = 0) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, max_seq_len=T, mlp_ratio=2)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def _step_batch(i: int):
    ids = jax.random.randint(jax.random.key(200 + i), (B, T), 0, V, dtype=jnp.int32)
    labels = ids.at[2, 1:].set(IGNORE)                                   # never eligible
    mask = jnp.ones((B, T), jnp.int32).at[5, 5:].set(0).at[6, :2].set(0)  # right and left padding
    return ids, labels, mask


@pytest.fixture(scope="module")
def excess_run():
    model = _model(1)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    cfg = bs.BatchSplitConfig(router_layers=1, scoring="excess", warmup_steps=4, min_tokens_ratio=0.25)
    step = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), buckets=(3, 6),
                                          donate=False, compiler_options=FAST)
    state = step.init(model)
    states, metrics, refs = [state], [], []
    for i in range(6):
        ids, labels, mask = _step_batch(i)
        form = "sequence" if i < 3 else "token"
        ref = _reference(10 + i, labels, mask, form)
        if i == 4:
            ref = ref.astype(np.float64)    # a NumPy float64 reference: rounded on the host, the same trace
        state, m = step(state, ids, labels, mask, reference_nll=ref)
        states.append(state)
        metrics.append(jax.device_get(m))
        refs.append(ref)
    return {"model": model, "graphdef": graphdef, "cfg": cfg, "step": step, "states": states, "metrics": metrics,
            "refs": refs}


def test_step_keeps_the_selected_sequences_and_trains_on_exactly_them(excess_run):
    run = excess_run
    graphdef, cfg = run["graphdef"], run["cfg"]
    # one trace per reference form (per-sequence, per-token); float64 NumPy input did not add one
    assert run["step"].num_traces == 2
    grad_fn = jax.jit(jax.value_and_grad(_plain_loss, argnums=1), static_argnums=0)
    router_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(graphdef, p, r).router_logits(ids, 1, mask))
    for i, m in enumerate(run["metrics"]):
        before, ref = run["states"][i], run["refs"][i]
        ids, labels, mask = _step_batch(i)
        logits = router_fn(before.params, before.rest, ids, mask)
        sel = jsc.select_sequences(logits, labels, mask, step=i, config=cfg, reference_nll=ref)
        kept = np.flatnonzero(np.asarray(sel.mask))
        k = int(m["sequences_selected"])
        assert len(kept) == k == int(sel.k) and 2 not in kept
        assert int(m["sequences_total"]) == int(np.asarray(sel.eligible).sum())
        if ref.ndim == 1:
            assert not np.asarray(sel.eligible)[[6, 7]].any()
        o = oracle.select_sequences_excess(np.asarray(logits, np.float64), np.asarray(labels), np.float32(sel.ratio),
                                           ref, attention_mask=np.asarray(mask))
        _check(sel, o, np.float32(sel.ratio))
        assert int(m["tokens_nonfinite"]) == int(o["scores"]["nonfinite"].sum())
        assert int(m["tokens_total"]) == int(o["scores"]["eligible"].sum())
        # the step's loss and SGD update are those of the plain loss on exactly the kept sequences
        rows = np.concatenate([kept, np.full(int(m["bucket_size"]) - k, kept[0])])
        sub_mask = np.asarray(mask)[rows].copy()
        sub_mask[k:] = 0
        loss, grads = grad_fn(graphdef, before.params, before.rest, ids[rows], labels[rows], jnp.asarray(sub_mask))
        np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5, atol=1e-6)
        expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, before.params, grads)
        for a, b in zip(jax.tree_util.tree_leaves(run["states"][i + 1].params), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_step_all_ignored_or_all_nonfinite_reference_gives_zero_loss_and_zero_gradient(excess_run):
    step, state = excess_run["step"], excess_run["states"][-1]
    ids, labels, mask = _step_batch(0)
    traces = step.num_traces
    cases = ((jnp.full_like(ids, IGNORE), np.ones(B, np.float32)),              # every label ignored
             (labels, np.full(B, np.nan, np.float32)),                          # every reference non-finite
             (labels, np.full((B, T), np.inf, np.float32)))
    for lab, ref in cases:
        new, m = step(state, ids, lab, mask, reference_nll=ref)
        assert int(m["sequences_selected"]) == 0 and int(m["sequences_total"]) == 0 and float(m["loss"]) == 0.0
        assert int(m["tokens_total"]) == 0
        assert int(m["tokens_nonfinite"]) == (0 if lab is not labels else
                                               int(((np.asarray(labels)[:, 1:] != IGNORE)
                                                    & (np.asarray(mask)[:, 1:] != 0)).sum()))
        for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert step.num_traces == traces   # same shapes and forms: no recompilation


def test_bad_reference_raises_before_tracing(excess_run):
    step, state = excess_run["step"], excess_run["states"][0]
    ids, labels, mask = _step_batch(0)
    traces = step.num_traces
    cases = [
        (None, "reference_nll: scoring='excess' needs the reference model's loss"),
        (np.zeros((B, T - 1), np.float32), r"reference_nll: expected shape \(B, T\) = \(9, 7\) .* \(B,\) = \(9,\)"),
        (np.zeros((T,), np.float32), "reference_nll: expected shape"),
        (np.zeros((B, T, 1), np.float32), "reference_nll: expected shape"),
        (np.zeros((B,), np.int32), "reference_nll: expected a floating dtype"),
        (jnp.zeros((B, T), jnp.bool_), "reference_nll: expected a floating dtype"),
        ([0.0] * B, "reference_nll: expected a floating array"),
    ]
    for ref, match in cases:
        with pytest.raises(ValueError, match=match):
            step(state, ids, labels, mask, reference_nll=ref)
        with pytest.raises(ValueError, match=match):
            jsc.select_sequences(jnp.zeros((B, T, V)), labels, mask, ratio=0.5, config=excess_run["cfg"],
                                reference_nll=ref)
    assert step.num_traces == traces
    # a reference given with another scoring would be silently unused: refused, in the step and the selection
    plain = bs.make_batch_split_train_step(excess_run["graphdef"], bs.BatchSplitConfig(router_layers=1),
                                           _curriculum_tx(optax.sgd(LR)), donate=False)
    with pytest.raises(ValueError, match="reference_nll: only scoring='excess' reads a reference loss; got one "
                                         "with scoring='combined'"):
        plain(plain.init(excess_run["model"]), ids, labels, mask, reference_nll=np.zeros(B, np.float32))
    assert plain.num_traces == 0
    with pytest.raises(ValueError, match="reference_nll: only scoring='excess'"):
        jsc.select_sequences(jnp.zeros((B, T, V)), labels, mask, ratio=0.5, reference_nll=np.zeros(B, np.float32))
    with pytest.raises(ValueError, match="reference_nll: only scoring='excess'"):
        jsc.score_sequences(jnp.zeros((B, T, V)), labels, mask, reference_nll=np.zeros(B, np.float32))
    # traced: the shape rule is static, so it raises under jit as well
    with pytest.raises(ValueError, match="reference_nll: expected shape"):
        jax.jit(lambda r, q: jsc.select_sequences(jnp.zeros((B, T, V)), labels, mask, ratio=q,
                                                 config=excess_run["cfg"], reference_nll=r).mask)(
            jnp.zeros((B, 2)), jnp.float32(0.5))


def test_modes_without_a_router_check_but_do_not_read_the_reference(excess_run):
    for mode in ("standard", "random_sequence"):
        step = bs.make_batch_split_train_step(excess_run["graphdef"], excess_run["cfg"],
                                              _curriculum_tx(optax.sgd(LR)), mode=mode, buckets=(3,), donate=False,
                                              compiler_options=FAST)
        state = step.init(excess_run["model"])
        ids, labels, mask = _step_batch(1)
        _, m1 = step(state, ids, labels, mask, reference_nll=np.zeros(B, np.float32))
        _, m2 = step(state, ids, labels, mask, reference_nll=np.full(B, 50.0, np.float32))
        assert float(m1["loss"]) == float(m2["loss"]) and step.num_traces == 1
        with pytest.raises(ValueError, match="reference_nll: scoring='excess' needs"):
            step(state, ids, labels, mask)
