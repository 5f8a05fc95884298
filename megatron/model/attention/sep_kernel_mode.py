"""The ``sep_kernel`` mode (``USE_SEP_ATTN_KERNEL_ACCELERATOR: True``): one SepLLM rule, four backends.

The ``mask_mod`` evaluates the SepLLM rule from per-token separator flags and per-row initial positions
(:func:`megatron.model.sepllm.rule.make_mask_mod`), with this layer's window bound when the BlockMask is
built: no ``B x S x S`` tensor and no closure that late-binds another layer's mask. ALiBi (plain or
BiPE inter-segment) enters through a ``score_mod`` reading ``meta.rope_pos``, again without a dense bias.

Dispatch, per call:
1. CUDA, rotary (no ALiBi) and ``megatron.model.sepllm.kernel`` present: the fast Sep-Attention kernel.
2. CUDA otherwise (ALiBi / BiPE-ALiBi, or no kernel package): ``torch.compile``-d FlexAttention with a BlockMask shared by layers of equal window
   (``RECOMPILE_SEP_ATTN_KERNEL`` compiles the BlockMask construction too).
3. CPU without gradients: eager FlexAttention (tests compare it with the rule).
4. CPU with gradients (FlexAttention has no CPU backward): the mask-based path, announced once.
Attention dropout is not applied on the Flex/kernel paths (as in the reference). K/V with fewer heads than Q
(grouped-query attention) reach every path as they are: FlexAttention's ``enable_gqa``, the kernel's own grouping.
"""
import warnings

import torch

from megatron.model.attention.sepllm_mask import SepLLMMaskAttention
from megatron.model.sepllm import rule
from megatron.model.sepllm.mask_cache import TensorIdentityCache

_BLOCK_MASKS = TensorIdentityCache(max_anchors=1)
_COMPILED_FLEX = None
_CPU_BACKWARD_NOTICE_SHOWN = False


def _flex_functions():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return create_block_mask, flex_attention


def _compiled_flex():
    """FlexAttention compiled once per process (static shapes: one compile per sequence length)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _, flex_attention = _flex_functions()
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


try:  # imported here, not on first use: an import inside a traced layer would break the torch.compile graph
    from megatron.model.sepllm import kernel as _KERNEL
except ImportError as err:
    # Only the kernel package itself may be missing; a broken import inside it must surface.
    if getattr(err, "name", None) != "megatron.model.sepllm.kernel":
        raise
    _KERNEL = None


def fast_kernel():
    """The Sep-Attention kernel package ``megatron.model.sepllm.kernel`` if present, else None.

    Its ``sep_attention(q, k, v, sep_flags, init_start, n_init, window, exclude_diagonal, meta=None)`` builds
    its metadata once per micro-batch itself (cached on the identity of the flag tensors when the op runs,
    which stays correct under torch.compile); it has no ALiBi support.
    """
    return _KERNEL


def _configure_kernel(neox_args):
    """The kernel's launch settings from the resolved config (process-wide: see kernel/settings.py), with one
    notice per process when experiment variables overrode the config."""
    from megatron.model.sepllm.kernel import settings

    new = settings.KernelSettings.from_args(neox_args)
    if new != settings.ACTIVE and neox_args.sep_attn_kernel_env and (neox_args.rank or 0) == 0:
        print(f"> Sep-Attention kernel: {', '.join('$' + v for v in neox_args.sep_attn_kernel_env)} override the "
              f"config (blocks {new.blocks or 'tuned table'}, gather {new.gather}, fast launch {new.fast_launch})",
              flush=True)
    settings.configure(new)


def _notice_cpu_backward():
    global _CPU_BACKWARD_NOTICE_SHOWN
    if not _CPU_BACKWARD_NOTICE_SHOWN:
        _CPU_BACKWARD_NOTICE_SHOWN = True
        print("> USE_SEP_ATTN_KERNEL_ACCELERATOR: FlexAttention has no backward on CPU; training on CPU "
              "uses the logically identical mask-based SepLLM attention", flush=True)


def make_alibi_score_mod(slopes: torch.Tensor, rope_pos: torch.Tensor):
    """``score_mod`` adding ``-slope_h * (pos[q] - pos[k])``; tensors bound explicitly at creation."""

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (rope_pos[b, q_idx] - rope_pos[b, kv_idx]).to(score.dtype)
        return score - slopes[h].to(score.dtype) * dist

    return score_mod


class SepKernelModeAttention(SepLLMMaskAttention):
    """``"sep_kernel"``: the SepLLM rule run by the fast kernel, compiled or eager FlexAttention, or the mask path
    (the dispatch in the module docstring)."""

    def __init__(self, neox_args, layer_number: int):
        super().__init__(neox_args, layer_number)
        self.block_size = int(neox_args._DEFAULT_SPARSE_BLOCK_SIZE)
        self.compile_block_mask = bool(neox_args.RECOMPILE_SEP_ATTN_KERNEL)
        _configure_kernel(neox_args)

    def block_mask(self, meta, q_len: int, kv_len: int):
        """This layer's BlockMask for the micro-batch (shared with every layer of the same window)."""
        s = self.settings
        create_block_mask, _ = _flex_functions()

        def build():
            mask_mod = rule.make_mask_mod(meta.sep_flags, meta.init_start, s.num_init, s.window,
                                          s.exclude_diagonal)
            return create_block_mask(mask_mod, meta.sep_flags.shape[0], None, q_len, kv_len,
                                     device=meta.sep_flags.device, BLOCK_SIZE=self.block_size,
                                     _compile=self.compile_block_mask)

        key = ("block", s.window, s.num_init, s.exclude_diagonal, q_len, kv_len, self.block_size)
        return _BLOCK_MASKS.get((meta.sep_flags, meta.init_start), key, build)

    def score_mod(self, q, meta):
        """ALiBi ``score_mod`` (plain or BiPE, from ``meta.rope_pos``), or None with rotary."""
        slopes = self.alibi_slopes(q)
        return None if slopes is None else make_alibi_score_mod(slopes, meta.rope_pos)

    def forward(self, q, k, v, meta):
        s = self.settings
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.is_cuda:
            kernel = fast_kernel()
            if kernel is not None and not s.use_alibi:
                return kernel.sep_attention(q, k, v, meta.sep_flags, meta.init_start, s.num_init, s.window,
                                            s.exclude_diagonal, meta=None)
            flex = _compiled_flex()
        elif needs_grad:
            _notice_cpu_backward()
            return super().forward(q, k, v, meta)
        else:
            _, flex = _flex_functions()
        block_mask = self.block_mask(meta, q.shape[-2], k.shape[-2])
        with warnings.catch_warnings():
            # Eager CPU flex warns that it is unfused; that is expected on the CPU test path.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex(q, k, v, score_mod=self.score_mod(q, meta), block_mask=block_mask,
                        enable_gqa=k.shape[1] != q.shape[1])
