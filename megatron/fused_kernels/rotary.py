"""Fused rotary embedding (Triton) with the PyTorch implementation as its reference twin.

One program handles one ``(batch, position)`` row of a ``[B, S, H, D]`` tensor (all heads): it computes the
angles ``pos * inv_freq`` in fp32 from the per-row position, rotates the first ``rot`` features
(GPT-NeoX ``rotate_half`` convention) and copies the rest, in a single pass. This replaces the ~8 small
kernels of the eager PyTorch path per tensor (angle table, cos, sin, casts, slice, rotate, cat). Backward is
the same kernel with the angle negated (a rotation's transpose is its inverse). Under ``torch.compile``
the PyTorch path is used instead; Inductor fuses it the same way.
"""
from typing import Tuple

import torch

from megatron.model.attention_math import rotary_cos_sin, rotate_prefix

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # CPU-only installs: the PyTorch path is used
    _HAVE_TRITON = False


def fused_rotary_available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """PyTorch twin: rotate the first ``2 * len(inv_freq)`` features of ``x`` [B, S, H, D] at ``positions`` [B, S].

    Angles and products in fp32, result in ``x.dtype`` (the kernel's numerics).
    """
    cos, sin = rotary_cos_sin(positions, inv_freq)
    return rotate_prefix(x.float(), cos.unsqueeze(2), sin.unsqueeze(2)).to(x.dtype)


if _HAVE_TRITON:

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, pos_ptr, inv_freq_ptr, S, H, D,
                       stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, stride_pb, stride_ps,
                       HALF: tl.constexpr, SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64 offsets: B*S*H*D may exceed 2**31
        b = row // S
        s = row % S
        pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.float32)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D)
        x_row = x_ptr + b * stride_xb + s * stride_xs + h * stride_xh
        x = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
        in_rot = d < 2 * HALF
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)
        xp = tl.load(x_row + partner, mask=mask & in_rot, other=0.0).to(tl.float32)
        j = tl.where(first, d, d - HALF)
        freq = tl.load(inv_freq_ptr + j, mask=in_rot, other=0.0)
        angle = pos * freq * SIGN
        rotated = x * tl.cos(angle) + tl.where(first, -xp, xp) * tl.sin(angle)
        out = tl.where(in_rot, rotated, x)
        o_row = out_ptr + b * stride_ob + s * stride_os + h * stride_oh
        tl.store(o_row + d, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    bsz, seq, heads, dim = x.shape
    out = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    inv_freq = inv_freq.float().contiguous()
    _rotary_kernel[(bsz * seq,)](
        x, out, positions, inv_freq, seq, heads, dim,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        positions.stride(0), positions.stride(1),
        HALF=inv_freq.numel(), SIGN=sign, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim))
    return out


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return _launch(x, positions, inv_freq, 1)

    @staticmethod
    def backward(ctx, grad):
        positions, inv_freq = ctx.saved_tensors
        return _launch(grad, positions, inv_freq, -1), None, None


def fused_apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                       inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary on ``q`` and ``k`` ([B, S, H, D], any strides with a contiguous last dim) at ``positions`` [B, S]."""
    if not fused_rotary_available():
        raise RuntimeError("fused rotary needs CUDA and triton; set rope_fusion: false to use the PyTorch path")
    return _FusedRotary.apply(q, positions, inv_freq), _FusedRotary.apply(k, positions, inv_freq)
