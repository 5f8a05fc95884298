"""A random token corpus in the mmap format, shared by the data tests."""
import numpy as np

from megatron.data.indexed_dataset import make_builder


def write_corpus(prefix, n_docs, seed, max_len):
    """``n_docs`` documents of 1..max_len-1 random uint16 ids at ``prefix``.bin/.idx; returns the prefix."""
    rng = np.random.default_rng(seed)
    builder = make_builder(f"{prefix}.bin", "mmap", dtype=np.uint16)
    for _ in range(n_docs):
        builder.add_item(rng.integers(0, 50000, size=int(rng.integers(1, max_len))))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)
