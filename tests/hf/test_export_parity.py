"""Trainer vs exported logits (fp32 < 1e-5): stock GPTNeoXForCausalLM for full attention, the remote-code
sepllm_gpt_neox model for every SepLLM mode; both checkpoint layouts and tensor-parallel merging."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

from tests.hf.helpers import SEPS, base_config, make_export, random_ids, trainer_logits

TOL = 1e-5

SEPLLM_MODES = {
    "sepllm_n4": dict(separator_token_ids=SEPS, prefill_local_window_size=4, generate_local_window_size=4),
    "sepllm_per_layer_exclude_diag_off": dict(
        separator_token_ids=SEPS, USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[64, 3],
        USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS=True, generate_win_loc_size_list=[64, 3], EXCLUDE_DIAGONAL=False),
    "streaming": dict(streamingLLM=True, prefill_local_window_size=5, generate_local_window_size=5),
    "sa_softmax": dict(USE_SA_SOFTMAX=True, separator_token_ids=[-1], prefill_local_window_size=64,
                       generate_local_window_size=64, SA_Numerator_Bias=1e-10, SA_Denominator_Bias=1e-7),
    "sa_no_deno": dict(USE_SA_SOFTMAX_NO_DENO=True, separator_token_ids=SEPS, prefill_local_window_size=6,
                       generate_local_window_size=6),
    "bipe_rotary": dict(USE_BiPE=True, BiPE_seps=SEPS, separator_token_ids=SEPS, prefill_local_window_size=4,
                        generate_local_window_size=4),
    "bipe_alibi": dict(USE_BiPE=True, BiPE_seps=SEPS, pos_emb="alibi", separator_token_ids=SEPS,
                       prefill_local_window_size=4, generate_local_window_size=4),
    "adaptive_init": dict(separator_token_ids=SEPS, prefill_local_window_size=3, generate_local_window_size=3,
                          BATCH_ADAPTIVE_INIT_POS=True),
}


@pytest.mark.parametrize("layout,tp,residual", [("sequential", 1, True), ("pipeline", 2, True),
                                                 ("pipeline", 2, False)])
def test_full_attention_stock_gpt_neox(tmp_path, pythia_tokenizer_path, layout, tp, residual):
    cfg = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True, gpt_j_residual=residual)
    model, out = make_export(tmp_path, cfg, "neox", layout, tp)
    assert json.load(open(f"{out}/config.json"))["model_type"] == "gpt_neox"
    hf = GPTNeoXForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - trainer_logits(model, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("mode", sorted(SEPLLM_MODES))
def test_sepllm_modes_remote_code(tmp_path, pythia_tokenizer_path, mode):
    cfg = base_config(pythia_tokenizer_path, **SEPLLM_MODES[mode])
    model, out = make_export(tmp_path, cfg, "sepllm_gpt_neox", "pipeline", 1)
    config = json.load(open(f"{out}/config.json"))
    for key in ("separator_token_ids", "USE_BiPE", "USE_SA_SOFTMAX", "streamingLLM", "EXCLUDE_DIAGONAL",
                "BATCH_ADAPTIVE_INIT_POS", "auto_map", "prefill_loc_win_size_list"):
        assert key in config
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = random_ids(2, 40, seed=3)
    if mode == "adaptive_init":
        ids[0, :5] = 0  # Pythia PADDING_ID tokens shift row 0's initial tokens
    with torch.no_grad():
        got = hf(ids, use_cache=False).logits
    ref = trainer_logits(model, ids)
    assert (got - ref).abs().max().item() < TOL
    # the sparse modes really differ from full attention (the comparison above can fail)
    if mode in ("sepllm_n4", "streaming", "bipe_rotary"):
        hf.config.USE_ORIGINAL_FULL_ATTEN = True
        with torch.no_grad():
            full = hf(ids, use_cache=False).logits
        assert (full - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("architecture", ["neox", "sepllm_gpt_neox"])
def test_layers_trained_without_biases(tmp_path, pythia_tokenizer_path, architecture):
    """use_bias_in_norms / _mlp / _attn_linear false: zero biases (norms, MLP) or attention_bias false in HF."""
    extra = dict(USE_ORIGINAL_FULL_ATTEN=True) if architecture == "neox" else dict(
        separator_token_ids=SEPS, prefill_local_window_size=4, generate_local_window_size=4)
    cfg = base_config(pythia_tokenizer_path, use_bias_in_norms=False, use_bias_in_mlp=False,
                      use_bias_in_attn_linear=False, **extra)
    model, out = make_export(tmp_path, cfg, architecture, "pipeline", 1)
    assert not any(n.endswith("bias") for n in model.state_dict())
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        got = hf(ids, use_cache=False).logits
    assert (got - trainer_logits(model, ids)).abs().max().item() < TOL
