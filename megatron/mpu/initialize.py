"""Model/data/pipeline-parallel group bookkeeping (the one topology of a run, read by every layer).

The only state kept here is the DeepSpeed ``PipelineParallelGrid`` built from the run's process topology, which
DeepSpeed itself needs (it is handed to ``deepspeed.initialize(mpu=...)``). Before
:func:`initialize_model_parallel` runs (single process tests, CPU tools), every helper answers as a run with one
model-parallel rank and one pipeline stage would.
"""
from typing import Optional

import torch.distributed as dist

_GRID = None


def initialize_model_parallel(topology) -> None:
    """Builds the process groups of ``topology`` (a DeepSpeed ``ProcessTopology`` with axes pipe/data/model).

    Requires ``torch.distributed`` to be initialised; every rank must call it with the same topology.
    """
    global _GRID
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: torch.distributed is not initialised "
                           "(call deepspeed.init_distributed() first)")
    _GRID = PipelineParallelGrid(topology=topology)


def model_parallel_is_initialized() -> bool:
    return _GRID is not None


def get_grid():
    """The DeepSpeed grid, or None before :func:`initialize_model_parallel`."""
    return _GRID


def destroy_model_parallel() -> None:
    """Forgets the grid (tests that build several topologies in one process)."""
    global _GRID
    _GRID = None


def _world_size(group) -> int:
    return dist.get_world_size(group=group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def get_model_parallel_group():
    return _GRID.get_slice_parallel_group() if _GRID is not None else None


def get_model_parallel_world_size() -> int:
    return _GRID.get_slice_parallel_world_size() if _GRID is not None else 1


def get_model_parallel_rank() -> int:
    return _GRID.get_slice_parallel_rank() if _GRID is not None else 0


def get_model_parallel_src_rank() -> int:
    """Global rank of the first rank of this rank's model-parallel group (broadcast source)."""
    if _GRID is None:
        return _rank(None)
    return _rank(None) - get_model_parallel_rank()


def get_data_parallel_group():
    return _GRID.get_data_parallel_group() if _GRID is not None else None


def get_data_parallel_world_size() -> int:
    if _GRID is not None:
        return _GRID.get_data_parallel_world_size()
    return _world_size(None)


def get_data_parallel_rank() -> int:
    if _GRID is not None:
        return _GRID.get_data_parallel_rank()
    return _rank(None)


def get_pipe_parallel_group():
    return _GRID.get_pipe_parallel_group() if _GRID is not None else None


def get_pipe_parallel_world_size() -> int:
    return _GRID.get_pipe_parallel_world_size() if _GRID is not None else 1


def get_pipe_parallel_rank() -> int:
    return _GRID.get_pipe_parallel_rank() if _GRID is not None else 0


def divide(numerator: int, denominator: int, what: str = "") -> int:
    """``numerator / denominator`` for sizes that must split evenly across ranks."""
    if numerator % denominator != 0:
        raise ValueError(f"{what or numerator} ({numerator}) is not divisible by the model-parallel size "
                         f"{denominator}")
    return numerator // denominator


def check_model_parallel_size(size: Optional[int]) -> None:
    """The configured tensor-parallel size must be the one the process groups were built with: a layer built
    with another size would hold the wrong shard (or the whole matrix) without any error later."""
    built = get_model_parallel_world_size()
    if size is not None and int(size) != built:
        where = ("initialize_model_parallel has not run (one model-parallel rank)" if _GRID is None
                 else f"the process groups have {built} model-parallel rank(s)")
        raise ValueError(f"model_parallel_size={size} but {where}; tensor-parallel layers are built after "
                         f"megatron.initialize.initialize_megatron")
