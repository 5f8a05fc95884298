"""GPT2Dataset: index arrays identical to GPT-NeoX's, file naming, caching, sample contents."""
import os

import numpy as np
import pytest

from megatron.data import gpt2_dataset
from megatron.data.gpt2_dataset import (
    GPT2Dataset,
    build_index_arrays,
    index_file_names,
    num_epochs_needed,
    source_record_path,
)
from megatron.data.indexed_dataset import make_dataset
from corpus_utils import write_docs


def write_dataset(prefix, docs, dtype=np.uint16):
    return make_dataset(write_docs(prefix, docs, dtype), "mmap")


def random_docs(rng, n, max_len, vocab=50000, min_len=1):
    return [rng.integers(0, vocab, size=int(rng.integers(min_len, max_len + 1))) for _ in range(n)]


def neox_reference_index(documents, sizes, num_samples, seq_length, seed):
    """GPT-NeoX's _build_index_mappings steps as its Python code does them (mgrid doc_idx, the
    step-by-step sample walk, uint32 shuffle), independent of the code under test."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            break
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:epochs, 0 : len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    n = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros([n + 1, 2], dtype=np.int64)
    pos, offset = 0, 0
    for s in range(1, n + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[doc_idx[pos]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                pos += 1
                offset = 0
        sample_idx[s] = (pos, offset)
    shuffle_idx = np.arange(0, n, 1, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx, epochs


@pytest.mark.parametrize("seed", [1234, 7, 99])
def test_index_arrays_identical_to_gpt_neox(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 120, size=300).astype(np.int32)
    for lo, hi, num_samples, seq_length in [(0, 300, 40, 32), (10, 200, 900, 64), (250, 300, 5000, 16)]:
        documents = np.arange(lo, hi, dtype=np.int32)
        ref = neox_reference_index(documents, sizes, num_samples, seq_length, seed)
        got = build_index_arrays(documents, sizes, num_samples, seq_length, seed)
        assert got[0].dtype == np.int32 and got[1].dtype == np.int32 and got[2].dtype == np.uint32
        for g, r in zip(got, ref[:3]):
            np.testing.assert_array_equal(g, r)
        assert got[0].shape[0] == ref[3] * len(documents)
        assert got[1].shape[0] - 1 >= num_samples


def test_num_epochs_matches_gpt_neox_loop():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tpe, seq, n = int(rng.integers(1, 500)), int(rng.integers(1, 64)), int(rng.integers(0, 3000))
        epochs, total = 0, 0
        while True:
            epochs += 1
            total += tpe
            if (total - 1) // seq >= n:
                break
        assert num_epochs_needed(tpe, seq, n) == epochs
    with pytest.raises(ValueError, match="no tokens"):
        num_epochs_needed(0, 8, 10)


def test_samples_are_the_packed_token_stream(tmp_path):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 40, 90)
    ds = write_dataset(tmp_path / "corpus_text_document", docs)
    documents = np.arange(5, 35, dtype=np.int32)
    g = GPT2Dataset("train", str(tmp_path / "corpus_text_document"), documents, ds, 100, 24, 1234)
    stream = np.concatenate([docs[d] for d in g.doc_idx]).astype(np.int64)
    assert len(g) == g.shuffle_idx.shape[0] - 1  # GPT-NeoX's length quirk
    for k in range(len(g)):
        i = int(g.shuffle_idx[k])
        expected = stream[i * 24 : i * 24 + 25]
        got = g[k]["text"]
        assert got.dtype == np.int64 and got.shape == (25,)
        np.testing.assert_array_equal(got, expected)
    # Past the end wraps modulo the length, as GPT-NeoX does.
    past = g.shuffle_idx.shape[0] + 3
    np.testing.assert_array_equal(g[past]["text"], g[past % len(g)]["text"])


def test_gpt_neox_file_names_and_cache_reuse(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    prefix = str(tmp_path / "pile_text_document")
    ds = write_dataset(prefix, random_docs(rng, 30, 50))
    documents = np.arange(30, dtype=np.int32)
    GPT2Dataset("valid", prefix, documents, ds, 77, 16, 1234)
    expected = {
        f"pile_text_document_valid_indexmap_77ns_16sl_1234s_packedpi_ac_{k}_idx.npy"
        for k in ("doc", "sample", "shuffle")
    } | {"pile_text_document_valid_indexmap_77ns_16sl_1234s_packedpi_ac_source.json"}
    names = set(os.listdir(tmp_path)) - {"pile_text_document.bin", "pile_text_document.idx"}
    assert names == expected  # and no temporary files left behind
    assert set(map(os.path.basename, index_file_names(prefix, "valid", 77, 16, 1234).values())) < expected

    # Second construction reuses the files: building again would fail.
    def no_build(*a, **k):
        raise AssertionError("index rebuilt although cached files exist")

    monkeypatch.setattr(gpt2_dataset, "build_index_arrays", no_build)
    g = GPT2Dataset("valid", prefix, documents, ds, 77, 16, 1234)
    ref = neox_reference_index(documents, ds.sizes, 77, 16, 1234)
    np.testing.assert_array_equal(g.shuffle_idx, ref[2])
    np.testing.assert_array_equal(g.sample_idx, ref[1])
    # A different seed is a different file set, hence a build.
    with pytest.raises(AssertionError, match="rebuilt"):
        GPT2Dataset("valid", prefix, documents, ds, 77, 16, 1235)


def test_stale_or_bad_cache_is_named(tmp_path):
    rng = np.random.default_rng(5)
    prefix = str(tmp_path / "c")
    ds = write_dataset(prefix, random_docs(rng, 20, 40))
    files = index_file_names(prefix, "train", 10, 8, 1)
    GPT2Dataset("train", prefix, np.arange(20, dtype=np.int32), ds, 10, 8, 1)
    np.save(files["shuffle"], np.arange(3, dtype=np.uint32))
    with pytest.raises(ValueError, match="shuffle_idx.npy"):
        GPT2Dataset("train", prefix, np.arange(20, dtype=np.int32), ds, 10, 8, 1)
    # Same name and counts over other documents (GPT-NeoX's names do not encode the range): without our
    # source record (a GPT-NeoX cache) detected and named; with it, rebuilt (test below).
    GPT2Dataset("valid", prefix, np.arange(0, 10, dtype=np.int32), ds, 10, 8, 1)
    os.remove(source_record_path(index_file_names(prefix, "valid", 10, 8, 1)))
    with pytest.raises(ValueError, match=r"valid_indexmap_10ns_8sl_1s_packedpi_ac_doc_idx.npy: holds document ids in \[0, 9\]"):
        GPT2Dataset("valid", prefix, np.arange(10, 20, dtype=np.int32), ds, 10, 8, 1)
    with pytest.raises(ValueError, match=r"document ids must lie in \[0, 20\)"):
        GPT2Dataset("train", prefix, np.arange(15, 25, dtype=np.int32), ds, 10, 8, 1)


def _all_samples(g):
    return [g.get_sample(i) for i in range(g.sample_idx.shape[0] - 1)]


def _no_build(*a, **k):
    raise AssertionError("index rebuilt although the cache matches the data")


def test_cache_of_retokenised_data_is_rebuilt(tmp_path, capsys):
    """prepare_data.py --force with a new vocabulary: same documents, other sizes; the old cache is stale."""
    prefix = str(tmp_path / "c")
    documents = np.arange(40, dtype=np.int32)
    old = write_dataset(prefix, random_docs(np.random.default_rng(7), 40, 30))
    GPT2Dataset("train", prefix, documents, old, 50, 16, 1)
    new = write_dataset(prefix, random_docs(np.random.default_rng(8), 40, 30))
    capsys.readouterr()
    g = GPT2Dataset("train", prefix, documents, new, 50, 16, 1)
    out = capsys.readouterr().out
    assert "c_train_indexmap_50ns_16sl_1s_packedpi_ac_* was built from other data" in out and "c.idx was rewritten" in out
    for got, want in zip((g.doc_idx, g.sample_idx, g.shuffle_idx), build_index_arrays(documents, new.sizes, 50, 16, 1)):
        np.testing.assert_array_equal(got, want)
    assert all(s.shape == (17,) for s in _all_samples(g))


def test_cache_without_source_record_is_used_when_consistent(tmp_path, monkeypatch):
    prefix = str(tmp_path / "c")
    documents = np.arange(40, dtype=np.int32)
    ds = write_dataset(prefix, random_docs(np.random.default_rng(7), 40, 30))
    files = index_file_names(prefix, "train", 50, 16, 1)
    GPT2Dataset("train", prefix, documents, ds, 50, 16, 1)
    os.remove(source_record_path(files))  # now it looks like GPT-NeoX's cache
    monkeypatch.setattr(gpt2_dataset, "build_index_arrays", _no_build)
    GPT2Dataset("train", prefix, documents, ds, 50, 16, 1)
    assert os.path.isfile(source_record_path(files))  # adopted: a later change of the data is recognised
    # Data touched or copied (new mtime and inode, same sizes): still fresh, no rebuild.
    os.utime(prefix + ".idx", ns=(1, 1))
    GPT2Dataset("train", prefix, documents, ds, 50, 16, 1)
    # Re-tokenised data under a cache without the record: GPT-NeoX's cache is not ours to replace; it is
    # named before any sample is read (a bare numpy broadcast error before).
    new = write_dataset(prefix, random_docs(np.random.default_rng(8), 40, 30))
    os.remove(source_record_path(files))
    with pytest.raises(ValueError, match=r"c_train_indexmap_50ns_16sl_1s_packedpi_ac_sample_idx.npy: sample \d+ spans \d+ tokens"):
        GPT2Dataset("train", prefix, documents, new, 50, 16, 1)


def test_sample_of_mismatched_index_is_named(tmp_path):
    prefix = str(tmp_path / "c")
    ds = write_dataset(prefix, random_docs(np.random.default_rng(7), 40, 30))
    g = GPT2Dataset("train", prefix, np.arange(40, dtype=np.int32), ds, 50, 16, 1)
    g.sample_idx = np.array(g.sample_idx)
    g.sample_idx[1, 1] += 3  # sample 0 would be 3 tokens too long
    with pytest.raises(ValueError, match="sample 0 has 20 tokens, expected 17"):
        g.get_sample(0)


def test_int32_token_files_and_large_vocab(tmp_path):
    rng = np.random.default_rng(6)
    docs = random_docs(rng, 15, 60, vocab=200_000)
    ds = write_dataset(tmp_path / "big", docs, dtype=np.int32)
    g = GPT2Dataset("train", str(tmp_path / "big"), np.arange(15, dtype=np.int32), ds, 20, 10, 3)
    stream = np.concatenate([docs[d] for d in g.doc_idx])
    i = int(g.shuffle_idx[0])
    np.testing.assert_array_equal(g[0]["text"], stream[i * 10 : i * 10 + 11])
