#!/usr/bin/env python
"""Streaming perplexity: one long token stream, fed token by token, with a bounded or a full KV cache.

    python tools/streaming_eval.py --model_dir EXPORT --text_file book.txt --cache sepcache \
        --init_cache_size 4 --sep_cache_size 64 --local_size 256 --cache_size 512 --pe_shift --chunk 1024
    python tools/streaming_eval.py --model_dir EXPORT --synthetic 100000 --cache streaming ...
    python tools/streaming_eval.py --model_dir EXPORT --data_path data/pile_text_document --max_tokens 1000000

Caches: ``sepcache`` (initial + separators + local window, PE shifting with ``--pe_shift``), ``streaming``
(StreamingLLM: initial + local window, i.e. a SepCache without separators) and ``full`` (every KV kept).
Each chunk of ``--chunk`` tokens reports its perplexity, the KV slots kept, the KV bytes and (on GPU) the
peak allocated memory, as JSON lines. SepCache's memory stays constant however long the stream is.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run by path (python tools/streaming_eval.py): the checkout is one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = ("sepcache", "streaming", "full")


def make_cache(model, kind: str, init_cache_size=4, sep_cache_size=64, local_size=256, cache_size=512,
               pe_shift=True, separator_token_ids=None):
    """The KV cache of one streaming run (``None`` sizes are ignored for ``full``)."""
    from transformers.cache_utils import DynamicCache

    from megatron.hf.sep_cache import SepCache

    if kind == "full":
        return DynamicCache()
    if kind not in CACHES:
        raise ValueError(f"unknown cache {kind!r}; choose one of {CACHES}")
    seps = separator_token_ids
    if seps is None:
        seps = getattr(model.config, "separator_token_ids", None)
        if not seps or list(seps) == [-1]:
            from megatron.hf.sep_cache import MODEL_TYPE_PRESETS

            seps = MODEL_TYPE_PRESETS["pythia"]["separator_token_ids"]
    if kind == "streaming":
        # StreamingLLM: no separators; c = a + w + 1 so a compression keeps exactly a + w tokens.
        return SepCache.from_model_config(model.config, init_cache_size=init_cache_size, sep_cache_size=0,
                                          local_size=local_size, cache_size=init_cache_size + local_size + 1,
                                          separator_token_ids=[], PADDING_ID=None, APPLY_PE_SHIFT=pe_shift)
    return SepCache.from_model_config(model.config, init_cache_size=init_cache_size, sep_cache_size=sep_cache_size,
                                      local_size=local_size, cache_size=cache_size, USE_MAX_SEP_CACHE=True,
                                      separator_token_ids=list(seps), PADDING_ID=None, APPLY_PE_SHIFT=pe_shift)


def kv_slots_and_bytes(cache) -> (int, int):
    slots, size = 0, 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        slots = max(slots, keys.shape[-2])
        size += keys.numel() * keys.element_size() + layer.values.numel() * layer.values.element_size()
    return slots, size


@torch.no_grad()
def stream_perplexity(model, tokens: torch.Tensor, cache, chunk: int = 1024, log=None) -> List[Dict]:
    """Feeds ``tokens`` ([N] int64) one at a time; returns one record per chunk of predicted tokens."""
    from contextlib import nullcontext

    from megatron.hf.sep_cache import use_sep_cache

    if tokens.numel() < 2:
        raise ValueError("the token stream needs at least 2 tokens")
    device = next(model.parameters()).device
    stock = getattr(cache, "is_sep_cache", False) and getattr(model.config, "model_type", "") != "sepllm_gpt_neox"
    # The NLL sum stays on the device: one sync per chunk, not per token, so the GPU is never starved.
    records, nll_sum, count, t0 = [], torch.zeros((), device=device), 0, time.time()
    tokens = tokens.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with (use_sep_cache(model, cache) if stock else nullcontext()):
        for i in range(tokens.numel() - 1):
            out = model(input_ids=tokens[i:i + 1].view(1, 1), past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()
            nll_sum += F.cross_entropy(logits.unsqueeze(0), tokens[i + 1:i + 2])
            count += 1
            if count % chunk == 0 or i == tokens.numel() - 2:
                slots, kv_bytes = kv_slots_and_bytes(cache)
                rec = {"tokens": i + 1, "ppl": math.exp(nll_sum.item() / count), "kv_slots": slots,
                       "kv_bytes": kv_bytes,
                       "seconds": round(time.time() - t0, 2)}
                if device.type == "cuda":
                    rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
                records.append(rec)
                if log:
                    log(json.dumps(rec))
                nll_sum, count = torch.zeros((), device=device), 0
    return records


def load_tokens(args, tokenizer) -> torch.Tensor:
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
        raise ValueError("give --text_file, --data_path or --synthetic N")
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def main(argv=None) -> int:
    from megatron.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model_dir", required=True, help="an HF model directory (this project's export or a stock model)")
    parser.add_argument("--text_file", help="a text file to stream")
    parser.add_argument("--data_path", help="mmap dataset prefix (.bin/.idx)")
    parser.add_argument("--synthetic", type=int, help="N random tokens (memory / speed checks)")
    parser.add_argument("--max_tokens", type=int, help="stop after this many tokens (default: the whole input)")
    parser.add_argument("--cache", default="sepcache", choices=CACHES,
                        help="sepcache: SepCache; streaming: StreamingLLM's sink + window cache; full: no eviction")
    parser.add_argument("--init_cache_size", type=int, default=4, help="initial (sink) tokens kept")
    parser.add_argument("--sep_cache_size", type=int, default=64, help="separator slots (sepcache)")
    parser.add_argument("--local_size", type=int, default=256, help="local window slots")
    parser.add_argument("--cache_size", type=int, default=512, help="most KV slots a layer holds")
    parser.add_argument("--pe_shift", action="store_true",
                        help="positions within the cache instead of the stream (positional-encoding shift)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per reported chunk")
    parser.add_argument("--dtype", default=None, choices=(None, "fp32", "bf16", "fp16"),
                        help="model dtype (default: the model's own)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--output", help="JSON lines file of the per-chunk records")
    parser.add_argument("--allow_cudnn_sdpa", action="store_true",
                        help="keep PyTorch's cuDNN SDPA backend (it plans per KV length: ~4 ms CPU per call "
                             "when the cache grows every step)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and not args.allow_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)  # flash / memory-efficient kernels need no per-shape plan
    from megatron.hf.loading import load_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    if args.text_file:
        model, tokenizer = load_export(args.model_dir, device, dtype)
    else:  # token ids need no tokenizer (synthetic streams and mmap datasets)
        from transformers import AutoModelForCausalLM

        kwargs = {"trust_remote_code": True, **({"dtype": dtype} if dtype is not None else {})}
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs).to(device).eval(), None
    try:
        tokens = load_tokens(args, tokenizer)
        cache = make_cache(model, args.cache, args.init_cache_size, args.sep_cache_size, args.local_size,
                           args.cache_size, args.pe_shift)
    except (ValueError, FileNotFoundError) as err:
        print(f"streaming_eval.py: error: {err}", file=sys.stderr)
        return 2
    records = stream_perplexity(model, tokens, cache, args.chunk, log=print)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
