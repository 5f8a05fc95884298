#!/usr/bin/env python
"""Streaming perplexity: text streamed token by token through a model with a bounded or a full KV cache.

The reference's command line (Streaming-SepLLM's ``main/evaluate_streaming_inputs_perplexity.py``) runs as it is:

    python tools/streaming_eval.py --model_name_or_path MODEL --init_cache_size 4 --sep_cache_size 64 \
        --local_size 256 --cache_size 800 --enable_kv_cache_manager True --enable_SepLLM True \
        --enable_StreamingLLM False --enable_pos_shift True --num_samples 5000000 --num_eval_tokens 20480 \
        --dataset_name pg19 --task default --split test --output_dir outputs/demo

``--dataset_name`` is ``pg19`` (the local PG19 folder ``--pg19_dir``, ``<dir>/<split>/`` when it exists),
another folder of ``.txt`` books, or one text file. Full attention is all three of ``--enable_kv_cache_manager``,
``--enable_SepLLM`` and ``--enable_StreamingLLM`` False. ``--output_dir`` receives ``log.txt`` (one per-token NLL
a line, as the reference writes it), ``ppl.txt`` (the overall perplexity) and ``summary.jsonl`` (one record per
``--chunk`` tokens and a final one). The cache persists across books, as in the reference.

The project's own form still works: ``--model_dir EXPORT --text_file book.txt --cache sepcache --pe_shift``,
``--synthetic N`` or ``--data_path PREFIX`` (an mmap dataset), ``--output records.jsonl``.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run by path (python tools/streaming_eval.py): the checkout is one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = ("sepcache", "streaming", "full")
PG19_ENV = "SEPLLM_PG19_DIR"


class BadInput(ValueError):
    """A flag, file or value that cannot work; reported as one line before any model is loaded."""


def str2bool(value) -> bool:
    """The reference's ``True`` / ``False`` values (also true/false, 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


# ---------------------------------------------------------------------------------------------- caches
def resolve_cache_kind(args) -> str:
    """``full`` / ``sepcache`` / ``streaming`` from the reference's three switches or ``--cache``."""
    switches = {k: getattr(args, k) for k in ("enable_kv_cache_manager", "enable_SepLLM", "enable_StreamingLLM")}
    if all(v is None for v in switches.values()):
        return args.cache or "sepcache"
    if args.cache is not None:
        raise BadInput("give either --cache or the reference's --enable_kv_cache_manager/--enable_SepLLM/"
                       "--enable_StreamingLLM switches, not both")
    manager, sep, streaming = (bool(v) for v in switches.values())
    if sep and streaming:
        raise BadInput("--enable_SepLLM True and --enable_StreamingLLM True: choose one mode")
    if not manager:
        if sep or streaming:
            mode = "--enable_SepLLM" if sep else "--enable_StreamingLLM"
            raise BadInput(f"{mode} True needs --enable_kv_cache_manager True (all three False is full attention)")
        return "full"
    if not (sep or streaming):
        raise BadInput("--enable_kv_cache_manager True needs --enable_SepLLM True or --enable_StreamingLLM True")
    return "sepcache" if sep else "streaming"


def check_sizes(kind: str, init_cache_size: int, sep_cache_size: int, local_size: int, cache_size: int) -> None:
    """The reference's size rules, checked before the model loads."""
    if kind == "full":
        return
    for name, value in (("--init_cache_size", init_cache_size), ("--sep_cache_size", sep_cache_size),
                        ("--local_size", local_size), ("--cache_size", cache_size)):
        if value is None or value < 0:
            raise BadInput(f"{name} must be a non-negative integer, got {value}")
    if local_size < 1:
        raise BadInput(f"--local_size must be >= 1, got {local_size}")
    if kind == "streaming" and cache_size != init_cache_size + local_size:
        raise BadInput(f"StreamingLLM needs --cache_size == --init_cache_size + --local_size, got {cache_size} != "
                       f"{init_cache_size} + {local_size}")
    if kind == "sepcache" and init_cache_size + sep_cache_size + local_size >= cache_size:
        raise BadInput(f"SepLLM needs --init_cache_size + --sep_cache_size + --local_size < --cache_size, got "
                       f"{init_cache_size} + {sep_cache_size} + {local_size} >= {cache_size}")


