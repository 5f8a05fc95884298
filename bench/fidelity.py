#!/usr/bin/env python
"""Research fidelity: the same model, data, seeds and token budget trained once per attention mode, then
evaluated three ways (docs/fidelity.md).

    python bench/fidelity.py --preset smoke   --source ../shared/data/pg19 --out runs/fidelity-smoke   # ~2 min
    python bench/fidelity.py --preset cpu     --source ../shared/data/pg19 --out runs/fidelity-cpu     # 27 min, 2 cores
    python bench/fidelity.py --preset gpu160m --source ../shared/data/pg19 --out $OUT/fidelity         # 13 min, one H200

Modes: full attention, SepLLM n64 (a=3), n128, n64HT, StreamingLLM and FixLLM at the KV budget SepLLM n64
measured (the trainer's ``sepllm/cum_kv_ratio`` of the first n64 run). Every run is ``python deepy.py train.py
<config>`` (the trainer as users run it). Evaluations: (a) the trainer's validation loss at the trained length,
(b) held-out perplexity at 1x, 2x and 4x the trained length with the model's own mask, (c) streaming
perplexity through SepCache / StreamingLLM caches (bench/fidelity_eval.py).

Everything goes under ``--out``: ``results.json`` (rewritten after every run), ``table.md``, ``fidelity.png``,
``runs/<mode>-s<seed>/`` (config, train.log, checkpoints) and ``data/`` (the corpus, when built from
``--source``). Rerunning the same command resumes: finished runs are kept, a run stopped by ``--max-minutes``
continues from its checkpoint, a trained run without evaluation is evaluated.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import fidelity_plan as plan  # noqa: E402
import fidelity_report as report  # noqa: E402

RESULTS = "results.json"
STOP_GRACE_S = 180  # after SIGTERM, deepy's ranks save at the next step boundary; then the group is killed


class FidelityError(RuntimeError):
    """Bad input or a failed step; one line naming the option, file or run."""


def log(msg: str) -> None:
    print(f"[fidelity] {msg}", flush=True)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_yaml(path: str, cfg: dict) -> None:
    import yaml

    write_text(path, "# written by bench/fidelity.py\n" + yaml.safe_dump(cfg, sort_keys=True))


# ------------------------------------------------------------------------------------------ environment
def environment(argv: List[str], script: str = "bench/fidelity.py") -> dict:
    import torch

    env = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "torch": torch.__version__,
           "command": f"python {script} " + " ".join(shlex.quote(a) for a in argv)}
    env["device"] = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                     else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    for name in ("transformers", "deepspeed"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # recorded, not fatal: the trainer's launch will say what is missing
            env[name] = f"unavailable ({type(err).__name__})"
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        env["commit"] = commit + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown (no git)"
    return env


# ------------------------------------------------------------------------------------------ the train log
_LOSS = re.compile(r"^iteration\s+(\d+)/\s*\d+ \| loss ([0-9.eE+-]+)")
_TOKS = re.compile(r"\| tokens/s (\d+) \|")
_CUM_KV = re.compile(r"sepllm/cum_kv_ratio ([0-9.eE+-]+)")
_MFU = re.compile(r"\| MFU ([0-9.]+)% \|")
_EVAL = re.compile(r"^(validation|test) results at iteration (\d+) \| lm_loss ([0-9.eE+-]+)")


def parse_train_log(path: str, tokens_per_step: int) -> dict:
    """Loss curve (tokens, loss), last cumulative KV ratio, final validation / test loss, median tokens/s, and
    the tokens/s and MFU (%) of every logged interval in order (``rates``, ``mfu``). A resumed run appends to
    the same log: the last value of each iteration counts."""
    curve: Dict[int, float] = {}
    rates, mfu, out = [], [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _LOSS.match(line)
            if m:
                curve[int(m.group(1))] = float(m.group(2))
                t = _TOKS.search(line)
                if t:
                    rates.append(int(t.group(1)))
                u = _MFU.search(line)
                if u:
                    mfu.append(float(u.group(1)))
                kv = _CUM_KV.search(line)
                if kv:
                    out["kv_ratio"] = float(kv.group(1))
                continue
            m = _EVAL.match(line)
            if m:
                key = "val_loss" if m.group(1) == "validation" else "test_loss"
                out[key] = float(m.group(3))
                out[key.replace("loss", "iteration")] = int(m.group(2))
    out["loss_curve"] = [[it * tokens_per_step, loss] for it, loss in sorted(curve.items())]
    if rates:
        out["tokens_per_s_median"] = sorted(rates)[len(rates) // 2]
    out["rates"], out["mfu"] = rates, mfu
    return out


def first_error_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    for ln in lines:
        if "error" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else "empty log"


# ------------------------------------------------------------------------------------------ one run
def latest_checkpoint(save_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(save_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


LAUNCH = ("deepy.py", "train.py")  # python deepy.py train.py <config>, from the repository root


def train(run_dir: str, cfg: dict, deadline: float, launch=LAUNCH) -> dict:
    """``python deepy.py train.py config.yml``; resumes from the run's checkpoint when one exists. Returns
    ``{"rc", "stopped", "seconds"}``; the log is appended to ``train.log``."""
    save = cfg.get("save")
    if save and latest_checkpoint(save):
        cfg = dict(cfg, load=save)
    cfg_path = os.path.join(run_dir, "config.yml")
    write_yaml(cfg_path, cfg)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as logf:
        logf.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} python {' '.join(launch)} {cfg_path}\n")
        logf.flush()
        proc = subprocess.Popen([sys.executable, *launch, cfg_path], cwd=REPO, env=env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            stopped = True
            log(f"--max-minutes reached: stopping {os.path.basename(run_dir)} (it saves a checkpoint)")
            proc.send_signal(signal.SIGTERM)  # deepy forwards it; the ranks save and exit 0
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE_S)
            raise
    return {"rc": proc.returncode, "stopped": stopped, "seconds": round(time.time() - t0, 1)}


def evaluate(run_dir: str, cfg: dict, p: plan.Preset, mode: str, kv_ratio: Optional[float],
             derived: dict, data: dict) -> dict:
    import torch

    import fidelity_eval

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model, _ = fidelity_eval.load_run_model(os.path.join(run_dir, "config.yml"), device)
    books = fidelity_eval.held_out_books(data["test"])
    out = {"device": device}
    out["long_context"] = fidelity_eval.long_context(model, books, p.seq_length, p.long_spans, device)
    t1 = time.time()
    if mode == "full":
        kind, sizes = "full", None
    elif mode == "streamingllm":
        w = derived["streaming_window"]
        kind, sizes = "streaming", {"init_cache_size": plan.NUM_INIT, "local_size": w,
                                    "cache_size": plan.NUM_INIT + w}
    elif mode == "fixllm":
        kind, sizes = None, None
        out["streaming_skipped"] = "no bounded FixLLM cache (SepCache keeps separators and is refused for FixLLM)"
    else:
        window = p.window("n128") if mode == "sepllm_n128" else p.window("n64")
        kind, sizes = "sepcache", plan.sep_cache_sizes(kv_ratio, p.seq_length, window)
    if kind is not None:
        out["streaming"] = fidelity_eval.streaming(model, books, kind, sizes, p.stream_tokens, p.stream_chunk,
                                                   p.seq_length)
    out["seconds"] = {"long_context": round(t1 - t0, 1), "streaming": round(time.time() - t1, 1)}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ the plan
def build_corpus(args, p: plan.Preset, out_dir: str) -> dict:
    from data_prep import pg19_corpus

    if args.corpus:
        manifest = pg19_corpus.read_manifest(args.corpus)
        if manifest.get("train_tokenizer") != p.train_tokenizer:
            raise FidelityError(f"--corpus {args.corpus} was built with train_tokenizer="
                                f"{manifest.get('train_tokenizer')}, preset {p.name} needs {p.train_tokenizer}")
        tokenizer = args.vocab_file or manifest["tokenizer"]
        if not os.path.isfile(tokenizer):
            raise FidelityError(f"--corpus {args.corpus}: its tokenizer {tokenizer} is not here; give --vocab-file")
        if pg19_corpus.sha256_file(tokenizer) != manifest["tokenizer_sha256"]:
            raise FidelityError(f"--vocab-file {tokenizer} is not the tokenizer --corpus {args.corpus} was built with")
        return {s: pg19_corpus.split_prefix(args.corpus, s) for s in pg19_corpus.SPLITS} | {
            "tokenizer": os.path.abspath(tokenizer), "dir": args.corpus}
    built = pg19_corpus.build_pg19(
        args.source, os.path.join(out_dir, "data"), p.corpus, vocab_file=args.vocab_file,
        train_tokenizer=p.train_tokenizer, valid_books=p.held_out_books, test_books=p.held_out_books,
        max_books=p.max_books, log=log)
    return {k: built[k] for k in ("train", "valid", "test", "tokenizer", "dir")}


def trainer_accepts(keys) -> List[str]:
    """The keys the trainer's config does not know."""
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.loading import normalise_key

    fields = NeoXArgs.fields()
    return [k for k in keys if normalise_key(k) not in fields]


