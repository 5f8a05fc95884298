"""Weight initialisation methods, with GPT-NeoX's names and formulas.

``init_method`` / ``output_layer_init_method`` values: ``normal`` (std = init_method_std),
``scaled_normal`` (std / sqrt(2 * num_layers)), ``small_init`` (sqrt(2 / (5 * hidden))),
``wang_init`` (2 / (num_layers * sqrt(hidden))), ``orthogonal``, ``xavier_uniform``, ``xavier_normal``.
"""
import math
from typing import Callable, Tuple

import torch
from torch import nn

from megatron.neox_arguments.model_args import INIT_METHODS


def init_method_normal(sigma: float) -> Callable:
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(sigma: float, num_layers: int) -> Callable:
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


def small_init_std(dim: int) -> float:
    """Nguyen & Salazar (2019) "Transformers without Tears": sqrt(2 / (5 d))."""
    return math.sqrt(2.0 / (5.0 * dim))


def wang_init_std(n_layers: int, dim: int) -> float:
    """Ben Wang's GPT-J output-layer init: 2 / (n_layers * sqrt(d))."""
    return 2.0 / n_layers / math.sqrt(dim)


def _orthogonal(n_layers: int = 1) -> Callable:
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.orthogonal_(tensor, gain=math.sqrt(2.0 / n_layers))

    return init_


def _xavier_uniform(tensor: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_uniform_(tensor)


def _xavier_normal(tensor: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_normal_(tensor)




def init_method_by_name(name: str, neox_args) -> Callable:
    """The initialiser called ``name`` for the model described by ``neox_args``."""
    std = float(neox_args.init_method_std)
    layers = int(neox_args.num_layers)
    hidden = int(neox_args.hidden_size)
    if name == "normal":
        return init_method_normal(std)
    if name == "scaled_normal":
        return scaled_init_method_normal(std, layers)
    if name == "orthogonal":
        return _orthogonal()
    if name == "scaled_orthogonal":
        return _orthogonal(layers)
    if name == "xavier_uniform":
        return _xavier_uniform
    if name == "xavier_normal":
        return _xavier_normal
    if name == "wang_init":
        return init_method_normal(wang_init_std(layers, hidden))
    if name == "small_init":
        return init_method_normal(small_init_std(hidden))
    raise ValueError(f"init method {name!r} is not known; choose one of {', '.join(INIT_METHODS)}")


def get_init_methods(neox_args) -> Tuple[Callable, Callable]:
    """``(init_method, output_layer_init_method)`` from ``init_method`` / ``output_layer_init_method``."""
    return (init_method_by_name(neox_args.init_method, neox_args),
            init_method_by_name(neox_args.output_layer_init_method, neox_args))
