"""Tests of ``cggr_jax.models``: the Flax NNX Llama-style decoder and its truncated router.

The forward pass is checked against an independent NumPy float64 implementation written here from the
architecture's equations (RMSNorm, rotate-half RoPE, causal softmax attention with key padding, SwiGLU),
reading the model's parameters; the router is checked for exact equality with the full model and for
sharing (not copying) the model's ``nnx.Param`` objects.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")

from cggr_jax.models import DecoderConfig, DecoderLM  # noqa: E402
from cggr_jax.router import create_truncated_router  # noqa: E402

V, D, L, H = 37, 24, 3, 3  # odd vocab, head_dim 8


def _model(**kw) -> DecoderLM:
    cfg = DecoderConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=H, max_seq_len=16, **kw)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def fwd(model: DecoderLM, ids, mask=None) -> np.ndarray:
    """``model(ids, mask)`` as NumPy (eager: on a small CPU, op-by-op beats compiling the whole model)."""
    return np.asarray(model(ids, mask))


def _ids(b: int, t: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)


# ------------------------------------------------------------------------------- NumPy float64 reference
def _np(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)


def _rms(x: np.ndarray, g, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * _np(g)


def _rope(x: np.ndarray, theta: float) -> np.ndarray:  # x: (B, T, H, Dh)
    t, dh = x.shape[1], x.shape[-1]
    half = dh // 2
    freqs = theta ** (-2.0 * np.arange(half) / dh)
    ang = np.arange(t)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_forward(model: DecoderLM, ids, num_layers: int, attention_mask=None) -> np.ndarray:
    cfg = model.config
    ids = np.asarray(ids)
    b, t = ids.shape
    x = _np(model.embed.embedding[...])[ids]
    keymask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    allowed = np.tril(np.ones((t, t), bool))[None, None] & keymask[:, None, None, :]
    for blk in list(model.layers)[:num_layers]:
        a = _rms(x, blk.attn_norm.scale[...], cfg.norm_eps)
        heads = lambda w: (a @ _np(w.kernel[...])).reshape(b, t, -1, cfg.head_dim)
        group = cfg.num_heads // cfg.kv_heads  # query head h reads kv head h // group
        q = _rope(heads(blk.attn.q_proj), cfg.rope_theta)
        k = np.repeat(_rope(heads(blk.attn.k_proj), cfg.rope_theta), group, axis=2)
        v = np.repeat(heads(blk.attn.v_proj), group, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(allowed, s, -1e30)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, -1)
        x = x + o @ _np(blk.attn.o_proj.kernel[...])
        m = _rms(x, blk.mlp_norm.scale[...], cfg.norm_eps)
        g = m @ _np(blk.mlp.gate_proj.kernel[...])
        u = m @ _np(blk.mlp.up_proj.kernel[...])
        x = x + (g / (1 + np.exp(-g)) * u) @ _np(blk.mlp.down_proj.kernel[...])
    h = _rms(x, model.final_norm.scale[...], cfg.norm_eps)
    if cfg.tie_embeddings:
        return h @ _np(model.embed.embedding[...]).T
    return h @ _np(model.lm_head.kernel[...])


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("num_layers", [0, 1, L])
def test_forward_matches_numpy_reference(num_layers):
    model = _model()
    ids = _ids(2, 7)
    got = model.router_logits(ids, num_layers) if num_layers < L else model(ids)  # eager, un-jitted
    assert got.shape == (2, 7, V) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference_forward(model, ids, num_layers), atol=2e-5, rtol=1e-4)


def test_tied_embeddings_gqa_and_padding_mask_match_reference():
    model = _model(tie_embeddings=True, num_kv_heads=1)
    assert model.lm_head is None
    assert model.layers[0].attn.k_proj.kernel[...].shape == (D, D // H)
    ids = _ids(3, 9, seed=4)
    mask = jnp.array([[1] * 9, [1] * 6 + [0] * 3, [0] * 4 + [1] * 5], jnp.int32)
    got = fwd(model, ids, mask)
    assert np.isfinite(got).all()  # left-padding queries see only padding keys: finite, never NaN
    ref = reference_forward(model, ids, L, mask)
    real = np.asarray(mask)[:, :, None].repeat(V, -1) != 0
    # Padding *queries* are unspecified (but finite); real positions must match the reference.
    np.testing.assert_allclose(got[real], ref[real], atol=2e-5, rtol=1e-4)


def test_padding_is_invisible_to_real_tokens():
    """Right padding leaves the real prefix unchanged; left padding only shifts RoPE positions uniformly,
    which relative attention scores cannot see, so the real tokens' logits are unchanged too."""
    model = _model()
    ids = _ids(1, 6, seed=7)
    base = fwd(model, ids)
    junk = jnp.full((1, 3), 5, jnp.int32)
    right = jnp.concatenate([ids, junk], 1)
    left = jnp.concatenate([junk, ids], 1)
    ones, zeros = jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 3), jnp.int32)
    out_r = fwd(model, right, jnp.concatenate([ones, zeros], 1))
    out_l = fwd(model, left, jnp.concatenate([zeros, ones], 1))
    np.testing.assert_allclose(out_r[:, :6], base, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out_l[:, 3:], base, atol=5e-5, rtol=1e-4)
    # Without the mask, left padding does change the logits: the mask is what is being tested.
    assert np.abs(fwd(model, left)[:, 3:] - base).max() > 1e-3


