#!/usr/bin/env python
"""Perplexity and memory against streamed tokens, one line per cache, from streaming records.

    python bench/plot_streaming.py OUT/records [--out streaming.png]

Reads every ``*.jsonl`` of the folder (records of ``tools/streaming_eval.py --output`` or ``bench/
bench_streaming.py run``: one per chunk of tokens, then a final one). Memory is the chunk's peak GPU memory
where the records have it, else the KV bytes.
"""
import argparse
import json
import sys
from pathlib import Path


def load(folder: str):
    runs = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        chunks = [r for r in records if not r.get("final")]
        if chunks:
            runs[path.stem] = chunks
    if not runs:
        raise SystemExit(f"plot_streaming.py: {folder}: no .jsonl records")
    return runs


def plot(folder: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(folder)
    gpu = all("chunk_peak_mem_bytes" in r for chunks in runs.values() for r in chunks)
    fig, (ax_ppl, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, chunks in runs.items():
        tokens = [r["tokens"] for r in chunks]
        ax_ppl.plot(tokens, [r["ppl"] for r in chunks], marker=".", label=name)
        mem = [(r["chunk_peak_mem_bytes"] if gpu else r["kv_bytes"]) / 2 ** 20 for r in chunks]
        ax_mem.plot(tokens, mem, marker=".", label=name)
    ax_ppl.set(xlabel="tokens streamed", ylabel="perplexity of the chunk", title="perplexity")
    ax_mem.set(xlabel="tokens streamed", ylabel="peak GPU memory in the chunk (MiB)" if gpu else "KV bytes (MiB)",
               title="memory", yscale="log")
    for ax in (ax_ppl, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    Path(tmp).replace(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="folder of .jsonl record files")
    parser.add_argument("--out", default=None, help="image path (default: <records>/../streaming.png)")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.records).resolve().parent / "streaming.png")
    print(plot(args.records, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
