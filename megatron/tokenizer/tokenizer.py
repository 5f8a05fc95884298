"""Tokenizers built from the configuration (GPT-NeoX's ``tokenizer-type`` values).

Every tokenizer exposes ``vocab_size``, ``eod``, ``pad``, ``tokenize(text) -> list[int]``,
``tokenize_batch(texts) -> list[list[int]]``, ``detokenize(ids) -> str``, ``token_to_id(tok)`` and
``vocab`` / ``inv_vocab``. ``build_tokenizer(args)`` also sets ``args.padded_vocab_size``.
"""
from __future__ import annotations

import json
import os

_TYPES = ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer")


class TokenizerError(ValueError):
    """A tokenizer file is missing or does not parse, or the configuration names no usable tokenizer."""


def _require_file(path, key: str) -> str:
    if path is None:
        raise TokenizerError(f"{key} is required for this tokenizer-type but is not set")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"{key} {path} does not exist")
    return path


class AbstractTokenizer:
    """Common surface; subclasses set ``name``, ``_eod``, ``_pad``."""

    name = "abstract"
    _eod: int
    _pad: int

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eod_id(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def pad_id(self) -> int:
        return self._pad

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {v: k for k, v in self.vocab.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


class HFTokenizer(AbstractTokenizer):
    """A HuggingFace ``tokenizers`` ``tokenizer.json`` (e.g. Pythia's ``20B_tokenizer.json``).

    ``<|endoftext|>`` is the end-of-document id and ``<|padding|>`` the padding id, as in GPT-NeoX; a file
    without ``<|padding|>`` pads with the end-of-document id.
    """

    name = "HFTokenizer"

    def __init__(self, vocab_file):
        from tokenizers import Tokenizer

        path = _require_file(vocab_file, "vocab-file")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise TokenizerError(f"vocab-file {path} is not a valid HuggingFace tokenizer.json: {e}") from None
        eod = self.tokenizer.token_to_id("<|endoftext|>")
        if eod is None:
            raise TokenizerError(f"vocab-file {path} has no <|endoftext|> token (needed as end-of-document id)")
        pad = self.tokenizer.token_to_id("<|padding|>")
        self._eod = eod
        self._pad = eod if pad is None else pad
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def detokenize(self, token_ids) -> str:
        return self.tokenizer.decode(list(map(int, token_ids)))

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class GPT2BPETokenizer(AbstractTokenizer):
    """The original GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``.

    Encoded with the ``tokenizers`` BPE model and GPT-2's byte-level pre-tokenizer (same regex, no prefix
    space); ``<|endoftext|>`` in the text is not treated specially, as in GPT-2's own encoder.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file, merge_file):
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        vocab_path = _require_file(vocab_file, "vocab-file")
        merge_path = _require_file(merge_file, "merge-file")
        try:
            with open(vocab_path, encoding="utf-8") as f:
                encoder = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"vocab-file {vocab_path} is not a GPT-2 vocab.json: {e}") from None
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise TokenizerError(f"vocab-file {vocab_path} must map token strings to integer ids")
        if "<|endoftext|>" not in encoder:
            raise TokenizerError(f"vocab-file {vocab_path} has no <|endoftext|> token")
        try:
            model = BPE.from_file(vocab_path, merge_path)
        except Exception as e:
            raise TokenizerError(f"merge-file {merge_path} (with vocab-file {vocab_path}) does not parse: {e}") from None
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self.tokenizer = tok
        self.encoder = encoder
        self._eod = encoder["<|endoftext|>"]
        self._pad = encoder.get("<|padding|>", self._eod)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def detokenize(self, token_ids) -> str:
        return self.tokenizer.decode(list(map(int, token_ids)), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.encoder.get(token)


class SPMTokenizer(AbstractTokenizer):
    """A SentencePiece model. End of document: the ``<|endoftext|>`` piece if present, else the model's EOS."""

    name = "SPMTokenizer"

    def __init__(self, vocab_file):
        import sentencepiece as spm

        path = _require_file(vocab_file, "vocab-file")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except Exception as e:
            raise TokenizerError(f"vocab-file {path} is not a SentencePiece model: {e}") from None
        self.tokenizer = sp
        eod = self._piece_id("<|endoftext|>")
        if eod is None:
            eod = sp.eos_id() if sp.eos_id() >= 0 else None
        if eod is None:
            raise TokenizerError(f"vocab-file {path} has neither an <|endoftext|> piece nor an EOS id")
        pad = self._piece_id("<|padding|>")
        if pad is None and sp.pad_id() >= 0:
            pad = sp.pad_id()
        self._eod = eod
        self._pad = eod if pad is None else pad

    def _piece_id(self, piece: str) -> int | None:
        i = self.tokenizer.piece_to_id(piece)
        # piece_to_id answers the unknown id for absent pieces.
        if i == self.tokenizer.unk_id() and piece != self.tokenizer.id_to_piece(i):
            return None
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self.tokenizer.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts)

    def detokenize(self, token_ids) -> str:
        return self.tokenizer.decode(list(map(int, token_ids)))

    def token_to_id(self, token: str) -> int | None:
        return self._piece_id(token)


class CharLevelTokenizer(AbstractTokenizer):
    """One token per UTF-8 byte (ids 0-255 of a 512-entry vocabulary, as GPT-NeoX's); id 0 ends documents."""

    name = "CharLevelTokenizer"

    def __init__(self, vocab_size: int = 512):
        self._vocab_size = vocab_size
        self._eod = 0
        self._pad = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids) -> str:
        return bytes(int(t) for t in token_ids if 0 <= int(t) < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None


def make_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None) -> AbstractTokenizer:
    """The tokenizer of one type, without touching any configuration object."""
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(vocab_file)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "SPMTokenizer":
        return SPMTokenizer(vocab_file)
    if tokenizer_type == "CharLevelTokenizer":
        return CharLevelTokenizer()
    raise TokenizerError(f"tokenizer-type {tokenizer_type!r} is not one of {', '.join(_TYPES)}")


def build_tokenizer(args) -> AbstractTokenizer:
    """Build the tokenizer named by ``args.tokenizer_type`` and set ``args.padded_vocab_size``."""
    tokenizer_type = args.tokenizer_type
    if tokenizer_type is None:
        raise TokenizerError("tokenizer-type is not set")
    if args.rank == 0:
        print(f"> building {tokenizer_type} tokenizer ...", flush=True)
    tokenizer = make_tokenizer(tokenizer_type, args.vocab_file, args.merge_file)
    args.padded_vocab_size = _vocab_size_with_padding(tokenizer.vocab_size, args)
    return tokenizer


def _vocab_size_with_padding(orig_vocab_size: int, args) -> int:
    """Round the vocabulary up to a multiple of ``make_vocab_size_divisible_by * model_parallel_size``.

    The padding keeps the embedding matrix evenly split across tensor-parallel ranks and GPU-friendly.
    """
    multiple = int(args.make_vocab_size_divisible_by) * int(args.model_parallel_size)
    if multiple <= 0:
        raise TokenizerError(f"make-vocab-size-divisible-by x model-parallel-size must be positive, got {multiple}")
    after = -(-int(orig_vocab_size) // multiple) * multiple
    if args.rank == 0:
        print(f" > padded vocab (size: {orig_vocab_size}) with {after - orig_vocab_size} dummy tokens "
              f"(new size: {after})", flush=True)
    return after
