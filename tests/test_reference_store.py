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


# ---------------------------------------------------------------------------------------------------------------
# the helpers both toolkits share (cggr_torch.reference, cggr_jax.reference)
# ---------------------------------------------------------------------------------------------------------------

from cggr.reference import (MissingChunkIds, check_chunks, check_training_args, chunks_sha256,  # noqa: E402
                            json_safe, training_order, warmup_cosine_lr)


def test_missing_ids_are_a_value_error_naming_the_argument(store):
    s, ids, _ = store
    with pytest.raises(ValueError, match=r"^ids: chunk ids not in the reference store: \[99\] \(1 missing\)"):
        s.rows([3, 99])
    with pytest.raises(MissingChunkIds, match=r"^chunk_ids: .*\[1003, 1017, 1008\] \(3 missing\)") as e:
        reference_batches(np.zeros((5, 8), np.int64), np.where(ids < 20, ids + 1000, ids), s, 2)  # checked eagerly
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)


def test_bad_order(store):
    s, ids, _ = store
    chunks = np.zeros((5, 8), np.int64)
    for order, match in [([0, 5], r"^order: positions must lie in \[0, 5\)"), ([-1], "^order: positions"),
                         ([[0, 1]], "^order: expected a 1-D integer"), ([0.0, 1.0], "^order: expected a 1-D")]:
        with pytest.raises(ValueError, match=match):
            reference_batches(chunks, ids, s, 1, order=order)
    with pytest.raises(ValueError, match="^chunks: expected integer"):
        reference_batches(chunks.astype(np.float32), ids, s, 1)
    with pytest.raises(ValueError, match="^chunk_ids: expected integer"):
        reference_batches(chunks, ids.astype(np.float64), s, 1)
    assert [b.chunk_ids.tolist() for b in reference_batches(chunks, ids, s, 1, order=[])] == []


def test_float16_overflow_is_stored_as_inf(tmp_path, recwarn):
    s = write_reference(str(tmp_path / "big"), [0], np.array([[1.0, 7e4, -7e4]], np.float32))
    got = s.token_nll_of([0])[0]
    assert got[0] == 1.0 and np.isposinf(got[1]) and np.isneginf(got[2]) and s.chunk_mean_of([0])[0] == 1.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_check_chunks():
    chunks, ids = check_chunks(np.arange(12, dtype=np.uint16).reshape(3, 4), [7, 1, 4], vocab_size=12)
    assert chunks.dtype == np.uint16 and ids.dtype == np.int64 and ids.tolist() == [7, 1, 4]
    assert check_chunks(np.zeros((0, 3), np.int32), np.zeros(0))[1].shape == (0,)  # empty is legal
    for args, kwargs, match in [
        ((np.zeros(4, np.int64),), {}, r"^chunks: expected a 2-D array"),
        ((np.zeros((3, 1), np.int64),), {}, r"^chunks: expected a 2-D array .* T \+ 1 >= 2"),
        ((np.zeros((3, 4)),), {}, "^chunks: expected integer"),
        ((np.full((3, 4), 12),), dict(vocab_size=12), r"^chunks: token ids must lie in \[0, 12\) .*, got \[12, 12\]"),
        ((np.full((3, 4), -1),), dict(vocab_size=12), r"^chunks: token ids must lie"),
        ((np.zeros((3, 4), np.int64), [1, 2]), {}, r"^chunk_ids: expected a \(3,\) integer array"),
        ((np.zeros((3, 4), np.int64), [1.0, 2.0, 3.0]), {}, r"^chunk_ids: expected a \(3,\) integer array"),
        ((np.zeros((3, 4), np.int64), [1, 2, 1]), {}, "^chunk_ids: expected distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_chunks(*args, **kwargs)


def test_chunks_sha256_identifies_the_data():
    rng = np.random.default_rng(0)
    chunks, ids = rng.integers(0, 300, (5, 6)).astype(np.uint16), np.arange(5)
    h = chunks_sha256(chunks, ids)
    assert h == chunks_sha256(chunks.astype(np.int32), ids.astype(np.int32)) == \
        chunks_sha256(chunks, ids, rows_per_block=2)          # dtype- and block-independent
    other = chunks.copy()
    other[4, 5] += 1
    assert len({h, chunks_sha256(other, ids), chunks_sha256(chunks, ids + 1),
                chunks_sha256(chunks.reshape(6, 5), np.arange(6))}) == 4


def test_json_safe():
    out = json_safe({"a": np.float32(1.5), "b": (1, np.int64(2)), "c": np.dtype("float16"), "d": np.float32,
                     "e": float("inf"), 3: np.arange(2), "f": object})
    assert out == {"a": 1.5, "b": [1, 2], "c": "float16", "d": "float32", "e": "inf", "3": [0, 1],
                   "f": "<class 'object'>"}
    json.dumps(out)


def test_warmup_cosine_lr():
    lr = warmup_cosine_lr(8, lr=1.0, warmup_steps=3, min_lr_ratio=0.1)
    want = [1 / 3, 2 / 3, 1.0] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)) for p in np.arange(5) / 4]
    np.testing.assert_allclose(lr, want, rtol=1e-12)
    assert lr[-1] == pytest.approx(0.1) and lr.max() == 1.0
    np.testing.assert_allclose(warmup_cosine_lr(3, lr=2.0, warmup_steps=0, min_lr_ratio=0.5), [2.0, 1.5, 1.0])
    np.testing.assert_allclose(warmup_cosine_lr(1, lr=2.0, warmup_steps=0, min_lr_ratio=0.5), [2.0])
    np.testing.assert_allclose(warmup_cosine_lr(2, lr=1.0, warmup_steps=4, min_lr_ratio=0.0), [0.25, 0.5])


def test_training_order():
    o = training_order(5, 4, 3, seed=1)
    assert o.shape == (4, 3) and o.dtype == np.int64
    flat = o.reshape(-1)
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epochs are permutations
    np.testing.assert_array_equal(o, training_order(5, 4, 3, seed=1))
    assert not np.array_equal(o, training_order(5, 4, 3, seed=2))
    with pytest.raises(ValueError, match="^chunks: expected at least one chunk"):
        training_order(0, 1, 1, seed=0)


@pytest.mark.parametrize("override, match", [
    (dict(steps=0), "^steps:"), (dict(steps=2.0), "^steps:"), (dict(batch_size=True), "^batch_size:"),
    (dict(lr=0.0), "^lr:"), (dict(lr=float("inf")), "^lr:"), (dict(warmup_steps=-1), "^warmup_steps:"),
    (dict(min_lr_ratio=1.5), "^min_lr_ratio:"), (dict(weight_decay=-0.1), "^weight_decay:"),
    (dict(grad_clip=0), "^grad_clip:"), (dict(seed=-1), "^seed:"),
])
def test_check_training_args(override, match):
    args = dict(steps=10, batch_size=2, lr=1e-3, warmup_steps=None, min_lr_ratio=0.1, weight_decay=0.1,
                grad_clip=1.0, seed=0)
    assert check_training_args(**args) == dict(args, warmup_steps=1)
    assert check_training_args(**dict(args, grad_clip=None))["grad_clip"] is None
    with pytest.raises(ValueError, match=match):
        check_training_args(**dict(args, **override))
