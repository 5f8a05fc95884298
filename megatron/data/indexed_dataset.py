"""Megatron / GPT-NeoX memory-mapped indexed dataset (``.bin`` + ``.idx``), byte-compatible.

Layout of ``<prefix>.idx`` (all little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64, 8 uint16)
    uint64    number of sequences N
    uint64    number of doc_idx entries D
    int32[N]  sizes      (tokens per sequence)
    int64[N]  pointers   (byte offset of each sequence in the .bin)
    int64[D]  doc_idx    (index of the first sequence of each document; the last entry is N)

``<prefix>.bin`` holds the tokens of all sequences back to back, in the dtype above.

The reader memory-maps both files and hands out numpy views; nothing is copied until the caller
copies. Every inconsistency found on open is an error that names the file and what disagrees, because a
silently misread corpus wastes a whole training run.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable

import numpy as np

_HDR_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# Fixed header: magic, version, dtype code, number of sequences, number of doc_idx entries.
_HEADER = struct.Struct("<9sQBQQ")
_INT32_MAX = np.iinfo(np.int32).max

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, malformed, or inconsistent."""


def code(dtype) -> int:
    """The on-disk dtype code of a numpy dtype (error for dtypes the format cannot store)."""
    dt = np.dtype(dtype)
    for k, v in DTYPES.items():
        if np.dtype(v) == dt:
            return k
    raise IndexedDatasetError(f"dtype {dt} cannot be stored in an mmap indexed dataset; use one of "
                              f"{sorted(np.dtype(v).name for v in DTYPES.values())}")


def index_file_path(prefix_path: str) -> str:
    return prefix_path + ".idx"


def data_file_path(prefix_path: str) -> str:
    return prefix_path + ".bin"


