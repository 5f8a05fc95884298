"""``sep_attention``: the autograd operator and its dispatch (Triton on CUDA, dense reference elsewhere).

Eager calls go through an ``autograd.Function``; under torch.compile the same forward/backward are
``torch.library`` custom ops (``sepllm_kernel::*``) with fake kernels. Kernels are launched by
:class:`KernelLauncher` (triton's launch path once per specialisation, then the compiled kernel directly).
"""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.model.sepllm.mask_cache import TensorIdentityCache

from . import settings as kernel_settings
from .metadata import SepMetadata, build_sep_metadata
from .reference import expand_kv_heads, sep_attention_reference

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# Tile sizes and launch options (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, picked by
# ``python -m megatron.model.sepllm.kernel.tune`` on an H100 (docs/sep_attention_kernel.md; head dim 128 re-tuned
# with the gathered compact K/V at S = 32768). The backward kernels keep one tile side small so the float32
# accumulators fit in registers.
# The fused backward's tiles (fused_b, fused_c) are not timed on a GPU yet: they are the largest tiles that
# compile for sm_90 without register spills (ptxas resource usage, compiled on a CPU machine; at D 128 only 32x32
# tiles do; the split kernels' D 128 tiles spill 96-200 bytes). ``tune --kernels fused_b,fused_c`` picks on a GPU.
_DEFAULT_BLOCKS = {
    64: dict(fwd=(64, 32, 4, 4), dq=(64, 32, 4, 3), dkdv_c=(64, 64, 4, 3), dkdv_b=(32, 64, 4, 2),
             fused_b=(32, 64, 8, 2), fused_c=(64, 64, 8, 3)),
    128: dict(fwd=(64, 64, 4, 3), dq=(128, 64, 8, 3), dkdv_c=(64, 128, 8, 3), dkdv_b=(32, 64, 4, 3),
              fused_b=(32, 32, 4, 2), fused_c=(32, 32, 4, 3)),
}
# Per settings object and head-dim class: the table merged with the config's overrides (one dict lookup per call).
_BLOCK_CACHE: dict = {}


def _block_config(head_dim: int) -> dict:
    """Launch configuration for ``head_dim``: the table above, with the overrides of the config key
    ``sep_attn_kernel_blocks`` (:mod:`.settings`)."""
    key = 64 if head_dim <= 64 else 128
    active = kernel_settings.ACTIVE
    cached = _BLOCK_CACHE.get((id(active), key))
    if cached is not None and cached[0] is active:
        return cached[1]
    cfg = dict(_DEFAULT_BLOCKS[key])
    cfg.update(active.blocks.get(key, {}))
    _BLOCK_CACHE[(id(active), key)] = (active, cfg)
    return cfg


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _triton_available() -> bool:
    return _TRITON_OK


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_OK = _probe_triton()

# Listed K/V are copied into contiguous buffers (one extra launch) from this length on, where the compact loops
# dominate; below it the launch costs more than the indirect row loads. sep_attn_kernel_gather on / off forces it.
_GATHER_MIN_SEQ = 8192
_GATHER_BLOCK = 64


def _gather_compact(seq: int) -> bool:
    mode = kernel_settings.ACTIVE.gather
    if mode == "auto":
        return seq >= _GATHER_MIN_SEQ
    return mode == "on"


