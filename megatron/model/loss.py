"""The language-model loss, in one place: the trainer's steps, its evaluation and the pipeline engine's
``loss_fn`` all call :func:`lm_loss`."""
import torch

from megatron import mpu


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked positions, computed in fp32 (as GPT-NeoX does, whatever
    the training precision). ``logits [B, S, V / tp]``: this rank's vocabulary slice, as the trainer's model
    returns them (``parallel_output``; the whole vocabulary at one model-parallel rank); ``labels`` and
    ``loss_mask`` ``[B, S]``."""
    losses = mpu.vocab_parallel_cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    mask = loss_mask.reshape(-1).to(losses.dtype)
    # A micro-batch with every position masked contributes 0 rather than 0/0 = NaN.
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
