"""Precision, ZeRO and the other DeepSpeed engine settings (passed on through `deepspeed_config()`)."""
from dataclasses import dataclass
from typing import Optional, Union

from .field import arg

PRECISIONS = ("fp32", "fp16", "bfloat16")
PRECISION_ALIASES = {"bf16": "bfloat16", "float32": "fp32", "float16": "fp16", "half": "fp16"}
# Keys DeepSpeed accepts in its fp16 / bf16 sections (DeepSpeedFP16Config / DeepSpeedBF16Config forbid others).
FP16_KEYS = ("enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads")
# GPT-NeoX's fp16.type values (pythia/1B.yml writes "bfloat16"; GPT-NeoX's own default section is
# {"type": "fp16", "enabled": true}). Accepted and not passed to DeepSpeed, which forbids the key.
FP16_TYPES = ("fp16", "bfloat16")
BF16_KEYS = ("enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states")


@dataclass
class DeepSpeedArgs:
    """DeepSpeed engine options. The DeepSpeed config dict is derived from these, never written by hand."""

    precision: Optional[str] = arg(
        None, "fp32, fp16 or bfloat16 (`bf16` accepted). Derived from the fp16 / bf16 dicts when not given.",
        role="derived")
    fp16: Optional[dict] = arg(
        None, "DeepSpeed fp16 section: {enabled, loss_scale (0 = dynamic), loss_scale_window, hysteresis, "
              "min_loss_scale, initial_scale_power}. On when `enabled` is true (GPT-NeoX's and DeepSpeed's rule). "
              "GPT-NeoX's extra entries `fp16: true` and `type` (fp16 or bfloat16) are accepted and decide "
              "nothing, as in GPT-NeoX since 056e9caf: `\"type\": \"bfloat16\"` with `enabled: true` trains fp16, "
              "with a note at launch.")
    bf16: Optional[Union[dict, bool]] = arg(
        None, "DeepSpeed bf16 section {enabled: true} (or just true); on when `enabled` is true.")
    zero_optimization: Optional[dict] = arg(
        None, "DeepSpeed ZeRO section {stage: 0-3, allgather_bucket_size, reduce_bucket_size, overlap_comm, "
              "reduce_scatter, contiguous_gradients, offload_optimizer, ...}. GPT-NeoX's `cpu_offload: true` "
              "becomes offload_optimizer {device: cpu}.")
    zero_stage: Optional[int] = arg(None, "ZeRO stage (derived from zero_optimization.stage).", role="derived")
    gradient_clipping: float = arg(1.0, "Clip the global gradient L2 norm to this (0 disables; alias `clip_grad`).")
    steps_per_print: int = arg(
        10, "Interval of DeepSpeed's own prints (its `steps: N loss: ...` progress line, and its timers with "
            "wall_clock_breakdown). They are off unless deepspeed_progress_log or wall_clock_breakdown is set: "
            "the project's line at log_interval is the console log.")
    deepspeed_progress_log: bool = arg(
        False, "Project key: also print DeepSpeed's own progress line every steps_per_print steps (it shows "
               "DeepSpeed's loss average, not the logged lm_loss).")
    wall_clock_breakdown: bool = arg(False, "DeepSpeed timing of forward/backward/step, printed every "
                                            "steps_per_print steps.")
    dump_state: bool = arg(False, "DeepSpeed prints its state after initialisation.")
    fp32_allreduce: bool = arg(False, "All-reduce gradients in fp32.")
    prescale_gradients: bool = arg(False, "Scale gradients before the all-reduce.")
    gradient_predivide_factor: float = arg(1.0, "Divide gradients by this before averaging.")
    sparse_gradients: bool = arg(False, "Sparse all-reduce of embedding gradients.")
    communication_data_type: Optional[str] = arg(None, "Data type of gradient communication (DeepSpeed).")
    amp: Optional[dict] = arg(None, "DeepSpeed AMP section (passed through).")
    flops_profiler: Optional[dict] = arg(None, "DeepSpeed flops profiler section (passed through).")
    activation_checkpointing: Optional[dict] = arg(
        None, "DeepSpeed's activation checkpointing section. Refused: activation checkpointing here is "
              "torch.utils.checkpoint (checkpoint_activations, checkpoint_num_layers), which does not read it.")
    comms_logger: Optional[dict] = arg(None, "DeepSpeed comms logger section (passed through).")
    checkpoint: Optional[dict] = arg(None, "DeepSpeed checkpoint section (passed through).")
    data_types: Optional[dict] = arg(None, "DeepSpeed data_types section (passed through).")
    deepspeed_extra_args: Optional[dict] = arg(
        None, "Any further DeepSpeed config keys, merged last into the derived DeepSpeed config.")
    deepspeed: bool = arg(True, "GPT-NeoX flag: DeepSpeed is always used.")
