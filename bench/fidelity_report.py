"""The table, the per-mode summary and the plot of bench/fidelity.py, from its results.json alone.

``python bench/fidelity.py --report-only --out DIR`` reruns this on any machine (e.g. to draw the plot where
matplotlib is installed when the GPU image has none).
"""
from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional

from fidelity_plan import MODE_LABELS, MODES


def _mean_sd(values: List[float]) -> Optional[tuple]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, len(values)


def _fmt(stat: Optional[tuple], digits: int = 4) -> str:
    if stat is None:
        return "-"
    mean, sd, n = stat
    return f"{mean:.{digits}g}" if n == 1 else f"{mean:.{digits}g} ± {sd:.2g}"


def summarize(results: dict) -> Dict[str, dict]:
    """Per mode: the done seeds and mean / sample standard deviation / count of each figure."""
    runs = results.get("runs", {})
    seq = results["plan"]["preset"]["seq_length"]
    out = {}
    for mode in results["plan"]["modes"]:
        mine = [r for r in runs.values() if r["mode"] == mode]
        done = [r for r in mine if r.get("status") == "done"]
        entry = {"runs": len(done), "of": len(results["plan"]["seeds"]),
                 "status": sorted({r.get("status", "not run") for r in mine}) or ["not run"],
                 "reasons": sorted({r["reason"] for r in mine if r.get("reason")})}
        if done:
            entry["kv_ratio"] = _mean_sd([r["train"].get("kv_ratio", 1.0 if mode == "full" else None) for r in done])
            entry["val_loss"] = _mean_sd([r["train"].get("val_loss") for r in done])
            entry["test_loss"] = _mean_sd([r["train"].get("test_loss") for r in done])
            for f in (1, 2, 4):
                key = str(f * seq)
                entry[f"ppl_{f}x"] = _mean_sd([r["eval"]["long_context"]["lengths"][key]["ppl"]
                                               for r in done if "long_context" in r.get("eval", {})])
            entry["stream_ppl_beyond"] = _mean_sd([r["eval"]["streaming"]["ppl_beyond_trained"]
                                                   for r in done if "streaming" in r.get("eval", {})])
            entry["stream_ppl"] = _mean_sd([r["eval"]["streaming"]["ppl"] for r in done
                                            if "streaming" in r.get("eval", {})])
            entry["stream_skipped"] = sorted({r["eval"]["streaming_skipped"] for r in done
                                              if r.get("eval", {}).get("streaming_skipped")})
        out[mode] = entry
    full = out.get("full", {}).get("val_loss")
    for mode, entry in out.items():
        if full and entry.get("val_loss"):
            entry["val_loss_vs_full"] = entry["val_loss"][0] / full[0]
    return out


def table(results: dict) -> str:
    """The markdown table: mode, KV kept, val loss, ratio to full, long-context ppl, streaming ppl."""
    summary = summarize(results)
    seq = results["plan"]["preset"]["seq_length"]
    head = (f"| mode | KV kept | val loss (a) | vs full | ppl {seq} (b) | ppl {2 * seq} (b) | ppl {4 * seq} (b) "
            f"| stream ppl > {seq} (c) | runs |")
    lines = [head, "|" + "---|" * 9]
    derived = results.get("derived", {})
    for mode in MODES:
        if mode not in summary:
            continue
        e = summary[mode]
        label = MODE_LABELS[mode]
        if mode == "streamingllm" and derived.get("streaming_window"):
            label += f", W={derived['streaming_window']}"
        if mode == "fixllm" and derived.get("fixllm_interval"):
            label += f", interval {derived['fixllm_interval']}"
        if not e["runs"]:
            why = "; ".join(e["reasons"]) or ", ".join(e["status"])
            lines.append(f"| {label} | {why} |" + " |" * 6 + f" 0/{e['of']} |")
            continue
        ratio = f"{e['val_loss_vs_full']:.4f}" if "val_loss_vs_full" in e else "-"
        stream = _fmt(e["stream_ppl_beyond"]) if not e["stream_skipped"] else "skipped: " + "; ".join(e["stream_skipped"])
        lines.append(f"| {label} | {_fmt(e['kv_ratio'], 3)} | {_fmt(e['val_loss'])} | {ratio} | "
                     f"{_fmt(e['ppl_1x'])} | {_fmt(e['ppl_2x'])} | {_fmt(e['ppl_4x'])} | {stream} | "
                     f"{e['runs']}/{e['of']} |")
    return "\n".join(lines)


