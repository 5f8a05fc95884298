"""Print the SepLLM separator ids (``. , ? ! ; :`` space, tab, newline) of a tokenizer.

    python tools/sepllm/get_separator_ids.py /path/to/20B_tokenizer.json
    python tools/sepllm/get_separator_ids.py --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt

prints the list to paste as ``separator_token_ids`` (with Pythia's tokenizer: [15, 13, 32, 2, 28, 27, 209, 186, 187]).
``--verbose`` also shows each character, its token, and the decoding of the id (the reverse test).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run by path (python tools/...): the checkout's package is two levels up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.cli import HelpFormatter  # noqa: E402
from megatron.tokenizer.separators import SEPARATOR_CHARS, separator_ids  # noqa: E402
from megatron.tokenizer.tokenizer import TokenizerError, make_tokenizer  # noqa: E402


def separator_ids_cli(argv=None) -> list[int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("tokenizer_json", nargs="?", help="a HuggingFace tokenizer.json (same as --vocab-file with HFTokenizer)")
    p.add_argument("--tokenizer-type", default="HFTokenizer",
                   choices=["HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer"],
                   help="tokenizer class, as the config key tokenizer_type")
    p.add_argument("--vocab-file", help="tokenizer.json, GPT-2 vocab.json or SentencePiece model")
    p.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    p.add_argument("--verbose", action="store_true", help="show each separator's token and its decoding")
    a = p.parse_args(argv)
    vocab = a.tokenizer_json or a.vocab_file
    if vocab is None and a.tokenizer_type != "CharLevelTokenizer":
        p.error("give a tokenizer.json or --vocab-file")
    try:
        tok = make_tokenizer(a.tokenizer_type, vocab, a.merge_file)
        ids = separator_ids(tok)
    except (TokenizerError, ValueError) as e:
        sys.exit(f"error: {e}")
    if a.verbose:
        for ch, i in zip(SEPARATOR_CHARS, ids):
            print(f"{ch!r:6} -> {i:6d} -> {tok.detokenize([i])!r}")
    print(ids)
    return ids


def main(argv=None) -> int:
    separator_ids_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
