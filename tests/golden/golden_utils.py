"""Golden-loss runs: one tiny deterministic CPU training run per attention mode, launched through deepy.py.

The per-iteration losses of each mode are stored in ``tests/golden/<mode>.json``. ``test_golden.py`` repeats
the runs and compares; ``regenerate.py`` rewrites the files on purpose and prints what moved. A run is 2
layers, seq 64, fp32, 1 process, 10 iterations on the byte-level corpus of the launch tests.
"""
import json
import platform
import sys
import tempfile
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent
# Test helpers, also run as a script (regenerate.py): the checkout and the launch helpers must import.
for _path in (GOLDEN_DIR.parents[1], GOLDEN_DIR.parent / "training"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch_utils import run_deepy, write_run_config, write_tiny_corpus  # noqa: E402

ITERATIONS = 10
# Byte ids of . , ? ! ; : space tab newline for the CharLevelTokenizer.
CHAR_SEPARATORS = [46, 44, 63, 33, 59, 58, 32, 9, 10]

BASE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
    "max_position_embeddings": 64, "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": True,
    "gpt_j_residual": True, "norm": "layernorm", "init_method": "small_init",
    "output_layer_init_method": "wang_init", "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "tokenizer_type": "CharLevelTokenizer",
    "optimizer": {"type": "Adam", "params": {"lr": 0.002, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "train_iters": ITERATIONS, "lr_decay_iters": ITERATIONS, "min_lr": 0.0002, "warmup": 0.2,
    "lr_decay_style": "cosine", "weight_decay": 0.1, "gradient_clipping": 1.0, "precision": "fp32",
    "split": "90,5,5", "eval_interval": 1000, "eval_iters": 1, "log_interval": 1, "seed": 1234,
    "pipe_parallel_size": 1, "zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
}

_SEPLLM = {"USE_ORIGINAL_FULL_ATTEN": False, "streamingLLM": False, "separator_token_ids": CHAR_SEPARATORS,
           "PADDING_ID": 0, "prefill_local_window_size": 8, "generate_local_window_size": 8,
           "init_tok_max_idx": 2, "BATCH_ADAPTIVE_INIT_POS": False}
_PER_LAYER = {"USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": True,
              "prefill_loc_win_size_list": [64, 8], "generate_win_loc_size_list": [64, 8]}
_SA = {"separator_token_ids": [-1], "prefill_local_window_size": 64, "generate_local_window_size": 64,
       "init_tok_max_idx": 2, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "SA_Numerator_Bias": 1.0e-10,
       "SA_Denominator_Bias": 1.0e-7}

MODES = {
    "full": {"USE_ORIGINAL_FULL_ATTEN": True, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False},
    "sepllm_mask": {**_SEPLLM, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False},
    "sepllm_kernel": {**_SEPLLM, "USE_SEP_ATTN_KERNEL_ACCELERATOR": True},
    "streamingllm": {**_SEPLLM, "streamingLLM": True, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False},
    "fixllm": {**_SEPLLM, "USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [3, 5],
               "USE_SEP_ATTN_KERNEL_ACCELERATOR": False},
    "sa_softmax": {**_SA, "USE_SA_SOFTMAX": True},
    "sa_softmax_no_deno": {**_SA, "USE_SA_SOFTMAX_NO_DENO": True},
    "bipe_rotary": {**_SEPLLM, **_PER_LAYER, "USE_SEP_ATTN_KERNEL_ACCELERATOR": True, "USE_BiPE": True,
                    "BiPE_seps": CHAR_SEPARATORS},
    "bipe_alibi": {**_SEPLLM, **_PER_LAYER, "pos_emb": "alibi", "USE_SEP_ATTN_KERNEL_ACCELERATOR": True,
                   "USE_BiPE": True, "BiPE_seps": CHAR_SEPARATORS},
}


def golden_path(mode: str) -> Path:
    return GOLDEN_DIR / f"{mode}.json"


def fingerprint() -> dict:
    """What decides whether two runs can be bitwise equal: the torch build and the CPU's instruction set."""
    import torch

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith("avx")))
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_vector_flags": flags}


def run_mode(mode: str, work_dir: Path) -> dict:
    """Trains ``mode`` through deepy.py in ``work_dir``; returns ``{iteration: loss}`` (float32 values as
    TensorBoard stores them)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = write_tiny_corpus(str(work_dir / "corpus"))
    keys = {**BASE, **MODES[mode], "data_path": corpus, "tensorboard_dir": str(work_dir / "tb")}
    cfg = write_run_config(work_dir / f"{mode}.yml", **keys)
    rc, out = run_deepy([cfg], 1, log_path=work_dir / "log.txt")
    if rc != 0:
        raise RuntimeError(f"golden run {mode} failed (rc {rc}):\n{out[-3000:]}")
    return tensorboard_losses(work_dir / "tb")


def tensorboard_losses(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for path in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "train/lm_loss" in acc.Tags()["scalars"]:
            losses.update({int(e.step): float(e.value) for e in acc.Scalars("train/lm_loss")})
    return losses


def load_golden(mode: str) -> dict:
    data = json.loads(golden_path(mode).read_text())
    data["losses"] = {int(k): float(v) for k, v in data["losses"].items()}
    return data


def write_golden(mode: str, losses: dict) -> None:
    data = {"mode": mode, "keys": MODES[mode], "iterations": ITERATIONS, "fingerprint": fingerprint(),
            "losses": {str(k): repr(v) for k, v in sorted(losses.items())}}
    path = golden_path(mode)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="golden-"))
