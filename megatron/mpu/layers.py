"""Megatron-style parallel layers at model-parallel size 1.

The constructors keep Megatron/GPT-NeoX signatures (``neox_args, input_size, output_size, gather_output,
init_method, skip_bias_add`` ...) and return ``(output, bias)`` like Megatron, so tensor parallelism can later be
added here without touching the model. Parameters are ``weight`` / ``bias`` as GPT-NeoX checkpoints store them.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .initialize import check_model_parallel_size


def _params_dtype(neox_args) -> torch.dtype:
    # Parameters are created in fp32; DeepSpeed / the training loop casts them for bf16/fp16 runs.
    return torch.float32


class _ParallelLinear(nn.Module):
    """The shared body of the two Megatron linear layers: at model-parallel size 1 both are ``x A^T + b``."""

    def __init__(self, neox_args, input_size: int, output_size: int, bias: bool, init_method: Callable,
                 skip_bias_add: bool):
        super().__init__()
        check_model_parallel_size(neox_args.model_parallel_size)
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=_params_dtype(neox_args)))
        init_method(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=_params_dtype(neox_args)))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by output columns across model-parallel ranks (one rank here)."""

    def __init__(self, neox_args, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 init_method: Callable = nn.init.xavier_normal_, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 mup_rescale_parameters: bool = False):
        super().__init__(neox_args, input_size, output_size, bias, init_method, skip_bias_add)
        self.gather_output = gather_output


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by input rows across model-parallel ranks (one rank here)."""

    def __init__(self, neox_args, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = False, init_method: Callable = nn.init.xavier_normal_, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 parallel_output: bool = False, mup_rescale_parameters: bool = False):
        super().__init__(neox_args, input_size, output_size, bias, init_method, skip_bias_add)
        self.input_is_parallel = input_is_parallel
        self.parallel_output = parallel_output


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across model-parallel ranks (one rank here)."""

    def __init__(self, neox_args, num_embeddings: int, embedding_dim: int,
                 init_method: Callable = nn.init.xavier_normal_):
        super().__init__()
        check_model_parallel_size(neox_args.model_parallel_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=_params_dtype(neox_args)))
        init_method(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
