"""The C++ index builders against their numpy twins and a literal step-by-step reference."""
import numpy as np
import pytest

from megatron.data import helpers


def reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """GPT-NeoX's walk, one token budget at a time (the slow, obviously-literal version)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    rows = [(0, 0)]
    doc_pos, offset = 0, 0
    while len(rows) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[doc_pos]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc_pos += 1
                offset = 0
        rows.append((doc_pos, offset))
    return np.array(rows, dtype=np.int64)


def reference_blending(weights, size):
    weights = np.asarray(weights, dtype=np.float64)
    current = np.zeros(len(weights), dtype=np.int64)
    index = np.zeros(size, dtype=np.uint8)
    sample = np.zeros(size, dtype=np.int64)
    for k in range(size):
        errors = weights * max(float(k), 1.0) - current
        best = int(np.argmax(errors))  # argmax returns the first maximum, as the strict '>' scan does
        index[k], sample[k] = best, current[best]
        current[best] += 1
    return index, sample


@pytest.fixture(scope="module")
def cpp():
    return helpers.compile_cpp_helpers()


def _case(rng, n_docs, max_size, epochs, zero_frac=0.0):
    sizes = rng.integers(1, max_size + 1, size=n_docs).astype(np.int32)
    if zero_frac:
        sizes[rng.random(n_docs) < zero_frac] = 0
        sizes[rng.integers(n_docs)] = max(1, max_size)  # at least one token
    doc_idx = np.tile(np.arange(n_docs, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return sizes, doc_idx, int(sizes.sum())


@pytest.mark.parametrize("seed", range(6))
def test_sample_idx_cpp_numpy_reference_identical(cpp, seed):
    rng = np.random.default_rng(seed)
    for n_docs, max_size, epochs, seq_length, zero_frac in [
        (50, 40, 3, 16, 0.0),       # many docs per sample
        (30, 500, 2, 8, 0.0),       # many samples per doc
        (80, 20, 5, 1, 0.0),        # seq_length 1
        (60, 30, 2, 32, 0.3),       # empty documents in the stream
        (1, 1000, 4, 10, 0.0),      # a single document
        (25, 7, 3, 7, 0.0),         # sample length close to document length
    ]:
        sizes, doc_idx, tpe = _case(rng, n_docs, max_size, epochs, zero_frac)
        ref = reference_sample_idx(sizes, doc_idx, seq_length, epochs, tpe)
        got_cpp = helpers.build_sample_idx(sizes, doc_idx, seq_length, epochs, tpe, impl="cpp")
        got_np = helpers.build_sample_idx(sizes, doc_idx, seq_length, epochs, tpe, impl="numpy")
        assert got_cpp.dtype == got_np.dtype == np.int32
        np.testing.assert_array_equal(got_cpp, ref)
        np.testing.assert_array_equal(got_np, ref)


def test_sample_idx_exact_document_boundaries_and_empty_first_doc(cpp):
    # Every document exactly seq_length + 1 tokens: samples end on a document's last token.
    sizes = np.full(10, 9, dtype=np.int32)
    doc_idx = np.arange(10, dtype=np.int32)
    ref = reference_sample_idx(sizes, doc_idx, 8, 1, 90)
    for impl in ("cpp", "numpy"):
        np.testing.assert_array_equal(helpers.build_sample_idx(sizes, doc_idx, 8, 1, 90, impl=impl), ref)
    # First document in the stream is empty: row 0 still points at it, offset 0.
    sizes = np.array([0, 5, 0, 7, 3], dtype=np.int32)
    doc_idx = np.array([0, 2, 1, 3, 4], dtype=np.int32)
    ref = reference_sample_idx(sizes, doc_idx, 4, 1, 15)
    assert tuple(ref[0]) == (0, 0) and tuple(ref[1]) == (2, 4)
    for impl in ("cpp", "numpy"):
        np.testing.assert_array_equal(helpers.build_sample_idx(sizes, doc_idx, 4, 1, 15, impl=impl), ref)


def test_sample_idx_int64_variant_matches(cpp):
    rng = np.random.default_rng(7)
    sizes, doc_idx, tpe = _case(rng, 40, 60, 3, 0.1)
    a = cpp.build_sample_idx_int64(sizes, doc_idx, 12, 3, tpe)
    b = cpp.build_sample_idx_int32(sizes, doc_idx, 12, 3, tpe)
    assert a.dtype == np.int64 and b.dtype == np.int32
    np.testing.assert_array_equal(a, b)


def test_sample_idx_dtype_threshold():
    # GPT-NeoX: int32 while 2 * ((epochs * tokens - 1) / seq_length + 1) < 2**31 - 1 (float division).
    limit = np.iinfo(np.int32).max
    assert helpers.sample_idx_dtype(1, 1000, 10) == np.int32
    n = limit // 2  # seq_length 1: num_samples + 1 = tokens, and 2 * n = limit - 1 < limit
    assert helpers.sample_idx_dtype(1, n, 1) == np.int32
    assert helpers.sample_idx_dtype(1, n + 1, 1) == np.int64


def test_sample_idx_rejects_bad_inputs(cpp):
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="doc_idx must be a 1-D int32"):
        helpers.build_sample_idx(sizes, np.array([0, 1], dtype=np.int64), 4, 1, 10)
    with pytest.raises(ValueError, match="sizes must be a 1-D int32"):
        helpers.build_sample_idx(sizes.astype(np.int64), np.array([0, 1], dtype=np.int32), 4, 1, 10)
    # tokens_per_epoch larger than the stream holds: both implementations stop with a message.
    for impl in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="tokens_per_epoch does not match"):
            helpers.build_sample_idx(sizes, np.array([0, 1], dtype=np.int32), 4, 1, 50, impl=impl)


@pytest.mark.parametrize("seed", range(4))
def test_blending_cpp_numpy_reference_identical(cpp, seed):
    rng = np.random.default_rng(100 + seed)
    for n in (1, 2, 3, 7):
        w = rng.random(n) + 0.01
        w /= w.sum()
        size = int(rng.integers(1, 3000))
        ref = reference_blending(w, size)
        for impl in ("cpp", "numpy"):
            got = helpers.build_blending_indices(w, size, impl=impl)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
    # Ties (equal weights) go to the lowest index, in every implementation.
    got = helpers.build_blending_indices(np.full(3, 1 / 3), 6, impl="cpp")
    np.testing.assert_array_equal(got[0], [0, 1, 2, 0, 1, 2])


def test_fallback_to_numpy_when_compiler_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(helpers, "_cpp_module", None)
    monkeypatch.setattr(helpers, "_cpp_failed", None)
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        helpers.compile_cpp_helpers()
    with pytest.warns(RuntimeWarning, match="numpy twin"):
        assert helpers.get_cpp_helpers() is None
    sizes = np.array([3, 4, 5], dtype=np.int32)
    doc_idx = np.array([2, 0, 1], dtype=np.int32)
    np.testing.assert_array_equal(
        helpers.build_sample_idx(sizes, doc_idx, 3, 1, 12), reference_sample_idx(sizes, doc_idx, 3, 1, 12)
    )
