"""Training logs: one console line per ``log_interval``, TensorBoard, wandb, FLOPs and MFU.

Nothing here synchronises the GPU: the trainer accumulates losses on the device and hands this module
plain floats once per log interval. The FLOPs formula is documented in docs/training.md.

Dashboards get GPT-NeoX's scalar names (:data:`GPT_NEOX_SCALARS`), so a TensorBoard or wandb dashboard made
for GPT-NeoX runs works unchanged; what GPT-NeoX does not have goes under ``train/``, ``runtime/`` or
``sepllm/``. Extra metrics (e.g. the SepLLM KV-retention ratio) are passed in by the trainer, which owns
whatever produces them: there is no registry of callbacks here.
"""
import math
import os
import re
import resource
import socket
import sys
import time
from typing import Dict, Optional

import torch

# The console key -> the dashboard name, as GPT-NeoX's megatron/logging.py (training_log) writes them at
# EleutherAI/gpt-neox@ea7aefd8f8e183256992d9fede4d7c71a46d67a5. Units follow GPT-NeoX too: iteration_time in
# seconds, flops_per_sec_per_gpu in FLOP/s, the utilisations in percent.
GPT_NEOX_SCALARS = {
    "lm_loss": "train/lm_loss",
    "learning_rate": "train/learning_rate",
    "loss_scale": "train/loss_scale",
    "samples_per_sec": "runtime/samples_per_sec",
    "iteration_time": "runtime/iteration_time",
    "steps_per_sec": "runtime/steps_per_sec",
    "tokens_per_sec": "runtime/tokens_per_sec",
    "flops_per_sec_per_gpu": "runtime/flops_per_sec_per_gpu",
    "model_flops_utilization": "runtime/model_flops_utilization",
    "hardware_flops_utilization": "runtime/hardware_flops_utilization",
}
# The project's own scalars, named beside GPT-NeoX's.
PROJECT_SCALARS = {
    "grad_norm": "train/grad_norm",
    "skipped_iters": "train/skipped_iters",
    "mem_alloc_gib": "runtime/mem_alloc_gib",
    "mem_reserved_gib": "runtime/mem_reserved_gib",
    "mem_rss_gib": "runtime/mem_rss_gib",
}
_CONSOLE_ONLY = ("tflops_per_gpu", "mfu", "iter_time_ms", "progress")
_PER_LAYER = re.compile(r"^(?P<base>.+)/layer_\d+$")


def dashboard_scalars(metrics: Dict[str, float]) -> Dict[str, float]:
    """The scalars of one training log step under their dashboard names.

    Known keys get GPT-NeoX's or the project's name; a key that already has a namespace (``sepllm/...``,
    per-layer values included) is kept as it is. Console-only derived values are dropped: their dashboard
    forms are ``runtime/flops_per_sec_per_gpu`` and ``runtime/model_flops_utilization``.
    """
    out = {}
    for key, value in metrics.items():
        if key in _CONSOLE_ONLY or value is None or isinstance(value, bool) \
                or not isinstance(value, (int, float)):
            continue
        if key in GPT_NEOX_SCALARS:
            out[GPT_NEOX_SCALARS[key]] = float(value)
        elif key in PROJECT_SCALARS:
            out[PROJECT_SCALARS[key]] = float(value)
        elif "/" in key:
            out[key] = float(value)
        else:
            out[f"train/{key}"] = float(value)
    return out


