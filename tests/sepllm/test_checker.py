"""The argument checker: one test per rule of the reference's SepLLMArgumentsChecker (section 2)."""
import pytest
import torch

from megatron.model.sepllm import checker
from megatron.model.sepllm.checker import check_sepllm_args
from tests.sepllm import brute


def _fails(key, **overrides):
    with pytest.raises(ValueError, match=f"'{key}'"):
        check_sepllm_args(brute.unvalidated(**overrides))


def test_valid_sepllm_kernel_config_passes_unchanged():
    args = brute.unvalidated()
    assert check_sepllm_args(args) == []
    assert args.USE_SEP_ATTN_KERNEL_ACCELERATOR is True


def test_rule1_at_most_one_mode():
    _fails("USE_SA_SOFTMAX", streamingLLM=True, USE_SA_SOFTMAX=True)
    _fails("streamingLLM", USE_ORIGINAL_FULL_ATTEN=True, streamingLLM=True)
    _fails("USE_SA_SOFTMAX_NO_DENO", USE_SA_SOFTMAX=True, USE_SA_SOFTMAX_NO_DENO=True)


@pytest.mark.parametrize("mode", ["USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "USE_SA_SOFTMAX"])
def test_rule1_fix_default_kernel_flag_gives_way(mode, capsys):
    args = brute.unvalidated(**{mode: True})  # kernel flag left at its default True
    lines = check_sepllm_args(args)
    assert args.USE_SEP_ATTN_KERNEL_ACCELERATOR is False
    assert ">> USE_SEP_ATTN_KERNEL_ACCELERATOR: True ----changed to----> False" in lines
    assert lines[0] in capsys.readouterr().out


def test_rule2_full_attention_rewrites():
    args = brute.unvalidated(USE_ORIGINAL_FULL_ATTEN=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, seq_length=64,
                             USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[64, 8],
                             USE_BiPE=True, BiPE_seps=[3], PRINT_KV_RATIO=True, BATCH_ADAPTIVE_INIT_POS=True,
                             attention_config=["global", "local"])
    lines = check_sepllm_args(args)
    assert (args.separator_token_ids, args.prefill_local_window_size, args.generate_local_window_size,
            args.init_tok_max_idx) == ([-1], 64, 64, -1)
    assert not (args.USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS or args.USE_BiPE or args.PRINT_KV_RATIO
                or args.BATCH_ADAPTIVE_INIT_POS)
    assert args.BiPE_seps is None and args.attention_config == ["global", "global"]
    assert ">> separator_token_ids: [3, 7] ----changed to----> [-1]" in lines
    compact = brute.unvalidated(USE_ORIGINAL_FULL_ATTEN=True, attention_config=[[["local"], 2]])
    check_sepllm_args(compact)
    assert compact.attention_config == [[["global"], 2]]


def test_rule3_streaming_constraints():
    args = brute.unvalidated(streamingLLM=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, separator_token_ids=None)
    assert check_sepllm_args(args) == [">> separator_token_ids: None ----changed to----> [-1]"]
    _fails("USE_BiPE", streamingLLM=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, USE_BiPE=True, BiPE_seps=[3])
    _fails("init_tok_max_idx", streamingLLM=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, init_tok_max_idx=-1)
    _fails("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", streamingLLM=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
           USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[4, 4])
    _fails("attention_config", streamingLLM=True, attention_config=["global", "local"])


def test_rule4_sa_needs_global_attention():
    _fails("attention_config", USE_SA_SOFTMAX_NO_DENO=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
           attention_config=[[["local"], 2]])
    assert check_sepllm_args(brute.unvalidated(USE_SA_SOFTMAX=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False,
                                               separator_token_ids=[-1])) == []


def test_rule5_kernel_torch_version(monkeypatch):
    kernel, mask = brute.unvalidated(), brute.unvalidated(USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ValueError, match="'USE_SEP_ATTN_KERNEL_ACCELERATOR'"):
        check_sepllm_args(kernel)
    assert check_sepllm_args(mask) == []


def test_rule5_separator_ids():
    _fails("separator_token_ids", separator_token_ids=[-1])
    _fails("separator_token_ids", separator_token_ids=[])
    _fails("separator_token_ids", separator_token_ids="13")


def test_rule5_separators_derived_from_pythia_tokenizer(pythia_tokenizer_path, capsys):
    args = brute.unvalidated(separator_token_ids=None, tokenizer_type="HFTokenizer",
                             vocab_file=str(pythia_tokenizer_path), make_vocab_size_divisible_by=128)
    lines = check_sepllm_args(args)
    assert args.separator_token_ids == [15, 13, 32, 2, 28, 27, 209, 186, 187]
    assert lines == [">> separator_token_ids: None ----changed to----> [15, 13, 32, 2, 28, 27, 209, 186, 187]"]
    assert "derived from the HFTokenizer tokenizer" in capsys.readouterr().out


def test_rule5_separators_absent_without_tokenizer():
    _fails("separator_token_ids", separator_token_ids=None, tokenizer_type=None)


def test_rule6_padding_id_and_windows():
    _fails("PADDING_ID", PADDING_ID=1)
    _fails("prefill_local_window_size", prefill_local_window_size=0)
    _fails("generate_local_window_size", generate_local_window_size=0)


def test_rule7_recompile_needs_kernel():
    _fails("RECOMPILE_SEP_ATTN_KERNEL", RECOMPILE_SEP_ATTN_KERNEL=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    assert check_sepllm_args(brute.unvalidated(RECOMPILE_SEP_ATTN_KERNEL=True)) == []


def test_rule8_differing_windows_is_a_note(capsys):
    assert check_sepllm_args(brute.unvalidated(generate_local_window_size=64)) == []
    assert "differs from prefill_local_window_size" in capsys.readouterr().out


def test_rule9_per_layer_lists():
    _fails("prefill_loc_win_size_list", USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[4])
    _fails("prefill_loc_win_size_list", USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[4, 0])
    _fails("generate_win_loc_size_list", USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS=True, generate_win_loc_size_list=None)


def test_rule10_init_tok_max_idx():
    _fails("init_tok_max_idx", init_tok_max_idx=-2)
    assert check_sepllm_args(brute.unvalidated(init_tok_max_idx=-1)) == []


def test_rule11_bipe():
    _fails("BiPE_seps", USE_BiPE=True, BiPE_seps=None)
    _fails("BiPE_seps", USE_BiPE=True, BiPE_seps=[-1])
    _fails("rope_fusion", USE_BiPE=True, BiPE_seps=[3], rope_fusion=True)
    _fails("pos_emb", USE_BiPE=True, BiPE_seps=[3], pos_emb="learned")


def test_rule12_adaptive_init_warning(capsys):
    assert check_sepllm_args(brute.unvalidated(BATCH_ADAPTIVE_INIT_POS=True)) == []
    assert "BATCH_ADAPTIVE_INIT_POS is meant for left-padded evaluation" in capsys.readouterr().out


def test_mode_flags_must_be_booleans():
    _fails("streamingLLM", streamingLLM="yes")
    assert checker.MODE_FLAGS[2] == "USE_SEP_ATTN_KERNEL_ACCELERATOR"


def test_fixllm_rules():
    """USE_FIXED_SEP_INTERVALs: one interval >= 1 per layer, exclusive with the other modes, kernel flag off."""
    ok = brute.unvalidated(USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[4, 4],
                           USE_SEP_ATTN_KERNEL_ACCELERATOR=True)
    assert check_sepllm_args(ok) == [">> USE_SEP_ATTN_KERNEL_ACCELERATOR: True ----changed to----> False"]
    _fails("fixed_sep_intervals_list", USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=None)
    _fails("fixed_sep_intervals_list", USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[4])
    _fails("fixed_sep_intervals_list", USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[4, 0])
    _fails("USE_FIXED_SEP_INTERVALs", USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[4, 4],
           streamingLLM=True)
