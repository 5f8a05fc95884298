"""One cache for values derived from a micro-batch's metadata tensors (masks, BlockMasks, kernel metadata).

Layers with the same window see the same mask, and every layer of a micro-batch passes the same flag tensors
to the kernel, so these are built once per micro-batch instead of once per layer. The cache is keyed on the
*identity* of the metadata tensors (the pipeline passes the same tensor objects to every layer of a stage,
activation-checkpoint recomputation included) and on their in-place version counters (a tensor changed in place
is a miss). Entries hold strong references, so a freed tensor's id can never be mistaken for a new one.

Two situations bypass the cache: while torch.compile traces (the identity test would be frozen into the graph
and the first micro-batch's value replayed for every later one, so the value is built inside the graph), and
during CUDA-graph capture (nothing is stored, so a captured graph always contains the build).
"""
from typing import Callable, Hashable, List, Tuple

import torch


class TensorIdentityCache:
    """Values keyed by ``(anchor tensors, key)``, for the last ``max_anchors`` anchors seen.

    ``max_anchors=1`` keeps only the current micro-batch (every key of it: e.g. one mask per window);
    more anchors serve a backward that runs after the next micro-batch's forward (pipeline schedules).
    """

    def __init__(self, max_anchors: int = 1):
        if max_anchors < 1:
            raise ValueError(f"max_anchors must be >= 1, got {max_anchors}")
        self.max_anchors = max_anchors
        self.entries: List[Tuple[Tuple[torch.Tensor, ...], Tuple[int, ...], dict]] = []

    def get(self, anchor: Tuple[torch.Tensor, ...], key: Hashable, build: Callable[[], object]):
        """The value for ``key`` under ``anchor`` (tensors of the current micro-batch), built on a miss."""
        if torch.compiler.is_compiling():
            return build()
        anchor = tuple(anchor)
        versions = tuple(t._version for t in anchor)
        for i, (tensors, vers, values) in enumerate(self.entries):
            if len(tensors) == len(anchor) and all(a is b for a, b in zip(tensors, anchor)) and vers == versions:
                if key not in values:
                    values[key] = build()
                if i:
                    self.entries.insert(0, self.entries.pop(i))
                return values[key]
        value = build()
        if not any(t.is_cuda for t in anchor) or not torch.cuda.is_current_stream_capturing():
            self.entries = [(anchor, versions, {key: value})] + self.entries[: self.max_anchors - 1]
        return value

    def clear(self) -> None:
        self.entries = []
