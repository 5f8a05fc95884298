"""Per-micro-batch attention metadata, built once per forward and shared by every layer.

The pipeline carries these tensors between stages next to the hidden states, so the SepLLM rule never
needs a ``B x S x S`` mask on the fast path and no layer recomputes separator flags.
"""
from typing import NamedTuple, Optional, Sequence

import torch

from megatron.model.sepllm.rule import adaptive_init_start, bipe_positions, keeps_separators, separator_flags


class AttnMeta(NamedTuple):
    """Tensors every attention layer of one micro-batch needs (see docs/internals.md)."""

    rope_pos: torch.Tensor  # [B, S] int64: positions for rotary / ALiBi (absolute or BiPE inter-segment)
    sep_flags: torch.Tensor  # [B, S] bool: the token at this key position is a separator
    init_start: torch.Tensor  # [B] int64: first initial-token position of each row


def token_flags(input_ids: torch.Tensor, token_ids: Optional[Sequence[int]]) -> torch.Tensor:
    """Boolean mask of positions whose id is in ``token_ids``; ``None``/``[-1]`` means no such token."""
    return separator_flags(input_ids, token_ids)


def build_attn_meta(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], neox_args) -> AttnMeta:
    """Builds the :class:`AttnMeta` of one micro-batch from its token ids.

    ``position_ids`` (absolute positions) are used for rotary/ALiBi unless BiPE replaces them with
    inter-segment ids; when ``None`` they default to ``0..S-1`` for every row.
    """
    bsz, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(bsz, seq)
    rope_pos = position_ids
    if neox_args.USE_BiPE:
        _, rope_pos = bipe_positions(input_ids, neox_args.BiPE_seps)
    variant = neox_args.attention_variant
    if keeps_separators(variant):
        sep_flags = token_flags(input_ids, neox_args.separator_token_ids)
    else:
        sep_flags = torch.zeros_like(input_ids, dtype=torch.bool)
    if variant != "full" and neox_args.BATCH_ADAPTIVE_INIT_POS:
        init_start = adaptive_init_start(input_ids, neox_args.PADDING_ID)
    else:
        init_start = torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
    return AttnMeta(rope_pos.long(), sep_flags, init_start)
