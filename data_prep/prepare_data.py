"""Fetch and tokenise named corpora.

    python data_prep/prepare_data.py default        # offline: Austen + King James Bible, ~9 MB of text
    python data_prep/prepare_data.py enwik8         # needs internet (mattmahoney.net)
    python data_prep/prepare_data.py pile_pythia    # needs internet and ~700 GB: Pythia's pre-tokenised Pile
    python data_prep/prepare_data.py pg19 --source DIR   # a folder of .txt books, whole books held out

``default`` writes, under ``<data-dir>/default/``:

- ``tokenizer.json``: byte-level BPE (``<|endoftext|>`` = 0, ``<|padding|>`` = 1) trained on the train split;
- ``default_text_document.{bin,idx}``: every document (shuffled chapters), for ``data-path`` + ``split``;
- ``default_{train,valid,test}_text_document.{bin,idx}``: a fixed 96/2/2 document split, for
  ``train-data-paths`` / ``valid-data-paths`` / ``test-data-paths``;
- ``raw/``: the downloaded packages and ``corpus.jsonl`` (one chapter per line).

Every step is skipped when its output exists (``--force`` redoes them), and every output is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import default_corpus  # noqa: E402
from data_prep import pg19_corpus  # noqa: E402
from data_prep import preprocess_data  # noqa: E402
from data_prep.debian_packages import PackageError, apt_available  # noqa: E402
from megatron.cli import HelpFormatter  # noqa: E402
from megatron.data import indexed_dataset  # noqa: E402

SHUFFLE_SEED = 1234
SPLIT_PERIOD = 50  # of every 50 shuffled documents: 48 train, 1 valid, 1 test


class PrepareError(RuntimeError):
    """A corpus could not be prepared; the message says which step and why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_jsonl(path: str, records) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _newer_than(outputs: list[str], inputs: list[str]) -> bool:
    """Every output exists and none is older than any input (an input redone means redo the output)."""
    if not all(os.path.exists(p) for p in outputs):
        return False
    return min(os.path.getmtime(p) for p in outputs) >= max((os.path.getmtime(p) for p in inputs), default=0)


def _dataset_ok(prefix: str, inputs: tuple[str, ...] = ()) -> bool:
    files = [indexed_dataset.data_file_path(prefix), indexed_dataset.index_file_path(prefix)]
    if not _newer_than(files, list(inputs)):
        return False
    try:
        indexed_dataset.make_dataset(prefix)
        return True
    except indexed_dataset.IndexedDatasetError as e:
        _log(f"{prefix} exists but is invalid ({e}); rebuilding")
        return False


def build_default_corpus(raw_dir: str, with_bible: bool, max_docs: int | None, force: bool) -> str:
    """``raw_dir/corpus.jsonl``: shuffled chapter documents with their source. Returns its path."""
    corpus = os.path.join(raw_dir, "corpus.jsonl")
    if os.path.exists(corpus) and not force:
        _log(f"corpus {corpus} exists: skipping download")
        return corpus
    os.makedirs(raw_dir, exist_ok=True)
    try:
        if apt_available():
            sources = default_corpus.fetch_from_debian(raw_dir, with_bible=with_bible, log=_log)
        else:
            _log("apt-get not available: downloading the same texts from Project Gutenberg")
            sources = default_corpus.fetch_from_gutenberg(raw_dir, with_bible=with_bible, log=_log)
    except (PackageError, default_corpus.CorpusSourceError) as e:
        raise PrepareError(f"could not fetch the default corpus: {e}") from None
    records = [{"text": text, "source": name, "chapter": i}
               for name in sorted(sources) for i, text in enumerate(sources[name])]
    if not records:
        raise PrepareError("the default corpus sources produced no documents")
    # Shuffle whole chapters so that contiguous `split` ranges mix the books.
    random.Random(SHUFFLE_SEED).shuffle(records)
    if max_docs is not None:
        records = records[:max_docs]
    _write_jsonl(corpus, records)
    chars = sum(len(r["text"]) for r in records)
    _log(f"wrote {corpus}: {len(records)} documents, {chars / 1e6:.1f} M characters from {', '.join(sorted(sources))}")
    return corpus


def split_of(i: int) -> str:
    r = i % SPLIT_PERIOD
    return "valid" if r == SPLIT_PERIOD - 2 else "test" if r == SPLIT_PERIOD - 1 else "train"


