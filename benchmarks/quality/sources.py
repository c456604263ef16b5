"""Chunk sources of the `pycode` corpus (issue 15: "log what was selected ... chunk sources"): which package each
1025-token chunk of each split comes from, so that the quality study can say what its selecting arms prefer.

    python -m benchmarks.quality.sources --data .data/pycode --wheels /work/cache/wheels \\
        --out benchmarks/quality/results/sources

The corpus records no per-file boundaries, so this rebuilds every split's token stream file by file exactly as the
data folder's own ``build.py`` does (the module is imported from the folder and its functions are reused: pinned
wheels downloaded with a sha256 check, or read from the ``--wheels`` cache; extraction, dedup, split and order
rules), re-encodes it with the folder's ``tokenizer.json`` and **checks the re-encoded stream token for token
against the stored split arrays** (read with the folder's ``load.py``, sha256-checked) before anything is written:
a mismatch is a ``ValueError`` naming the split, chunk and position. That check is what makes the tables
trustworthy.

Per split it writes (all small; they are committed):

* ``chunk_sources_<split>.npz``: for chunk id ``i`` (row ``i``, tokens ``[1024 i, 1024 i + 1025)`` of the stream),
  ``first_package[i]`` (uint8: the package of token ``1024 i``), ``majority_package[i]`` (uint8: the package that
  holds most of the chunk's 1025 tokens; ties go to the lower package index) and ``majority_tokens[i]`` (uint16:
  how many of the 1025 it holds; 1025 = the chunk lies in one package). For ``val`` and ``test`` also
  ``first_file[i]`` (uint16: index into ``files_<split>.json``).
* ``files_val.json``, ``files_test.json``: the files of these small splits in stream order, ``[key, package
  index, tokens]`` (tokens include the file's trailing ``<|endoftext|>``).
* ``packages.json``: ``packages`` (index -> package name, the wheels' order in ``build.py``), and per split the
  files, tokens and chunks of every package, the token share of every package over the tokens the chunks cover
  (positions ``[0, 1024 n]``, each token once; the dropped tail is not in any chunk) and the share of chunks whose
  majority package it is.

A file's ``<|endoftext|>`` belongs to that file. Package indices are uint8 (the corpus has 23 packages).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import numpy as np

from benchmarks.quality import pycode

SPLITS = pycode.SPLITS
#: Splits whose file lists (and per-chunk first file) are written: small, and the ones the study evaluates on.
FILE_LIST_SPLITS = ("val", "test")
SCHEMA = "cggr-pycode-sources/1"


def load_build(data_dir: Path) -> ModuleType:
    """The data folder's ``build.py`` as a module (importing it runs nothing: its work is under ``main()``)."""
    path = Path(data_dir) / "build.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data must be a pycode folder that ships its build.py")
    spec = importlib.util.spec_from_file_location("pycode_build", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path} cannot be imported")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("WHEELS", "SPLITS", "SEQ_LEN", "EOT_ID", "download_wheels", "extract_files", "split_of", "h8"):
        if not hasattr(mod, name):
            raise ValueError(f"{path} lacks {name}: not the build.py this module was written against")
    return mod


def packages_of(build: ModuleType) -> list:
    """Package names in the order ``build.extract_files`` visits the wheels (sorted ``WHEELS``)."""
    return [w[0] for w in sorted(build.WHEELS)]


def split_files(build: ModuleType, wheel_dir: Path, manifest: dict) -> dict:
    """``split -> [(key, text)]`` in stream order, as ``build.build`` orders them; the per-package file counts are
    checked against ``manifest.json``'s ``wheels`` (a mismatch means other wheels or other extraction rules)."""
    build.download_wheels(str(wheel_dir))   # sha256-checked; a cached wheel with the right hash is reused
    files, stats = build.extract_files(str(wheel_dir))
    want = {w["name"]: w.get("files") for w in manifest.get("wheels", [])}
    for name, s in stats.items():
        if name in want and want[name] is not None and want[name] != s["files"]:
            raise ValueError(f"package {name}: {s['files']} files extracted, manifest.json says {want[name]}")
    by_split = {s: [] for s, _ in build.SPLITS}
    for key, text in files:
        by_split[build.split_of(key)].append((key, text))
    for s in by_split:
        by_split[s].sort(key=lambda kt: build.h8("order", kt[0]))
    return by_split