def test_causality():
    model = _model()
    ids = _ids(2, 8)
    ids2 = ids.at[:, 5].set((ids[:, 5] + 1) % V)
    a, b = fwd(model, ids), fwd(model, ids2)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 0


def test_router_equals_model_and_shares_parameters():
    model = _model()
    ids = _ids(2, 7)
    full = model(ids)
    np.testing.assert_array_equal(np.asarray(model.router_logits(ids, L)), np.asarray(full))
    router = create_truncated_router(model, num_layers=L)
    np.testing.assert_array_equal(np.asarray(router(ids)), np.asarray(full))

    model_params = {id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    router_params = [v for _, v in nnx.iter_graph(router) if isinstance(v, nnx.Param)]
    assert router_params and all(id(v) in model_params for v in router_params)  # same objects, no copies
    assert router.model.embed.embedding is model.embed.embedding

    # Writing a model parameter is seen by the router (and the router's truncation really drops layers).
    r2 = create_truncated_router(model, num_layers=1)
    before = np.asarray(r2(ids))
    k = model.layers[2].mlp.down_proj.kernel
    k[...] = k[...] * 3.0
    np.testing.assert_array_equal(np.asarray(r2(ids)), before)  # layer 2 is not in a 1-layer router
    w = model.layers[0].mlp.down_proj.kernel
    w[...] = w[...] * 3.0
    after = np.asarray(r2(ids))
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_array_equal(after, np.asarray(model.router_logits(ids, 1)))


def test_bf16_compute_close_to_fp32_and_grad():
    m32 = _model()
    m16 = _model(dtype=jnp.bfloat16)
    ids = _ids(2, 9, seed=3)
    a, b = fwd(m32, ids), fwd(m16, ids)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=3e-2)  # same init (same seed), bf16 activations

    mp = _model(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert mp.embed.embedding[...].dtype == jnp.bfloat16
    assert np.isfinite(fwd(mp, ids)).all()

    graphdef, params = nnx.split(m32, nnx.Param)

    def loss(params, ids):
        logits = nnx.merge(graphdef, params)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    g = jax.grad(loss)(params, ids)
    leaves = jax.tree_util.tree_leaves(g)
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in leaves)


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.arange(5, dtype=jnp.int32))  # 1-D
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="num_layers"):
        model.router_logits(jnp.zeros((2, 5), jnp.int32), L + 1)
    with pytest.raises(ValueError, match="num_layers"):
        create_truncated_router(model, -1)
    with pytest.raises(ValueError, match="num_heads"):
        DecoderConfig(vocab_size=V, d_model=25, num_heads=4)
    with pytest.raises(ValueError, match="even"):
        DecoderConfig(vocab_size=V, d_model=12, num_heads=4)  # head_dim 3
    with pytest.raises(ValueError, match="vocab_size"):
        DecoderConfig(vocab_size=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(vocab_size=V, d_model=D, num_heads=H, num_kv_heads=2)