def best_fitting_dtype(vocab_size: int | None = None):
    """uint16 when every token id fits (GPT-NeoX's threshold 65,500), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def _tmp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def write_index(path: str, dtype, sizes: np.ndarray, doc_idx: np.ndarray, before_rename=None) -> None:
    """Write an ``.idx`` file for sequences of ``sizes`` tokens (pointers are derived) at ``path``.

    The file is written under a temporary name and renamed, so ``path`` never holds a partial index;
    ``before_rename()`` runs once the temporary index is complete (the builder renames its ``.bin`` there,
    so a failure while writing the index leaves neither final file replaced).
    """
    sizes = np.asarray(sizes)
    if sizes.size and (sizes.min() < 0 or sizes.max() > _INT32_MAX):
        raise IndexedDatasetError(f"{path}: sequence sizes must lie in [0, {_INT32_MAX}] (int32 field); "
                                  f"got min {sizes.min()} max {sizes.max()}")
    sizes32 = sizes.astype(np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes32), dtype=np.int64)
    if len(sizes32) > 1:
        np.cumsum(sizes32[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_HDR_MAGIC, _VERSION, code(dtype), len(sizes32), len(doc_idx)))
            f.write(sizes32.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_chunked(n: int, check, chunk: int = 1 << 24) -> int | None:
    """Run ``check(lo, hi) -> first bad index or None`` over [0, n) in chunks (bounded memory)."""
    for lo in range(0, n, chunk):
        bad = check(lo, min(n, lo + chunk))
        if bad is not None:
            return bad
    return None


class MMapIndex:
    """The parsed, validated ``.idx`` file: ``dtype``, ``sizes``, ``pointers``, ``doc_idx`` (numpy views)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise IndexedDatasetError(f"index file {path} does not exist")
        file_len = os.path.getsize(path)
        if file_len < _HEADER.size:
            raise IndexedDatasetError(f"index file {path} is truncated: {file_len} bytes, the header alone "
                                      f"needs {_HEADER.size}")
        with open(path, "rb") as f:
            magic, version, dtype_code, n, d = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _HDR_MAGIC:
            raise IndexedDatasetError(f"index file {path} does not start with the mmap magic {_HDR_MAGIC!r} "
                                      f"(found {magic!r}); is it an mmap .idx file?")
        if version != _VERSION:
            raise IndexedDatasetError(f"index file {path} has version {version}; only version {_VERSION} is known")
        if dtype_code not in DTYPES:
            raise IndexedDatasetError(f"index file {path} has unknown dtype code {dtype_code}; "
                                      f"known codes {sorted(DTYPES)}")
        expected = _HEADER.size + n * 4 + n * 8 + d * 8
        if file_len != expected:
            raise IndexedDatasetError(
                f"index file {path} is {file_len} bytes but its header ({n} sequences, {d} doc_idx entries) "
                f"implies {expected} bytes ({'truncated' if file_len < expected else 'trailing bytes'})")
        self.dtype = DTYPES[dtype_code]
        self.dtype_code = dtype_code
        self._len = n
        self._doc_count = d
        if file_len > 0 and n + d > 0:
            self._mmap = np.memmap(path, mode="r", order="C")
            buf = memoryview(self._mmap)
        else:
            self._mmap = None
            buf = b""
        off = _HEADER.size
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=off) if n else np.zeros(0, np.int32)
        off += n * 4
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=off) if n else np.zeros(0, np.int64)
        off += n * 8
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=d, offset=off) if d else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self._len

    def validate_against(self, bin_path: str) -> None:
        """Check sizes, pointers and doc_idx against each other and the ``.bin`` length."""
        if not os.path.isfile(bin_path):
            raise IndexedDatasetError(f"data file {bin_path} does not exist (index {self.path} does)")
        bin_len = os.path.getsize(bin_path)
        itemsize = np.dtype(self.dtype).itemsize
        n, sizes, pointers, doc_idx = self._len, self.sizes, self.pointers, self.doc_idx
        if bin_len % itemsize:
            raise IndexedDatasetError(f"data file {bin_path} is {bin_len} bytes, not a multiple of the "
                                      f"{np.dtype(self.dtype).name} item size {itemsize} from {self.path}")
        if n == 0:
            if bin_len != 0:
                raise IndexedDatasetError(f"index {self.path} lists no sequences but {bin_path} holds {bin_len} bytes")
        else:
            bad = _check_chunked(n, lambda lo, hi: _first_true(sizes[lo:hi] < 0, lo))
            if bad is not None:
                raise IndexedDatasetError(f"index {self.path}: sequence {bad} has negative size {sizes[bad]}")
            if pointers[0] != 0:
                raise IndexedDatasetError(f"index {self.path}: first pointer is {pointers[0]}, expected 0")

            def contiguous(lo, hi):
                lo = max(lo, 1)
                if lo >= hi:
                    return None
                want = pointers[lo - 1:hi - 1] + sizes[lo - 1:hi - 1].astype(np.int64) * itemsize
                return _first_true(pointers[lo:hi] != want, lo)

            bad = _check_chunked(n, contiguous)
            if bad is not None:
                raise IndexedDatasetError(
                    f"index {self.path}: pointer of sequence {bad} is {pointers[bad]} but the previous sequence "
                    f"ends at byte {pointers[bad - 1] + int(sizes[bad - 1]) * itemsize}")
            end = int(pointers[-1]) + int(sizes[-1]) * itemsize
            if end != bin_len:
                raise IndexedDatasetError(
                    f"data file {bin_path} is {bin_len} bytes but index {self.path} says its sequences end at "
                    f"byte {end} ({'data file truncated' if bin_len < end else 'data file too long'}; "
                    f"mismatched .bin/.idx pair?)")
        if len(doc_idx):
            if doc_idx[0] < 0 or doc_idx[-1] > n:
                raise IndexedDatasetError(f"index {self.path}: doc_idx runs from {doc_idx[0]} to {doc_idx[-1]}, "
                                          f"outside [0, {n}]")
            bad = _check_chunked(len(doc_idx) - 1,
                                 lambda lo, hi: _first_true(doc_idx[lo + 1:hi + 1] < doc_idx[lo:hi], lo + 1))
            if bad is not None:
                raise IndexedDatasetError(f"index {self.path}: doc_idx decreases at entry {bad}")


def _first_true(mask: np.ndarray, base: int) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) + base if hits.size else None


