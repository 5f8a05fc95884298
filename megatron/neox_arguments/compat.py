"""GPT-NeoX keys this project accepts but does not act on, in one place, each with its reason.

Two kinds:

* ``NO_OP_KEYS``: switches whose job is done here by other means with the same result (fused CUDA kernels
  that SDPA, FlexAttention or torch.compile replace; DeepSpeed's activation partitioning).
  GPT-NeoX's own configs set them (Pythia sets ``bias-gelu-fusion``, ``partition-activations``,
  ``synchronize-each-layer``), so they load; ``deepy.py`` says once at launch that they change nothing.
* ``REFUSED_VALUES``: keys whose default is what the project does, and whose other values ask for behaviour
  that is not implemented. Such a value stops validation with the key and the reason.

``tests/neox_arguments/test_inert_keys.py`` fails when a config field is added that no code reads and that
is not listed here.
"""
from typing import Dict, List, Tuple

_FUSED_SOFTMAX = ("Megatron's fused CUDA softmax; attention here runs through SDPA, FlexAttention or the "
                  "Sep-Attention kernel, which fuse the masked softmax themselves")
_DS_CHECKPOINTING = "activation checkpointing here is torch.utils.checkpoint (non-reentrant)"

NO_OP_KEYS: Dict[str, str] = {
    "scaled_upper_triang_masked_softmax_fusion": _FUSED_SOFTMAX,
    "scaled_masked_softmax_fusion": _FUSED_SOFTMAX,
    "bias_gelu_fusion": "Megatron's fused bias+GeLU kernel; torch_compile fuses the two ops on GPU",
    "bias_dropout_fusion": "Megatron's fused bias+dropout+residual kernel; torch_compile fuses them on GPU",
    "layernorm_fusion": "apex's fused LayerNorm; torch's LayerNorm kernels are used",
    "apply_query_key_layer_scaling": ("Megatron's fp16 overflow guard (Q.K^T / layer_number, multiplied back "
                                      "inside the softmax) is the identity in exact arithmetic, and the softmax "
                                      "here accumulates in fp32"),
    "attention_softmax_in_fp32": ("the attention softmax already accumulates in fp32 (SDPA's kernels, "
                                  "FlexAttention, the Sep-Attention kernel; Self-Adjusting softmax in fp32)"),
    "partition_activations": ("splits the activations DeepSpeed's checkpointing keeps over the model-parallel "
                              "ranks (a memory saving); " + _DS_CHECKPOINTING + ", which keeps each rank's "
                              "whole layer input"),
    "synchronize_each_layer": "a device sync around each checkpointed layer in DeepSpeed's checkpointing; "
                              + _DS_CHECKPOINTING,
    "deepspeed_activation_checkpointing": _DS_CHECKPOINTING,
    "deepspeed": "DeepSpeed is always used",
    "prefill_k": "deprecated in the SepLLM reference and never read there",
    "generate_k": "deprecated in the SepLLM reference and never read there",
}

# key -> (the value the project implements, why any other value is refused)
REFUSED_VALUES: Dict[str, Tuple[object, str]] = {
    "fp16_lm_cross_entropy": (False, "the LM cross entropy is always computed in fp32"),
    "contiguous_checkpointing": (False, "DeepSpeed's contiguous activation buffers are not used: "
                                 + _DS_CHECKPOINTING),
    "checkpoint_in_cpu": (False, "activation checkpoints stay on the device: " + _DS_CHECKPOINTING),
    "activation_checkpointing": (None, "DeepSpeed's activation-checkpointing section is not read: "
                                 + _DS_CHECKPOINTING + "; use checkpoint_activations / checkpoint_num_layers"),
    "output_layer_parallelism": ("column", "the output layer splits the vocabulary over the model-parallel ranks "
                                 "(column), the one value GPT-NeoX has"),
    "checkpoint_validation_with_forward_pass": (False, "saving a forward pass with the checkpoint for a check "
                                                "after loading is not implemented; resumes are tested bitwise"),
}


def refused_value(args):
    """The first key holding a value the project does not implement, as ``(key, value, reason)``, or None."""
    for key, (supported, reason) in REFUSED_VALUES.items():
        value = getattr(args, key)
        if value != supported:
            return key, value, reason
    return None


def no_op_notes(args) -> List[str]:
    """One line per no-op key the user's files set."""
    given = set(args.user_keys or ())
    return [f"key '{key}' is accepted for GPT-NeoX compatibility and changes nothing here: {reason}"
            for key, reason in NO_OP_KEYS.items() if key in given]


def fp16_type_note(args):
    """GPT-NeoX's ``fp16.type`` decides nothing since its commit 056e9caf (May 2023); before, ``"bfloat16"``
    there meant bf16, and pythia/1B.yml still says so. Say which precision the config trains when the two differ."""
    kind = args.fp16.get("type") if isinstance(args.fp16, dict) else None
    if kind is None or kind == args.precision:
        return None
    return (f"key 'fp16.type' is {kind!r} but this config trains {args.precision}: as in GPT-NeoX since 056e9caf, "
            f"fp16.enabled decides (type did before); for bf16 set bf16: {{enabled: true}} or precision: bfloat16")


def launch_notes(args) -> List[str]:
    """Every line deepy.py prints before launch about how the config was read: 'warning: ...' or 'note: ...'."""
    notes = []
    if args.missing_hostfile:
        notes.append(f"warning: hostfile {args.missing_hostfile} not found: running on local resources only, as "
                     f"DeepSpeed's runner does (a --hostfile on the command line must exist)")
    if args.load_was_empty:
        notes.append(f"note: 'load' {args.load_was_empty} is the 'save' directory and holds no checkpoint yet: "
                     f"training starts from iteration 0")
    note = fp16_type_note(args)
    if note:
        notes.append("note: " + note)
    if args.gpt_neox_keys_off:
        notes.append(f"note: GPT-NeoX key(s) {', '.join(args.gpt_neox_keys_off)} are at GPT-NeoX's default (their "
                     f"features are off) and change nothing here; this project does not have those features")
    return notes + ["note: " + line for line in no_op_notes(args)]
