"""Which rows (or columns) of a full weight a tensor-parallel rank holds: the one rule for splitting and merging.

A partitioned dimension is a concatenation of *segments* (the fused QKV of grouped-query attention is
``[q | k | v]``, the gated MLP's ``linear1`` is ``[x | gate]``; a plain linear is one segment). Each segment is
split evenly over the ranks and a rank holds its slice of every segment, in segment order: GPT-NeoX's per-rank
layout, in which a rank's QKV shard is ``[q_r | k_r | v_r]`` of whole heads and its ``linear1`` shard
``[x_r | gate_r]``. With one segment this is Megatron's contiguous split; with ``n`` equal segments it is
Megatron's ``stride = n``. The layers (``megatron/mpu/layers.py``) and checkpoint tools use these functions and
nothing else.
"""
from typing import List, Sequence

import torch


def local_segments(segments: Sequence[int], world: int) -> List[int]:
    """Each segment's length on one rank."""
    out = []
    for size in segments:
        if size % world:
            raise ValueError(f"a partitioned segment of {size} is not divisible by the model-parallel size {world} "
                             f"(segments {list(segments)})")
        out.append(size // world)
    return out


def shard_index(segments: Sequence[int], world: int, rank: int) -> torch.Tensor:
    """Indices into the full dimension of the entries ``rank`` holds, in its local order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    pieces, start = [], 0
    for size, part in zip(segments, local_segments(segments, world)):
        pieces.append(torch.arange(start + rank * part, start + (rank + 1) * part))
        start += size
    return torch.cat(pieces)


def shard(full: torch.Tensor, dim: int, segments: Sequence[int], world: int, rank: int) -> torch.Tensor:
    """``rank``'s part of ``full`` along ``dim`` (a new contiguous tensor)."""
    if full.shape[dim] != sum(segments):
        raise ValueError(f"dimension {dim} has {full.shape[dim]} entries but the segments {list(segments)} "
                         f"add up to {sum(segments)}")
    if world == 1:
        return full.contiguous()
    return full.index_select(dim, shard_index(segments, world, rank).to(full.device)).contiguous()


def merge(shards: Sequence[torch.Tensor], dim: int, segments: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from the ranks' parts, in rank order."""
    world = len(shards)
    parts = local_segments(segments, world)
    out = []
    for i, part in enumerate(parts):
        offset = sum(parts[:i])
        out.extend(s.narrow(dim, offset, part) for s in shards)
    return torch.cat(out, dim=dim)