def prevalidate(cfg: dict, path: str) -> Optional[str]:
    """The config error deepy.py would stop with, or None."""
    import io

    from megatron.neox_arguments import NeoXArgs

    write_yaml(path, cfg)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            NeoXArgs.from_ymls([path])
    except Exception as err:  # the launch's own one-line error, whatever its class
        return " ".join(str(err).split())[:300]
    return None


def plan_record(p: plan.Preset, modes: List[str], seeds: List[int]) -> dict:
    pre = dataclasses.asdict(p)
    pre["windows"] = [list(w) for w in p.windows]
    pre["seeds"] = list(pre["seeds"])
    pre["train_iters"] = p.train_iters
    pre["tokens_per_step"] = p.tokens_per_step
    return {"preset": pre, "modes": modes, "seeds": seeds}


def _signature(record: dict) -> dict:
    """What must match for a rerun to resume: everything but the time limit and the corpus location."""
    pre = {k: v for k, v in record["preset"].items() if k != "max_minutes"}
    return {"preset": pre, "modes": record["modes"], "seeds": record["seeds"]}


def main(argv=None) -> int:
    from megatron.cli import HelpFormatter

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=list(plan.PRESETS), help="sizes (bench/fidelity_plan.py)")
    ap.add_argument("--out", required=True, help="everything is written under this folder; rerun to resume")
    ap.add_argument("--source", help="a folder of .txt books (PG19's layout); the corpus is built under --out/data")
    ap.add_argument("--corpus", help="an already built pg19 corpus folder (data_prep/prepare_data.py pg19)")
    ap.add_argument("--vocab-file", help="tokenizer for presets that use Pythia's (default: 20B_tokenizer.json "
                                         "beside --source); with --corpus: where its tokenizer is now")
    ap.add_argument("--modes", default=",".join(plan.MODES), help="comma-separated modes")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--tokens-per-run", type=int, default=None, help="training tokens per run (default: the preset's)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock limit of the whole command (default: the preset's); a run in progress at the "
                         "limit is stopped with a checkpoint and resumed by the next call")
    ap.add_argument("--report-only", action="store_true", help="rewrite table.md and fidelity.png from results.json")
    args = ap.parse_args(argv)
    t_start = time.time()
    out_dir = os.path.abspath(args.out)
    results_path = os.path.join(out_dir, RESULTS)
    try:
        if args.report_only:
            if not os.path.isfile(results_path):
                raise FidelityError(f"--report-only: {results_path} does not exist")
            with open(results_path) as f:
                finish(json.load(f), out_dir)
            return 0
        if bool(args.source) == bool(args.corpus):
            raise FidelityError("give --source DIR (a folder of .txt books, e.g. ../shared/data/pg19) or --corpus "
                                "DIR (a built pg19 corpus), one of them")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        p = plan.get_preset(args.preset, tokens_per_run=args.tokens_per_run, max_minutes=args.max_minutes,
                            seeds=tuple(seeds) if seeds else None)
        modes = plan.check_modes([m.strip() for m in args.modes.split(",") if m.strip()])
        deadline = t_start + 60.0 * p.max_minutes
        os.makedirs(out_dir, exist_ok=True)
        record = plan_record(p, modes, list(p.seeds))
        results = {"plan": record, "runs": {}, "derived": {}}
        if os.path.isfile(results_path):
            with open(results_path) as f:
                old = json.load(f)
            if _signature(old["plan"]) != _signature(record):
                raise FidelityError(f"--out {out_dir} holds results of another plan (preset "
                                    f"{old['plan']['preset']['name']}, modes {old['plan']['modes']}); "
                                    f"give a new --out")
            results = old
            log(f"resuming {results_path}")
        data = build_corpus(args, p, out_dir)
        results["plan"]["corpus"] = data
        results["environment"] = environment(argv)
        return run_all(results, p, modes, data, out_dir, deadline)
    except (FidelityError, plan.PlanError, ValueError) as err:
        print(f"fidelity.py: error: {err}", file=sys.stderr)
        return 2


