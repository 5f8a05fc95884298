"""A config without SepLLM keys is a GPT-NeoX config and trains full attention (its attention_config), not
the SepLLM fork's default Sep-Attention kernel; a config with any SepLLM key follows the reference's rules."""
import pytest
import torch

from megatron.neox_arguments import NeoXArgs
from megatron.neox_arguments.derive import describe_attention

from .helpers import cpu

PYTHIA_SHAPED = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                 "padded_vocab_size": 128, "pos_emb": "rotary", "rotary_pct": 0.25, "gpt_j_residual": True,
                 "no_weight_tying": True, "attention_config": [[["flash"], 2]], "hidden_dropout": 0.0,
                 "attention_dropout": 0.0, "tokenizer_type": "CharLevelTokenizer"}


def _logits(args):
    from megatron.model.layer_list import build_sequential_model

    torch.manual_seed(0)
    model = build_sequential_model(args).eval()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model((ids, torch.arange(32).expand(2, -1), None))


def test_gpt_neox_config_trains_full_attention():
    neox = NeoXArgs.from_dict(dict(PYTHIA_SHAPED), env=cpu())
    full = NeoXArgs.from_dict(dict(PYTHIA_SHAPED, USE_ORIGINAL_FULL_ATTEN=True), env=cpu())
    assert neox.attention_variant == "full" and not neox.USE_SEP_ATTN_KERNEL_ACCELERATOR
    assert torch.equal(_logits(neox), _logits(full))
    assert "full causal attention on all 2 layers (no SepLLM key set: a GPT-NeoX config)" in describe_attention(neox)
    assert "GPT-NeoX config" not in describe_attention(full)


@pytest.mark.parametrize("key,value", [("separator_token_ids", [15, 13]), ("prefill_local_window_size", 8),
                                       ("USE_SEP_ATTN_KERNEL_ACCELERATOR", True)])
def test_any_sepllm_key_keeps_the_reference_defaults(key, value):
    args = NeoXArgs.from_dict(dict(PYTHIA_SHAPED, **{key: value}), env=cpu())
    assert args.attention_variant == "sep_kernel" and not args.USE_ORIGINAL_FULL_ATTEN


def test_per_layer_windows_are_described():
    args = NeoXArgs.from_dict(dict(PYTHIA_SHAPED, num_layers=3, attention_config=[[["global"], 3]],
                                   separator_token_ids=[15], USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
                                   USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True,
                                   prefill_loc_win_size_list=[32, 8, 32]), env=cpu())
    assert describe_attention(args) == ("attention: sepllm_mask, 3 initial token(s), windows 32 on layers 0,2; "
                                        "8 on layers 1")
