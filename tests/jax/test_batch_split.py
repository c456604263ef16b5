"""Tests of ``cggr_jax.batch_split``: SPEC §9 sequence selection and the jitted batch-split training step.

Selection is compared with a NumPy float64 implementation of SPEC §9 written here (token scores from
``tests.oracle``); the *selection* is compared exactly by feeding the package's own float32 sequence
difficulties to ``oracle.select_tokens``, the scores within SPEC §11 tolerances. The training step is
compared with an independent computation: the loss and gradient of the model on exactly the kept sequences
(no bucket padding), and an SGD update.
"""
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
from cggr_jax.router import resolve_router_path  # noqa: E402
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402
from tests import oracle  # noqa: E402

IGNORE = -100


# ----------------------------------------------------------------------------- NumPy float64 reference (§9)
def reference_sequences(logits, labels, attention_mask, step, *, scoring="combined", dynamic=True,
                        sensitivity=0.5, min_ratio=0.25, warmup=1000):
    """SPEC §9 in float64 on top of the oracle's token scores."""
    logits = np.asarray(logits, np.float64)
    tgt = np.array(labels)[:, 1:].copy()
    if attention_mask is not None:
        tgt[np.asarray(attention_mask)[:, 1:] == 0] = IGNORE
    sc = oracle.score_tokens(logits[:, :-1], tgt, scoring, IGNORE)
    e, d = sc["eligible"], sc["difficulty"]
    seq_ok = e.any(axis=1)
    seq_d = np.array([d[b][e[b]].mean() if seq_ok[b] else 0.0 for b in range(e.shape[0])])
    n_tok = int(e.sum())
    cbar = float(sc["stats"]["confidence"][e].mean()) if n_tok else 0.0
    base = oracle.linear_warmup_ratio(min_ratio, warmup)(step)
    ratio = oracle.dynamic_ratio(base, cbar, sensitivity) if dynamic else base
    return {"scores": sc, "seq_d": seq_d, "seq_ok": seq_ok, "base": base, "ratio": ratio, "cbar": cbar}


