"""The four collectives of the tensor-parallel region, as autograd functions (Megatron's names and semantics).

======================================  ==========================  ==========================
function                                forward                     backward
======================================  ==========================  ==========================
``copy_to_model_parallel_region``       identity                    all-reduce
``reduce_from_model_parallel_region``   all-reduce                  identity
``scatter_to_model_parallel_region``    keep this rank's last-dim   all-gather (last dim)
``gather_from_model_parallel_region``   all-gather (last dim)       keep this rank's slice
======================================  ==========================  ==========================

With one model-parallel rank each function returns its input itself (no autograd node), so a run at size 1
computes exactly what it computed before tensor parallelism existed. Every collective goes through
:func:`all_reduce` / :func:`all_gather_last_dim` here, which ``bench/bench_tp.py`` counts.
"""
import torch
import torch.distributed as dist

from .initialize import get_model_parallel_group, get_model_parallel_rank, get_model_parallel_world_size


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over the model-parallel group; returns ``x``."""
    if op is None:
        dist.all_reduce(x, group=get_model_parallel_group())
    else:
        dist.all_reduce(x, op=op, group=get_model_parallel_group())
    return x


def split_last_dim(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the last dimension."""
    world = get_model_parallel_world_size()
    size = x.shape[-1]
    if size % world:
        raise ValueError(f"last dimension {size} is not divisible by the model-parallel size {world}")
    part = size // world
    rank = get_model_parallel_rank()
    return x[..., rank * part:(rank + 1) * part].contiguous()


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along the last dimension, in rank order."""
    world = get_model_parallel_world_size()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=get_model_parallel_group())
    return torch.cat(parts, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous())


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        if not x.is_contiguous():
            return all_reduce(x.contiguous())
        # In place, as Megatron does (no copy of B*S*h per layer); marked dirty so that autograd stops with an
        # error, instead of using the sum, if another node saved the partial result for its backward.
        ctx.mark_dirty(x)
        return all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last_dim(grad)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return split_last_dim(grad)


def _single_rank() -> bool:
    return get_model_parallel_world_size() == 1


def copy_to_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _single_rank() else _CopyToModelParallelRegion.apply(x)


def reduce_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _single_rank() else _ReduceFromModelParallelRegion.apply(x)


def scatter_to_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _single_rank() else _ScatterToModelParallelRegion.apply(x)


def gather_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _single_rank() else _GatherFromModelParallelRegion.apply(x)