class MMapIndexedDataset:
    """Read-only view of ``<prefix>.bin`` / ``<prefix>.idx``.

    ``ds[i]`` is sequence ``i`` as a numpy view; ``ds.get(i, offset, length)`` is a slice of it (no copy of
    the whole sequence); ``ds.sizes`` / ``ds.doc_idx`` are the index arrays. Pickles by path so
    DataLoader workers reopen the maps instead of copying them.
    """

    def __init__(self, path: str, skip_warmup: bool = True):
        self._path = path
        self._do_init(path, skip_warmup)

    def _do_init(self, path: str, skip_warmup: bool) -> None:
        self._index = MMapIndex(index_file_path(path))
        bin_path = data_file_path(path)
        self._index.validate_against(bin_path)
        if not skip_warmup:
            # Read the index once so first random accesses do not page-fault (the .bin can be TBs: left cold).
            _ = int(self._index.sizes.sum()) + int(self._index.pointers[-1:].sum())
        if os.path.getsize(bin_path) > 0:
            self._bin_mmap = np.memmap(bin_path, mode="r", order="C")
            self._bin_buffer = memoryview(self._bin_mmap)
        else:
            self._bin_mmap = None
            self._bin_buffer = memoryview(b"")
        self._dtype = self._index.dtype
        self._itemsize = np.dtype(self._dtype).itemsize

    def __getstate__(self):
        return self._path

    def __setstate__(self, state):
        self._path = state
        self._do_init(state, skip_warmup=True)

    def __len__(self) -> int:
        return len(self._index)

    def _check_idx(self, idx: int) -> int:
        n = len(self._index)
        if not -n <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {self._path} ({n} sequences)")
        return idx + n if idx < 0 else idx

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            idx = self._check_idx(int(idx))
            return np.frombuffer(self._bin_buffer, dtype=self._dtype, count=int(self._index.sizes[idx]),
                                 offset=int(self._index.pointers[idx]))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise IndexError(f"slices of {self._path} must be contiguous (step 1), got step {step}")
            if stop <= start:
                return []
            sizes = self._index.sizes[start:stop]
            total = int(sizes.sum(dtype=np.int64))
            flat = np.frombuffer(self._bin_buffer, dtype=self._dtype, count=total,
                                 offset=int(self._index.pointers[start]))
            return np.split(flat, np.cumsum(sizes[:-1], dtype=np.int64))
        raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        idx = self._check_idx(int(idx))
        size = int(self._index.sizes[idx])
        offset = int(offset)
        if length is None:
            length = size - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"get({idx}, offset={offset}, length={length}) is outside sequence {idx} of "
                             f"{self._path}, which has {size} tokens")
        return np.frombuffer(self._bin_buffer, dtype=self._dtype, count=length,
                             offset=int(self._index.pointers[idx]) + offset * self._itemsize)

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def doc_idx(self) -> np.ndarray:
        return self._index.doc_idx

    @property
    def pointers(self) -> np.ndarray:
        return self._index.pointers

    @property
    def dtype(self):
        return self._dtype

    @property
    def supports_prefetch(self) -> bool:
        return False

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(index_file_path(path)) and os.path.exists(data_file_path(path))


