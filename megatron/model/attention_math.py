"""Attention formulas shared by the trainer and the HF export, in one place.

Self-contained (torch and math only): the exporter copies this file verbatim beside the exported modeling files
(``megatron/hf/attention_math.py`` is a link to it in the checkout), so an export computes exactly what training
computed, without a second hand-written copy.
"""
import math
from typing import List, Optional

import torch


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


def sa_probabilities(scores: torch.Tensor, allowed: torch.Tensor, normalised: bool,
                     numerator_bias: float = 0.0, denominator_bias: float = 1e-10,
                     causal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-Adjusting softmax weights ``P'`` (SEPLLM_REFERENCE.md section 6) from scores ``[..., Sq, Sk]`` and a
    broadcastable allowed-mask, in the dtype of ``scores``.

    ``P = masked_softmax(s)``; ``T = tril(s)``; normalised: ``m = min(0, min T)``, ``M = max(0, max T + eps_d) +
    eps_d``, ``P' = tril(P * (s - m + eps_n) / (M - m))``; without denominator: ``P' = tril(P * s)``. ``causal``
    (``[Sq, Sk]`` bool) is the lower triangle; by default the prefill one (query i at key i); decode steps pass
    theirs (queries at the end of the keys).
    """
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    lower = causal if causal is not None else \
        torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if not normalised:
        return (probs * scores).masked_fill(~lower, 0.0)
    tri = scores.masked_fill(~lower, 0.0)
    low = tri.amin(dim=-1, keepdim=True).clamp(max=0.0)
    high = (tri.amax(dim=-1, keepdim=True) + denominator_bias).clamp(min=0.0) + denominator_bias
    adjusted = probs * (scores - low + numerator_bias) / (high - low)
    return adjusted.masked_fill(~lower, 0.0)


# ---------------------------------------------------------------------------------------------- rotary
# GPT-NeoX / HF convention: inv_freq = base^(-2i/dim), the angle table duplicated (cat(freqs, freqs)) and
# rotate_half on the first ``dim`` features of each head; angles from integer positions in fp32, so per-row and
# shifted positions (BiPE, SepCache's PE shift) need no cached [max_pos, dim] table.
def rotary_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    """``base^(-2i/dim)`` for ``i < dim/2``, fp32."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """fp32 ``cos, sin`` of shape ``positions.shape + [2 * len(inv_freq)]``."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_prefix(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` features of ``x`` by ``cos``/``sin`` (broadcastable to that slice, in
    the dtype the products should have); the other features pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
