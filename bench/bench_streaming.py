#!/usr/bin/env python
"""Streaming speed: the token-by-token reference loop vs the chunked path, and long streams over several caches.

    python bench/bench_streaming.py compare [--tokens 1500] [--cache sepcache:4,64,256,512]
        one small random-weight stock GPT-NeoX, the same stream through both paths: tokens/s of each, the
        ratio, and the largest per-token NLL difference.
    python bench/bench_streaming.py prep --source ../shared/data/pg19 --tokens 1100000 --out data/pg19_stream
        copies whole books (name order) until they hold --tokens tokens of the Pythia tokenizer, and the
        tokenizer beside them (data/ is not tracked; carry data/pg19_stream to a device machine).
    python bench/bench_streaming.py run --books data/pg19_stream --tokens 1048576 --out OUT \
            --cache sepcache:4,64,256,512 --cache full@262144 ...
        one model (a 160M-shaped random-weight stock GPT-NeoX unless --model_dir), the books as one stream (the
        cache persists across books), each cache in turn through tools/streaming_eval.stream_perplexity with
        one record per --record tokens: OUT/records/<cache>.jsonl, a table, and the plot (when matplotlib is
        installed; else rerun bench/plot_streaming.py OUT/records elsewhere).

Cache specs: ``sepcache:a,s,w,c``, ``streaming:a,w`` (cache_size a + w), ``full``; ``@N`` caps that cache's
tokens. ``--pe_shift`` applies to the bounded caches.
"""
import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"tiny": (4, 256, 4), "160m": (12, 768, 12)}  # layers, hidden, heads (Pythia shapes)
PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def build_model(shape: str, device, dtype, attn: str = "sdpa", model_dir=None):
    if model_dir:
        from megatron.hf.loading import load_export

        return load_export(model_dir, device, dtype)[0]
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    layers, hidden, heads = SHAPES[shape]
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
                           max_position_embeddings=2048, use_parallel_residual=True)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype).eval()


def parse_cache(spec: str):
    """``(name, kind, sizes, max_tokens)`` of one ``--cache`` spec."""
    body, _, cap = spec.partition("@")
    kind, _, sizes = body.partition(":")
    nums = [int(v) for v in sizes.split(",")] if sizes else []
    want = {"sepcache": 4, "streaming": 2, "full": 0}
    if kind not in want or len(nums) != want[kind]:
        raise SystemExit(f"bench_streaming.py: --cache {spec}: expected sepcache:a,s,w,c, streaming:a,w or full")
    name = kind + ("_" + "_".join(map(str, nums)) if nums else "")
    return name, kind, nums, int(cap) if cap else None


def make(model, kind, nums, pe_shift):
    from tools.streaming_eval import check_sizes, make_cache

    if kind == "sepcache":
        check_sizes(kind, *nums)
        return make_cache(model, kind, *nums, pe_shift=pe_shift)
    if kind == "streaming":
        a, w = nums
        check_sizes(kind, a, 0, w, a + w)
        return make_cache(model, kind, a, 0, w, a + w, pe_shift=pe_shift)
    return make_cache(model, "full")


def synthetic(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 50000, (n,), generator=g)
    seps = torch.tensor(PYTHIA_SEPS)[torch.randint(0, len(PYTHIA_SEPS), (n,), generator=g)]
    return torch.where(torch.rand(n, generator=g) < 0.15, seps, ids)