def encode_files(tok, texts: Sequence[str], eot_id: int, batch_bytes: int = 8_000_000) -> tuple:
    """The split's token stream (each file's tokens then ``eot_id``, uint16) and each file's token count
    (EOT included), encoded in batches as ``build.encode_split`` does."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts, lengths, batch, nbytes = [], [], [], 0
    eot = np.array([eot_id], dtype=np.uint16)

    def flush():
        for enc in encode(batch, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.uint16)
            parts.extend((ids, eot))
            lengths.append(len(ids) + 1)
        batch.clear()

    for text in texts:
        batch.append(text)
        nbytes += len(text)
        if nbytes >= batch_bytes:
            flush()
            nbytes = 0
    if batch:
        flush()
    stream = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return stream, np.asarray(lengths, dtype=np.int64)


def check_stream(stream: np.ndarray, stored: np.ndarray, split: str, seq_len: int = 1024) -> None:
    """``ValueError`` unless ``stored`` (``(n, seq_len + 1)``) is exactly ``stream`` cut into chunks (row ``i`` =
    ``stream[seq_len·i : seq_len·i + seq_len + 1]``, ragged tail dropped), naming the first differing position."""
    n = max(0, (len(stream) - 1) // seq_len)
    if stored.ndim != 2 or stored.shape[1] != seq_len + 1:
        raise ValueError(f"{split}: stored array has shape {stored.shape}, expected (n, {seq_len + 1})")
    if stored.shape[0] != n:
        raise ValueError(f"{split}: the re-encoded stream ({len(stream)} tokens) gives {n} chunks, the stored "
                         f"split has {stored.shape[0]}: the rebuild differs from the corpus")
    body = stored[:, :seq_len].reshape(-1) != stream[:n * seq_len]
    last = stored[:, seq_len] != stream[seq_len:n * seq_len + 1:seq_len]
    if body.any() or last.any():
        # (stream position, chunk, column) of the first difference; column seq_len of chunk j is position
        # seq_len·(j + 1), the token chunk j shares with chunk j + 1
        first = []
        if body.any():
            b = int(np.argmax(body))
            first.append((b, b // seq_len, b % seq_len))
        if last.any():
            j = int(np.argmax(last))
            first.append((seq_len * (j + 1), j, seq_len))
        pos, i, col = min(first)
        raise ValueError(f"{split}: the re-encoded stream differs from the stored chunks at stream position {pos} "
                         f"(chunk {i}, column {col}): {int(body.sum() + last.sum())} tokens differ; "
                         f"the rebuild (wheels, rules, tokenizer) is not the corpus's")


def chunk_sources(file_package: np.ndarray, file_tokens: np.ndarray, n_packages: int,
                  seq_len: int = 1024) -> dict:
    """Per chunk of the stream made of files with packages ``file_package`` and token counts ``file_tokens`` (in
    stream order): ``first_package``, ``majority_package`` (ties: lower index), ``majority_tokens`` and
    ``first_file``. The chunks are those of ``build.py``'s ``chunk()``: ``n = (tokens - 1) // seq_len``."""
    file_package = np.asarray(file_package)
    file_tokens = np.asarray(file_tokens, dtype=np.int64)
    if file_package.shape != file_tokens.shape:
        raise ValueError(f"file_package {file_package.shape} and file_tokens {file_tokens.shape} differ in shape")
    if (file_tokens < 1).any():
        raise ValueError("file_tokens: every file has at least its <|endoftext|> token")
    if file_package.size and not (0 <= file_package.min() and file_package.max() < n_packages <= 255):
        raise ValueError(f"file_package: expected indices in [0, {n_packages}) with n_packages <= 255")
    total = int(file_tokens.sum())
    n = max(0, (total - 1) // seq_len)
    covered = n * seq_len + 1 if n else 0
    pkg = np.repeat(file_package.astype(np.uint8), file_tokens)[:covered]
    starts = np.arange(n, dtype=np.int64) * seq_len
    # the file holding position t is the first whose end (exclusive) exceeds t
    first_file = np.searchsorted(np.cumsum(file_tokens), starts, side="right")
    counts = np.zeros((n, n_packages), dtype=np.int64)
    if n:
        rows = np.empty((n, seq_len + 1), dtype=np.uint8)      # rows of chunk(): the 1025 tokens of each chunk
        rows[:, :seq_len] = pkg[:n * seq_len].reshape(n, seq_len)
        rows[:, seq_len] = pkg[seq_len:n * seq_len + 1:seq_len]
        for p in np.unique(file_package):
            counts[:, p] = (rows == p).sum(1)
    majority = counts.argmax(1) if n else np.zeros(0, np.int64)
    return {"first_package": pkg[starts].astype(np.uint8), "majority_package": majority.astype(np.uint8),
            "majority_tokens": counts.max(1).astype(np.uint16) if n else np.zeros(0, np.uint16),
            "first_file": first_file, "covered_tokens": covered,
            "covered_per_package": np.bincount(pkg, minlength=n_packages)}


def split_stats(file_package: np.ndarray, file_tokens: np.ndarray, table: dict, packages: list,
                seq_len: int = 1024) -> dict:
    """``packages.json``'s entry of one split: per package files, tokens (all, tail included), covered tokens and
    their share, and the share of chunks whose majority package it is."""
    P = len(packages)
    n = len(table["majority_package"])
    cov = table["covered_per_package"]
    maj = np.bincount(table["majority_package"], minlength=P)
    return {
        "files": int(len(file_tokens)), "tokens": int(np.sum(file_tokens)), "chunks": n,
        "covered_tokens": int(table["covered_tokens"]),
        "tokens_dropped_tail": int(np.sum(file_tokens) - table["covered_tokens"]),
        "single_package_chunks": int((table["majority_tokens"] == seq_len + 1).sum()) if n else 0,
        "per_package": {
            packages[p]: {"files": int((file_package == p).sum()),
                          "tokens": int(np.asarray(file_tokens)[file_package == p].sum()),
                          "covered_tokens": int(cov[p]),
                          "token_share": float(cov[p] / max(1, table["covered_tokens"])),
                          "majority_chunks": int(maj[p]), "majority_chunk_share": float(maj[p] / max(1, n))}
            for p in range(P)},
    }


def build_sources(data_dir: Path, wheel_dir: Path, out: Path, splits: Sequence[str] = SPLITS,
                  log=print) -> dict:
    """Rebuild, validate and write the tables of ``splits`` (see the module docstring). Returns ``packages.json``."""
    from tokenizers import Tokenizer

    t0 = time.time()
    data_dir, out = Path(data_dir), Path(out)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    build = load_build(data_dir)
    packages = packages_of(build)
    if len(packages) > 255:
        raise ValueError(f"{len(packages)} packages do not fit the uint8 package index")
    tok_path = data_dir / manifest["tokenizer"]["file"]
    if hashlib.sha256(tok_path.read_bytes()).hexdigest() != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{tok_path}: sha256 differs from manifest.json")
    tok = Tokenizer.from_file(str(tok_path))
    seq_len, eot = int(build.SEQ_LEN), int(build.EOT_ID)
    log(f"[sources] extracting files from the wheels in {wheel_dir}")
    by_split = split_files(build, Path(wheel_dir), manifest)
    pkg_index = {p: i for i, p in enumerate(packages)}
    out.mkdir(parents=True, exist_ok=True)
    result = {"schema": SCHEMA, "corpus": manifest.get("name"), "packages": packages,
              "definitions": {
                  "chunk": f"chunk i = tokens [{seq_len} i, {seq_len} i + {seq_len + 1}) of the split's stream",
                  "first_package": "package of the chunk's first token",
                  "majority_package": f"package holding most of the chunk's {seq_len + 1} tokens "
                                      "(ties: lower index)",
                  "token_share": f"share of the tokens the chunks cover (positions [0, {seq_len} n], each once)",
                  "eot": "a file's <|endoftext|> belongs to that file"},
              "splits": {}}
    for split in splits:
        t = time.time()
        files = by_split[split]
        info = manifest["splits"][split]
        if len(files) != info["files"]:
            raise ValueError(f"{split}: {len(files)} files rebuilt, manifest.json says {info['files']}")
        fpkg = np.array([pkg_index[k.split("/", 1)[0]] for k, _ in files], dtype=np.int64)
        stream, lengths = encode_files(tok, [tx for _, tx in files], eot,
                                       getattr(build, "ENCODE_BATCH_BYTES", 8_000_000))
        if len(stream) != info["tokens"]:
            raise ValueError(f"{split}: the re-encoded stream has {len(stream)} tokens, manifest.json says "
                             f"{info['tokens']}: the rebuild differs from the corpus")
        stored = pycode.load_corpus(data_dir, splits=(split,))[split]   # the folder's load.py, sha256-checked
        check_stream(stream, stored, split, seq_len)
        del stored, stream
        table = chunk_sources(fpkg, lengths, len(packages), seq_len)
        arrays = {k: table[k] for k in ("first_package", "majority_package", "majority_tokens")}
        if split in FILE_LIST_SPLITS:
            if len(files) > np.iinfo(np.uint16).max:
                raise ValueError(f"{split}: {len(files)} files do not fit the uint16 file index")
            arrays["first_file"] = table["first_file"].astype(np.uint16)
            (out / f"files_{split}.json").write_text(json.dumps(
                [[k, int(p), int(n)] for (k, _), p, n in zip(files, fpkg, lengths)], indent=0) + "\n")
        np.savez_compressed(out / f"chunk_sources_{split}.npz", **arrays)
        result["splits"][split] = {**split_stats(fpkg, lengths, table, packages, seq_len), "validated": True,
                                   "sha256_raw": info.get("sha256_raw")}
        log(f"[sources] {split}: {len(files)} files, {int(lengths.sum())} tokens, {len(table['majority_package'])} "
            f"chunks; stream equals the stored array ({time.time() - t:.1f} s)")
    # no timings in the file: two runs write identical outputs
    (out / "packages.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"[sources] wrote {out} in {time.time() - t0:.1f} s")
    return result


def load_sources(folder: Path) -> dict:
    """``packages.json`` plus each split's per-chunk arrays (``splits[split]["arrays"]``) from a sources folder."""
    folder = Path(folder)
    meta = json.loads((folder / "packages.json").read_text())
    if meta.get("schema") != SCHEMA:
        raise ValueError(f"{folder}/packages.json: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    for split, d in meta["splits"].items():
        with np.load(folder / f"chunk_sources_{split}.npz") as z:
            d["arrays"] = {k: z[k] for k in z.files}
        if len(d["arrays"]["majority_package"]) != d["chunks"]:
            raise ValueError(f"{folder}: chunk_sources_{split}.npz has {len(d['arrays']['majority_package'])} "
                             f"chunks, packages.json says {d['chunks']}")
    return meta


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the pycode folder (manifest.json, build.py, load.py, arrays)")
    ap.add_argument("--wheels", help="wheel cache folder, outside the repository (default: a temporary folder)")
    ap.add_argument("--out", required=True, help="output folder, e.g. benchmarks/quality/results/sources")
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of " + ",".join(SPLITS))
    a = ap.parse_args(argv)
    splits = [s for s in a.splits.split(",") if s]
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"--splits: expected names from {SPLITS}, got {s!r}")
    data = Path(a.data)
    if not (data / "manifest.json").is_file():
        raise FileNotFoundError(f"--data {data}: no manifest.json there (pass the pycode folder)")
    tmp = None if a.wheels else tempfile.mkdtemp(prefix="pycode-wheels-")
    try:
        build_sources(data, Path(a.wheels or tmp), Path(a.out), splits)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