def run_all(results: dict, p: plan.Preset, modes: List[str], data: dict, out_dir: str, deadline: float) -> int:
    results_path = os.path.join(out_dir, RESULTS)
    runs, derived = results["runs"], results["derived"]

    def save():
        write_json(results_path, results)

    # Configs that cannot launch are found before any training (a placeholder window stands in for the
    # budget modes' derived values).
    skip: Dict[str, str] = {}
    for mode in modes:
        if mode == "fixllm":
            missing = trainer_accepts(plan.FIXLLM_KEYS)
            if missing:
                skip[mode] = f"not trainable here: the trainer has no {', '.join(missing)} key"
                continue
        cfg = plan.run_config(mode, p.seeds[0], p, data, os.path.join(out_dir, "check"),
                              streaming_w=p.window("n64"), fixllm_int=8)
        err = prevalidate(cfg, os.path.join(out_dir, f".check-{mode}.yml"))
        if err and mode == "fixllm":
            skip[mode] = f"not trainable here: {err}"
        elif err:
            raise FidelityError(f"mode {mode}: the trainer refuses its config: {err}")
    for mode in modes:
        for seed in p.seeds:
            key = plan.run_name(mode, seed)
            runs.setdefault(key, {"mode": mode, "seed": seed, "status": "not run"})
            if mode in skip:
                runs[key].update(status="skipped", reason=skip[mode])
            elif runs[key]["status"] == "skipped":  # trainable since the last call (e.g. FixLLM landed)
                runs[key].update(status="not run", reason=None)
    save()

    durations = [r["seconds_total"] for r in runs.values() if r.get("seconds_total")]
    for seed in p.seeds:  # seeds outer: a time limit leaves every mode of the first seeds comparable
        for mode in modes:
            key = plan.run_name(mode, seed)
            run = runs[key]
            if run["status"] in ("done", "skipped"):
                continue
            estimate = sum(durations) / len(durations) if durations else 0.0
            if time.time() + estimate > deadline:
                run.update(status="not run", reason="--max-minutes: no time left for this run")
                save()
                continue
            if mode in plan.BUDGET_MODES and "budget_kv_ratio" not in derived:
                budget = runs.get(plan.run_name(plan.BUDGET_MODE, p.seeds[0]), {})
                kv = budget.get("train", {}).get("kv_ratio")
                if kv is None:
                    run.update(status="not run", reason=f"{plan.BUDGET_MODE} has not measured its KV ratio")
                    save()
                    continue
                derived.update(budget_kv_ratio=kv, budget_from=plan.run_name(plan.BUDGET_MODE, p.seeds[0]),
                               streaming_window=plan.streaming_window(kv, p.seq_length),
                               fixllm_interval=plan.fixllm_interval(kv, p.seq_length, p.window("n64")))
                log(f"KV budget {kv:.4f} -> StreamingLLM window {derived['streaming_window']}, "
                    f"FixLLM interval {derived['fixllm_interval']}")
            t0 = time.time()
            run_dir = os.path.join(out_dir, "runs", key)
            os.makedirs(run_dir, exist_ok=True)
            cfg = plan.run_config(mode, seed, p, data, os.path.join(run_dir, "checkpoints"),
                                  streaming_w=derived.get("streaming_window"),
                                  fixllm_int=derived.get("fixllm_interval"))
            if run["status"] != "trained":
                log(f"training {key} ({p.train_iters} iterations)")
                outcome = train(run_dir, cfg, deadline)
                run["train"] = parse_train_log(os.path.join(run_dir, "train.log"), p.tokens_per_step)
                run["train"].update(outcome)
                if outcome["stopped"]:
                    run.update(status="stopped", reason="--max-minutes: stopped with a checkpoint; rerun to resume")
                    save()
                    continue
                if outcome["rc"] != 0 or "val_loss" not in run["train"]:
                    run.update(status="failed", reason=f"deepy.py exit {outcome['rc']}: "
                                                       f"{first_error_line(os.path.join(run_dir, 'train.log'))}")
                    save()
                    if mode == "fixllm":
                        continue
                    raise FidelityError(f"run {key} failed: {run['reason']} (log {run_dir}/train.log)")
                run.update(status="trained", reason=None)
                save()
            if time.time() > deadline:
                run["reason"] = "--max-minutes: trained, evaluation left for the next call"
                save()
                continue
            log(f"evaluating {key}")
            with open(os.path.join(run_dir, "eval.log"), "a", encoding="utf-8") as evlog, \
                    contextlib.redirect_stdout(evlog):  # the model's PRINT_KV_RATIO lines
                run["eval"] = evaluate(run_dir, cfg, p, mode, run["train"].get("kv_ratio"), derived, data)
            run.update(status="done", reason=None, seconds_total=round(time.time() - t0, 1))
            durations.append(run["seconds_total"])
            save()
            finish(results, out_dir, quiet=True)
    finish(results, out_dir)
    left = [k for k, r in runs.items() if r["status"] not in ("done", "skipped")]
    if left:
        log(f"{len(left)} run(s) not finished ({', '.join(left)}): rerun the same command to continue")
    log(f"{time.time() - (deadline - 60.0 * p.max_minutes):.0f} s; results in {results_path}")
    return 0


def finish(results: dict, out_dir: str, quiet: bool = False) -> None:
    results["summary"] = report.summarize(results)
    text = report.header(results) + "\n\n" + report.table(results) + "\n"
    write_text(os.path.join(out_dir, "table.md"), text)
    why = report.plot(results, os.path.join(out_dir, "fidelity.png"))
    write_json(os.path.join(out_dir, RESULTS), results)
    if not quiet:
        print(text, flush=True)
        print(f"plot: {why}" if why else f"plot: {os.path.join(out_dir, 'fidelity.png')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
