"""Every field is documented, the key reference in docs/configuration.md is current, internals names exist."""
from pathlib import Path

import pytest

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.reference_doc import BEGIN, END, render_reference

from .helpers import cpu, small

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Attribute names docs/internals.md promises on NeoXArgs.
INTERNALS_NAMES = """num_layers hidden_size num_attention_heads seq_length max_position_embeddings pos_emb rotary_pct
rotary_emb_base gpt_j_residual gpt_j_tied norm layernorm_epsilon no_weight_tying init_method output_layer_init_method
init_method_std activation hidden_dropout attention_dropout checkpoint_activations checkpoint_num_layers precision
padded_vocab_size train_micro_batch_size_per_gpu gradient_accumulation_steps train_batch_size global_num_gpus
data_parallel_size model_parallel_size pipe_parallel_size data_path train_data_paths valid_data_paths test_data_paths
train_data_weights split data_impl mmap_warmup use_shared_fs num_workers seed train_iters lr_decay_iters eval_interval
eval_iters tokenizer_type vocab_file merge_file make_vocab_size_divisible_by save load checkpoint_factor
extra_save_iters log_interval tensorboard_dir use_wandb iteration rank local_rank world_size separator_token_ids
PADDING_ID prefill_local_window_size generate_local_window_size USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS
USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS prefill_loc_win_size_list generate_win_loc_size_list init_tok_max_idx
USE_ORIGINAL_FULL_ATTEN streamingLLM USE_SEP_ATTN_KERNEL_ACCELERATOR RECOMPILE_SEP_ATTN_KERNEL BATCH_ADAPTIVE_INIT_POS
PRINT_KV_RATIO print_ratio_intervals USE_BiPE BiPE_seps EXCLUDE_DIAGONAL _DEFAULT_SPARSE_BLOCK_SIZE USE_SA_SOFTMAX
USE_SA_SOFTMAX_NO_DENO SA_Numerator_Bias SA_Denominator_Bias prefill_k generate_k torch_compile peak_tflops_per_gpu
max_consecutive_bad_steps eval_tasks text_gen_type maximum_tokens temperature top_p top_k sample_input_file
sample_output_file num_samples prompt_end neox_config_file""".split()


def test_every_field_documented_with_a_role():
    fields = NeoXArgs.fields()
    assert len(fields) > 150
    for name, field in fields.items():
        assert len(field.metadata["doc"]) > 10, name
        assert field.metadata["role"] in ("user", "derived", "internal"), name


def test_internals_names_exist():
    missing = [n for n in INTERNALS_NAMES if n not in NeoXArgs.fields()]
    assert missing == []


def test_key_reference_is_current():
    text = DOC.read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == render_reference().strip(), \
        "run: python -m megatron.neox_arguments.reference_doc docs/configuration.md"


def test_deepspeed_section_errors():
    with pytest.raises(ConfigError, match="'sparse_gradients' is true"):
        NeoXArgs.from_dict(small(sparse_gradients=True), env=cpu())
    with pytest.raises(ConfigError, match="'deepspeed_extra_args.scheduler'"):
        NeoXArgs.from_dict(small(deepspeed_extra_args={"scheduler": {"type": "WarmupLR"}}), env=cpu())