class KernelLauncher:
    """Launches one ``@triton.jit`` kernel of :mod:`.triton_sep` with the least host work.

    Every kernel takes its tensors first, then the rest (scale, strides, sizes, constexprs): a launch is
    ``(grid, tensors, tail)``, and the op keeps ``grid`` and ``tail`` per call signature (:func:`_plan`), so a
    repeated call only allocates its outputs and passes the tensors.

    The first launch of a specialisation goes through triton's ``kernel[grid](...)`` (argument binding,
    specialisation, compile or cache lookup: tens of microseconds of Python). The compiled kernel is then kept under
    a key that covers everything triton specialises on (dtypes, 16-byte alignment of every pointer, the exact
    integer arguments, the constexprs and launch options), and later launches call it directly, as triton itself
    does after its lookup. The config key ``sep_attn_kernel_fast_launch: false`` turns this off; so does a failed
    direct launch, for the rest of the process (the compiled kernel's launcher is triton-private and has no
    stable signature), with one warning naming the error.
    """

    failed = False  # a direct launch raised: triton's own path from then on

    def __init__(self, name: str):
        self.name = name
        self.fn = None
        self.compiled: dict = {}

    @staticmethod
    def _key(tensors, tail, num_warps: int, num_stages: int) -> tuple:
        """Everything triton specialises on: tensors by dtype and 16-byte alignment, other arguments by value."""
        return (tensors[0].device, num_warps, num_stages, tuple(tail),
                tuple([(t.dtype, t.data_ptr() & 15) for t in tensors]))

    def __call__(self, grid: tuple, tensors: tuple, tail: tuple, num_warps: int, num_stages: int,
                 key=None) -> None:
        """Launches ``fn[grid](*tensors, *tail)``. ``key``, when given, must determine everything :meth:`_key`
        would read (the op passes one signature per call, computed once for all its launches)."""
        if self.fn is None:
            from . import triton_sep

            self.fn = getattr(triton_sep, self.name)
        if KernelLauncher.failed or not kernel_settings.ACTIVE.fast_launch:
            key = None
        elif key is None:
            key = self._key(tensors, tail, num_warps, num_stages)
        else:
            key = (key, num_warps, num_stages)
        kernel = self.compiled.get(key) if key is not None else None
        if kernel is not None:
            try:
                hooks = _triton_knobs().runtime
                stream = _current_raw_stream(tensors[0].device.index)
                enter = hooks.launch_enter_hook
                meta = None if enter is None else kernel.launch_metadata(grid, stream, *tensors, *tail)
                kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta,
                           enter, hooks.launch_exit_hook, *tensors, *tail)
                return
            except (TypeError, AttributeError, ValueError, ImportError) as err:
                warnings.warn(f"sep_attention: direct launch of {self.name} failed ({type(err).__name__}: {err}); "
                              "using triton's launch path from now on")
                KernelLauncher.failed = True
        kernel = self.fn[grid](*tensors, *tail, num_warps=num_warps, num_stages=num_stages)
        if hasattr(kernel, "result"):  # asynchronous compile mode
            kernel = kernel.result()
        if key is not None and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            self.compiled[key] = kernel  # the interpreter returns no compiled kernel: nothing to cache


def _triton_knobs():
    """``triton.knobs`` (runtime hooks the direct launch passes on exactly as triton's launch path does)."""
    import triton

    return triton.knobs


def _current_raw_stream(device_index: int) -> int:
    """The current CUDA stream handle (what triton's own launch path asks torch for)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


_FWD = KernelLauncher("_sep_fwd_kernel")
_DQ = KernelLauncher("_sep_bwd_dq_kernel")
_DKDV_C = KernelLauncher("_sep_bwd_dkdv_compact_kernel")
_DKDV_B = KernelLauncher("_sep_bwd_dkdv_band_kernel")
_GATHER = KernelLauncher("_sep_gather_kernel")
_FUSED_B = KernelLauncher("_sep_bwd_fused_band_kernel")
_FUSED_C = KernelLauncher("_sep_bwd_fused_compact_kernel")

# (call signature, launch, its options) -> (grid, tail): what a launch passes besides its tensors. Everything in
# it follows from the signature (the buffers a launch allocates are shaped and strided from its inputs).
_PLANS: dict = {}
_PLANS_MAX = 512


def _plan(key, build):
    """``build()``'s ``(grid, tail)``, kept under ``key`` (None: built afresh, for callers without a signature)."""
    if key is None:
        return build()
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _strides(t: torch.Tensor):
    st = t.stride()
    return st[0], st[1], st[2]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the head dim with stride 1; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _like(t: torch.Tensor) -> torch.Tensor:
    """Output buffer shaped like ``t`` (its strides when the head dim is unit-stride, else contiguous)."""
    if t.stride(-1) == 1:
        return torch.empty_like(t)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def launch_gather(k, v, positions, cum, sig=None):
    """Listed K/V rows in list order, as contiguous ``[B, H, S, D]`` tensors (rows past the list unset)."""
    bsz, heads, seq, dim = k.shape
    kc = torch.empty((bsz, heads, seq, dim), device=k.device, dtype=k.dtype)
    vc = torch.empty_like(kc)
    key = None if sig is None else (sig, "gather")
    grid, tail = _plan(key, lambda: ((bsz * heads, _cdiv(seq, _GATHER_BLOCK), 1),
                                     (*_strides(k), *_strides(v), heads, seq, dim, _GATHER_BLOCK)))
    _GATHER(grid, (k, v, kc, vc, positions, cum), tail, 4, 1, key)
    return kc, vc


