"""Tensor-parallel layers and process-group helpers (plain layers at model-parallel size 1)."""
from .initialize import (  # noqa: F401
    check_model_parallel_size,
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_grid,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    get_pipe_parallel_group,
    get_pipe_parallel_rank,
    get_pipe_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding  # noqa: F401
