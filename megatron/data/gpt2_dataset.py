"""Packed GPT samples of `seq_length + 1` tokens over an indexed dataset, with GPT-NeoX's index arrays.

Three arrays decide which tokens form sample i (all identical to GPT-NeoX's for the same documents,
sizes, sample count, sequence length and seed, so a Pythia run's sample order is reproduced):

- doc_idx (int32): the documents repeated `num_epochs` times, shuffled as one array by
  `np.random.RandomState(seed)`. All epochs, including the last partial one, are shuffled together:
  GPT-NeoX (unlike later Megatron-LM) has no separate last-epoch shuffle.
- sample_idx (int32, int64 when large): row i = (position in doc_idx, token offset) where sample i
  starts; sample i covers the tokens from row i through row i+1 inclusive (`helpers.build_sample_idx`).
- shuffle_idx (uint32, int64 when large): a permutation of the samples from the same RandomState,
  drawn after the doc_idx shuffle.

They are cached next to the data as `<prefix>_<name>_indexmap_<N>ns_<L>sl_<seed>s_packedpi_ac_{doc,sample,
shuffle}_idx.npy`, the names GPT-NeoX uses since c7863673 (Aug 2024, its packing implementation `packed` and
`allow_chopped`, the only ones here) and the SepLLM reference uses; `index_cache_naming: v2.0` writes the
Pythia-era names without `_packedpi_ac` instead. A cache under either name is used before anything is built,
so GPT-NeoX's caches of both eras are reused and ours are reusable by it. The names say nothing of the
data they were built from, so beside them `<stem>_source.json` records it (the `.idx` file's size, mtime
and a hash of its sequence sizes, the document range, and the three files it describes): a cache whose
data changed (a re-tokenised corpus, another `split`) is rebuilt with a notice. A cache without that
record (GPT-NeoX's) is used when it is consistent with the data, and the record is then added.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from megatron.data import helpers


def print_rank_0(message: str) -> None:
    """Print once per job (on global rank 0, or always when torch.distributed is not started)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        print(message, flush=True)
    elif torch.distributed.get_rank() == 0:
        print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# The index arrays (pure functions)
# --------------------------------------------------------------------------------------------------
def num_tokens(documents: np.ndarray, sizes: np.ndarray) -> int:
    """Tokens in one epoch over `documents`."""
    return int(np.sum(sizes[documents], dtype=np.int64))


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of epochs whose tokens give `num_samples` samples (samples share one token)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the documents selected for this dataset contain no tokens")
    # Smallest e with (e * tokens_per_epoch - 1) // seq_length >= num_samples, as GPT-NeoX's loop finds it.
    epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    while epochs > 1 and ((epochs - 1) * tokens_per_epoch - 1) // seq_length >= num_samples:
        epochs -= 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def build_doc_idx(documents: np.ndarray, num_epochs: int, np_rng: np.random.RandomState) -> np.ndarray:
    """`documents` repeated `num_epochs` times as int32, shuffled in place by `np_rng`."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int64), num_epochs).astype(np.int32)
    np_rng.shuffle(doc_idx)
    return doc_idx


def build_shuffle_idx(size: int, np_rng: np.random.RandomState) -> np.ndarray:
    """A shuffled `arange(size)`: uint32, or int64 from 2**32 - 2 samples on (GPT-NeoX's dtypes)."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(start=0, stop=size, step=1, dtype=dtype)
    np_rng.shuffle(shuffle_idx)
    return shuffle_idx


def build_index_arrays(documents, sizes, num_samples: int, seq_length: int, seed: int, impl: str = "auto"):
    """(doc_idx, sample_idx, shuffle_idx) for `num_samples` samples, in GPT-NeoX's order of RNG use."""
    documents = np.asarray(documents)
    sizes = np.asarray(sizes)
    tokens_per_epoch = num_tokens(documents, sizes)
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    np_rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, np_rng)
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens_per_epoch, impl=impl)
    # sample i spans rows i and i+1, so there is one sample fewer than rows.
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, np_rng)
    return doc_idx, sample_idx, shuffle_idx


# What GPT-NeoX appends since c7863673: `_{packing_impl}pi`, then `_ac` for allow_chopped.
NAMING_SUFFIX = {"current": "_packedpi_ac", "v2.0": ""}


def index_file_prefix(data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int,
                      naming: str = "current") -> str:
    """GPT-NeoX's cache name stem: `<prefix>_<name>_indexmap_<N>ns_<L>sl_<seed>s` (v2.0), `..._packedpi_ac`
    (current)."""
    if naming not in NAMING_SUFFIX:
        raise ValueError(f"index_cache_naming {naming!r}: choose one of {', '.join(NAMING_SUFFIX)}")
    return f"{data_prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s{NAMING_SUFFIX[naming]}"


