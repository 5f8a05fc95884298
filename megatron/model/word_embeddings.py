"""Pipeline layer 0: token (+ learned / BiPE position) embeddings and the per-micro-batch attention metadata."""
from typing import Optional, Tuple

import torch
from torch import nn

from megatron import mpu


def pack_meta(hidden: torch.Tensor, meta) -> Tuple[torch.Tensor, ...]:
    """The tuple passed between pipeline layers: ``(hidden, rope_pos, init_start, sep_flags)``.

    ``sep_flags`` (bool) goes last on purpose: DeepSpeed's pipeline engine casts the last activation of a
    ``GPT2ModelPipe`` to half for the stage-to-stage send, back to bool on receipt, and leaves it out of the
    gradient exchange (its attention-mask convention). A bool survives that round trip; int64 ids would not.
    """
    return hidden, meta.rope_pos, meta.init_start, meta.sep_flags


def unpack_meta(args: Tuple[torch.Tensor, ...]):
    """Inverse of :func:`pack_meta`: ``(hidden, AttnMeta)``."""
    from megatron.model.sepllm.meta import AttnMeta

    if not isinstance(args, (tuple, list)) or len(args) != 4:
        raise ValueError("transformer layers expect the pipeline tuple (hidden, rope_pos, init_start, sep_flags); "
                         f"got {type(args).__name__} of length {len(args) if isinstance(args, (tuple, list)) else 1}")
    hidden, rope_pos, init_start, sep_flags = args
    return hidden, AttnMeta(rope_pos=rope_pos, sep_flags=sep_flags, init_start=init_start)


class Embedding(nn.Module):
    """Word embeddings, optional learned absolute (``pos_emb: learned``) or BiPE intra-segment positions, dropout."""

    def __init__(self, neox_args, hidden_size: int, vocab_size: int, max_sequence_length: int,
                 embedding_dropout_prob: float, init_method):
        super().__init__()
        self.neox_args = neox_args
        self.hidden_size = hidden_size
        self.word_embeddings = mpu.VocabParallelEmbedding(neox_args, vocab_size, hidden_size,
                                                          init_method=init_method)
        self.use_bipe = bool(neox_args.USE_BiPE)
        self.use_learned_pos = neox_args.pos_emb == "learned"
        if self.use_bipe or self.use_learned_pos:
            # BiPE always adds a learned table indexed by intra-segment positions, whatever pos_emb is.
            self.position_embeddings = nn.Embedding(max_sequence_length, hidden_size)
            init_method(self.position_embeddings.weight)
        self.max_sequence_length = max_sequence_length
        self.embedding_dropout = nn.Dropout(embedding_dropout_prob)

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def embed(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        if self.use_bipe:
            from megatron.model.sepllm.rule import bipe_positions

            intra, _ = bipe_positions(input_ids, self.neox_args.BiPE_seps)
            hidden = hidden + self.position_embeddings(intra)
        elif self.use_learned_pos:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = hidden + self.position_embeddings(position_ids)
        return self.embedding_dropout(hidden)


class EmbeddingPipe(Embedding):
    """Layer 0: ``(input_ids, position_ids[, attention_mask])`` -> ``(hidden, rope_pos, init_start, sep_flags)``.

    The attention mask, when given, is ignored: every attention variant is causal by construction and reads
    the SepLLM metadata, which is built here once per micro-batch.
    """

    def forward(self, args):
        from megatron.model.sepllm.meta import build_attn_meta

        if torch.is_tensor(args):
            input_ids, position_ids = args, None
        elif isinstance(args, (tuple, list)) and len(args) in (1, 2, 3):
            input_ids = args[0]
            position_ids = args[1] if len(args) > 1 else None
        else:
            raise ValueError("GPT2ModelPipe input must be (input_ids, position_ids[, attention_mask]); "
                             f"got {type(args).__name__} of length {len(args)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        meta = build_attn_meta(input_ids, position_ids, self.neox_args)
        return pack_meta(self.embed(input_ids, position_ids), meta)
