"""``--architecture llama``: a trainer checkpoint of a Llama-family model as a stock HF ``LlamaForCausalLM``, or
``MistralForCausalLM`` when the model has a sliding window; no custom code in the export. A SepLLM, StreamingLLM or
FixLLM model is the same stock model plus its attention settings, saved beside it as ``sepllm_config.yml``
(:func:`training_free_settings`): ``megatron.hf.training_free.apply_sepllm(model)`` reads them and applies the
trainer's rule, so there is one implementation of the mask, not a second modeling file.

Tensor mapping (per block, pipeline layer ``i + 2``), after the tensor-parallel shards are merged by
:mod:`megatron.checkpoint_partition` (the table the reshard tool splits by):

* ``attention.query_key_value`` -> ``self_attn.{q,k,v}_proj``: the merged rows are split by the layout the
  trainer uses (per head ``[q_h; k_h; v_h]`` for multi-head attention, ``[q | k | v]`` with ``num_kv_heads``);
* ``attention.dense`` -> ``self_attn.o_proj``;
* ``mlp.linear1`` -> ``mlp.up_proj`` (first half of the merged rows) and ``mlp.gate_proj`` (second half);
* ``mlp.linear2`` -> ``mlp.down_proj``; the RMSNorm ``scale`` -> ``weight``.

HF's sliding window counts the query itself (``q - k < sliding_window``) where GPT-NeoX's flash-attn window
``(W, -1)`` does not, so ``sliding_window_width: W`` is written as ``sliding_window: W + 1``.
"""
from typing import Dict, List

import torch

from megatron.checkpoint_io import CheckpointReader
from megatron.hf.export import _take, check_block_count, merge_block
from megatron.hf.export_config import ConversionError

HF_PREFIX = "model.layers."


def check_llama_supported(args) -> None:
    """The first key (with its value and why) that a stock Llama/Mistral model cannot represent."""
    mistral = args.sliding_window_width is not None
    refusals = (
        ("attention_variant", args.attention_variant == "sa_softmax",
         "Self-Adjusting softmax has no stock Llama form and the training-free SepLLM path cannot apply it "
         "(it changes the attention's output scale)"),
        ("USE_BiPE", args.USE_BiPE, "stock Llama has no BiPE positions"),
        ("norm", args.norm != "rmsnorm", "stock Llama uses RMSNorm (norm: rmsnorm)"),
        ("use_bias_in_norms", args.use_bias_in_norms, "Llama's RMSNorm has no bias (use_bias_in_norms: false)"),
        ("activation", args.activation != "swiglu", "stock Llama's MLP is swiglu"),
        ("pos_emb", args.pos_emb != "rotary", "stock Llama uses rotary embeddings"),
        ("rotary_pct", args.rotary_pct != 1, "stock Llama rotates every head dimension (rotary_pct: 1)"),
        ("gpt_j_residual", args.gpt_j_residual, "Llama blocks have the sequential residual"),
        ("use_bias_in_attn_linear", mistral and args.use_bias_in_attn_linear,
         "MistralForCausalLM (sliding_window_width is set) has no attention biases"),
        ("use_bias_in_mlp", mistral and args.use_bias_in_mlp,
         "MistralForCausalLM (sliding_window_width is set) has no MLP biases"),
    )
    for key, refused, why in refusals:
        if refused:
            raise ConversionError(f"{key}={getattr(args, key)!r}: {why}")


def make_llama_config(args, vocab_size: int):
    """The stock ``LlamaConfig`` (``MistralConfig`` with a sliding window) of the trainer's model."""
    common = dict(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.mlp_inner_size,
                  num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                  num_key_value_heads=args.num_kv_heads, hidden_act="silu",
                  max_position_embeddings=args.max_position_embeddings, initializer_range=args.init_method_std,
                  rms_norm_eps=args.rms_norm_epsilon, tie_word_embeddings=not args.no_weight_tying,
                  rope_theta=float(args.rotary_emb_base), use_cache=True, bos_token_id=0, eos_token_id=0)
    if args.sliding_window_width is not None:
        from transformers import MistralConfig

        config = MistralConfig(sliding_window=args.sliding_window_width + 1, **common)
        config.architectures = ["MistralForCausalLM"]
        return config
    from transformers import LlamaConfig

    config = LlamaConfig(attention_bias=args.use_bias_in_attn_linear, mlp_bias=args.use_bias_in_mlp, **common)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _split_qkv(t: torch.Tensor, args) -> List[torch.Tensor]:
    """The merged QKV rows (weight or bias) as ``[q, k, v]``, by the trainer's layout."""
    d = args.hidden_size // args.num_attention_heads
    heads, kv = args.num_attention_heads, args.num_kv_heads
    if kv == heads:
        per_head = t.reshape(heads, 3, d, *t.shape[1:])
        return [per_head[:, j].reshape(heads * d, *t.shape[1:]) for j in range(3)]
    return list(t.split([heads * d, kv * d, kv * d], dim=0))


