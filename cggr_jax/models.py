"""The small Flax NNX model zoo of ``cggr_jax``: a Llama-style decoder-only language model (``DecoderLM``).

JAX has no Hugging Face model hub to wrap, so the demos, tests and benchmarks of batch splitting (SPEC §9) use
this model (the documented exception to the mirror of ``cggr_torch``). ``DecoderLM.router_logits`` runs the
model's own first ``num_layers`` blocks (plus the final norm and the LM head, all shared, no copies): the
routers built on it (``TruncatedRouter``, the scorer) live in :mod:`cggr_jax.router` and :mod:`cggr_jax.scorer`, the training step in
:mod:`cggr_jax.batch_split`.

Architecture (per block, pre-norm, residual stream ``x`` of shape ``(B, T, d)``)::

    h = x + Attn(RMSNorm(x))                 causal multi-head self-attention with rotary embeddings
    y = h + W_down( silu(W_gate RMSNorm(h)) ⊙ W_up RMSNorm(h) )      SwiGLU MLP

    RMSNorm(x) = x / sqrt(mean(x²) + eps) ⊙ g                       (computed in float32)
    Attn(x)    = W_o · concat_heads( softmax(q kᵀ / sqrt(d_head) + causal/padding mask) v )
    q, k       = RoPE(W_q x), RoPE(W_k x)

Rotary embeddings (rotate-half convention): for head dimension ``D`` and frequencies
``ω_i = θ^(−2i/D)``, ``i ∈ [0, D/2)``, position ``t`` rotates the pair ``(u_i, u_{i+D/2})`` by the angle
``t·ω_i``. Positions are the absolute indices ``0 … T−1`` of the input (padding does not shift them).

The LM head is either its own ``(d, V)`` matrix or, with ``tie_embeddings=True``, the transposed token
embedding. Logits are always returned in float32; the head's matmul accumulates in float32 even when the
compute ``dtype`` is bfloat16.

Attention mask: an optional ``attention_mask`` of shape ``(B, T)`` (1 = real token, 0 = padding) removes
padding *keys* from every query's attention (on top of the causal mask). Padding query positions still
produce (meaningless but finite) logits; give them ``ignore_index`` labels. A query that sees only padding
keys (left padding) attends uniformly over them through a large finite negative bias, never NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "DecoderConfig",
    "RMSNorm",
    "SwiGLU",
    "CausalSelfAttention",
    "DecoderBlock",
    "DecoderLM",
    "check_inputs",
    "check_num_layers",
    "rotary_embedding",
]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of :class:`DecoderLM` (frozen, hashable: usable as a ``jit`` static argument).

    Attributes:
        vocab_size: ``V``, number of token ids (``≥ 1``).
        d_model: residual width ``d`` (divisible by ``num_heads``; ``d / num_heads`` must be even for RoPE).
        num_layers: number of decoder blocks ``L``.
        num_heads: attention heads.
        max_seq_len: longest accepted input length ``T``.
        mlp_ratio: SwiGLU hidden width is ``mlp_ratio · d_model`` unless ``mlp_hidden_dim`` is given.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``/``jnp.float16`` for mixed precision).
        param_dtype: storage dtype of the parameters.
        mlp_hidden_dim: explicit SwiGLU hidden width (e.g. 1536 for a SmolLM-135M-shaped model).
        tie_embeddings: use the token embedding (transposed) as the LM head.
        rope_theta: RoPE base ``θ``.
        norm_eps: RMSNorm ``eps``.
        init_std: standard deviation of the normal initialiser of every matrix.
        attention_implementation: passed to ``jax.nn.dot_product_attention`` (``None``/``"xla"``/
            ``"cudnn"``; cuDNN flash attention needs a GPU, fp16/bf16, and ``attention_mask=None``).
        num_kv_heads: key/value heads for grouped-query attention (``None`` = ``num_heads``, plain
            multi-head attention); must divide ``num_heads`` (SmolLM-135M: 9 query heads, 3 kv heads).
    """

    vocab_size: int
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mlp_hidden_dim: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_implementation: Literal["xla", "cudnn"] | None = None
    num_kv_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"DecoderConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"DecoderConfig: head dimension d_model/num_heads = {self.head_dim} must be even (RoPE)"
            )
        if self.mlp_hidden_dim is not None and (
            not isinstance(self.mlp_hidden_dim, int) or self.mlp_hidden_dim < 1
        ):
            raise ValueError(
                f"DecoderConfig.mlp_hidden_dim must be None or a positive int, got {self.mlp_hidden_dim!r}"
            )
        if self.mlp_hidden_dim is None and not self.mlp_ratio > 0:
            raise ValueError(f"DecoderConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not (self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0):
            raise ValueError("DecoderConfig.rope_theta, norm_eps and init_std must be > 0")
        if self.num_kv_heads is not None and (
            not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
        ):
            raise ValueError(
                f"DecoderConfig.num_kv_heads must be None or a positive divisor of num_heads ({self.num_heads}), "
                f"got {self.num_kv_heads!r}"
            )
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError(
                "DecoderConfig.attention_implementation must be None, 'xla' or 'cudnn', "
                f"got {self.attention_implementation!r}"
            )

    @property
    def head_dim(self) -> int:
        """``d_model / num_heads``."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads`` or ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width."""
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        return int(round(self.mlp_ratio * self.d_model))


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


def _projection_kwargs(config: DecoderConfig, rngs: nnx.Rngs) -> dict[str, Any]:
    """The ``nnx.Linear`` arguments of every projection inside a block (attention and MLP): no bias, the
    config's compute and parameter dtypes, normal initialisation."""
    return dict(use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                kernel_init=_normal(config.init_std), rngs=rngs)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x², axis=-1) + eps) ⊙ g``, computed in float32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Apply RoPE (rotate-half convention) to ``x`` of shape ``(B, T, H, D)`` at ``positions`` ``(T,)``.

    ``out[..., i] = x_i cos(t ω_i) − x_{i+D/2} sin(t ω_i)``,
    ``out[..., i + D/2] = x_{i+D/2} cos(t ω_i) + x_i sin(t ω_i)``, ``ω_i = θ^(−2i/D)``; angles in float32.
    """
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # (T, D/2)
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE and an optional key-padding mask."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        d = config.d_model
        kw = _projection_kwargs(config, rngs)
        kv = config.kv_heads * config.head_dim
        self.q_proj = nnx.Linear(d, d, **kw)
        self.k_proj = nnx.Linear(d, kv, **kw)
        self.v_proj = nnx.Linear(d, kv, **kw)
        self.o_proj = nnx.Linear(d, d, **kw)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.implementation = config.attention_implementation

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        q_shape = (b, t, self.num_heads, self.head_dim)
        kv_shape = (b, t, self.num_kv_heads, self.head_dim)
        positions = jnp.arange(t, dtype=jnp.int32)
        q = rotary_embedding(self.q_proj(x).reshape(q_shape), positions, self.rope_theta)
        k = rotary_embedding(self.k_proj(x).reshape(kv_shape), positions, self.rope_theta)
        v = self.v_proj(x).reshape(kv_shape)
        mask = None
        if attention_mask is not None:
            mask = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, T): padding keys are masked
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation=self.implementation
        )
        return self.o_proj(out.reshape(b, t, -1))


class SwiGLU(nnx.Module):
    """``W_down(silu(W_gate x) ⊙ W_up x)``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        kw = _projection_kwargs(config, rngs)
        self.gate_proj = nnx.Linear(config.d_model, config.hidden_dim, **kw)
        self.up_proj = nnx.Linear(config.d_model, config.hidden_dim, **kw)
        self.down_proj = nnx.Linear(config.hidden_dim, config.d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``h = x + Attn(norm(x))``, ``y = h + MLP(norm(h))``."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        norm_kw = dict(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
        self.attn_norm = RMSNorm(config.d_model, **norm_kw)
        self.attn = CausalSelfAttention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, **norm_kw)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), attention_mask)
        return x + self.mlp(self.mlp_norm(x))


