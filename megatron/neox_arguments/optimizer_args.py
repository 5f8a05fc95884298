"""Optimizer and learning-rate schedule."""
from dataclasses import dataclass
from typing import Optional

from .field import arg

# Optimizer types built by the training loop itself (torch AdamW / Adam, fused on GPU).
TRAINER_OPTIMIZERS = ("adam", "adamw")
# Optimizer types only DeepSpeed provides; these always go into the DeepSpeed config.
DEEPSPEED_ONLY_OPTIMIZERS = ("onebitadam", "zerooneadam", "onebitlamb", "lamb", "adagrad")
OPTIMIZER_TYPES = TRAINER_OPTIMIZERS + DEEPSPEED_ONLY_OPTIMIZERS
LR_DECAY_STYLES = ("constant", "linear", "cosine", "exponential")
"""The decay styles of GPT-NeoX's AnnealingLR; megatron/learning_rates.py implements each."""


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
    """Learning-rate schedule: warmup, then constant / linear / cosine / exponential decay to `min_lr`."""

    lr_decay_style: str = arg(
        "linear", "Decay after warmup: constant, linear, cosine (to min_lr) or exponential (GPT-NeoX's "
                  "start_lr * exp(-0.693 * (it - warmup) / lr_decay_iters), floored at min_lr).",
        choices=LR_DECAY_STYLES)
    lr_decay_iters: Optional[int] = arg(
        None, "Iterations over which the LR decays (then stays at min_lr). None means train_iters.")
    min_lr: float = arg(0.0, "Floor of the learning rate.")
    warmup: float = arg(
        0.01, "Warmup length: a value in [0, 1] is a fraction of lr_decay_iters, used unrounded as GPT-NeoX "
              "does (0.01 x 150 = 1.5 iterations); a whole number above 1 is a number of iterations.")
    warmup_iters: Optional[float] = arg(
        None, "Warmup length in iterations, derived from `warmup` unless given (then `warmup` must not be).",
        role="derived")
    override_lr_scheduler: bool = arg(
        False, "On resume, use the config's schedule (lr, min_lr, warmup, lr_decay_iters, lr_decay_style) where it "
               "differs from the checkpoint's. Without this key or use_checkpoint_lr_scheduler a difference is "
               "an error (GPT-NeoX's rule).")
    use_checkpoint_lr_scheduler: bool = arg(False, "On resume, keep the checkpoint's schedule over the config's.")
