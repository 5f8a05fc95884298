#!/usr/bin/env python
"""Decode speed and KV memory: SepCache vs the full cache after a long context, same model, same run.

    python bench/bench_sepcache_decode.py --context 32768 --new_tokens 128 --batch 8 [--model_dir EXPORT]

Without ``--model_dir`` a randomly initialised stock ``GPTNeoXForCausalLM`` of the chosen shape is used
(decode speed does not depend on the weights). The context (random ids with ~15% separators) is prefilled in
chunks, then ``--new_tokens`` greedy steps are timed for each cache. Prints tokens/s, the ratio, the KV bytes
after decoding and the peak memory, and one JSON line with every figure.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode_options import add_decode_options, apply_sdpa_policy, sepcache_sizes  # noqa: E402

SHAPES = {  # Pythia shapes: layers, hidden, heads
    "160m": (12, 768, 12),
    "410m": (24, 1024, 16),
    "1.4b": (24, 2048, 16),
}
PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def build_model(args, device, dtype):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if args.model_dir:
        from megatron.hf.loading import load_export

        model, _ = load_export(args.model_dir, device, dtype)
        return model
    layers, hidden, heads = SHAPES[args.shape]
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
                           max_position_embeddings=args.context + args.new_tokens + 16,
                           use_parallel_residual=True)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype).eval()


def context_ids(batch, length, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 50000, (batch, length), generator=g)
    seps = torch.tensor(PYTHIA_SEPS)[torch.randint(0, len(PYTHIA_SEPS), (batch, length), generator=g)]
    return torch.where(torch.rand(batch, length, generator=g) < 0.15, seps, ids).to(device)


def kv_bytes(cache) -> int:
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)


@torch.no_grad()
def run(model, cache, ids, new_tokens, chunk, profile_steps: int = 0):
    """Chunked prefill, then timed greedy decode; returns (tokens/s, seconds, kv bytes, peak bytes)."""
    device = ids.device
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)  # warm-up step (first compression)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(profile_steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"profile of {profile_steps} decode steps with {type(cache).__name__}:")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return ids.shape[0] * new_tokens / seconds, seconds, kv_bytes(cache), peak


@torch.no_grad()
def step_floor(model, token, steps: int = 20) -> float:
    """Seconds of one cache-free single-token forward: the model's fixed per-step cost (weights + overhead)."""
    for _ in range(3):
        model(input_ids=token, use_cache=False)
    if token.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(steps):
        model(input_ids=token, use_cache=False)
    if token.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - t0) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--shape", default="160m", choices=sorted(SHAPES))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--profile", type=int, default=0, help="profile N decode steps of each cache")
    add_decode_options(parser, "SepCache a,s,w,c", "~4 ms CPU per call")
    args = parser.parse_args(argv)
    a, s, w, c = sepcache_sizes(parser, args.sizes)
    apply_sdpa_policy(args)
    from transformers.cache_utils import DynamicCache

    from megatron.hf.sep_cache import SepCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = build_model(args, device, dtype)
    ids = context_ids(args.batch, args.context, device)
    floor = step_floor(model, ids[:, :1])
    full = run(model, DynamicCache(), ids, args.new_tokens, args.chunk, profile_steps=args.profile)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    sep_cache = SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w,
                                           cache_size=c, USE_MAX_SEP_CACHE=True, separator_token_ids=PYTHIA_SEPS,
                                           PADDING_ID=None, APPLY_PE_SHIFT=False)
    sep = run(model, sep_cache, ids, args.new_tokens, args.chunk, profile_steps=args.profile)
    max_slots = max(layer.length() for layer in sep_cache.layers)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model_dir or f"random GPTNeoX {args.shape}", "attn": args.attn, "dtype": args.dtype,
        "batch": args.batch, "context": args.context, "new_tokens": args.new_tokens, "sepcache_sizes": [a, s, w, c],
        "full_tok_s": round(full[0], 1), "sepcache_tok_s": round(sep[0], 1), "speedup": round(sep[0] / full[0], 2),
        "full_kv_bytes": full[2], "sepcache_kv_bytes": sep[2], "sepcache_max_slots": max_slots,
        "full_peak_bytes": full[3], "sepcache_peak_bytes": sep[3],
        "step_ms_full": round(1000 * full[1] / args.new_tokens, 2),
        "step_ms_sepcache": round(1000 * sep[1] / args.new_tokens, 2),
        "step_ms_no_cache_floor": round(1000 * floor, 2),
    }
    print(f"full cache : {full[0]:9.1f} tok/s  KV {full[2] / 2**20:9.1f} MiB  peak {full[3] / 2**30:.2f} GiB")
    print(f"SepCache   : {sep[0]:9.1f} tok/s  KV {sep[2] / 2**20:9.1f} MiB  peak {sep[3] / 2**30:.2f} GiB  "
          f"(<= {c} slots per layer: {max_slots})")
    print(f"speedup    : {sep[0] / full[0]:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
