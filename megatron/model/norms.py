"""Normalisation layers: LayerNorm (torch) and GPT-NeoX's RMSNorm (parameter ``scale``)."""
import functools
from typing import Callable, Tuple

import torch
from torch import nn
from torch.nn import LayerNorm

from megatron.neox_arguments.model_args import NORMS


class RMSNorm(nn.Module):
    """Root-mean-square norm as GPT-NeoX implements it since 4c9f1081 (May 2025): ``scale * x / sqrt(mean(x^2) + eps)``.

    ``eps`` goes inside the square root (HF's LlamaRMSNorm does the same, so Llama weights mean the same in both);
    the weight is called ``scale``, so GPT-NeoX checkpoints load unchanged. ``p`` in (0, 1) gives partial RMSNorm
    (the mean square over the first ``p * dim`` features, applied to all of them).
    """

    def __init__(self, dim: int, p: float = -1.0, eps: float = 1e-8, bias: bool = False):
        super().__init__()
        self.eps, self.d, self.p = eps, dim, p
        self.scale = nn.Parameter(torch.ones(dim))
        if bias:
            self.offset = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("offset", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # Reduce in fp32: the sum of squares over 2k+ features overflows/loses precision in half types.
        xf = x.float()
        stats = xf[..., :int(self.d * self.p)] if 0.0 < self.p < 1.0 else xf
        variance = stats.pow(2).mean(dim=-1, keepdim=True)
        out = (xf * torch.rsqrt(variance + self.eps)).to(dtype) * self.scale.to(dtype)
        if self.offset is not None:
            out = out + self.offset.to(dtype)
        return out


def get_norm(neox_args) -> Tuple[Callable[..., nn.Module], float]:
    """``(norm factory, eps)`` for ``neox_args.norm``; the factory takes ``(dim, eps=...)``.

    ``use_bias_in_norms`` gives LayerNorm its ``bias`` and RMSNorm its ``offset``, as current GPT-NeoX's
    ``get_norm`` does, so a GPT-NeoX checkpoint of either kind has the same parameters here.
    """
    if neox_args.norm == "layernorm":
        return functools.partial(LayerNorm, bias=neox_args.use_bias_in_norms), neox_args.layernorm_epsilon
    if neox_args.norm == "rmsnorm":
        return functools.partial(RMSNorm, bias=neox_args.use_bias_in_norms), neox_args.rms_norm_epsilon
    raise ValueError(f"norm {neox_args.norm!r} is not supported; choose one of {', '.join(NORMS)}")