def index_file_names(data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int,
                     naming: str = "current") -> dict[str, str]:
    stem = index_file_prefix(data_prefix, name, num_samples, seq_length, seed, naming)
    return {key: f"{stem}_{key}_idx.npy" for key in ("doc", "sample", "shuffle")}


def _complete(files: dict) -> bool:
    return all(os.path.isfile(p) for p in files.values())


# --------------------------------------------------------------------------------------------------
# Building on the right rank, caching, loading
# --------------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_index_builder(use_shared_fs: bool) -> bool:
    """Global rank 0 builds on a shared filesystem; otherwise local rank 0 of every node does."""
    if not _dist_ready():
        return True
    if use_shared_fs:
        return torch.distributed.get_rank() == 0
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        raise RuntimeError(
            "use_shared_fs is False, so local rank 0 of each node builds the data index, but the "
            "LOCAL_RANK environment variable is not set (the DeepSpeed launcher sets it)"
        )
    return int(local_rank) == 0


def barrier() -> None:
    """All ranks wait here (no-op without torch.distributed)."""
    if not _dist_ready():
        return
    if torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    """np.save to a temporary name in the same folder, then rename, so no half-written final file exists."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_index(path: str) -> np.ndarray:
    # Plain ndarray view of the memmap: element access on np.memmap is several times slower.
    return np.asarray(np.load(path, allow_pickle=True, mmap_mode="r"))


SOURCE_FORMAT = 1


def source_record_path(files: dict) -> str:
    return files["doc"][: -len("_doc_idx.npy")] + "_source.json"


def _stat_key(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _sizes_hash(sizes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(sizes, dtype=np.int32).reshape(-1)
    for lo in range(0, flat.shape[0], 1 << 24):  # bounded memory on Pile-sized indices
        digest.update(flat[lo:lo + (1 << 24)].tobytes())
    return digest.hexdigest()


def _documents_key(documents) -> list:
    return [int(documents[0]), int(documents[-1]), int(len(documents))] if len(documents) else [0, -1, 0]


def _read_source_record(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) and record.get("format") == SOURCE_FORMAT else None
    except (OSError, ValueError):
        return None


def write_source_record(files: dict, data_prefix: str, documents, sizes, sizes_hash: str = None) -> None:
    """Record which data the three cache files were built from (atomically; skipped where not writable)."""
    record = {
        "format": SOURCE_FORMAT,
        "idx": _stat_key(data_prefix + ".idx"),
        "sizes_blake2b": sizes_hash or _sizes_hash(sizes),
        "documents": _documents_key(documents),
        "index_files": {k: _stat_key(p) for k, p in files.items()},
    }
    path = source_record_path(files)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:
        print(f"WARNING: could not write {path} ({err}); the index cache is used without a source record")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_state(files: dict, data_prefix: str, documents, sizes) -> tuple[str, str]:
    """("missing" | "fresh" | "stale" | "unrecorded", why) for the cached index files of one dataset.

    "unrecorded": the files exist without a record that describes them (GPT-NeoX's, or replaced since).
    """
    if not all(os.path.isfile(p) for p in files.values()):
        return "missing", ""
    record = _read_source_record(source_record_path(files))
    if record is None or record.get("index_files") != {k: _stat_key(p) for k, p in files.items()}:
        return "unrecorded", ""
    documents_now = _documents_key(documents)
    if record.get("documents") != documents_now:
        return "stale", (f"documents {record.get('documents')} (first, last, count) then, {documents_now} now; "
                         f"was 'split' changed?")
    idx_now = _stat_key(data_prefix + ".idx")
    if record.get("idx") == idx_now:
        return "fresh", ""
    # Touched or copied but with the same sequence sizes: the index arrays are still right.
    sizes_hash = _sizes_hash(sizes)
    if record.get("sizes_blake2b") == sizes_hash:
        write_source_record(files, data_prefix, documents, sizes, sizes_hash)
        return "fresh", ""
    then = record.get("idx", {}).get("size")
    return "stale", (f"{data_prefix}.idx was rewritten since ({then} bytes then, {idx_now['size']} now) and its "
                     f"sequence sizes differ")


def load_or_build_index_mappings(
    name: str,
    data_prefix: str,
    documents,
    sizes,
    num_samples: int,
    seq_length: int,
    seed: int,
    use_shared_fs: bool = True,
    naming: str = "current",
):
    """Build (on the builder rank) or reuse the cached index files, then load them on every rank.

    The cache under ``naming``'s names is preferred; without it, one under the other naming is used unless it
    was built from other data; else the index is built under ``naming``'s names. Every rank must call this (it
    contains a barrier). Returns (doc_idx, sample_idx, shuffle_idx) as read-only memory-mapped arrays.
    """
    files = index_file_names(data_prefix, name, num_samples, seq_length, seed, naming)
    other = index_file_names(data_prefix, name, num_samples, seq_length, seed,
                             next(n for n in NAMING_SUFFIX if n != naming))
    state = None
    if is_index_builder(use_shared_fs):
        state, why = cache_state(files, data_prefix, documents, sizes)
        if state == "missing" and _complete(other):
            other_state, _ = cache_state(other, data_prefix, documents, sizes)
            if other_state != "stale":  # else this naming's set is built, the other left as it is
                state = other_state
        if state == "stale":
            print(f" > the cached {name} index {files['doc'][: -len('_doc_idx.npy')]}_* was built from other "
                  f"data ({why}); rebuilding it", flush=True)
    if state in ("missing", "stale"):
        print_rank_0(f" > building the {name} index for {num_samples} samples of {seq_length} tokens ...")
        Path(files["doc"]).parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        doc_idx, sample_idx, shuffle_idx = build_index_arrays(documents, sizes, num_samples, seq_length, seed)
        # Written in this order and each one renamed into place: a set is complete only when all
        # three final names exist, which is what the check above requires.
        _save_npy_atomic(files["doc"], doc_idx)
        _save_npy_atomic(files["sample"], sample_idx)
        _save_npy_atomic(files["shuffle"], shuffle_idx)
        write_source_record(files, data_prefix, documents, sizes)
        print_rank_0(
            f"    built and saved in {time.time() - start:.3f} s: {doc_idx.shape[0]} doc_idx entries, "
            f"{shuffle_idx.shape[0]} samples"
        )
    barrier()

    # The builder's choice, as every rank sees it after the barrier: this naming's set once it exists.
    if not _complete(files) and _complete(other):
        files = other
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data index files for {name!r} are missing after the builder rank ran: {missing}. "
            f"If the data folder is not shared between nodes, set use_shared_fs: false"
        )
    doc_idx = _load_index(files["doc"])
    sample_idx = _load_index(files["sample"])
    shuffle_idx = _load_index(files["shuffle"])
    _check_loaded(files, documents, sizes, seq_length, doc_idx, sample_idx, shuffle_idx)
    if state == "unrecorded":
        # Consistent with this data: from now on a change of the data is recognised.
        write_source_record(files, data_prefix, documents, sizes)
    print_rank_0(f" > loaded the {name} index from {files['doc'][: -len('_doc_idx.npy')]}_*: "
                 f"{sample_idx.shape[0]} sample_idx rows")
    return doc_idx, sample_idx, shuffle_idx


def _check_loaded(files, documents, sizes, seq_length, doc_idx, sample_idx, shuffle_idx) -> None:
    """Cheap consistency checks so a stale or foreign cache stops with the file named."""
    n_docs = len(documents)
    if doc_idx.ndim != 1 or n_docs == 0 or doc_idx.shape[0] % n_docs != 0:
        raise ValueError(
            f"{files['doc']}: {doc_idx.shape[0]} entries is not a whole number of epochs over "
            f"{n_docs} documents; delete the stale index files and rerun"
        )
    # GPT-NeoX's names do not encode the document range (a changed `split` keeps the names), so check
    # that the cached doc_idx stays inside this dataset's documents; a strided probe of at most ~1M
    # entries keeps this cheap on Pile-sized indices.
    probe = doc_idx[:: max(1, doc_idx.shape[0] // 1_000_000)]
    lo, hi = int(np.min(documents)), int(np.max(documents))
    if probe.size and (int(probe.min()) < lo or int(probe.max()) > hi):
        raise ValueError(
            f"{files['doc']}: holds document ids in [{int(probe.min())}, {int(probe.max())}] but this "
            f"dataset uses [{lo}, {hi}] (was the split or the data changed?); delete the stale index files and rerun"
        )
    if sample_idx.ndim != 2 or sample_idx.shape[1] != 2 or sample_idx.shape[0] < 1:
        raise ValueError(f"{files['sample']}: expected shape [num_samples + 1, 2], got {sample_idx.shape}")
    if int(sample_idx[-1, 0]) >= doc_idx.shape[0]:
        raise ValueError(
            f"{files['sample']}: points at doc_idx entry {int(sample_idx[-1, 0])} but "
            f"{files['doc']} has {doc_idx.shape[0]}; delete the stale index files and rerun"
        )
    if shuffle_idx.ndim != 1 or shuffle_idx.shape[0] != sample_idx.shape[0] - 1:
        raise ValueError(
            f"{files['shuffle']}: {shuffle_idx.shape[0]} entries, expected {sample_idx.shape[0] - 1}; "
            f"delete the stale index files and rerun"
        )
    # Sample i spans exactly seq_length tokens of the doc_idx stream from row i to row i+1; a cache built
    # for other sequence sizes (a re-tokenised corpus) breaks that at almost every row. ~1000 probes.
    rows = np.unique(np.linspace(0, sample_idx.shape[0] - 2, num=min(1000, sample_idx.shape[0] - 1), dtype=np.int64))
    for i in rows:
        (d0, o0), (d1, o1) = (int(v) for v in sample_idx[i]), (int(v) for v in sample_idx[i + 1])
        span = int(np.sum(sizes[doc_idx[d0:d1]], dtype=np.int64)) - o0 + o1 if d1 >= d0 else -1
        if span != seq_length:
            raise ValueError(
                f"{files['sample']}: sample {int(i)} spans {span} tokens of this data, not seq_length="
                f"{seq_length}: the cache was built from other data (a re-tokenised corpus?); delete the "
                f"index files of this stem and rerun"
            )


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------
class GPT2Dataset(torch.utils.data.Dataset):
    """Samples `{"text": int64[seq_length + 1]}` packed across document boundaries.

    `indexed_dataset` is a `megatron.data.indexed_dataset` reader (`.sizes`, `.get(i, offset, length)`);
    `documents` the document ids this split uses (a contiguous range for splits).
    """

    def __init__(
        self,
        name: str,
        data_prefix: str,
        documents,
        indexed_dataset,
        num_samples: int,
        seq_length: int,
        seed: int,
        build_index_mappings: bool = True,
        use_shared_fs: bool = True,
        index_cache_naming: str = "current",
    ):
        self.name = name
        self.data_prefix = data_prefix
        self.indexed_dataset = indexed_dataset
        self.seq_length = int(seq_length)
        documents = np.asarray(documents)
        n_docs = indexed_dataset.sizes.shape[0]
        if documents.size == 0:
            raise ValueError(f"dataset {name!r} ({data_prefix}): no documents selected")
        if documents.min() < 0 or documents.max() >= n_docs:
            raise ValueError(
                f"dataset {name!r} ({data_prefix}): document ids must lie in [0, {n_docs}), got "
                f"[{documents.min()}, {documents.max()}]"
            )
        self.documents = documents
        self._warned_wrap = False
        self._length = 0
        if build_index_mappings:
            self.doc_idx, self.sample_idx, self.shuffle_idx = load_or_build_index_mappings(
                name, data_prefix, documents, indexed_dataset.sizes, num_samples, seq_length, seed,
                use_shared_fs=use_shared_fs, naming=index_cache_naming,
            )
            # GPT-NeoX's length: min(len(shuffle_idx) - 1, len(sample_idx) - 1), i.e. one less than the
            # samples built. Kept because blending sizes (sum of lengths) and loader lengths depend on it.
            self._length = min(self.shuffle_idx.shape[0] - 1, self.sample_idx.shape[0] - 1)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < self.shuffle_idx.shape[0]:
            # GPT-NeoX wraps out-of-range indices (a blend may ask a little past one dataset's end).
            wrapped = idx % len(self)
            if not self._warned_wrap:
                print(f"WARNING: {self.name}: sample index {idx} is out of range, using {wrapped} (modulo)")
                self._warned_wrap = True
            idx = wrapped
        return {"text": self.get_sample(int(self.shuffle_idx[idx]))}

    def get_sample(self, i: int) -> np.ndarray:
        """Tokens of unshuffled sample i: from (doc, offset) row i through row i+1 inclusive."""
        first, offset_first = (int(v) for v in self.sample_idx[i])
        last, offset_last = (int(v) for v in self.sample_idx[i + 1])
        ds = self.indexed_dataset
        if first == last:
            pieces = [ds.get(int(self.doc_idx[first]), offset=offset_first, length=offset_last - offset_first + 1)]
        else:
            pieces = [ds.get(int(self.doc_idx[first]), offset=offset_first)]
            pieces += [ds.get(int(self.doc_idx[j])) for j in range(first + 1, last)]
            pieces.append(ds.get(int(self.doc_idx[last]), length=offset_last + 1))
        n = sum(len(p) for p in pieces)
        # Checked before copying: index files of other data would otherwise overflow `out` with a bare
        # numpy broadcast error.
        if n != self.seq_length + 1:
            raise ValueError(
                f"dataset {self.name!r} ({self.data_prefix}): sample {i} has {n} tokens, expected "
                f"{self.seq_length + 1}; the index files do not match the data (delete them and rerun)"
            )
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        pos = 0
        for piece in pieces:
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
        return out
