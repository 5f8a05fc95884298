"""Model shape and layer options (GPT-NeoX names and defaults)."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

NORMS = ("layernorm", "rmsnorm")
"""The accepted values of the `norm` key (megatron/model/norms.py builds each)."""

ATTENTION_TYPES = ("global", "flash")
"""Attention types accepted in `attention_config`. Both mean full causal attention through SDPA (flash or
cuDNN kernels on GPU); the SepLLM modes are selected by the SepLLM keys, not here."""

POS_EMBS = ("learned", "rotary", "alibi", "none")
"""The accepted values of the `pos_emb` key."""

ACTIVATIONS = ("gelu", "relu", "silu", "swish", "swiglu")
"""The accepted values of the `activation` key (megatron/model/transformer.py's get_activation)."""

GATED_ACTIVATIONS = ("swiglu",)
"""Activations whose MLP input projection is two halves, ``[x; gate]``, combined as ``act(gate) * x``."""

ATTENTION_VARIANT_NAMES = ("full", "streamingllm", "fixllm", "sa_softmax", "sep_kernel", "sepllm_mask")
"""Names of the core attention variants (megatron/model/attention registers one class for each)."""

INIT_METHODS = ("normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
                "xavier_normal", "wang_init", "small_init")


@dataclass
class ModelArgs:
    """Transformer shape, positional encoding, normalisation, initialisation and fusion flags."""

    num_layers: Optional[int] = arg(None, "Number of transformer layers (required).")
    hidden_size: Optional[int] = arg(None, "Transformer hidden size (required).")
    num_attention_heads: Optional[int] = arg(
        None, "Number of attention heads (required); must divide `hidden_size`.")
    num_kv_heads: Optional[int] = arg(
        None, "Key/value heads of grouped-query attention (GPT-NeoX's key): it must divide num_attention_heads; "
              "1 is multi-query attention. None means num_attention_heads (multi-head attention, QKV rows per head "
              "[q_h; k_h; v_h]); fewer heads give GPT-NeoX's GQA layout, the QKV rows [all q | all k | all v].")
    intermediate_size: Optional[int] = arg(
        None, "MLP size before GPT-NeoX's sizing rule (see mlp_inner_size). None means 4 * hidden_size.")
    mlp_multiple_of: int = arg(
        1, "GPT-NeoX's MLP rounding: the input projection's width is rounded up to a multiple of "
           "2 * mlp_multiple_of and the activation's width (mlp_inner_size) to a multiple of mlp_multiple_of.")
    mlp_inner_size: Optional[int] = arg(
        None, "Width of the MLP activation (the input of its output projection; HF's intermediate_size), by "
              "GPT-NeoX's rule: f = intermediate_size, for swiglu f = int(2 f / 3) with the activation f // 2; the "
              "input projection (twice the activation for swiglu) rounded up to a multiple of 2 * mlp_multiple_of, "
              "the activation to a multiple of mlp_multiple_of. Sizes where the two disagree are refused, as they "
              "fail in GPT-NeoX.", role="derived")
    seq_length: Optional[int] = arg(None, "Training sequence length in tokens (required).")
    sliding_window_width: Optional[int] = arg(
        None, "Mistral's sliding window for full attention: a query sees itself and the W keys before it (GPT-NeoX's "
              "flash-attn window_size=(W, -1)), through the SepLLM rule's local window with no initial tokens and "
              "no separators. None: no window. Not combinable with the SepLLM modes, which have their own window.")
    max_position_embeddings: Optional[int] = arg(
        None, "Size of the position table / longest supported position. None means `seq_length`; "
              "`seq_length` may not exceed it.")
    pos_emb: str = arg("learned", "Positional encoding: learned, rotary, alibi or none.", choices=POS_EMBS)
    rotary_pct: float = arg(1.0, "Fraction of each head's dimensions that rotary embeddings rotate (0, 1].")
    rotary_emb_base: int = arg(10000, "Base of the rotary embedding frequencies.")
    norm: str = arg("layernorm", "Normalisation layer: layernorm or rmsnorm.", choices=NORMS)
    layernorm_epsilon: float = arg(1.0e-5, "LayerNorm epsilon.")
    rms_norm_epsilon: float = arg(1.0e-8, "RMSNorm epsilon, added to the mean square: x / sqrt(mean(x^2) + eps).")
    use_bias_in_norms: bool = arg(
        True, "Give the norm layers an additive bias: LayerNorm's `bias`, RMSNorm's `offset` (GPT-NeoX's "
              "meaning; false drops both).")
    use_bias_in_attn_linear: bool = arg(True, "Give the QKV and attention output projections a bias.")
    use_bias_in_mlp: bool = arg(True, "Give the MLP projections (h->4h, 4h->h) a bias.")
    no_weight_tying: bool = arg(False, "Untie the input embedding and the output projection (Pythia: true).")
    gpt_j_residual: bool = arg(
        False, "Parallel residual x + Attn(LN1(x)) + MLP(LN2(x)) (Pythia) instead of the sequential one.")
    gpt_j_tied: bool = arg(False, "With gpt_j_residual, use one LayerNorm for both branches.")
    activation: str = arg(
        "gelu", "MLP activation. swiglu is the gated SiLU MLP of Llama: `mlp.linear1` (rows [x; gate]) -> "
                "silu(gate) * x -> `mlp.linear2`, as GPT-NeoX names and lays them out; the others use "
                "`mlp.dense_h_to_4h` / `mlp.dense_4h_to_h`.", choices=ACTIVATIONS)
    init_method: str = arg("normal", "Init of all weights except residual outputs.", choices=INIT_METHODS)
    output_layer_init_method: str = arg(
        "scaled_normal", "Init of the residual output projections (attention dense, MLP 4h->h).",
        choices=INIT_METHODS)
    init_method_std: float = arg(0.02, "Standard deviation of the normal / scaled_normal inits.")
    attention_config: Optional[list] = arg(
        None, "GPT-NeoX attention layout, e.g. [[[\"global\"], 12]]: lists of types each repeated N times. "
              "Resolved to one entry per layer. Accepted types: global, flash (both full attention). "
              "None means global for every layer.")
    attention_variant: Optional[str] = arg(
        None, "Core attention every layer runs, derived from the SepLLM mode flags by the checker's priority: full "
              "(USE_ORIGINAL_FULL_ATTEN), streamingllm (streamingLLM), fixllm (USE_FIXED_SEP_INTERVALs), "
              "sa_softmax (USE_SA_SOFTMAX / USE_SA_SOFTMAX_NO_DENO), sep_kernel (USE_SEP_ATTN_KERNEL_ACCELERATOR), else sepllm_mask.",
        role="derived", choices=ATTENTION_VARIANT_NAMES)
    output_layer_parallelism: str = arg(
        "column", "How the output layer is split under tensor parallelism: column, by vocabulary (GPT-NeoX's one "
                  "value; row is refused).",
        choices=("row", "column"))
    hidden_dropout: float = arg(0.1, "Dropout on the residual branches.")
    attention_dropout: float = arg(0.1, "Dropout on the attention probabilities.")
    apply_query_key_layer_scaling: bool = arg(
        False, "Megatron's fp16 guard (Q.K^T / layer_number, multiplied back in the softmax). No effect: it is the "
               "identity in exact arithmetic and the softmax here accumulates in fp32.")
    attention_softmax_in_fp32: bool = arg(
        False, "Compute the attention softmax in fp32 under fp16/bf16. No effect: it always accumulates in fp32.")
    scaled_upper_triang_masked_softmax_fusion: bool = arg(
        False, "GPT-NeoX CUDA fused causal softmax switch. Accepted for config compatibility; attention here "
               "uses SDPA / FlexAttention, which fuse the softmax anyway.")
    scaled_masked_softmax_fusion: bool = arg(
        False, "GPT-NeoX CUDA fused masked softmax switch (set by the reference's SepLLM configs). Accepted "
               "for compatibility; no effect (see scaled_upper_triang_masked_softmax_fusion).")
    bias_gelu_fusion: bool = arg(
        False, "Megatron's fused bias+GeLU kernel. No effect here: torch_compile fuses the two ops on GPU.")
    bias_dropout_fusion: bool = arg(
        False, "Megatron's fused bias+dropout+residual kernel. No effect here: torch_compile fuses them on GPU.")
    rope_fusion: bool = arg(False, "Use the fused rotary kernel. Must be False with USE_BiPE (checker).")
    layernorm_fusion: bool = arg(False, "apex's fused LayerNorm. No effect here: torch's LayerNorm kernels are used.")
    fp16_lm_cross_entropy: bool = arg(
        False, "GPT-NeoX: compute the LM cross entropy in fp16. Refused when true: the loss is always fp32.")
    checkpoint_activations: bool = arg(False, "Recompute transformer layers in backward (activation checkpointing).")
    checkpoint_num_layers: int = arg(1, "Layers per activation-checkpoint chunk.")
    partition_activations: bool = arg(
        False, "Partition checkpointed activations across model-parallel ranks (DeepSpeed's memory saving). No "
               "effect here: activation checkpointing is torch.utils.checkpoint.")
    synchronize_each_layer: bool = arg(
        False, "DeepSpeed checkpointing's device sync around each checkpointed layer (a debugging aid). No effect "
               "here (torch.utils.checkpoint).")
    contiguous_checkpointing: bool = arg(
        False, "DeepSpeed: keep checkpointed activations in one contiguous buffer. Refused when true (activation "
               "checkpointing here is torch.utils.checkpoint).")
    checkpoint_in_cpu: bool = arg(
        False, "DeepSpeed: move activation checkpoints to CPU memory. Refused when true (not implemented).")
    torch_compile: bool = arg(False, "Project key: wrap the model in torch.compile (GPU).")
