"""Benchmark of the data index and sample reads (CPU, one core).

1. Index build: the three GPT2Dataset arrays (doc_idx, sample_idx, shuffle_idx) for `--tokens` tokens in
   `--docs` documents (default 1B in 1M; target < 10 s), with the C++ sample-index builder and, for the
   ratio, the numpy twin; then the time to save them as .npy (what a first run also pays).
2. Random sample reads: GPT2Dataset.__getitem__ at random indices over an mmap corpus of `--read-tokens`
   tokens (uint16) from a warm page cache (target >= 20k samples/s of 2049 tokens).

    python bench/bench_data_index.py [--tokens 1e9] [--docs 1e6] [--seq-length 2048] [--read-tokens 2e8]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.data import helpers  # noqa: E402
from megatron.data.gpt2_dataset import (  # noqa: E402
    GPT2Dataset,
    build_doc_idx,
    build_shuffle_idx,
    num_epochs_needed,
    num_tokens,
)
from megatron.data.indexed_dataset import make_dataset, write_index  # noqa: E402


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def doc_sizes(n_docs: int, n_tokens: int, seed: int) -> np.ndarray:
    """Random document lengths summing to exactly n_tokens."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2 * n_tokens // n_docs, size=n_docs).astype(np.int64)
    sizes = np.maximum(1, (sizes * (n_tokens / sizes.sum())).astype(np.int64))
    sizes[-1] += n_tokens - sizes.sum()
    return sizes.astype(np.int32)


def bench_index(n_tokens: int, n_docs: int, seq_length: int, seed: int) -> None:
    sizes = doc_sizes(n_docs, n_tokens, seed)
    documents = np.arange(n_docs, dtype=np.int32)
    num_samples = (n_tokens - 1) // seq_length  # one epoch
    helpers.compile_cpp_helpers()  # compile outside the timed region

    results = {}
    for impl in ("cpp", "numpy"):
        t0 = time.perf_counter()
        tokens = num_tokens(documents, sizes)
        epochs = num_epochs_needed(tokens, seq_length, num_samples)
        rng = np.random.RandomState(seed)
        doc_idx = build_doc_idx(documents, epochs, rng)
        t1 = time.perf_counter()
        sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens, impl=impl)
        t2 = time.perf_counter()
        shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
        t3 = time.perf_counter()
        results[impl] = (t1 - t0, t2 - t1, t3 - t2, t3 - t0, sample_idx)
        print(f"  [{impl:5s}] doc_idx {t1 - t0:6.3f} s | sample_idx {t2 - t1:6.3f} s | "
              f"shuffle_idx {t3 - t2:6.3f} s | total {t3 - t0:6.3f} s")
    assert np.array_equal(results["cpp"][4], results["numpy"][4]), "C++ and numpy sample_idx differ"
    print(f"  arrays: doc_idx {doc_idx.shape[0]:,} int32, sample_idx {sample_idx.shape} {sample_idx.dtype}, "
          f"shuffle_idx {shuffle_idx.shape[0]:,} {shuffle_idx.dtype}; C++ == numpy: True")
    print(f"  sample_idx numpy/C++ time ratio: {results['numpy'][1] / results['cpp'][1]:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for name, arr in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", shuffle_idx)):
            np.save(os.path.join(tmp, f"{name}_idx.npy"), arr)
        print(f"  saving the three .npy files: {time.perf_counter() - t0:.3f} s")
    total = results["cpp"][3]
    print(f"  => index build (C++) {total:.3f} s for {n_tokens:,} tokens / {n_docs:,} documents "
          f"(target < 10 s: {'met' if total < 10 else 'NOT met'})")


def bench_reads(n_tokens: int, seq_length: int, seed: int, n_reads: int, workdir: str) -> None:
    n_docs = max(1, n_tokens // 1000)
    sizes = doc_sizes(n_docs, n_tokens, seed)
    prefix = os.path.join(workdir, "bench_text_document")
    rng = np.random.default_rng(seed)
    with open(prefix + ".bin", "wb") as f:
        chunk = 1 << 24
        for start in range(0, n_tokens, chunk):
            f.write(rng.integers(0, 50000, size=min(chunk, n_tokens - start), dtype=np.uint16).tobytes())
    write_index(prefix + ".idx", np.uint16, sizes, np.arange(n_docs + 1, dtype=np.int64))
    ds = make_dataset(prefix, "mmap")
    num_samples = (n_tokens - 1) // seq_length
    g = GPT2Dataset("bench", prefix, np.arange(n_docs, dtype=np.int32), ds, num_samples, seq_length, seed)
    order = rng.integers(0, len(g), size=n_reads)
    for i in order[: min(n_reads, 20000)]:  # warm the page cache and the code path
        g[int(i)]
    t0 = time.perf_counter()
    for i in order:
        g[int(i)]
    dt = time.perf_counter() - t0
    rate = n_reads / dt
    print(f"  {n_reads:,} random samples of {seq_length + 1} tokens in {dt:.3f} s: {rate:,.0f} samples/s "
          f"({rate * (seq_length + 1) / 1e6:,.1f} M tokens/s; target >= 20k samples/s: "
          f"{'met' if rate >= 20000 else 'NOT met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e9, help="tokens for the index build")
    p.add_argument("--docs", type=float, default=1e6, help="documents for the index build")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--read-tokens", type=float, default=2e8, help="tokens in the corpus for the read test")
    p.add_argument("--reads", type=int, default=100000, help="random samples read")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workdir", default=None, help="where the read-test corpus is written (default: a temp dir)")
    args = p.parse_args()

    print(f"bench_data_index: {pin_one_core()}, numpy {np.__version__}")
    print(f"[1] index build, {int(args.tokens):,} tokens in {int(args.docs):,} documents, seq_length {args.seq_length}")
    bench_index(int(args.tokens), int(args.docs), args.seq_length, args.seed)
    print(f"[2] random sample reads over {int(args.read_tokens):,} tokens")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        bench_reads(int(args.read_tokens), args.seq_length, args.seed, args.reads, tmp)


if __name__ == "__main__":
    main()
