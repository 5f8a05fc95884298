"""Multi-GPU scaling (issue 20): data, pipeline and tensor parallelism through the user's own launcher.

Every layout is one ``python deepy.py train.py config.yml`` with a complete config written under ``--out``
(``num_gpus`` = DP x TP x PP; NCCL on GPUs, gloo on CPU), the same model, data, seed and keys except the layout
and the batch split. Figures come from the trainer's own log lines (``tokens/s``, ``MFU``, ``loss``), the
tokens/s as the median of the intervals after ``--warmup-intervals`` (compilation). Suites:

  dp       Pythia-160M, seq 2048, ZeRO-1, full attention and SepLLM n64 (the kernel on GPUs): DP = 1, 2, 4 with
           the same micro-batch per GPU (weak scaling); tokens/s per GPU and the efficiency against DP = 1.
  tp       Pythia-1.4B shape: TP = N against TP = 1 x DP = N (ZeRO-1) on the same N GPUs, same global batch.
           The share of step time in collectives is ``bench/bench_tp.py``'s (profiled in-process).
  pp       PP = 2 x DP = 2 against PP = 1 x DP = 2, same micro-batches per data-parallel rank: the measured
           bubble ``1 - T(pp1) / (2 T(pp2))`` against ``(p - 1) / (m + p - 1)``.
  exact    the first 20 losses (log interval 1) of DP = 4, TP = 2 x DP = 2 and PP = 2 x DP = 2 against the run
           with DP = TP = 1 and the same PP and global batch: the 1-GPU run for DP and TP; PP = 2 x DP = 1 for
           the pipeline layout, because a pipeline stage initialises only its own layers, so a different PP
           starts from different weights. Reports the max relative difference.
  largest  SepLLM n64 (kernel) at seq 8192 on 4 GPUs, TP = 4 with activation checkpointing and ZeRO-1, from the
           largest Pythia shape down: the first that trains its steps, with its tokens/s and MFU.

    python bench/bench_scaling.py --preset gpu --gpus 4 --out $OUT/scaling              # every suite
    python bench/bench_scaling.py --preset gpu --gpus 2 --suite dp,exact --out $OUT/scaling
    python bench/bench_scaling.py --preset cpu --gpus 2 --out runs/scaling-cpu           # gloo, 2 processes

``--preset cpu`` is the same harness on a 4 x 128 model at seq 256 (fp32, gloo), layouts up to 2 processes:
it checks the layouts, the batch split and the exactness, not speed. Layouts needing more than ``--gpus``
are listed as skipped. Results: ``results.json`` and ``table.md`` under ``--out``, with machine and versions.
The same command again under the same ``--out`` keeps the finished runs and runs the rest (``--max-minutes``
stops launching, so each call fits a time limit).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, REPO):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import fidelity  # noqa: E402  (the launcher, the log parser, the environment record)
import fidelity_plan as plan  # noqa: E402  (the Pythia layout keys and the SepLLM mode keys)

SUITES = ("dp", "tp", "pp", "exact", "largest")
SHAPES = {  # Pythia's (layers, hidden, heads)
    "160m": (12, 768, 12), "410m": (24, 1024, 16), "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32),
    "6.9b": (32, 4096, 32), "cpu": (4, 128, 4),
}


class ScalingError(RuntimeError):
    """A request this bench cannot run; the message names the option."""


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int
    tp: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        return f"dp{self.dp}.tp{self.tp}.pp{self.pp}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One launch: a layout, a shape, an attention mode and the batch split (global batch = micro x accum x dp)."""

    suite: str
    layout: Layout
    shape: str
    mode: str
    micro_batch: int
    grad_accum: int
    iters: int
    log_interval: int
    seq_length: int
    checkpoint_activations: bool = False

    @property
    def name(self) -> str:
        return f"{self.suite}-{self.shape}-{self.mode}-{self.layout.name}-mb{self.micro_batch}x{self.grad_accum}"

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.layout.dp


