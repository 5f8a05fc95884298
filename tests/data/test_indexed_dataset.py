"""mmap indexed dataset: byte layout, round trips, merge, and every bad input."""
import os
import pickle
import struct

import numpy as np
import pytest

from megatron.data import indexed_dataset as idx
from megatron.data.indexed_dataset import IndexedDatasetError

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}


def _build(prefix, seqs_per_doc, dtype):
    with idx.make_builder(prefix + ".bin", dtype=dtype) as b:
        for doc in seqs_per_doc:
            for s in doc:
                b.add_item(np.asarray(s))
            b.end_document()
        b.finalize(prefix + ".idx")


def _random_docs(rng, dtype, n_docs=7):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(0, 50))
            if info is not None:
                doc.append(rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype))
            else:
                doc.append(rng.standard_normal(n).astype(dtype))
        docs.append(doc)
    return docs


def test_hand_built_index_reads_back(tmp_path):
    # Build both files by hand from the documented layout, independent of our writer.
    seqs = [np.array([5, 6, 7], np.uint16), np.array([], np.uint16), np.array([65535, 1], np.uint16)]
    sizes = [3, 0, 2]
    pointers = [0, 6, 6]
    doc_idx = [0, 2, 3]
    prefix = str(tmp_path / "hand")
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(s.tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 8))
        f.write(struct.pack("<Q", 3))
        f.write(struct.pack("<Q", 3))
        f.write(struct.pack("<3i", *sizes))
        f.write(struct.pack("<3q", *pointers))
        f.write(struct.pack("<3q", *doc_idx))
    ds = idx.make_dataset(prefix)
    assert len(ds) == 3 and ds.dtype == np.uint16
    assert ds.sizes.tolist() == sizes and ds.doc_idx.tolist() == doc_idx and ds.pointers.tolist() == pointers
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(ds.get(2, 1), [1])
    np.testing.assert_array_equal(ds.get(0, 1, 1), [6])


