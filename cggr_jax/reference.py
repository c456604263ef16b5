"""Reference models for ``scoring='excess'`` (SPEC §3.1), JAX/Flax NNX: train one, score a corpus once, load batches.

Excess scoring subtracts a reference model's per-token loss from the learner's (RHO-LOSS, Rho-1). The reference
is a small model trained on held-out chunks (the pycode ``ref`` split); its losses on the training chunks are
computed once and stored in the ``cggr-reference-v1`` format of :mod:`cggr.reference`, which both packages read,
so the same stored scores give the same selections in PyTorch and JAX.

* :func:`train_reference_model` trains the Flax NNX :class:`cggr_jax.models.DecoderLM` (or any NNX module mapping
  int ``(B, T)`` ids to logits ``(B, T, V)``) on chunks ``(n, T + 1)``: inputs ``row[:-1]``, targets ``row[1:]``,
  mean cross-entropy, ``optax.adamw`` with the schedule of :func:`cggr.reference.warmup_cosine_lr`, batches from
  :func:`cggr.reference.training_order`, one ``nnx.jit``-compiled update (one compilation per call).
* :func:`score_chunks` computes the float32 per-token NLL with one jitted forward (the last batch is padded to
  ``batch_size``, so one compilation) and writes the store (float16 on disk) with meta recording the model and
  the data hash.
* :func:`reference_loader` yields :func:`cggr.reference.reference_batches` as arrays on a device.

The names and parameters mirror :mod:`cggr_torch.reference` (CONTRIBUTING.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cggr.reference import (ReferenceBatch, ReferenceStore, check_chunks, check_training_args, chunks_sha256,
                            json_safe, reference_batches, training_order, warmup_cosine_lr, write_reference)

__all__ = ["model_logits", "token_nll", "model_meta", "train_reference_model", "score_chunks",
           "reference_loader"]


def model_logits(model: Any, input_ids: jax.Array) -> jax.Array:
    """``model(input_ids)``'s logits ``(B, T, V)`` (a tuple's first element, or the array itself); ``ValueError``
    naming ``model`` otherwise. Shape checks only, so it is free under ``jit``."""
    out = model(input_ids)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not hasattr(out, "shape") or len(out.shape) != 3 or tuple(out.shape[:2]) != tuple(input_ids.shape):
        shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(f"model: expected logits of shape ({input_ids.shape[0]}, {input_ids.shape[1]}, V) from "
                         f"model(input_ids), got {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"model: expected floating logits, got dtype {out.dtype}")
    return out


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token NLL ``lse(z) − z[target]`` in float32 (SPEC §2), shape of ``targets``; logits upcast to float32
    first. A non-finite row gives a non-finite NLL (stored as is: excess scoring makes such a token ineligible)."""
    z = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(z, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - picked


def model_meta(model: Any) -> dict:
    """What a store records about the reference model: its class, parameter count and configuration (a dataclass
    ``config`` such as :class:`cggr_jax.models.DecoderConfig`, else ``None``), JSON-safe."""
    config = getattr(model, "config", None)
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)) if isinstance(model, nnx.Module) else []
    return json_safe({"framework": "jax", "class": type(model).__name__,
                      "num_parameters": int(sum(int(np.prod(x.shape)) for x in leaves)),
                      "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None})


def _check_model(model: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model: expected a Flax NNX module, got {type(model).__name__}")


def _vocab_size(model: Any) -> int:
    # The logits' width, from shapes only (no compute): a config's vocab_size need not be the head's width.
    shape = nnx.eval_shape(lambda m: model_logits(m, jnp.zeros((1, 1), jnp.int32)), model).shape
    return int(shape[-1])


def _token_dtype() -> Any:
    # int32 unless 64-bit mode is on; token ids (< V) always fit
    return jax.dtypes.canonicalize_dtype(np.int64)


def train_reference_model(model: Any, chunks: Any, *, steps: int, batch_size: int, lr: float,
                          warmup_steps: Optional[int] = None, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
                          betas: Sequence[float] = (0.9, 0.95), grad_clip: Optional[float] = 1.0, seed: int = 0,
                          callback: Optional[Callable[[int, Any], None]] = None) -> Any:
    """Train ``model`` on ``chunks`` (``(n, T + 1)`` token ids in ``[0, V)``) for ``steps`` AdamW updates; return it.

    Each update takes ``batch_size`` chunks in the order of :func:`cggr.reference.training_order` (seeded
    permutations), feeds ``row[:-1]`` and minimises the mean float32 cross-entropy against ``row[1:]``; the
    learning rate of update ``s`` is ``warmup_cosine_lr(...)[s]`` (``warmup_steps=None``: 10 % of ``steps``;
    decay to ``min_lr_ratio · lr``), read inside the jitted step from the optimizer's count; gradients are clipped
    to global norm ``grad_clip`` (``None``: no clipping). ``seed`` fixes the batch order (the same batches as
    PyTorch's trainer); a module's own randomness is its ``nnx.Rngs``'. ``callback(step, loss)`` receives each
    update's loss as a device array (reading it synchronises). The model is trained in train mode
    (``nnx.Module.train``), updated in place and returned in eval mode.
    """
    cfg = check_training_args(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                              min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable (step, loss) or None, got {type(callback).__name__}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    _check_model(model)
    chunks, _ = check_chunks(chunks)
    chunks, _ = check_chunks(chunks, vocab_size=_vocab_size(model))
    order = training_order(chunks.shape[0], cfg["steps"], cfg["batch_size"], cfg["seed"])
    table = jnp.asarray(warmup_cosine_lr(cfg["steps"], lr=cfg["lr"], warmup_steps=cfg["warmup_steps"],
                                         min_lr_ratio=cfg["min_lr_ratio"]), jnp.float32)
    last = cfg["steps"] - 1

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(count, last)]

    adamw = optax.adamw(schedule, b1=float(betas[0]), b2=float(betas[1]), eps=1e-8,
                        weight_decay=cfg["weight_decay"])
    tx = adamw if cfg["grad_clip"] is None else optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), adamw)
    model.train()  # dropout on (a module with dropout draws from its own nnx.Rngs)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def update(model: Any, optimizer: nnx.Optimizer, rows: jax.Array) -> jax.Array:
        def loss_of(m: Any) -> jax.Array:
            logits = model_logits(m, rows[:, :-1])
            return token_nll(logits, rows[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    dtype = _token_dtype()
    for step in range(cfg["steps"]):
        loss = update(model, optimizer, jnp.asarray(chunks[order[step]].astype(dtype)))
        if callback is not None:
            callback(step, loss)
    model.eval()
    return model


def score_chunks(model: Any, chunks: Any, chunk_ids: Any, directory: str, *, batch_size: int = 8,
                 meta: Optional[Mapping[str, Any]] = None) -> ReferenceStore:
    """Score ``chunks`` (``(n, T + 1)``, ids ``chunk_ids``) with ``model`` once and write the store; return it.

    ``token_nll[c, t]`` is the float32 NLL of ``row[t + 1]`` given ``row[:t + 1]`` (the targets' alignment,
    :mod:`cggr.reference`), no gradient, in an evaluation view of the model (``nnx.view`` with dropout off; the
    caller's module keeps its mode), rounded to float16 on disk by :func:`cggr.reference.write_reference`. The
    store's meta holds ``model`` (:func:`model_meta`), ``data_sha256`` (:func:`cggr.reference.chunks_sha256`),
    ``num_chunks``, ``seq_len``, ``score_dtype`` and then the caller's ``meta`` (its keys win).
    """
    _check_model(model)
    chunks, ids = check_chunks(chunks, chunk_ids)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ValueError(f"meta: expected a mapping or None, got {type(meta).__name__}")
    chunks, _ = check_chunks(chunks, vocab_size=_vocab_size(model))
    n, width = chunks.shape
    bs = int(batch_size)

    @nnx.jit
    def nll_of(model: Any, rows: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(token_nll(model_logits(model, rows[:, :-1]), rows[:, 1:]))

    # an evaluation view (dropout off, running averages): the caller's module keeps its own mode
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    dtype = _token_dtype()
    out = np.empty((n, width - 1), np.float32)
    for start in range(0, n, bs):
        rows = chunks[start:start + bs].astype(dtype)
        m = rows.shape[0]
        if m < bs:  # pad with token 0 (a valid id) to the static batch shape; the padding rows are dropped
            rows = np.concatenate([rows, np.zeros((bs - m, width), dtype)])
        out[start:start + m] = np.asarray(nll_of(view, jnp.asarray(rows)))[:m]
    record = {"model": model_meta(model), "data_sha256": chunks_sha256(chunks, ids), "num_chunks": int(n),
              "seq_len": int(width - 1), "score_dtype": "float32"}
    record.update(json_safe(dict(meta or {})))
    return write_reference(directory, ids, out, meta=record)


def reference_loader(chunks: Any, chunk_ids: Any, store: ReferenceStore, batch_size: int, *, order: Any = None,
                     layout: str = "targets", drop_last: bool = True, device: Any = None) -> Iterator[ReferenceBatch]:
    """:func:`cggr.reference.reference_batches` as JAX arrays: ``input_ids`` and ``labels`` int32 (int64 in 64-bit
    mode), ``reference_nll`` and ``chunk_reference`` float32, placed by ``jax.device_put(x, device)`` (a
    ``jax.Device`` or a ``Sharding``; ``None``: the default device); ``chunk_ids`` stay a NumPy int64 array
    (bookkeeping, never a model input). Arguments and alignment as ``reference_batches`` (``layout="targets"``
    for ``CGGRLoss(scoring="excess")``); its checks run here, when called."""
    batches = reference_batches(chunks, chunk_ids, store, batch_size, order=order, layout=layout,
                                drop_last=drop_last)
    return _to_device(batches, device, _token_dtype())


def _to_device(batches: Iterator[ReferenceBatch], device: Any, token_dtype: Any) -> Iterator[ReferenceBatch]:
    limit = np.iinfo(token_dtype).max
    for b in batches:
        if b.labels.size and (b.labels.max() > limit or b.labels.min() < -limit):  # would wrap in int32
            raise ValueError(f"chunks: token ids beyond {np.dtype(token_dtype).name} in the batch of chunk ids "
                             f"{b.chunk_ids[:8].tolist()}; enable jax_enable_x64 or remap the ids")
        yield ReferenceBatch(b.chunk_ids, jax.device_put(b.input_ids.astype(token_dtype), device),
                             jax.device_put(b.labels.astype(token_dtype), device),
                             jax.device_put(b.reference_nll, device), jax.device_put(b.chunk_reference, device))
