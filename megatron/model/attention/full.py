"""Full causal attention through ``F.scaled_dot_product_attention`` (flash / cuDNN / efficient on GPU)."""
import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.positional_embeddings import alibi_bias, alibi_slopes


class FullAttention(nn.Module):
    """Vanilla causal attention implementing the core attention interface of docs/internals.md.

    ``forward(q, k, v, meta)`` takes ``[B, H, S, D]`` tensors with rotary already applied and returns
    ``[B, H, S, D]``. With ``pos_emb: alibi`` the bias ``-slope_h * (pos[q] - pos[k])`` at ``meta.rope_pos``
    goes in as a float mask that also carries causality (SDPA takes either a mask or ``is_causal``).
    """

    def __init__(self, neox_args, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.dropout_p = float(neox_args.attention_dropout)
        self.use_alibi = neox_args.pos_emb == "alibi"
        if self.use_alibi:
            self.register_buffer("alibi_slopes",
                                 torch.tensor(alibi_slopes(int(neox_args.num_attention_heads))),
                                 persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        if not self.use_alibi:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        bias = alibi_bias(meta.rope_pos, self.alibi_slopes)
        causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
        bias = bias.masked_fill(~causal, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
