"""Chunk sources of the quality study (``benchmarks/quality/sources.py`` and ``analyze.py``'s "Chunk sources").

A synthetic pycode folder is written to a temporary folder: three tiny "wheels" (zip files of ``.py`` texts), a
``build.py`` with the real one's interface and rules (sha256-pinned wheels, no network: a missing wheel is an error),
a small byte-level BPE ``tokenizer.json`` trained here, and the split arrays built here independently (each file
encoded on its own, then cut into 1025-token chunks). The tables ``sources.main`` writes are compared with
per-chunk counts done here token by token (chunks that cross file and package boundaries, the dropped tail), the
stream check must fail on a changed token, and the analysis's shares are recomputed from the ids and an independent
candidate permutation. No network.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality import analyze, pycode, sources

SEQ = 1024
PACKAGES = ("alpha", "beta", "gamma")
# split bounds of the synthetic build (the real corpus: 88/10/1/1 %); wide val/test so that every split has chunks
SPLIT_BOUNDS = (("train", 4000), ("ref", 5500), ("val", 7500), ("test", 10000))

BUILD_PY = '''"""Synthetic stand-in for the pycode folder's build.py: the same names and rules, no network."""
import hashlib
import os
import zipfile

SEQ_LEN = 1024
EOT_ID = 0
ENCODE_BATCH_BYTES = 3000   # small: the split streams are encoded in several batches
SPLITS = {splits!r}
WHEELS = {wheels!r}


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def h8(tag, key):
    return int.from_bytes(hashlib.sha256(f"{{tag}}:{{key}}".encode()).digest()[:8], "big")


def download_wheels(wheel_dir):
    for name, version, filename, sha in WHEELS:
        path = os.path.join(wheel_dir, filename)
        if not os.path.exists(path) or sha256_file(path) != sha:
            raise SystemExit(f"wheel {{filename}} missing or sha256 mismatch (no network here)")


def extract_files(wheel_dir):
    seen, files, stats = set(), [], {{}}
    for name, version, filename, _ in sorted(WHEELS):
        s = {{"files": 0}}
        with zipfile.ZipFile(os.path.join(wheel_dir, filename)) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if not info.filename.endswith(".py"):
                    continue
                data = z.read(info)
                text = data.decode("utf-8")
                digest = hashlib.sha256(data).digest()
                if not text.strip() or digest in seen:
                    continue
                seen.add(digest)
                files.append((f"{{name}}/{{info.filename}}", text))
                s["files"] += 1
        stats[name] = s
    return files, stats


def split_of(key):
    bucket = h8("split", key) % 10000
    for split, bound in SPLITS:
        if bucket < bound:
            return split
