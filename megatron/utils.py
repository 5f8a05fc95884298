"""Small helpers of the training loop: batch masks, weight-decay groups, cross-rank flags, signals."""
import signal
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


def _no_weight_decay(module_name: str, module: torch.nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights are not decayed (GPT-NeoX's rule)."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
    return param_name == "bias" or param_name.endswith(".bias") or is_norm


def get_params_for_weight_decay_optimization(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Two parameter groups: decayed weights, and biases + norm parameters with weight decay 0."""
    decay, no_decay = [], []
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_weight_decay(module_name, module, name) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def all_reduce_max(values: Iterable[float], device) -> List[float]:
    """Element-wise maximum over all ranks (one small collective); identity without a process group."""
    tensor = torch.tensor(list(values), dtype=torch.float32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can save at the next step boundary.

    A second signal of the same kind restores the default behaviour (a user's double Ctrl-C kills).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
