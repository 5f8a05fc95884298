"""Tokenizers: ``build_tokenizer(args)`` (HF tokenizer.json, GPT-2 BPE, SentencePiece, char-level),
separator ids for SepLLM, and a byte-level BPE trainer (``megatron.tokenizer.train_tokenizer``)."""
from .separators import SEPARATOR_CHARS, separator_ids
from .tokenizer import (
    CharLevelTokenizer,
    GPT2BPETokenizer,
    HFTokenizer,
    SPMTokenizer,
    TokenizerError,
    _vocab_size_with_padding,
    build_tokenizer,
    make_tokenizer,
)

__all__ = [
    "build_tokenizer", "make_tokenizer", "_vocab_size_with_padding", "separator_ids", "SEPARATOR_CHARS",
    "HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer", "TokenizerError",
]
