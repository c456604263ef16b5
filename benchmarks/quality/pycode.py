"""The `pycode` corpus for the quality study v2 (PROTOCOL.md §1): chunk-id based candidate batches, seeded
one-pass permutations, noise chunks for the positive control, evaluation sets.

The data folder ships its own numpy-only ``load.py`` (sha256-checked against ``manifest.json``); it is imported
from the folder itself so that this harness reads exactly what users who rebuilt the corpus with the folder's
``build.py`` get.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
#: Where the corpus is looked for, in order, after --data-dir and $CGGR_PYCODE_DIR.
DEFAULT_DIRS = (REPO / ".data" / "pycode", REPO.parent / "shared" / "data" / "pycode")
SPLITS = ("train", "ref", "val", "test")
NOISE_ID_BASE = -1  # noise chunk j gets id -1 - j: negative ids are the flag


def find_pycode_dir(explicit: Optional[str] = None) -> Path:
    """The corpus folder: ``explicit``, else ``$CGGR_PYCODE_DIR``, else the defaults; a clear error if none."""
    tried = []
    for cand in ([explicit] if explicit else []) + ([os.environ["CGGR_PYCODE_DIR"]]
                                                     if os.environ.get("CGGR_PYCODE_DIR") else []):
        p = Path(cand)
        if not (p / "manifest.json").is_file():
            raise FileNotFoundError(f"{p} is not a pycode folder (it lacks manifest.json); rebuild it with "
                                    f"`python build.py --out DIR` from the data folder (benchmarks/quality/README.md)")
        return p
    for p in DEFAULT_DIRS:
        tried.append(str(p))
        if (p / "manifest.json").is_file():
            return p
    raise FileNotFoundError(f"no pycode corpus found (tried {tried}); pass --data-dir or set $CGGR_PYCODE_DIR")


class _BuiltinLoader:
    """What the data folder's ``load.py`` does (xz -> array of the manifest's shape, sha256-checked), for a folder
    that lacks it (e.g. the synthetic corpus of the CPU test)."""

    @staticmethod
    def load_split(data_dir: str, split: str, verify: bool = True) -> np.ndarray:
        import hashlib
        import lzma

        info = json.loads((Path(data_dir) / "manifest.json").read_text())["splits"][split]
        raw = lzma.decompress((Path(data_dir) / info["file"]).read_bytes())
        if verify and "sha256_raw" in info and hashlib.sha256(raw).hexdigest() != info["sha256_raw"]:
            raise ValueError(f"{data_dir}/{info['file']}: sha256 of the decompressed array differs from manifest.json")
        arr = np.frombuffer(raw, dtype=np.dtype(info["dtype"]))
        if arr.size != int(np.prod(info["shape"])):
            raise ValueError(f"{data_dir}/{info['file']}: decompressed size differs from shape {info['shape']}")
        return arr.reshape(info["shape"]).astype(np.uint16)


def _loader(data_dir: Path):
    if not (data_dir / "load.py").is_file():
        return _BuiltinLoader
    spec = importlib.util.spec_from_file_location("pycode_load", data_dir / "load.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{data_dir}/load.py cannot be imported")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Corpus:
    """The splits as ``(n_chunks, 1025)`` uint16 arrays (only those asked for) and the vocabulary size."""
    data_dir: Path
    vocab_size: int
    splits: dict

    def __getitem__(self, split: str) -> np.ndarray:
        return self.splits[split]


def load_corpus(data_dir: Path, splits=("train", "ref", "val"), verify: bool = True) -> Corpus:
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {s!r}")
    load = _loader(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    arrays = {s: load.load_split(str(data_dir), s, verify=verify) for s in splits}
    return Corpus(data_dir, int(manifest["tokenizer"]["vocab_size"]), arrays)


def unigram(train: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token frequencies of the train split (each token once: the overlapping last column is dropped)."""
    counts = np.bincount(train[:, :-1].reshape(-1), minlength=vocab_size).astype(np.float64)
    return counts / counts.sum()


def noise_bank(probs: np.ndarray, n: int, seq_len: int, seed: int) -> np.ndarray:
    """``n`` noise chunks of ``seq_len + 1`` tokens drawn i.i.d. from ``probs`` (PROTOCOL.md §3), seeded."""
    rng = np.random.default_rng([seed, 0x6E6F])
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random((n, seq_len + 1)), side="right").astype(np.uint16)


