"""How every tensor of a checkpoint is split across tensor-parallel (TP) ranks: one table, one merge, one split.

The HF export and the weights-only resume merge a checkpoint's TP shards with :func:`merge_layer`; the reshard tool
(``tools/ckpts/reshard.py``) and the resume into another TP size split with :func:`split_layer`. Both read the rule
of a tensor from :func:`tensor_rule`, so they cannot disagree; ``tests/ckpts_tp`` checks the table against the
``partition_dim`` flags the mpu layers put on a built model.

Rules (tensor names are a pipeline layer's, in the model's module names, megatron/model/neox_names.py):

========================  ===============================================================================
kind                      tensors
========================  ===============================================================================
``column`` (dim 0)        ``attention.query_key_value`` with multi-head attention (rows ``[heads, 3, d]``:
                          a contiguous block of rows is whole heads), ``mlp.dense_h_to_4h``
``fused`` (dim 0)         ``attention.query_key_value`` with ``num_kv_heads`` (``[q | k | v]``, each split by
                          heads on its own, so a rank holds ``[q_r | k_r | v_r]``) and the gated
                          ``mlp.linear1`` (``[up | gate]``, a rank holds ``[up_r | gate_r]``)
``row`` (dim 1)           ``attention.dense.weight``, ``mlp.dense_4h_to_h.weight``, ``mlp.linear2.weight``
``vocab`` (dim 0)         ``word_embeddings.weight``, ``final_linear.weight`` (the padded vocabulary)
``summed``                the row-parallel biases of a checkpoint GPT-NeoX wrote with the parallel (GPT-J)
                          residual: its block adds every rank's copy before the one all-reduce, so its
                          model's bias is the sum over ranks; merged by summing, split by dividing
``replicated``            the norms, ``position_embeddings``, the row-parallel biases of this trainer's
                          checkpoints (its ``RowParallelLinear`` adds the bias once, after the all-reduce, with
                          either residual: megatron/mpu/layers.py) and of GPT-NeoX's with the sequential residual
========================  ===============================================================================

GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` (ea7aefd8) merges the same way except that it sums the
row-parallel biases with both residuals (``ROW_PARALLEL_BIAS_KEYS``); with the sequential residual GPT-NeoX's
``RowParallelLinear`` returns the bias for ``bias_dropout_add`` to add once after the all-reduce, so the sum is
``tp`` times the bias its model adds: the rule here takes it once. Which implementation wrote a checkpoint is
told by its ``configs/resolved_config.yml`` (only this trainer writes one: :func:`written_by_gpt_neox`); the
split always writes this trainer's form. Replicated copies are taken from rank 0 when every rank holds the same
bits, and averaged (GPT-NeoX's rule for norms) when they differ.

A merge followed by a split into the same size gives back the same bits for power-of-two sizes (``summed``
multiplies and divides by the size). Vocabulary padding (``make_vocab_size_divisible_by`` x TP) is changed by
:func:`resize_vocab`: rows past the new size are dropped, new rows are zeros.
"""
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.checkpoint_io import CheckpointError

REPLICATED, COLUMN, FUSED, ROW, VOCAB, SUMMED = "replicated", "column", "fused", "row", "vocab", "summed"
PARTITION_DIM = {COLUMN: 0, FUSED: 0, VOCAB: 0, ROW: 1}

_NORM = re.compile(r"^(input_layernorm|post_attention_layernorm|norm)\.(weight|bias|scale|offset)$")
_ROW_WEIGHTS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight", "mlp.linear2.weight")
_ROW_BIASES = ("attention.dense.bias", "mlp.dense_4h_to_h.bias", "mlp.linear2.bias")
_COLUMN = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
_QKV = ("attention.query_key_value.weight", "attention.query_key_value.bias")
_GATED = ("mlp.linear1.weight", "mlp.linear1.bias")
_VOCAB = ("word_embeddings.weight", "final_linear.weight")


@dataclass(frozen=True)
class Rule:
    kind: str
    parts: Tuple[int, ...] = ()  # ``fused``: the full tensor's sub-tensors along dim 0 (sizes sum to its rows)

    @property
    def partition_dim(self) -> Optional[int]:
        """The dim a rank's shard is cut from (``None``: every rank holds the whole tensor)."""
        return PARTITION_DIM.get(self.kind)


