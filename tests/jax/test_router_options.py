"""JAX: the cheaper router of SPEC §9.3 (``BatchSplitConfig(router_prefix=, router_positions=, router_samples=)``)
in ``select_sequences``, ``select_sequences_fused`` and the batch-split step.

Compared with ``tests.oracle.select_sequences_at`` on the full router's logits and the positions of
``tests.oracle.router_scored_positions`` (written from SPEC §9.3 independently of ``cggr.config``): scores
within SPEC §11, the selection exactly given the package's own float32 sequence difficulties.
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
from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402
from tests import oracle  # noqa: E402

IGNORE = -100
FAST = {"xla_backend_optimization_level": 0}
OPTIONS = [
    {"router_positions": 3},
    {"router_positions": 40},              # stride > T
    {"router_samples": 4},
    {"router_samples": 40},                # m > T
    {"router_prefix": 5},
    {"router_prefix": 40},                 # prefix >= T
    {"router_prefix": 6, "router_positions": 2},
    {"router_prefix": 8, "router_samples": 3},
]
_ids = lambda o: ",".join(f"{k}={v}" for k, v in o.items())  # noqa: E731


def _batch(seed: int, B: int = 7, T: int = 11, V: int = 13, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    z[0, 2, 3] = np.nan             # a non-finite row
    labels[1, 1:] = IGNORE          # all ignored
    mask[2, T - 4:] = 0             # right padding
    mask[3, :6] = 0                 # left padding longer than a 5-column prefix
    labels[4, 3] = IGNORE
    zj = jnp.asarray(z).astype(dtype)
    return zj, np.asarray(zj.astype(jnp.float32)), jnp.asarray(labels), jnp.asarray(mask)


def _check(sel, want, ratio):
    np.testing.assert_array_equal(np.asarray(sel.eligible), want["sequence_eligible"])
    np.testing.assert_allclose(np.asarray(sel.difficulty), want["sequence_difficulty"], atol=2e-4, rtol=2e-5)
    mask, k = oracle.select_tokens(np.asarray(sel.difficulty, np.float64), np.asarray(sel.eligible), ratio, "topk")
    np.testing.assert_array_equal(np.asarray(sel.mask), mask)
    assert int(sel.k) == k
    info = jsc.selection_info(sel)
    assert int(info["tokens_total"]) == want["tokens_total"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_select_sequences_with_options_matches_the_oracle(options, dtype):
    z, z_exact, labels, mask = _batch(0, dtype=dtype)
    T = z.shape[1]
    cfg = bs.BatchSplitConfig(**options)
    ratio = np.float32(0.5)
    sel = jsc.select_sequences(z, labels, mask, ratio=ratio, config=cfg)
    positions = oracle.router_scored_positions(T, **options)
    want = oracle.select_sequences_at(z_exact, np.asarray(labels), ratio, positions, attention_mask=np.asarray(mask))
    _check(sel, want, ratio)
    assert not bool(sel.eligible[1])
    if options.get("router_prefix") == 5:
        assert not bool(sel.eligible[3])   # its real tokens start beyond the prefix
    # a prefix router's R columns select exactly what all T columns select
    R = cfg.positions.read_length(T)
    if R < T:
        short = jsc.select_sequences(z[:, :R], labels, mask, ratio=ratio, config=cfg)
        np.testing.assert_array_equal(np.asarray(short.difficulty), np.asarray(sel.difficulty))
    # under jit, with the curriculum step: the same selection (the positions are static)
    jitted = jax.jit(lambda zz, ll, mm: jsc.select_sequences(zz, ll, mm, step=0, config=cfg))(z, labels, mask)
    np.testing.assert_allclose(np.asarray(jitted.difficulty), np.asarray(sel.difficulty), atol=1e-6)


@pytest.mark.parametrize("form", ["token", "sequence"])
@pytest.mark.parametrize("options", [{"router_positions": 3}, {"router_samples": 4}, {"router_prefix": 6}], ids=_ids)
def test_excess_reference_with_options(options, form):
    z, z_exact, labels, mask = _batch(1)
    B, T = labels.shape
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(B, T) if form == "token" else (B,)).astype(np.float32)
    ref[5] = np.nan
    cfg = bs.BatchSplitConfig(scoring="excess", **options)
    ratio = np.float32(0.5)
    sel = jsc.select_sequences(z, labels, mask, ratio=ratio, config=cfg, reference_nll=jnp.asarray(ref))
    positions = oracle.router_scored_positions(T, **options)
    want = oracle.select_sequences_at(z_exact, np.asarray(labels), ratio, positions, scoring="excess",
                                      attention_mask=np.asarray(mask), reference_nll=ref.astype(np.float64))
    _check(sel, want, ratio)
    assert not bool(sel.eligible[5]) if form == "sequence" else True


def _model(seed: int = 0, T: int = 11, V: int = 29, layers: int = 2) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=V, d_model=16, num_layers=layers, num_heads=2, max_seq_len=T, mlp_ratio=2)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("options", [{"router_positions": 4}, {"router_samples": 3}, {"router_prefix": 5},
                                     {"router_prefix": 7, "router_positions": 2}], ids=_ids)
def test_fused_selection_with_options_matches_the_logits_path_and_the_oracle(options):
    model = _model(3)
    ids = jax.random.randint(jax.random.key(7), (7, 11), 0, 29, dtype=jnp.int32)
    labels = ids.at[1, 1:].set(IGNORE)
    # left padding: a query whose visible keys are all padding is not compared (SPEC §9.3: the attention of an
    # empty softmax is the implementation's), so the first real token lies beyond every prefix here
    mask = jnp.ones_like(ids).at[2, 6:].set(0).at[3, :8].set(0)
    cfg = bs.BatchSplitConfig(router_layers=2, warmup_steps=0, min_tokens_ratio=0.4, **options)
    R = cfg.positions.read_length(11)
    logits = model.router_logits(ids, 2, mask)                # all T columns
    hidden = model.hidden_states(ids[:, :R], mask[:, :R], 2)  # the columns the router reads
    weight, layout = head_weight(model)
    a = jsc.select_sequences(logits, labels, mask, step=0, config=cfg, vocab_size=29)
    b = jsc.select_sequences_fused(hidden, weight, labels, mask, step=0, config=cfg, vocab_size=29,
                                  weight_layout=layout)
    np.testing.assert_array_equal(np.asarray(b.mask), np.asarray(a.mask))
    np.testing.assert_allclose(np.asarray(b.difficulty), np.asarray(a.difficulty), atol=5e-4, rtol=4e-5)
    positions = oracle.router_scored_positions(11, **options)
    want = oracle.select_sequences_at(np.asarray(logits), np.asarray(labels), np.float32(b.ratio), positions,
                                      attention_mask=np.asarray(mask))
    _check(b, want, np.float32(b.ratio))
    np.testing.assert_allclose(float(jsc.selection_info(b)["avg_confidence"]), want["mean_confidence"], atol=1e-5)


def test_batch_split_step_reads_the_prefix_scores_the_subset_and_compiles_once(monkeypatch):
    model = _model(1)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=6, min_tokens_ratio=0.125, router_prefix=7,
                              router_samples=3)
    seen = []
    real = DecoderLM.hidden_states

    def hidden_states(self, input_ids, attention_mask=None, num_layers=None):
        seen.append(tuple(input_ids.shape))
        return real(self, input_ids, attention_mask, num_layers)

    monkeypatch.setattr(DecoderLM, "hidden_states", hidden_states)
    from cggr_jax.integrations import advance_curriculum

    tx = optax.chain(advance_curriculum(), optax.sgd(0.1))
    step = bs.make_batch_split_train_step(graphdef, cfg, tx, buckets=(2, 4), donate=False, compiler_options=FAST)
    state = step.init(model)
    router_fn = jax.jit(lambda p, r, i, m: nnx.merge(graphdef, p, r).router_logits(i, 1, m))
    positions = oracle.router_scored_positions(11, "all", 3, 7)
    ks = []
    for i in range(8):
        ids = jax.random.randint(jax.random.key(10 + i), (8, 11), 0, 29, dtype=jnp.int32)
        labels = ids.at[2, 1:].set(IGNORE)
        mask = jnp.ones_like(ids).at[5, 4:].set(0)
        logits = router_fn(state.params, state.rest, ids, mask)
        state_next, m = step(state, ids, labels, mask)
        m = jax.device_get(m)
        want = oracle.select_sequences_at(np.asarray(logits), np.asarray(labels), np.float32(m["effective_ratio"]),
                                          positions, attention_mask=np.asarray(mask))
        assert int(m["tokens_total"]) == want["tokens_total"]
        assert int(m["sequences_total"]) == int(want["sequence_eligible"].sum())
        assert int(m["sequences_selected"]) == want["k"]
        np.testing.assert_allclose(float(m["avg_confidence"]), want["mean_confidence"], atol=1e-5)
        ks.append(int(m["sequences_selected"]))
        state = state_next
    assert len(set(ks)) >= 3 and step.num_traces == 1 and step.router_path == "fused"
    assert (8, 7) in seen
    assert all(s[1] == 7 for s in seen if s[0] == 8), seen   # the router read 7 columns, never 11


def test_bad_settings_raise_naming_the_argument():
    for kwargs, name in (({"router_positions": 0}, "router_positions"), ({"router_positions": "every"},
                         "router_positions"), ({"router_positions": 1.5}, "router_positions"),
                         ({"router_samples": 0}, "router_samples"), ({"router_samples": True}, "router_samples"),
                         ({"router_prefix": 0}, "router_prefix"),
                         ({"router_positions": 4, "router_samples": 2}, "router_samples")):
        with pytest.raises(ValueError, match=name):
            bs.BatchSplitConfig(**kwargs)
    cfg = bs.BatchSplitConfig(router_prefix=4)
    z, _, labels, mask = _batch(3)
    with pytest.raises(ValueError, match="router_logits"):   # neither T nor R columns
        jsc.select_sequences(z[:, :3], labels, mask, ratio=0.5, config=cfg)
    with pytest.raises(ValueError, match="labels"):          # concrete out-of-range labels, scored or not
        jsc.select_sequences(z, labels.at[0, 10].set(99), mask, ratio=0.5, config=bs.BatchSplitConfig(router_prefix=2))
    assert bs.BatchSplitConfig(router_positions=np.int64(3)) == bs.BatchSplitConfig(router_positions=3)
    assert hash(bs.BatchSplitConfig(router_samples=8)) == hash(bs.BatchSplitConfig(router_samples=8))


@pytest.mark.parametrize("selection", ["topk", "sampled"])
def test_step_with_a_stride_an_excess_reference_and_each_selection(selection):
    from cggr_jax.integrations import advance_curriculum

    model = _model(2)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    cfg = bs.BatchSplitConfig(router_layers=1, warmup_steps=0, min_tokens_ratio=0.5, scoring="excess",
                              selection=selection, router_positions=3, router_path="logits")
    step = bs.make_batch_split_train_step(graphdef, cfg, optax.chain(advance_curriculum(), optax.sgd(0.1)),
                                          buckets=(4,), donate=False, compiler_options=FAST)
    state = step.init(model)
    ids = jax.random.randint(jax.random.key(3), (8, 11), 0, 29, dtype=jnp.int32)
    labels = ids.at[1, 1:].set(IGNORE)
    mask = jnp.ones_like(ids).at[6, 5:].set(0)
    ref = jnp.asarray(np.random.default_rng(0).uniform(0, 3, size=(8,)), jnp.float32).at[4].set(jnp.nan)
    logits = model.router_logits(ids, 1, mask)
    _, m = step(state, ids, labels, mask, ref)
    m = jax.device_get(m)
    want = oracle.select_sequences_at(np.asarray(logits), np.asarray(labels), np.float32(m["effective_ratio"]),
                                      oracle.router_scored_positions(11, 3), scoring="excess",
                                      attention_mask=np.asarray(mask), reference_nll=np.asarray(ref, np.float64))
    assert int(m["tokens_total"]) == want["tokens_total"]
    assert int(m["sequences_total"]) == int(want["sequence_eligible"].sum()) == 6   # 1 ignored, 4 NaN reference
    assert int(m["tokens_nonfinite"]) == int(want["scores"]["nonfinite"].sum()) > 0
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0
    if selection == "topk":
        assert int(m["sequences_selected"]) == want["k"]
