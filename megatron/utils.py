"""Small helpers of the training loop: batch masks, weight-decay groups, cross-rank flags, signals."""
import os
import signal
import sys
import time
from typing import Iterable, List, Optional, Tuple

import torch


def print_rank_0(*message) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*message, flush=True)


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod_token: Optional[int],
                                    eod_mask_loss: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss mask and position ids of a left-to-right batch.

    As in GPT-NeoX, ``eod_mask_loss`` zeroes the loss where the *input* token is the end-of-document
    token (the prediction made from it crosses a document boundary). Positions are ``0..S-1``.
    """
    bsz, seq = tokens.shape
    loss_mask = torch.ones(bsz, seq, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss and eod_token is not None:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(seq, dtype=torch.long, device=tokens.device).unsqueeze(0).expand(bsz, seq)
    return loss_mask, position_ids


def _no_weight_decay(module: torch.nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights are not decayed (GPT-NeoX's rule)."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
    return param_name == "bias" or param_name.endswith(".bias") or is_norm


def get_params_for_weight_decay_optimization(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """GPT-NeoX's groups, named and ordered as it makes them, so that the optimizer states of the two projects'
    checkpoints line up: decayed weights, then biases + norm parameters with weight decay 0; with
    ``weight_decay`` 0 a single group of every parameter."""
    decay, no_decay = [], []
    seen = set()
    for _, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if float(weight_decay) == 0.0 or _no_weight_decay(module, name) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "name": "weight_decay_params"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_weight_decay_params"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def all_reduce_max(values: Iterable[float], device) -> List[float]:
    """Element-wise maximum over all ranks (one small collective); identity without a process group."""
    tensor = torch.tensor(list(values), dtype=torch.float32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def stop_request_path(resolved_config: str) -> str:
    """The file through which deepy.py asks the ranks of every node to stop: beside the resolved config,
    which every node reads at the same path, and unique to one launch as that config is."""
    return resolved_config + ".stop"


class StopSignal:
    """A request to stop: SIGTERM / SIGINT, or deepy.py's stop-request file (:func:`stop_request_path`).

    The first signal, and repeats within ``GRACE_SECONDS`` of it, ask for a checkpoint at the next step
    boundary: one Ctrl-C or scheduler kill can reach a rank two or three times within milliseconds (from
    the terminal or scheduler, and forwarded by DeepSpeed's launcher), and that must not cost the save.
    Only a repeat after the window forces an exit, with code 128 + signal number and nothing saved.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    GRACE_SECONDS = 5.0

    def __init__(self, stop_file: Optional[str] = None, clock=time.monotonic):
        self.stop_file = stop_file
        self.received: Optional[int] = None
        self.file_request: Optional[str] = None
        self._clock = clock
        self._first_at: Optional[float] = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = self._clock()
        if self._first_at is None:
            self._first_at, self.received = now, signum
            return
        if now - self._first_at <= self.GRACE_SECONDS:
            return
        name = signal.Signals(signum).name
        print(f"{name} again {now - self._first_at:.0f} s after the first stop request: exiting now, "
              "nothing saved", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit: unwinding could block in a collective that the other ranks never join.
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        """A signal came, or the stop-request file exists (one stat per call: called once per step)."""
        if self.received is None and self.file_request is None and self.stop_file \
                and os.path.exists(self.stop_file):
            try:
                with open(self.stop_file, encoding="utf-8") as f:
                    self.file_request = f.read().strip() or "stop"
            except OSError:  # removed between the check and the read: the launcher is ending the run anyway
                self.file_request = "stop"
        return self.received is not None or self.file_request is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        """What asked for the stop, for the log: ``signal SIGTERM`` or ``deepy.py's stop request (...)``."""
        if self.received is not None:
            return f"signal {signal.Signals(self.received).name}"
        if self.file_request is not None:
            return f"deepy.py's stop request ({self.file_request}, {self.stop_file})"
        return ""
