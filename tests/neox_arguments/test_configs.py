"""GPT-NeoX Pythia configs and the reference's SepLLM sample configs load unchanged (paths only),
and the resolved config round-trips to a rank."""
import pytest

from megatron.neox_arguments import NeoXArgs

from .helpers import FIXTURES, fixture_with_paths, gpus, make_dataset, write


@pytest.fixture()
def local_setup(tmp_path, pythia_tokenizer_path):
    """The paths a GPT-NeoX user keeps in a separate local_setup.yml."""
    data = make_dataset(tmp_path, "pile_0.87_deduped_text_document")
    return write(tmp_path / "local_setup.yml", f"""
        data-path: {data}
        vocab-file: {pythia_tokenizer_path}
        save: {tmp_path / "checkpoints"}
        tensorboard-dir: {tmp_path / "tensorboard"}
        log-dir: {tmp_path / "logs"}
        use_wandb: false
        wandb_project: neox
        launcher: pdsh
        """)


@pytest.mark.parametrize("name,layers,hidden,heads,micro,lr", [
    ("pythia_160M.yml", 12, 768, 12, 32, 6e-4),
    ("pythia_1-4B.yml", 24, 2048, 16, 16, 2e-4),
])
def test_pythia_configs_load(local_setup, name, layers, hidden, heads, micro, lr):
    args = NeoXArgs.from_ymls([FIXTURES / name, local_setup], overrides={"user_script": "train.py"}, env=gpus(8))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (layers, hidden, heads)
    assert args.pos_emb == "rotary" and args.rotary_pct == 0.25 and args.gpt_j_residual and args.no_weight_tying
    assert args.precision == "fp16" and args.zero_stage == 1 and args.lr == lr
    assert args.padded_vocab_size == 50304
    # pipe-parallel-size 1 on 8 GPUs: data parallel 8, gas 1.
    assert (args.data_parallel_size, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps) == (8, micro, 1)
    assert args.train_batch_size == micro * 8
    assert args.lr_decay_iters == 143000 and args.warmup_iters == 1430 and args.lr_decay_style == "cosine"
    assert args.extra_save_iters[-1] == 512 and args.checkpoint_factor == 1000
    # No SepLLM keys: a GPT-NeoX config, so full attention as its attention_config says (the fork's default
    # would have been the Sep-Attention kernel); the checker's full-attention rewrites follow.
    assert args.USE_ORIGINAL_FULL_ATTEN and not args.USE_SEP_ATTN_KERNEL_ACCELERATOR
    assert args.attention_variant == "full" and args.attention_config == ["global"] * layers
    ds = args.deepspeed_config()
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["zero_optimization"]["reduce_bucket_size"] == 500000000


def test_sepllm_sample_config_loads(tmp_path, pythia_tokenizer_path):
    data = make_dataset(tmp_path, "pile_0.87_deduped_text_document")
    path = fixture_with_paths(tmp_path, "sepllm_160m_n64H_NOkernel.yml", data, pythia_tokenizer_path)
    args = NeoXArgs.from_ymls([path], overrides={"user_script": "train.py"}, env=gpus(8))
    assert args.USE_SEP_ATTN_KERNEL_ACCELERATOR is False and args.USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS
    assert args.prefill_loc_win_size_list == [2048] + [64] * 11
    assert args.separator_token_ids == [15, 13, 32, 2, 28, 27, 209, 186, 187]
    assert args.PRINT_KV_RATIO and args.print_ratio_intervals == 8000 and args.init_tok_max_idx == 2
    assert args.train_batch_size == 1024 and args.gradient_accumulation_steps == 4
    assert args.scaled_masked_softmax_fusion and args.launcher == "pdsh"
    assert args.train_data_paths == [data]


def test_sepllm_kernel_sample_merges_with_pythia(local_setup):
    args = NeoXArgs.from_ymls([FIXTURES / "pythia_160M.yml", FIXTURES / "sepllm_debug_kernel_bipe.yml", local_setup],
                              env=gpus(8))
    assert args.USE_SEP_ATTN_KERNEL_ACCELERATOR and args.RECOMPILE_SEP_ATTN_KERNEL
    assert args.prefill_loc_win_size_list == [2048] + [64] * 10 + [2048]
    assert args.BiPE_seps == [15, 13, 32, 2, 28, 27, 209, 186, 187] and args.USE_BiPE is False


def test_resolved_config_round_trip(tmp_path, local_setup):
    args = NeoXArgs.from_ymls([FIXTURES / "pythia_160M.yml", local_setup], overrides={"user_script": "train.py"},
                              env=gpus(8))
    path = args.save_resolved(str(tmp_path / "resolved" / "cfg.yml"))
    assert not [p for p in (tmp_path / "resolved").iterdir() if p.name != "cfg.yml"]  # no tmp file left behind
    on_rank = NeoXArgs.consume_neox_args(["--local_rank=3", "--neox_config_file", path],
                                         env=gpus(8, WORLD_SIZE=8, RANK=3, LOCAL_RANK=3))
    before, after = args.to_dict(), on_rank.to_dict()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"rank", "local_rank", "world_size", "neox_config_file"}
    assert (on_rank.rank, on_rank.local_rank, on_rank.world_size) == (3, 3, 8)
    assert on_rank.deepspeed_config() == args.deepspeed_config()
    assert on_rank.config_files["pythia_160M.yml"] == (FIXTURES / "pythia_160M.yml").read_text()


def test_rank_with_other_world_size_is_rejected(tmp_path, local_setup):
    from megatron.neox_arguments import ConfigError

    args = NeoXArgs.from_ymls([FIXTURES / "pythia_160M.yml", local_setup], env=gpus(8))
    path = args.save_resolved(str(tmp_path / "cfg.yml"))
    with pytest.raises(ConfigError, match="inconsistent batch sizes"):
        NeoXArgs.consume_neox_args(["--neox_config_file", path], env=gpus(8, WORLD_SIZE=4, RANK=0, LOCAL_RANK=0))


def test_consume_without_config_file_flag():
    from megatron.neox_arguments import ConfigError

    with pytest.raises(ConfigError, match="missing --neox_config_file"):
        NeoXArgs.consume_neox_args(["--local_rank=0"])
