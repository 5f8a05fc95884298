#!/usr/bin/env python
"""Training-free SepLLM on a stock model: full attention vs mask-based SepLLM vs SepCache, one run.

    python bench/bench_training_free.py                       # CPU: small Llama shape, 4k prompt, c=512
    python bench/bench_training_free.py --prompt 16384 --shape 1b --dtype bf16   # on a GPU

The same randomly initialised ``LlamaForCausalLM`` (speed does not depend on the weights) and the same prompt
(random ids, ~15% separators) are used for each method: one prefill forward, then ``--new_tokens`` greedy
decode steps, each timed; the best of ``--repeats`` runs counts. Prints tokens/s, ratios against the full cache
measured in this run, the KV slots and bytes the cache holds while decoding, and the peak memory (CUDA: peak
allocated; CPU: the cache's own bytes, process peak RSS is not per method). The mask-based column uses
``megatron.hf.training_free.apply_sepllm`` (sdpa) when that module is present.
"""
import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode_options import add_decode_options, apply_sdpa_policy, sepcache_sizes  # noqa: E402

SHAPES = {  # layers, hidden, heads, kv heads, intermediate, vocab
    "small": (4, 256, 4, 2, 688, 8192),
    "160m": (12, 768, 12, 4, 2048, 32000),
    "1b": (16, 2048, 32, 8, 8192, 128256),
}
SEPS = [13, 11, 30, 0, 26, 25, 198, 220]


def build_model(shape: str, max_len: int, device, dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()


def prompt_ids(length: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(300, vocab, (1, length), generator=g)
    seps = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (1, length), generator=g)]
    return torch.where(torch.rand(1, length, generator=g) < 0.15, seps, ids).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_slots_and_bytes(cache):
    slots = max(layer.keys.shape[-2] for layer in cache.layers)
    size = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
               for l in cache.layers)
    return slots, size


@torch.no_grad()
def run(model, make_cache, ids, new_tokens):
    """(prefill s, decode tokens/s, most KV slots while decoding, KV bytes at the end, peak CUDA bytes)."""
    device = ids.device
    cache = make_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - t0
    most = 0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        most = max(most, max(layer.keys.shape[-2] for layer in cache.layers))
    sync(device)
    decode = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return prefill, new_tokens / decode, most, kv_slots_and_bytes(cache)[1], peak


def mask_based(model, sizes):
    """The mask-based path of the same model (None when ``megatron.hf.training_free`` is absent)."""
    try:
        from megatron.hf.training_free import apply_sepllm
    except ImportError:
        return None
    a, s, w, c = sizes
    layers = model.config.num_hidden_layers
    cfg = {"Layer_num": layers, "separator_token_ids": SEPS, "PADDING_ID": 128009, "prefill_k": 0, "generate_k": 0,
           "prefill_local_window_size": w, "generate_local_window_size": w,
           "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": False,
           "prefill_loc_win_size_list": [w] * layers, "generate_win_loc_size_list": [w] * layers,
           "init_tok_max_idx": a - 1, "USE_ORIGINAL_FULL_ATTEN": False, "streamingLLM": False,
           "BATCH_ADAPTIVE_INIT_POS": False, "PRINT_KV_RATIO": False, "print_ratio_intervals": 8000,
           "USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False, "EXCLUDE_DIAGONAL": True,
           "USE_BiPE": False, "BiPE_seps": SEPS, "USE_FIXED_SEP_INTERVALs": False,
           "fixed_sep_intervals_list": [5] * layers, "USE_SA_SOFTMAX": False, "USE_SA_SOFTMAX_NO_DENO": False,
           "SA_Numerator_Bias": 0.0, "SA_Denominator_Bias": 0.0}
    apply_sepllm(model, cfg)  # in place: the model's attention modules now apply the SepLLM mask
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    add_decode_options(parser, "SepCache a,s,w,c (the mask path uses a and w)",
                       "~9 ms CPU per call measured on an H200")
    args = parser.parse_args(argv)
    sizes = sepcache_sizes(parser, args.sizes)
    apply_sdpa_policy(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import __version__ as hf_version
    from transformers.cache_utils import DynamicCache

    from megatron.hf.sep_cache import SepCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    max_len = args.prompt + args.new_tokens + 16
    model = build_model(args.shape, max_len, device, dtype, "sdpa")
    ids = prompt_ids(args.prompt, model.config.vocab_size, device)
    a, s, w, c = sizes

    def sep_cache():
        return SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w,
                                          cache_size=c, USE_MAX_SEP_CACHE=True, separator_token_ids=SEPS)

    methods = [("full attention (sdpa)", model, DynamicCache), ("SepCache", model, sep_cache)]
    masked = mask_based(build_model(args.shape, max_len, device, dtype, "sdpa"), sizes)
    if masked is not None:
        methods.insert(1, ("mask-based SepLLM (sdpa)", masked, DynamicCache))
    results = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for name, m, factory in methods:
            r = run(m, factory, ids, args.new_tokens)
            best = results.get(name)
            results[name] = r if best is None else (min(best[0], r[0]), max(best[1], r[1]), *r[2:])
    base = results["full attention (sdpa)"]
    cpu = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    print(f"{where}; torch {torch.__version__}, transformers {hf_version}; Llama '{args.shape}' "
          f"{SHAPES[args.shape][:2]} {str(dtype).replace('torch.', '')}; prompt {args.prompt}, "
          f"{args.new_tokens} decoded; SepCache a,s,w,c = {sizes}")
    print(f"{'method':26s} {'prefill s':>9s} {'decode tok/s':>12s} {'vs full':>8s} {'decode cost':>11s} "
          f"{'total cost':>10s} {'KV slots':>8s} {'KV MiB':>8s} {'peak MiB':>9s}")
    base_total = base[0] + args.new_tokens / base[1]
    record = {"device": where, "torch": torch.__version__, "transformers": hf_version, "shape": args.shape,
              "dtype": str(dtype), "prompt": args.prompt, "new_tokens": args.new_tokens, "sizes": sizes}
    for name, (prefill, tok_s, most, kv, peak) in results.items():
        speed, cost = tok_s / base[1], base[1] / tok_s
        total = (prefill + args.new_tokens / tok_s) / base_total  # prefill + decode, against the full cache's
        print(f"{name:26s} {prefill:9.3f} {tok_s:12.1f} {speed:7.2f}x {cost:10.2f}x {total:9.2f}x {most:8d} "
              f"{kv / 2**20:8.1f} {peak / 2**20:9.1f}")
        record[name] = {"prefill_s": round(prefill, 4), "decode_tok_s": round(tok_s, 2),
                        "speed_vs_full": round(speed, 3), "total_cost_vs_full": round(total, 3),
                        "max_kv_slots": most, "kv_bytes": kv, "peak_bytes": peak}
    if masked is None:
        print("mask-based SepLLM: megatron.hf.training_free is not in this checkout; column skipped")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