def _batch(seed: int, B: int = 9, T: int = 7, V: int = 13, dtype=jnp.float32):
    """Random router logits with the hard cases: NaN / +inf / all -inf rows, -inf entries, ignored labels,
    padding (right and left), an all-ignored sequence, an all-padding sequence and two identical sequences."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(B, T, V)) * rng.uniform(0.5, 4.0, size=(B, 1, 1))).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    z[0, 2, 3] = np.nan
    z[1, 1, :] = -np.inf
    z[2, 3, 5] = np.inf
    z[3, :, 0] = -np.inf
    labels[3, :] = np.where(labels[3, :] == 0, 1, labels[3, :])  # targets never the -inf entry
    labels[4, 1:] = IGNORE                                          # all-ignored sequence
    mask[5, :] = 0                                                  # all-padding sequence
    mask[6, T - 3:] = 0                                             # right padding
    mask[7, :2] = 0                                                 # left padding
    labels[6, 2] = IGNORE
    z[8], labels[8], mask[8] = z[0], labels[0], mask[0]             # a tie with sequence 0
    z[8, 2, 3] = z[0, 2, 3]
    zj = jnp.asarray(z).astype(dtype)
    z_exact = np.asarray(zj.astype(jnp.float32))                    # what the oracle must see
    return zj, z_exact, jnp.asarray(labels), jnp.asarray(mask)


def _check_against_reference(sel, ref, B):
    sc = ref["scores"]
    ts = sel.token_scores
    np.testing.assert_array_equal(np.asarray(ts.eligible), sc["eligible"])
    el = sc["eligible"]
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(np.asarray(ts.difficulty)[el], sc["difficulty"][el], atol=atol, rtol=rtol)
    np.testing.assert_array_equal(np.asarray(sel.eligible), ref["seq_ok"])
    np.testing.assert_allclose(np.asarray(sel.difficulty), ref["seq_d"], atol=atol, rtol=rtol)
    assert np.asarray(sel.difficulty).dtype == np.float32
    # The ratio differs from the float64 reference only by float32 reduction order (a few ulp).
    ratio = np.float32(sel.ratio)
    assert abs(float(ratio) - float(ref["ratio"])) <= 8 * np.spacing(np.float32(ref["ratio"]))
    n_seq = int(ref["seq_ok"].sum())
    assert int(sel.k) == oracle.num_selected(n_seq, ratio)
    # Selection given identical scores and ratio is exact.
    mask_ref, k_ref = oracle.select_tokens(np.asarray(sel.difficulty), np.asarray(sel.eligible), ratio, "topk")
    np.testing.assert_array_equal(np.asarray(sel.mask), mask_ref)
    assert int(sel.k) == k_ref == int(np.asarray(sel.mask).sum())
    np.testing.assert_array_equal(np.asarray(sel.rank), oracle.rank_tokens(np.asarray(sel.difficulty),
                                                                            np.asarray(sel.eligible)))
    # And independently: the k hardest eligible sequences, ties by lower batch index.
    order = sorted((b for b in range(B) if ref["seq_ok"][b]), key=lambda b: (-float(np.asarray(sel.difficulty)[b]), b))
    assert set(order[: int(sel.k)]) == set(np.flatnonzero(np.asarray(sel.mask)))


# ------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("seed,step,scoring", [(0, 0, "combined"), (1, 400, "combined"), (2, 1000, "entropy"),
                                               (3, 700, "margin"), (4, 250, "loss")])
def test_select_sequences_matches_reference(dtype, seed, step, scoring):
    zj, z, labels, mask = _batch(seed, dtype=dtype)
    cfg = bs.BatchSplitConfig(scoring=scoring)
    sel = jsc.select_sequences(zj, labels, mask, step=step, config=cfg)
    ref = reference_sequences(z, np.asarray(labels), np.asarray(mask), step, scoring=scoring)
    assert not ref["seq_ok"][4] and not ref["seq_ok"][5]  # all-ignored / all-padding are never eligible
    _check_against_reference(sel, ref, zj.shape[0])
    assert not bool(sel.mask[4]) and not bool(sel.mask[5])


def test_ties_keep_lower_batch_index_and_jit_matches_eager():
    zj, z, labels, mask = _batch(5)
    cfg = bs.BatchSplitConfig(warmup_steps=0, min_tokens_ratio=0.25, dynamic_threshold=False)
    eager = jsc.select_sequences(zj, labels, mask, step=3, config=cfg)
    assert float(eager.difficulty[0]) == float(eager.difficulty[8])  # identical sequences
    # Choose the ratio so that the cut falls between the two tied sequences.
    r0 = int(eager.rank[0])
    n = int(eager.eligible.sum())
    sel = jsc.select_sequences(zj, labels, mask, ratio=np.float32((r0 + 1) / n), config=cfg)
    assert int(sel.k) == r0 + 1 and bool(sel.mask[0]) and not bool(sel.mask[8])
    jitted = jax.jit(lambda z, y, m, s: jsc.select_sequences(z, y, m, step=s, config=cfg))
    traced = jitted(zj, labels, mask, jnp.int32(3))
    exact = jax.default_backend() == "cpu"
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(traced)):
        a, b = np.asarray(a), np.asarray(b)
        if exact or not np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(a, b)
        else:  # a GPU fuses the jitted reductions in another order (SPEC §9: the summation order is free)
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)


def test_dynamic_threshold_and_fixed_quota():
    zj, z, labels, mask = _batch(6)
    base = oracle.linear_warmup_ratio(0.25, 1000)(600)
    dyn = jsc.select_sequences(zj, labels, mask, step=600, config=bs.BatchSplitConfig())
    fixed = jsc.select_sequences(zj, labels, mask, step=600, config=bs.BatchSplitConfig(selection="fixed_quota"))
    off = jsc.select_sequences(zj, labels, mask, step=600, config=bs.BatchSplitConfig(dynamic_threshold=False))
    assert np.float32(fixed.ratio) == np.float32(off.ratio) == base
    assert np.float32(dyn.ratio) > base  # mean confidence < 1 raises the ratio (SPEC §5.2)
    sched = bs.BatchSplitConfig(ratio_schedule=lambda s: jnp.float32(0.5), dynamic_threshold=False)
    assert np.float32(jsc.select_sequences(zj, labels, mask, step=1, config=sched).ratio) == np.float32(0.5)


def test_score_sequences_info_matches_oracle_metrics():
    zj, z, labels, mask = _batch(7)
    d, m, info = jsc.score_sequences(zj, labels, mask, 500, bs.BatchSplitConfig())
    ref = reference_sequences(z, np.asarray(labels), np.asarray(mask), 500)
    el = ref["scores"]["eligible"]
    assert int(info["tokens_total"]) == int(el.sum())
    nonfinite = ref["scores"]["valid"] & ~ref["scores"]["stats"]["row_finite"]
    assert int(info["tokens_nonfinite"]) == int(nonfinite.sum()) > 0
    np.testing.assert_allclose(float(info["avg_confidence"]), ref["cbar"], atol=1e-5)
    np.testing.assert_allclose(float(info["avg_entropy"]), ref["scores"]["stats"]["entropy"][el].mean(), atol=1e-4)
    np.testing.assert_allclose(float(info["avg_difficulty"]), ref["scores"]["difficulty"][el].mean(), atol=3e-4)
    assert int(info["n"]) == int(ref["seq_ok"].sum()) and int(info["k"]) == int(np.asarray(m).sum())
    assert float(info["token_ratio"]) == float(ref["base"])


def test_all_ignored_batch_selects_nothing():
    zj, _, labels, mask = _batch(8)
    sel = jsc.select_sequences(zj, jnp.full_like(labels, IGNORE), mask, step=0)
    assert int(sel.k) == 0 and not bool(sel.mask.any()) and float(sel.ratio) == 1.0
    sel = jsc.select_sequences(zj, labels, jnp.zeros_like(mask), step=0)
    assert int(sel.k) == 0 and not bool(sel.mask.any())


def test_selection_bad_inputs():
    zj, _, labels, mask = _batch(9)
    with pytest.raises(ValueError, match="labels"):
        jsc.select_sequences(zj, labels[:, 1:], step=0)
    with pytest.raises(ValueError, match="attention_mask"):
        jsc.select_sequences(zj, labels, mask[:3], step=0)
    with pytest.raises(ValueError, match="router_logits"):
        jsc.select_sequences(zj[0], labels, step=0)  # (T, V): not a batch
    with pytest.raises(ValueError, match="vocab"):
        jsc.select_sequences(zj, labels, step=0, vocab_size=zj.shape[-1] + 1)  # router vocab != model vocab
    with pytest.raises(ValueError, match="labels"):
        jsc.select_sequences(zj, labels.at[1, 3].set(zj.shape[-1]), step=0)  # concrete out-of-range target
    with pytest.raises(ValueError, match="exactly one"):
        jsc.select_sequences(zj, labels, step=0, ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        jsc.select_sequences(zj, labels, ratio=1.5)
    with pytest.raises(ValueError, match="selection"):
        bs.BatchSplitConfig(selection="stratified")
    with pytest.raises(ValueError, match="selection"):
        bs.BatchSplitConfig(selection="sequence_aware")
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        bs.BatchSplitConfig(min_tokens_ratio=0.0)
    with pytest.raises(ValueError, match="router_layers"):
        bs.BatchSplitConfig(router_layers=-1)


def test_out_of_range_labels_under_jit_are_counted_not_used():
    zj, _, labels, mask = _batch(10)
    bad = labels.at[0, 5].set(999).at[6, 1].set(-5)  # two otherwise eligible targets
    f = jax.jit(lambda z, y, m: jsc.score_sequences(z, y, m, 0, bs.BatchSplitConfig()))
    _, _, info = f(zj, bad, mask)
    assert int(info["tokens_out_of_range"]) == 2
    _, _, info_ok = f(zj, labels, mask)
    assert int(info["tokens_total"]) == int(info_ok["tokens_total"]) - 2


# ------------------------------------------------------------------------------------------ training step
V, T, B = 23, 8, 8
FAST = {"xla_backend_optimization_level": 0}  # CPU compile time only; numerics are unchanged
BUCKETS = (2, 4, 6)
LR = 0.5


def _model(seed: int = 0) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, max_seq_len=T, mlp_ratio=2)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def _tokens(seed: int, batch: int = B) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, V, dtype=jnp.int32)


def _curriculum_tx(inner):
    from cggr_jax.integrations import advance_curriculum

    return optax.chain(advance_curriculum(), inner)


def _plain_loss(graphdef, params, rest, ids, labels, mask):
    """Mean next-token cross-entropy over the valid shifted targets, written independently (log_softmax)."""
    logits = nnx.merge(graphdef, params, rest)(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tgt = labels[:, 1:]
    valid = (tgt != IGNORE) & (mask[:, 1:] != 0)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def _batch_at(i: int):
    ids = _tokens(100 + i)
    labels = ids.at[2, 1:].set(IGNORE)                     # never eligible
    mask = jnp.ones((B, T), jnp.int32).at[5, 5:].set(0)    # right padding
    return ids, labels, mask


@pytest.fixture(scope="module")
def curriculum_run():
    """Nine SGD steps of the CGGR step through a 6-step warm-up (ratio 1 → 0.125): one compiled step."""
    model = _model(1)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=6, min_tokens_ratio=0.125)
    step = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), buckets=BUCKETS,
                                          donate=False, compiler_options=FAST)
    state = step.init(model)
    states, metrics = [state], []
    for i in range(9):
        state, m = step(state, *_batch_at(i))
        states.append(state)
        metrics.append(jax.device_get(m))
    return {"model": model, "graphdef": graphdef, "cfg": cfg, "step": step, "states": states, "metrics": metrics}


def test_compilations_bounded_over_the_curriculum(curriculum_run):
    """k_seq moves through many values during warm-up; the step compiles once (one lax.switch branch per
    bucket) and the bucket used is always the smallest one >= k_seq."""
    ms = curriculum_run["metrics"]
    ks = [int(m["sequences_selected"]) for m in ms]
    assert len(set(ks)) >= 4, ks  # the run exercises several k_seq values ...
    assert curriculum_run["step"].num_traces == 1  # ... with a single compilation
    for i, m in enumerate(ms):
        k = int(m["sequences_selected"])
        assert int(m["bucket_size"]) == min(b for b in BUCKETS + (B,) if b >= k)
        assert int(m["step"]) == i and int(m["sequences_total"]) == B - 1
        assert np.isfinite(float(m["loss"]))
        assert set(m) == set(bs.SEQUENCE_METRIC_KEYS)
    assert ks[0] == B - 1  # step 0: ratio 1 keeps every eligible sequence
    from cggr_jax.integrations import current_step
    assert int(current_step(curriculum_run["states"][-1].opt_state)) == len(ms)


def test_step_equals_sgd_on_exactly_the_kept_sequences(curriculum_run):
    """At steps whose bucket is larger than k_seq: the loss is the exact mean over the kept sequences and the
    SGD update equals the one computed on the kept sequences alone (bucket padding rows have weight 0)."""
    run = curriculum_run
    graphdef, cfg = run["graphdef"], run["cfg"]
    grad_fn = jax.jit(jax.value_and_grad(_plain_loss, argnums=1), static_argnums=0)
    router_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(graphdef, p, r).router_logits(ids, 1, mask))
    checked = 0
    for i, m in enumerate(run["metrics"]):
        k = int(m["sequences_selected"])
        if not 0 < k < int(m["bucket_size"]) or checked == 2:
            continue
        before = run["states"][i]
        ids, labels, mask = _batch_at(i)
        sel = jsc.select_sequences(router_fn(before.params, before.rest, ids, mask), labels, mask, step=i, config=cfg)
        kept = np.flatnonzero(np.asarray(sel.mask))
        assert len(kept) == k and 2 not in kept
        # Pad to the bucket with copies of kept row 0 (a fixed shape for the jitted reference) and drop them
        # from the loss through the mask: the reference never sees the step's own padding rows.
        rows = np.concatenate([kept, np.full(int(m["bucket_size"]) - k, kept[0])])
        sub_mask = np.asarray(mask)[rows].copy()
        sub_mask[k:] = 0
        loss, grads = grad_fn(graphdef, before.params, before.rest, ids[rows], labels[rows], jnp.asarray(sub_mask))
        np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5, atol=1e-6)
        valid = (np.asarray(labels)[kept, 1:] != IGNORE) & (np.asarray(mask)[kept, 1:] != 0)
        assert int(m["tokens_selected"]) == int(valid.sum())
        expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, before.params, grads)
        for a, b in zip(jax.tree_util.tree_leaves(run["states"][i + 1].params), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2


def test_all_padding_batch_gives_zero_loss_and_zero_gradient(curriculum_run):
    step, state = curriculum_run["step"], curriculum_run["states"][-1]
    ids, labels, _ = _batch_at(0)
    cases = ((labels, jnp.zeros((B, T), jnp.int32)), (jnp.full_like(ids, IGNORE), jnp.ones((B, T), jnp.int32)))
    for lab, mask in cases:
        new, m = step(state, ids, lab, mask)
        assert int(m["sequences_selected"]) == 0 and int(m["sequences_total"]) == 0
        assert int(m["bucket_size"]) == 0 and float(m["loss"]) == 0.0 and int(m["tokens_selected"]) == 0
        for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # SGD on an exactly zero gradient
    assert step.num_traces == 1  # same shapes: no recompilation


def test_random_sequence_router_keeps_cggr_count_with_a_random_choice(curriculum_run):
    graphdef, model = curriculum_run["graphdef"], curriculum_run["model"]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=0, min_tokens_ratio=0.375)  # dynamic threshold on
    rnd = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(0.0)),
                                         mode="random_sequence_router", buckets=(4,), donate=False,
                                         compiler_options=FAST)
    state = rnd.init(model)
    router_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(graphdef, p, r).router_logits(ids, 1, mask))
    diffs = []
    for i in range(4):
        ids, labels, mask = _batch_at(i)
        state, m = rnd(state, ids, labels, mask)
        sel = jsc.select_sequences(router_fn(state.params, state.rest, ids, mask), labels, mask, step=i, config=cfg)
        assert int(m["sequences_selected"]) == int(sel.k) and float(m["effective_ratio"]) == float(sel.ratio)
        top = float(jnp.mean(sel.difficulty[sel.mask]))
        diffs.append(top - float(m["avg_sequence_difficulty_selected"]))
    assert all(d >= -1e-5 for d in diffs)  # top-k maximises the mean kept difficulty ...
    assert any(d > 1e-4 for d in diffs)    # ... and the random choice differs at least once
    assert rnd.num_traces == 1


def test_random_sequence_without_router_keeps_the_curriculum_count(curriculum_run):
    graphdef, model = curriculum_run["graphdef"], curriculum_run["model"]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=0, min_tokens_ratio=0.375, dynamic_threshold=False)
    rnd = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), mode="random_sequence",
                                         buckets=(3,), donate=False, compiler_options=FAST)
    state = rnd.init(model)
    ids, labels, mask = _batch_at(0)
    labels = labels.at[4, 3].set(V + 5)  # out of range
    with pytest.raises(ValueError, match=rf"labels: values must lie in \[0, {V}\).*{V + 5}"):
        rnd(state, ids, labels, mask)    # concrete: raises, as every entry point (SPEC §11)
    # traced (inside the caller's jit): ignored by the loss, the sequence stays eligible
    inner = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), mode="random_sequence",
                                           buckets=(3,), donate=False)
    inner.init(model)
    new, m = jax.jit(lambda *a: inner(*a), compiler_options=FAST)(state, ids, labels, mask)
    assert int(m["sequences_total"]) == B - 1 and int(m["sequences_selected"]) == oracle.num_selected(B - 1, 0.375) == 3
    assert int(m["bucket_size"]) == 3 and np.isfinite(float(m["loss"])) and float(m["loss"]) > 0
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params))]
    assert max(moved) > 0


def test_batch_of_one_equals_standard_step():
    model = _model(3)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=0)
    ids = _tokens(7, 1)
    out = {}
    for mode in ("cggr", "standard"):
        st = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(0.1)), mode=mode,
                                            compiler_options=FAST)
        out[mode] = st(st.init(model), ids, ids)
    (s_c, m_c), (s_s, m_s) = out["cggr"], out["standard"]
    assert int(m_c["sequences_selected"]) == 1 and int(m_c["bucket_size"]) == 1
    assert int(m_s["tokens_selected"]) == int(m_c["tokens_selected"]) == T - 1
    np.testing.assert_allclose(float(m_c["loss"]), float(m_s["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s_c.params), jax.tree_util.tree_leaves(s_s.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # The model passed to init() stays usable although the step donates its state.
    assert np.isfinite(np.asarray(model(ids))).all()


def test_train_step_bad_inputs(curriculum_run):
    model, graphdef, st = curriculum_run["model"], curriculum_run["graphdef"], curriculum_run["step"]
    state = curriculum_run["states"][0]
    ids = _tokens(11)
    with pytest.raises(ValueError, match="labels"):
        st(state, ids, ids[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        st(state, ids[0], ids[0])  # 1-D
    with pytest.raises(ValueError, match="integer"):
        st(state, ids.astype(jnp.float32), ids)
    with pytest.raises(ValueError, match="seq_len"):
        st(state, ids[:, :1], ids[:, :1])
    with pytest.raises(ValueError, match="attention_mask"):
        st(state, ids, ids, jnp.ones((B, T - 1), jnp.int32))
    cfg = bs.BatchSplitConfig(router_layers=1)
    with pytest.raises(ValueError, match="buckets"):
        bs.make_batch_split_train_step(graphdef, cfg, optax.sgd(0.1), buckets=(0, 2))
    with pytest.raises(ValueError, match="mode"):
        bs.make_batch_split_train_step(graphdef, cfg, optax.sgd(0.1), mode="bogus")
    with pytest.raises(ValueError):  # no advance_curriculum() in the chain: the step cannot be read
        bs.make_batch_split_train_step(graphdef, cfg, optax.sgd(0.1)).init(model)
    big = bs.make_batch_split_train_step(graphdef, bs.BatchSplitConfig(router_layers=3),
                                         _curriculum_tx(optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"router_layers: expected an integer in \[0, 2\]"):
        big.init(model)  # a router deeper than the model: the error names the caller's argument


def test_default_buckets():
    assert bs.default_buckets(1) == (1,)
    assert bs.default_buckets(8) == (1, 2, 3, 4, 6, 8)
    assert bs.default_buckets(64) == (8, 16, 24, 32, 48, 64)
    st = bs.make_batch_split_train_step(None, bs.BatchSplitConfig(), optax.sgd(0.1), buckets=(3, 5))
    assert st.bucket_sizes(8) == (3, 5, 8)


def test_latest_metrics_reach_the_curriculum_state(curriculum_run):
    from cggr_jax.integrations import latest_metrics

    last = latest_metrics(curriculum_run["states"][-1].opt_state)
    m = curriculum_run["metrics"][-1]
    for key in ("step", "tokens_selected", "tokens_total", "effective_ratio", "avg_confidence"):
        np.testing.assert_array_equal(np.asarray(last[key]), np.asarray(m[key]))


# ------------------------------------------------------------------------------ fused router path (no logits)
@pytest.mark.parametrize("tie,dtype", [(False, jnp.float32), (True, jnp.bfloat16)])
def test_fused_router_selects_like_the_logits_path_and_the_oracle(tie, dtype):
    cfg = DecoderConfig(vocab_size=29, d_model=16, num_layers=3, num_heads=2, max_seq_len=9, mlp_ratio=2,
                        tie_embeddings=tie, dtype=dtype)
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    ids = jax.random.randint(jax.random.key(7), (7, 9), 0, 29, dtype=jnp.int32)
    labels = ids.at[1, 1:].set(IGNORE).at[3, 4].set(IGNORE)   # an all-ignored sequence, one ignored target
    mask = jnp.ones_like(ids).at[2, 6:].set(0).at[4, :].set(0)  # right padding, an all-padding sequence
    config = bs.BatchSplitConfig(router_layers=2, warmup_steps=0, min_tokens_ratio=0.4)
    logits = model.router_logits(ids, 2, mask)
    hidden = model.hidden_states(ids, mask, 2)
    weight, layout = head_weight(model)
    a = jsc.select_sequences(logits, labels, mask, step=0, config=config, vocab_size=29)
    b = jsc.select_sequences_fused(hidden, weight, labels, mask, step=0, config=config, vocab_size=29,
                                  weight_layout=layout)
    # scores within SPEC §11 of the float64 oracle on the router's own logits, eligibility identical
    ref = reference_sequences(logits, labels, mask, 0, min_ratio=0.4, warmup=0)
    e = ref["scores"]["eligible"]
    np.testing.assert_array_equal(np.asarray(b.token_scores.eligible), e)
    atol, rtol = oracle.SCORE_TOL["difficulty"]
    np.testing.assert_allclose(np.asarray(b.token_scores.difficulty)[e], ref["scores"]["difficulty"][e],
                               atol=atol, rtol=rtol)
    np.testing.assert_allclose(np.asarray(b.difficulty), np.asarray(a.difficulty), atol=2 * atol, rtol=2 * rtol)
    assert not bool(b.eligible[1]) and not bool(b.eligible[4])
    # identical selection (the sequence difficulties are far apart compared with the matmul rounding)
    np.testing.assert_array_equal(np.asarray(b.mask), np.asarray(a.mask))
    assert int(a.k) == int(b.k) and float(a.ratio) == float(b.ratio)
    # given identical difficulties the selection code is the same: exact
    mask_ref, k_ref = oracle.select_tokens(np.asarray(b.difficulty, np.float64), np.asarray(b.eligible),
                                           np.float32(b.ratio), "topk")
    np.testing.assert_array_equal(np.asarray(b.mask), mask_ref)
    assert int(b.k) == k_ref


def test_fused_and_logits_train_steps_agree_and_report_their_path():
    model = _model(4)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    ids, labels, mask = _batch_at(3)
    out = {}
    for path in ("auto", "logits"):
        cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=0, min_tokens_ratio=0.5, router_path=path)
        step = bs.make_batch_split_train_step(graphdef, cfg, _curriculum_tx(optax.sgd(LR)), buckets=(B // 2,),
                                              donate=False, compiler_options=FAST)
        state = step.init(model)
        state, m = step(state, ids, labels, mask)
        out[path] = (step.router_path, jax.device_get(m), state)
    assert out["auto"][0] == "fused" and out["logits"][0] == "logits"
    ma, ml = out["auto"][1], out["logits"][1]
    assert int(ma["sequences_selected"]) == int(ml["sequences_selected"])
    assert int(ma["tokens_total"]) == int(ml["tokens_total"])
    np.testing.assert_allclose(float(ma["loss"]), float(ml["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["avg_difficulty"]), float(ml["avg_difficulty"]), atol=6e-4, rtol=2e-5)
    for x, y in zip(jax.tree_util.tree_leaves(out["auto"][2].params), jax.tree_util.tree_leaves(out["logits"][2].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_router_path_validation_and_explicit_fallback():
    with pytest.raises(ValueError, match="router_path"):
        bs.BatchSplitConfig(router_path="nope")
    with pytest.raises(ValueError, match="router_memory_budget_bytes"):
        bs.BatchSplitConfig(router_memory_budget_bytes=0)

    class OtherLM(nnx.Module):  # only router_logits: not a DecoderLM
        pass

    assert resolve_router_path(_model(), "auto")[0] == "fused"
    path, reason = resolve_router_path(OtherLM(), "auto")
    assert path == "logits" and "DecoderLM" in reason
    with pytest.raises(ValueError, match="router_path"):
        resolve_router_path(OtherLM(), "fused")
    assert resolve_router_path(_model(), "logits")[0] == "logits"
    hidden = jnp.zeros((2, 5, 16))
    with pytest.raises(ValueError, match="hidden"):
        jsc.select_sequences_fused(hidden[0], jnp.zeros((V, 16)), jnp.zeros((2, 5), jnp.int32), step=0)
    with pytest.raises(ValueError, match="vocab"):
        jsc.select_sequences_fused(hidden, jnp.zeros((V, 16)), jnp.zeros((2, 5), jnp.int32), step=0,
                                  vocab_size=V + 1)
    with pytest.raises(ValueError, match="labels"):
        jsc.select_sequences_fused(hidden, jnp.zeros((V, 16)), jnp.full((2, 5), V, jnp.int32), step=0)
