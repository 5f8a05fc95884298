"""The model-parallel random stream: dropout *inside* the tensor-parallel region (attention probabilities, whose
heads differ per rank) draws from a stream seeded per tensor-parallel rank; dropout outside it (embeddings,
residual branches: tensors replicated over the ranks) draws from the default stream, which every rank of a
tensor-parallel group seeds alike (``megatron.initialize.set_random_seed``), so those masks are equal.

GPT-NeoX seeds the same stream as ``seed + 2718 + tp_rank`` (DeepSpeed's ``model_parallel_cuda_manual_seed``)
and names it ``model-parallel-rng``. The tracker here holds the stream of the default generator of the device
(CPU or CUDA) and swaps it in for the duration of :meth:`ModelParallelRNGTracker.fork`. At one model-parallel
rank the tracker is not seeded and ``fork`` changes nothing: dropout then draws from the default stream as it
always did.
"""
import contextlib
from typing import Dict, Optional

import torch

TRACKER_NAME = "model-parallel-rng"
SEED_OFFSET = 2718


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class ModelParallelRNGTracker:
    def __init__(self):
        self.device_type: Optional[str] = None
        self.state: Optional[torch.Tensor] = None
        self.seed_value: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.state is not None

    def seed(self, seed: int, device_type: str) -> None:
        """Starts the stream at ``seed`` on ``device_type``'s default generator, leaving that generator as it was."""
        saved = _get_state(device_type)
        if device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.state = _get_state(device_type)
        _set_state(device_type, saved)
        self.device_type, self.seed_value = device_type, int(seed)

    def reset(self) -> None:
        self.__init__()

    @contextlib.contextmanager
    def fork(self):
        """Draws inside the block come from the model-parallel stream (a no-op while the tracker is unseeded)."""
        if self.state is None:
            yield
            return
        saved = _get_state(self.device_type)
        _set_state(self.device_type, self.state)
        try:
            yield
        finally:
            self.state = _get_state(self.device_type)
            _set_state(self.device_type, saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        """``{TRACKER_NAME: state}`` for a checkpoint (empty while unseeded)."""
        return {} if self.state is None else {TRACKER_NAME: self.state.clone()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        if self.state is not None and TRACKER_NAME in states:
            self.state = states[TRACKER_NAME].clone()


_TRACKER = ModelParallelRNGTracker()


def checkpoint_contexts():
    """``torch.utils.checkpoint``'s ``context_fn``: the recomputation of a checkpointed block draws the attention
    dropout masks its forward drew. torch restores the default generators for the recomputation itself; the
    model-parallel stream has moved on by then, so its state at the forward is kept and put in place for the
    recomputation (and the stream continues afterwards from where training left it)."""
    kept = {}

    @contextlib.contextmanager
    def forward():
        kept["state"] = _TRACKER.state
        yield

    @contextlib.contextmanager
    def recompute():
        current = _TRACKER.state
        _TRACKER.state = kept.get("state")
        try:
            yield
        finally:
            _TRACKER.state = current

    return forward(), recompute()


def get_rng_tracker() -> ModelParallelRNGTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int, tp_size: int, device_type: str) -> None:
    """Seeds the tracker as GPT-NeoX does (``seed + 2718 + tp_rank``) when there is more than one
    model-parallel rank; at one rank it is left unseeded (see the module docstring)."""
    _TRACKER.reset()
    if tp_size > 1:
        _TRACKER.seed(int(seed) + SEED_OFFSET + int(tp_rank), device_type)
