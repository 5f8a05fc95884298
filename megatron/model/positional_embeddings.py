"""Positional encodings: rotary (partial, at arbitrary per-row positions) and ALiBi.

Rotary follows GPT-NeoX / HF GPT-NeoX exactly: ``inv_freq = base ** (-arange(0, dim, 2) / dim)``, the angle
table duplicated (``cat(freqs, freqs)``) and ``rotate_half`` on the first ``rotary_ndims`` features of each head.
Angles are computed from per-row positions ``[B, S]`` so BiPE's inter-segment ids and shifted positions work
without a cached ``[max_pos, dim]`` table.
"""
from typing import Tuple

import torch
from torch import nn

from megatron.model.attention_math import alibi_slopes  # noqa: F401  (the one definition; re-exported)


def rotary_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` (non-persistent buffer) and produces cos/sin for per-row positions."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2 != 0 or dim <= 0:
            raise ValueError(f"rotary dimension must be a positive even number, got {dim} "
                             f"(check rotary_pct and the head size)")
        self.dim = dim
        self.base = base
        # Non-persistent: GPT-NeoX checkpoints carry inv_freq under some versions only; recomputing it is exact.
        self.register_buffer("inv_freq", rotary_inv_freq(dim, base), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[B, S, 1, dim]`` (broadcast over heads of a ``[B, S, H, D]`` tensor)."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq.float()  # [B, S, dim/2], fp32 for exact angles
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` features of ``x`` ([B, S, H, D]); the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def alibi_bias(positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Additive ALiBi scores ``-slope_h * (pos[q] - pos[k])`` as ``[B, H, S, S]`` fp32.

    ``positions`` are the per-row rope/ALiBi positions ``[B, S]`` (absolute, or BiPE inter-segment ids), so
    BiPE-ALiBi and plain ALiBi share this function. Entries above the diagonal are left to the causal mask.
    """
    pos = positions.float()
    dist = pos.unsqueeze(-1) - pos.unsqueeze(-2)  # [B, Sq, Sk]
    return -slopes.float().view(1, -1, 1, 1) * dist.unsqueeze(1)
