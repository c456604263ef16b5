"""Reference models for ``scoring='excess'`` (SPEC §3.1), PyTorch: train one, score a corpus once, load batches.

Excess scoring subtracts a reference model's per-token loss from the learner's (RHO-LOSS, Rho-1). The reference
is a small model trained on held-out chunks (the pycode ``ref`` split); its losses on the training chunks are
computed once and stored in the ``cggr-reference-v1`` format of :mod:`cggr.reference`, which both packages read,
so the same stored scores give the same selections in PyTorch and JAX.

* :func:`train_reference_model` trains any Hugging Face causal LM (or any module returning logits ``(B, T, V)``)
  on chunks ``(n, T + 1)``: inputs ``row[:-1]``, targets ``row[1:]``, mean cross-entropy, AdamW with the linear
  warm-up and cosine decay of :func:`cggr.reference.warmup_cosine_lr`, batches from
  :func:`cggr.reference.training_order`. Deterministic given ``seed``; runs on the model's device.
* :func:`score_chunks` computes the float32 per-token NLL under ``torch.no_grad()`` and writes the store
  (float16 on disk) with meta recording the model and the data hash.
* :func:`reference_loader` yields :func:`cggr.reference.reference_batches` as tensors on a device.

The names and parameters mirror :mod:`cggr_jax.reference` (CONTRIBUTING.md).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cggr.reference import (ReferenceBatch, ReferenceStore, check_chunks, check_training_args, chunks_sha256,
                            json_safe, reference_batches, training_order, warmup_cosine_lr, write_reference)

__all__ = ["model_logits", "token_nll", "model_meta", "train_reference_model", "score_chunks",
           "reference_loader"]


def model_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids)``'s logits ``(B, T, V)``: a Hugging Face output's ``.logits``, a tuple's first element,
    or the tensor itself. ``ValueError`` naming ``model`` when the output is none of these."""
    out = model(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model: expected logits of shape ({input_ids.shape[0]}, {input_ids.shape[1]}, V) from "
                         f"model(input_ids), got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"model: expected floating logits, got dtype {logits.dtype}")
    return logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``lse(z) − z[target]`` in float32 (SPEC §2), shape of ``targets``; logits upcast to float32
    first. A non-finite row gives a non-finite NLL (stored as is: excess scoring makes such a token ineligible)."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def model_meta(model: Any) -> dict:
    """What a store records about the reference model: its class, parameter count and configuration (a Hugging
    Face ``config.to_dict()``, else ``None``), JSON-safe."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    return json_safe({"framework": "torch", "class": type(model).__name__,
                      "num_parameters": int(sum(p.numel() for p in params)),
                      "config": to_dict() if callable(to_dict) else None})


def _device_of(model: Any) -> torch.device:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model: has no parameters (nothing to train or to place the data by)")
    return p.device


def _vocab_size(model: Any, device: torch.device) -> int:
    # The logits' width, read from one tiny forward (a config's vocab_size can differ from the head's rows), in
    # eval mode so that it draws nothing from the caller's RNG (dropout)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model_logits(model, torch.zeros((1, 1), dtype=torch.long, device=device)).shape[-1])
    finally:
        model.train(was_training)


def train_reference_model(model: Any, chunks: Any, *, steps: int, batch_size: int, lr: float,
                          warmup_steps: Optional[int] = None, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
                          betas: Sequence[float] = (0.9, 0.95), grad_clip: Optional[float] = 1.0, seed: int = 0,
                          callback: Optional[Callable[[int, Any], None]] = None) -> Any:
    """Train ``model`` on ``chunks`` (``(n, T + 1)`` token ids in ``[0, V)``) for ``steps`` AdamW updates; return it.

    Each update takes ``batch_size`` chunks in the order of :func:`cggr.reference.training_order` (seeded
    permutations), feeds ``row[:-1]`` and minimises the mean float32 cross-entropy against ``row[1:]``; the
    learning rate of update ``s`` is ``warmup_cosine_lr(...)[s]`` (``warmup_steps=None``: 10 % of ``steps``;
    decay to ``min_lr_ratio · lr``); gradients are clipped to global norm ``grad_clip`` (``None``: no clipping).
    ``seed`` fixes the batch order and the torch RNG the model's own randomness (dropout) draws from, inside a
    forked RNG state (the caller's global RNG is left as it was); the model's initialisation is the caller's.
    ``callback(step, loss)`` receives each update's loss as a detached tensor (read it only when needed: reading
    synchronises with the device). The model is trained on its own device, in train mode, and returned in eval
    mode.
    """
    cfg = check_training_args(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                              min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable (step, loss) or None, got {type(callback).__name__}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    device = _device_of(model)
    chunks, _ = check_chunks(chunks)
    chunks, _ = check_chunks(chunks, vocab_size=_vocab_size(model, device))
    order = training_order(chunks.shape[0], cfg["steps"], cfg["batch_size"], cfg["seed"])
    lrs = warmup_cosine_lr(cfg["steps"], lr=cfg["lr"], warmup_steps=cfg["warmup_steps"],
                           min_lr_ratio=cfg["min_lr_ratio"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(lrs[0]), betas=(float(betas[0]), float(betas[1])), eps=1e-8,
                                  weight_decay=cfg["weight_decay"])
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    model.train()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg["seed"])
        for step in range(cfg["steps"]):
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            rows = torch.from_numpy(chunks[order[step]].astype(np.int64)).to(device)
            logits = model_logits(model, rows[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            optimizer.step()
            if callback is not None:
                callback(step, loss.detach())
    model.eval()
    return model


def score_chunks(model: Any, chunks: Any, chunk_ids: Any, directory: str, *, batch_size: int = 8,
                 meta: Optional[Mapping[str, Any]] = None) -> ReferenceStore:
    """Score ``chunks`` (``(n, T + 1)``, ids ``chunk_ids``) with ``model`` once and write the store; return it.

    ``token_nll[c, t]`` is the float32 NLL of ``row[t + 1]`` given ``row[:t + 1]`` (the targets' alignment,
    :mod:`cggr.reference`), computed under ``torch.no_grad()`` in eval mode (the model's mode is restored after),
    rounded to float16 on disk by :func:`cggr.reference.write_reference`. The store's meta holds ``model``
    (:func:`model_meta`), ``data_sha256`` (:func:`cggr.reference.chunks_sha256`), ``num_chunks``, ``seq_len``,
    ``score_dtype`` and then the caller's ``meta`` (its keys win; e.g. the reference's training split and steps).
    """
    device = _device_of(model)
    chunks, ids = check_chunks(chunks, chunk_ids)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ValueError(f"meta: expected a mapping or None, got {type(meta).__name__}")
    was_training = model.training
    model.eval()
    try:
        chunks, _ = check_chunks(chunks, vocab_size=_vocab_size(model, device))
        n, width = chunks.shape
        out = np.empty((n, width - 1), np.float32)
        with torch.no_grad():
            for start in range(0, n, int(batch_size)):
                rows = torch.from_numpy(chunks[start:start + int(batch_size)].astype(np.int64)).to(device)
                nll = token_nll(model_logits(model, rows[:, :-1]), rows[:, 1:])
                out[start:start + rows.shape[0]] = nll.cpu().numpy()  # scoring is offline: reading back is fine
    finally:
        model.train(was_training)
    record = {"model": model_meta(model), "data_sha256": chunks_sha256(chunks, ids), "num_chunks": int(n),
              "seq_len": int(width - 1), "score_dtype": "float32"}
    record.update(json_safe(dict(meta or {})))
    return write_reference(directory, ids, out, meta=record)


def reference_loader(chunks: Any, chunk_ids: Any, store: ReferenceStore, batch_size: int, *, order: Any = None,
                     layout: str = "targets", drop_last: bool = True, device: Any = None) -> Iterator[ReferenceBatch]:
    """:func:`cggr.reference.reference_batches` as tensors: ``input_ids`` and ``labels`` int64, ``reference_nll``
    and ``chunk_reference`` float32, on ``device`` (``None``: CPU, sharing memory with the NumPy batch);
    ``chunk_ids`` stay a NumPy int64 array (bookkeeping, never a model input). Arguments and alignment as
    ``reference_batches`` (``layout="targets"`` for ``CGGRLoss(scoring="excess")``); its checks run here, when
    called."""
    batches = reference_batches(chunks, chunk_ids, store, batch_size, order=order, layout=layout,
                                drop_last=drop_last)
    device = None if device is None else torch.device(device)
    return _to_device(batches, device)


def _to_device(batches: Iterator[ReferenceBatch], device: Optional[torch.device]) -> Iterator[ReferenceBatch]:
    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if device is None else t.to(device, non_blocking=True)

    for b in batches:
        yield ReferenceBatch(b.chunk_ids, put(b.input_ids), put(b.labels), put(b.reference_nll),
                             put(b.chunk_reference))

