"""Shared pieces of the tensor-parallel checkpoint tests: a tiny model's TP=1 checkpoint with its resolved config."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from helpers import save_checkpoint  # noqa: E402

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
            pos_emb="rotary", rotary_pct=0.5, gpt_j_residual=True, no_weight_tying=True, norm="layernorm",
            tokenizer_type="CharLevelTokenizer", make_vocab_size_divisible_by=128, train_micro_batch_size_per_gpu=1,
            precision="fp32", USE_ORIGINAL_FULL_ATTEN=True)
CASES = {"mha_parallel_residual": {},
         "gqa_swiglu_sequential_tied_current_names": dict(
             num_kv_heads=2, activation="swiglu", mlp_multiple_of=16, intermediate_size=160, norm="rmsnorm",
             use_bias_in_attn_linear=True, use_bias_in_mlp=True, gpt_j_residual=False, no_weight_tying=False,
             checkpoint_tensor_names="current"),
         "gelu_current_names": dict(checkpoint_tensor_names="current")}


def source_model(**overrides):
    """``(cfg, args, model)``: the tiny model at TP=1 with perturbed norms and biases (a wrong rule shows)."""
    from megatron.model.layer_list import build_sequential_model
    from megatron.neox_arguments import NeoXArgs

    cfg = {**TINY, **overrides}
    args = NeoXArgs.from_dict(dict(cfg))
    torch.manual_seed(0)
    model = build_sequential_model(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, args, model


def source_checkpoint(tmp_path, **overrides) -> Path:
    """A TP=1 sequential checkpoint (with its resolved config) of :func:`source_model`."""
    from megatron.checkpoint_layout import layout_of, write_layout

    cfg, args, model = source_model(**overrides)
    ckpt = save_checkpoint(model, cfg, tmp_path / "src" / "global_step3", "sequential", resolved_args=args)
    write_layout(str(ckpt), layout_of(args))  # as the trainer writes it
    return ckpt


def logits(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 16), generator=gen)
    with torch.no_grad():
        return model((ids, torch.arange(16).expand(2, -1)))
