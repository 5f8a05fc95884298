"""The reference's training-free config files (flow mappings, comments, anchors), the shipped Pythia configs,
settings saved with a model, separators from the tokenizer, and every refusal naming its key."""
import json
from pathlib import Path

import pytest
import torch

from megatron.hf.training_free import (TrainingFreeConfigError, UnsupportedModelError, apply_sepllm, load_config,
                                       sepllm_settings, write_saved_config)
from tests.hf.helpers import SEPS as PYTHIA_SEPS
from tests.hf.training_free_models import random_ids, sepllm_config, tiny_model

REPO = Path(__file__).resolve().parents[2]
LLAMA3 = sorted((Path(__file__).parent / "fixtures" / "training_free").glob("llama3_*.yml"))
SHIPPED = sorted((REPO / "configs" / "training_free").glob("*.yml"))
EXPECTED_MODES = {"sepllm_a3_n256": "sepllm", "fixllm_a3_n256_int5": "fixllm",
                  "streamingllm_a3_n256": "streamingllm", "original_vanilla": "full"}


def _mode_of(path: Path) -> str:
    return next(mode for suffix, mode in EXPECTED_MODES.items() if path.stem.endswith(suffix))


def test_the_four_reference_configs_and_the_four_shipped_ones_exist():
    assert len(LLAMA3) == 4 and len(SHIPPED) == 4
    assert sorted(_mode_of(p) for p in SHIPPED) == sorted(EXPECTED_MODES.values())


@pytest.mark.parametrize("path", LLAMA3, ids=lambda p: p.stem)
def test_reference_llama3_configs_parse_and_apply(path):
    cfg = load_config(path)
    assert cfg.mode == _mode_of(path)
    assert cfg.generate_win_loc_size_list == cfg.prefill_loc_win_size_list  # the *PREFILL_LOC_WINS_ANCHOR alias
    assert cfg.separator_token_ids in ([13, 11, 30, 0, 26, 25, 198, 220, 128000], [-1])
    if cfg.mode != "fixllm":
        assert cfg.fixed_sep_intervals_list is None  # the reference's None
    model = tiny_model("llama", "sdpa", layers=32)  # Layer_num 32, as Llama-3-8B
    settings = apply_sepllm(model, path)
    assert settings.num_init == 3 and settings.adaptive_init == (cfg.mode != "full")
    if cfg.mode == "fixllm":
        assert settings.intervals == (5,) * 32
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 12, seed=1)).logits).all()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_pythia_configs_apply_to_a_pythia_shaped_model(path, capsys):
    model = tiny_model("gpt_neox", "sdpa", layers=12)
    settings = apply_sepllm(model, path)
    assert settings.mode == _mode_of(path)
    if settings.mode == "sepllm":
        assert settings.separator_ids == tuple(PYTHIA_SEPS)
    with torch.no_grad():
        model(random_ids(1, 12, seed=1))


def test_separators_and_padding_come_from_the_tokenizer_when_absent(pythia_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(pythia_tokenizer_path), eos_token="<|endoftext|>")
    cfg = sepllm_config(BATCH_ADAPTIVE_INIT_POS=True)
    del cfg["separator_token_ids"], cfg["PADDING_ID"]
    settings = apply_sepllm(tiny_model("gpt_neox", "sdpa"), cfg, tokenizer=tok)
    assert list(settings.separator_ids) == PYTHIA_SEPS  # what the trainer's checker derives
    assert settings.padding_id == 0  # <|endoftext|>: Pythia has no pad token
    with pytest.raises(TrainingFreeConfigError, match="separator_token_ids is not set"):
        apply_sepllm(tiny_model("gpt_neox", "sdpa"), {k: v for k, v in cfg.items()})


def test_settings_saved_with_a_model_directory(tmp_path):
    model = tiny_model("mistral", "sdpa")
    model.save_pretrained(tmp_path / "m")
    write_saved_config(sepllm_config(prefill_local_window_size=3), tmp_path / "m")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="sdpa")
    assert apply_sepllm(loaded).prefill_windows == (3, 3)
    config_json = tmp_path / "m" / "config.json"
    data = json.loads(config_json.read_text())
    data["sepllm_config"] = sepllm_config(prefill_local_window_size=5)  # the config.json field wins
    config_json.write_text(json.dumps(data))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="sdpa")
    apply_sepllm(loaded)
    assert sepllm_settings(loaded).prefill_windows == (5, 5)
    bare = tiny_model("llama", "sdpa")
    with pytest.raises(TrainingFreeConfigError, match="none saved with the model"):
        apply_sepllm(bare)


BAD = [
    ({"Layer_num": 3}, "Layer_num is 3 but the model has 2 layers"),
    ({"USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True, "prefill_loc_win_size_list": [4, 4, 4]},
     "prefill_loc_win_size_list has 3 entries"),
    ({"USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": True, "generate_win_loc_size_list": None},
     "generate_win_loc_size_list must be a list"),
    ({"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [5]}, "fixed_sep_intervals_list has 1 entries"),
    ({"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [5, 0]}, "fixed_sep_intervals_list must be >= 1"),
    ({"USE_BiPE": True}, "USE_BiPE is true, but BiPE"),
    ({"USE_SA_SOFTMAX": True}, "USE_SA_SOFTMAX is true"),
    ({"USE_SA_SOFTMAX_NO_DENO": True}, "USE_SA_SOFTMAX_NO_DENO is true"),
    ({"USE_SEP_ATTN_KERNEL_ACCELERATOR": True}, "USE_SEP_ATTN_KERNEL_ACCELERATOR is true"),
    ({"streamingLLM": True, "USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [5, 5]},
     "USE_FIXED_SEP_INTERVALs and streamingLLM are both true"),
    ({"USE_ORIGINAL_FULL_ATTEN": True, "streamingLLM": True}, "USE_ORIGINAL_FULL_ATTEN and streamingLLM"),
    ({"prefill_k": 4}, "prefill_k is 4"),
    ({"separator_token_ids": [-1]}, r"separator_token_ids is \[-1\]"),
    ({"prefill_local_window_size": 0}, "prefill_local_window_size must be >= 1"),
    ({"EXCLUDE_DIAGONAL": "yes"}, "EXCLUDE_DIAGONAL' must be True or False"),
    ({"init_tok_max_idx": -2}, "init_tok_max_idx must be >= -1"),
    ({"prefill_local_windows_size": 4}, "unknown key 'prefill_local_windows_size' \\(did you mean "
                                        "'prefill_local_window_size'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_are_refused_by_name_before_model_work(overrides, message):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(TrainingFreeConfigError, match=message):
        apply_sepllm(model, sepllm_config(**overrides))
    assert sepllm_settings(model) is None  # nothing was applied


def test_bad_file_and_unsupported_models(tmp_path):
    with pytest.raises(TrainingFreeConfigError, match="no such file"):
        load_config(tmp_path / "missing.yml")
    (tmp_path / "list.yml").write_text("[1, 2]\n")
    with pytest.raises(TrainingFreeConfigError, match="expected one mapping"):
        load_config(tmp_path / "list.yml")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=48))
    with pytest.raises(UnsupportedModelError, match="model family 'gpt2'"):
        apply_sepllm(gpt2, sepllm_config())
    model = tiny_model("qwen2", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation 'flash_attention_2'.*sep_cache"):
        apply_sepllm(model, sepllm_config())