def header(results: dict) -> str:
    p, env, d = results["plan"], results.get("environment", {}), results.get("derived", {})
    pre = p["preset"]
    lines = [
        f"preset {pre['name']}: {pre['num_layers']} layers x {pre['hidden_size']} ({pre['num_heads']} heads), "
        f"seq {pre['seq_length']}, {pre['train_iters']} iterations x {pre['tokens_per_step']:,} tokens = "
        f"{pre['train_iters'] * pre['tokens_per_step']:,} tokens per run, seeds {', '.join(map(str, p['seeds']))}, "
        f"{pre['precision']}; corpus {p.get('corpus', {}).get('dir', '?')} (tokenizer "
        f"{os.path.basename(str(p.get('corpus', {}).get('tokenizer', '?')))})",
        f"machine {env.get('host', '?')}: {env.get('device', '?')}; torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, deepspeed {env.get('deepspeed', '?')}; commit "
        f"{env.get('commit', '?')}",
        f"command: {env.get('command', '?')}",
    ]
    if d.get("budget_kv_ratio"):
        lines.append(f"KV budget: {d['budget_kv_ratio']:.4f} (cum_kv_ratio logged by {d['budget_from']}) -> "
                     f"StreamingLLM window {d.get('streaming_window')}, FixLLM interval {d.get('fixllm_interval')}")
    lines.append("± is the sample standard deviation over seeds; (a) validation loss of the trainer at the "
                 "trained length, (b) held-out perplexity with the model's own mask, (c) streaming perplexity "
                 "over the tokens past the trained length")
    return "\n".join(lines)


def plot(results: dict, path: str) -> Optional[str]:
    """Loss curves per mode, NLL by position (b) and streaming NLL (c); returns None, or why no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed here: rerun with --report-only where it is"
    seq = results["plan"]["preset"]["seq_length"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for mode in MODES:
        done = [r for r in results.get("runs", {}).values() if r["mode"] == mode and r.get("status") == "done"]
        if not done:
            continue
        label = MODE_LABELS[mode]
        curves = [dict(map(tuple, r["train"]["loss_curve"])) for r in done]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        if tokens:
            axes[0].plot(tokens, [statistics.fmean(c[t] for c in curves) for t in tokens], label=label)
        lc = [r["eval"]["long_context"] for r in done if "long_context" in r.get("eval", {})]
        if lc:
            key = str(4 * seq)
            curve = [statistics.fmean(x) for x in zip(*(e["lengths"][key]["nll_by_position"] for e in lc))]
            bucket = lc[0]["bucket"]
            axes[1].plot([(i + 0.5) * bucket for i in range(len(curve))], curve, label=label)
        st = [r["eval"]["streaming"] for r in done if "streaming" in r.get("eval", {})]
        if st:
            ends = [c["end"] for c in st[0]["curve"]]
            curve = [statistics.fmean(x) for x in zip(*([c["nll"] for c in s["curve"]] for s in st))]
            axes[2].plot(ends[:len(curve)], curve, label=label)
    axes[0].set(title="training loss (mean over seeds)", xlabel="tokens", ylabel="loss")
    axes[1].set(title=f"(b) NLL by position, windows of {4 * seq}", xlabel="position", ylabel="NLL")
    axes[2].set(title="(c) streaming NLL per chunk", xlabel="tokens streamed", ylabel="NLL")
    for ax in axes[1:]:
        ax.axvline(seq, color="grey", linestyle=":", linewidth=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench/fidelity.py --preset {results['plan']['preset']['name']}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None

