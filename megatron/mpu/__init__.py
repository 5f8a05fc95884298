"""Tensor parallelism: process groups (DeepSpeed's grid), the region collectives, the parallel layers, the
vocabulary-parallel cross entropy and the model-parallel random stream (docs/internals.md, "Tensor parallelism")."""
from .cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
from .grads import ClipGroups  # noqa: F401
from .initialize import (  # noqa: F401
    check_model_parallel_size,
    destroy_model_parallel,
    divide,
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
from .layers import (  # noqa: F401
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
)
from .mappings import (  # noqa: F401
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from .random import get_rng_tracker, model_parallel_seed  # noqa: F401
