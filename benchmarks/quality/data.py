"""Corpora, the locally trained BPE tokenizer and the batches of the quality harness.

The split is fixed and reported in every output:

* **train**: ``wikitext-2/test.txt`` followed by ``tinyshakespeare/input.txt`` (two documents);
* **eval**: ``wikitext-2/valid.txt`` (held out; the tokenizer never sees it).

Both come from the shared data directory (``--data-dir``, else ``$CGGR_DATA_DIR``, else ``<repo>/../shared/data``).
There is no fallback corpus: a missing file is a :class:`FileNotFoundError` naming it, because a quality number
on another text would not answer the question this harness asks.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` package on the *training* text only
(:class:`examples.data.BPETokenizer`), cached under ``<out>/cache/`` together with the encoded token arrays,
keyed by a hash of the text and the settings, so repeated invocations (and the second GPU invocation) reuse it.

Batches: a training step reads ``B`` windows of ``T`` tokens at offsets drawn uniformly by
``numpy.random.default_rng(seed)``; every mode of one seed therefore sees the identical batch sequence. The
eval set is ``n_eval`` windows of ``T`` tokens at evenly spaced offsets over the whole validation text
(deterministic, the same for every run). A window is both ``input_ids`` and ``labels``; the loss pairs
``logits[:, :-1]`` with ``labels[:, 1:]``, so a window gives ``T − 1`` predictions.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # ``examples`` is a namespace package at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from examples.data import BPETokenizer  # noqa: E402  (reused: byte-level BPE trained locally)

__all__ = [
    "TRAIN_FILES",
    "EVAL_FILE",
    "DATA_DIR_ENV",
    "Corpus",
    "find_data_dir",
    "load_corpus",
    "train_batches",
    "eval_windows",
]

#: Training corpora, relative to the data directory, in concatenation order.
TRAIN_FILES: tuple[str, ...] = ("wikitext-2/test.txt", "tinyshakespeare/input.txt")
#: Held-out evaluation corpus, relative to the data directory.
EVAL_FILE: str = "wikitext-2/valid.txt"
#: Environment variable naming the data directory.
DATA_DIR_ENV = "CGGR_DATA_DIR"
#: Bump when the cache format or the tokenizer recipe changes.
_CACHE_VERSION = 1


@dataclass
class Corpus:
    """Encoded train and eval token streams plus a description for the outputs.

    Attributes:
        train_ids: int32 ``(N_train,)`` training tokens (the training files, each followed by a newline).
        eval_ids: int32 ``(N_eval,)`` held-out tokens.
        vocab_size: the tokenizer's vocabulary size ``V``.
        description: JSON-able facts: files, characters, tokens, tokenizer and cache path.
    """

    train_ids: np.ndarray
    eval_ids: np.ndarray
    vocab_size: int
    description: dict[str, Any] = field(default_factory=dict)


def find_data_dir(explicit: Optional[str | os.PathLike[str]] = None) -> Path:
    """The data directory holding :data:`TRAIN_FILES` and :data:`EVAL_FILE`.

    Order: ``explicit``, ``$CGGR_DATA_DIR``, ``<repo>/../shared/data``. Raises :class:`FileNotFoundError`
    listing the missing files of the chosen directory (no fallback to another corpus).
    """
    if explicit is not None:
        base = Path(explicit).expanduser()
    elif os.environ.get(DATA_DIR_ENV):
        base = Path(os.environ[DATA_DIR_ENV]).expanduser()
    else:
        base = REPO_ROOT.parent / "shared" / "data"
    missing = [rel for rel in (*TRAIN_FILES, EVAL_FILE) if not (base / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir: {str(base)!r} lacks {missing}; pass --data-dir (or set "
                                f"${DATA_DIR_ENV}) to a directory laid out like shared/data")
    return base


def _read(path: Path, max_chars: Optional[int]) -> str:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text if max_chars is None else text[:max_chars]


def load_corpus(data_dir: Path, cache_dir: Path, vocab_size: int, *, max_chars_per_file: Optional[int] = None,
                max_eval_chars: Optional[int] = None) -> Corpus:
    """Read the split, train (or load the cached) BPE tokenizer on the training text, encode both parts.

    Args:
        data_dir: from :func:`find_data_dir`.
        cache_dir: where the tokenizer JSON and the token arrays are cached (created if needed).
        vocab_size: BPE vocabulary size (``>= 256``, the byte alphabet).
        max_chars_per_file: keep only the first characters of each training file (``None``: all).
        max_eval_chars: keep only the first characters of the eval file (``None``: all).

    Raises:
        ValueError: ``vocab_size < 256`` or a non-positive character limit.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size: expected an int >= 256 (byte-level BPE), got {vocab_size!r}")
    for name, value in (("max_chars_per_file", max_chars_per_file), ("max_eval_chars", max_eval_chars)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected None or a positive int, got {value!r}")
    train_docs = [_read(data_dir / rel, max_chars_per_file) for rel in TRAIN_FILES]
    train_text = "\n".join(train_docs) + "\n"
    eval_text = _read(data_dir / EVAL_FILE, max_eval_chars)

    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "vocab": vocab_size}).encode())
    h.update(train_text.encode("utf-8"))
    key_train = h.hexdigest()[:16]
    h.update(b"\0eval\0" + eval_text.encode("utf-8"))
    key_all = h.hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_path = cache_dir / f"bpe-{vocab_size}-{key_train}.json"
    ids_path = cache_dir / f"tokens-{key_all}.npz"

    if tok_path.is_file():
        tokenizer = BPETokenizer.load(tok_path)
    else:
        tokenizer = BPETokenizer.train(train_docs, vocab_size)
        tmp = tok_path.with_suffix(".tmp")
        tokenizer.save(tmp)
        tmp.replace(tok_path)
    if ids_path.is_file():
        with np.load(ids_path) as z:
            train_ids, eval_ids = z["train"], z["eval"]
    else:
        train_ids = tokenizer.encode(train_text).astype(np.int32)
        eval_ids = tokenizer.encode(eval_text).astype(np.int32)
        tmp_ids = ids_path.with_name(ids_path.stem + ".tmp.npz")
        np.savez(tmp_ids, train=train_ids, eval=eval_ids)
        tmp_ids.replace(ids_path)

    V = tokenizer.vocab_size
    description = {
        "data_dir": str(data_dir),
        "train_files": list(TRAIN_FILES),
        "eval_file": EVAL_FILE,
        "split": f"train on {' + '.join(TRAIN_FILES)}; evaluate on {EVAL_FILE} (held out, unseen by the tokenizer)",
        "train_chars": len(train_text),
        "eval_chars": len(eval_text),
        "max_chars_per_file": max_chars_per_file,
        "max_eval_chars": max_eval_chars,
        "train_tokens": int(train_ids.shape[0]),
        "eval_tokens": int(eval_ids.shape[0]),
        "tokenizer": f"byte-level BPE (tokenizers), trained locally on the training text, vocab {V}",
        "tokenizer_path": str(tok_path),
    }
    return Corpus(train_ids=train_ids, eval_ids=eval_ids, vocab_size=V, description=description)