'''


def _h8(tag: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{tag}:{key}".encode()).digest()[:8], "big")


def _split(key: str) -> str:
    b = _h8("split", key) % 10000
    return next(s for s, bound in SPLIT_BOUNDS if b < bound)


def _texts(rng: np.random.Generator, pkg: str) -> dict:
    """path -> Python-like text; each package has its own vocabulary, lengths from a few to ~2500 tokens."""
    words = [f"{pkg}_{w}" for w in ("value", "index", "frame", "tensor", "node", "parse", "solve", "plot")]
    out = {}
    for j in range(12):
        n_lines = int(rng.integers(3, 160))
        lines = [f"def {rng.choice(words)}_{i}(x, y={int(rng.integers(0, 99))}):\n    return {rng.choice(words)}"
                 f"(x) + {rng.choice(words)}[{int(rng.integers(0, 9))}]\n" for i in range(n_lines)]
        out[f"{pkg}/mod_{j}.py"] = "".join(lines)
    out[f"{pkg}/empty.py"] = "   \n"   # blank: skipped by the build
    return out


def _write_folder(root: Path) -> dict:
    """The synthetic pycode folder and wheel cache; returns what the test needs to check the tables."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(7)
    wheels_dir, data = root / "wheels", root / "data"
    wheels_dir.mkdir(parents=True)
    data.mkdir()
    wheels, all_texts, files = [], [], []
    for pkg in PACKAGES:
        texts = _texts(rng, pkg)
        fn = f"{pkg}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels_dir / fn, "w") as z:
            for path, text in texts.items():
                z.writestr(path, text)
            z.writestr(f"{pkg}/README.txt", "not python")
        wheels.append((pkg, "1.0", fn, hashlib.sha256((wheels_dir / fn).read_bytes()).hexdigest()))
        for path, text in sorted(texts.items()):
            if text.strip():
                files.append((f"{pkg}/{path}", text))
                all_texts.append(text)
    (data / "build.py").write_text(BUILD_PY.format(splits=SPLIT_BOUNDS, wheels=wheels))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(all_texts, trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.token_to_id("<|endoftext|>") == 0
    tok.save(str(data / "tokenizer.json"))
    # the splits, built here file by file (independently of sources.py)
    splits, expect = {}, {}
    for split, _ in SPLIT_BOUNDS:
        sf = sorted([(k, t) for k, t in files if _split(k) == split], key=lambda kt: _h8("order", kt[0]))
        stream, pkg_of_tok, file_of_tok = [], [], []
        for f_i, (key, text) in enumerate(sf):
            ids = tok.encode(text, add_special_tokens=False).ids + [0]
            stream += ids
            pkg_of_tok += [PACKAGES.index(key.split("/")[0])] * len(ids)
            file_of_tok += [f_i] * len(ids)
        n = (len(stream) - 1) // SEQ
        arr = np.array([stream[SEQ * i:SEQ * i + SEQ + 1] for i in range(n)], dtype="<u2").reshape(n, SEQ + 1)
        raw = arr.tobytes()
        xz = lzma.compress(raw)
        (data / f"{split}.u16.xz").write_bytes(xz)
        splits[split] = {"file": f"{split}.u16.xz", "dtype": "<u2", "shape": [n, SEQ + 1], "files": len(sf),
                         "tokens": len(stream), "sha256_raw": hashlib.sha256(raw).hexdigest(),
                         "sha256_xz": hashlib.sha256(xz).hexdigest()}
        expect[split] = {"files": sf, "n": n, "pkg": pkg_of_tok, "file": file_of_tok, "arr": arr}
    manifest = {"name": "synthetic-pycode", "tokenizer": {"file": "tokenizer.json", "vocab_size": 400,
                                                          "sha256": hashlib.sha256((data / "tokenizer.json")
                                                                                   .read_bytes()).hexdigest()},
                "wheels": [{"name": p, "files": sum(k.startswith(p + "/") for k, _ in files)} for p in PACKAGES],
                "splits": splits}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return {"data": data, "wheels": wheels_dir, "expect": expect}


def _rewrite_split(data: Path, split: str, arr: np.ndarray) -> None:
    """Replace a stored split (and its sha256s in manifest.json, so that only the stream check can object)."""
    raw = arr.astype("<u2").tobytes()
    xz = lzma.compress(raw)
    (data / f"{split}.u16.xz").write_bytes(xz)
    m = json.loads((data / "manifest.json").read_text())
    m["splits"][split].update(sha256_raw=hashlib.sha256(raw).hexdigest(), sha256_xz=hashlib.sha256(xz).hexdigest(),
                              shape=list(arr.shape))
    (data / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _write_folder(tmp_path_factory.mktemp("pycode"))


def test_tables_map_every_chunk_to_its_files_and_packages(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "sources"
    assert sources.main(["--data", str(corpus["data"]), "--wheels", str(corpus["wheels"]), "--out", str(out)]) == 0
    meta = sources.load_sources(out)
    assert meta["packages"] == list(PACKAGES)
    crossing = tails = 0
    for split, e in corpus["expect"].items():
        n = e["n"]
        assert n >= 2, f"synthetic {split} too small to test"
        a = meta["splits"][split]["arrays"]
        first, major, mtok = [], [], []
        for i in range(n):
            win = e["pkg"][SEQ * i:SEQ * i + SEQ + 1]
            cnt = Counter(win)
            best = max(cnt.values())
            first.append(win[0])
            major.append(min(p for p, c in cnt.items() if c == best))   # ties: lower index
            mtok.append(best)
            crossing += len(set(e["file"][SEQ * i:SEQ * i + SEQ + 1])) > 1 and len(cnt) > 1
        np.testing.assert_array_equal(a["first_package"], first)
        np.testing.assert_array_equal(a["majority_package"], major)
        np.testing.assert_array_equal(a["majority_tokens"], mtok)
        assert a["first_package"].dtype == np.uint8 and a["majority_package"].dtype == np.uint8
        d = meta["splits"][split]
        covered = SEQ * n + 1
        tail = len(e["pkg"]) - covered
        tails += tail > 0
        assert (d["chunks"], d["files"], d["tokens"], d["covered_tokens"], d["tokens_dropped_tail"]) == \
            (n, len(e["files"]), len(e["pkg"]), covered, tail)
        assert d["validated"] is True
        cov = Counter(e["pkg"][:covered])
        for p, name in enumerate(PACKAGES):
            pp = d["per_package"][name]
            assert pp["covered_tokens"] == cov[p]
            assert pp["token_share"] == pytest.approx(cov[p] / covered)
            assert pp["majority_chunks"] == major.count(p)
            assert pp["files"] == sum(k.startswith(name + "/") for k, _ in e["files"])
            assert pp["tokens"] == Counter(e["pkg"])[p]   # the tail included
        assert d["single_package_chunks"] == sum(m == SEQ + 1 for m in mtok)
        if split in ("val", "test"):
            np.testing.assert_array_equal(a["first_file"], [e["file"][SEQ * i] for i in range(n)])
            listed = json.loads((out / f"files_{split}.json").read_text())
            assert [k for k, _, _ in listed] == [k for k, _ in e["files"]]
            assert [t for _, _, t in listed] == [e["file"].count(j) for j in range(len(e["files"]))]
            assert [PACKAGES[p] for _, p, _ in listed] == [k.split("/")[0] for k, _ in e["files"]]
        else:
            assert "first_file" not in a and not (out / f"files_{split}.json").exists()
    assert crossing > 0 and tails > 0, "the synthetic corpus must have chunks across packages and a dropped tail"
    # a second run writes byte-identical files (they are committed: no timings, no dates)
    again = tmp_path / "again"
    sources.main(["--data", str(corpus["data"]), "--wheels", str(corpus["wheels"]), "--out", str(again)])
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in again.iterdir())
    for f in out.iterdir():
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name


def test_stream_check_fails_on_a_changed_token(corpus: dict, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus["data"], data)
    arr = corpus["expect"]["val"]["arr"].copy()
    arr[1, 5] = (int(arr[1, 5]) + 1) % 400
    _rewrite_split(data, "val", arr)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"val: the re-encoded stream differs .* position 1029 \(chunk 1, column 5\)"):
        sources.main(["--data", str(data), "--wheels", str(corpus["wheels"]), "--out", str(out),
                      "--splits", "val"])
    assert not (out / "chunk_sources_val.npz").exists() and not (out / "packages.json").exists()
    # a chunk too few (the tail is not the corpus's) and a wrong tokenizer are errors too
    _rewrite_split(data, "val", corpus["expect"]["val"]["arr"][:-1])
    with pytest.raises(ValueError, match="gives .* chunks, the stored split has"):
        sources.main(["--data", str(data), "--wheels", str(corpus["wheels"]), "--out", str(out), "--splits", "val"])
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="tokenizer.json: sha256 differs"):
        sources.main(["--data", str(data), "--wheels", str(corpus["wheels"]), "--out", str(out), "--splits", "val"])


def test_check_stream_by_hand() -> None:
    stream = np.arange(1, 12, dtype=np.uint16)                     # 11 tokens, seq_len 4: 2 chunks, tail 2
    stored = np.array([[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]], np.uint16)
    sources.check_stream(stream, stored, "x", seq_len=4)
    bad = stored.copy()
    bad[1, 4] = 0                                                  # the overlap column: stream position 8
    with pytest.raises(ValueError, match=r"position 8 \(chunk 1, column 4\)"):
        sources.check_stream(stream, bad, "x", seq_len=4)
    bad = stored.copy()
    bad[0, 2] = 0
    with pytest.raises(ValueError, match=r"position 2 \(chunk 0, column 2\): 1 tokens differ"):
        sources.check_stream(stream, bad, "x", seq_len=4)
    with pytest.raises(ValueError, match="shape"):
        sources.check_stream(stream, stored[:, :4], "x", seq_len=4)


def test_chunk_sources_by_hand() -> None:
    # seq_len 4 (chunks of 5): files [pkg 0: 3 tokens][pkg 2: 6][pkg 1: 2][pkg 0: 5] = 16 tokens,
    # stream packages 0 0 0 2 2 2 2 2 2 1 1 0 0 0 0 0 -> 3 chunks (covered positions 0..12), tail of 3
    t = sources.chunk_sources(np.array([0, 2, 1, 0]), np.array([3, 6, 2, 5]), n_packages=3, seq_len=4)
    # chunk 0 = 0 0 0 2 2, chunk 1 = 2 2 2 2 2 (one package), chunk 2 = 2 1 1 0 0 (tie 0/1 at 2 each: lower index)
    np.testing.assert_array_equal(t["first_package"], [0, 2, 2])
    np.testing.assert_array_equal(t["majority_package"], [0, 2, 0])
    np.testing.assert_array_equal(t["majority_tokens"], [3, 5, 2])
    np.testing.assert_array_equal(t["first_file"], [0, 1, 1])
    assert t["covered_tokens"] == 13
    np.testing.assert_array_equal(t["covered_per_package"], [5, 2, 6])
    st = sources.split_stats(np.array([0, 2, 1, 0]), np.array([3, 6, 2, 5]), t, ["a", "b", "c"], seq_len=4)
    assert st["tokens_dropped_tail"] == 3 and st["single_package_chunks"] == 1
    assert st["per_package"]["a"] == {"files": 2, "tokens": 8, "covered_tokens": 5, "token_share": 5 / 13,
                                      "majority_chunks": 2, "majority_chunk_share": 2 / 3}
    # too short for one chunk: no chunks, nothing covered
    t = sources.chunk_sources(np.array([1]), np.array([4]), n_packages=2, seq_len=4)
    assert len(t["majority_package"]) == 0 and t["covered_tokens"] == 0


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        sources.chunk_sources(np.array([0, 1]), np.array([3]), 2)
    with pytest.raises(ValueError, match="at least its"):
        sources.chunk_sources(np.array([0]), np.array([0]), 2)
    with pytest.raises(ValueError, match="indices in"):
        sources.chunk_sources(np.array([2]), np.array([3]), 2)
    with pytest.raises(ValueError, match="--splits"):
        sources.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--splits", "val,dev"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        sources.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="build.py"):
        sources.load_build(tmp_path)


def test_wheels_come_through_the_data_folders_build_py(corpus: dict, tmp_path: Path) -> None:
    # the synthetic build.py has no network: an empty --wheels folder reaches its download_wheels and fails there
    with pytest.raises(SystemExit, match="missing"):
        sources.main(["--data", str(corpus["data"]), "--wheels", str(tmp_path / "empty"), "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------ analyze.py
def test_candidate_ids_are_the_candidate_stream() -> None:
    rng = np.random.default_rng(3)
    train = rng.integers(0, 50, (300, 9)).astype(np.uint16)
    noise = rng.integers(0, 50, (100, 9)).astype(np.uint16)
    for arm, noisy in (("random_subset", False), ("oracle_excess", True), ("std_k", False)):
        sc = {"batch": 8, "keep": 2, "seq_len": 8, "noise_frac": 0.25}
        run = {"arm": arm, "noise": noisy, "seed": 5, "scale": sc, "accounting": {"optimizer_steps": 6}}
        B = 2 if arm == "std_k" else 8
        st = pycode.CandidateStream(train, 5, B, 6, 8, noise_frac=0.25 if noisy else 0.0,
                                    noise=noise if noisy else None)
        ids = np.concatenate([st.batch(i)[0] for i in range(6)])
        np.testing.assert_array_equal(analyze.candidate_ids(run, 300), ids[ids >= 0])
        assert len(ids[ids >= 0]) == (6 * 6 if noisy else 6 * B)
        # and, independently: the seed's permutation prefix
        perm = np.random.default_rng(5).permutation(300)[:6 * B]
        assert set(analyze.candidate_ids(run, 300)) <= set(perm)


N_TRAIN, B, K, STEPS = 400, 8, 2, 10


def _run(arm: str, seed: int, noise: bool = False, level: str = "sequence") -> dict:
    key = f"{arm}{'+noise' if noise else ''}__lr0.001__N{STEPS}__s{seed}"
    return {"schema": "cggr-quality-v2-run/1", "key": key, "arm": arm, "noise": noise, "seed": seed, "lr": 0.001,
            "tag": "", "scale": {"name": "tiny", "batch": B, "keep": K, "seq_len": 8, "steps": STEPS,
                                 "noise_frac": 0.25, "train_chunks": None},
            "accounting": {"optimizer_steps": STEPS, "trained_tokens": STEPS * K * 8,
                           "candidate_tokens": STEPS * B * 8, "train_wall_s": 1.0, "ms_per_step": 10.0,
                           "level": level},
            "curve": [{"step": STEPS, "trained_tokens": STEPS * K * 8, "wall_s": 1.0, "val_loss": 3.0}],
            "final": {"val_loss": 3.0 + 0.01 * seed, "ood": {}, "val_loss_by_freq_bucket": {"0-100": 2.0}},
            "selection": {"noise_share_trained": 0.0, "ref_nll_trained_mean": 1.0, "ref_nll_candidates_mean": 1.0,
                          "full_nll_trained_mean": None, "full_nll_candidates_mean": None}}


def _write_sources(folder: Path, major: np.ndarray, shares: dict) -> None:
    """A hand-made sources folder: train's majority packages ``major``, split token shares ``shares``."""
    folder.mkdir(parents=True)
    meta = {"schema": sources.SCHEMA, "packages": list(PACKAGES), "splits": {}}
    for split, sh in shares.items():
        n = len(major) if split == "train" else 4
        mj = major if split == "train" else np.zeros(n, np.uint8)
        np.savez_compressed(folder / f"chunk_sources_{split}.npz", first_package=mj, majority_package=mj,
                            majority_tokens=np.full(n, 1025, np.uint16))
        meta["splits"][split] = {"chunks": n, "single_package_chunks": n,
                                 "per_package": {p: {"token_share": s} for p, s in zip(PACKAGES, sh)}}
    (folder / "packages.json").write_text(json.dumps(meta))


def test_analyze_chunk_sources_section(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    major = rng.integers(0, 3, N_TRAIN).astype(np.uint8)
    shares = {"train": [0.5, 0.3, 0.2], "val": [0.2, 0.2, 0.6], "test": [0.6, 0.3, 0.1]}
    folder = tmp_path / "results" / "roundX"
    (folder / "runs").mkdir(parents=True)
    expect = {}
    for seed in (0, 1):
        cand = np.random.default_rng(seed).permutation(N_TRAIN)[:B * STEPS].reshape(STEPS, B)
        ids = {"random_subset": np.concatenate([rng.choice(c, K, replace=False) for c in cand]),
               # prefers package 2, then 1: the k candidates of each step with the highest package index
               "cggr_excess_r1_s4": np.concatenate([c[np.argsort(-major[c].astype(np.int64), kind="stable")[:K]]
                                                    for c in cand]),
               # not among this seed's candidates: compared with random_subset instead
               "oracle_excess": np.setdiff1d(np.arange(N_TRAIN), cand.ravel())[:K * STEPS],
               "excess_token": cand.ravel()}
        for arm, x in ids.items():
            r = _run(arm, seed, level="token" if arm.endswith("_token") else "sequence")
            (folder / "runs" / f"{r['key']}.json").write_text(json.dumps(r))
            np.save(folder / "runs" / f"{r['key']}.ids.npy", x.astype(np.int32))
            expect.setdefault(arm, []).append((np.bincount(major[x], minlength=3) / len(x),
                                               np.bincount(major[cand.ravel()], minlength=3) / cand.size))
        r = _run("std_k", seed)
        (folder / "runs" / f"{r['key']}.json").write_text(json.dumps(r))
    # no sources folder: no section, the rest as before
    plain = analyze.summarize(folder)
    assert "chunk_sources" not in plain and "Chunk sources" not in analyze.render(plain)
    _write_sources(folder.parent / "sources", major, shares)
    s = analyze.summarize(folder)
    c = s["chunk_sources"]
    assert {k: v for k, v in s.items() if k != "chunk_sources"} == plain
    assert c["sources_dir"] == "../sources"
    assert set(c["arms"]) == {"random_subset", "cggr_excess_r1_s4", "oracle_excess"}
    assert "token-level" in c["not_listed"]["excess_token"] and "std_k" in c["not_listed"]
    for arm in ("random_subset", "cggr_excess_r1_s4", "oracle_excess"):
        e = c["arms"][arm]
        tr = np.mean([t for t, _ in expect[arm]], 0)
        base = (np.mean([b for _, b in expect[arm]], 0) if arm != "oracle_excess"
                else np.mean([t for t, _ in expect["random_subset"]], 0))
        assert e["baseline"] == ("random_subset" if arm == "oracle_excess" else "candidates")
        np.testing.assert_allclose([e["trained_share"][p] for p in PACKAGES], tr)
        np.testing.assert_allclose([e["baseline_share"][p] for p in PACKAGES], base)
        np.testing.assert_allclose([e["ratio"][p] for p in PACKAGES], tr / base)
        assert e["tv_distance"] == pytest.approx(0.5 * np.abs(tr - base).sum())
        for sp, sh in shares.items():
            assert e["exposure"][sp] == pytest.approx(float(np.dot(sh, tr / base)))
        assert e["trained_chunks_per_seed"] == K * STEPS
    ex = c["arms"]["cggr_excess_r1_s4"]
    assert ex["over"][0][0] == "gamma" and ex["under"][0][0] == "alpha"
    assert ex["z"]["gamma"] > 3 and ex["exposure"]["val"] > 1 > ex["exposure"]["test"]
    assert ex["over_selected_token_share"]["val"] == pytest.approx(
        sum(sh for p, sh in zip(PACKAGES, shares["val"]) if p in ex["over_selected_packages"]))
    assert c["arms"]["oracle_excess"]["z"]["alpha"] is None     # no candidates: no random-choice SE
    np.testing.assert_allclose([c["candidates_share"][p] for p in PACKAGES],
                               np.mean([b for _, b in expect["random_subset"]], 0))
    md = analyze.render(s)
    assert "## Chunk sources" in md and "| `cggr_excess_r1_s4` | 2 | 20 | candidates |" in md
    assert "| gamma | 20.0 | 60.0 | 10.0 | +50.0 |" in md
    # ids beyond the tabled train split: the run used another corpus
    np.save(folder / "runs" / f"{_run('random_subset', 0)['key']}.ids.npy", np.array([N_TRAIN + 5], np.int32))
    with pytest.raises(ValueError, match="beyond the 400 train chunks"):
        analyze.summarize(folder)


def test_analyze_main_writes_the_section(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    (folder / "runs").mkdir(parents=True)
    major = np.arange(N_TRAIN) % 3
    for seed in (0, 1):
        cand = np.random.default_rng(seed).permutation(N_TRAIN)[:B * STEPS].reshape(STEPS, B)
        r = _run("random_subset", seed)
        (folder / "runs" / f"{r['key']}.json").write_text(json.dumps(r))
        np.save(folder / "runs" / f"{r['key']}.ids.npy", cand[:, :K].ravel().astype(np.int32))
    _write_sources(tmp_path / "elsewhere", major.astype(np.uint8), {"train": [0.4, 0.3, 0.3]})
    assert analyze.main([str(folder), "--no-plots", "--sources", str(tmp_path / "elsewhere")]) == 0
    assert "## Chunk sources" in (folder / "summary.md").read_text()
    assert json.loads((folder / "summary.json").read_text())["chunk_sources"]["sources_dir"] == "../elsewhere"


def test_committed_tables_are_consistent() -> None:
    """The committed tables of the real corpus (``benchmarks/quality/results/sources``): complete, shares sum to 1,
    and, where the corpus is present, the counts of its ``manifest.json``."""
    folder = Path(analyze.__file__).parent / "results" / "sources"
    meta = sources.load_sources(folder)
    assert len(meta["packages"]) == 23 and set(meta["splits"]) == set(pycode.SPLITS)
    for split, d in meta["splits"].items():
        a = d["arrays"]
        assert d["validated"] is True
        assert len(a["first_package"]) == len(a["majority_package"]) == len(a["majority_tokens"]) == d["chunks"]
        assert int(a["majority_package"].max()) < 23 and int(a["majority_tokens"].min()) > 1025 // 23
        assert sum(p["token_share"] for p in d["per_package"].values()) == pytest.approx(1.0)
        assert sum(p["majority_chunks"] for p in d["per_package"].values()) == d["chunks"]
        assert d["covered_tokens"] == 1024 * d["chunks"] + 1
    try:
        data = pycode.find_pycode_dir()
    except FileNotFoundError:
        pytest.skip("no pycode corpus here: only the internal consistency was checked")
    m = json.loads((data / "manifest.json").read_text())
    for split, d in meta["splits"].items():
        info = m["splits"][split]
        assert (d["chunks"], d["files"], d["tokens"], d["tokens_dropped_tail"], d["sha256_raw"]) == \
            (info["chunks"], info["files"], info["tokens"], info["tokens_dropped_tail"], info["sha256_raw"])
