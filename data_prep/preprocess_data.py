"""Tokenise documents into the mmap ``.bin``/``.idx`` format, with GPT-NeoX's command line.

    python data_prep/preprocess_data.py --input a.jsonl.zst,b.jsonl --output-prefix data/mydata \\
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --workers 2

writes ``data/mydata_text_document.bin/.idx`` (one pair per ``--jsonl-keys`` key). Inputs are jsonl (plain,
``.gz``, ``.zst``; one document per line) or plain text files (one document per file). Output is the same for
the same input whatever ``--workers`` is: batches are tokenised in parallel but written in input order. Each
document is one sequence (``--append-eod`` adds the end-of-document id to it); documents that tokenise to
nothing are skipped. Outputs are written under temporary names and renamed when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import HelpFormatter  # noqa: E402
from megatron.data import indexed_dataset  # noqa: E402
from megatron.tokenizer.corpus_reader import CorpusError, decode_record, iter_raw_records  # noqa: E402
from megatron.tokenizer.tokenizer import make_tokenizer  # noqa: E402

# Records per worker task, and a character budget so a batch of whole books stays small.
_BATCH_DOCS = 64
_BATCH_CHARS = 4 << 20


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="comma-separated list of jsonl (plain/.gz/.zst) or plain text files")
    g.add_argument("--jsonl-keys", nargs="+", default=["text"], help="keys of the jsonl objects to tokenise")
    g.add_argument("--num-docs", type=int, default=None, help="stop after this many documents (all inputs)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   choices=["HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer"],
                   help="tokenizer class, as GPT-NeoX's tokenizer_type")
    g.add_argument("--vocab-file", default=None, help="tokenizer.json, GPT-2 vocab.json or SentencePiece model")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    g.add_argument("--ftfy", action="store_true", help="repair mojibake with ftfy.fix_text before tokenising")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"],
                   help="output format; mmap is the one GPT-NeoX reads today (accepted for its command line)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenising processes")
    g.add_argument("--log-interval", type=int, default=100, help="documents between progress lines")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.num_docs is not None and args.num_docs < 1:
        p.error(f"--num-docs must be >= 1, got {args.num_docs}")
    if args.log_interval < 1:
        p.error(f"--log-interval must be >= 1, got {args.log_interval}")
    args.input = [s for s in args.input.split(",") if s]
    if not args.input:
        p.error("--input names no files")
    return args


class _Encoder:
    """Per-process state: the tokenizer and the options. Built once per worker."""

    def __init__(self, args_dict: dict):
        self.keys = tuple(args_dict["jsonl_keys"])
        self.append_eod = args_dict["append_eod"]
        self.use_ftfy = args_dict["ftfy"]
        self.tokenizer = make_tokenizer(args_dict["tokenizer_type"], args_dict["vocab_file"],
                                        args_dict["merge_file"])
        self.dtype = indexed_dataset.best_fitting_dtype(self.tokenizer.vocab_size)
        if self.use_ftfy:
            import ftfy

            self._fix = ftfy.fix_text

    def encode(self, task) -> tuple[list[list[np.ndarray]], int]:
        """Tokenise one batch ``(path, [(lineno, raw), ...])`` -> per document, per key, token arrays."""
        path, records = task
        per_key_texts: list[list[str]] = [[] for _ in self.keys]
        n_bytes = 0
        for lineno, raw in records:
            n_bytes += len(raw)
            for k, text in enumerate(decode_record(path, lineno, raw, self.keys)):
                per_key_texts[k].append(self._fix(text) if self.use_ftfy else text)
        per_key_ids = [self.tokenizer.tokenize_batch(texts) for texts in per_key_texts]
        eod = self.tokenizer.eod
        docs = []
        for d in range(len(records)):
            arrays = []
            for k in range(len(self.keys)):
                ids = per_key_ids[k][d]
                if ids and self.append_eod:
                    ids = list(ids) + [eod]
                arrays.append(np.asarray(ids, dtype=self.dtype))
            docs.append(arrays)
        return docs, n_bytes


_ENCODER: _Encoder | None = None


def _worker_init(args_dict: dict) -> None:
    global _ENCODER
    # One process per core already; the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _ENCODER is None:  # forked workers inherit the parent's encoder; spawned ones load their own
        _ENCODER = _Encoder(args_dict)


def _worker_encode(task):
    return _ENCODER.encode(task)


def _check_inputs(paths: list[str]) -> None:
    """Fail before any work when an input is missing or holds no documents."""
    for path in paths:
        if not os.path.isfile(path):
            raise CorpusError(f"input file {path} does not exist")
        if next(iter_raw_records(path), None) is None:
            raise CorpusError(f"input file {path} contains no documents")


def _tasks(paths: list[str], num_docs: int | None) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    left = num_docs
    for path in paths:
        batch, chars = [], 0
        for rec in iter_raw_records(path):
            batch.append(rec)
            chars += len(rec[1])
            if left is not None:
                left -= 1
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS or left == 0:
                yield path, batch
                batch, chars = [], 0
            if left == 0:
                return
        if batch:
            yield path, batch


def _threaded_in_order(fn, items, stack: contextlib.ExitStack, in_flight: int):
    """``map(fn, items)`` run on a small thread pool, results in input order, at most ``in_flight`` pending."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    pool = stack.enter_context(ThreadPoolExecutor(max_workers=in_flight))
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def output_paths(prefix: str, key: str) -> tuple[str, str]:
    base = f"{prefix}_{key}_document"
    return indexed_dataset.data_file_path(base), indexed_dataset.index_file_path(base)