def test_our_index_parsed_field_by_field(tmp_path):
    prefix = str(tmp_path / "ours")
    _build(prefix, [[[1, 2, 3], [4]], [[5, 6]]], np.int32)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9)[0] == 1
    assert raw[17] == 4  # int32
    n, d = struct.unpack_from("<QQ", raw, 18)
    assert (n, d) == (3, 3)
    off = 34
    assert list(struct.unpack_from("<3i", raw, off)) == [3, 1, 2]
    assert list(struct.unpack_from("<3q", raw, off + 12)) == [0, 12, 16]
    assert list(struct.unpack_from("<3q", raw, off + 36)) == [0, 2, 3]
    assert len(raw) == off + 12 + 24 + 24
    assert np.frombuffer(open(prefix + ".bin", "rb").read(), np.int32).tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("code", sorted(CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = CODES[code]
    rng = np.random.default_rng(code)
    docs = _random_docs(rng, dtype)
    prefix = str(tmp_path / f"rt{code}")
    _build(prefix, docs, dtype)
    assert open(prefix + ".idx", "rb").read()[17] == code
    ds = idx.make_dataset(prefix)
    flat = [s for d in docs for s in d]
    assert len(ds) == len(flat) and ds.dtype == dtype
    expect_doc_idx = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    np.testing.assert_array_equal(ds.doc_idx, expect_doc_idx)
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(ds[i], s)
        if len(s) >= 3:
            np.testing.assert_array_equal(ds.get(i, 1, len(s) - 2), s[1:-1])
    for got, want in zip(ds[1:4], flat[1:4]):
        np.testing.assert_array_equal(got, want)


def test_get_returns_a_view_not_a_copy(tmp_path):
    prefix = str(tmp_path / "view")
    _build(prefix, [[np.arange(10_000)]], np.uint16)
    ds = idx.make_dataset(prefix)
    part = ds.get(0, 100, 5)
    assert part.tolist() == [100, 101, 102, 103, 104]
    assert not part.flags.owndata and not part.flags.writeable
    with pytest.raises(IndexError, match="outside sequence 0"):
        ds.get(0, 9_998, 5)
    with pytest.raises(IndexError, match="out of range"):
        ds[1]


def test_pickles_by_path(tmp_path):
    prefix = str(tmp_path / "pk")
    _build(prefix, [[[1, 2]], [[3]]], np.uint16)
    ds = pickle.loads(pickle.dumps(idx.make_dataset(prefix)))
    assert ds[1].tolist() == [3] and len(pickle.dumps(ds)) < 500


def test_merge(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
    docs_a = [[[1, 2], [3]], [[4]]]
    docs_b = [[[5, 6, 7]], [[8], [9, 10]]]
    _build(a, docs_a, np.uint16)
    _build(b, docs_b, np.uint16)
    with idx.make_builder(out + ".bin", dtype=np.uint16) as builder:
        builder.add_item(np.array([42]))
        builder.end_document()
        builder.merge_file_(a)
        builder.merge_file_(b)
        builder.finalize(out + ".idx")
    ds = idx.make_dataset(out)
    assert [ds[i].tolist() for i in range(len(ds))] == [[42], [1, 2], [3], [4], [5, 6, 7], [8], [9, 10]]
    assert ds.doc_idx.tolist() == [0, 1, 3, 4, 5, 7]
    c = str(tmp_path / "c")
    _build(c, [[[1]]], np.int32)
    with idx.make_builder(str(tmp_path / "x.bin"), dtype=np.uint16) as builder:
        with pytest.raises(IndexedDatasetError, match="dtype is int32"):
            builder.merge_file_(c)


def test_best_fitting_dtype():
    assert idx.best_fitting_dtype(50277) == np.uint16
    assert idx.best_fitting_dtype(65499) == np.uint16
    assert idx.best_fitting_dtype(65500) == np.int32
    assert idx.best_fitting_dtype(None) == np.int32


# ---- bad inputs ---------------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    _build(prefix, [[[1, 2, 3]], [[4, 5]]], np.uint16)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_bin(good):
    os.truncate(good + ".bin", 8)
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*data file truncated"):
        idx.make_dataset(good)


def test_too_long_bin(good):
    with open(good + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match="data file too long"):
        idx.make_dataset(good)


def test_truncated_idx(good):
    os.truncate(good + ".idx", os.path.getsize(good + ".idx") - 3)
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated"):
        idx.make_dataset(good)
    os.truncate(good + ".idx", 10)
    with pytest.raises(IndexedDatasetError, match="header alone"):
        idx.make_dataset(good)


def test_mismatched_pair(tmp_path, good):
    other = str(tmp_path / "other")
    _build(other, [[[1, 2]], [[3, 4, 5]]], np.uint16)  # same total length, different split
    os.replace(other + ".idx", good + ".idx")
    os.replace(other + ".bin", good + ".bin")
    _build(other, [[[1, 2, 3, 4, 5, 6, 7]]], np.uint16)
    os.replace(other + ".bin", good + ".bin")  # .idx says 5 tokens, .bin has 7
    with pytest.raises(IndexedDatasetError, match=r"good\.bin is 14 bytes.*sequences end at byte 10"):
        idx.make_dataset(good)


def test_inconsistent_pointers(good):
    _patch(good + ".idx", 34 + 2 * 4 + 8, struct.pack("<q", 4))  # second pointer 6 -> 4
    with pytest.raises(IndexedDatasetError, match="pointer of sequence 1 is 4"):
        idx.make_dataset(good)


def test_unknown_dtype_code(good):
    _patch(good + ".idx", 17, bytes([9]))
    with pytest.raises(IndexedDatasetError, match=r"good\.idx has unknown dtype code 9"):
        idx.make_dataset(good)


def test_bad_magic_and_version(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="version 2"):
        idx.make_dataset(good)
    _patch(good + ".idx", 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(IndexedDatasetError, match="magic"):
        idx.make_dataset(good)


def test_missing_files(tmp_path, good):
    os.remove(good + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"missing .*good\.bin"):
        idx.make_dataset(good)
    with pytest.raises(IndexedDatasetError, match="impl 'lazy'"):
        idx.make_dataset(good, impl="lazy")


def test_document_longer_than_int32(tmp_path):
    huge = np.broadcast_to(np.zeros(1, np.uint8), (2**31,))  # 2 GiB of tokens without allocating them
    with idx.make_builder(str(tmp_path / "h.bin"), dtype=np.uint8) as b:
        with pytest.raises(IndexedDatasetError, match=r"h\.bin.*int32 size field"):
            b.add_item(huge)


def test_values_that_do_not_fit_dtype(tmp_path):
    with idx.make_builder(str(tmp_path / "v.bin"), dtype=np.uint16) as b:
        with pytest.raises(IndexedDatasetError, match="do not fit uint16"):
            b.add_item(np.array([70000]))


def test_failed_build_leaves_no_output(tmp_path):
    prefix = str(tmp_path / "fail")
    with pytest.raises(RuntimeError):
        with idx.make_builder(prefix + ".bin", dtype=np.uint16) as b:
            b.add_item(np.array([1, 2]))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_empty_dataset_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    _build(prefix, [], np.uint16)
    ds = idx.make_dataset(prefix)
    assert len(ds) == 0 and ds.doc_idx.tolist() == [0]
