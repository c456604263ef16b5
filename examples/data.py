"""Text loading, tokenizers and batching for the CGGR examples and benchmarks.

Everything here is deterministic and works offline:

* :func:`load_text` finds the training text: an explicit file, else Tiny Shakespeare from the shared data
  directory (``$CGGR_DATA_DIR`` or ``<repo>/../shared/data``), else an embedded default corpus built from
  the Python standard library's own source files (:func:`stdlib_corpus`).
* Three tokenizers with one interface (``vocab_size``, ``encode(text) -> int32 array``,
  ``decode(ids) -> str``): :class:`CharTokenizer` (the alphabet of a text), :class:`ByteTokenizer`
  (UTF-8 bytes, 256 ids) and :class:`BPETokenizer` (byte-level BPE trained locally with the
  ``tokenizers`` package; no download).
* :func:`split_train_eval` is the fixed 90/10 split (first 90 % train, last 10 % held out), and
  :func:`batch_iterator` / :func:`eval_batches` cut ``(batch, seq_len)`` int32 windows with NumPy.

Windows are plain token sequences: a causal LM is fed ``window`` as ``input_ids`` and ``window`` again as
``labels``; the loss pairs ``logits[:, :-1]`` with ``labels[:, 1:]`` (``shift_for_causal_lm``), so a
window of ``seq_len`` tokens gives ``seq_len - 1`` predictions.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "DATA_DIR_ENV",
    "STDLIB_CORPUS_FILES",
    "TINY_SHAKESPEARE",
    "TextSource",
    "Tokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "repo_root",
    "default_data_dirs",
    "find_tinyshakespeare",
    "stdlib_corpus",
    "load_text",
    "split_train_eval",
    "batch_iterator",
    "eval_batches",
]

#: Environment variable naming a data directory laid out like ``shared/data`` (holding
#: ``tinyshakespeare/input.txt``).
DATA_DIR_ENV = "CGGR_DATA_DIR"

#: Path of Tiny Shakespeare inside a data directory.
TINY_SHAKESPEARE = Path("tinyshakespeare") / "input.txt"

#: The embedded default corpus: these standard-library modules (sorted, each present in CPython
#: 3.10-3.13), concatenated in this order. About 1 MB of real, varied English-and-code text.
STDLIB_CORPUS_FILES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "configparser.py",
    "contextlib.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "inspect.py",
    "ipaddress.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "typing.py",
)


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """A loaded corpus: its ``text``, a short ``name`` for logs/plots and where it came from."""

    text: str
    name: str
    origin: str


def repo_root() -> Path:
    """The repository root (the parent of ``examples/``)."""
    return Path(__file__).resolve().parent.parent


def default_data_dirs(env: Mapping[str, str] | None = None, root: Path | None = None) -> list[Path]:
    """Data directories searched for corpora, in order: ``$CGGR_DATA_DIR`` (if set), ``<root>/../shared/data``."""
    env = os.environ if env is None else env
    root = repo_root() if root is None else Path(root)
    dirs: list[Path] = []
    if env.get(DATA_DIR_ENV):
        dirs.append(Path(env[DATA_DIR_ENV]).expanduser())
    dirs.append(root.parent / "shared" / "data")
    return dirs


def find_tinyshakespeare(env: Mapping[str, str] | None = None, root: Path | None = None) -> Path | None:
    """Path of ``tinyshakespeare/input.txt`` in the first data directory that has it, else ``None``."""
    for d in default_data_dirs(env, root):
        candidate = d / TINY_SHAKESPEARE
        if candidate.is_file():
            return candidate
    return None


def stdlib_corpus(
    files: Sequence[str] = STDLIB_CORPUS_FILES, stdlib_dir: str | os.PathLike[str] | None = None
) -> str:
    """Concatenate the given standard-library source files (sorted by name) into one text.

    Deterministic for a given Python installation. Files missing from this installation are skipped (the
    default list exists in CPython 3.10-3.13); each file is decoded as UTF-8 (undecodable bytes become
    U+FFFD) and followed by a newline. Raises ``FileNotFoundError`` when none of them exists.
    """
    base = Path(sysconfig.get_paths()["stdlib"] if stdlib_dir is None else stdlib_dir)
    parts: list[str] = []
    for name in sorted(files):
        path = base / name
        if path.is_file():
            parts.append(path.read_bytes().decode("utf-8", errors="replace"))
            parts.append("\n")
    if not parts:
        raise FileNotFoundError(f"none of the standard-library files {sorted(files)} exists under {base}")
    return "".join(parts)


def _read_text_file(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def load_text(
    text_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    root: Path | None = None,
    max_chars: int | None = None,
) -> TextSource:
    """Load the corpus for the examples.

    Order: ``text_path`` when given (it must exist: ``FileNotFoundError`` otherwise, never a fallback);
    else Tiny Shakespeare from ``$CGGR_DATA_DIR/tinyshakespeare/input.txt`` or
    ``<repo>/../shared/data/tinyshakespeare/input.txt``; else the embedded standard-library corpus.
    ``max_chars`` keeps only the first ``max_chars`` characters (``None`` keeps all).
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
    if text_path is not None:
        path = Path(text_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text_path {str(path)!r} is not a file")
        source = TextSource(_read_text_file(path), path.name, str(path))
    else:
        shakespeare = find_tinyshakespeare(env, root)
        if shakespeare is not None:
            source = TextSource(_read_text_file(shakespeare), "tinyshakespeare", str(shakespeare))
        else:
            stdlib = sysconfig.get_paths()["stdlib"]
            source = TextSource(stdlib_corpus(), "python-stdlib", f"{stdlib} ({len(STDLIB_CORPUS_FILES)} files)")
    if not source.text:
        raise ValueError(f"the text from {source.origin} is empty")
    if max_chars is not None:
        source = TextSource(source.text[:max_chars], source.name, source.origin)
    return source


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What the examples need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr


class CharTokenizer:
    """Character-level tokenizer: id ``i`` is the ``i``-th character of a sorted alphabet.

    ``CharTokenizer.from_text(text)`` uses the sorted set of characters of ``text``, so build it from the
    whole corpus (before the train/eval split) to cover the held-out part too. Encoding a character
    outside the alphabet is a ``ValueError``.
    """

    def __init__(self, alphabet: str) -> None:
        if not alphabet:
            raise ValueError("alphabet must be a non-empty string")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not repeat characters")
        self.alphabet = alphabet
        self._index = {c: i for i, c in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose alphabet is the sorted set of characters of ``text``."""
        if not text:
            raise ValueError("text must be non-empty to build a character vocabulary")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as an int32 array of character ids."""
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as err:
            raise ValueError(f"text contains the character {err.args[0]!r}, which is not in the alphabet") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The string of the ids (each in ``[0, vocab_size)``)."""
        return "".join(self.alphabet[i] for i in _as_id_array(ids, self.vocab_size))


class ByteTokenizer:
    """Byte-level tokenizer: the UTF-8 bytes of the text, 256 ids, nothing to fit."""

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as int32."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """UTF-8 decode of the bytes (invalid sequences become U+FFFD)."""
        return _as_id_array(ids, 256).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE trained locally with the Hugging Face ``tokenizers`` package (no downloads).

    Byte-level pre-tokenization (GPT-2 style, no prefix space) makes ``decode(encode(text)) == text`` for
    any text. Training is deterministic for a given text and settings.
    """

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer

    @classmethod
    def train(
        cls,
        text: str | Sequence[str],
        vocab_size: int = 2048,
        *,
        min_frequency: int = 2,
        max_token_length: int | None = 16,
    ) -> BPETokenizer:
        """Train on ``text`` (one string or a sequence of documents) to ``vocab_size`` ids (≥ 256)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte alphabet), got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        docs = [text] if isinstance(text, str) else list(text)
        if not any(docs):
            raise ValueError("text must be non-empty to train a BPE tokenizer")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        kwargs: dict[str, object] = dict(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        if max_token_length is not None:
            kwargs["max_token_length"] = max_token_length
        tok.train_from_iterator(docs, trainers.BpeTrainer(**kwargs))
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a tokenizer saved with :meth:`save`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as a ``tokenizers`` JSON file."""
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, text: str) -> np.ndarray:
        """``text`` as an int32 array of BPE ids."""
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of the ids."""
        arr = _as_id_array(ids, self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)  # type: ignore[attr-defined]

    def to_json(self) -> str:
        """The serialised tokenizer (same content as :meth:`save`)."""
        return json.dumps(json.loads(self._tok.to_str()), sort_keys=True)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Split and batches
# --------------------------------------------------------------------------------------------------


def split_train_eval(ids: np.ndarray, eval_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The fixed contiguous split: ``ids[:n - n_eval]`` for training, ``ids[n - n_eval:]`` held out.

    ``n_eval = floor(n · eval_fraction)`` (the default 0.1 is the 90/10 split); both parts must be
    non-empty.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D token array, got shape {arr.shape}")
    if not (0.0 < eval_fraction < 1.0):
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction!r}")
    n = arr.shape[0]
    n_eval = int(np.floor(n * eval_fraction))
    if n_eval < 1 or n - n_eval < 1:
        raise ValueError(f"ids has {n} tokens: too few for a split with eval_fraction={eval_fraction}")
    return arr[: n - n_eval], arr[n - n_eval :]


def _check_window_args(data: np.ndarray, batch_size: int, seq_len: int) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"data must be a 1-D integer token array, got shape {arr.shape} dtype {arr.dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one prediction needs two tokens), got {seq_len!r}")
    if arr.shape[0] < seq_len:
        raise ValueError(f"data has {arr.shape[0]} tokens, fewer than seq_len={seq_len}")
    return arr


def batch_iterator(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    num_batches: int | None = None,
) -> Iterator[np.ndarray]:
    """Random training windows: yields int32 arrays ``(batch_size, seq_len)``.

    Each row is ``data[o : o + seq_len]`` with ``o`` drawn uniformly from ``[0, len(data) - seq_len]`` by
    ``numpy.random.default_rng(seed)``, so the stream is reproducible. Endless unless ``num_batches``.
    """
    arr = _check_window_args(data, batch_size, seq_len)
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 0):
        raise ValueError(f"num_batches must be a non-negative int or None, got {num_batches!r}")
    rng = np.random.default_rng(seed)
    high = arr.shape[0] - seq_len + 1
    cols = np.arange(seq_len)
    produced = 0
    while num_batches is None or produced < num_batches:
        offsets = rng.integers(0, high, size=batch_size)
        yield arr[offsets[:, None] + cols].astype(np.int32)
        produced += 1


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, *, max_batches: int | None = None) -> list[np.ndarray]:
    """Deterministic held-out batches: consecutive non-overlapping windows from the start of ``data``.

    Returns full ``(batch_size, seq_len)`` int32 batches only (a ragged tail is dropped), at most
    ``max_batches`` of them; raises ``ValueError`` when ``data`` cannot fill one batch.
    """
    arr = _check_window_args(data, batch_size, seq_len)
    n_windows = arr.shape[0] // seq_len
    n_batches = n_windows // batch_size
    if max_batches is not None:
        if not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise ValueError(
            f"data has {arr.shape[0]} tokens: not enough for one batch of {batch_size} x {seq_len} windows"
        )
    windows = arr[: n_batches * batch_size * seq_len].astype(np.int32).reshape(n_batches, batch_size, seq_len)
    return list(windows)