def preprocess(args: argparse.Namespace, log=sys.stderr) -> dict:
    """Run the preprocessing described by ``args``; returns counts and rates."""
    _check_inputs(args.input)
    args_dict = {k: getattr(args, k) for k in ("jsonl_keys", "append_eod", "ftfy", "tokenizer_type",
                                               "vocab_file", "merge_file")}
    encoder = _Encoder(args_dict)  # also validates the tokenizer before workers start
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    keys = list(args.jsonl_keys)
    print(f"tokenizer {encoder.tokenizer!r}; writing {np.dtype(encoder.dtype).name} tokens to "
          f"{', '.join(output_paths(args.output_prefix, k)[0] for k in keys)}", file=log, flush=True)

    t0 = time.time()
    n_docs = n_empty = n_tokens = n_bytes = 0
    next_log = args.log_interval
    with contextlib.ExitStack() as stack:
        builders = [stack.enter_context(indexed_dataset.make_builder(output_paths(args.output_prefix, k)[0],
                                                                      dtype=encoder.dtype)) for k in keys]
        tasks = _tasks(args.input, args.num_docs)
        if args.workers == 1:
            # The tokenizer releases the GIL and batch-encodes on its own threads; keeping a few batches
            # in flight fills the cores while this thread decodes JSON and writes tokens.
            results = _threaded_in_order(encoder.encode, tasks, stack, in_flight=3)
        else:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            global _ENCODER
            # Forked workers inherit this (not yet used, so single-threaded) encoder instead of each loading
            # the tokenizer again: on small corpora that load is a visible share of the run.
            _ENCODER = encoder
            pool = stack.enter_context(ctx.Pool(args.workers, initializer=_worker_init, initargs=(args_dict,)))
            results = pool.imap(_worker_encode, tasks, chunksize=1)  # imap keeps input order
        for docs, batch_bytes in results:
            n_bytes += batch_bytes
            for arrays in docs:
                if all(a.size == 0 for a in arrays):
                    n_empty += 1
                    continue
                for builder, arr in zip(builders, arrays):
                    builder.add_item(arr)
                    builder.end_document()
                    n_tokens += arr.size
                n_docs += 1
                if n_docs >= next_log:
                    next_log += args.log_interval
                    _progress(log, n_docs, n_tokens, n_bytes, time.time() - t0)
        if n_docs == 0:
            raise CorpusError(f"no document of {', '.join(args.input)} produced any token; nothing written")
        for key, builder in zip(keys, builders):
            builder.finalize(output_paths(args.output_prefix, key)[1])
    elapsed = time.time() - t0
    _progress(log, n_docs, n_tokens, n_bytes, elapsed, final=True)
    if n_empty:
        print(f"skipped {n_empty} documents that tokenised to nothing", file=log, flush=True)
    return {"documents": n_docs, "empty": n_empty, "tokens": n_tokens, "bytes": n_bytes, "seconds": elapsed}


def _progress(log, n_docs: int, n_tokens: int, n_bytes: int, elapsed: float, final: bool = False) -> None:
    dt = max(elapsed, 1e-9)
    head = "done:" if final else "processed"
    print(f"{head} {n_docs} documents in {elapsed:.1f} s ({n_docs / dt:.1f} docs/s, {n_tokens / dt:,.0f} tokens/s, "
          f"{n_bytes / dt / 2**20:.2f} MiB/s)", file=log, flush=True)


def main(argv=None) -> None:
    args = get_args(argv)
    try:
        preprocess(args)
    except (CorpusError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
