"""The range of token ids in a ``.bin``, scanned once and cached, and its check against the vocabulary.

An id at or above the model's (padded) vocabulary size would train silently on a wrong row or end in a
raw ``IndexError`` deep in the embedding, after the model is built; a corpus tokenised with another
tokenizer is the usual cause. The scan reads the ``.bin`` in bounded chunks (the ``.idx`` was validated
first, so every byte of the ``.bin`` belongs to a listed sequence) and is cached in
``<prefix>_token_ids.json`` next to the data, keyed by the size and mtime of both files, so launcher and
ranks pay for it once per version of the data. Where the data folder is read-only the cache goes to the
user cache folder instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndex, data_file_path, index_file_path

CACHE_FORMAT = 1
# Elements per chunk: 64 MiB of uint16, bounded memory whatever the file size.
CHUNK_TOKENS = 1 << 25


class TokenIdError(IndexedDatasetError):
    """A dataset holds token ids its model cannot embed."""


@dataclass(frozen=True)
class TokenRange:
    min_id: int
    max_id: int
    num_tokens: int
    dtype: str
    scan_seconds: float


def _file_key(path: str) -> dict:
    st = os.stat(path)
    # The inode changes when a file is replaced by rename, as the preprocessors write theirs.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def cache_path(prefix: str) -> str:
    return f"{prefix}_token_ids.json"


def _fallback_cache_path(prefix: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.realpath(prefix).encode()).hexdigest()[:20]
    return os.path.join(base, "sepllm", "token_ids", f"{digest}.json")


def _read_cache(path: str, key: dict) -> TokenRange | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != CACHE_FORMAT or record.get("files") != key:
            return None
        return TokenRange(**record["range"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: str, key: dict, result: TokenRange) -> bool:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "files": key, "range": asdict(result)}, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


def _bin_tokens(index: MMapIndex, bin_path: str) -> np.ndarray:
    if os.path.getsize(bin_path) == 0:
        return np.zeros(0, dtype=index.dtype)
    return np.memmap(bin_path, dtype=index.dtype, mode="r")


def scan_token_range(prefix: str, chunk: int = CHUNK_TOKENS) -> TokenRange:
    """Validate the pair and scan every token of ``<prefix>.bin`` (no cache)."""
    index = MMapIndex(index_file_path(prefix))
    bin_path = data_file_path(prefix)
    index.validate_against(bin_path)
    dtype = np.dtype(index.dtype)
    if dtype.kind not in "iu":
        raise TokenIdError(f"data file {bin_path} stores {dtype.name} values (dtype code {index.dtype_code} in "
                           f"{index.path}); token ids must be integers")
    start = time.perf_counter()
    tokens = _bin_tokens(index, bin_path)
    lo, hi = None, None
    # Unsigned ids cannot be negative: skipping the minimum halves the work.
    signed = dtype.kind == "i"
    for first in range(0, tokens.shape[0], chunk):
        part = tokens[first:first + chunk]
        top = int(part.max())
        hi = top if hi is None else max(hi, top)
        if signed:
            bottom = int(part.min())
            lo = bottom if lo is None else min(lo, bottom)
    n = int(tokens.shape[0])
    if n == 0:
        lo, hi = 0, -1
    elif not signed:
        lo = 0
    return TokenRange(min_id=int(lo), max_id=int(hi), num_tokens=n, dtype=dtype.name,
                      scan_seconds=round(time.perf_counter() - start, 3))


def token_id_range(prefix: str, log=None) -> TokenRange:
    """The cached range of ``<prefix>.bin``; scans (and caches) when the data changed or no cache exists."""
    key = {"bin": _file_key(data_file_path(prefix)), "idx": _file_key(index_file_path(prefix))}
    for path in (cache_path(prefix), _fallback_cache_path(prefix)):
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    result = scan_token_range(prefix)
    where = next((p for p in (cache_path(prefix), _fallback_cache_path(prefix)) if _write_cache(p, key, result)),
                 None)
    if log is not None:
        log(f"scanned the token ids of {data_file_path(prefix)}: {result.num_tokens} tokens, ids "
            f"[{result.min_id}, {result.max_id}], {result.scan_seconds:.2f} s"
            + (f"; cached in {where}" if where else "; no writable cache location"))
    return result


def _first_bad_position(prefix: str, vocab_size: int) -> tuple[int, int]:
    """(sequence, token offset in it) of the first id outside [0, vocab_size); only on the error path."""
    index = MMapIndex(index_file_path(prefix))
    tokens = _bin_tokens(index, data_file_path(prefix))
    for first in range(0, tokens.shape[0], CHUNK_TOKENS):
        part = tokens[first:first + CHUNK_TOKENS]
        hits = np.flatnonzero((part >= vocab_size) | (part < 0))
        if hits.size:
            pos = first + int(hits[0])
            byte = pos * np.dtype(index.dtype).itemsize
            seq = int(np.searchsorted(index.pointers, byte, side="right")) - 1
            return seq, (byte - int(index.pointers[seq])) // np.dtype(index.dtype).itemsize
    return -1, -1


def check_token_ids(prefix: str, vocab_size: int, key: str, vocab_source: str = "", log=None) -> TokenRange:
    """Raise TokenIdError naming the file, the id, the vocabulary size and the keys when an id does not fit."""
    result = token_id_range(prefix, log=log)
    if result.num_tokens and (result.max_id >= vocab_size or result.min_id < 0):
        bad = result.max_id if result.max_id >= vocab_size else result.min_id
        seq, offset = _first_bad_position(prefix, vocab_size)
        at = f" (first at sequence {seq}, token {offset})" if seq >= 0 else ""
        raise TokenIdError(
            f"key '{key}': data file {data_file_path(prefix)} holds token id {bad}{at}, outside the padded "
            f"vocabulary of {vocab_size} ids (padded_vocab_size{', from ' + vocab_source if vocab_source else ''}); "
            f"ids span [{result.min_id}, {result.max_id}]: was the data tokenised with another tokenizer?")
    return result
