"""Our model vs HuggingFace GPTNeoXForCausalLM with copied weights: same logits (fp32, 1e-5)."""
import pytest
import torch

from megatron.model import build_sequential_model

from model_helpers import make_args, randomize_


def hf_model_from(ours, args):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tied = not args.no_weight_tying
    cfg = GPTNeoXConfig(
        vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=4 * args.hidden_size,
        rotary_pct=args.rotary_pct, rotary_emb_base=args.rotary_emb_base,
        max_position_embeddings=args.max_position_embeddings, layer_norm_eps=args.layernorm_epsilon,
        use_parallel_residual=args.gpt_j_residual, tie_word_embeddings=tied, hidden_act="gelu",
        attention_dropout=0.0, hidden_dropout=0.0)
    hf = GPTNeoXForCausalLM(cfg).eval()
    sd = {k[len("sequential."):]: v for k, v in ours.state_dict().items()}
    n = args.num_layers
    mapped = {"gpt_neox.embed_in.weight": sd["0.word_embeddings.weight"]}
    for i in range(n):
        for name in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                     "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            for kind in ("weight", "bias"):
                mapped[f"gpt_neox.layers.{i}.{name}.{kind}"] = sd[f"{i + 2}.{name}.{kind}"]
    mapped["gpt_neox.final_layer_norm.weight"] = sd[f"{n + 3}.norm.weight"]
    mapped["gpt_neox.final_layer_norm.bias"] = sd[f"{n + 3}.norm.bias"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected
    # The output projection is `embed_out` (transformers 4) or `lm_head` (5): set it through the accessor.
    out_proj = hf.get_output_embeddings().weight
    assert all("rotary" in k or "inv_freq" in k or "masked_bias" in k or k.endswith(("embed_out.weight",
               "lm_head.weight")) for k in missing), missing
    if tied:
        assert torch.equal(out_proj, mapped["gpt_neox.embed_in.weight"])  # HF really ties it
    else:
        with torch.no_grad():
            out_proj.copy_(sd[f"{n + 4}.final_linear.weight"])
    return hf


@pytest.mark.parametrize("gpt_j_residual", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf(gpt_j_residual, rotary_pct, tied):
    torch.manual_seed(0)
    args = make_args(gpt_j_residual=gpt_j_residual, rotary_pct=rotary_pct, no_weight_tying=not tied)
    ours = build_sequential_model(args).eval()
    randomize_(ours, seed=1)
    hf = hf_model_from(ours, args)
    ids = torch.randint(0, args.padded_vocab_size, (2, args.seq_length))
    pos = torch.arange(args.seq_length).expand(2, -1)
    with torch.no_grad():
        mine = ours((ids, pos))
        ref = hf(input_ids=ids).logits
    assert mine.shape == ref.shape == (2, args.seq_length, args.padded_vocab_size)
    assert mine.abs().max() > 1.0  # random weights give non-trivial logits
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
