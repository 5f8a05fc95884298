"""What bench/fidelity.py trains: presets, attention modes and the trainer config of one (mode, seed) run.

Every function here is pure (no files, no processes), so the configuration of each mode is tested on CPU
(tests/bench/test_fidelity_plan.py). The modes are those of SEPLLM_REFERENCE.md section 11 and
configs/sepllm/: full attention, SepLLM n64 (a=3), n128, n64HT (full first and last layer), StreamingLLM and
FixLLM at the KV budget SepLLM n64 measured.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

NUM_INIT = 3  # a = 3 initial tokens (init_tok_max_idx 2), as every reference config

MODES = ("full", "sepllm_n64", "sepllm_n128", "sepllm_n64ht", "streamingllm", "fixllm")
MODE_LABELS = {
    "full": "full attention",
    "sepllm_n64": "SepLLM n64",
    "sepllm_n128": "SepLLM n128",
    "sepllm_n64ht": "SepLLM n64HT",
    "streamingllm": "StreamingLLM (n64 budget)",
    "fixllm": "FixLLM (n64 budget)",
}
BUDGET_MODE = "sepllm_n64"  # the mode whose measured KV ratio sets StreamingLLM's window and FixLLM's interval
BUDGET_MODES = ("streamingllm", "fixllm")
FIXLLM_KEYS = ("USE_FIXED_SEP_INTERVALs", "fixed_sep_intervals_list")


class PlanError(ValueError):
    """A preset, mode or option that cannot be planned; the message names it."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """One comparison's sizes. ``tokens_per_run`` is the training budget of every (mode, seed) run."""

    name: str
    corpus: str  # output folder of the pg19 builder under the data dir
    train_tokenizer: Optional[int]  # BPE vocabulary trained on the train books; None: Pythia's 20B tokenizer
    max_books: Optional[int]  # only the first N books (by name) of --source; None: all
    held_out_books: int  # books in each of the validation and test splits
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_length: int
    micro_batch: int
    grad_accum: int
    tokens_per_run: int
    lr: float
    min_lr: float
    warmup: float
    precision: str
    log_interval: int
    eval_iters: int  # validation micro-batch steps at the end of training, evaluation (a)
    long_spans: int  # held-out spans of 4x seq_length tokens scored at 1x, 2x and 4x, evaluation (b)
    stream_tokens: int  # tokens streamed through the bounded caches, evaluation (c)
    stream_chunk: int  # tokens per streaming record (the curve's resolution)
    seeds: tuple
    max_minutes: float
    torch_compile: bool = False
    fused_kernels: bool = False  # GPU only: Sep-Attention kernel for SepLLM modes (else the mask path)
    windows: tuple = (("n64", 64), ("n128", 128))
    notes: str = ""

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_length

    @property
    def train_iters(self) -> int:
        return max(1, math.ceil(self.tokens_per_run / self.tokens_per_step))

    def window(self, name: str) -> int:
        return dict(self.windows)[name]


