"""Share per-micro-batch masks between the layers of one forward.

Layers with the same window see the same mask, so it is built once per micro-batch and window, not once
per layer. The cache is keyed on the *identity* of the metadata tensors (the pipeline passes the same
``AttnMeta`` tensor objects to every layer of a stage, including activation-checkpoint recomputation);
it holds strong references, so a freed tensor's id can never be mistaken for a new one.
"""
from typing import Callable, Dict, Hashable, Tuple

import torch


class PerBatchCache:
    """Values derived from one micro-batch's metadata, keyed by a small hashable (e.g. the window)."""

    def __init__(self):
        self._anchor: Tuple[torch.Tensor, ...] = ()
        self._values: Dict[Hashable, object] = {}

    def get(self, anchor: Tuple[torch.Tensor, ...], key: Hashable, build: Callable[[], object]):
        """The value for ``key`` under ``anchor`` (tensors of the current micro-batch), built on a miss."""
        if torch.compiler.is_compiling():
            # Inside a traced graph the identity test would be frozen at trace time and the first
            # micro-batch's value replayed for every later one: build inside the graph instead.
            return build()
        same = len(anchor) == len(self._anchor) and all(a is b for a, b in zip(anchor, self._anchor))
        if not same:
            self._anchor = tuple(anchor)
            self._values = {}
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]

    def clear(self):
        self._anchor = ()
        self._values = {}
