"""Pipeline / tensor parallelism and the distributed backend."""
from dataclasses import dataclass
from typing import Optional

from .field import arg


@dataclass
class ParallelismArgs:
    """Parallel layout. Data parallelism fills whatever pp x mp leaves of the world."""

    pipe_parallel_size: int = arg(
        0, "Pipeline stages. 0: plain sequential model; >= 1: DeepSpeed PipelineModule with that many stages.")
    model_parallel_size: int = arg(
        1, "Tensor-parallel size: attention heads, MLP and vocabulary split over this many ranks (Megatron-style "
           "layers, megatron/mpu); heads, kv heads, hidden and MLP sizes must divide by it.")
    pipe_stages: Optional[int] = arg(
        None, "Pipeline stages of the process grid: max(pipe_parallel_size, 1) (0, the sequential model, is one "
              "stage).", role="derived")
    pipe_partition_method: str = arg(
        "type:transformer|mlp", "How layers are split over pipeline stages (DeepSpeed partition_method).")
    distributed_backend: str = arg(
        "nccl", "torch.distributed backend; nccl falls back to gloo where CUDA is absent.",
        choices=("nccl", "gloo", "mpi"))