def make_cache(model, kind: str, init_cache_size=4, sep_cache_size=64, local_size=256, cache_size=512,
               pe_shift=True, separator_token_ids=None):
    """The KV cache of one streaming run (sizes are ignored for ``full``).

    ``streaming`` mirrors StreamingLLM's cache, which evicts after each forward down to ``a + w = c`` entries,
    so every query sees the ``a`` initial tokens, the ``w`` previous ones and itself: a SepCache without
    separators whose local window is ``w + 1`` (itself included) selects exactly that set, compressing at
    the same step; between steps it holds ``c + 1`` KVs, the most StreamingLLM holds during a forward.
    """
    from transformers.cache_utils import DynamicCache

    from megatron.hf.sep_cache import SepCache

    if kind == "full":
        return DynamicCache()
    if kind not in CACHES:
        raise BadInput(f"unknown cache {kind!r}; choose one of {CACHES}")
    if kind == "streaming":
        return SepCache.from_model_config(model.config, init_cache_size=init_cache_size, sep_cache_size=0,
                                          local_size=local_size + 1, cache_size=init_cache_size + local_size + 2,
                                          separator_token_ids=[], PADDING_ID=None, APPLY_PE_SHIFT=pe_shift)
    seps = {} if separator_token_ids is None else {"separator_token_ids": list(separator_token_ids)}
    return SepCache.from_model_config(model.config, init_cache_size=init_cache_size, sep_cache_size=sep_cache_size,
                                      local_size=local_size, cache_size=cache_size, USE_MAX_SEP_CACHE=True,
                                      PADDING_ID=None, APPLY_PE_SHIFT=pe_shift, **seps)


def streaming_separators(model, tokenizer, explicit: Optional[List[int]] = None) -> List[int]:
    """Separator ids: given, else a trained export's own, else the reference's preset for the model family
    when the vocabulary holds it, else the separator characters of the model's tokenizer."""
    from megatron.hf.sep_cache import MODEL_TYPE_PRESETS

    if explicit:
        return [int(t) for t in explicit]
    trained = getattr(model.config, "separator_token_ids", None)
    if trained and list(trained) != [-1]:
        return [int(t) for t in trained]
    preset = MODEL_TYPE_PRESETS.get(getattr(model.config, "model_type", None))
    if preset and max(preset["separator_token_ids"]) < model.config.vocab_size:
        return list(preset["separator_token_ids"])
    hf = getattr(tokenizer, "hf_tokenizer", None) or getattr(tokenizer, "tokenizer", None)
    if hf is None:
        raise BadInput("no separator ids: give --separator_token_ids (the model has no trained ones, no preset "
                       "fits its vocabulary and no tokenizer is loaded)")
    from megatron.tokenizer.separators import separator_ids

    return separator_ids(_HFTokenizerView(hf))


