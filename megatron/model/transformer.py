"""GPT-NeoX transformer layer: fused QKV (per head, or GPT-NeoX's grouped-query layout), partial rotary, pluggable
core attention, plain or gated (swiglu) MLP, parallel (GPT-J) or sequential residual. Tensors stay batch-first
``[B, S, H]`` end to end.
"""
import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.model import neox_names
from megatron.model.attention import build_core_attention
from megatron.model.norms import get_norm
from megatron.model.positional_embeddings import RotaryEmbedding, apply_rotary_pos_emb
from megatron.model.word_embeddings import unpack_meta
from megatron.neox_arguments.model_args import ACTIVATIONS, GATED_ACTIVATIONS


def get_activation(neox_args):
    """Elementwise MLP activation (of the gate, for a gated one). ``gelu`` is the exact (erf) GELU that HF's
    GPT-NeoX uses."""
    name = neox_args.activation
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish", "swiglu"):
        return F.silu
    raise ValueError(f"activation {name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")


def _rotary_fn(neox_args):
    """The rotary implementation: the Triton kernel when ``rope_fusion`` is set (CUDA, eager), else PyTorch."""
    if neox_args.rope_fusion and not neox_args.torch_compile:
        from megatron.fused_kernels import fused_rotary_available, fused_apply_rotary

        if fused_rotary_available():
            return fused_apply_rotary
    return None


class ParallelSelfAttention(nn.Module):
    """Fused QKV projection, rotary, core attention, output dense.

    The QKV rows follow GPT-NeoX's checkpoints: per head ``[q_h; k_h; v_h]`` (``[heads, 3, d]``) for multi-head
    attention; with fewer key/value heads (``num_kv_heads``) all query rows, then all key rows, then all value rows
    (``[heads * d | kv_heads * d | kv_heads * d]``, GPT-NeoX's ``gqa_project``). K and V reach the core attention
    with ``kv_heads`` heads; query head ``h`` reads key/value head ``h // (heads / kv_heads)``.
    """

    def __init__(self, neox_args, init_method, output_layer_init_method, layer_number: int):
        super().__init__()
        self.hidden_size = int(neox_args.hidden_size)
        self.num_heads = int(neox_args.num_attention_heads)
        self.num_kv_heads = int(neox_args.num_kv_heads)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} does not divide num_attention_heads={self.num_heads}")
        self.head_dim = self.hidden_size // self.num_heads
        self.grouped = self.num_kv_heads != self.num_heads
        self.layer_number = layer_number
        # Each model-parallel rank holds whole heads: heads / tp query heads and kv_heads / tp key/value heads.
        tp = mpu.get_model_parallel_world_size()
        self.num_heads_local = mpu.divide(self.num_heads, tp, "num_attention_heads")
        self.num_kv_heads_local = mpu.divide(self.num_kv_heads, tp, "num_kv_heads")
        self.hidden_size_local = self.num_heads_local * self.head_dim
        use_bias = bool(neox_args.use_bias_in_attn_linear)
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        # The per-head layout [heads, 3, d] splits into whole heads as one segment; the grouped layout
        # [q | k | v] splits each of its three parts (megatron/mpu/partition.py).
        kv_size = self.num_kv_heads * self.head_dim
        segments = (self.hidden_size, kv_size, kv_size) if self.grouped else (qkv_size,)
        self.query_key_value = mpu.ColumnParallelLinear(neox_args, self.hidden_size, qkv_size,
                                                        bias=use_bias, gather_output=False,
                                                        init_method=init_method, partition_sizes=segments)
        if neox_args.pos_emb == "rotary":
            rotary_pct = float(neox_args.rotary_pct)
            if not 0.0 < rotary_pct <= 1.0:
                raise ValueError(f"rotary_pct must be in (0, 1], got {rotary_pct}")
            self.rotary_ndims = int(self.head_dim * rotary_pct)
            self.rotary_emb = RotaryEmbedding(self.rotary_ndims, float(neox_args.rotary_emb_base))
            self.fused_rotary = _rotary_fn(neox_args)
        else:
            self.rotary_emb = None
        self.core_attention = build_core_attention(neox_args, layer_number)
        # Attention dropout acts on this rank's heads: it draws from the model-parallel stream (mpu/random.py).
        self.fork_rng = tp > 1 and float(neox_args.attention_dropout) > 0.0
        self.dense = mpu.RowParallelLinear(neox_args, self.hidden_size, self.hidden_size, bias=use_bias,
                                           input_is_parallel=True, init_method=output_layer_init_method)

    def split_qkv(self, qkv: torch.Tensor):
        """``[B, S, qkv_local]`` -> q ``[B, S, heads, d]``, k and v ``[B, S, kv_heads, d]`` (this rank's heads;
        views, no copy)."""
        bsz, seq, _ = qkv.shape
        heads, kv_heads = self.num_heads_local, self.num_kv_heads_local
        if not self.grouped:
            return qkv.view(bsz, seq, heads, 3, self.head_dim).unbind(dim=3)
        kv_size = kv_heads * self.head_dim
        q, k, v = qkv.split([self.hidden_size_local, kv_size, kv_size], dim=-1)
        return (q.view(bsz, seq, heads, self.head_dim), k.view(bsz, seq, kv_heads, self.head_dim),
                v.view(bsz, seq, kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, meta, partial: bool = False) -> torch.Tensor:
        """``partial``: this rank's un-summed output projection without its bias (``RowParallelLinear.partial``)."""
        bsz, seq, _ = x.shape
        qkv, _ = self.query_key_value(x)
        q, k, v = self.split_qkv(qkv)
        if self.rotary_emb is not None:
            if self.fused_rotary is not None and q.is_cuda:
                q, k = self.fused_rotary(q, k, meta.rope_pos, self.rotary_emb.inv_freq)
            else:
                cos, sin = self.rotary_emb(meta.rope_pos, q.dtype)
                q = apply_rotary_pos_emb(q, cos, sin)
                k = apply_rotary_pos_emb(k, cos, sin)
        if self.fork_rng and self.training:
            with mpu.get_rng_tracker().fork():
                out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), meta)
        else:
            out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), meta)
        out = out.transpose(1, 2).reshape(bsz, seq, self.hidden_size_local)
        if partial:
            return self.dense.partial(out)
        out, _ = self.dense(out)
        return out