def prepare_default(data_dir: str, vocab_size: int, workers: int, with_bible: bool = True,
                    max_docs: int | None = None, force: bool = False) -> dict:
    """Build the default corpus under ``data_dir/default``; returns the output paths."""
    from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

    out_dir = os.path.join(data_dir, "default")
    raw_dir = os.path.join(out_dir, "raw")
    t0 = time.time()
    corpus = build_default_corpus(raw_dir, with_bible, max_docs, force)
    records = _read_jsonl(corpus)
    splits = {s: [r for i, r in enumerate(records) if split_of(i) == s] for s in ("train", "valid", "test")}

    tok_path = os.path.join(out_dir, "tokenizer.json")
    if not force and _newer_than([tok_path], [corpus]):
        _log(f"tokenizer {tok_path} exists: skipping training")
    else:
        t = time.time()
        tok = train_bpe_tokenizer((r["text"] for r in splits["train"]), vocab_size)
        save_tokenizer(tok, tok_path)
        _log(f"trained {tok_path} (vocab {tok.get_vocab_size()}) in {time.time() - t:.1f} s")

    full = os.path.join(out_dir, "default")
    full_prefix = f"{full}_text_document"
    if force or not _dataset_ok(full_prefix, (corpus, tok_path)):
        args = preprocess_data.get_args(["--input", corpus, "--output-prefix", full, "--tokenizer-type",
                                         "HFTokenizer", "--vocab-file", tok_path, "--append-eod",
                                         "--workers", str(workers), "--log-interval", "1000"])
        preprocess_data.preprocess(args)
    else:
        _log(f"dataset {full_prefix} exists: skipping tokenisation")

    # The split datasets copy sequences out of the full one: no second tokenisation.
    out = {"tokenizer": tok_path, "all": full_prefix, "corpus": corpus}
    ds = indexed_dataset.make_dataset(full_prefix)
    if len(ds) != len(records):
        raise PrepareError(f"{full_prefix} holds {len(ds)} documents but {corpus} has {len(records)}; "
                           f"rerun with --force")
    for split in ("train", "valid", "test"):
        prefix = os.path.join(out_dir, f"default_{split}_text_document")
        out[split] = prefix
        if not force and _dataset_ok(prefix, (indexed_dataset.index_file_path(full_prefix),)):
            continue
        with indexed_dataset.make_builder(indexed_dataset.data_file_path(prefix), dtype=ds.dtype) as b:
            for i in range(len(ds)):
                if split_of(i) == split:
                    b.add_item(ds[i])
                    b.end_document()
            b.finalize(indexed_dataset.index_file_path(prefix))
    for split in ("train", "valid", "test"):
        d = indexed_dataset.make_dataset(out[split])
        _log(f"{split}: {len(d)} documents, {int(d.sizes.sum()):,} tokens -> {out[split]}")
    _log(f"default corpus ready in {time.time() - t0:.1f} s: data-path {full_prefix}, vocab-file {tok_path}")
    return out


ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


def prepare_enwik8(data_dir: str, tokenizer_type: str, vocab_file, merge_file, workers: int,
                   force: bool = False) -> dict:
    """enwik8 (first 100 MB of an English Wikipedia dump) as one document; needs internet."""
    import zipfile

    out_dir = os.path.join(data_dir, "enwik8")
    zpath = os.path.join(out_dir, "enwik8.zip")
    try:
        default_corpus.download(ENWIK8_URL, zpath)
    except default_corpus.CorpusSourceError as e:
        raise PrepareError(f"{e}. The 'enwik8' corpus needs internet access; the offline corpus is 'default'.") \
            from None
    txt = os.path.join(out_dir, "enwik8.txt")
    if force or not os.path.exists(txt):
        with zipfile.ZipFile(zpath) as z:
            data = z.read("enwik8")
        tmp = f"{txt}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, txt)
    prefix = os.path.join(out_dir, "enwik8")
    if force or not _dataset_ok(f"{prefix}_text_document"):
        argv = ["--input", txt, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type, "--append-eod",
                "--workers", str(workers)]
        if vocab_file:
            argv += ["--vocab-file", vocab_file]
        if merge_file:
            argv += ["--merge-file", merge_file]
        preprocess_data.preprocess(preprocess_data.get_args(argv))
    return {"all": f"{prefix}_text_document"}


PILE_PYTHIA_URL = "https://huggingface.co/datasets/EleutherAI/pile-deduped-pythia-preshuffled/resolve/main/{name}"
PILE_PYTHIA_SHARDS = 21  # document-00000-of-00020.bin ... document-00020-of-00020.bin


