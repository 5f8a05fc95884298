"""Optimizer and learning-rate schedule."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

# Optimizer types built by the training loop itself (torch AdamW / Adam, fused on GPU).
TRAINER_OPTIMIZERS = ("adam", "adamw")
# Optimizer types only DeepSpeed provides; these always go into the DeepSpeed config.
DEEPSPEED_ONLY_OPTIMIZERS = ("onebitadam", "zerooneadam", "onebitlamb", "lamb", "adagrad")
OPTIMIZER_TYPES = TRAINER_OPTIMIZERS + DEEPSPEED_ONLY_OPTIMIZERS
LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerArgs:
    """Optimizer choice and hyper-parameters (GPT-NeoX's DeepSpeed-style `optimizer` dict)."""

    optimizer: Optional[dict] = arg(
        None, "DeepSpeed-style optimizer: {type: Adam|AdamW|Lamb|OneBitAdam|..., params: {lr, betas, eps, "
              "...}}. `type` sets optimizer_type and `params.lr` sets lr.")
    optimizer_type: str = arg(
        "adam", "Lower-case optimizer kind (derived from optimizer.type when that is given).",
        role="derived", choices=OPTIMIZER_TYPES)
    lr: Optional[float] = arg(None, "Peak learning rate (derived from optimizer.params.lr when given).",
                              role="derived")
    weight_decay: float = arg(0.01, "Decoupled weight decay (not applied to biases and norms).")
    use_deepspeed_optimizer: bool = arg(
        False, "Project key: let DeepSpeed build Adam/AdamW from the `optimizer` dict (its FusedAdam / "
               "CPUAdam, e.g. for ZeRO offload) instead of the training loop's torch optimizer. "
               "DeepSpeed-only types (Lamb, OneBitAdam, ...) always go to DeepSpeed.")


@dataclass
class LRScheduleArgs:
    """Learning-rate schedule: warmup, then constant / linear / cosine decay to `min_lr`."""

    lr_decay_style: str = arg("linear", "Decay after warmup.", choices=LR_DECAY_STYLES)
    lr_decay_iters: Optional[int] = arg(
        None, "Iterations over which the LR decays (then stays at min_lr). None means train_iters.")
    min_lr: float = arg(0.0, "Floor of the learning rate.")
    warmup: float = arg(0.01, "Warmup length as a fraction of lr_decay_iters (GPT-NeoX).")
    warmup_iters: Optional[int] = arg(
        None, "Warmup length in iterations; derived as round(warmup * lr_decay_iters) unless given.",
        role="derived")
    override_lr_scheduler: bool = arg(False, "On load, take the schedule from the config, not the checkpoint.")
    use_checkpoint_lr_scheduler: bool = arg(False, "On load, take the schedule from the checkpoint.")
