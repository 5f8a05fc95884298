"""SepLLM and Self-Adjusting softmax keys, with the reference's exact (case-sensitive) names and defaults.

Rules tying these together (mode exclusivity, rewrites in full-attention mode, ...) are enforced by
`megatron.model.sepllm.checker.check_sepllm_args`, which the validation step calls.
"""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class SepLLMArgs:
    """SepLLM attention: initial tokens + separators + local window (reference `SepLLMArgs`)."""

    separator_token_ids: Optional[list] = arg(
        None, "Separator token ids, e.g. the ids of . , ? ! ; : space tab newline ([15, 13, 32, 2, 28, 27, "
              "209, 186, 187] for the Pythia tokenizer). [-1] disables separators.")
    PADDING_ID: int = arg(0, "Padding id (Pythia/GPT-NeoX: 0); used by BATCH_ADAPTIVE_INIT_POS.")
    prefill_k: int = arg(0, "Deprecated in the reference, never read (kept for config compatibility).")
    generate_k: int = arg(0, "Deprecated in the reference, never read (kept for config compatibility).")
    prefill_local_window_size: int = arg(256, "Local window W for training / prefill.")
    generate_local_window_size: int = arg(256, "Local window at decode time.")
    USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS: bool = arg(
        False, "Use prefill_loc_win_size_list (one window per layer) instead of prefill_local_window_size.")
    USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS: bool = arg(
        False, "Use generate_win_loc_size_list (one decode window per layer).")
    prefill_loc_win_size_list: Optional[list] = arg(
        None, "Per-layer training/prefill windows (length num_layers); a window >= seq_length is full attention.")
    generate_win_loc_size_list: Optional[list] = arg(None, "Per-layer decode windows (length num_layers).")
    init_tok_max_idx: int = arg(2, "Largest kept initial-token index: init_tok_max_idx + 1 initial tokens; -1 none.")
    USE_ORIGINAL_FULL_ATTEN: bool = arg(False, "Vanilla causal attention (highest priority).")
    streamingLLM: bool = arg(False, "StreamingLLM training: initial tokens + window, no separators.")
    USE_SEP_ATTN_KERNEL_ACCELERATOR: bool = arg(
        True, "Use the Sep-Attention (FlexAttention) kernel path. Default True as in the reference: set it "
              "False for vanilla, StreamingLLM, SA or mask-based SepLLM.")
    RECOMPILE_SEP_ATTN_KERNEL: bool = arg(False, "Compile the BlockMask construction (kernel path only).")
    BATCH_ADAPTIVE_INIT_POS: bool = arg(False, "Locate the initial tokens after left padding, per row.")
    PRINT_KV_RATIO: bool = arg(False, "Compute and log KV-retention ratio and attention-map density.")
    print_ratio_intervals: int = arg(8000, "Log the KV ratios every this many forward passes.")
    USE_BiPE: bool = arg(False, "Bilevel positional encoding (needs pos_emb rotary or alibi).")
    BiPE_seps: Optional[list] = arg(None, "Separator ids that delimit BiPE segments.")
    EXCLUDE_DIAGONAL: bool = arg(True, "Window of W keys including the diagonal (True) or W + 1 keys (False).")
    USE_FIXED_SEP_INTERVALs: bool = arg(
        False, "FixLLM: besides the initial tokens and the window, keep every interval-th key, (k - init_start + 1) "
               "% interval == 0, in place of the separators (mask-based; separators are ignored).")
    fixed_sep_intervals_list: Optional[list] = arg(
        None, "FixLLM's interval per layer (length num_layers, each >= 1); read with USE_FIXED_SEP_INTERVALs.")
    _DEFAULT_SPARSE_BLOCK_SIZE: int = arg(128, "Q and KV block size of the FlexAttention BlockMask.")


@dataclass
class AdjustSoftmaxArgs:
    """Self-Adjusting softmax (reference `AdjustSoftmaxArgs`)."""

    USE_SA_SOFTMAX: bool = arg(False, "Self-Adjusting softmax, normalised variant.")
    USE_SA_SOFTMAX_NO_DENO: bool = arg(False, "Self-Adjusting softmax without denominator: s * softmax(s).")
    SA_Numerator_Bias: float = arg(0.0, "Added to the numerator s - m.")
    SA_Denominator_Bias: float = arg(1e-10, "Added to the max term of the denominator (twice, as the reference).")


@dataclass
class SepKernelArgs:
    """Launch settings of the Sep-Attention GPU kernel (project keys; they change speed, not the results beyond
    float32 summation order). The experiment variables $SEP_ATTN_BLOCKS, $SEP_ATTN_GATHER, $SEP_ATTN_FAST_LAUNCH
    and $SEP_ATTN_BACKWARD override them at launch, with a notice, and the values used are what the resolved
    config records."""

    sep_attn_kernel_blocks: Optional[dict] = arg(
        None, "Tile sizes overriding the kernel's tuned table, per head-dim class: {64: {fwd: [BLOCK_M, BLOCK_N, "
              "warps, stages], dq: [...], dkdv_c: [...], dkdv_b: [...], fused_b: [...], fused_c: [...]}, 128: {...}} "
              "(`python -m megatron.model.sepllm.kernel.tune --json FILE` writes one).")
    sep_attn_kernel_gather: str = arg(
        "auto", "Copy the listed (initial and separator) K/V rows into contiguous buffers before the compact loops: "
                "auto (from sequence length 8192), on, off.", choices=("auto", "on", "off"))
    sep_attn_kernel_fast_launch: bool = arg(
        True, "Call the compiled kernels directly after triton's first launch of each specialisation (less host "
              "time per call); a failed direct launch falls back to triton's path with a warning.")
    sep_attn_kernel_backward: str = arg(
        "split", "Backward kernels: split (a dQ kernel and two dK/dV kernels; 7 matmuls per kept tile pair, "
                 "deterministic) or fused (one visit per kept tile pair, 5 matmuls, dQ summed in float32 by atomics: "
                 "dQ's rounding varies from run to run).", choices=("split", "fused"))
    sep_attn_kernel_env: Optional[list] = arg(
        None, "The $SEP_ATTN_* variables that overrode the keys above at launch.", role="derived")
