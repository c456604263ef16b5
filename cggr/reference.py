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

Pure NumPy; no framework is imported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, NamedTuple, Optional

import numpy as np

__all__ = ["FORMAT", "ReferenceStore", "ReferenceBatch", "write_reference", "load_reference",
           "reference_batches"]

FORMAT = "cggr-reference-v1"
_FILES = ("chunk_ids.npy", "token_nll.npy", "chunk_mean.npy")


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
    """Write a store; ``chunk_ids`` (n,) distinct integers, ``token_nll`` (n, T) floats (rounded to float16).

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

    def rows(self, ids: Any) -> np.ndarray:
        """Row positions of ``ids``; ``KeyError`` naming the ids the store does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.chunk_ids, ids)
        pos_c = np.minimum(pos, len(self.chunk_ids) - 1) if len(self.chunk_ids) else pos
        found = (pos < len(self.chunk_ids)) & (self.chunk_ids[pos_c] == ids) if len(self.chunk_ids) else \
            np.zeros(ids.shape, bool)
        if not found.all():
            missing = ids[~found].reshape(-1)
            raise KeyError(f"chunk ids not in the reference store: {missing[:8].tolist()}"
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
    """One batch. ``layout="targets"``: ``input_ids = row[:-1]``, ``targets = row[1:]``, ``reference_nll``
    of shape ``(B, T)`` aligned with ``targets`` (for ``CGGRLoss``). ``layout="labels"``: ``input_ids =
    labels = row`` (Hugging Face shifts inside), ``reference_nll`` of shape ``(B, T + 1)`` aligned with
    ``labels`` (column 0, a token without a prediction, is NaN)."""

    chunk_ids: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    reference_nll: np.ndarray
    chunk_reference: np.ndarray


def reference_batches(chunks: Any, chunk_ids: Any, store: ReferenceStore, batch_size: int, *,
                      order: Any = None, layout: str = "targets", drop_last: bool = True) -> Iterator[ReferenceBatch]:
    """Yield batches of ``chunks`` (``(n, T + 1)`` token ids whose ids are ``chunk_ids``) with their references.

    ``order`` is a sequence of positions into ``chunks`` (e.g. a seeded permutation); by default 0..n-1.
    Token ids come out as int64. A chunk id the store lacks is a ``KeyError`` before the first batch.
    """
    chunks = np.asarray(chunks)
    chunk_ids = np.asarray(chunk_ids)
    if chunks.ndim != 2 or chunks.shape[1] != store.seq_len + 1:
        raise ValueError(f"chunks: expected shape (n, {store.seq_len + 1}) (the store's T + 1), got {chunks.shape}")
    if chunk_ids.shape != (chunks.shape[0],):
        raise ValueError(f"chunk_ids: expected shape ({chunks.shape[0]},) (one id per chunk), got {chunk_ids.shape}")
    if layout not in ("targets", "labels"):
        raise ValueError(f"layout: expected 'targets' or 'labels', got {layout!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    order = np.arange(chunks.shape[0]) if order is None else np.asarray(order)
    store.rows(chunk_ids[order])  # fail early on any missing id
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