def base_preset(preset: str) -> plan.Preset:
    """fidelity's presets carry the Pythia recipe: gpu160m (bf16, torch.compile, the kernel) or cpu (fp32)."""
    return plan.get_preset("gpu160m" if preset == "gpu" else "cpu")


def run_config(run: Run, preset: str, data: Dict[str, str]) -> dict:
    """The complete trainer config of ``run``."""
    layers, hidden, heads = SHAPES[run.shape]
    p = dataclasses.replace(base_preset(preset), num_layers=layers, hidden_size=hidden, num_heads=heads,
                            seq_length=run.seq_length, micro_batch=run.micro_batch, grad_accum=run.grad_accum,
                            tokens_per_run=run.iters * run.micro_batch * run.grad_accum * run.seq_length,
                            log_interval=run.log_interval, eval_iters=0)
    cfg = plan.model_keys(p)
    cfg.update(plan.mode_keys(run.mode, p))
    cfg.pop("PRINT_KV_RATIO", None)  # statistics are not what is timed here
    cfg.pop("print_ratio_intervals", None)
    lay = run.layout
    cfg.update({
        "num_gpus": lay.world, "model_parallel_size": lay.tp, "pipe_parallel_size": lay.pp,
        "zero_optimization": {"stage": 1 if cfg["precision"] == "bf16" else 0},
        "train_iters": run.iters, "lr_decay_iters": run.iters, "eval_interval": run.iters + 1, "eval_iters": 0,
        "data_path": data["prefix"], "split": "100,0,0", "data_impl": "mmap", "num_workers": 0,
        "checkpoint_activations": run.checkpoint_activations, "seed": 1234,
    })
    cfg.update(data["tokenizer_keys"])
    return cfg


def tokenizer_keys(preset: str, vocab_file: Optional[str]) -> dict:
    return {"tokenizer_type": "CharLevelTokenizer"} if preset == "cpu" else \
        {"tokenizer_type": "HFTokenizer", "vocab_file": vocab_file}


def corpus(out_dir: str, preset: str, tokens_path: Optional[str], n_tokens: int,
           vocab_file: Optional[str]) -> Dict[str, object]:
    """The corpus of ``out_dir``, written on the first call and reused by reruns (whose plan record matched):
    real token ids (``--tokens``, Pythia-tokenised, repeated to ``n_tokens``) or random ids with ~15 %
    separators (bytes for the CPU preset's character tokenizer); one document per 2048 tokens."""
    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from megatron.hf.configuration_sepllm_gpt_neox import DEFAULT_SEPARATOR_IDS
    from megatron.tokenizer.separators import SEPARATOR_CHARS

    prefix = os.path.join(out_dir, "corpus", "scaling_text_document")
    out = {"prefix": prefix, "tokenizer_keys": tokenizer_keys(preset, vocab_file)}
    if os.path.exists(prefix + ".idx"):
        return out
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(0)
    if preset == "cpu":
        alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz" * 3 + "".join(SEPARATOR_CHARS).encode(), np.uint8)
        ids = alphabet[rng.integers(0, len(alphabet), n_tokens)].astype(np.int64)
    elif tokens_path:
        ids = np.resize(np.load(tokens_path).astype(np.int64), n_tokens)
    else:
        seps = np.array(DEFAULT_SEPARATOR_IDS)[rng.integers(0, len(DEFAULT_SEPARATOR_IDS), n_tokens)]
        ids = np.where(rng.random(n_tokens) < 0.15, seps, rng.integers(0, 50000, n_tokens))
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for start in range(0, n_tokens, 2048):
        builder.add_item(ids[start:start + 2048].tolist())
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return out