def _check_windows(data: np.ndarray, seq_len: int, what: str) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2 (one prediction needs two tokens), got {seq_len!r}")
    if data.ndim != 1 or data.shape[0] < seq_len:
        raise ValueError(f"{what}: expected a 1-D token array of at least seq_len={seq_len} tokens, got shape "
                         f"{data.shape}")


def train_batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
    """Endless int32 ``(batch_size, seq_len)`` training windows at offsets from ``default_rng(seed)``."""
    _check_windows(data, seq_len, "train data")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    rng = np.random.default_rng(seed)
    high = data.shape[0] - seq_len + 1
    cols = np.arange(seq_len)
    while True:
        offsets = rng.integers(0, high, size=batch_size)
        yield data[offsets[:, None] + cols].astype(np.int32)


def eval_windows(data: np.ndarray, num_windows: int, seq_len: int) -> np.ndarray:
    """The fixed eval set: int32 ``(num_windows, seq_len)`` windows at evenly spaced offsets over ``data``.

    Offsets are ``floor(i·(N − T) / max(1, num_windows − 1))``; they overlap only when the text is shorter
    than ``num_windows·T`` tokens (then use fewer windows).
    """
    _check_windows(data, seq_len, "eval data")
    if not isinstance(num_windows, int) or num_windows < 1:
        raise ValueError(f"num_windows: expected a positive int, got {num_windows!r}")
    span = data.shape[0] - seq_len
    offsets = (np.arange(num_windows, dtype=np.int64) * span) // max(1, num_windows - 1)
    return data[offsets[:, None] + np.arange(seq_len)].astype(np.int32)
