"""Model/data/pipeline-parallel group bookkeeping.

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


def check_model_parallel_size(size: Optional[int]) -> None:
    """Stops with a clear message for a tensor-parallel degree this build cannot run."""
    if size is not None and int(size) > 1:
        raise ValueError(f"model_parallel_size={size}: tensor parallelism is not available in this build "
                         f"(the mpu layers are plain layers); set model-parallel-size: 1")
