"""Megatron-style tensor-parallel layers (GPT-NeoX's signatures; ``(output, bias)`` returned like Megatron).

Every rank builds the *full* weight with the model's init method from the same random stream and keeps its
shard (:mod:`megatron.mpu.partition`), so a model at any tensor-parallel size starts from the weights the
size-1 model has, and draws the same random numbers for every later parameter. At size 1 the layers are
plain ``F.linear`` / ``F.embedding`` with the same operations as before tensor parallelism existed.

Sharded parameters carry ``model_parallel = True``, ``partition_dim``, ``partition_stride`` (the number of
segments) and ``partition_sizes`` (the full segment lengths): DeepSpeed's gradient-norm code counts a
parameter without ``model_parallel`` once per tensor-parallel group (rank 0 only), a sharded one on every rank.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import partition
from .initialize import check_model_parallel_size, get_model_parallel_rank, get_model_parallel_world_size
from .mappings import (all_reduce, copy_to_model_parallel_region, gather_from_model_parallel_region,
                       reduce_from_model_parallel_region, scatter_to_model_parallel_region)


def _params_dtype(neox_args) -> torch.dtype:
    # Parameters are created in fp32; DeepSpeed / the training loop casts them for bf16/fp16 runs.
    return torch.float32


def set_partition_attributes(param: torch.Tensor, dim: int, segments: Sequence[int]) -> None:
    param.model_parallel = True
    param.partition_dim = dim
    param.partition_stride = len(segments)
    param.partition_sizes = tuple(int(s) for s in segments)


def _sharded_parameter(shape, dim: int, segments: Sequence[int], init_method: Callable, dtype) -> nn.Parameter:
    """The full tensor initialised by ``init_method``, of which this rank keeps its part along ``dim``."""
    world = get_model_parallel_world_size()
    if world == 1:
        param = nn.Parameter(torch.empty(*shape, dtype=dtype))
        init_method(param)
    else:
        full = torch.empty(*shape, dtype=dtype)
        init_method(full)
        param = nn.Parameter(partition.shard(full, dim, segments, world, get_model_parallel_rank()))
    set_partition_attributes(param, dim, segments)
    return param


def _segments(size: int, stride: int, partition_sizes: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if partition_sizes is not None:
        if sum(partition_sizes) != size:
            raise ValueError(f"partition_sizes {list(partition_sizes)} do not add up to the dimension {size}")
        return tuple(int(s) for s in partition_sizes)
    if stride < 1 or size % stride:
        raise ValueError(f"stride {stride} does not divide the dimension {size}")
    return (size // stride,) * stride


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the rows of ``A`` (output features) split over the model-parallel ranks.

    ``gather_output``: all-gather the output features (otherwise each rank returns its own). ``stride`` /
    ``partition_sizes``: the output is a concatenation of segments each split separately (see
    :mod:`megatron.mpu.partition`); gathering such an output would interleave the segments, so it is refused.
    """

    def __init__(self, neox_args, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 init_method: Callable = nn.init.xavier_normal_, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 mup_rescale_parameters: bool = False, partition_sizes: Optional[Sequence[int]] = None):
        super().__init__()
        check_model_parallel_size(neox_args.model_parallel_size)
        self.input_size, self.output_size = input_size, output_size
        self.segments = _segments(output_size, stride, partition_sizes)
        self.world = world = get_model_parallel_world_size()
        self.output_size_per_partition = sum(partition.local_segments(self.segments, world))
        if gather_output and world > 1 and len(self.segments) > 1:
            raise ValueError(f"ColumnParallelLinear: gather_output with {len(self.segments)} segments would "
                             "interleave them; gather the segments separately")
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        dtype = _params_dtype(neox_args)
        self.weight = _sharded_parameter((output_size, input_size), 0, self.segments, init_method, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=dtype))
            set_partition_attributes(self.bias, 0, self.segments)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # A layer keeps the size it was built for (a size-1 reference model next to a grid in tests).
        parallel = self.world > 1
        if parallel:
            x = copy_to_model_parallel_region(x)
        if self.skip_bias_add:
            out, bias = F.linear(x, self.weight), self.bias
        else:
            out, bias = F.linear(x, self.weight, self.bias), None
        if self.gather_output and parallel:
            out = gather_from_model_parallel_region(out)
        return out, bias


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the columns of ``A`` (input features) split over the model-parallel ranks.

    ``input_is_parallel``: ``X`` already holds this rank's input features (the output of a column-parallel
    layer), otherwise it is split here. The partial products are summed over the ranks unless
    ``parallel_output``; the bias is replicated and added once, after the sum (``parallel_output`` leaves both
    the sum and the bias to the caller).
    """

    def __init__(self, neox_args, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = False, init_method: Callable = nn.init.xavier_normal_, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 parallel_output: bool = False, mup_rescale_parameters: bool = False):
        super().__init__()
        check_model_parallel_size(neox_args.model_parallel_size)
        self.input_size, self.output_size = input_size, output_size
        self.segments = _segments(input_size, stride, None)
        self.world = get_model_parallel_world_size()
        self.input_size_per_partition = sum(partition.local_segments(self.segments, self.world))
        self.input_is_parallel = input_is_parallel
        self.parallel_output = parallel_output
        self.skip_bias_add = skip_bias_add or parallel_output
        dtype = _params_dtype(neox_args)
        self.weight = _sharded_parameter((output_size, input_size), 1, self.segments, init_method, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product ``X_r A_r^T`` (input already parallel): no sum over ranks, no bias. For a
        caller that sums several row-parallel outputs in one all-reduce (the parallel residual)."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.world == 1:
            if self.skip_bias_add:
                return F.linear(x, self.weight), self.bias
            return F.linear(x, self.weight, self.bias), None
        if not self.input_is_parallel:
            x = scatter_to_model_parallel_region(x)
        out = F.linear(x, self.weight)
        if self.parallel_output:
            return out, self.bias
        out = reduce_from_model_parallel_region(out)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias
        return out + self.bias, None


def vocab_range(per_partition: int, rank: int) -> Tuple[int, int]:
    """``[first, last)`` vocabulary ids a rank holds."""
    return rank * per_partition, (rank + 1) * per_partition


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary (rows) split over the model-parallel ranks: each rank looks up the
    ids it holds, writes zeros for the others, and the ranks' results are summed."""

    def __init__(self, neox_args, num_embeddings: int, embedding_dim: int,
                 init_method: Callable = nn.init.xavier_normal_):
        super().__init__()
        check_model_parallel_size(neox_args.model_parallel_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.world = get_model_parallel_world_size()
        self.num_embeddings_per_partition = partition.local_segments((num_embeddings,), self.world)[0]
        self.vocab_start, self.vocab_end = vocab_range(self.num_embeddings_per_partition, get_model_parallel_rank())
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, (num_embeddings,), init_method,
                                         _params_dtype(neox_args))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_model_parallel_region(out)


def parallel_lm_logits(x: torch.Tensor, word_embeddings_weight: torch.Tensor, parallel_output: bool) -> torch.Tensor:
    """Logits against the (vocab-parallel) word embedding: this rank's vocabulary slice when
    ``parallel_output``, else gathered to the whole vocabulary."""
    logits = F.linear(copy_to_model_parallel_region(x), word_embeddings_weight)
    return logits if parallel_output else gather_from_model_parallel_region(logits)


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
           "set_partition_attributes", "vocab_range", "all_reduce"]
