"""Learning-rate schedule with warmup and decay, as GPT-NeoX's ``AnnealingLR``.

The learning rate is a pure function of the iteration number, so a resumed run gets exactly the rates of
an uninterrupted one: the trainer calls :meth:`AnnealingLR.step` with the iteration it is about to run and
the scheduler writes the rate into every parameter group of the optimizer.

Semantics (``start_lr`` = the optimizer's ``lr``, ``W`` = warmup iterations, ``D`` = ``lr_decay_iters``):

* warmup: ``lr = start_lr * it / W`` for ``it <= W`` (``W = 0`` skips warmup);
* after warmup the decay runs over ``D - W`` iterations and is clamped at ``D`` (iterations past
  ``lr_decay_iters`` keep the final rate);
* ``constant``: ``start_lr``; ``linear``: ``start_lr * (D - it) / (D - W)``; ``cosine``:
  ``min_lr + (start_lr - min_lr) / 2 * (1 + cos(pi * (it - W) / (D - W)))``; ``exponential``:
  ``start_lr * exp(-0.693 * (it - W) / D)`` (halves every ``D`` iterations, GPT-NeoX's choice);
* every rate after warmup is floored at ``min_lr``.
"""
import math
from typing import Optional

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")


def warmup_iterations(warmup: Optional[float], lr_decay_iters: int) -> int:
    """Warmup length in iterations: a value in [0, 1) is a fraction of ``lr_decay_iters`` (GPT-NeoX's
    ``warmup: 0.01``), an integer value >= 1 is a number of iterations."""
    if warmup is None:
        return 0
    if warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be >= 0 (a fraction of lr_decay_iters, or iterations)")
    if warmup < 1:
        return int(warmup * lr_decay_iters)
    if float(warmup) != int(warmup):
        raise ValueError(f"warmup={warmup!r}: values >= 1 are iteration counts and must be whole numbers")
    return int(warmup)


class AnnealingLR:
    """Warmup + decay schedule that sets the learning rate of ``optimizer``'s parameter groups.

    ``optimizer`` may be ``None`` (then :meth:`get_lr` is the only use) or anything with
    ``param_groups``. Groups may carry an ``lr_mult`` factor (kept from GPT-NeoX's param-group API).
    """

    def __init__(self, optimizer, start_lr: float, warmup_iter: int, total_iters: int,
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
        self.warmup_iter = int(warmup_iter)
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


def build_lr_scheduler(neox_args, optimizer) -> AnnealingLR:
    """The scheduler the configuration describes (``lr``, ``min_lr``, ``warmup``, ``lr_decay_style``,
    ``lr_decay_iters`` defaulting to ``train_iters``; a derived ``warmup_iters`` wins over ``warmup``)."""
    decay_iters = getattr(neox_args, "lr_decay_iters", None) or neox_args.train_iters
    warmup = getattr(neox_args, "warmup_iters", None)
    if warmup is None:
        warmup = warmup_iterations(getattr(neox_args, "warmup", 0.0), decay_iters)
    return AnnealingLR(optimizer, start_lr=learning_rate(neox_args), warmup_iter=int(warmup),
                       total_iters=decay_iters, decay_style=getattr(neox_args, "lr_decay_style", "cosine"),
                       min_lr=float(getattr(neox_args, "min_lr", 0.0) or 0.0),
                       last_iter=int(getattr(neox_args, "iteration", 0) or 0))


def learning_rate(neox_args) -> float:
    """The peak learning rate: ``optimizer.params.lr`` as GPT-NeoX configs give it, else ``lr``."""
    opt = getattr(neox_args, "optimizer", None) or {}
    params = opt.get("params", {}) if isinstance(opt, dict) else {}
    lr = params.get("lr", getattr(neox_args, "lr", None))
    if lr is None:
        raise ValueError("no learning rate configured: set optimizer.params.lr (or lr)")
    return float(lr)