def plan_runs(suites: List[str], preset: str, gpus: int) -> List[Run]:
    """Every launch of the requested suites, in order (suites share runs with the same name)."""
    gpu = preset == "gpu"
    small, seq = ("160m", 2048) if gpu else ("cpu", 256)
    big = "1.4b" if gpu else "cpu"
    timed = dict(iters=40 if gpu else 12, log_interval=5 if gpu else 2)
    runs: List[Run] = []
    sizes = [n for n in (1, 2, 4) if n <= gpus]
    if "dp" in suites:
        for mode in ("full", "sepllm_n64"):
            for n in sizes:
                runs.append(Run("dp", Layout(dp=n), small, mode, 8 if gpu else 2, 1, seq_length=seq, **timed))
    if "tp" in suites:
        for n in (s for s in sizes if s > 1):
            accum = 4
            runs.append(Run("tp", Layout(dp=n), big, "full", 4 if gpu else 1, accum // n, seq_length=seq, **timed))
            runs.append(Run("tp", Layout(dp=1, tp=n), big, "full", 4 if gpu else 1, accum, seq_length=seq, **timed))
    if "pp" in suites:
        dp = 2 if gpus >= 4 else 1
        for pp in (1, 2):
            runs.append(Run("pp", Layout(dp=dp, pp=pp), small, "full", 4 if gpu else 1, 8, seq_length=seq, **timed))
    if "exact" in suites:
        ex = dict(iters=20, log_interval=1, seq_length=seq)
        mb, total = 2, 8  # global batch 8 samples everywhere
        layouts = [Layout(dp=4), Layout(dp=2, tp=2), Layout(dp=2, pp=2)] if gpus >= 4 else \
            [Layout(dp=2), Layout(dp=1, tp=2)]
        refs = {Layout(dp=1, pp=lay.pp) for lay in layouts}
        for lay in sorted(refs, key=lambda x: x.pp) + layouts:
            runs.append(Run("exact", lay, small, "sepllm_n64", mb, total // (mb * lay.dp), **ex))
    if "largest" in suites and gpus >= 4:
        for shape in ("6.9b", "2.8b", "1.4b"):
            runs.append(Run("largest", Layout(dp=1, tp=4), shape, "sepllm_n64", 1, 4, iters=10, log_interval=2,
                            seq_length=8192 if gpu else 1024, checkpoint_activations=True))
    return [r for r in runs if r.layout.world <= gpus] + [r for r in runs if r.layout.world > gpus]


def median_after(values: List[float], skip: int) -> Optional[float]:
    rest = values[skip:] or values[-1:]
    return sorted(rest)[len(rest) // 2] if rest else None


def max_rel_diff(losses: Dict[int, float], ref: Dict[int, float]) -> Optional[float]:
    common = sorted(set(losses) & set(ref))
    if not common or len(common) != len(ref):
        return None
    return max(abs(losses[i] - ref[i]) / abs(ref[i]) for i in common)


def summarize(results: dict, warmup_intervals: int) -> str:
    """The tables of every suite that ran, from ``results['runs']``."""
    runs = results["runs"]
    lines = [f"machine {results['environment'].get('device')}; torch {results['environment'].get('torch')}, "
             f"deepspeed {results['environment'].get('deepspeed')}, nccl {results['environment'].get('nccl')}",
             f"command: {results['environment'].get('command')}", ""]

    def rate(r):
        return median_after(r.get("rates", []), warmup_intervals)

    def mfu(r):
        value = median_after(r.get("mfu", []), warmup_intervals)
        return "" if value is None else f"{value:.2f}"

    def num(x, fmt=",.0f"):
        return "" if x is None else format(x, fmt)

    dp = [r for r in runs.values() if r["suite"] == "dp" and r["status"] == "done"]
    if dp:
        lines += ["| mode | GPUs | tokens/s | tokens/s per GPU | efficiency vs 1 GPU | MFU % |", "|---|---|---|---|---|---|"]
        for r in sorted(dp, key=lambda r: (r["mode"], r["world"])):
            one = next((o for o in dp if o["mode"] == r["mode"] and o["world"] == 1), None)
            per = rate(r) / r["world"] if rate(r) else None
            eff = per / rate(one) if per and one and rate(one) else None
            lines.append(f"| {r['mode']} | {r['world']} | {num(rate(r))} | {num(per)} | "
                         f"{'' if eff is None else f'{100 * eff:.1f} %'} | {mfu(r)} |")
        lines.append("")
    tp = [r for r in runs.values() if r["suite"] == "tp" and r["status"] == "done"]
    if tp:
        lines += ["| layout | GPUs | global batch | tokens/s | vs TP=1 x DP=N | MFU % |", "|---|---|---|---|---|---|"]
        for r in sorted(tp, key=lambda r: (r["world"], r["layout"])):
            base = next((o for o in tp if o["world"] == r["world"] and o["layout"].startswith(f"dp{r['world']}.")), None)
            ratio = rate(r) / rate(base) if base and rate(base) and rate(r) else None
            lines.append(f"| {r['layout']} | {r['world']} | {r['global_batch']} | {num(rate(r))} | "
                         f"{num(ratio, '.3f')} | {mfu(r)} |")
        lines.append("")
    pp = {r["layout"]: r for r in runs.values() if r["suite"] == "pp" and r["status"] == "done"}
    one = next((r for k, r in pp.items() if k.endswith("pp1")), None)
    two = next((r for k, r in pp.items() if k.endswith("pp2")), None)
    if one and two and rate(one) and rate(two):
        m = two["grad_accum"]
        # Same work per data-parallel rank: with half the layers a stage, the ideal PP=2 step takes half as long.
        t1, t2 = (r["global_batch"] * r["seq_length"] / rate(r) for r in (one, two))
        bubble = 1 - t1 / (2 * t2)
        lines += ["| layout | step s | micro-batches m | bubble measured | (p-1)/(m+p-1) |", "|---|---|---|---|---|",
                  f"| {one['layout']} | {t1:.3f} | {m} | | |",
                  f"| {two['layout']} | {t2:.3f} | {m} | {100 * bubble:.1f} % | {100 / (m + 1):.1f} % |", ""]
    ex = [r for r in runs.values() if r["suite"] == "exact" and r["status"] == "done"]
    if ex:
        lines += ["| layout | reference | steps compared | max relative loss difference |", "|---|---|---|---|"]
        for r in ex:
            if r["layout"].startswith("dp1.tp1."):
                continue
            ref = next((o for o in ex if o["layout"] == f"dp1.tp1.pp{r['pp']}"), None)
            d = max_rel_diff(*({int(k): v for k, v in x["losses"].items()} for x in (r, ref))) if ref else None
            lines.append(f"| {r['layout']} | {ref['layout'] if ref else '-'} | {len(r['losses'])} | "
                         f"{'' if d is None else f'{d:.2e}'} |")
        lines.append("")
    big = [r for r in runs.values() if r["suite"] == "largest"]
    if big:
        lines += ["| shape | layout | seq | status | tokens/s | MFU % |", "|---|---|---|---|---|---|"]
        for r in big:
            lines.append(f"| {r['shape']} | {r['layout']} | {r['seq_length']} | {r['status']} | "
                         f"{num(rate(r))} | {mfu(r)} |")
        lines.append("")
    skipped = [f"{k} ({r['status']})" for k, r in runs.items() if r["status"] != "done" and r["suite"] != "largest"]
    if skipped:
        lines.append("not run: " + ", ".join(skipped))
    return "\n".join(lines) + "\n"


def environment(argv: List[str]) -> dict:
    env = fidelity.environment(argv, script="bench/bench_scaling.py")
    try:
        import torch

        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        env["nccl"] = None
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs (processes on CPU) available: layouts above it skip")
    ap.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated, of {', '.join(SUITES)}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="data/sep_bench/tokens.npy", help="Pythia token ids (.npy) for the corpus")
    ap.add_argument("--vocab-file", default=os.path.join(REPO, "..", "shared", "data", "20B_tokenizer.json"))
    ap.add_argument("--warmup-intervals", type=int, default=2, help="log intervals left out of the tokens/s median")
    ap.add_argument("--max-minutes", type=float, default=55.0, help="stop launching runs after this")
    args = ap.parse_args(argv)
    suites = [s for s in args.suite.split(",") if s]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise SystemExit(f"--suite: {','.join(bad) or args.suite!r} not in {', '.join(SUITES)}")
    if args.gpus < 1:
        raise SystemExit(f"--gpus must be >= 1, got {args.gpus}")
    if args.preset == "gpu":
        if not os.path.exists(args.vocab_file):
            raise SystemExit(f"--vocab-file {args.vocab_file}: not found (Pythia's 20B_tokenizer.json)")
    vocab = os.path.abspath(args.vocab_file) if args.preset == "gpu" else None
    tokens = os.path.abspath(args.tokens) if args.preset == "gpu" and os.path.exists(args.tokens) else None
    record = {"preset": args.preset, "tokens": tokens, "vocab_file": vocab}
    results = {"environment": environment(sys.argv[1:] if argv is None else list(argv)), "plan": record,
               "runs": {}}
    previous = os.path.join(args.out, "results.json")
    if os.path.exists(previous):  # a rerun under the same --out keeps the finished runs (calls of <= 10 minutes)
        with open(previous) as f:
            old = json.load(f)
        if not isinstance(old, dict) or old.get("plan") != record:
            raise SystemExit(f"--out {args.out}: its results.json is not this bench's with --preset {args.preset}, "
                             f"--tokens {tokens}, --vocab-file {vocab}; give another --out")
        results["runs"] = {k: r for k, r in old["runs"].items() if r["status"] == "done"}
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + 60 * args.max_minutes
    runs = plan_runs(suites, args.preset, args.gpus)
    # One corpus per --out, the same whatever --suite and --gpus a call names (kept runs trained on it).
    longest = max(r.iters * r.micro_batch * r.grad_accum * r.layout.dp * r.seq_length
                  for r in plan_runs(list(SUITES), args.preset, 4))
    data = corpus(args.out, args.preset, tokens, min(longest + 4096, 1 << 26), vocab)
    largest_done = False
    for run in runs:
        rec = {"suite": run.suite, "layout": run.layout.name, "world": run.layout.world, "pp": run.layout.pp,
               "shape": run.shape, "mode": run.mode, "micro_batch": run.micro_batch, "grad_accum": run.grad_accum,
               "global_batch": run.global_batch, "seq_length": run.seq_length}
        if run.name in results["runs"]:
            largest_done = largest_done or run.suite == "largest"
            continue
        if run.layout.world > args.gpus:
            results["runs"][run.name] = dict(rec, status=f"skipped: needs {run.layout.world} GPUs")
            continue
        if run.suite == "largest" and largest_done:
            continue
        if time.time() > deadline:
            results["runs"][run.name] = dict(rec, status="skipped: --max-minutes")
            continue
        run_dir = os.path.join(args.out, "runs", run.name)
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, "train.log")
        if os.path.exists(log_path):  # an unfinished earlier attempt: its rates must not mix with this one's
            os.replace(log_path, log_path + ".previous")
        print(f"[scaling] {run.name}: {run.layout.world} process(es)", flush=True)
        got = fidelity.train(run_dir, run_config(run, args.preset, data), deadline)
        parsed = fidelity.parse_train_log(os.path.join(run_dir, "train.log"), run.global_batch * run.seq_length)
        ok = got["rc"] == 0 and not got["stopped"]
        status = "done" if ok else ("stopped: --max-minutes" if got["stopped"] else
                                    f"failed: {fidelity.first_error_line(os.path.join(run_dir, 'train.log'))}")
        losses = {int(t // (run.global_batch * run.seq_length)): loss for t, loss in parsed["loss_curve"]}
        results["runs"][run.name] = dict(rec, status=status, seconds=got["seconds"], rates=parsed["rates"],
                                         mfu=parsed["mfu"], losses=losses)
        largest_done = largest_done or (run.suite == "largest" and ok)
        fidelity.write_json(os.path.join(args.out, "results.json"), results)
    table = summarize(results, args.warmup_intervals)
    fidelity.write_json(os.path.join(args.out, "results.json"), results)
    fidelity.write_text(os.path.join(args.out, "table.md"), table)
    print(table, end="")
    failed = [k for k, r in results["runs"].items() if r["status"].startswith("failed") and r["suite"] != "largest"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
