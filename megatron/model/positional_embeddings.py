"""Positional encodings: rotary (partial, at arbitrary per-row positions) and ALiBi.

Rotary follows GPT-NeoX / HF GPT-NeoX exactly: ``inv_freq = base ** (-arange(0, dim, 2) / dim)``, the angle
table duplicated (``cat(freqs, freqs)``) and ``rotate_half`` on the first ``rotary_ndims`` features of each head.
Angles are computed from per-row positions ``[B, S]`` so BiPE's inter-segment ids and shifted positions work
without a cached ``[max_pos, dim]`` table.
"""
import math
from typing import List, Tuple

import torch
from torch import nn


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


def alibi_slopes(num_heads: int) -> List[float]:
    """ALiBi head slopes (Press et al.): a geometric series, interleaved for non-powers of two.

    12 heads: 0.5, 0.25, ..., 0.0039 (8 heads) then 0.7071, 0.3536, 0.1768, 0.0884.
    """
    def power_of_2(n: int) -> List[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads must be positive, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Additive ALiBi scores ``-slope_h * (pos[q] - pos[k])`` as ``[B, H, S, S]`` fp32.

    ``positions`` are the per-row rope/ALiBi positions ``[B, S]`` (absolute, or BiPE inter-segment ids), so
    BiPE-ALiBi and plain ALiBi share this function. Entries above the diagonal are left to the causal mask.
    """
    pos = positions.float()
    dist = pos.unsqueeze(-1) - pos.unsqueeze(-2)  # [B, Sq, Sk]
    return -slopes.float().view(1, -1, 1, 1) * dist.unsqueeze(1)
