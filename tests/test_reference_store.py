"""cggr/reference.py: the stored reference losses (format, lookup by chunk id, batches, bad input)."""
import json
import os

import numpy as np
import pytest

from cggr.reference import FORMAT, load_reference, reference_batches, write_reference


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([40, 3, 17, 8, 25])
    nll = rng.uniform(0, 9, size=(5, 7)).astype(np.float32)
    nll[1, 2] = np.nan          # a token without a reference
    nll[4, :] = np.inf          # a chunk with none
    return write_reference(str(tmp_path / "ref"), ids, nll, meta={"model": "tiny"}), ids, nll


def test_round_trip_by_id(store):
    s, ids, nll = store
    got = s.token_nll_of([17, 3])
    np.testing.assert_array_equal(got, nll[[2, 1]].astype(np.float16).astype(np.float32))
    assert got.dtype == np.float32 and s.seq_len == 7 and s.meta == {"model": "tiny"}
    assert list(s.chunk_ids) == sorted(ids.tolist())


def test_chunk_means_over_finite_tokens(store):
    s, ids, nll = store
    f16 = nll.astype(np.float16).astype(np.float64)
    want3 = np.nanmean(f16[1])  # id 3 has one NaN token
    np.testing.assert_allclose(s.chunk_mean_of([3])[0], want3, rtol=1e-6)
    assert np.isnan(s.chunk_mean_of([25])[0])  # id 25 has no finite token


def test_missing_ids_are_named(store):
    s, _, _ = store
    with pytest.raises(KeyError, match=r"\[99, 1\]"):
        s.token_nll_of([3, 99, 1])


def test_corruption_is_detected(store, tmp_path):
    s, _, _ = store
    path = tmp_path / "ref" / "chunk_mean.npy"
    arr = np.load(path)
    arr[0] += 1
    np.save(path, arr)
    with pytest.raises(ValueError, match="chunk_mean.npy does not match"):
        load_reference(str(tmp_path / "ref"))
    assert load_reference(str(tmp_path / "ref"), verify=False).chunk_mean[0] == arr[0]


def test_manifest(store, tmp_path):
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["num_chunks"] == 5 and manifest["seq_len"] == 7


@pytest.mark.parametrize("layout", ["targets", "labels"])
def test_batches_align_with_the_layout(store, layout):
    s, ids, nll = store
    chunks = np.arange(5 * 8, dtype=np.uint16).reshape(5, 8)
    order = np.array([4, 0, 2, 1, 3])
    batches = list(reference_batches(chunks, ids, s, 2, order=order, layout=layout))
    assert len(batches) == 2  # drop_last
    b = batches[0]
    np.testing.assert_array_equal(b.chunk_ids, ids[[4, 0]])
    assert b.input_ids.dtype == np.int64
    ref = nll[[4, 0]].astype(np.float16).astype(np.float32)
    if layout == "targets":
        np.testing.assert_array_equal(b.input_ids, chunks[[4, 0], :-1])
        np.testing.assert_array_equal(b.labels, chunks[[4, 0], 1:])
        np.testing.assert_array_equal(b.reference_nll, ref)
    else:
        np.testing.assert_array_equal(b.labels, chunks[[4, 0]])
        assert np.isnan(b.reference_nll[:, 0]).all()
        np.testing.assert_array_equal(b.reference_nll[:, 1:], ref)
    np.testing.assert_array_equal(b.chunk_reference, s.chunk_mean_of(ids[[4, 0]]))
    assert len(list(reference_batches(chunks, ids, s, 2, drop_last=False))) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_ids=np.array([1, 1]), token_nll=np.zeros((2, 3))), "^chunk_ids: expected distinct"),
    (dict(chunk_ids=np.array([1.0, 2.0]), token_nll=np.zeros((2, 3))), "^chunk_ids: expected a 1-D integer"),
    (dict(chunk_ids=np.array([1, 2]), token_nll=np.zeros((3, 3))), r"^token_nll: expected a \(2, T\)"),
    (dict(chunk_ids=np.array([1, 2]), token_nll=np.zeros((2, 3), np.int32)), r"^token_nll: expected"),
])
def test_bad_writes(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_reference(str(tmp_path / "bad"), **kwargs)


def test_bad_batches(store, tmp_path):
    s, ids, _ = store
    with pytest.raises(ValueError, match=r"^chunks: expected shape \(n, 8\)"):
        next(reference_batches(np.zeros((5, 7)), ids, s, 2))
    with pytest.raises(ValueError, match="^layout:"):
        next(reference_batches(np.zeros((5, 8)), ids, s, 2, layout="hf"))
    with pytest.raises(ValueError, match="^batch_size:"):
        next(reference_batches(np.zeros((5, 8)), ids, s, 0))
    with pytest.raises(KeyError):
        next(reference_batches(np.zeros((5, 8)), ids + 1000, s, 2))
    with pytest.raises(FileNotFoundError, match="^directory:"):
        load_reference(str(tmp_path / "nowhere"))
