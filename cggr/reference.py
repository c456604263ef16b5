"""Stored reference losses: score a corpus of fixed-length chunks once, read them back by chunk id.

Excess scoring (RHO-LOSS, Rho-1) subtracts a reference model's per-token loss from the learner's. The reference
is computed once, offline, by a small model trained on held-out data; this module fixes the file format both
packages read, so the same stored scores give the same selections in PyTorch and JAX.

A chunk is a row of ``T + 1`` token ids (inputs ``row[:-1]``, targets ``row[1:]``), identified by an integer
chunk id. The store holds, for each chunk, the reference NLL of each of its ``T`` targets (float16, NaN where
the reference has none) and the chunk's mean over its finite entries (float32, NaN if it has none)::

    <dir>/manifest.json     {"format": "cggr-reference-v1", "num_chunks", "seq_len" (= T), "meta", sha256s}
    <dir>/chunk_ids.npy     (num_chunks,) int64, strictly increasing
    <dir>/token_nll.npy     (num_chunks, T) float16
    <dir>/chunk_mean.npy    (num_chunks,) float32

The toolkit around the store lives in the framework packages (``cggr_torch.reference``,
``cggr_jax.reference``: train a small reference model on held-out chunks, score a corpus once, load batches
onto a device). What both need and no framework decides is here: the chunk checks (:func:`check_chunks`), the
data hash recorded in a store's meta (:func:`chunks_sha256`), the reference model's training batches
(:func:`training_order`) and learning-rate schedule (:func:`warmup_cosine_lr`), so that the same seed gives the
same batches and learning rates in both packages.

**Alignment.** ``token_nll[c, t]`` is the reference loss of predicting ``row[t + 1]`` from ``row[:t + 1]``: it
is aligned with the *targets* ``row[1:]`` (SPEC §1, §3.1), which is what ``CGGRLoss(scoring="excess")`` and
``cggr_loss`` take with the logits of ``input_ids = row[:-1]``. :func:`reference_batches` also offers the
unshifted Hugging Face layout (``layout="labels"``: ``labels = row``, the reference shifted one place right with
a NaN in column 0, so that ``reference_nll[b, t]`` is the loss of predicting ``labels[b, t]``); shifting it as
``shift_for_causal_lm`` shifts the labels (``reference_nll[:, 1:]``) gives back the targets layout (SPEC §9).

Pure NumPy; no framework is imported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["FORMAT", "MissingChunkIds", "ReferenceStore", "ReferenceBatch", "write_reference", "load_reference",
           "reference_batches", "check_chunks", "chunks_sha256", "json_safe", "training_order",
           "warmup_cosine_lr", "check_training_args"]

FORMAT = "cggr-reference-v1"
_FILES = ("chunk_ids.npy", "token_nll.npy", "chunk_mean.npy")


class MissingChunkIds(KeyError, ValueError):
    """Chunk ids the store does not hold. A ``KeyError`` (a failed lookup, as before) and a ``ValueError``
    (bad input: the message names the caller's argument), so either ``except`` catches it."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chunk_means(token_nll: np.ndarray) -> np.ndarray:
    """Mean over each row's finite entries in float64, stored as float32; NaN for a row with none."""
    x = token_nll.astype(np.float64)
    ok = np.isfinite(x)
    count = ok.sum(axis=1)
    total = np.where(ok, x, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def write_reference(directory: str, chunk_ids: Any, token_nll: Any, *,
                    meta: Optional[Mapping[str, Any]] = None) -> "ReferenceStore":
    """Write a store; ``chunk_ids`` (n,) distinct integers, ``token_nll`` (n, T) floats (rounded to float16;
    a value beyond float16's range, ``|x| > 65504``, is stored as ``±inf``, a token without a usable reference).

    ``meta`` (JSON-serialisable) records how the scores were made: the reference model, its training split,
    the corpus and its manifest hash. Returns the store as read back.
    """
    ids = np.asarray(chunk_ids)
    nll = np.asarray(token_nll)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"chunk_ids: expected a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if nll.ndim != 2 or nll.shape[0] != ids.shape[0] or not np.issubdtype(nll.dtype, np.floating):
        raise ValueError(f"token_nll: expected a ({ids.shape[0]}, T) float array (one row per chunk id), got "
                         f"shape {nll.shape} dtype {nll.dtype}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("chunk_ids: expected distinct ids, found duplicates")
    order = np.argsort(ids, kind="stable")
    ids = ids[order].astype(np.int64)
    with np.errstate(over="ignore"):  # beyond float16 (|x| > 65504 nats) is ±inf: no usable reference (§3.1)
        nll16 = nll[order].astype(np.float16)  # round once; the means are taken of what is stored
    os.makedirs(directory, exist_ok=True)
    arrays = {"chunk_ids.npy": ids, "token_nll.npy": nll16, "chunk_mean.npy": _chunk_means(nll16)}
    for name, arr in arrays.items():
        np.save(os.path.join(directory, name), arr, allow_pickle=False)
    manifest = {"format": FORMAT, "num_chunks": int(ids.shape[0]), "seq_len": int(nll.shape[1]),
                "meta": dict(meta or {}),
                "sha256": {name: _sha256(os.path.join(directory, name)) for name in _FILES}}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return load_reference(directory)


@dataclasses.dataclass(frozen=True)
class ReferenceStore:
    """A loaded store: look up per-token reference NLL and per-chunk means by chunk id."""

    chunk_ids: np.ndarray   # (n,) int64, increasing
    token_nll: np.ndarray   # (n, T) float16
    chunk_mean: np.ndarray  # (n,) float32
    meta: Mapping[str, Any]

    @property
    def seq_len(self) -> int:
        return int(self.token_nll.shape[1])

    def rows(self, ids: Any, *, name: str = "ids") -> np.ndarray:
        """Row positions of ``ids``; :class:`MissingChunkIds` (a ``KeyError`` and a ``ValueError``) naming the
        argument ``name`` and the ids the store does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.chunk_ids, ids)
        pos_c = np.minimum(pos, len(self.chunk_ids) - 1) if len(self.chunk_ids) else pos
        found = (pos < len(self.chunk_ids)) & (self.chunk_ids[pos_c] == ids) if len(self.chunk_ids) else \
            np.zeros(ids.shape, bool)
        if not found.all():
            missing = ids[~found].reshape(-1)
            raise MissingChunkIds(f"{name}: chunk ids not in the reference store: {missing[:8].tolist()}"
                           f"{' ...' if missing.size > 8 else ''} ({missing.size} missing)")
        return pos

    def token_nll_of(self, ids: Any) -> np.ndarray:
        """``(len(ids), T)`` float32 reference NLL of each chunk's targets ``row[1:]``."""
        return self.token_nll[self.rows(ids)].astype(np.float32)

    def chunk_mean_of(self, ids: Any) -> np.ndarray:
        """``(len(ids),)`` float32 mean reference NLL of each chunk."""
        return self.chunk_mean[self.rows(ids)]


def load_reference(directory: str, *, verify: bool = True) -> ReferenceStore:
    """Read a store written by :func:`write_reference`; ``verify`` checks every file's sha256."""
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"directory: no reference store at {directory!r} (manifest.json missing)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"directory: expected format {FORMAT!r}, got {manifest.get('format')!r}")
    if verify:
        for name in _FILES:
            got = _sha256(os.path.join(directory, name))
            if got != manifest["sha256"][name]:
                raise ValueError(f"directory: {name} does not match its manifest sha256 (corrupted or edited)")
    arrays = {name: np.load(os.path.join(directory, name), allow_pickle=False) for name in _FILES}
    ids = arrays["chunk_ids.npy"]
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise ValueError("directory: chunk_ids.npy is not strictly increasing")
    return ReferenceStore(ids, arrays["token_nll.npy"], arrays["chunk_mean.npy"], manifest.get("meta", {}))


class ReferenceBatch(NamedTuple):
    """One batch of :func:`reference_batches`. ``layout="targets"``: ``input_ids = row[:-1]``, ``labels =
    row[1:]`` (the aligned targets), ``reference_nll`` of shape ``(B, T)`` aligned with them (for ``CGGRLoss``).
    ``layout="labels"``: ``input_ids = labels = row`` (unshifted; Hugging Face shifts inside), ``reference_nll``
    of shape ``(B, T + 1)`` aligned with ``labels`` (column 0, a token without a prediction, is NaN).
    ``chunk_ids`` are the rows' ids, ``chunk_reference`` each chunk's mean reference NLL (``ReferenceStore``)."""

    chunk_ids: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    reference_nll: np.ndarray
    chunk_reference: np.ndarray


def reference_batches(chunks: Any, chunk_ids: Any, store: ReferenceStore, batch_size: int, *,
                      order: Any = None, layout: str = "targets", drop_last: bool = True) -> Iterator[ReferenceBatch]:
    """Yield batches of ``chunks`` (``(n, T + 1)`` token ids whose ids are ``chunk_ids``) with their references.

    ``layout="targets"`` (default): ``input_ids = row[:-1]`` and ``labels = row[1:]`` (the aligned *targets*
    of SPEC §1), ``reference_nll`` ``(B, T)`` with ``reference_nll[b, t]`` the reference loss of
    ``labels[b, t]``: pass ``model(input_ids)``'s logits, ``labels`` and ``reference_nll`` to
    ``CGGRLoss(scoring="excess")`` / ``cggr_loss`` as they are. ``layout="labels"``: ``input_ids = labels =
    row`` (unshifted Hugging Face labels, SPEC §9), ``reference_nll`` ``(B, T + 1)`` with ``reference_nll[b, t]``
    the reference loss of predicting ``labels[b, t]`` from the tokens before it (column 0 has none: NaN);
    ``shift_for_causal_lm`` pairs ``logits[:, :-1]`` with ``labels[:, 1:]``, whose reference is
    ``reference_nll[:, 1:]``.

    ``order`` is a sequence of positions into ``chunks`` (e.g. a seeded permutation); by default 0..n-1.
    Token ids come out as int64, references as float32 (NaN where the store has none). A chunk id the store
    lacks is a :class:`MissingChunkIds` (``KeyError`` and ``ValueError``) naming ``chunk_ids``. The checks run
    when it is called (it returns an iterator); a ``ReferenceBatch``'s ``chunk_ids`` are the ids of its rows.
    """
    chunks = np.asarray(chunks)
    chunk_ids = np.asarray(chunk_ids)
    if chunks.ndim != 2 or chunks.shape[1] != store.seq_len + 1:
        raise ValueError(f"chunks: expected shape (n, {store.seq_len + 1}) (the store's T + 1), got {chunks.shape}")
    if chunk_ids.shape != (chunks.shape[0],):
        raise ValueError(f"chunk_ids: expected shape ({chunks.shape[0]},) (one id per chunk), got {chunk_ids.shape}")
    if layout not in ("targets", "labels"):
        raise ValueError(f"layout: expected 'targets' or 'labels', got {layout!r}")
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if order is None:
        order = np.arange(chunks.shape[0])
    else:
        order = np.asarray(order)
        if order.ndim != 1 or not (np.issubdtype(order.dtype, np.integer) or order.size == 0):
            raise ValueError(f"order: expected a 1-D integer array of positions into chunks, got shape "
                             f"{order.shape} dtype {order.dtype}")
        order = order.astype(np.int64)
        if order.size and (order.min() < 0 or order.max() >= chunks.shape[0]):
            raise ValueError(f"order: positions must lie in [0, {chunks.shape[0]}) (rows of chunks), got "
                             f"[{order.min()}, {order.max()}]")
    if chunk_ids.size and not np.issubdtype(chunk_ids.dtype, np.integer):
        raise ValueError(f"chunk_ids: expected integer ids, got dtype {chunk_ids.dtype}")
    store.rows(chunk_ids[order], name="chunk_ids")  # fail early on any missing id
    if chunks.size and not np.issubdtype(chunks.dtype, np.integer):
        raise ValueError(f"chunks: expected integer token ids, got dtype {chunks.dtype}")
    return _batches(chunks, chunk_ids, store, batch_size, order, layout, drop_last)


def _batches(chunks: np.ndarray, chunk_ids: np.ndarray, store: ReferenceStore, batch_size: int, order: np.ndarray,
             layout: str, drop_last: bool) -> Iterator[ReferenceBatch]:
    # A generator of its own, so that reference_batches checks its arguments when called, not at the first next()
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        pos = order[start:start + batch_size]
        rows = chunks[pos].astype(np.int64)
        ids = chunk_ids[pos].astype(np.int64)
        ref = store.token_nll_of(ids)
        if layout == "targets":
            yield ReferenceBatch(ids, rows[:, :-1], rows[:, 1:], ref, store.chunk_mean_of(ids))
        else:
            lead = np.full((len(pos), 1), np.nan, np.float32)
            yield ReferenceBatch(ids, rows, rows, np.concatenate([lead, ref], axis=1), store.chunk_mean_of(ids))


# ---------------------------------------------------------------------------------------------------------------
# What both toolkits (cggr_torch.reference, cggr_jax.reference) share
# ---------------------------------------------------------------------------------------------------------------

def check_chunks(chunks: Any, chunk_ids: Any = None, *, vocab_size: Optional[int] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Check a chunk array (and its ids) and return them as NumPy arrays (``chunk_ids`` as int64).

    ``chunks``: ``(n, T + 1)`` integer token ids with ``T ≥ 1`` (inputs ``row[:-1]``, targets ``row[1:]``);
    with ``vocab_size``, every id must lie in ``[0, vocab_size)`` (a reference model has no ignored tokens, and an
    id outside the vocabulary would be a silent out-of-bounds gather). ``chunk_ids``: ``(n,)`` distinct integers.
    ``ValueError`` naming ``chunks`` or ``chunk_ids`` otherwise.
    """
    chunks = np.asarray(chunks)
    if chunks.ndim != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks: expected a 2-D array (n, T + 1) of token ids with T + 1 >= 2, got shape "
                         f"{chunks.shape}")
    if not np.issubdtype(chunks.dtype, np.integer):
        raise ValueError(f"chunks: expected integer token ids, got dtype {chunks.dtype}")
    if vocab_size is not None and chunks.size:
        lo, hi = int(chunks.min()), int(chunks.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"chunks: token ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
                             f"[{lo}, {hi}]")
    if chunk_ids is None:
        return chunks, None
    ids = np.asarray(chunk_ids)
    if ids.shape != (chunks.shape[0],) or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"chunk_ids: expected a ({chunks.shape[0]},) integer array (one id per row of chunks), "
                         f"got shape {ids.shape} dtype {ids.dtype}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("chunk_ids: expected distinct ids, found duplicates")
    return chunks, ids.astype(np.int64)


def chunks_sha256(chunks: Any, chunk_ids: Any, *, rows_per_block: int = 4096) -> str:
    """sha256 of the scored data: the shape, then the ids and the token ids as little-endian int64 in row order.

    Independent of the arrays' integer dtypes (a uint16 corpus and its int64 copy hash alike), so a store's
    ``meta["data_sha256"]`` identifies the chunks it was computed from; hashed in blocks of rows (bounded memory).
    """
    chunks, ids = check_chunks(chunks, chunk_ids)
    h = hashlib.sha256()
    h.update(np.asarray(chunks.shape, dtype="<i8").tobytes())
    h.update(ids.astype("<i8").tobytes())
    for start in range(0, chunks.shape[0], rows_per_block):
        h.update(np.ascontiguousarray(chunks[start:start + rows_per_block], dtype="<i8").tobytes())
    return h.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` as JSON data for a store's meta: mappings and sequences recursively, NumPy scalars and arrays as
    Python numbers and lists, dtypes by their NumPy name, anything else by its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        try:  # a NumPy dtype or a scalar type such as jnp.float32: its name, "float32"
            return np.dtype(value).name
        except TypeError:
            pass
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
    return str(value)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value)) and (float(value) > low if open_low else float(value) >= low) \
        and float(value) <= high
    if not ok:
        bound = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name}: expected a finite number in {bound}, got {value!r}")
    return float(value)


def check_training_args(*, steps: Any, batch_size: Any, lr: Any, warmup_steps: Any, min_lr_ratio: Any,
                        weight_decay: Any, grad_clip: Any, seed: Any) -> dict:
    """The reference-model trainer's settings, checked once for both packages (``ValueError`` naming the
    argument). ``warmup_steps=None`` becomes 10 % of ``steps``; ``grad_clip=None`` turns clipping off."""
    out = dict(steps=_check_int("steps", steps, 1), batch_size=_check_int("batch_size", batch_size, 1),
               lr=_check_float("lr", lr, 0.0, open_low=True),
               min_lr_ratio=_check_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0),
               weight_decay=_check_float("weight_decay", weight_decay, 0.0),
               seed=_check_int("seed", seed, 0))
    out["warmup_steps"] = (out["steps"] // 10 if warmup_steps is None
                           else _check_int("warmup_steps", warmup_steps, 0))
    out["grad_clip"] = None if grad_clip is None else _check_float("grad_clip", grad_clip, 0.0, open_low=True)
    return out


def warmup_cosine_lr(steps: int, *, lr: float, warmup_steps: int, min_lr_ratio: float) -> np.ndarray:
    """``(steps,)`` float64 learning rate of each optimizer update ``s = 0 … steps − 1``::

        s < warmup_steps:   lr · (s + 1) / warmup_steps                          (linear warm-up, never 0)
        otherwise:          lr_min + (lr − lr_min) · (1 + cos(π · p)) / 2,       lr_min = min_lr_ratio · lr,
                            p = (s − warmup_steps) / max(1, steps − warmup_steps − 1) ∈ [0, 1]

    The one schedule of both packages' trainers (PyTorch sets it per update, JAX indexes it inside the step).
    """
    s = np.arange(steps, dtype=np.float64)
    lr_min = min_lr_ratio * lr
    warm = lr * (s + 1) / max(1, warmup_steps)
    p = np.clip((s - warmup_steps) / max(1, steps - warmup_steps - 1), 0.0, 1.0)
    cosine = lr_min + (lr - lr_min) * 0.5 * (1.0 + np.cos(np.pi * p))
    return np.where(s < warmup_steps, warm, cosine)


def training_order(num_chunks: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` int64 row positions of the reference model's training batches: seeded
    permutations of ``0 … num_chunks − 1`` laid end to end (every chunk once per epoch, no chunk twice within a
    batch unless ``batch_size > num_chunks``). Deterministic in ``seed``; the same in both packages."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
        raise ValueError(f"chunks: expected at least one chunk to train on, got {num_chunks!r} rows")
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    perms = [rng.permutation(num_chunks) for _ in range(-(-need // num_chunks))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size).astype(np.int64)
