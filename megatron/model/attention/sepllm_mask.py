"""Mask-based SepLLM attention: dense scores with the SepLLM boolean mask (runs everywhere, CPU too).

The mask of a layer is built from the micro-batch's ``AttnMeta`` by the single rule module
(:mod:`megatron.model.sepllm.rule`) once per micro-batch and window, and shared by every layer with
that window. The attention itself is SDPA with a boolean mask (an additive float mask when ALiBi is on),
which has a backward on CPU and uses the memory-efficient kernel on GPU; K/V with fewer heads than Q
(grouped-query attention) go in as they are (SDPA's ``enable_gqa``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.sepllm import rule
from megatron.model.sepllm.mask_cache import TensorIdentityCache
from megatron.model.positional_embeddings import alibi_bias
from megatron.model.sepllm.settings import LayerSettings, local_alibi_slopes

# One cache for all mask-based layers of the process: layers of a forward share their masks.
_MASKS = TensorIdentityCache(max_anchors=1)


class SepLLMMaskAttention(nn.Module):
    """``"sepllm_mask"``: all mode flags False. Implements the CoreAttention interface."""

    #: StreamingLLM overrides this: separators never count, only initial tokens and the window.
    use_separators = True

    def __init__(self, neox_args, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.settings = LayerSettings.from_args(neox_args, layer_number)
        self._slopes = None

    # -- pieces shared with the SA variant ------------------------------------------------------------
    def allowed_mask(self, meta) -> torch.Tensor:
        """``[B, 1, S, S]`` bool allowed-mask of this layer for the micro-batch described by ``meta``."""
        s = self.settings
        sep_flags = meta.sep_flags if self.use_separators else torch.zeros_like(meta.sep_flags)

        def build():
            return rule.dense_mask(sep_flags, meta.init_start, s.num_init, s.window,
                                   s.exclude_diagonal).unsqueeze(1)

        key = ("mask", self.use_separators, s.window, s.num_init, s.exclude_diagonal)
        return _MASKS.get((meta.sep_flags, meta.init_start), key, build)

    def alibi_slopes(self, q: torch.Tensor):
        """This rank's ALiBi slopes ``[H]`` (cached on the module), or None with rotary."""
        if not self.settings.use_alibi:
            return None
        if self._slopes is None or self._slopes.device != q.device:
            self._slopes = local_alibi_slopes(self.settings.num_heads, q.shape[1], q.device)
        return self._slopes

    def bias(self, q: torch.Tensor, meta):
        """Float32 ALiBi bias ``[B, H, S, S]`` (plain or BiPE via ``meta.rope_pos``), or None."""
        slopes = self.alibi_slopes(q)
        return None if slopes is None else alibi_bias(meta.rope_pos, slopes)

    def dropout_p(self) -> float:
        return self.settings.attention_dropout if self.training else 0.0

    # -- CoreAttention ---------------------------------------------------------------------------------
    def forward(self, q, k, v, meta):
        mask = self.allowed_mask(meta)
        bias = self.bias(q, meta)
        if bias is not None:
            # Additive mask: ALiBi where allowed, -inf elsewhere (the diagonal is always allowed).
            mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p(),
                                              enable_gqa=k.shape[1] != q.shape[1])
