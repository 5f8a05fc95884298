"""A named corpus from a folder of ``.txt`` books (PG19's layout): whole books held out for validation and test.

    python data_prep/prepare_data.py pg19 --source ../shared/data/pg19            # Pythia's 20B tokenizer
    python data_prep/prepare_data.py pg19 --source DIR --vocab-file tok.json       # another tokenizer
    python data_prep/prepare_data.py pg19 --source DIR --train-tokenizer 8192      # BPE trained on the train books

Writes, under ``<data-dir>/<name>/`` (``name`` defaults to ``pg19``):

- ``pg19_{train,valid,test}_text_document.{bin,idx}``: one document per book (end-of-document id appended),
  books in name order, for ``train-data-paths`` / ``valid-data-paths`` / ``test-data-paths``;
- ``manifest.json``: the source folder, the tokenizer (path and sha256), the split seed, and per split the
  books (name, bytes, sha256) and the token count;
- ``tokenizer.json`` with ``--train-tokenizer`` (trained on the train split only, so no held-out text leaks in).

The split depends only on the books' file names and the seed: books are ranked by
``sha256("<seed>/<file name>")``; the first ``test_books`` are the test split, the next ``valid_books`` the
validation split, the rest train. Listing order, file dates and the machine do not matter, and a book is in
exactly one split. Rerunning with the same books, tokenizer and seed rebuilds nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT_SEED = 1234
DEFAULT_HELD_OUT_BOOKS = 4
TOKENIZER_BESIDE_SOURCE = "20B_tokenizer.json"  # Pythia's tokenizer, as ../shared/data/ holds it next to pg19/


class Pg19Error(ValueError):
    """Bad input for the pg19 builder; the message names the option, folder or file."""


def list_books(source: str) -> List[str]:
    """The non-empty ``.txt`` file names in ``source``, sorted."""
    if not os.path.isdir(source):
        raise Pg19Error(f"--source {source}: not a folder")
    names = sorted(n for n in os.listdir(source)
                   if n.endswith(".txt") and os.path.isfile(os.path.join(source, n))
                   and os.path.getsize(os.path.join(source, n)) > 0)
    if not names:
        raise Pg19Error(f"--source {source}: no non-empty .txt book in this folder")
    return names


def split_books(names: List[str], valid_books: int = DEFAULT_HELD_OUT_BOOKS,
                test_books: int = DEFAULT_HELD_OUT_BOOKS, seed: int = DEFAULT_SPLIT_SEED) -> Dict[str, List[str]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` (each sorted): whole books, ranked by a seeded hash."""
    if valid_books < 1 or test_books < 1:
        raise Pg19Error(f"--valid-books and --test-books must be >= 1, got {valid_books} and {test_books}")
    unique = sorted(set(names))
    if len(unique) != len(names):
        raise Pg19Error("book names repeat: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    if len(unique) < valid_books + test_books + 1:
        raise Pg19Error(f"{len(unique)} books cannot hold {test_books} test + {valid_books} validation books "
                        f"and leave one to train on")
    ranked = sorted(unique, key=lambda n: hashlib.sha256(f"{seed}/{n}".encode()).hexdigest())
    return {"test": sorted(ranked[:test_books]),
            "valid": sorted(ranked[test_books:test_books + valid_books]),
            "train": sorted(ranked[test_books + valid_books:])}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split_prefix(out_dir: str, split: str) -> str:
    """The dataset prefix of one split (what ``*-data-paths`` take)."""
    return os.path.join(out_dir, f"pg19_{split}_text_document")


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def default_vocab_file(source: str) -> str:
    """Pythia's ``20B_tokenizer.json`` beside the source folder (``../shared/data/`` holds both)."""
    return os.path.join(os.path.dirname(os.path.abspath(source)), TOKENIZER_BESIDE_SOURCE)


def build_pg19(source: str, data_dir: str = "data", name: str = "pg19", vocab_file: Optional[str] = None,
               train_tokenizer: Optional[int] = None, valid_books: int = DEFAULT_HELD_OUT_BOOKS,
               test_books: int = DEFAULT_HELD_OUT_BOOKS, seed: int = DEFAULT_SPLIT_SEED, workers: int = 1,
               max_books: Optional[int] = None, force: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Builds (or finds up to date) the corpus; returns ``{"train"|"valid"|"test": prefix, "tokenizer": path,
    "manifest": path, "dir": out_dir}``. ``max_books``: only the first N books by name (quick trials)."""
    from data_prep import preprocess_data
    from megatron.data import indexed_dataset

    if vocab_file is not None and train_tokenizer is not None:
        raise Pg19Error("give --vocab-file or --train-tokenizer, not both")
    books = list_books(source)
    if max_books is not None:
        if max_books < 1:
            raise Pg19Error(f"--max-books must be >= 1, got {max_books}")
        books = books[:max_books]
    splits = split_books(books, valid_books, test_books, seed)
    out_dir = os.path.join(data_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    if train_tokenizer is None:
        vocab_file = vocab_file or default_vocab_file(source)
        if not os.path.isfile(vocab_file):
            raise Pg19Error(f"--vocab-file {vocab_file}: no such file (Pythia's 20B_tokenizer.json is looked for "
                            f"beside the --source folder; give --vocab-file or --train-tokenizer N)")
    book_info = {n: {"book": n, "bytes": os.path.getsize(os.path.join(source, n)),
                     "sha256": sha256_file(os.path.join(source, n))} for n in books}
    inputs = {"source": os.path.abspath(source), "split_seed": seed, "valid_books": valid_books,
              "test_books": test_books, "train_tokenizer": train_tokenizer,
              "books": {s: [book_info[n] for n in splits[s]] for s in SPLITS}}
    manifest_path = os.path.join(out_dir, "manifest.json")

    if train_tokenizer is not None:
        vocab_file = os.path.join(out_dir, "tokenizer.json")
        previous = _read_manifest(manifest_path)
        same_books = previous is not None and previous.get("books") == inputs["books"] \
            and previous.get("train_tokenizer") == train_tokenizer
        if force or not same_books or not os.path.isfile(vocab_file):
            from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

            texts = (_read_text(os.path.join(source, n)) for n in splits["train"])
            save_tokenizer(train_bpe_tokenizer(texts, train_tokenizer), vocab_file)
            log(f"pg19: trained {vocab_file} (vocab {train_tokenizer}) on {len(splits['train'])} train books")
    inputs["tokenizer"] = os.path.abspath(vocab_file)
    inputs["tokenizer_sha256"] = sha256_file(vocab_file)

    out = {s: split_prefix(out_dir, s) for s in SPLITS}
    out.update({"tokenizer": vocab_file, "manifest": manifest_path, "dir": out_dir})
    previous = _read_manifest(manifest_path)
    if not force and previous is not None and {k: previous.get(k) for k in inputs} == inputs \
            and all(_dataset_valid(indexed_dataset, out[s]) for s in SPLITS):
        log(f"pg19: {out_dir} is up to date ({', '.join(f'{s} {len(splits[s])} books' for s in SPLITS)})")
        return out
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the datasets are about to change: no manifest may vouch for a mix
    tokens = {}
    for split in SPLITS:
        argv = ["--input", ",".join(os.path.join(source, n) for n in splits[split]),
                "--output-prefix", os.path.join(out_dir, f"pg19_{split}"), "--tokenizer-type", "HFTokenizer",
                "--vocab-file", vocab_file, "--append-eod", "--workers", str(workers), "--log-interval", "1000"]
        stats = preprocess_data.preprocess(preprocess_data.get_args(argv))
        if stats["documents"] != len(splits[split]):
            raise Pg19Error(f"pg19 {split}: {len(splits[split])} books gave {stats['documents']} documents "
                            f"(a book tokenised to nothing?)")
        tokens[split] = int(stats["tokens"])
        log(f"pg19 {split}: {len(splits[split])} books, {tokens[split]:,} tokens -> {out[split]}")
    _write_json(manifest_path, dict(inputs, tokens=tokens))
    return out


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_manifest(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dataset_valid(indexed_dataset, prefix: str) -> bool:
    try:
        indexed_dataset.make_dataset(prefix)
        return True
    except (indexed_dataset.IndexedDatasetError, OSError):
        return False


def read_manifest(out_dir: str) -> dict:
    """The manifest of a built corpus (for consumers such as bench/fidelity.py)."""
    path = os.path.join(out_dir, "manifest.json")
    manifest = _read_manifest(path)
    if manifest is None:
        raise Pg19Error(f"{path}: missing or unreadable; build the corpus with prepare_data.py pg19 first")
    return manifest