class MMapIndexedDatasetBuilder:
    """Appends sequences to a new ``.bin`` and writes the matching ``.idx`` on :meth:`finalize`.

    The ``.bin`` is written under a temporary name and both files get their final names only in
    ``finalize`` (``.bin`` first, then ``.idx``), so an interrupted build leaves no usable-looking pair.
    Use as a context manager, or call :meth:`abort`, to remove the temporary file on failure.
    """

    def __init__(self, out_file: str, dtype=np.int64):
        code(dtype)  # rejects dtypes the format cannot store
        self._out_file = out_file
        self._tmp_file = _tmp_name(out_file)
        self._data_file = open(self._tmp_file, "wb")
        self._dtype = np.dtype(dtype)
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._finalized = False

    @property
    def dtype(self) -> np.dtype:
        """The token dtype written; GPT-NeoX's tools/datasets/preprocess_data.py builds each document's array
        with ``np.array(ids, dtype=builder.dtype)``."""
        return self._dtype

    def add_item(self, tensor) -> None:
        """Append one sequence (numpy array, list of ints, or CPU torch tensor)."""
        arr = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size > _INT32_MAX:
            raise IndexedDatasetError(f"{self._out_file}: a sequence of {arr.size} tokens does not fit the int32 "
                                      f"size field (max {_INT32_MAX}); split the document")
        if arr.dtype != self._dtype:
            if arr.size and np.issubdtype(self._dtype, np.integer):
                info = np.iinfo(self._dtype)
                lo, hi = arr.min(), arr.max()
                if lo < info.min or hi > info.max:
                    raise IndexedDatasetError(f"{self._out_file}: token values [{lo}, {hi}] do not fit "
                                              f"{self._dtype.name}")
            arr = arr.astype(self._dtype)
        self._data_file.write(arr.tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def add_items(self, arrays: Iterable) -> None:
        for a in arrays:
            self.add_item(a)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append every sequence and document of the dataset at prefix ``another_file``."""
        index = MMapIndex(index_file_path(another_file))
        index.validate_against(data_file_path(another_file))
        if np.dtype(index.dtype) != self._dtype:
            raise IndexedDatasetError(f"cannot merge {another_file}: its dtype is {np.dtype(index.dtype).name}, "
                                      f"this builder writes {self._dtype.name}")
        offset = len(self._sizes)
        self._sizes.extend(index.sizes.tolist())
        doc_idx = index.doc_idx
        # The other file's doc_idx starts at 0 (already our current end); its later entries shift by offset.
        start = 1 if len(doc_idx) and doc_idx[0] == 0 else 0
        self._doc_idx.extend((doc_idx[start:] + offset).tolist())
        with open(data_file_path(another_file), "rb") as f:
            shutil.copyfileobj(f, self._data_file, 16 << 20)

    def finalize(self, index_file: str) -> None:
        """Close the data file, write the index, and give both their final names."""
        if self._finalized:
            raise IndexedDatasetError(f"{self._out_file}: finalize called twice")
        self._data_file.close()
        try:
            sizes = np.asarray(self._sizes, dtype=np.int64)
            write_index(index_file, self._dtype, sizes, np.asarray(self._doc_idx, dtype=np.int64),
                        before_rename=lambda: os.replace(self._tmp_file, self._out_file))
        except BaseException:
            self.abort()
            raise
        self._finalized = True

    def abort(self) -> None:
        """Close and delete the temporary data file (nothing under the final names is touched)."""
        if not self._data_file.closed:
            self._data_file.close()
        if os.path.exists(self._tmp_file):
            os.remove(self._tmp_file)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._finalized:
            self.abort()
        return False


def _check_impl(impl: str) -> None:
    if impl not in ("mmap", "infer"):
        raise IndexedDatasetError(f"dataset impl {impl!r} is not supported; only 'mmap' (the GPT-NeoX default) is")


def make_builder(out_file: str, impl: str = "mmap", vocab_size: int | None = None, dtype=None):
    """A builder for ``out_file`` (a ``.bin`` path); dtype defaults to ``best_fitting_dtype(vocab_size)``."""
    _check_impl(impl)
    return MMapIndexedDatasetBuilder(out_file, dtype=dtype if dtype is not None else best_fitting_dtype(vocab_size))


def make_dataset(path: str, impl: str = "mmap", skip_warmup: bool = True) -> MMapIndexedDataset:
    """Open the dataset at prefix ``path`` (``path.bin`` + ``path.idx``), validating it."""
    _check_impl(impl)
    if not MMapIndexedDataset.exists(path):
        missing = [p for p in (index_file_path(path), data_file_path(path)) if not os.path.exists(p)]
        raise IndexedDatasetError(f"dataset {path}: missing {', '.join(missing)}")
    return MMapIndexedDataset(path, skip_warmup=skip_warmup)


def dataset_exists(path: str, impl: str = "mmap") -> bool:
    _check_impl(impl)
    return MMapIndexedDataset.exists(path)
