"""Token ids of the SepLLM separators for any tokenizer.

SepLLM keeps the keys of separator tokens visible to every later query. The reference's configs list the
ids of exactly these nine single characters (``. , ? ! ; :`` space, tab, newline); with the Pythia
``20B_tokenizer.json`` they are ``[15, 13, 32, 2, 28, 27, 209, 186, 187]``.
"""
from __future__ import annotations

SEPARATOR_CHARS: tuple[str, ...] = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")


def _byte_level_char(ch: str) -> str | None:
    """GPT-2's byte-to-unicode image of a one-byte character ('Ġ' for space, 'ĉ' tab, 'Ċ' newline)."""
    b = ch.encode("utf-8")
    if len(b) != 1:
        return None
    code = b[0]
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return chr(code)
    extra = [c for c in range(256) if c not in printable]
    return chr(256 + extra.index(code))


def separator_id(tokenizer, ch: str) -> int:
    """The single token id of separator character ``ch``.

    First the tokenizer's own encoding of ``ch`` (must be exactly one token); otherwise the vocabulary
    entry of the character itself, its byte-level form, or SentencePiece's word-boundary piece for space.
    """
    ids = list(tokenizer.tokenize(ch))
    if len(ids) == 1:
        return int(ids[0])
    candidates = [ch, _byte_level_char(ch)]
    if ch == " ":
        candidates.append("\u2581")
    for cand in candidates:
        if cand is None:
            continue
        i = tokenizer.token_to_id(cand)
        if i is not None:
            return int(i)
    raise ValueError(f"{tokenizer!r} has no single token for separator {ch!r}: it encodes to {ids} and none of "
                     f"{[c for c in candidates if c]} is in its vocabulary")


def separator_ids(tokenizer) -> list[int]:
    """Ids of ``. , ? ! ; :`` space, tab, newline, in that order (the ``separator_token_ids`` config key)."""
    return [separator_id(tokenizer, ch) for ch in SEPARATOR_CHARS]