def _block(reader: CheckpointReader, idx: int, args) -> Dict[str, torch.Tensor]:
    merged = merge_block(reader, idx, args)
    where = reader.source(idx)
    out = {}
    for part in ("weight", "bias"):
        if part == "weight" or args.use_bias_in_attn_linear:
            q, k, v = _split_qkv(_take([merged], f"attention.query_key_value.{part}", where)[0], args)
            out.update({f"self_attn.q_proj.{part}": q, f"self_attn.k_proj.{part}": k, f"self_attn.v_proj.{part}": v})
        if part == "weight" or args.use_bias_in_mlp:
            up, gate = _take([merged], f"mlp.linear1.{part}", where)[0].chunk(2, dim=0)
            out.update({f"mlp.up_proj.{part}": up, f"mlp.gate_proj.{part}": gate})
    out["self_attn.o_proj.weight"] = _take([merged], "attention.dense.weight", where)[0]
    out["mlp.down_proj.weight"] = _take([merged], "mlp.linear2.weight", where)[0]
    if args.use_bias_in_attn_linear:
        out["self_attn.o_proj.bias"] = _take([merged], "attention.dense.bias", where)[0]
    if args.use_bias_in_mlp:
        out["mlp.down_proj.bias"] = _take([merged], "mlp.linear2.bias", where)[0]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{norm}.weight"] = _take([merged], f"{norm}.scale", where)[0]
    return out


def expected_llama_shapes(args, vocab_rows: int) -> Dict[str, tuple]:
    """HF tensor name -> (shape, config keys of each dimension)."""
    h, f = args.hidden_size, args.mlp_inner_size
    d = h // args.num_attention_heads
    kv = args.num_kv_heads * d
    H, F, V = f"hidden_size={h}", f"mlp_inner_size={f}", f"padded_vocab_size={vocab_rows}"
    K = f"num_kv_heads={args.num_kv_heads} x head size {d}"
    out = {"model.embed_tokens.weight": ((vocab_rows, h), (V, H)), "lm_head.weight": ((vocab_rows, h), (V, H)),
           "model.norm.weight": ((h,), (H,))}
    for i in range(args.num_layers):
        p = f"{HF_PREFIX}{i}."
        shapes = {"self_attn.q_proj": ((h, h), (H, H)), "self_attn.k_proj": ((kv, h), (K, H)),
                  "self_attn.v_proj": ((kv, h), (K, H)), "self_attn.o_proj": ((h, h), (H, H)),
                  "mlp.up_proj": ((f, h), (F, H)), "mlp.gate_proj": ((f, h), (F, H)),
                  "mlp.down_proj": ((h, f), (H, F))}
        for name, (shape, keys) in shapes.items():
            out[f"{p}{name}.weight"] = (shape, keys)
            out[f"{p}{name}.bias"] = ((shape[0],), (keys[0],))
        out[p + "input_layernorm.weight"] = ((h,), (H,))
        out[p + "post_attention_layernorm.weight"] = ((h,), (H,))
    return out


def build_llama_state_dict(reader: CheckpointReader, args) -> Dict[str, torch.Tensor]:
    """HF Llama state dict from the checkpoint, every tensor shape-checked against ``args``."""
    check_llama_supported(args)
    check_block_count(reader, args)
    sd: Dict[str, torch.Tensor] = {}
    where: Dict[str, str] = {}
    sd["model.embed_tokens.weight"] = _take([merge_block(reader, 0, args)], "word_embeddings.weight",
                                            reader.source(0))[0]
    where["model.embed_tokens.weight"] = reader.source(0)
    for i in range(args.num_layers):
        for key, value in _block(reader, i + 2, args).items():
            sd[f"{HF_PREFIX}{i}.{key}"] = value
            where[f"{HF_PREFIX}{i}.{key}"] = reader.source(i + 2)
    last = args.num_layers + 3
    sd["model.norm.weight"] = _take([merge_block(reader, last, args)], "norm.scale", reader.source(last))[0]
    where["model.norm.weight"] = reader.source(last)
    head = reader.layer(last + 1, required=args.no_weight_tying)
    if head is not None and "final_linear.weight" in head[0]:
        sd["lm_head.weight"] = _take([merge_block(reader, last + 1, args)], "final_linear.weight",
                                     reader.source(last + 1))[0]
        where["lm_head.weight"] = reader.source(last + 1)
    else:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        where["lm_head.weight"] = where["model.embed_tokens.weight"]
    rows = sd["model.embed_tokens.weight"].shape[0]
    vocab_rows = args.padded_vocab_size if args.padded_vocab_size is not None else rows
    for name, (shape, keys) in expected_llama_shapes(args, vocab_rows).items():
        if name not in sd:
            if name.endswith(".bias"):
                continue  # present exactly where use_bias_in_attn_linear / use_bias_in_mlp put one
            raise ConversionError(f"{reader.input_dir}: tensor {name} is missing")
        got = tuple(sd[name].shape)
        if got != shape:
            bad = [k for dim, k in enumerate(keys) if dim >= len(got) or got[dim] != shape[dim]] or list(keys)
            raise ConversionError(f"{where[name]}: tensor {name} has shape {got} but the config implies {shape} "
                                  f"({', '.join(bad)})")
    return sd


def training_free_settings(args):
    """The training-free config (the reference's keys) under which a stock Llama/Mistral model attends as the
    trainer's model did, or None for full attention. The keys are the trainer's own, with the same names and
    meaning; the kernel flags are training-only (the kernel and the mask compute the same attention)."""
    if args.attention_variant == "full":
        return None
    import dataclasses

    from megatron.hf.training_free import TrainingFreeConfig

    trainer_keys = {f.name for f in dataclasses.fields(args)}
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingFreeConfig)
                if f.name in trainer_keys and f.name != "source"}
    settings.update(Layer_num=int(args.num_layers), USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
                    RECOMPILE_SEP_ATTN_KERNEL=False, PRINT_KV_RATIO=False, prefill_k=0, generate_k=0)
    return settings