class _HFTokenizerView:
    """The two calls ``megatron.tokenizer.separators`` makes, on an HF tokenizer."""

    def __init__(self, hf):
        self.hf = hf

    def tokenize(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        vocab = self.hf.get_vocab()
        return vocab.get(token)


def kv_slots_and_bytes(cache) -> (int, int):
    slots, size = 0, 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        slots = max(slots, keys.shape[-2])
        size += keys.numel() * keys.element_size() + layer.values.numel() * layer.values.element_size()
    return slots, size


# ---------------------------------------------------------------------------------------------- the stream
class _Records:
    """Per-``chunk`` records of a stream: NLL values stay on the device and are written once per record (one
    host sync per record, not per token)."""

    def __init__(self, cache, device, chunk: int, log=None, nll_file=None, bar=None,
                 time_limit_s: Optional[float] = None):
        self.cache, self.device, self.chunk, self.log, self.nll_file, self.bar = cache, device, chunk, log, \
            nll_file, bar
        self.time_limit_s, self.timed_out = time_limit_s, False
        self.records: List[Dict] = []
        self.pending: List[torch.Tensor] = []  # 0-d or 1-d NLL tensors
        self.pending_count = 0
        self.total_nll, self.total, self.peak = 0.0, 0, 0
        self.t0 = self.t_last = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def out_of_time(self) -> bool:
        """True once a record closes after the time limit (the stream then stops at a record boundary)."""
        if self.time_limit_s is not None and self.pending_count == 0 and self.records and \
                time.time() - self.t0 > self.time_limit_s:
            self.timed_out = True
        return self.timed_out

    def room(self) -> int:
        """Tokens until the next record."""
        return self.chunk - self.pending_count

    def add(self, nll: torch.Tensor) -> None:
        self.pending.append(nll)
        self.pending_count += nll.numel()
        if self.bar is not None:
            self.bar.update(nll.numel())
        if self.pending_count >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.cat([v.reshape(-1) for v in self.pending]).double().cpu()
        self.pending, self.pending_count = [], 0
        if self.nll_file is not None:
            self.nll_file.write("".join(f"{v}\n" for v in values.tolist()))
            self.nll_file.flush()
        chunk_ppl = math.exp(values.mean().item())
        self.total_nll += values.sum().item()
        self.total += values.numel()
        slots, kv_bytes = kv_slots_and_bytes(self.cache)
        now = time.time()
        seconds = now - self.t0
        rec = {"tokens": self.total, "ppl": chunk_ppl, "running_ppl": math.exp(self.total_nll / self.total),
               "kv_slots": slots, "kv_bytes": kv_bytes, "seconds": round(seconds, 2),
               "tokens_per_s": round(self.total / seconds, 2),
               "chunk_tokens_per_s": round(values.numel() / max(now - self.t_last, 1e-9), 2)}
        self.t_last = now
        if self.device.type == "cuda":
            chunk_peak = torch.cuda.max_memory_allocated(self.device)
            self.peak = max(self.peak, chunk_peak)
            rec["peak_mem_bytes"] = self.peak  # since the stream began
            rec["chunk_peak_mem_bytes"] = chunk_peak  # within this record's tokens
            torch.cuda.reset_peak_memory_stats(self.device)
        self.records.append(rec)
        if self.log:
            self.log(json.dumps(rec))
        if self.bar is not None:
            self.bar.set_postfix(ppl=f"{rec['running_ppl']:.2f}", kv=slots, refresh=False)

    def final(self, extra: Optional[Dict] = None) -> List[Dict]:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.total == 0:
            raise BadInput("the stream has no token to predict (every text is shorter than 2 tokens)")
        slots, kv_bytes = kv_slots_and_bytes(self.cache)
        seconds = time.time() - self.t0
        final = {"final": True, "tokens": self.total, "ppl": math.exp(self.total_nll / self.total),
                 "kv_slots": slots, "kv_bytes": kv_bytes, "seconds": round(seconds, 2),
                 "tokens_per_s": round(self.total / seconds, 2)}
        if self.device.type == "cuda":
            final["peak_mem_bytes"] = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        if self.timed_out:
            final["stopped_at_time_limit_s"] = self.time_limit_s
        if getattr(self.cache, "is_sep_cache", False):
            final["compressions"] = self.cache.layers[0].compressions
            final["kv_ratio"] = self.cache.kv_ratio()
        final.update(extra or {})
        self.records.append(final)
        return self.records


@torch.no_grad()
def stream_perplexity(model, tokens, cache, chunk: int = 1024, log=None, nll_file=None,
                      num_eval_tokens: Optional[int] = None, progress: bool = False,
                      chunk_tokens: int = 1, time_limit_s: Optional[float] = None) -> List[Dict]:
    """Feeds every sequence of ``tokens`` (one ``[N]`` int64 tensor or an iterable of them) through ``cache``,
    which persists across sequences; returns one record per chunk of predicted tokens and a final record
    ``{"final": True, "tokens", "ppl", ...}``.

    ``chunk_tokens`` 1 (the reference): one forward per token. More: up to that many tokens per forward
    (``megatron.hf.streaming_fast``), with the same per-token NLL (to float tolerance), the same kept KVs and
    the same records; forwards also end at record boundaries, so every record sees the same cache state.
    ``nll_file``: a text file receiving one NLL a line (the reference's log.txt). ``time_limit_s``: stop at the
    first record boundary past that many seconds (the final record says so).
    """
    device = next(model.parameters()).device
    books = [tokens] if isinstance(tokens, torch.Tensor) else tokens
    rec = _Records(cache, device, chunk, log, nll_file, _progress(num_eval_tokens) if progress else None,
                   time_limit_s)
    if chunk_tokens > 1:
        return _stream_chunked(model, books, cache, rec, num_eval_tokens, chunk_tokens)
    from megatron.hf.streaming_fast import uses_stock_shift

    stock_shift = uses_stock_shift(model, cache)
    done = False
    for book in books:
        book = book.to(device)
        if book.numel() < 2:
            continue
        for i in range(book.numel() - 1):
            ids = book[i:i + 1].view(1, 1)
            kwargs = {}
            if stock_shift:  # stock models rotate at the positions they are given: the cache's slots
                cache.prepare_step(ids)
                kwargs["position_ids"] = cache.step_positions(0)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
            rec.add(F.cross_entropy(out.logits[0, -1:].float(), book[i + 1:i + 2]))
            if num_eval_tokens is not None and rec.total + rec.pending_count >= num_eval_tokens or \
                    rec.out_of_time():
                done = True
                break
        if done:
            break
    return rec.final()


def _stream_chunked(model, books, cache, rec: "_Records", num_eval_tokens: Optional[int], chunk_tokens: int):
    from megatron.hf.streaming_fast import ChunkedStepper, step_summary

    stepper = ChunkedStepper(model, cache, chunk_tokens)
    device = rec.device
    for book in books:
        book = book.to(device)
        i, end = 0, book.numel() - 1
        while i < end:
            left = None if num_eval_tokens is None else num_eval_tokens - rec.total - rec.pending_count
            if left is not None and left <= 0 or rec.out_of_time():
                break
            budget = min(end - i, rec.room(), *(() if left is None else (left,)))
            q = stepper.plan(budget)
            logits = stepper.forward(book[i:i + q].view(1, q))
            rec.add(F.cross_entropy(logits[0].float(), book[i + 1:i + q + 1], reduction="none"))
            i += q
        if num_eval_tokens is not None and rec.total + rec.pending_count >= num_eval_tokens or rec.timed_out:
            break
    return rec.final(step_summary(stepper))


def _progress(total: Optional[int]):
    """A progress bar in tokens with the rate in tokens/s (tqdm's own rate display)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- inputs
def dataset_files(dataset_name: str, split: str, pg19_dir: Optional[str]) -> List[Path]:
    """The text files of ``--dataset_name`` (``pg19``, a folder of books or one file), in name order."""
    if dataset_name == "pg19":
        root = pg19_dir or os.environ.get(PG19_ENV)
        if not root:
            raise BadInput(f"--dataset_name pg19 reads a local PG19 folder: give --pg19_dir DIR or set {PG19_ENV} "
                           f"(no hub is reachable); or pass a folder or a file as --dataset_name")
        path = Path(root)
        if (path / split).is_dir():
            path = path / split
    else:
        path = Path(dataset_name)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BadInput(f"--dataset_name {dataset_name}: {path} is neither a folder of .txt books nor a file")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt" and p.stat().st_size > 0)
    if not files:
        raise BadInput(f"--dataset_name {dataset_name}: the folder {path} holds no non-empty .txt file")
    return files


def text_streams(files: Iterable[Path], tokenizer, num_samples: Optional[int]) -> Iterable[torch.Tensor]:
    """Token tensors of the first ``num_samples`` books, tokenized one at a time as the stream reaches them."""
    for n, path in enumerate(files):
        if num_samples is not None and n >= num_samples:
            return
        yield torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")), dtype=torch.long)


def load_tokens(args, tokenizer) -> torch.Tensor:
    """The project's single-stream inputs: ``--text_file``, ``--data_path`` or ``--synthetic``."""
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as handle:
            ids = tokenizer.encode(handle.read())
    elif args.data_path:
        from megatron.data.indexed_dataset import make_dataset

        data = make_dataset(args.data_path, "mmap")
        ids, i = [], 0
        while len(ids) < (args.max_tokens or 10 ** 12) and i < len(data):
            ids.extend(int(t) for t in data[i])
            i += 1
    elif args.synthetic:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 1000, (args.synthetic,), generator=g)
    else:
        raise BadInput("give --dataset_name, --text_file, --data_path or --synthetic N")
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from megatron.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ref = parser.add_argument_group("the reference's flags")
    ref.add_argument("--model_name_or_path", "--model_dir", dest="model_dir", required=True,
                     help="an HF model directory (stock Llama/Mistral/Qwen2/GPT-NeoX/Falcon, or this project's "
                          "export)")
    ref.add_argument("--init_cache_size", type=int, default=4, help="initial (sink) tokens kept")
    ref.add_argument("--sep_cache_size", type=int, default=64, help="separator slots (SepLLM)")
    ref.add_argument("--local_size", type=int, default=256, help="local window slots")
    ref.add_argument("--cache_size", type=int, default=512, help="most KV slots a layer holds")
    ref.add_argument("--enable_kv_cache_manager", type=str2bool, default=None,
                     help="True: a bounded cache (SepLLM or StreamingLLM); all three switches False: full attention")
    ref.add_argument("--enable_SepLLM", type=str2bool, default=None,
                     help="True: SepCache (initial + separators + window)")
    ref.add_argument("--enable_StreamingLLM", type=str2bool, default=None,
                     help="True: StreamingLLM (initial + window; needs cache_size == init_cache_size + local_size)")
    ref.add_argument("--enable_pos_shift", "--pe_shift", dest="pe_shift", type=str2bool, nargs="?", const=True,
                     default=False, help="positions inside the cache instead of the stream (off unless given, as "
                                         "StreamingLLM's script)")
    ref.add_argument("--num_samples", type=int, default=None, help="books to stream at most (default: all)")
    ref.add_argument("--num_eval_tokens", type=int, default=None, help="stop after this many predicted tokens")
    ref.add_argument("--dataset_name", default=None, help="pg19 (the local folder --pg19_dir), a folder of .txt books, "
                                                          "or one text file")
    ref.add_argument("--task", default="default", help="the dataset configuration; only 'default'")
    ref.add_argument("--split", default="test", help="pg19 split folder under --pg19_dir when it exists")
    ref.add_argument("--output_dir", default=None, help="writes log.txt, ppl.txt and summary.jsonl here")
    own = parser.add_argument_group("this project's flags")
    own.add_argument("--pg19_dir", default=None, help=f"the local PG19 folder (default: ${PG19_ENV})")
    own.add_argument("--text_file", help="a text file to stream")
    own.add_argument("--data_path", help="mmap dataset prefix (.bin/.idx)")
    own.add_argument("--synthetic", type=int, help="N random tokens (memory / speed checks)")
    own.add_argument("--max_tokens", type=int, help="stop the single-stream inputs after this many tokens")
    own.add_argument("--cache", default=None, choices=CACHES,
                     help="sepcache / streaming / full instead of the reference's switches (default: sepcache)")
    own.add_argument("--separator_token_ids", type=lambda s: [int(t) for t in s.split(",") if t.strip()],
                     default=None, help="comma-separated ids (default: trained, preset, or the tokenizer's)")
    own.add_argument("--chunk", type=int, default=1024, help="tokens per summary record")
    own.add_argument("--chunk_tokens", type=int, default=1,
                     help="most tokens per forward: 1 streams token by token (the reference); more runs the "
                          "chunked path (megatron/hf/streaming_fast.py), equal per-token NLL and kept KVs")
    own.add_argument("--dtype", default=None, choices=(None, "fp32", "bf16", "fp16"),
                     help="model dtype (default: the model's own)")
    own.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    own.add_argument("--output", help="JSON lines file of the records (besides --output_dir/summary.jsonl)")
    own.add_argument("--no_progress", action="store_true", help="no progress bar")
    own.add_argument("--allow_cudnn_sdpa", action="store_true",
                     help="keep PyTorch's cuDNN SDPA backend (it plans per KV length: ~4 ms CPU per call "
                          "when the cache grows every step)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.task != "default":
            raise BadInput(f"--task {args.task}: only 'default' (the PG19 configuration) exists")
        if args.chunk < 1:
            raise BadInput(f"--chunk must be >= 1, got {args.chunk}")
        if args.chunk_tokens < 1:
            raise BadInput(f"--chunk_tokens must be >= 1, got {args.chunk_tokens}")
        kind = resolve_cache_kind(args)
        check_sizes(kind, args.init_cache_size, args.sep_cache_size, args.local_size, args.cache_size)
        files = dataset_files(args.dataset_name, args.split, args.pg19_dir) if args.dataset_name else None
        if args.text_file and not os.path.isfile(args.text_file):
            raise BadInput(f"--text_file {args.text_file}: no such file")
        if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
            raise BadInput(f"--model_name_or_path {args.model_dir}: no config.json there")
    except BadInput as err:
        print(f"streaming_eval.py: error: {err}", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and not args.allow_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)  # flash / memory-efficient kernels need no per-shape plan
    from megatron.hf.loading import load_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    needs_tokenizer = files is not None or args.text_file or (kind == "sepcache" and not args.separator_token_ids)
    if needs_tokenizer:
        model, tokenizer = load_export(args.model_dir, device, dtype)
    else:  # token ids need no tokenizer (synthetic streams and mmap datasets)
        from transformers import AutoModelForCausalLM

        kwargs = {"trust_remote_code": True, **({"dtype": dtype} if dtype is not None else {})}
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs).to(device).eval(), None
    try:
        tokens = text_streams(files, tokenizer, args.num_samples) if files is not None else load_tokens(args, tokenizer)
        seps = streaming_separators(model, tokenizer, args.separator_token_ids) if kind == "sepcache" else None
        cache = make_cache(model, kind, args.init_cache_size, args.sep_cache_size, args.local_size, args.cache_size,
                           args.pe_shift, seps)
    except (ValueError, FileNotFoundError) as err:
        print(f"streaming_eval.py: error: {err}", file=sys.stderr)
        return 2
    nll_file, log_path = None, None
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        log_path = os.path.join(args.output_dir, "log.txt")
        nll_file = open(log_path + ".tmp", "w")
    try:
        records = stream_perplexity(model, tokens, cache, args.chunk, log=print, nll_file=nll_file,
                                    num_eval_tokens=args.num_eval_tokens, progress=not args.no_progress,
                                    chunk_tokens=args.chunk_tokens)
    except BadInput as err:
        print(f"streaming_eval.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if nll_file is not None:
            nll_file.close()
    final = records[-1]
    final.update({"mode": kind, "pos_shift": bool(args.pe_shift), "model": args.model_dir})
    summary = "".join(json.dumps(r) + "\n" for r in records)
    if args.output_dir:
        os.replace(log_path + ".tmp", log_path)
        write_atomic(os.path.join(args.output_dir, "ppl.txt"), f"{final['ppl']}\n")
        write_atomic(os.path.join(args.output_dir, "summary.jsonl"), summary)
    if args.output:
        write_atomic(args.output, summary)
    print(f"overall perplexity: {final['ppl']:.4f} over {final['tokens']} tokens "
          f"({final['tokens_per_s']} tokens/s, {final['kv_slots']} KV slots at the end)")
    print(final["ppl"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
