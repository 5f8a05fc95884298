"""Reading documents from corpus files: jsonl (plain, ``.gz``, ``.zst``) and plain text files.

A jsonl file holds one JSON object per line, one document per object (the text under each of the
requested keys). Any other file is plain text and is one document, as lm_dataformat (which GPT-NeoX's
preprocessing uses) treats ``.txt`` files. Shared by the preprocessing script and the tokenizer trainer.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from typing import Iterator

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


class CorpusError(ValueError):
    """An input file is missing, empty, or holds a record that cannot be read."""


def is_jsonl(path: str) -> bool:
    return path.endswith(_JSONL_SUFFIXES)


def open_text(path: str):
    """A text-mode reader for a plain, gzip or zstandard file (decoded as UTF-8)."""
    if not os.path.isfile(path):
        raise CorpusError(f"input file {path} does not exist")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_raw_records(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, raw_record)``: each non-blank jsonl line, or the whole text file once.

    Records stay unparsed so that JSON decoding can happen in worker processes.
    """
    try:
        with open_text(path) as f:
            if is_jsonl(path):
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield lineno, line
            else:
                text = f.read()
                if text:
                    yield 1, text
    except UnicodeDecodeError as e:
        raise CorpusError(f"input file {path} is not UTF-8 text: {e}") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise CorpusError(f"input file {path} does not exist") from None
        raise CorpusError(f"input file {path} cannot be read: {e}") from None


def decode_record(path: str, lineno: int, raw: str, keys: tuple[str, ...]) -> list[str]:
    """The texts under ``keys`` of one record (a plain-text record is the text for every key)."""
    if not is_jsonl(path):
        return [raw for _ in keys]
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            raise CorpusError(f"{path}:{lineno}: no key {key!r} (keys present: {sorted(obj)[:10]}); "
                              f"set --jsonl-keys")
        value = obj[key]
        if not isinstance(value, str):
            raise CorpusError(f"{path}:{lineno}: key {key!r} holds {type(value).__name__}, not text")
        texts.append(value)
    return texts


def iter_texts(paths: list[str], keys: tuple[str, ...] = ("text",)) -> Iterator[str]:
    """Every text of every record of every file, in order (errors on a file with no records)."""
    for path in paths:
        n = 0
        for lineno, raw in iter_raw_records(path):
            n += 1
            yield from decode_record(path, lineno, raw, keys)
        if n == 0:
            raise CorpusError(f"input file {path} contains no documents")
