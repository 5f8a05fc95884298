"""Train a byte-level BPE tokenizer in the GPT-NeoX style and write a ``tokenizer.json``.

The result matches the structure of Pythia's ``20B_tokenizer.json``: NFC normalisation, GPT-2 byte-level
pre-tokenisation without a prefix space, ``<|endoftext|>`` as id 0 and ``<|padding|>`` as id 1. Load it
with ``tokenizer-type: HFTokenizer`` and ``vocab-file: <path>``.

    python -m megatron.tokenizer.train_tokenizer --input corpus.jsonl --vocab-size 8192 --output tok.json
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Iterable

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` (``<|endoftext|>`` = 0, ``<|padding|>`` = 1)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab-size {vocab_size} is too small: the 256 byte tokens and 2 special tokens "
                         f"need at least 258")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],  # in this order: ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, nothing unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOD_TOKEN) != 0 or tok.token_to_id(PAD_TOKEN) != 1:
        raise RuntimeError("trained tokenizer does not have <|endoftext|>=0 and <|padding|>=1")
    return tok


def save_tokenizer(tok, path: str) -> None:
    """Write ``tok`` to ``path`` through a temporary file, so ``path`` is complete or absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> None:
    from megatron.tokenizer.corpus_reader import iter_texts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="comma-separated jsonl (plain/.gz/.zst) or text files")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--output", required=True, help="tokenizer.json to write")
    a = p.parse_args(argv)
    t0 = time.time()
    tok = train_bpe_tokenizer(iter_texts(a.input.split(","), tuple(a.jsonl_keys)), a.vocab_size, a.min_frequency)
    save_tokenizer(tok, a.output)
    print(f"wrote {a.output} (vocab {tok.get_vocab_size()}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
