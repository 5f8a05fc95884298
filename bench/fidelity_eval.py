"""Evaluations (b) and (c) of bench/fidelity.py on one trained checkpoint.

The checkpoint is loaded by ``megatron.hf.loading.load_from_neox_args``: the trainer checkpoint converted in
memory into the ``sepllm_gpt_neox`` model, whose mask is the trainer's own rule (trainer-vs-HF logits agree to
1e-5 in fp32 for every mode, tests/hf/test_export_parity.py). So (b) scores each model with the mask it was
trained with, at lengths it never saw.

(b) ``long_context``: spans of ``4 * S + 1`` held-out tokens, each cut into windows of ``L`` = S, 2S and 4S
tokens; every window predicts its next ``L`` tokens, so the three lengths score exactly the same tokens and
differ only in how much context (and how far past the trained positions) the model gets.

(c) ``streaming``: ``tools/streaming_eval.py``'s ``stream_perplexity`` feeds the held-out books through a
bounded cache, in chunks that give the token-by-token stream's NLL (StreamingLLM's cache: one token at a time) (SepCache for SepLLM models, StreamingLLM's cache for StreamingLLM, a plain
growing cache for full attention), with positions inside the cache (PE shift) for the bounded caches.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_run_model(config_path: str, device: str):
    """``(model, tokenizer)`` of the checkpoint the run config's ``save`` holds, the config validated as a
    launch would validate it."""
    from megatron.hf.loading import load_from_neox_args
    from megatron.neox_arguments import NeoXArgs

    with contextlib.redirect_stdout(io.StringIO()):  # derivation's tokenizer and checker lines
        args = NeoXArgs.from_ymls([config_path])
        return load_from_neox_args(args, device)


def held_out_books(prefix: str) -> List[torch.Tensor]:
    """The books of a split (one document each), as int64 token tensors."""
    from megatron.data.indexed_dataset import make_dataset

    data = make_dataset(prefix)
    return [torch.from_numpy(data[i].astype("int64")) for i in range(len(data))]


def long_spans(books: List[torch.Tensor], span: int, count: int) -> List[torch.Tensor]:
    """``count`` spans of ``span + 1`` tokens, taken in turn from each book (consecutive, non-overlapping,
    from each book's start), so that they cover several books."""
    per_book = [b.numel() // (span + 1) for b in books]
    if sum(per_book) < count:
        raise ValueError(f"the held-out books hold {sum(per_book)} spans of {span + 1} tokens, {count} needed")
    spans, j = [], 0
    while len(spans) < count:
        for b, n in zip(books, per_book):
            if j < n and len(spans) < count:
                spans.append(b[j * (span + 1):(j + 1) * (span + 1)])
        j += 1
    return spans


@torch.no_grad()
def window_nll(model, window: torch.Tensor, device) -> torch.Tensor:
    """Per-token NLL ``[L]`` of ``window[1:]`` given ``window[:-1]`` (``L + 1`` tokens in)."""
    ids = window[:-1].view(1, -1).to(device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return F.cross_entropy(logits, window[1:].to(device), reduction="none").double().cpu()


def long_context(model, books: List[torch.Tensor], seq_length: int, spans: int, device,
                 factors=(1, 2, 4), buckets_per_seq: int = 4) -> Dict:
    """Evaluation (b): per length ``f * seq_length``: mean NLL, perplexity, and the mean NLL per position
    bucket inside the window (``seq_length / buckets_per_seq`` positions each)."""
    longest = max(factors) * seq_length
    chosen = long_spans(books, longest, spans)
    bucket = max(1, seq_length // buckets_per_seq)
    out = {"spans": spans, "span_tokens": longest, "bucket": bucket, "lengths": {}}
    for f in factors:
        length = f * seq_length
        total, count = 0.0, 0
        by_pos = torch.zeros(length, dtype=torch.float64)
        for s in chosen:
            for start in range(0, longest, length):
                nll = window_nll(model, s[start:start + length + 1], device)
                total += float(nll.sum())
                count += nll.numel()
                by_pos += nll
        by_pos /= len(chosen) * (longest // length)
        curve = by_pos.view(-1, bucket).mean(-1).tolist() if length % bucket == 0 else []
        mean = total / count
        out["lengths"][str(length)] = {"factor": f, "tokens": count, "nll": mean, "ppl": math.exp(mean),
                                       "nll_by_position": curve}
    return out


def streaming(model, books: List[torch.Tensor], kind: str, sizes: Optional[Dict[str, int]], tokens: int,
              chunk: int, seq_length: int) -> Dict:
    """Evaluation (c): the stream's perplexity overall and over the tokens predicted beyond ``seq_length``
    (the trained length), and one perplexity per ``chunk`` predicted tokens."""
    from tools.streaming_eval import make_cache, stream_perplexity, streaming_separators

    sizes = dict(sizes or {})
    seps = streaming_separators(model, None) if kind == "sepcache" else None
    cache = make_cache(model, kind, pe_shift=kind != "full", separator_token_ids=seps, **sizes)
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu" and kind == "streaming":
        # One token per forward: tiny ops, where a second thread only adds synchronisation.
        torch.set_num_threads(1)
    try:
        # Chunked forwards give the token-by-token stream's NLL and kept KVs (tests/hf/test_streaming_fast.py);
        # StreamingLLM's cache still steps one token at a time on this model (ChunkedStepper's "single").
        records = stream_perplexity(model, books, cache, chunk=chunk, num_eval_tokens=tokens, chunk_tokens=chunk)
    finally:
        torch.set_num_threads(threads)
    final = records[-1]
    chunks = [r for r in records if not r.get("final")]
    curve, beyond_nll, beyond_n, prev = [], 0.0, 0, 0
    for r in chunks:
        n = r["tokens"] - prev
        nll = math.log(r["ppl"])
        curve.append({"end": r["tokens"], "nll": nll})
        if prev >= seq_length:
            beyond_nll += nll * n
            beyond_n += n
        prev = r["tokens"]
    out = {"cache": kind, "sizes": sizes, "tokens": final["tokens"], "ppl": final["ppl"],
           "kv_slots_at_end": final["kv_slots"], "tokens_per_s": final["tokens_per_s"], "curve": curve,
           "ppl_beyond_trained": math.exp(beyond_nll / beyond_n) if beyond_n else None,
           "tokens_beyond_trained": beyond_n, "chunk_mode": final.get("chunk_mode")}
    if "kv_ratio" in final:
        out["kv_ratio"] = final["kv_ratio"]
    return out
