"""Tokenizer selection and vocabulary padding."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

TOKENIZER_TYPES = ("HFTokenizer", "GPT2BPETokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer")
# Tokenizer types that read `vocab_file`, and those that also need `merge_file`.
NEEDS_VOCAB_FILE = ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer")
NEEDS_MERGE_FILE = ("GPT2BPETokenizer",)


@dataclass
class TokenizerArgs:
    """Which tokenizer to build and how the vocabulary is padded."""

    tokenizer_type: str = arg("GPT2BPETokenizer", "Tokenizer kind (GPT-NeoX names).", choices=TOKENIZER_TYPES)
    vocab_file: Optional[str] = arg(
        None, "Tokenizer file: tokenizer.json (HFTokenizer), vocab.json (GPT2BPETokenizer) or the "
              "SentencePiece model (SPMTokenizer).")
    merge_file: Optional[str] = arg(None, "BPE merges file (GPT2BPETokenizer).")
    make_vocab_size_divisible_by: int = arg(
        128, "Pad the vocabulary to a multiple of this times model_parallel_size.")
    padded_vocab_size: Optional[int] = arg(
        None, "Vocabulary size after padding (derived from the tokenizer when its file exists).",
        role="derived")
