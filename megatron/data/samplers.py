"""Batch sampler for pretraining: one data-parallel rank's micro-batches, resumable at any consumed-sample count."""
from __future__ import annotations

from typing import Iterator


class DistributedBatchSampler:
    """Micro-batches of dataset indices for data-parallel rank `dp_rank` of `dp_size`.

    The order is GPT-NeoX's (a sequential sampler under its DistributedBatchSampler, drop_last): global
    micro-step k covers dataset indices [k * G, (k + 1) * G) with G = micro_batch_size * dp_size, and
    rank r takes the r-th contiguous slice of micro_batch_size of them. Shuffling already lives in the
    dataset's shuffle index, so sequential here is the GPT-NeoX sample order.

    `consumed_samples` (a multiple of G, as the trainer stores it: iteration * train_batch_size) selects
    the first micro-step; it is computed directly, nothing before it is read or replayed. After the
    last complete micro-step the order starts again from step 0 (GPT-NeoX likewise takes the start step
    modulo the loader length); the iterator never ends by itself, the trainer decides how many it takes.
    """

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro batch size (train_micro_batch_size_per_gpu) must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, data_parallel_size={dp_size})")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.global_micro_batch = self.micro_batch_size * self.dp_size
        if self.num_samples < self.global_micro_batch:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one micro-step across data "
                f"parallel ranks ({self.micro_batch_size} x {self.dp_size})"
            )
        if consumed_samples < 0 or consumed_samples % self.global_micro_batch:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a non-negative multiple of micro batch x "
                f"data parallel size = {self.global_micro_batch}"
            )
        self.consumed_samples = int(consumed_samples)

    def __len__(self) -> int:
        """Micro-steps in one pass over the dataset (incomplete last step dropped)."""
        return self.num_samples // self.global_micro_batch

    @property
    def start_step(self) -> int:
        return (self.consumed_samples // self.global_micro_batch) % len(self)

    def step_indices(self, step: int) -> list[int]:
        """This rank's dataset indices for global micro-step `step` (taken modulo one pass)."""
        first = (step % len(self)) * self.global_micro_batch + self.dp_rank * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.step_indices(step)
            step += 1
