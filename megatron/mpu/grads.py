"""The gradient norm of a model split over tensor-parallel ranks and pipeline stages.

DeepSpeed's ``clip_grad_norm_(parameters, max_norm, mpu=...)`` counts a parameter without ``model_parallel``
only where ``mpu.get_model_parallel_rank() == 0``. DeepSpeed's pipeline grid answers that with the rank in the
combined pipe x tensor group, so on every pipeline stage but the first the replicated parameters (norms,
row-parallel biases, position embeddings) would drop out of the norm. :class:`ClipGroups` gives DeepSpeed's
function the tensor-parallel rank for that test and the pipe x tensor group for the sum: each replicated
parameter counted once per stage, each shard once.
"""


class ClipGroups:
    """The ``mpu`` argument of DeepSpeed's ``clip_grad_norm_`` for a grid (``PipelineParallelGrid``)."""

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return self.grid.get_model_parallel_world_size()