def check_inputs(
    config: DecoderConfig, input_ids: jax.Array, attention_mask: jax.Array | None
) -> None:
    """Static (shape/dtype) checks; never reads values, so it is free under ``jit``."""
    if not hasattr(input_ids, "ndim") or input_ids.ndim != 2:
        raise ValueError(
            "input_ids must be a 2-D integer array of shape (batch, seq_len), "
            f"got shape {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.shape[1] > config.max_seq_len:
        raise ValueError(
            f"input_ids has seq_len {input_ids.shape[1]} > DecoderConfig.max_seq_len {config.max_seq_len}"
        )
    if attention_mask is not None:
        if not hasattr(attention_mask, "shape") or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} "
                f"(1 = token, 0 = padding), got {getattr(attention_mask, 'shape', type(attention_mask))}"
            )


class _LMHead(nnx.Module):
    """Untied LM head ``(d, V)``; float32 accumulation and output."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(
            _normal(config.init_std)(rngs.params(), (config.d_model, config.vocab_size), config.param_dtype)
        )
        self.dtype = config.dtype

    def __call__(self, h: jax.Array) -> jax.Array:
        w = self.kernel[...].astype(self.dtype)
        return jnp.einsum("btd,dv->btv", h.astype(self.dtype), w, preferred_element_type=jnp.float32)


class DecoderLM(nnx.Module):
    """Llama-style decoder LM: embedding → ``L`` × :class:`DecoderBlock` → RMSNorm → LM head.

    ``model(input_ids, attention_mask=None)`` maps int ``(B, T)`` ids to float32 logits ``(B, T, V)``;
    ``logits[:, t]`` predicts token ``t + 1`` (the caller shifts, SPEC §1).
    ``model.router_logits(input_ids, num_layers)`` is the truncated router of batch splitting: the same
    embedding, the first ``num_layers`` blocks, the same final norm and head (shared parameters).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, DecoderConfig):
            raise ValueError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=_normal(config.init_std),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(
            config.d_model, eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )
        self.lm_head = None if config.tie_embeddings else _LMHead(config, rngs=rngs)

    def _head(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h)
        if self.lm_head is not None:
            return self.lm_head(h)
        w = self.embed.embedding[...].astype(self.config.dtype)  # (V, d)
        return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)

    def _forward(
        self, input_ids: jax.Array, num_layers: int, attention_mask: jax.Array | None
    ) -> jax.Array:
        check_inputs(self.config, input_ids, attention_mask)
        x = self.embed(input_ids.astype(jnp.int32))
        for block in list(self.layers)[:num_layers]:
            x = block(x, attention_mask)
        return self._head(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Full forward: float32 logits ``(B, T, V)``."""
        return self._forward(input_ids, self.config.num_layers, attention_mask)

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, num_layers: int | None = None
    ) -> jax.Array:
        """Final normed hidden states ``(B, T, d)`` in the compute ``dtype``: the input of the LM head.

        ``num_layers`` (``None`` = all ``L``) truncates the stack as :meth:`router_logits` does, so
        ``router_logits(ids, n, mask)`` equals the head applied to ``hidden_states(ids, mask, n)``; fused
        scorers (``cggr_jax.fused_linear``) use it to score the head without materialising the logits.
        """
        n = self.config.num_layers if num_layers is None else num_layers
        check_num_layers(n, self.config)
        check_inputs(self.config, input_ids, attention_mask)
        x = self.embed(input_ids.astype(jnp.int32))
        for block in list(self.layers)[:n]:
            x = block(x, attention_mask)
        return self.final_norm(x)

    def router_logits(
        self, input_ids: jax.Array, num_layers: int, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Truncated forward through the first ``num_layers`` blocks (``0 ≤ num_layers ≤ L``), then the
        shared final norm and head: float32 logits ``(B, T, V)``. ``num_layers == L`` equals ``model(...)``."""
        check_num_layers(num_layers, self.config)
        return self._forward(input_ids, num_layers, attention_mask)


def check_num_layers(num_layers: int, config: DecoderConfig) -> None:
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise ValueError(f"num_layers must be a Python int (static), got {type(num_layers).__name__}")
    if not 0 <= num_layers <= config.num_layers:
        raise ValueError(
            f"num_layers must be in [0, {config.num_layers}] (the model's layer count), got {num_layers}"
        )
