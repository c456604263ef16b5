"""A causal LM's LM head in JAX: the head-linearity rule, the head's weight, and the CGGR loss of a
:class:`cggr_jax.models.DecoderLM` through the fused LM head (its ``(B, T, V)`` logits never exist).

The head-linearity rule (:func:`check_linear_head`): wherever CGGR derives logits from a model's head (the
fused router path of the batch-split step and :func:`decoder_lm_cggr_loss`), the model's own logits are first
compared numerically with ``hidden · Wᵀ (+ b)``; a post-head transform raises instead of silently scoring
other logits. The PyTorch counterpart of :func:`decoder_lm_cggr_loss` for Hugging Face models is
``cggr_torch.causal_lm.hf_causal_lm_cggr_loss``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cggr_jax import fused_linear, models, utils
from cggr_jax.loss import DEFAULT_CONFIG

__all__ = [
    "HEAD_TOLERANCE",
    "check_linear_head",
    "decoder_lm_cggr_loss",
    "decoder_lm_hidden_states",
    "forget_head_checks",
    "head_weight",
    "linear_head_logits",
]


# --------------------------------------------------------------------------------- the head-linearity rule
def head_weight(model: Any) -> tuple[jax.Array, str]:
    """``(weight, layout)`` of a ``DecoderLM``'s head, cast to the compute dtype exactly as its head does."""
    dtype = model.config.dtype
    if model.lm_head is not None:
        return model.lm_head.kernel[...].astype(dtype), "dv"
    return model.embed.embedding[...].astype(dtype), "vd"


def linear_head_logits(hidden: jax.Array, weight: jax.Array, layout: str,
                       bias: jax.Array | None = None) -> jax.Array:
    """``hidden · Wᵀ + b`` in float32 (``W`` ``(V, d)`` for ``"vd"``, ``(d, V)`` for ``"dv"``)."""
    contract = ((hidden.ndim - 1,), (1,)) if layout == "vd" else ((hidden.ndim - 1,), (0,))
    z = jax.lax.dot_general(hidden, weight, (contract, ((), ())), preferred_element_type=jnp.float32)
    return z if bias is None else z + bias.astype(jnp.float32)


#: Relative tolerance of the head-linearity check by compute dtype, against the largest logit: a plain head
#: agrees to rounding; a scaled, capped or soft-capped head differs by far more.
HEAD_TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
_HEAD_VERDICTS: dict[Any, Any] = {}


def _head_probe_model(model: Any) -> Any:
    """``model`` itself when its parameters are concrete; under a trace, a copy with concrete pseudo-random
    parameters of the same shapes (the linearity of the head is a property of the model's code)."""
    graphdef, state = nnx.split(model)
    if not any(utils.is_traced(x) for x in jax.tree_util.tree_leaves(state)):
        return model
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree_util.tree_leaves(state))))

    def fresh(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.floating):
            return (jax.random.normal(next(keys), x.shape, jnp.float32) * 0.5).astype(x.dtype)
        return jnp.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map(fresh, state))


def forget_head_checks() -> None:
    """Forget the cached verdicts of :func:`check_linear_head` (e.g. after redefining a model class)."""
    _HEAD_VERDICTS.clear()


def check_linear_head(model: Any, name: str = "model") -> None:
    """The head-linearity rule, one rule for the router and the fused LM head: the model's own logits must be
    ``hidden · Wᵀ (+ b)`` of its final hidden states and its head weight.

    Checked numerically at first use on a few positions (``min(4, max_seq_len)`` tokens): the model's
    ``__call__`` logits against :func:`linear_head_logits` of ``hidden_states``, within
    :data:`HEAD_TOLERANCE` of the compute dtype relative to the largest logit. A model that scales, caps or
    soft-caps its logits after the head fails (:class:`ValueError` naming ``name``) instead of training on a
    loss that is not its own. Under a trace the check runs eagerly on a copy with concrete pseudo-random
    parameters; the verdict is cached per model class and configuration.
    """
    key = (type(model), getattr(model, "config", None))
    try:
        verdict = _HEAD_VERDICTS.get(key, "unchecked")
    except TypeError:   # an unhashable configuration: check every time
        key, verdict = None, "unchecked"
    if verdict == "unchecked":
        with jax.ensure_compile_time_eval():
            probe = _head_probe_model(model)
            cfg = probe.config
            T = max(1, min(4, int(cfg.max_seq_len)))
            ids = (jnp.arange(T, dtype=jnp.int32) * 7919 % int(cfg.vocab_size)).reshape(1, T)
            logits = jnp.asarray(probe(ids), jnp.float32)
            weight, layout = head_weight(probe)
            linear = linear_head_logits(probe.hidden_states(ids).astype(cfg.dtype), weight, layout)
            tol = HEAD_TOLERANCE.get(jnp.dtype(cfg.dtype).name, 2e-2)
            scale = float(jnp.max(jnp.abs(linear))) + 1e-6
            err = float(jnp.max(jnp.abs(logits - linear)))
        verdict = None
        if not err <= tol * scale:
            verdict = (f"its logits are not hidden @ lm_head.weight.T (+ bias) (max difference {err:.3g} at a "
                       f"logit scale of {scale:.3g}): a post-head transform (scaling, capping, soft-capping) "
                       f"would make CGGR score and train other logits than the model's own; use CGGRLoss on the "
                       f"model's logits instead (router_path='logits' for batch splitting)")
        if key is not None:
            _HEAD_VERDICTS[key] = verdict
    if verdict is not None:
        raise ValueError(f"{name}: {verdict}")


