"""Full causal attention through ``F.scaled_dot_product_attention`` (flash / cuDNN / efficient on GPU), optionally
limited to Mistral's sliding window."""
import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.model.positional_embeddings import alibi_bias
from megatron.model.sepllm import rule
from megatron.model.sepllm.settings import local_alibi_slopes

# The window mask depends on the shapes only: one copy for every layer (the newest is kept).
_WINDOW_MASK: dict = {}


def _window_mask(seq_q: int, seq_k: int, width: int, device) -> torch.Tensor:
    key = (seq_q, seq_k, width, str(device))
    mask = _WINDOW_MASK.get(key)
    if mask is None:
        mask = rule.sliding_window_mask(seq_q, seq_k, width, device)
        _WINDOW_MASK.clear()
        _WINDOW_MASK[key] = mask
    return mask


class FullAttention(nn.Module):
    """Vanilla causal attention implementing the core attention interface of docs/internals.md.

    ``forward(q, k, v, meta)`` takes ``[B, H, S, D]`` tensors with rotary already applied and returns
    ``[B, H, S, D]``; ``k`` and ``v`` may have fewer heads (grouped-query attention, SDPA's ``enable_gqa``: no
    copy per query head). With ``pos_emb: alibi`` the bias ``-slope_h * (pos[q] - pos[k])`` at ``meta.rope_pos``
    goes in as a float mask that also carries causality (SDPA takes either a mask or ``is_causal``). With
    ``sliding_window_width`` the causal mask is the rule's window mask (:func:`rule.sliding_window_mask`).
    """

    def __init__(self, neox_args, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.dropout_p = float(neox_args.attention_dropout)
        self.use_alibi = neox_args.pos_emb == "alibi"
        self.sliding_window = neox_args.sliding_window_width
        if self.use_alibi:
            heads = int(neox_args.num_attention_heads)
            local = mpu.divide(heads, mpu.get_model_parallel_world_size(), "num_attention_heads")
            # This rank's heads' slopes (all of them at one model-parallel rank).
            self.register_buffer("alibi_slopes", local_alibi_slopes(heads, local, "cpu"), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        if self.sliding_window is not None and self.sliding_window < seq_k - 1:
            allowed = _window_mask(seq_q, seq_k, self.sliding_window, q.device)
        elif not self.use_alibi:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        else:
            allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
        mask = allowed
        if self.use_alibi:
            bias = alibi_bias(meta.rope_pos, self.alibi_slopes)
            mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