def tokenizer_of(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def read_books(folder: str, tokens: int):
    """Token tensors of the books of ``folder`` (name order) until they hold ``tokens`` predictions."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"bench_streaming.py: --books {folder}: no tokenizer.json there (made by 'prep')")
    tok = tokenizer_of(str(tok_file))
    out, total = [], 0
    for path in sorted(folder.glob("*.txt")):
        ids = torch.tensor(tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids, dtype=torch.long)
        out.append(ids)
        total += max(ids.numel() - 1, 0)
        if total >= tokens:
            return out
    raise SystemExit(f"bench_streaming.py: --books {folder}: {total} tokens, fewer than --tokens {tokens}")


# ---------------------------------------------------------------------------------------------- commands
def cmd_prep(args) -> int:
    src = Path(args.source)
    books = sorted(p for p in src.glob("*.txt") if p.stat().st_size > 0)
    if not books:
        raise SystemExit(f"bench_streaming.py: --source {src}: no .txt books")
    tok = tokenizer_of(args.tokenizer)
    tmp = Path(args.out + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for path in books:
        shutil.copy(path, tmp / path.name)
        total += len(tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids) - 1
        if total >= args.tokens:
            break
    if total < args.tokens:
        raise SystemExit(f"bench_streaming.py: --source {src} holds {total} tokens, fewer than {args.tokens}")
    shutil.copy(args.tokenizer, tmp / "tokenizer.json")
    if Path(args.out).exists():
        raise SystemExit(f"bench_streaming.py: --out {args.out} exists; remove it first")
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(list(Path(args.out).glob('*.txt')))} books, {total} tokens to predict")
    return 0


def cmd_compare(args) -> int:
    from tools.streaming_eval import stream_perplexity

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.shape, device, torch.float32)
    name, kind, nums, _ = parse_cache(args.cache)
    tokens = synthetic(args.tokens + 1)
    results = {}
    for label, chunk_tokens in (("token_by_token", 1), ("chunked", args.chunk_tokens)):
        nll = io.StringIO()
        start = time.perf_counter()
        records = stream_perplexity(model, tokens, make(model, kind, nums, args.pe_shift), chunk=args.record,
                                    nll_file=nll, chunk_tokens=chunk_tokens)
        seconds = time.perf_counter() - start
        results[label] = {"tokens_per_s": records[-1]["tokens"] / seconds, "seconds": seconds,
                          "nll": torch.tensor([float(v) for v in nll.getvalue().split()]),
                          "kv_slots": records[-1]["kv_slots"], "ppl": records[-1]["ppl"]}
    slow, fast = results["token_by_token"], results["chunked"]
    diff = (slow["nll"] - fast["nll"]).abs().max().item()
    line = {"shape": args.shape, "cache": name, "pe_shift": args.pe_shift, "tokens": args.tokens,
            "chunk_tokens": args.chunk_tokens, "threads": args.threads, "device": str(device),
            "slow_tokens_per_s": round(slow["tokens_per_s"], 1), "fast_tokens_per_s": round(fast["tokens_per_s"], 1),
            "ratio": round(fast["tokens_per_s"] / slow["tokens_per_s"], 2), "max_abs_nll_diff": diff,
            "ppl_slow": slow["ppl"], "ppl_fast": fast["ppl"], "kv_slots": [slow["kv_slots"], fast["kv_slots"]]}
    print(f"{name} pe_shift={args.pe_shift}, {args.tokens} tokens, {args.shape} model on {device}: token by token "
          f"{line['slow_tokens_per_s']} tokens/s, chunked {line['fast_tokens_per_s']} tokens/s, ratio "
          f"{line['ratio']}x, max |NLL diff| {diff:.2e}")
    print(json.dumps(line))
    return 0


def cmd_run(args) -> int:
    from tools.streaming_eval import stream_perplexity

    specs = [parse_cache(s) for s in args.cache]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not args.allow_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)  # see tools/streaming_eval.py --allow_cudnn_sdpa
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = time.time()
    books = read_books(args.books, args.tokens) if args.books else [synthetic(args.tokens + 1)]
    model = build_model(args.shape, device, dtype, model_dir=args.model_dir)
    out = Path(args.out) / "records"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model_dir or f"random-weight stock GPTNeoX, {args.shape} shape", "dtype": args.dtype,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "books": args.books, "pe_shift": args.pe_shift,
            "chunk_tokens": args.chunk_tokens, "prep_seconds": round(time.time() - start, 1)}
    print(json.dumps(meta), flush=True)
    table = []
    for name, kind, nums, cap in specs:
        left = args.total_seconds - (time.time() - start)
        if left < 10:
            print(f"{name}: skipped, the --total_seconds budget is spent", flush=True)
            continue
        cache = make(model, kind, nums, args.pe_shift)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        limit = min(cap or args.tokens, args.tokens)
        records = stream_perplexity(model, books, cache, chunk=args.record, chunk_tokens=args.chunk_tokens,
                                    num_eval_tokens=limit, time_limit_s=min(left, args.cache_seconds),
                                    log=lambda line, n=name: print(f"{n} {line}", flush=True))
        records[-1].update({"cache": name, "kind": kind, "sizes": nums, **meta})
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, out / f"{name}.jsonl")
        table.append(summary_row(name, records))
    print_table(table)
    try:
        from bench.plot_streaming import plot

        print("plot:", plot(str(out), str(Path(args.out) / "streaming.png")))
    except ImportError as err:
        print(f"plot skipped ({err}); run: python bench/plot_streaming.py {out}")
    return 0


def summary_row(name, records):
    chunks = [r for r in records if not r.get("final")]
    final = records[-1]
    peaks = [r["chunk_peak_mem_bytes"] for r in chunks if "chunk_peak_mem_bytes" in r]
    later = peaks[1:] if len(peaks) > 1 else peaks
    spread = (max(later) - min(later)) / min(later) if later else float("nan")
    return {"cache": name, "tokens": final["tokens"], "ppl": final["ppl"], "kv_slots": final["kv_slots"],
            "kv_mb": final["kv_bytes"] / 2 ** 20, "peak_mb": final.get("peak_mem_bytes", 0) / 2 ** 20,
            "peak_spread_after_first_record": spread, "tokens_per_s": final["tokens_per_s"],
            "stopped": "stopped_at_time_limit_s" in final}


def print_table(rows):
    print("| cache | tokens | ppl | kept KV | KV MB | peak MB | peak spread after 1st record | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = "n/a" if math.isnan(r["peak_spread_after_first_record"]) else \
            f"{100 * r['peak_spread_after_first_record']:.2f}%"
        print(f"| {r['cache']} | {r['tokens']}{' (time limit)' if r['stopped'] else ''} | {r['ppl']:.2f} | "
              f"{r['kv_slots']} | {r['kv_mb']:.1f} | {r['peak_mb']:.1f} | {spread} | {r['tokens_per_s']:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compare")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--cache", default="sepcache:4,64,256,512")
    p.add_argument("--pe_shift", action="store_true")
    p.add_argument("--chunk_tokens", type=int, default=1024)
    p.add_argument("--record", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("prep")
    p.add_argument("--source", required=True)
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/data/20B_tokenizer.json"))
    p.add_argument("--tokens", type=int, default=1_100_000)
    p.add_argument("--out", required=True)
    p = sub.add_parser("run")
    p.add_argument("--books", help="a folder made by 'prep' (default: synthetic ids)")
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--cache", action="append", required=True)
    p.add_argument("--pe_shift", action="store_true")
    p.add_argument("--shape", default="160m", choices=sorted(SHAPES))
    p.add_argument("--model_dir")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--device")
    p.add_argument("--chunk_tokens", type=int, default=1024)
    p.add_argument("--record", type=int, default=65536, help="tokens per record")
    p.add_argument("--total_seconds", type=float, default=450.0, help="skip caches once this is spent")
    p.add_argument("--cache_seconds", type=float, default=200.0, help="stop one cache at a record past this")
    p.add_argument("--allow_cudnn_sdpa", action="store_true")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return {"compare": cmd_compare, "prep": cmd_prep, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
