"""Show what an mmap ``.bin``/``.idx`` dataset holds (validating it on the way).

    python tools/datasets/inspect_dataset.py data/default/default_text_document
    python tools/datasets/inspect_dataset.py PREFIX --show 2 --vocab-file data/default/tokenizer.json
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # run by path (python tools/...): the checkout's package is two levels up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.cli import HelpFormatter  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetError, make_dataset  # noqa: E402


def describe(prefix: str) -> dict:
    ds = make_dataset(prefix)
    sizes = ds.sizes.astype(np.int64)
    return {
        "prefix": prefix,
        "dtype": np.dtype(ds.dtype).name,
        "sequences": len(ds),
        "documents": max(len(ds.doc_idx) - 1, 0),
        "tokens": int(sizes.sum()),
        "min_len": int(sizes.min()) if len(sizes) else 0,
        "mean_len": float(sizes.mean()) if len(sizes) else 0.0,
        "max_len": int(sizes.max()) if len(sizes) else 0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--show", type=int, default=0, help="print the first N sequences")
    p.add_argument("--tokenizer-type", default="HFTokenizer", help="tokenizer class used to decode --show sequences")
    p.add_argument("--vocab-file", help="decode shown sequences with this tokenizer")
    p.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    a = p.parse_args(argv)
    try:
        info = describe(a.prefix)
    except IndexedDatasetError as e:
        sys.exit(f"error: {e}")
    for k, v in info.items():
        print(f"{k:10} {v:.1f}" if isinstance(v, float) else f"{k:10} {v}")
    if a.show:
        ds = make_dataset(a.prefix)
        tok = None
        if a.vocab_file or a.tokenizer_type == "CharLevelTokenizer":
            from megatron.tokenizer.tokenizer import make_tokenizer

            tok = make_tokenizer(a.tokenizer_type, a.vocab_file, a.merge_file)
        for i in range(min(a.show, len(ds))):
            ids = ds[i]
            print(f"--- sequence {i}: {len(ids)} tokens")
            print(tok.detokenize(ids[:512]) if tok else ids[:64].tolist())


if __name__ == "__main__":
    main()