# ---------------------------------------------------------------------------------- DecoderLM fused head
def decoder_lm_hidden_states(model: Any, input_ids: jax.Array,
                             attention_mask: jax.Array | None = None) -> jax.Array:
    """Final (normed) hidden states ``(B, T, d)`` of a :class:`cggr_jax.models.DecoderLM`: the input of its
    LM head (``model.hidden_states(input_ids, attention_mask)``)."""
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model: expected a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    return model.hidden_states(input_ids, attention_mask)


def decoder_lm_cggr_loss(model: Any, input_ids: jax.Array, labels: jax.Array, step: Any, *,
                         attention_mask: jax.Array | None = None, reference_nll: Any = None,
                         **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CGGR loss of a :class:`cggr_jax.models.DecoderLM` without materialising its ``(B, T, V)`` logits.

    ``hidden = decoder_lm_hidden_states(model, input_ids, attention_mask)``; the head weight is
    ``model.lm_head.kernel`` (``(d, V)``, ``weight_layout="dv"``) or, with tied embeddings,
    ``model.embed.embedding`` (``(V, d)``), cast to the model's compute dtype exactly as the model's head does;
    logits are float32 like the model's (``logits_dtype=float32`` unless given). Labels are shifted (SPEC §1):
    position ``t`` is scored against ``labels[:, t + 1]``, the last position and positions whose next token is
    padding (``attention_mask[:, t + 1] == 0``) get ``ignore_index`` (the convention of SPEC §9). ``kwargs``
    are those of :func:`cggr_jax.fused_linear.fused_linear_cggr` (configuration, capacity, chunking). The model's
    head must pass :func:`check_linear_head` (checked at first use). Differentiable w.r.t. the
    model's parameters (use inside ``nnx.value_and_grad`` with ``has_aux=True``).

    ``reference_nll`` (``scoring='excess'``, SPEC §3.1) is aligned like the *unshifted* ``labels``, shape
    ``(B, T)``: ``reference_nll[b, t]`` is the reference model's loss of predicting ``labels[b, t]``. It is shifted
    exactly like the labels (``reference_nll[:, 0]`` is never read), as PyTorch's ``hf_causal_lm_cggr_loss`` does.
    """
    if not isinstance(model, models.DecoderLM):
        raise ValueError(f"model: expected a cggr_jax.models.DecoderLM, got {type(model).__name__}")
    ids_shape = getattr(input_ids, "shape", None)
    if ids_shape is None or len(ids_shape) != 2:
        raise ValueError(f"input_ids: expected an integer (B, T) array, got {fused_linear.describe(input_ids)}")
    loss_fn, config = kwargs.get("loss_fn"), kwargs.get("config")
    source = loss_fn if loss_fn is not None else config
    ignore_index = kwargs.get("ignore_index", DEFAULT_CONFIG.ignore_index) if source is None \
        else getattr(source, "ignore_index", DEFAULT_CONFIG.ignore_index)
    ignore_index = utils.check_int(ignore_index, "ignore_index")
    labels = utils.as_targets(labels, tuple(ids_shape) + (model.config.vocab_size,), "labels",
                              ignore_index=ignore_index)
    check_linear_head(model)
    hidden = decoder_lm_hidden_states(model, input_ids, attention_mask).astype(model.config.dtype)
    weight, layout = head_weight(model)
    labels = jnp.asarray(labels)
    pad = jnp.full((labels.shape[0], 1), ignore_index, dtype=labels.dtype)
    shifted = jnp.concatenate([labels[:, 1:], pad], axis=1)
    if attention_mask is not None:
        nxt = jnp.concatenate([jnp.asarray(attention_mask)[:, 1:] != 0,
                               jnp.zeros((labels.shape[0], 1), bool)], axis=1)
        shifted = jnp.where(nxt, shifted, jnp.asarray(ignore_index, labels.dtype))
    if reference_nll is not None:
        if tuple(getattr(reference_nll, "shape", ())) != tuple(labels.shape):
            raise ValueError(f"reference_nll: expected shape {tuple(labels.shape)} (that of labels, unshifted), "
                             f"got {fused_linear.describe(reference_nll)}")
        ref = jnp.asarray(reference_nll)
        # Shifted like the labels; the last position has no target (ignore_index), so its value is never read.
        reference_nll = jnp.concatenate([ref[:, 1:], jnp.zeros_like(ref[:, :1])], axis=1)
    kwargs.setdefault("logits_dtype", jnp.float32)
    return fused_linear.fused_linear_cggr_loss(hidden, weight, shifted, step, weight_layout=layout,
                                               reference_nll=reference_nll, **kwargs)
