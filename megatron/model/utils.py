"""Sequential execution of the pipeline layer list (``pipe_parallel_size == 0``), with activation checkpointing."""
from functools import partial
from typing import Callable, List, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.mpu.random import checkpoint_contexts

# Class names whose blocks may be recomputed in backward (DeepSpeed's rule for GPT2ModelPipe is the same).
CHECKPOINTABLE_LAYERS = ("ParallelTransformerLayerPipe",)

# The model-parallel random stream is replayed in recomputation too (megatron/mpu/random.py).
non_reentrant_checkpoint = partial(checkpoint, use_reentrant=False, context_fn=checkpoint_contexts)


class Lambda(nn.Module):
    """Wraps a parameter-free callable so it can sit in an ``nn.Sequential``."""

    def __init__(self, func: Callable):
        super().__init__()
        self.func = func

    def forward(self, x):
        return self.func(x)


def is_checkpointable(layers: Sequence[Callable]) -> bool:
    return all(type(layer).__name__ in CHECKPOINTABLE_LAYERS for layer in layers)


class SequentialWrapper(nn.Module):
    """The layer list as ``self.sequential`` (state-dict keys ``sequential.<idx>.``, as GPT-NeoX saves them).

    With ``activation_checkpoint_interval = n > 0`` the layers run in blocks of ``n`` starting at index 0, and a
    block made only of transformer layers is recomputed in backward (the same blocking DeepSpeed's
    ``PipelineModule`` uses, so both paths save the same activations).
    """

    def __init__(self, layers: List[nn.Module], activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable = non_reentrant_checkpoint):
        super().__init__()
        self.sequential = nn.Sequential(*layers)
        self.activation_checkpoint_interval = int(activation_checkpoint_interval)
        self.activation_checkpoint_func = activation_checkpoint_func

    def _run(self, start: int, end: int):
        layers = self.sequential[start:end]

        def run(*inputs):
            x = inputs[0] if len(inputs) == 1 else inputs
            for layer in layers:
                x = layer(x)
            return x

        return run

    def forward(self, forward_input):
        n = len(self.sequential)
        interval = self.activation_checkpoint_interval
        if interval <= 0 or not torch.is_grad_enabled():
            return self._run(0, n)(forward_input)
        x = forward_input
        for start in range(0, n, interval):
            end = min(start + interval, n)
            args = x if isinstance(x, tuple) else (x,)
            if is_checkpointable(self.sequential[start:end]):
                x = self.activation_checkpoint_func(self._run(start, end), *args)
            else:
                x = self._run(start, end)(*args)
        return x