class CandidateStream:
    """The candidate batches of one seed: step ``i`` gets ``perm[i*B:(i+1)*B]`` (one pass: a run of N steps needs
    N*B <= chunks), optionally with a seeded ``noise_frac`` of positions replaced by noise-bank rows.

    ``batch(i)`` returns ``(ids, tokens)``: ids int64 (negative = noise chunk ``-1 - j``), tokens
    ``(B, seq_len + 1)`` uint16. Every variant of a seed gets the same batches.
    """

    def __init__(self, train: np.ndarray, seed: int, batch: int, steps: int, seq_len: int,
                 noise_frac: float = 0.0, noise: Optional[np.ndarray] = None, offset: int = 0) -> None:
        if batch < 1 or steps < 1:
            raise ValueError(f"batch and steps must be >= 1, got {batch}, {steps}")
        if not 0.0 <= noise_frac < 1.0:
            raise ValueError(f"noise_frac: expected [0, 1), got {noise_frac}")
        if offset + batch * steps > train.shape[0]:
            raise ValueError(f"one pass: {steps} steps x {batch} candidates (+ offset {offset}) need "
                             f"{offset + batch * steps} chunks, the train split has {train.shape[0]}")
        if seq_len + 1 > train.shape[1]:
            raise ValueError(f"seq_len {seq_len} needs chunks of {seq_len + 1} tokens, have {train.shape[1]}")
        self.train, self.seed, self.B, self.steps, self.seq_len = train, seed, batch, steps, seq_len
        self.perm = np.random.default_rng(seed).permutation(train.shape[0])[offset:offset + batch * steps]
        self.noise_frac = noise_frac
        self.n_noise_per_step = int(round(noise_frac * batch))
        if self.n_noise_per_step:
            if noise is None or noise.shape[0] < self.n_noise_per_step * steps:
                raise ValueError(f"noise bank too small: need {self.n_noise_per_step * steps} rows")
            self.noise = noise

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.steps:
            raise IndexError(f"step {i} outside [0, {self.steps})")
        ids = self.perm[i * self.B:(i + 1) * self.B].astype(np.int64)
        toks = self.train[ids, :self.seq_len + 1]
        if self.n_noise_per_step:
            # The noisy positions are a seeded choice per step, the same for every variant of the seed.
            pos = np.random.default_rng([self.seed, i, 0x706F73]).choice(self.B, self.n_noise_per_step,
                                                                          replace=False)
            j = np.arange(i * self.n_noise_per_step, (i + 1) * self.n_noise_per_step)
            toks = toks.copy()
            toks[pos] = self.noise[j, :self.seq_len + 1]
            ids = ids.copy()
            ids[pos] = NOISE_ID_BASE - j
        return ids, np.ascontiguousarray(toks)


def eval_subset(n_total: int, n: int) -> np.ndarray:
    """``n`` chunk indices spread evenly over ``[0, n_total)`` (the fixed learning-curve subset of val)."""
    if n > n_total:
        raise ValueError(f"eval subset of {n} chunks from {n_total}")
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def encode_ood(data_dir: Path, shared_dir: Path, out: Path, max_chunks: int = 64) -> dict:
    """Encode WikiText-2 valid and Tiny Shakespeare with the pycode tokenizer into 1025-token chunks, cached as
    ``out/<name>.npy`` (needs the ``tokenizers`` package; run where it is installed). Returns name -> shape."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    out.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for name, rel in (("wikitext2_valid", "wikitext-2/valid.txt"), ("tinyshakespeare", "tinyshakespeare/input.txt")):
        text = (shared_dir / rel).read_text(encoding="utf-8")
        ids = np.asarray(tok.encode(text).ids, dtype=np.uint16)
        n = min(max_chunks, (len(ids) - 1) // 1024)
        rows = np.stack([ids[1024 * i:1024 * i + 1025] for i in range(n)])
        np.save(out / f"{name}.npy", rows)
        shapes[name] = list(rows.shape)
    return shapes


def load_ood(data_dir: Path) -> dict:
    """The cached OOD chunk arrays beside the corpus (``<data_dir>/ood/*.npy``), if present."""
    d = data_dir / "ood"
    return {p.stem: np.load(p) for p in sorted(d.glob("*.npy"))} if d.is_dir() else {}