def prepare_pile_pythia(data_dir: str, keep_shards: bool = False) -> dict:
    """Pythia's pre-tokenised, pre-shuffled deduplicated Pile: shards joined into ``document.bin/.idx``."""
    out_dir = os.path.join(data_dir, "pile_pythia")
    prefix = os.path.join(out_dir, "document")
    if _dataset_ok(prefix):
        _log(f"{prefix} exists")
        return {"all": prefix}
    names = [f"document-{i:05d}-of-{PILE_PYTHIA_SHARDS - 1:05d}.bin" for i in range(PILE_PYTHIA_SHARDS)]
    try:
        idx = default_corpus.download(PILE_PYTHIA_URL.format(name="document.idx"), os.path.join(out_dir, "document.idx.download"))
        bin_tmp = f"{prefix}.bin.tmp"
        with open(bin_tmp, "wb") as out:
            for name in names:
                shard = os.path.join(out_dir, name)
                _log(f"downloading {name}")
                default_corpus.download(PILE_PYTHIA_URL.format(name=name), shard, timeout=300)
                with open(shard, "rb") as f:
                    while chunk := f.read(64 << 20):
                        out.write(chunk)
                if not keep_shards:
                    os.remove(shard)
    except default_corpus.CorpusSourceError as e:
        raise PrepareError(f"{e}. The 'pile_pythia' corpus needs internet access (huggingface.co) and ~700 GB "
                           f"of disk; the offline corpus is 'default'.") from None
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx, f"{prefix}.idx")
    indexed_dataset.make_dataset(prefix)  # validates the joined shards against the index
    return {"all": prefix}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("name", nargs="?", default="default", choices=["default", "enwik8", "pile_pythia", "pg19"])
    p.add_argument("--data-dir", default="data", help="where corpora are written (default: data)")
    p.add_argument("--vocab-size", type=int, default=8192, help="default corpus: BPE vocabulary size")
    p.add_argument("--no-bible", action="store_true", help="default corpus: Austen novels only")
    p.add_argument("--max-docs", type=int, default=None, help="default corpus: keep only this many documents")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes")
    p.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    p.add_argument("--tokenizer-type", default="CharLevelTokenizer", help="enwik8: tokenizer type")
    p.add_argument("--vocab-file", default=None,
                   help="enwik8: tokenizer vocab file; pg19: tokenizer.json (default: 20B_tokenizer.json beside "
                        "--source)")
    p.add_argument("--merge-file", default=None, help="enwik8: tokenizer merge file")
    p.add_argument("--keep-shards", action="store_true", help="pile_pythia: keep the downloaded shards")
    p.add_argument("--source", default=None, help="pg19: the folder of .txt books")
    p.add_argument("--out-name", default="pg19", help="pg19: output folder under --data-dir")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="pg19: train a byte-level BPE of this size on the train books instead of --vocab-file")
    p.add_argument("--valid-books", type=int, default=pg19_corpus.DEFAULT_HELD_OUT_BOOKS,
                   help="pg19: whole books held out for validation")
    p.add_argument("--test-books", type=int, default=pg19_corpus.DEFAULT_HELD_OUT_BOOKS,
                   help="pg19: whole books held out for test")
    p.add_argument("--max-books", type=int, default=None, help="pg19: only the first N books by name")
    p.add_argument("--split-seed", type=int, default=pg19_corpus.DEFAULT_SPLIT_SEED,
                   help="pg19: seed of the book split")
    a = p.parse_args(argv)
    try:
        if a.name == "default":
            prepare_default(a.data_dir, a.vocab_size, a.workers, with_bible=not a.no_bible,
                            max_docs=a.max_docs, force=a.force)
        elif a.name == "pg19":
            if not a.source:
                raise PrepareError("pg19 needs --source DIR (a folder of .txt books)")
            pg19_corpus.build_pg19(a.source, a.data_dir, a.out_name, a.vocab_file,
                                   a.train_tokenizer, a.valid_books, a.test_books, a.split_seed, a.workers,
                                   max_books=a.max_books, force=a.force, log=_log)
        elif a.name == "enwik8":
            prepare_enwik8(a.data_dir, a.tokenizer_type, a.vocab_file, a.merge_file, a.workers, a.force)
        else:
            prepare_pile_pythia(a.data_dir, a.keep_shards)
    except (PrepareError, pg19_corpus.Pg19Error, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
