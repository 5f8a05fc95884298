"""A random token corpus in the mmap format, shared by the data tests."""
import numpy as np

from megatron.data.indexed_dataset import make_builder


def write_docs(prefix, docs, dtype=np.uint16) -> str:
    """The given documents (id arrays) at ``prefix``.bin/.idx in ``dtype``; returns the prefix."""
    builder = make_builder(f"{prefix}.bin", "mmap", dtype=dtype)
    for d in docs:
        builder.add_item(np.asarray(d))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def write_corpus(prefix, n_docs, seed, max_len):
    """``n_docs`` documents of 1..max_len-1 random uint16 ids at ``prefix``.bin/.idx; returns the prefix."""
    rng = np.random.default_rng(seed)
    builder = make_builder(f"{prefix}.bin", "mmap", dtype=np.uint16)
    for _ in range(n_docs):
        builder.add_item(rng.integers(0, 50000, size=int(rng.integers(1, max_len))))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def data_config(vocab=50304, world_size=1, rank=0, **keys):
    """The resolved configuration (``NeoXArgs``) of a data test: rank ``rank`` of a CPU job of ``world_size``
    ranks (data_parallel_size = world_size / pipe stages), a two-layer model, and the char-level tokenizer
    (no file to read) padded to ``vocab`` rows so that the corpora's ids up to 50000 fit."""
    from megatron.neox_arguments import Environment, NeoXArgs

    base = dict(num_layers=2, hidden_size=8, num_attention_heads=1, seq_length=16, USE_ORIGINAL_FULL_ATTEN=True,
                tokenizer_type="CharLevelTokenizer", make_vocab_size_divisible_by=vocab, num_workers=0)
    env = Environment(cuda_device_count=0, environ={"WORLD_SIZE": str(world_size), "RANK": str(rank),
                                                    "LOCAL_RANK": str(rank)})
    return NeoXArgs.from_dict({**base, **keys}, env=env)
