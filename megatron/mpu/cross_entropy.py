"""Cross entropy over vocabulary-parallel logits: each rank holds ``[..., V / tp]`` and the full logits are never
gathered. Three all-reduces of ``[...]`` (one value per token): the max, the target's logit, the sum of exps.

Its reference twin is ``F.cross_entropy`` on the gathered logits (tests/tp/test_layers.py compares them on
random inputs, values and gradients); at one model-parallel rank it *is* ``F.cross_entropy``.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .initialize import get_model_parallel_rank, get_model_parallel_world_size
from .layers import vocab_range
from .mappings import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        part = logits.shape[-1]
        start, end = vocab_range(part, get_model_parallel_rank())
        logits_max = all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= end)
        local = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        picked = all_reduce(picked.contiguous())
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1))
        loss = sum_exp.log() - picked
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[N]`` from ``logits [N, V_local]`` (this rank's vocabulary slice) and ``target [N]``
    (global ids)."""
    if get_model_parallel_world_size() == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits, target)
