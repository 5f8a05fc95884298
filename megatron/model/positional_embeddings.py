"""Positional encodings: rotary (partial, at arbitrary per-row positions) and ALiBi.

Rotary follows GPT-NeoX / HF GPT-NeoX exactly: ``inv_freq = base ** (-arange(0, dim, 2) / dim)``, the angle
table duplicated (``cat(freqs, freqs)``) and ``rotate_half`` on the first ``rotary_ndims`` features of each head.
Angles are computed from per-row positions ``[B, S]`` so BiPE's inter-segment ids and shifted positions work
without a cached ``[max_pos, dim]`` table.
"""
from typing import Tuple

import torch
from torch import nn

# The one definition of each formula (exported verbatim with the HF model); re-exported here.
from megatron.model.attention_math import alibi_slopes, rotary_cos_sin, rotary_inv_freq, rotate_half  # noqa: F401
from megatron.model.attention_math import rotate_prefix as apply_rotary_pos_emb  # noqa: F401


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
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        return cos.unsqueeze(2).to(dtype), sin.unsqueeze(2).to(dtype)


def alibi_bias(positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Additive ALiBi scores ``-slope_h * (pos[q] - pos[k])`` as ``[B, H, S, S]`` fp32.

    ``positions`` are the per-row rope/ALiBi positions ``[B, S]`` (absolute, or BiPE inter-segment ids), so
    BiPE-ALiBi and plain ALiBi share this function. Entries above the diagonal are left to the causal mask.
    """
    pos = positions.float()
    dist = pos.unsqueeze(-1) - pos.unsqueeze(-2)  # [B, Sq, Sk]
    return -slopes.float().view(1, -1, 1, 1) * dist.unsqueeze(1)
