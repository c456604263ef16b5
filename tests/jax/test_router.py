"""The router module: the head-linearity rule (numeric, at first use), the mirror fields of
``SequenceSelection``, and the batch-split step's label rules (SPEC §9, §11)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cggr_jax
from cggr_jax import batch_split as bs
from cggr_jax import causal_lm, router, scorer
from cggr_jax.integrations import advance_curriculum
from cggr_jax.models import DecoderConfig, DecoderLM

V, T, B = 23, 8, 4
FAST = {"xla_backend_optimization_level": 0}


class ScaledLM(DecoderLM):
    """Multiplies its logits by ``lm_head_multiplier`` (0.25) after the head, as some model families do."""

    def __call__(self, input_ids, attention_mask=None):
        return super().__call__(input_ids, attention_mask) * 0.25


class CappedLM(DecoderLM):
    """Clips its logits to ``[-0.01, 0.01]`` after the head (a hard cap)."""

    def __call__(self, input_ids, attention_mask=None):
        return jnp.clip(super().__call__(input_ids, attention_mask), -0.01, 0.01)


class SoftCappedLM(DecoderLM):
    """Soft-caps its logits, ``c·tanh(z / c)`` with ``c = 0.05`` (Gemma-2 style, a small cap to bite here)."""

    def __call__(self, input_ids, attention_mask=None):
        return 0.05 * jnp.tanh(super().__call__(input_ids, attention_mask) / 0.05)


def _config(**kw) -> DecoderConfig:
    return DecoderConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, max_seq_len=T, mlp_ratio=2,
                         init_std=0.5, **kw)


@pytest.mark.parametrize("cls", [ScaledLM, CappedLM, SoftCappedLM], ids=["scaled", "capped", "soft-capped"])
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
def test_post_head_transforms_are_refused(cls, tied):
    model = cls(_config(tie_embeddings=tied), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model: its logits are not hidden @ lm_head.weight.T"):
        causal_lm.check_linear_head(model)
    # the fused router path of the batch-split step, requested or automatic
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    for path in ("auto", "fused"):
        step = bs.make_batch_split_train_step(graphdef, bs.BatchSplitConfig(router_layers=1, router_path=path),
                                              optax.chain(advance_curriculum(), optax.sgd(0.1)))
        with pytest.raises(ValueError, match="post-head transform"):
            step.init(model)
    # the fused LM head of a DecoderLM, also when the model is only traced (under jit)
    ids = jnp.zeros((2, T), jnp.int32)
    with pytest.raises(ValueError, match="post-head transform"):
        causal_lm.decoder_lm_cggr_loss(model, ids, ids, 0)
    causal_lm.forget_head_checks()    # the verdict is cached; check the traced path afresh
    with pytest.raises(ValueError, match="post-head transform"):
        nnx.jit(lambda m, i: causal_lm.decoder_lm_cggr_loss(m, i, i, 0))(model, ids)


@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
def test_a_plain_model_passes_and_the_fused_path_matches_its_logits(tied):
    model = DecoderLM(_config(tie_embeddings=tied), rngs=nnx.Rngs(1))
    causal_lm.check_linear_head(model)                                  # no error
    assert router.resolve_router_path(model, "auto")[0] == "fused"
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V, dtype=jnp.int32)
    weight, layout = causal_lm.head_weight(model)
    np.testing.assert_allclose(np.asarray(causal_lm.linear_head_logits(model.hidden_states(ids), weight, layout)),
                               np.asarray(model(ids)), rtol=1e-5, atol=1e-5)
    # the logits path stays available for a transformed model (its own router_logits are scored)
    assert router.resolve_router_path(ScaledLM(_config(), rngs=nnx.Rngs(0)), "logits")[0] == "logits"


def test_sequence_selection_fields_are_the_mirror_union():
    assert router.SequenceSelection._fields == (
        "mask", "k", "rank", "difficulty", "eligible", "ratio", "base_ratio", "token_scores",
        "tokens_out_of_range")
    assert cggr_jax.SequenceSelection is router.SequenceSelection is cggr_jax.types.SequenceSelection
    z = jax.random.normal(jax.random.key(0), (B, T, V))
    labels = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    sel = scorer.select_sequences(z, labels, step=0)
    assert sel.k.dtype == jnp.int32 and sel.mask.shape == (B,) and sel.token_scores.difficulty.shape == (B, T - 1)


def test_batch_split_config_holds_one_cggr_config():
    cfg = bs.BatchSplitConfig(router_layers=1, selection="fixed_quota", warmup_steps=3)
    assert isinstance(cfg.config, cggr_jax.CGGRConfig)
    assert cfg.config.selection == "fixed_quota" and cfg.config.warmup_steps == 3
    assert not cfg.uses_dynamic_threshold and bs.BatchSplitConfig().selection == "topk"
    with pytest.raises(ValueError, match="selection: batch splitting selects whole sequences"):
        bs.BatchSplitConfig(selection="stratified")


def test_batch_split_step_label_rules():
    """Concrete out-of-range labels raise in the step, as in CGGRModel (SPEC §11); uint8 labels with
    ignore_index=-100 are refused; padding positions are never checked."""
    model = DecoderLM(_config(), rngs=nnx.Rngs(0))
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    step = bs.make_batch_split_train_step(graphdef, bs.BatchSplitConfig(router_layers=1),
                                          optax.chain(advance_curriculum(), optax.sgd(0.1)), compiler_options=FAST)
    state = step.init(model)
    ids = np.asarray(jax.random.randint(jax.random.key(3), (B, T), 0, V, dtype=jnp.int32))
    bad = ids.astype(np.int64).copy()
    bad[1, 4] = 2**32 + 1                      # would wrap to 1 in int32 without x64: checked before
    with pytest.raises(ValueError, match=rf"labels: values must lie in \[0, {V}\).*{2**32 + 1}"):
        step(state, ids, bad)
    with pytest.raises(ValueError, match="labels: dtype uint8"):
        step(state, ids, ids.astype(np.uint8))
    mask = np.ones((B, T), np.int32)
    mask[1, 4] = 0                             # the bad label sits under padding: not a target
    bad[1, 4] = V + 3
    state, metrics = step(state, ids, bad, mask)
    assert int(metrics["tokens_out_of_range"]) == 0 and np.isfinite(float(metrics["loss"]))


def test_moved_names_keep_their_old_import_paths():
    """The module split moved the scorer to ``scorer`` and the head rule and DecoderLM loss to ``causal_lm``;
    every name stays importable from ``router`` (same object, listed in its ``__all__``)."""
    for new in (scorer, causal_lm):
        for name in new.__all__:
            assert name in router.__all__ and getattr(router, name) is getattr(new, name), (new.__name__, name)
    from cggr_jax.router import BatchSplitConfig, decoder_lm_cggr_loss, select_sequences  # noqa: F401
    assert select_sequences is bs.select_sequences and BatchSplitConfig is bs.BatchSplitConfig
    with pytest.raises(AttributeError):
        router.no_such_name  # noqa: B018