def written_by_gpt_neox(ckpt_dir: str) -> bool:
    """A checkpoint without this trainer's resolved config is GPT-NeoX's (megatron/checkpoint_neox.py)."""
    from megatron.checkpoint_layout import RESOLVED_CONFIG

    return not os.path.isfile(os.path.join(ckpt_dir, RESOLVED_CONFIG))


def tensor_rule(name: str, args, gpt_neox: bool = False) -> Rule:
    """The rule of tensor ``name`` of a pipeline layer for the model ``args`` describes (a resolved config), in a
    checkpoint this trainer wrote, or GPT-NeoX (``gpt_neox``). An unknown name is refused."""
    if _NORM.match(name) or name == "position_embeddings.weight":
        return Rule(REPLICATED)
    if name in _VOCAB:
        return Rule(VOCAB)
    if name in _ROW_WEIGHTS:
        return Rule(ROW)
    if name in _ROW_BIASES:
        return Rule(SUMMED if gpt_neox and args.gpt_j_residual else REPLICATED)
    if name in _COLUMN:
        return Rule(COLUMN)
    if name in _QKV:
        heads, kv = int(args.num_attention_heads), int(args.num_kv_heads)
        if heads == kv:
            return Rule(COLUMN)
        d = int(args.hidden_size) // heads
        return Rule(FUSED, (heads * d, kv * d, kv * d))
    if name in _GATED:
        ffn = int(args.mlp_inner_size)
        return Rule(FUSED, (ffn, ffn))
    raise CheckpointError(f"tensor '{name}' has no tensor-parallel rule (megatron/checkpoint_partition.py): "
                          "a parameter the table does not know cannot be merged or split")


def _segments(rule: Rule, size: int, name: str) -> Tuple[int, ...]:
    if rule.kind != FUSED:
        return (size,)
    if sum(rule.parts) != size:
        raise CheckpointError(f"tensor '{name}' has {size} rows, the config implies {sum(rule.parts)} "
                              f"({' + '.join(map(str, rule.parts))})")
    return rule.parts


def _identical(parts: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(parts[0], p) for p in parts[1:])


def merge(parts: Sequence[torch.Tensor], rule: Rule, name: str) -> torch.Tensor:
    """The full tensor from its TP shards (``parts`` in rank order). The segment arithmetic is the mpu layers'
    own (megatron/mpu/partition.py), so a checkpoint is cut exactly as the layers cut their weights."""
    from megatron.mpu import partition

    tp = len(parts)
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise CheckpointError(f"tensor '{name}': its {tp} tensor-parallel shards have different shapes "
                              f"{sorted(shapes)}")
    if tp == 1:
        return parts[0]
    if rule.kind == REPLICATED:
        return parts[0] if _identical(parts) else sum(p.double() for p in parts).div(tp).to(parts[0].dtype)
    if rule.kind == SUMMED:
        return parts[0] * tp if _identical(parts) else sum(parts[1:], parts[0])
    dim = rule.partition_dim
    segments = _segments(rule, parts[0].shape[dim] * tp, name)
    try:
        return partition.merge(list(parts), dim, segments)
    except ValueError as err:
        raise CheckpointError(f"tensor '{name}': {err}") from None


def split(full: torch.Tensor, rule: Rule, tp: int, name: str) -> List[torch.Tensor]:
    """The ``tp`` shards of ``full`` (rank order); the inverse of :func:`merge`."""
    from megatron.mpu import partition

    if tp == 1:
        return [full]
    if rule.kind == REPLICATED:
        return [full.clone() for _ in range(tp)]
    if rule.kind == SUMMED:
        share = full / tp
        return [share.clone() for _ in range(tp)]
    dim = rule.partition_dim
    segments = _segments(rule, full.shape[dim], name)
    try:
        return [partition.shard(full, dim, segments, tp, rank) for rank in range(tp)]
    except ValueError as err:
        raise CheckpointError(f"tensor '{name}': {err}") from None


def resize_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary tensor padded to ``rows``: extra padding rows dropped, missing ones appended as zeros."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])], dim=0)