def _accept_current_neox_names(module, state_dict, prefix, *_):
    neox_names.to_module_names(state_dict, prefix)


def _write_current_neox_names(module, state_dict, prefix, local_metadata):
    neox_names.to_current_names(state_dict, prefix)


class ParallelMLP(nn.Module):
    """h -> ffn (mlp_inner_size, default 4h) -> activation -> h."""

    def __init__(self, neox_args, init_method, output_layer_init_method):
        super().__init__()
        hidden = int(neox_args.hidden_size)
        ffn = int(neox_args.mlp_inner_size)
        use_bias = bool(neox_args.use_bias_in_mlp)
        self.activation_func = get_activation(neox_args)
        self.dense_h_to_4h = mpu.ColumnParallelLinear(neox_args, hidden, ffn, bias=use_bias, gather_output=False,
                                                      init_method=init_method)
        self.dense_4h_to_h = mpu.RowParallelLinear(neox_args, ffn, hidden, bias=use_bias, input_is_parallel=True,
                                                   init_method=output_layer_init_method)
        # Checkpoints of both GPT-NeoX namings load; the configured one is written (megatron/model/neox_names.py).
        self.register_load_state_dict_pre_hook(_accept_current_neox_names)
        if neox_args.checkpoint_tensor_names == "current":
            self.register_state_dict_post_hook(_write_current_neox_names)

    @property
    def output_layer(self):
        return self.dense_4h_to_h

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        h, _ = self.dense_h_to_4h(x)
        if partial:
            return self.dense_4h_to_h.partial(self.activation_func(h))
        out, _ = self.dense_4h_to_h(self.activation_func(h))
        return out


class ParallelGatedMLP(nn.Module):
    """Gated MLP (swiglu), GPT-NeoX's names and layout: ``linear1`` (h -> 2f, rows ``[x; gate]``), then
    ``act(gate) * x``, then ``linear2`` (f -> h), ``f = mlp_inner_size``. HF Llama's ``up_proj`` is the first
    half of ``linear1``, ``gate_proj`` the second."""

    def __init__(self, neox_args, init_method, output_layer_init_method):
        super().__init__()
        hidden = int(neox_args.hidden_size)
        ffn = int(neox_args.mlp_inner_size)
        use_bias = bool(neox_args.use_bias_in_mlp)
        self.activation_func = get_activation(neox_args)
        # [x | gate] split part by part, so each rank holds matching halves [x_r | gate_r].
        self.linear1 = mpu.ColumnParallelLinear(neox_args, hidden, 2 * ffn, bias=use_bias, gather_output=False,
                                                init_method=init_method, partition_sizes=(ffn, ffn))
        self.linear2 = mpu.RowParallelLinear(neox_args, ffn, hidden, bias=use_bias, input_is_parallel=True,
                                             init_method=output_layer_init_method)

    @property
    def output_layer(self):
        return self.linear2

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        h, _ = self.linear1(x)
        up, gate = h.chunk(2, dim=-1)
        if partial:
            return self.linear2.partial(self.activation_func(gate) * up)
        out, _ = self.linear2(self.activation_func(gate) * up)
        return out