PRESETS: Dict[str, Preset] = {
    # Minutes on 2 CPU cores: proves the pipeline end to end, shows nothing about the modes.
    "smoke": Preset(
        name="smoke", corpus="pg19_smoke_bpe1024", train_tokenizer=1024, max_books=12, held_out_books=1,
        num_layers=3, hidden_size=64, num_heads=2, seq_length=256, micro_batch=2, grad_accum=1,
        tokens_per_run=8 * 512, lr=2e-3, min_lr=2e-4, warmup=0.1, precision="fp32", log_interval=2,
        eval_iters=2, long_spans=1, stream_tokens=384, stream_chunk=128, seeds=(1234,), max_minutes=10,
        notes="pipeline check only"),
    # 18 runs on 2 CPU cores, sized from a first call with the cores free (docs/fidelity.md): 12.6k tokens/s for
    # full attention, 10.0k for n64, ~15 s of start-up and ~14 s of evaluation a run; 192 iterations make
    # about 110 s a run, 30-35 minutes in all; the guard stops at 45.
    "cpu": Preset(
        name="cpu", corpus="pg19_bpe4096", train_tokenizer=4096, max_books=None, held_out_books=4,
        num_layers=4, hidden_size=128, num_heads=4, seq_length=1024, micro_batch=4, grad_accum=1,
        tokens_per_run=192 * 4096, lr=2e-3, min_lr=2e-4, warmup=0.05, precision="fp32", log_interval=4,
        eval_iters=8, long_spans=2, stream_tokens=2048, stream_chunk=256, seeds=(1234, 1235, 1236),
        max_minutes=45,
        notes="BPE 4096 trained on the train books: the 50k Pythia output layer is most of a CPU step"),
    # Pythia-160M shape at seq 2048 on one H200: 770 s for the six runs (docs/fidelity.md). Planned from the
    # 160M throughput (docs/sep_attention_kernel.md, docs/training.md: 290-375k tokens/s on one H100 with
    # torch.compile; planned at 250k for full / kernel modes and 150k for the dense-mask modes StreamingLLM
    # and FixLLM) and the ~150 s per mode of start-up, compilation and evaluation measured on one H200.
    "gpu160m": Preset(
        name="gpu160m", corpus="pg19", train_tokenizer=None, max_books=None, held_out_books=4,
        num_layers=12, hidden_size=768, num_heads=12, seq_length=2048, micro_batch=16, grad_accum=2,
        tokens_per_run=192 * 65536, lr=6e-4, min_lr=6e-5, warmup=0.05, precision="bf16", log_interval=8,
        eval_iters=16, long_spans=8, stream_tokens=4096, stream_chunk=512, seeds=(1234,), max_minutes=25,
        torch_compile=True, fused_kernels=True,
        notes="Pythia-160M recipe (section 8) at 12.6M tokens per run (docs/fidelity.md: the budget), one seed"),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise PlanError(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    clean = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(preset, **clean) if clean else preset


def check_modes(modes: List[str]) -> List[str]:
    """The modes in the canonical order; the budget modes need the n64 run they are sized from."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise PlanError(f"--modes {','.join(unknown)}: unknown; choose from {', '.join(MODES)}")
    if any(m in BUDGET_MODES for m in modes) and BUDGET_MODE not in modes:
        raise PlanError(f"--modes {','.join(m for m in modes if m in BUDGET_MODES)} needs {BUDGET_MODE}: its "
                        f"measured KV ratio sets their budget")
    return [m for m in MODES if m in modes]


# ------------------------------------------------------------------------------------------ KV budget
def streaming_window(kv_ratio: float, seq_length: int, num_init: int = NUM_INIT) -> int:
    """StreamingLLM's window at the KV budget ``kv_ratio`` (last-row kept keys over ``seq_length``).

    Its last query row keeps ``num_init + W`` keys (the initial tokens and a window of ``W`` keys, itself
    included), so ``W = round(kv_ratio * seq_length) - num_init``.
    """
    if not 0.0 < kv_ratio <= 1.0:
        raise PlanError(f"KV ratio {kv_ratio} is not in (0, 1]")
    window = round(kv_ratio * seq_length) - num_init
    if window < 1:
        raise PlanError(f"KV ratio {kv_ratio} at seq {seq_length} leaves no window after {num_init} initial tokens")
    return window


def fixllm_interval(kv_ratio: float, seq_length: int, window: int, num_init: int = NUM_INIT) -> int:
    """FixLLM's interval at the budget: the last row keeps ``a + W`` keys plus one key per ``interval``
    positions of the ``S - a - W`` between them, so ``interval = round((S - a - W) / (r*S - a - W))``."""
    middle = seq_length - num_init - window
    extra = kv_ratio * seq_length - num_init - window
    if middle <= 0 or extra <= 0:
        raise PlanError(f"KV ratio {kv_ratio} at seq {seq_length} leaves nothing for FixLLM beyond the initial "
                        f"tokens and the window {window}")
    return max(1, round(middle / extra))


def sep_cache_sizes(kv_ratio: float, seq_length: int, window: int, num_init: int = NUM_INIT) -> Dict[str, int]:
    """Streaming (c) sizes of a SepLLM mode: the cache holds at most the keys the last trained query row kept
    (``cache_size = round(r*S)``), the local window is the trained one, and half of the rest is the
    separator budget (the other half lets the past window fill before it is compressed)."""
    cache = max(round(kv_ratio * seq_length), num_init + window + 2)
    sep = (cache - num_init - window) // 2
    return {"init_cache_size": num_init, "sep_cache_size": sep, "local_size": window, "cache_size": cache}


# ------------------------------------------------------------------------------------------ configs
def model_keys(p: Preset) -> dict:
    """Pythia's layout (SEPLLM_REFERENCE section 8) at the preset's size."""
    keys = {
        "num_layers": p.num_layers, "hidden_size": p.hidden_size, "num_attention_heads": p.num_heads,
        "seq_length": p.seq_length, "max_position_embeddings": p.seq_length,
        "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": True, "gpt_j_residual": True,
        "norm": "layernorm", "init_method": "small_init", "output_layer_init_method": "wang_init",
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "precision": p.precision,
        "train_micro_batch_size_per_gpu": p.micro_batch, "gradient_accumulation_steps": p.grad_accum,
        "train_iters": p.train_iters, "lr_decay_iters": p.train_iters,
        "optimizer": {"type": "Adam", "params": {"lr": p.lr, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": p.min_lr, "warmup": p.warmup, "lr_decay_style": "cosine", "weight_decay": 0.1,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 0 if p.precision == "fp32" else 1},
        "pipe_parallel_size": 1, "model_parallel_size": 1,
        "log_interval": p.log_interval, "eval_interval": p.train_iters, "eval_iters": p.eval_iters,
    }
    if p.torch_compile:
        keys["torch_compile"] = True
    return keys


def mode_keys(mode: str, p: Preset, streaming_w: Optional[int] = None, fixllm_int: Optional[int] = None) -> dict:
    """The SepLLM keys of ``mode`` (the reference's names and values, configs/sepllm/). ``separator_token_ids``
    is left out: the checker derives the ids of . , ? ! ; : space tab newline from the run's tokenizer (for
    Pythia's, the reference's [15, 13, 32, 2, 28, 27, 209, 186, 187])."""
    a_idx = NUM_INIT - 1
    n64, n128, seq, layers = p.window("n64"), p.window("n128"), p.seq_length, p.num_layers
    # Every mode logs its KV ratio each log interval (the tracker counts micro-batches).
    stats = {"PRINT_KV_RATIO": True, "print_ratio_intervals": p.log_interval * p.grad_accum}
    kernel = bool(p.fused_kernels)
    if mode == "full":
        return {"USE_ORIGINAL_FULL_ATTEN": True, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False}
    if mode in ("sepllm_n64", "sepllm_n128"):
        w = n64 if mode == "sepllm_n64" else n128
        return dict(prefill_local_window_size=w, generate_local_window_size=w, init_tok_max_idx=a_idx,
                    USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=kernel,
                    BATCH_ADAPTIVE_INIT_POS=False, **stats)
    if mode == "sepllm_n64ht":
        if layers < 3:
            raise PlanError(f"sepllm_n64ht needs >= 3 layers (first and last full), the preset has {layers}")
        windows = [seq] + [n64] * (layers - 2) + [seq]
        return dict(USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS=True,
                    prefill_loc_win_size_list=windows, generate_win_loc_size_list=list(windows),
                    init_tok_max_idx=a_idx, USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=False,
                    USE_SEP_ATTN_KERNEL_ACCELERATOR=kernel, BATCH_ADAPTIVE_INIT_POS=False, **stats)
    if mode == "streamingllm":
        if streaming_w is None:
            raise PlanError("streamingllm needs its window (from the n64 run's measured KV ratio)")
        # The kernel path is refused for StreamingLLM (reference section 5): the dense mask path.
        return dict(prefill_local_window_size=streaming_w, generate_local_window_size=streaming_w,
                    init_tok_max_idx=a_idx, USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=True,
                    USE_SEP_ATTN_KERNEL_ACCELERATOR=False, BATCH_ADAPTIVE_INIT_POS=False, **stats)
    if mode == "fixllm":
        if fixllm_int is None:
            raise PlanError("fixllm needs its interval (from the n64 run's measured KV ratio)")
        return dict(prefill_local_window_size=n64, generate_local_window_size=n64, init_tok_max_idx=a_idx,
                    USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
                    BATCH_ADAPTIVE_INIT_POS=False, USE_FIXED_SEP_INTERVALs=True,
                    fixed_sep_intervals_list=[fixllm_int] * layers, **stats)
    raise PlanError(f"unknown mode {mode!r}")


def run_config(mode: str, seed: int, p: Preset, data: Dict[str, str], save_dir: str,
               streaming_w: Optional[int] = None, fixllm_int: Optional[int] = None) -> dict:
    """The complete trainer config of one run: the same model, data, seed and token budget for every mode;
    only the mode keys differ. ``data``: the corpus's ``train``/``valid``/``test`` prefixes and ``tokenizer``."""
    cfg = model_keys(p)
    cfg.update({
        "train_data_paths": [data["train"]], "valid_data_paths": [data["valid"]], "test_data_paths": [data["test"]],
        "data_impl": "mmap", "num_workers": 0, "tokenizer_type": "HFTokenizer", "vocab_file": data["tokenizer"],
        "seed": int(seed), "save": save_dir,
    })
    cfg.update(mode_keys(mode, p, streaming_w, fixllm_int))
    return cfg


def run_name(mode: str, seed: int) -> str:
    return f"{mode}-s{seed}"