def merge_layer(states: List[Dict[str, torch.Tensor]], args, where: str = "", gpt_neox: bool = False
                ) -> Dict[str, torch.Tensor]:
    """One pipeline layer's full state dict from its TP shards' (module names; every shard has the same keys);
    ``gpt_neox``: the shards are GPT-NeoX's (:func:`tensor_rule`)."""
    keys = set(states[0])
    for rank, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            odd = sorted(keys ^ set(state))
            raise CheckpointError(f"{where}: tensor-parallel rank {rank} holds other tensors than rank 0 ({odd[:4]})")
    out = {}
    for name in states[0]:
        rule = tensor_rule(name, args, gpt_neox)
        try:
            out[name] = merge([s[name] for s in states], rule, name)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}" if where else str(err)) from None
    return out


def split_layer(state: Dict[str, torch.Tensor], args, tp: int, vocab_rows: Optional[int] = None,
                where: str = "") -> List[Dict[str, torch.Tensor]]:
    """The ``tp`` shards of one pipeline layer's full state dict; vocabulary tensors are first padded to
    ``vocab_rows`` (the target's ``padded_vocab_size``) when it is given."""
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, full in state.items():
        rule = tensor_rule(name, args)
        if rule.kind == VOCAB and vocab_rows is not None:
            full = resize_vocab(full, vocab_rows)
        try:
            shards = split(full, rule, tp, name)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}" if where else str(err)) from None
        for rank, shard in enumerate(shards):
            out[rank][name] = shard
    return out


def _suffix_pattern(name: str) -> str:
    """A regex for tensor ``name`` of any layer, under any prefix DeepSpeed's parameter names carry."""
    return r"^(.*\.)?" + re.escape(name) + "$"


def universal_checkpoint_info(args, param_names: Sequence[str]) -> dict:
    """The table as DeepSpeed's universal checkpoint reads it (the ``universal_checkpoint_info`` client-state key that
    ``deepspeed.checkpoint.ds_to_universal`` merges the ZeRO fragments by and ``load_universal`` splits them by, so
    the optimizer state moves into another tensor-parallel size too). Column-parallel tensors are its default
    (dim 0); the vocabulary keeps its padded rows (``original_vocab_size`` is the padded size: no row is
    dropped, rows are added as zeros where the new size pads more). Only patterns that match one of
    ``param_names`` (the engine's parameter names) are listed: the converter refuses unused ones."""
    from deepspeed.checkpoint import constants as ds

    tp = int(args.model_parallel_size)
    norms = r"^(.*\.)?(input_layernorm|post_attention_layernorm|norm)\.(weight|bias|scale|offset)$"
    replicated = [norms, _suffix_pattern("position_embeddings.weight")]
    replicated += [_suffix_pattern(n) for n in _ROW_BIASES if tensor_rule(n, args).kind == REPLICATED]
    subs, widths = [], {}
    for name in _QKV + _GATED:
        rule = tensor_rule(name, args)
        if rule.kind != FUSED:
            continue
        pattern = _suffix_pattern(name)
        shape = (tuple(rule.parts), int(args.hidden_size)) if name.endswith(".weight") else (tuple(rule.parts),)
        subs.append({"patterns": [pattern], "shape": shape, "partition_dim": 0})
        widths[pattern] = [[size // tp] * tp for size in rule.parts]
    def used(patterns):
        return [p for p in patterns if any(re.match(p, n) for n in param_names)]

    subs = [s for s in subs if used(s["patterns"])]
    return {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            ds.TP_REPLICATED_PARAMETER_PATTERNS: used(replicated),
            ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: used([_suffix_pattern(n) for n in _ROW_WEIGHTS]),
            ds.VOCABULARY_PARAMETER_PATTERNS: used([_suffix_pattern(n) for n in _VOCAB]),
            ds.ORIGINAL_VOCAB_SIZE: int(args.padded_vocab_size),
            ds.PARAMETER_WITH_SUB_PARAMS: subs,
            ds.SUB_PARAM_SHARD_WIDTHS: {p: w for p, w in widths.items() if any(p in s["patterns"] for s in subs)}}