# --------------------------------------------------------------------------------------------- FLOPs
def _matmul_weights(neox_args) -> int:
    """Weights one layer multiplies per token: QKV (``kv_heads`` key/value heads), the output projection, and the
    MLP (three ``h x f`` matrices for a gated one, two otherwise; ``f = mlp_inner_size``)."""
    from megatron.neox_arguments.model_args import GATED_ACTIVATIONS

    h, f = neox_args.hidden_size, neox_args.mlp_inner_size
    kv = neox_args.num_kv_heads * (h // neox_args.num_attention_heads)
    mlp = (3 if neox_args.activation in GATED_ACTIVATIONS else 2) * h * f
    return h * (h + 2 * kv) + h * h + mlp


def flops_per_token(neox_args, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward) of the GPT-NeoX model, dense attention.

    Forward per token: each layer does ``2 * (4 h^2 + 2 h f)`` FLOPs in its matmuls (QKV, output
    projection, the two MLP matmuls with hidden ``f``; with ``num_kv_heads`` key/value heads of size ``d`` QKV is
    ``h (h + 2 kv d)``, and a swiglu MLP has three ``h f`` matmuls) plus ``4 s h`` in attention (``QK^T`` and
    ``AV`` over ``s`` keys, counted as full attention as Megatron and PaLM do); the output layer does
    ``2 h V``. Backward costs twice the forward. Activation recomputation re-runs the layers' forward
    (not the output layer), adding one more forward of the layers when ``recompute`` is True.
    """
    h, s, L = neox_args.hidden_size, neox_args.seq_length, neox_args.num_layers
    vocab = neox_args.padded_vocab_size
    layer_fwd = L * (2 * _matmul_weights(neox_args) + 4 * s * h)
    logits_fwd = 2 * h * vocab
    layer_passes = 4 if recompute else 3
    return float(layer_passes * layer_fwd + 3 * logits_fwd)


def throughput_metrics(neox_args, iterations: int, elapsed_s: float) -> Dict[str, float]:
    """Rates over ``iterations`` steps that took ``elapsed_s`` (the trainer passes one log interval).

    ``tokens_per_sec``, ``samples_per_sec``, ``steps_per_sec``, ``iteration_time`` (s); ``tflops_per_gpu`` and
    ``flops_per_sec_per_gpu``: hardware FLOPs (recomputation included) per GPU; ``mfu``: model FLOPs (no
    recomputation) over ``peak_tflops_per_gpu`` as a fraction, and GPT-NeoX's ``model_flops_utilization`` /
    ``hardware_flops_utilization`` in percent.
    """
    iterations = max(iterations, 1)
    elapsed_s = max(elapsed_s, 1e-9)
    samples = iterations * neox_args.train_batch_size
    tokens = samples * neox_args.seq_length
    world = neox_args.global_num_gpus
    recompute = neox_args.checkpoint_activations
    hardware = tokens * flops_per_token(neox_args, recompute) / elapsed_s / world
    model = tokens * flops_per_token(neox_args, False) / elapsed_s / world
    peak = neox_args.peak_tflops_per_gpu * 1e12
    return {"tokens_per_sec": tokens / elapsed_s, "samples_per_sec": samples / elapsed_s,
            "steps_per_sec": iterations / elapsed_s, "iteration_time": elapsed_s / iterations,
            "tflops_per_gpu": hardware / 1e12, "flops_per_sec_per_gpu": hardware, "mfu": model / peak,
            "model_flops_utilization": 100.0 * model / peak, "hardware_flops_utilization": 100.0 * hardware / peak}


# ---------------------------------------------------------------------------------------- formatting
def memory_metrics() -> Dict[str, float]:
    """Peak memory in GiB: CUDA allocated/reserved on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    # ru_maxrss is KiB on Linux.
    return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_bar(iteration: int, total: int, elapsed_s: float, start_iteration: int = 0, width: int = 20) -> str:
    """A text progress bar with ETA, safe in log files (no carriage returns)."""
    total = max(total, 1)
    frac = min(max(iteration / total, 0.0), 1.0)
    filled = int(round(frac * width))
    done_here = iteration - start_iteration
    eta = elapsed_s / done_here * (total - iteration) if done_here > 0 else float("nan")
    return f"|{'#' * filled}{'.' * (width - filled)}| {100 * frac:5.1f}% [{format_duration(elapsed_s)}<{format_duration(eta)}]"


_DASHBOARD_ONLY = ("flops_per_sec_per_gpu", "model_flops_utilization", "hardware_flops_utilization",
                   "steps_per_sec", "iteration_time")


def _collapse_layers(extra: Dict[str, float]) -> Dict[str, str]:
    """Per-layer values (``.../layer_XX``) become one console entry: the overall value (or the mean of the
    layers when there is none) and the layers' range when they differ."""
    groups: Dict[str, list] = {}
    for key, value in extra.items():
        match = _PER_LAYER.match(key)
        if match:
            groups.setdefault(match.group("base"), []).append(float(value))
    out = {}
    for key in sorted(extra):
        if _PER_LAYER.match(key):
            continue
        out[key] = f"{key} {extra[key]:.4g}"
    for base, values in groups.items():
        head = out.get(base) or f"{base} {sum(values) / len(values):.4g}"
        if max(values) != min(values):
            head += f" (layers {min(values):.4g}..{max(values):.4g})"
        out[base] = head
    return {k: out[k] for k in sorted(out)}


def format_log_line(iteration: int, total: int, metrics: Dict[str, float]) -> str:
    """The console line: fixed fields first, in a fixed order, then any extra metrics, per-layer values
    summarised (they are on the dashboards one by one)."""
    parts = [f"iteration {iteration:>8d}/{total:>8d}"]
    fixed = [("lm_loss", "loss", "{:.6E}"), ("learning_rate", "lr", "{:.4E}"), ("grad_norm", "grad norm", "{:.4f}"),
             ("loss_scale", "loss scale", "{:.1f}"), ("tokens_per_sec", "tokens/s", "{:.0f}"),
             ("tflops_per_gpu", "TFLOP/s/GPU", "{:.2f}"), ("mfu", "MFU", "{:.2%}"),
             ("samples_per_sec", "samples/s", "{:.2f}"), ("iter_time_ms", "ms/iter", "{:.1f}"),
             ("skipped_iters", "skipped", "{:d}"), ("mem_alloc_gib", "mem GiB", "{:.2f}"),
             ("mem_reserved_gib", "reserved GiB", "{:.2f}"), ("mem_rss_gib", "rss GiB", "{:.2f}")]
    known = set(_DASHBOARD_ONLY) | {"progress"}
    for key, label, fmt in fixed:
        known.add(key)
        if key in metrics and metrics[key] is not None:
            value = int(metrics[key]) if fmt == "{:d}" else metrics[key]
            parts.append(f"{label} {fmt.format(value)}")
    parts.extend(_collapse_layers({k: v for k, v in metrics.items() if k not in known}).values())
    if "progress" in metrics:
        parts.append(str(metrics["progress"]))
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------- writers
class TrainingLogger:
    """Console, TensorBoard and wandb output of rank 0 (other ranks only feed extra metrics).

    ``rank`` decides who writes; ``stream`` defaults to stdout.
    """

    def __init__(self, neox_args, rank: int = 0, stream=None):
        self.neox_args = neox_args
        self.rank = rank
        self.stream = stream or sys.stdout
        self.tb = None
        self.wandb = None
        self.start_time = time.perf_counter()
        self.start_iteration = neox_args.iteration or 0
        if neox_args.use_wandb and (rank == 0 or neox_args.wandb_init_all_ranks):
            self._init_wandb()
        if rank != 0:
            return
        if neox_args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(neox_args.tensorboard_dir, exist_ok=True)
            self.tb = SummaryWriter(log_dir=neox_args.tensorboard_dir)

    def _init_wandb(self) -> None:
        import wandb

        args = self.neox_args
        # Without a key wandb would prompt or fail; offline runs can be synced later with `wandb sync`.
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        wandb_dir = args.wandb_dir or args.tensorboard_dir or args.save
        # With wandb_init_all_ranks every rank reports its system metrics as its own run of one group;
        # scalars are still logged by rank 0 only (log_scalars).
        group = args.wandb_group or (f"{args.wandb_project}-{socket.gethostname()}" if args.wandb_init_all_ranks
                                     else None)
        self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_team, group=group, mode=mode,
                                dir=wandb_dir, name=f"rank{self.rank}" if args.wandb_init_all_ranks else None,
                                config=args.to_dict(), reinit=True,
                                settings=wandb.Settings(base_url=args.wandb_host))

    def print(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.stream, flush=True)

    def log_scalars(self, iteration: int, scalars: Dict[str, float], prefix: Optional[str] = "train") -> None:
        """Writes ``<prefix>/<key>`` (``<key>`` as given when ``prefix`` is None) to TensorBoard and wandb."""
        if self.rank != 0 or not scalars:
            return
        clean = {(k if prefix is None else f"{prefix}/{k}"): float(v) for k, v in scalars.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=iteration)

    def log_training(self, iteration: int, metrics: Dict[str, float], interval_iters: int, interval_s: float) -> str:
        """Prints one training log line and records its scalars under their dashboard names
        (:func:`dashboard_scalars`); returns the line (tests read it). Rates cover the log interval."""
        total = int(self.neox_args.train_iters)
        metrics = dict(metrics)
        metrics.update(throughput_metrics(self.neox_args, interval_iters, interval_s))
        metrics["iter_time_ms"] = 1000.0 * metrics["iteration_time"]
        metrics.update(memory_metrics())
        elapsed = time.perf_counter() - self.start_time
        line = format_log_line(iteration, total, dict(metrics, progress=progress_bar(
            iteration, total, elapsed, self.start_iteration)))
        self.print(line)
        self.log_scalars(iteration, dashboard_scalars(metrics), prefix=None)
        return line

    def log_evaluation(self, iteration: int, split: str, loss: float) -> str:
        ppl = math.exp(min(loss, 20.0))
        line = f"{split} results at iteration {iteration} | lm_loss {loss:.6E} | lm_loss_ppl {ppl:.6E}"
        self.print(line)
        self.log_scalars(iteration, {"lm_loss": loss, "lm_loss_ppl": ppl}, prefix=split)
        return line

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None



# ------------------------------------------------------------------------------------------ text logs
class _Tee:
    """A stream that writes to the original stream and to a file (line-buffered, appended)."""

    def __init__(self, stream, path: str):
        self.stream = stream
        self.file = open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def tee_text_logs(log_dir: Optional[str], rank: int) -> Optional[str]:
    """With ``log_dir`` set, this rank's stdout and stderr are also appended to
    ``<log_dir>/<host>_rank<R>_stdout.txt`` / ``_stderr.txt`` (GPT-NeoX keeps such per-host text logs too).
    Returns the file prefix, or None without ``log_dir``."""
    if not log_dir:
        return None
    os.makedirs(log_dir, exist_ok=True)
    prefix = os.path.join(log_dir, f"{socket.gethostname()}_rank{rank}")
    sys.stdout = _Tee(sys.stdout, prefix + "_stdout.txt")
    sys.stderr = _Tee(sys.stderr, prefix + "_stderr.txt")
    return prefix
