"""``sep_attention``: the autograd operator and its dispatch (Triton on CUDA, dense reference elsewhere)."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .metadata import SepMetadata, build_sep_metadata
from .reference import sep_attention_reference

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# Tile sizes and launch options (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, picked by
# ``python -m megatron.model.sepllm.kernel.tune`` on an H100 (docs/sep_attention_kernel.md). The backward
# kernels keep one tile side small so the float32 accumulators fit in registers.
_DEFAULT_BLOCKS = {
    64: dict(fwd=(64, 32, 4, 4), dq=(64, 32, 4, 3), dkdv_c=(64, 64, 4, 3), dkdv_b=(32, 64, 4, 2)),
    128: dict(fwd=(64, 64, 4, 2), dq=(64, 64, 4, 2), dkdv_c=(64, 128, 8, 3), dkdv_b=(32, 64, 4, 3)),
}
_BLOCK_ENV = "SEP_ATTN_BLOCKS"  # JSON {"64": {"fwd": [bm, bn, warps, stages], ...}} overriding the table


def _block_config(head_dim: int) -> dict:
    """Launch configuration for ``head_dim`` (the table above, optionally overridden through $SEP_ATTN_BLOCKS)."""
    key = 64 if head_dim <= 64 else 128
    cfg = dict(_DEFAULT_BLOCKS[key])
    override = os.environ.get(_BLOCK_ENV)
    if override:
        try:
            cfg.update({k: tuple(v) for k, v in json.loads(override).get(str(key), {}).items()})
        except (ValueError, AttributeError, TypeError) as err:
            raise ValueError(f"${_BLOCK_ENV} must be JSON like {{\"64\": {{\"fwd\": [128, 64, 4, 3]}}}}, "
                             f"got {override!r}: {err}") from err
    return cfg


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def launch_forward(q, k, v, positions, cum, lo_off: int, scale: float, cfg: tuple):
    """Runs the forward kernel; returns ``(out, lse)`` (lse in base-2 units, float32 ``[B, H, S]``)."""
    from . import triton_sep as ts

    bsz, heads, seq, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(bsz, heads, seq, device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = cfg
    ts._sep_fwd_kernel[(_cdiv(seq, bm), bsz * heads)](
        q, k, v, out, lse, positions, cum, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq, lo_off,
        HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, HAS_COMPACT=lo_off < seq - 1, num_warps=warps, num_stages=stages,
    )
    return out, lse


def launch_backward_dq(q, k, v, out, dout, lse, positions, cum, lo_off: int, scale: float, cfg: tuple):
    """Returns ``(dq, delta)``; ``delta = rowsum(dO * O)`` (float32 ``[B, H, S]``) feeds the dK/dV kernels."""
    from . import triton_sep as ts

    bsz, heads, seq, dim = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    bm, bn, warps, stages = cfg
    ts._sep_bwd_dq_kernel[(_cdiv(seq, bm), bsz * heads)](
        q, k, v, out, dout, dq, lse, delta, positions, cum, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq),
        heads, seq, lo_off,
        HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, HAS_COMPACT=lo_off < seq - 1, num_warps=warps, num_stages=stages,
    )
    return dq, delta


def launch_backward_dkdv_compact(q, k, v, dout, lse, delta, positions, cum, lo_off: int, scale: float, cfg: tuple):
    """float32 ``(dk, dv)`` of the listed keys in compact order (slot ``j`` = ``positions[b, j]``)."""
    from . import triton_sep as ts

    bsz, heads, seq, dim = q.shape
    dkc = torch.empty(bsz, heads, seq, dim, device=q.device, dtype=torch.float32)
    dvc = torch.empty_like(dkc)
    bm, bn, warps, stages = cfg
    ts._sep_bwd_dkdv_compact_kernel[(_cdiv(seq, bn), bsz * heads)](
        q, k, v, dout, dkc, dvc, lse, delta, positions, cum, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        heads, seq, lo_off,
        HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return dkc, dvc


def launch_backward_dkdv_band(q, k, v, dout, lse, delta, dkc, dvc, cum, lo_off: int, scale: float, cfg: tuple):
    """dK/dV: the band part plus (when ``dkc`` is given) the compact share of each listed key."""
    from . import triton_sep as ts

    bsz, heads, seq, dim = q.shape
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    has_compact = dkc is not None
    if not has_compact:
        dkc = dvc = lse  # never read: HAS_COMPACT=False compiles the compact share out
    bm, bn, warps, stages = cfg
    ts._sep_bwd_dkdv_band_kernel[(_cdiv(seq, bn), bsz * heads)](
        q, k, v, dout, dk, dv, dkc, dvc, lse, delta, cum, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        heads, seq, lo_off,
        HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, HAS_COMPACT=has_compact, num_warps=warps, num_stages=stages,
    )
    return dk, dv


class _SepAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, cum, lo_off: int, scale: float):
        out, lse = launch_forward(q, k, v, positions, cum, lo_off, scale, _block_config(q.shape[-1])["fwd"])
        ctx.save_for_backward(q, k, v, out, lse, positions, cum)
        ctx.lo_off = lo_off
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, positions, cum = ctx.saved_tensors
        lo_off, scale = ctx.lo_off, ctx.scale
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        cfg = _block_config(q.shape[-1])
        dq, delta = launch_backward_dq(q, k, v, out, dout, lse, positions, cum, lo_off, scale, cfg["dq"])
        dkc = dvc = None
        if lo_off < q.shape[2] - 1:
            dkc, dvc = launch_backward_dkdv_compact(q, k, v, dout, lse, delta, positions, cum, lo_off, scale,
                                                    cfg["dkdv_c"])
        dk, dv = launch_backward_dkdv_band(q, k, v, dout, lse, delta, dkc, dvc, cum, lo_off, scale, cfg["dkdv_b"])
        return dq, dk, dv, None, None, None, None


def _check_inputs(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, S, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bsz, _, seq, _ = q.shape
    if tuple(sep_flags.shape) != (bsz, seq):
        raise ValueError(f"sep_flags must be [B, S]=[{bsz}, {seq}], got {tuple(sep_flags.shape)}")
    if tuple(init_start.shape) != (bsz,):
        raise ValueError(f"init_start must be [B]=[{bsz}], got {tuple(init_start.shape)}")
    if n_init < 0:
        raise ValueError(f"n_init must be >= 0, got {n_init}")
    if window < int(exclude_diagonal):
        raise ValueError(f"window={window} with exclude_diagonal={exclude_diagonal} hides the diagonal; "
                         "the local window must hold at least the query itself (window >= 1)")


def sep_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep_flags: torch.Tensor,
    init_start: torch.Tensor,
    n_init: int,
    window: int,
    exclude_diagonal: bool = True,
    scale: Optional[float] = None,
    meta: Optional[SepMetadata] = None,
) -> torch.Tensor:
    """SepLLM attention: key ``k`` is visible to query ``q`` of row ``b`` iff ``k <= q`` and (``k`` is one of the
    ``n_init`` initial tokens from ``init_start[b]``, or ``sep_flags[b, k]``, or ``q - k <= window - E``),
    ``E = int(exclude_diagonal)``. ``window >= S`` is plain causal attention.

    q, k, v: ``[B, H, S, D]`` (bf16/fp16; fp32 uses TF32 dot products on CUDA); returns ``[B, H, S, D]``.
    ``meta`` is :func:`build_sep_metadata` of ``(sep_flags, init_start, n_init)``; pass it to build it once per
    micro-batch for all layers (it is built here otherwise). On CUDA this runs the Triton kernel, elsewhere the
    dense reference (``O(S^2)`` memory, for tests and small CPU runs).
    """
    _check_inputs(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal)
    bsz, heads, seq, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    lo_off = window - int(exclude_diagonal)
    if not q.is_cuda:
        return sep_attention_reference(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal, scale)
    if lo_off >= seq - 1:
        # Every causal key lies in the window: this layer is full causal attention.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"sep_attention supports head dims {_SUPPORTED_HEAD_DIMS} on CUDA, got D={dim}")
    if not _triton_available():
        raise RuntimeError("sep_attention on CUDA needs triton (pip package 'triton'), which is not importable")
    if meta is None:
        meta = build_sep_metadata(sep_flags, init_start, n_init)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _SepAttentionFn.apply(q, k, v, meta.positions, meta.cum, lo_off, scale)

