"""Learning-rate schedule with warmup and decay, as GPT-NeoX's ``AnnealingLR``.

The learning rate is a pure function of the iteration number, so a resumed run gets exactly the rates of
an uninterrupted one: the trainer calls :meth:`AnnealingLR.step` with the iteration it is about to run and
the scheduler writes the rate into every parameter group of the optimizer.

Semantics (``start_lr`` = the optimizer's ``lr``, ``W`` = warmup iterations, ``D`` = ``lr_decay_iters``):

* warmup: ``lr = start_lr * it / W`` for ``it <= W`` (``W = 0`` skips warmup); ``W`` is the derived
  ``warmup_iters`` and may be fractional (GPT-NeoX's unrounded ``warmup * lr_decay_iters``);
* after warmup the decay runs over ``D - W`` iterations and is clamped at ``D`` (iterations past
  ``lr_decay_iters`` keep the final rate);
* ``constant``: ``start_lr``; ``linear``: ``start_lr * (D - it) / (D - W)``; ``cosine``:
  ``min_lr + (start_lr - min_lr) / 2 * (1 + cos(pi * (it - W) / (D - W)))``; ``exponential``:
  ``start_lr * exp(-0.693 * (it - W) / D)`` (halves every ``D`` iterations, GPT-NeoX's choice);
* every rate after warmup is floored at ``min_lr``.
"""
import math
from typing import Optional


from megatron.neox_arguments.optimizer_args import LR_DECAY_STYLES as DECAY_STYLES


class AnnealingLR:
    """Warmup + decay schedule that sets the learning rate of ``optimizer``'s parameter groups.

    ``optimizer`` may be ``None`` (then :meth:`get_lr` is the only use) or anything with
    ``param_groups``. Groups may carry an ``lr_mult`` factor (kept from GPT-NeoX's param-group API).
    """

    def __init__(self, optimizer, start_lr: float, warmup_iter: float, total_iters: int,
                 decay_style: str = "cosine", min_lr: float = 0.0, last_iter: int = 0):
        style = str(decay_style).lower()
        if style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={decay_style!r}: expected one of {', '.join(DECAY_STYLES)}")
        if total_iters is None or total_iters <= 0:
            raise ValueError(f"lr_decay_iters={total_iters!r}: must be a positive number of iterations")
        if warmup_iter < 0 or warmup_iter > total_iters:
            raise ValueError(f"warmup iterations ({warmup_iter}) must lie in [0, lr_decay_iters={total_iters}]")
        if min_lr < 0 or min_lr > start_lr:
            raise ValueError(f"min_lr={min_lr!r}: must lie in [0, lr={start_lr!r}]")
        self.optimizer = optimizer
        self.start_lr = float(start_lr)
        self.min_lr = float(min_lr)
        self.warmup_iter = float(warmup_iter)
        self.end_iter = int(total_iters)
        self.decay_style = style
        self.num_iters = int(last_iter)
        self.step(self.num_iters)

    def get_lr(self, num_iters: Optional[int] = None) -> float:
        """The learning rate at iteration ``num_iters`` (default: the scheduler's current iteration)."""
        it = self.num_iters if num_iters is None else int(num_iters)
        if self.warmup_iter > 0 and it <= self.warmup_iter:
            # Warmup is not floored at min_lr (GPT-NeoX): iteration 0 runs at rate 0.
            return self.start_lr * max(it, 0) / self.warmup_iter
        # Past lr_decay_iters the schedule stays at its final value instead of continuing (or wrapping,
        # which cosine would do).
        it = min(it, self.end_iter)
        done = it - self.warmup_iter
        span = self.end_iter - self.warmup_iter
        if self.decay_style == "constant" or span <= 0:
            lr = self.start_lr
        elif self.decay_style == "linear":
            lr = self.start_lr * (span - done) / span
        elif self.decay_style == "cosine":
            lr = self.min_lr + (self.start_lr - self.min_lr) / 2.0 * (math.cos(math.pi * done / span) + 1.0)
        else:  # exponential
            lr = self.start_lr * math.exp(-0.693 * done / self.end_iter)
        return max(lr, self.min_lr)

    def step(self, num_iters: Optional[int] = None) -> float:
        """Moves to iteration ``num_iters`` (default: one more) and writes the rate into the optimizer."""
        self.num_iters = self.num_iters + 1 if num_iters is None else int(num_iters)
        lr = self.get_lr()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"start_lr": self.start_lr, "min_lr": self.min_lr, "warmup_iter": self.warmup_iter,
                "end_iter": self.end_iter, "decay_style": self.decay_style, "num_iters": self.num_iters}

    def load_state_dict(self, sd: dict) -> None:
        """Restores the position only: the schedule's shape comes from the (possibly edited) config."""
        self.step(int(sd["num_iters"]))

    SHAPE = ("start_lr", "min_lr", "warmup_iter", "end_iter", "decay_style")

    def reconcile(self, saved: dict, override: bool = False, use_checkpoint: bool = False) -> None:
        """GPT-NeoX's rule for the schedule of a resumed run. ``override``: the config's schedule is used;
        ``use_checkpoint``: the checkpoint's; neither: they must agree, else a ``ValueError`` names each
        value that differs and both ways out. The position always comes from the iteration."""
        if override:
            return
        if use_checkpoint:
            for key in self.SHAPE:
                if key in saved:
                    setattr(self, key, type(getattr(self, key))(saved[key]))
            self.step(self.num_iters)
            return
        differ = [f"{key} {saved[key]!r} (checkpoint) vs {getattr(self, key)!r} (config)" for key in self.SHAPE
                  if key in saved and saved[key] != getattr(self, key)]
        if differ:
            raise ValueError("the learning-rate schedule of the checkpoint differs from the config's: "
                             + "; ".join(differ) + ". Set override_lr_scheduler: true to use the config's, or "
                             "use_checkpoint_lr_scheduler: true to keep the checkpoint's")


def build_lr_scheduler(neox_args, optimizer) -> AnnealingLR:
    """The scheduler the resolved configuration describes; derivation settled ``lr`` (from
    ``optimizer.params.lr``), ``lr_decay_iters`` (default ``train_iters``) and ``warmup_iters``."""
    return AnnealingLR(optimizer, start_lr=learning_rate(neox_args), warmup_iter=neox_args.warmup_iters,
                       total_iters=neox_args.lr_decay_iters, decay_style=neox_args.lr_decay_style,
                       min_lr=neox_args.min_lr, last_iter=neox_args.iteration or 0)


def learning_rate(neox_args) -> float:
    """The peak learning rate (derived from ``optimizer.params.lr`` when the config gives it there)."""
    if neox_args.lr is None:
        raise ValueError("no learning rate configured: set optimizer.params.lr (or lr)")
    return float(neox_args.lr)