def build_mlp(neox_args, init_method, output_layer_init_method) -> nn.Module:
    cls = ParallelGatedMLP if neox_args.activation in GATED_ACTIVATIONS else ParallelMLP
    return cls(neox_args, init_method, output_layer_init_method)


class ParallelTransformerLayer(nn.Module):
    """One block. Parallel residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` (``ln2 = ln1`` when ``gpt_j_tied``);
    sequential: ``y = x + attn(ln1(x)); y + mlp(ln2(y))``."""

    def __init__(self, neox_args, init_method, output_layer_init_method, layer_number: int):
        super().__init__()
        norm, eps = get_norm(neox_args)
        hidden = int(neox_args.hidden_size)
        self.layer_number = layer_number
        self.gpt_j_residual = bool(neox_args.gpt_j_residual)
        self.gpt_j_tied = bool(neox_args.gpt_j_tied)
        self.input_layernorm = norm(hidden, eps=eps)
        self.post_attention_layernorm = norm(hidden, eps=eps)
        self.attention = ParallelSelfAttention(neox_args, init_method, output_layer_init_method, layer_number)
        self.mlp = build_mlp(neox_args, init_method, output_layer_init_method)
        self.hidden_dropout = nn.Dropout(float(neox_args.hidden_dropout))
        # Parallel residual across tensor-parallel ranks: the two branches' partial sums share one all-reduce,
        # as GPT-NeoX's (the biases are still added once, after it). Dropout on each branch needs each branch
        # summed first, so with residual dropout in training the branches are reduced one by one.
        self.one_reduce = self.gpt_j_residual and mpu.get_model_parallel_world_size() > 1

    def forward(self, x: torch.Tensor, meta) -> torch.Tensor:
        if self.gpt_j_residual:
            x1 = self.input_layernorm(x)
            x2 = x1 if self.gpt_j_tied else self.post_attention_layernorm(x)
            if self.one_reduce and not (self.training and self.hidden_dropout.p > 0):
                return x + self._summed_branches(x1, x2, meta)
            attn = self.hidden_dropout(self.attention(x1, meta))
            mlp = self.hidden_dropout(self.mlp(x2))
            return x + attn + mlp
        y = x + self.hidden_dropout(self.attention(self.input_layernorm(x), meta))
        return y + self.hidden_dropout(self.mlp(self.post_attention_layernorm(y)))


    def _summed_branches(self, x1: torch.Tensor, x2: torch.Tensor, meta) -> torch.Tensor:
        """``attn(x1) + mlp(x2)`` with one all-reduce for both (its twin: the two layers' own reductions)."""
        out = mpu.reduce_from_model_parallel_region(self.attention(x1, meta, partial=True) + self.mlp(x2, partial=True))
        for bias in (self.attention.dense.bias, self.mlp.output_layer.bias):
            if bias is not None:
                out = out + bias
        return out


class ParallelTransformerLayerPipe(ParallelTransformerLayer):
    """Pipeline form: tuple in, tuple out (the class name is what DeepSpeed's activation checkpointing
    looks for in a ``GPT2ModelPipe``)."""

    def forward(self, args):
        hidden, meta = unpack_meta(args)
        return (super().forward(hidden, meta), *args[1:])


def pre_transformer_block(args):
    """Layer 1 (no parameters): kept for GPT-NeoX's layer indices; the tuple is already batch-first."""
    return args


def post_transformer_block(args):
    """Layer L+2 (no parameters): drops the metadata, keeping the hidden states."""
    return args[0]


class NormPipe(nn.Module):
    """Layer L+3: final norm (parameters ``norm.*`` as in GPT-NeoX checkpoints)."""

    def __init__(self, norm_class, hidden_size: int, eps: float):
        super().__init__()
        self.norm = norm_class(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise ValueError("NormPipe expects the hidden-state tensor after _post_transformer_block")
        return self.norm(x)


class ParallelLinearPipe(nn.Module):
    """Layer L+4 when untied: ``final_linear`` (hidden -> padded vocab), no bias, logits ``[B, S, V]``, split by
    vocabulary over the model-parallel ranks (``output_layer_parallelism: column``); with ``parallel_output``
    each rank returns its ``[B, S, V / tp]`` slice (training: the loss is vocab-parallel), else the whole."""

    def __init__(self, neox_args, init_method, parallel_output: bool = False):
        super().__init__()
        self.final_linear = mpu.ColumnParallelLinear(neox_args, int(neox_args.hidden_size),
                                                     int(neox_args.padded_vocab_size), bias=False,
                                                     gather_output=not parallel_output, init_method=init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.final_linear(x)
        return logits


def tied_logits(embedding, x: torch.Tensor, parallel_output: bool = False) -> torch.Tensor:
    """Layer L+4 when tied: logits against the (shared, vocab-parallel) word-embedding matrix."""
    return mpu.parallel_lm_logits(x, embedding.word_embeddings_weight, parallel_output)