def _compact_operands(k, v, positions, cum, lo_off: int, gathered, compact, sig):
    """``(has_compact, gathered, kc, vc)`` shared by the forward and dQ launches: whether any listed key can lie
    left of the window, whether the listed K/V rows are read from gathered copies (built here unless ``compact``
    already holds them), and the tensors the kernel reads them from (``k, v`` themselves when not gathered)."""
    seq = k.shape[2]
    has_compact = lo_off < seq - 1
    if gathered is None:
        gathered = _gather_compact(seq)
    gathered = gathered and has_compact
    if gathered and compact is None:
        compact = launch_gather(k, v, positions, cum, sig)
    kc, vc = compact if gathered else (k, v)  # never read when not gathered
    return has_compact, gathered, kc, vc


def launch_forward(q, k, v, positions, cum, lo_off: int, scale: float, cfg: tuple, gathered=None, compact=None,
                   sig=None):
    """Runs the forward kernel; returns ``(out, lse)`` (lse in base-2 units, float32 ``[B, H, S]``).

    ``compact`` is ``(kc, vc)`` from :func:`launch_gather` when already built; with ``gathered`` None the choice
    follows the sequence length (see ``_gather_compact``).
    """
    bsz, heads, seq, dim = q.shape
    has_compact, gathered, kc, vc = _compact_operands(k, v, positions, cum, lo_off, gathered, compact, sig)
    out = _like(q)
    lse = torch.empty((bsz, heads, seq), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = cfg
    key = None if sig is None else (sig, "fwd", cfg, gathered)
    grid, tail = _plan(key, lambda: ((bsz * heads, _cdiv(seq, bm), 1),
                                     (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                                      heads, seq, lo_off, dim, bm, bn, has_compact, gathered)))
    _FWD(grid, (q, k, v, kc, vc, out, lse, positions, cum), tail, warps, stages, key)
    return out, lse


def launch_backward_dq(q, k, v, out, dout, lse, positions, cum, lo_off: int, scale: float, cfg: tuple,
                       gathered=None, compact=None, sig=None):
    """Returns ``(dq, delta)``; ``delta = rowsum(dO * O)`` (float32 ``[B, H, S]``) feeds the dK/dV kernels."""
    bsz, heads, seq, dim = q.shape
    has_compact, gathered, kc, vc = _compact_operands(k, v, positions, cum, lo_off, gathered, compact, sig)
    dq = _like(q)
    delta = torch.empty_like(lse)
    bm, bn, warps, stages = cfg
    key = None if sig is None else (sig, "dq", cfg, gathered)
    grid, tail = _plan(key, lambda: ((bsz * heads, _cdiv(seq, bm), 1),
                                     (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                                      *_strides(dout), *_strides(dq), heads, seq, lo_off, dim, bm, bn, has_compact,
                                      gathered)))
    _DQ(grid, (q, k, v, kc, vc, out, dout, dq, lse, delta, positions, cum), tail, warps, stages, key)
    return dq, delta


def launch_backward_dkdv_compact(q, k, v, dout, lse, delta, positions, cum, lo_off: int, scale: float, cfg: tuple,
                                 sig=None):
    """float32 ``(dk, dv)`` of the listed keys in compact order (slot ``j`` = ``positions[b, j]``)."""
    bsz, heads, seq, dim = q.shape
    dkc = torch.empty((bsz, heads, seq, dim), device=q.device, dtype=torch.float32)
    dvc = torch.empty_like(dkc)
    bm, bn, warps, stages = cfg
    key = None if sig is None else (sig, "dkdv_c", cfg)
    grid, tail = _plan(key, lambda: ((bsz * heads, _cdiv(seq, bn), 1),
                                     (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                      heads, seq, lo_off, dim, bm, bn)))
    _DKDV_C(grid, (q, k, v, dout, dkc, dvc, lse, delta, positions, cum), tail, warps, stages, key)
    return dkc, dvc


def launch_backward_dkdv_band(q, k, v, dout, lse, delta, dkc, dvc, cum, lo_off: int, scale: float, cfg: tuple,
                              sig=None):
    """dK/dV: the band part plus (when ``dkc`` is given) the compact share of each listed key."""
    bsz, heads, seq, dim = q.shape
    dk = _like(k)
    dv = _like(v)
    has_compact = dkc is not None
    if not has_compact:
        dkc = dvc = lse  # never read: HAS_COMPACT=False compiles the compact share out
    bm, bn, warps, stages = cfg
    key = None if sig is None else (sig, "dkdv_b", cfg, has_compact)
    grid, tail = _plan(key, lambda: ((_cdiv(seq, bn), bsz * heads, 1),
                                     (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                      *_strides(dk), *_strides(dv), heads, seq, lo_off, dim, bm, bn, has_compact)))
    _DKDV_B(grid, (q, k, v, dout, dk, dv, dkc, dvc, lse, delta, cum), tail, warps, stages, key)
    return dk, dv


def launch_backward_fused(q, k, v, out, dout, lse, positions, cum, lo_off: int, scale: float, cfg_band: tuple,
                          cfg_compact: tuple, sig=None):
    """``(dq, dk, dv)`` from the fused backward (two launches; dQ summed in float32 by atomics, then rounded)."""
    bsz, heads, seq, dim = q.shape
    has_compact = lo_off < seq - 1
    dqa = torch.zeros((bsz, heads, seq, dim), device=q.device, dtype=torch.float32)
    # The band share of the listed keys' dK (first half) and dV (second half), float32, slot = cum[b, k].
    dkvc = torch.empty((2, bsz, heads, seq, dim), device=q.device, dtype=torch.float32) if has_compact else lse
    delta = torch.empty_like(lse)
    dk = _like(k)
    dv = _like(v)
    bm, bn, warps, stages = cfg_band
    key = None if sig is None else (sig, "fused_b", cfg_band, has_compact)
    grid, tail = _plan(key, lambda: ((_cdiv(seq, bn), bsz * heads, 1),
                                     (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                                      *_strides(dout), *_strides(dk), *_strides(dv), heads, seq, lo_off, dim, bm, bn,
                                      has_compact)))
    _FUSED_B(grid, (q, k, v, out, dout, dk, dv, dqa, dkvc, lse, delta, cum), tail, warps, stages, key)
    if has_compact:
        bm, bn, warps, stages = cfg_compact
        key = None if sig is None else (sig, "fused_c", cfg_compact)
        grid, tail = _plan(key, lambda: ((bsz * heads, _cdiv(seq, bn), 1),
                                         (scale, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                          *_strides(dk), *_strides(dv), heads, seq, lo_off, dim, bm, bn)))
        _FUSED_C(grid, (q, k, v, dout, dk, dv, dqa, dkvc, lse, delta, positions, cum), tail, warps, stages, key)
    dq = _like(q)
    dq.copy_(dqa)
    return dq, dk, dv


_SIGNATURES: dict = {}


def _signature(lo_off: int, scale: float, *tensors) -> int:
    """What the launches of one op call specialise on, read once: device, dtype and shape of the first input
    (q; the others' shapes follow from it, their dtypes are fixed by the op), every input's strides, which
    inputs are 16-byte aligned, ``lo_off`` and ``scale``. Buffers the launches allocate are fresh (aligned) and
    shaped/strided from these inputs, so this determines every launch's triton specialisation. Returned as a
    small integer (one per distinct signature), so the launches' own lookups hash an int, not this tuple."""
    q = tensors[0]
    aligned = 0
    for t in tensors:
        aligned = (aligned << 1) | (t.data_ptr() & 15 == 0)
    full = (q.device, q.dtype, q.shape, lo_off, scale, aligned, tuple([t.stride() for t in tensors]))
    sig = _SIGNATURES.get(full)
    if sig is None:
        sig = _SIGNATURES[full] = len(_SIGNATURES)
    return sig


def sep_forward(q, k, v, positions, cum, lo_off: int, scale: float):
    """Forward of the kernel path: ``(out, lse)``."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    sig = _signature(lo_off, scale, q, k, v, positions, cum)
    return launch_forward(q, k, v, positions, cum, lo_off, scale, _block_config(q.shape[-1])["fwd"], sig=sig)


def sep_backward(dout, q, k, v, out, lse, positions, cum, lo_off: int, scale: float):
    """Backward of the kernel path: ``(dq, dk, dv)``. Split (``sep_attn_kernel_backward: split``): three
    launches, four with the gathered compact K/V; fused: two launches (:func:`launch_backward_fused`)."""
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    sig = _signature(lo_off, scale, q, k, v, out, dout, lse, positions, cum)
    cfg = _block_config(q.shape[-1])
    if kernel_settings.ACTIVE.backward == "fused":
        return launch_backward_fused(q, k, v, out, dout, lse, positions, cum, lo_off, scale, cfg["fused_b"],
                                     cfg["fused_c"], sig=sig)
    dq, delta = launch_backward_dq(q, k, v, out, dout, lse, positions, cum, lo_off, scale, cfg["dq"], sig=sig)
    dkc = dvc = None
    if lo_off < q.shape[2] - 1:
        dkc, dvc = launch_backward_dkdv_compact(q, k, v, dout, lse, delta, positions, cum, lo_off, scale,
                                                cfg["dkdv_c"], sig=sig)
    dk, dv = launch_backward_dkdv_band(q, k, v, dout, lse, delta, dkc, dvc, cum, lo_off, scale, cfg["dkdv_b"],
                                       sig=sig)
    return dq, dk, dv


class _SepAttentionFn(torch.autograd.Function):
    """Eager autograd wrapper: the cheapest host path (the custom op below is what torch.compile sees)."""

    @staticmethod
    def forward(ctx, q, k, v, positions, cum, lo_off: int, scale: float):
        out, lse = sep_forward(q, k, v, positions, cum, lo_off, scale)
        ctx.save_for_backward(q, k, v, out, lse, positions, cum)
        ctx.lo_off = lo_off
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, positions, cum = ctx.saved_tensors
        dq, dk, dv = sep_backward(dout, q, k, v, out, lse, positions, cum, ctx.lo_off, ctx.scale)
        return dq, dk, dv, None, None, None, None


# The same forward/backward as torch.library custom ops, so torch.compile graphs (and CUDA graphs captured from
# them) hold the kernel as one opaque node with known output shapes instead of breaking the graph.
@torch.library.custom_op("sepllm_kernel::sep_attn_fwd", mutates_args=())
def sep_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cum: torch.Tensor, lo_off: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return sep_forward(q, k, v, positions, cum, lo_off, scale)


@sep_attn_fwd_op.register_fake
def _sep_attn_fwd_fake(q, k, v, positions, cum, lo_off, scale):
    return _like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sepllm_kernel::sep_attn_bwd", mutates_args=())
def sep_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, positions: torch.Tensor, cum: torch.Tensor, lo_off: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sep_backward(dout, q, k, v, out, lse, positions, cum, lo_off, scale)


@sep_attn_bwd_op.register_fake
def _sep_attn_bwd_fake(dout, q, k, v, out, lse, positions, cum, lo_off, scale):
    return _like(q), _like(k), _like(v)


def _op_setup_context(ctx, inputs, output):
    q, k, v, positions, cum, lo_off, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, positions, cum)
    ctx.lo_off = lo_off
    ctx.scale = scale


def _op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, positions, cum = ctx.saved_tensors
    dq, dk, dv = sep_attn_bwd_op(dout, q, k, v, out, lse, positions, cum, ctx.lo_off, ctx.scale)
    return dq, dk, dv, None, None, None, None


sep_attn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class MetadataCache:
    """:class:`SepMetadata` of the last few ``(sep_flags, init_start, n_init)`` the op saw (the project's one
    identity-keyed cache, :class:`~megatron.model.sepllm.mask_cache.TensorIdentityCache`, over the flag tensors).

    Looked up when the op runs (inside the opaque custom op under torch.compile, so no trace ever bakes in a
    previous micro-batch's metadata): every layer of a micro-batch passes the same flag tensors, so the metadata
    is built once per micro-batch; several micro-batches are kept for backwards that run after the next forward.
    """

    def __init__(self, size: int = 4):
        self.cache = TensorIdentityCache(max_anchors=size)

    def get(self, sep_flags: torch.Tensor, init_start: torch.Tensor, n_init: int) -> SepMetadata:
        return self.cache.get((sep_flags, init_start), n_init,
                              lambda: build_sep_metadata(sep_flags, init_start, n_init))

    def clear(self) -> None:
        self.cache.clear()


_META_CACHE = MetadataCache()


def _metadata(sep_flags: torch.Tensor, init_start: torch.Tensor, n_init: int) -> SepMetadata:
    """The metadata of the op's ``meta=None`` paths: from ``_META_CACHE``, except while a CUDA graph is captured.
    The cache would return an entry built before the capture (same flag tensor, same version), and the graph
    would read those tensors on every replay instead of the flags copied in for it; so a capture builds the
    metadata inside the graph (once per call: pass ``meta`` built once in the captured region to share it)."""
    if sep_flags.is_cuda and torch.cuda.is_current_stream_capturing():
        return build_sep_metadata(sep_flags, init_start, n_init)
    return _META_CACHE.get(sep_flags, init_start, n_init)


# Variants that take the flags instead of the metadata (what ``sep_attention(meta=None)`` records under
# torch.compile): the metadata comes from ``_META_CACHE`` when the op runs, in forward and in backward.
@torch.library.custom_op("sepllm_kernel::sep_attn_fwd_flags", mutates_args=())
def sep_attn_fwd_flags_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep_flags: torch.Tensor,
                          init_start: torch.Tensor, n_init: int, lo_off: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    meta = _metadata(sep_flags, init_start, n_init)
    return sep_forward(q, k, v, meta.positions, meta.cum, lo_off, scale)


@sep_attn_fwd_flags_op.register_fake
def _sep_attn_fwd_flags_fake(q, k, v, sep_flags, init_start, n_init, lo_off, scale):
    return _like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sepllm_kernel::sep_attn_bwd_flags", mutates_args=())
def sep_attn_bwd_flags_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, sep_flags: torch.Tensor, init_start: torch.Tensor,
                          n_init: int, lo_off: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = _metadata(sep_flags, init_start, n_init)
    return sep_backward(dout, q, k, v, out, lse, meta.positions, meta.cum, lo_off, scale)


@sep_attn_bwd_flags_op.register_fake
def _sep_attn_bwd_flags_fake(dout, q, k, v, out, lse, sep_flags, init_start, n_init, lo_off, scale):
    return _like(q), _like(k), _like(v)


def _flags_op_setup_context(ctx, inputs, output):
    q, k, v, sep_flags, init_start, n_init, lo_off, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sep_flags, init_start)
    ctx.n_init, ctx.lo_off, ctx.scale = n_init, lo_off, scale


def _flags_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, sep_flags, init_start = ctx.saved_tensors
    dq, dk, dv = sep_attn_bwd_flags_op(dout, q, k, v, out, lse, sep_flags, init_start, ctx.n_init, ctx.lo_off,
                                       ctx.scale)
    return dq, dk, dv, None, None, None, None, None


sep_attn_fwd_flags_op.register_autograd(_flags_op_backward, setup_context=_flags_op_setup_context)


def _check_inputs(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal):
    grouped_ok = (q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and k.shape[0] == q.shape[0]
                  and k.shape[2:] == q.shape[2:] and k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0)
    if not grouped_ok:
        raise ValueError(f"bad shapes: q must be [B, H, S, D] and k, v [B, H_kv, S, D] with H_kv dividing H, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
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


def launch_constants(window: int, dim: int, exclude_diagonal: bool = True,
                     scale: Optional[float] = None) -> tuple[int, float]:
    """``(lo_off, scale)`` of :func:`sep_forward` / :func:`sep_backward` for a window and head dim: the band
    reaches ``lo_off = window - E`` keys back; the softmax scale defaults to ``1 / sqrt(dim)``."""
    return window - int(exclude_diagonal), 1.0 / math.sqrt(dim) if scale is None else float(scale)


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

    q: ``[B, H, S, D]``, k and v: ``[B, H_kv, S, D]`` with ``H_kv`` dividing ``H`` (grouped-query attention: query
    head ``h`` reads key/value head ``h // (H / H_kv)``); bf16/fp16 (fp32 uses TF32 dot products on CUDA); returns
    ``[B, H, S, D]``.
    ``meta`` is :func:`build_sep_metadata` of ``(sep_flags, init_start, n_init)``. Leave it None to let the op
    build it once per micro-batch itself (cached on the identity of ``sep_flags``/``init_start`` when the op
    runs; see :class:`MetadataCache`): under torch.compile that is the only safe choice, because metadata
    looked up from a Python-side cache while tracing is baked into the graph and reused for later micro-batches.
    On CUDA this runs the Triton kernel, elsewhere the dense reference (``O(S^2)`` memory, for tests and small
    CPU runs).
    """
    _check_inputs(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal)
    bsz, heads, seq, dim = q.shape
    lo_off, scale = launch_constants(window, dim, exclude_diagonal, scale)
    if not q.is_cuda:
        return sep_attention_reference(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal, scale)
    if lo_off >= seq - 1:
        # Every causal key lies in the window: this layer is full causal attention.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != heads)
    # The Triton kernels index one key/value head per query head: grouped K/V are repeated for them here.
    k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
    if dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"sep_attention supports head dims {_SUPPORTED_HEAD_DIMS} on CUDA, got D={dim}")
    if not _triton_available():
        raise RuntimeError("sep_attention on CUDA needs triton (pip package 'triton'), which is not importable")
    if torch.compiler.is_compiling():
        if meta is None:
            return sep_attn_fwd_flags_op(q, k, v, sep_flags, init_start, n_init, lo_off, scale)[0]
        return sep_attn_fwd_op(q, k, v, meta.positions, meta.cum, lo_off, scale)[0]
    if meta is None:
        meta = _metadata(sep_flags, init_start, n_init)
    return _SepAttentionFn.apply(q, k, v, meta.positions, meta.cum, lo_off, scale)

