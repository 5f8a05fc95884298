"""``--architecture llama``: trainer checkpoints of Llama-family models (MHA, GQA, Mistral's sliding window, biases,
tied embeddings; both checkpoint layouts and tensor-parallel shards) load as stock LlamaForCausalLM /
MistralForCausalLM with no custom code, and their logits equal the trainer's (fp32 < 1e-5)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron.hf.export import export
from megatron.hf.export_config import ConversionError
from tests.hf.helpers import build_trainer_model, random_ids, save_checkpoint, trainer_logits

TOL = 1e-5


def llama_config(vocab_file, **overrides):
    """A tiny Llama-shaped config in GPT-NeoX YAML key form (4 query heads of 16 dims)."""
    cfg = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
               pos_emb="rotary", rotary_pct=1, rotary_emb_base=5000, gpt_j_residual=False, no_weight_tying=True,
               norm="rmsnorm", rms_norm_epsilon=1e-5, use_bias_in_norms=False, use_bias_in_attn_linear=False,
               use_bias_in_mlp=False, activation="swiglu", mlp_multiple_of=16, intermediate_size=160,
               tokenizer_type="HFTokenizer", vocab_file=str(vocab_file), train_micro_batch_size_per_gpu=1,
               precision="fp32")
    cfg.update(overrides)
    return cfg


def split_llama_tp(state, rank, tp, args):
    """One GPT-NeoX tensor-parallel rank's shard: QKV as that rank's heads in the trainer's layout, linear1 as
    ``[up_r; gate_r]``, row-parallel weights on dim 1, row biases replicated (sequential residual)."""
    d = args.hidden_size // args.num_attention_heads
    out = {}
    for name, t in state.items():
        if name.startswith("attention.query_key_value"):
            if args.num_kv_heads == args.num_attention_heads:
                out[name] = t.chunk(tp, 0)[rank].clone()  # whole heads of [heads, 3, d] rows
            else:
                q, k, v = t.split([args.hidden_size, args.num_kv_heads * d, args.num_kv_heads * d], dim=0)
                out[name] = torch.cat([x.chunk(tp, 0)[rank] for x in (q, k, v)], dim=0)
        elif name.startswith("mlp.linear1"):
            up, gate = t.chunk(2, dim=0)
            out[name] = torch.cat([up.chunk(tp, 0)[rank], gate.chunk(tp, 0)[rank]], dim=0)
        elif name.startswith("word_embeddings") or name.startswith("final_linear"):
            out[name] = t.chunk(tp, 0)[rank].clone()
        elif name in ("attention.dense.weight", "mlp.linear2.weight"):
            out[name] = t.chunk(tp, 1)[rank].clone()
        else:
            out[name] = t.clone()
    return out


def write_tp_checkpoint(model, cfg, args, ckpt_dir, tp):
    import yaml

    (ckpt_dir / "configs").mkdir(parents=True)
    (ckpt_dir / "configs" / "model.yml").write_text(yaml.safe_dump(cfg))
    layers = {}
    for key, value in model.state_dict().items():
        _, idx, name = key.split(".", 2)
        layers.setdefault(int(idx), {})[name] = value
    for idx, state in layers.items():
        for rank in range(tp):
            torch.save(split_llama_tp(state, rank, tp, args), ckpt_dir / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
    torch.save({"module": None, "iteration": 1}, ckpt_dir / "mp_rank_00_model_states.pt")
    return ckpt_dir


def export_and_load(tmp_path, cfg, layout="sequential", tp=1):
    args, model = build_trainer_model(cfg)
    if tp > 1:
        ckpt = write_tp_checkpoint(model, cfg, args, tmp_path / "ckpt_tp", tp)
    else:
        ckpt = save_checkpoint(model, cfg, tmp_path / f"ckpt_{layout}", layout)
    out = export(str(ckpt), None, str(tmp_path / "hf_llama"), "fp32", "llama", True)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    return model, hf, json.load(open(f"{out}/config.json"))


CASES = {
    "llama_mha_sequential": (dict(), "sequential", 1),
    "llama_biases_tied_pipeline": (dict(use_bias_in_attn_linear=True, use_bias_in_mlp=True, no_weight_tying=False),
                                   "pipeline", 1),
    "gqa_tp2": (dict(num_kv_heads=2), "pipeline", 2),
    "mqa_pipeline": (dict(num_kv_heads=1), "pipeline", 1),
    "llama_mha_tp2": (dict(), "pipeline", 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_export_matches_trainer(tmp_path, pythia_tokenizer_path, case):
    overrides, layout, tp = CASES[case]
    model, hf, config = export_and_load(tmp_path, llama_config(pythia_tokenizer_path, **overrides), layout, tp)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert config["num_key_value_heads"] == overrides.get("num_kv_heads", 4)
    assert config["intermediate_size"] == 64  # GPT-NeoX's rule: int(160 * 2 / 3) // 2 = 53 -> multiple of 16
    ids = random_ids(2, 24)
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - trainer_logits(model, ids)).abs().max().item() < TOL


def test_sliding_window_exports_mistral(tmp_path, pythia_tokenizer_path):
    """The window (5 < sequence 24) really cuts keys off, and HF's count (W + 1) matches the trainer's."""
    cfg = llama_config(pythia_tokenizer_path, num_kv_heads=2, sliding_window_width=5)
    model, hf, config = export_and_load(tmp_path, cfg, "pipeline")
    assert config["model_type"] == "mistral" and config["sliding_window"] == 6
    ids = random_ids(2, 24, seed=4)
    ref = trainer_logits(model, ids)
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - ref).abs().max().item() < TOL
    hf.config.sliding_window = None  # full attention differs: the comparison above can fail
    with torch.no_grad():
        full = hf(ids).logits
    assert (full - ref).abs().max().item() > 1e-4


SEPLLM_CASES = {
    "sepllm_mask_gqa": dict(num_kv_heads=2, separator_token_ids=[15, 13, 209], prefill_local_window_size=4,
                            generate_local_window_size=4, init_tok_max_idx=1, USE_SEP_ATTN_KERNEL_ACCELERATOR=False),
    "sep_kernel_per_layer": dict(separator_token_ids=[15, 13, 209], prefill_local_window_size=4,
                                 generate_local_window_size=4, USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True,
                                 prefill_loc_win_size_list=[3, 32], USE_SEP_ATTN_KERNEL_ACCELERATOR=True),
    "streamingllm": dict(streamingLLM=True, prefill_local_window_size=5, generate_local_window_size=5,
                         USE_SEP_ATTN_KERNEL_ACCELERATOR=False),
}


@pytest.mark.parametrize("case", sorted(SEPLLM_CASES))
def test_sepllm_llama_export_is_stock_llama_plus_the_training_free_rule(tmp_path, pythia_tokenizer_path, case):
    """A SepLLM-family Llama exports as stock weights plus sepllm_config.yml; apply_sepllm(model) with no config
    reads it and the logits equal the trainer's (fp32 < 1e-5), where the stock model alone differs."""
    from megatron.hf.training_free import apply_sepllm

    cfg = llama_config(pythia_tokenizer_path, **SEPLLM_CASES[case])
    model, hf, config = export_and_load(tmp_path, cfg, "sequential")
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert (tmp_path / "hf_llama" / "sepllm_config.yml").is_file()
    ids = random_ids(2, 24, seed=9)
    ref = trainer_logits(model, ids)
    with torch.no_grad():
        stock = hf(ids).logits
    assert (stock - ref).abs().max().item() > 1e-4  # the rule matters on this input
    apply_sepllm(hf)
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("overrides,key", [
    (dict(separator_token_ids=[-1], prefill_local_window_size=32, generate_local_window_size=32,
          USE_SA_SOFTMAX=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False), "attention_variant"),
    (dict(norm="layernorm", use_bias_in_norms=True), "norm"),
    (dict(activation="gelu"), "activation"),
    (dict(rotary_pct=0.5), "rotary_pct"),
    (dict(sliding_window_width=4, use_bias_in_mlp=True), "use_bias_in_mlp"),
])
def test_llama_export_refuses_what_stock_llama_lacks(tmp_path, pythia_tokenizer_path, overrides, key):
    args, model = build_trainer_model(llama_config(pythia_tokenizer_path, **overrides))
    ckpt = save_checkpoint(model, llama_config(pythia_tokenizer_path, **overrides), tmp_path / "ckpt")
    with pytest.raises(ConversionError, match=f"^{key}="):
        export(str(ckpt), None, str(tmp_path / "out"), "fp32", "llama", True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("architecture", ["neox", "sepllm_gpt_neox"])
def test_gpt_neox_exports_refuse_grouped_query_attention(tmp_path, pythia_tokenizer_path, architecture):
    cfg = llama_config(pythia_tokenizer_path, num_kv_heads=2, norm="layernorm", use_bias_in_norms=True,
                       activation="gelu")
    args, model = build_trainer_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="^num_kv_heads=2: .*--architecture llama"):
        export(str(ckpt), None, str(tmp_path / "out"), "fp32", architecture, True)
