"""Derived values and validation errors (each message names the key and the value)."""
import os
import sys
import types

import pytest

from megatron.neox_arguments import ConfigError, NeoXArgs

from .helpers import cpu, gpus, make_dataset, small


# ----------------------------------------------------------------------------- batch sizes and world
@pytest.mark.parametrize("given,expected", [
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, (64, 4, 2)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, (64, 2, 4)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 8}, (64, 1, 8)),
    ({"train_batch_size": 64}, (64, 8, 1)),
    ({}, (8, 1, 1)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, (64, 4, 2)),
])
def test_batch_two_of_three(given, expected):
    args = NeoXArgs.from_dict(small(**given), env=gpus(8))
    assert args.global_num_gpus == 8 and args.data_parallel_size == 8
    assert (args.train_batch_size, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps) == expected
    assert args.train_batch_size == args.train_micro_batch_size_per_gpu * args.gradient_accumulation_steps * 8


def test_inconsistent_batch_sizes():
    with pytest.raises(ConfigError, match=r"train_batch_size=100 .*=4 x gradient_accumulation_steps=2 x "
                                          r"data_parallel_size=8 = 64"):
        NeoXArgs.from_dict(small(train_batch_size=100, train_micro_batch_size_per_gpu=4,
                                 gradient_accumulation_steps=2), env=gpus(8))
    with pytest.raises(ConfigError, match=r"train_batch_size=60 is not divisible"):
        NeoXArgs.from_dict(small(train_batch_size=60, train_micro_batch_size_per_gpu=4), env=gpus(8))
    with pytest.raises(ConfigError, match=r"'gradient_accumulation_steps' must be >= 1, got 0"):
        NeoXArgs.from_dict(small(gradient_accumulation_steps=0), env=cpu())


def test_data_parallel_size_from_pipeline():
    args = NeoXArgs.from_dict(small(pipe_parallel_size=2, train_micro_batch_size_per_gpu=2), env=gpus(8))
    assert args.data_parallel_size == 4 and args.is_pipe_parallel and args.train_batch_size == 8
    with pytest.raises(ConfigError, match=r"world size 3 .*not divisible by pipe_parallel_size x model_parallel_size"
                                          r" = 2 x 1"):
        NeoXArgs.from_dict(small(pipe_parallel_size=2), env=gpus(3))


def test_cpu_processes_and_num_gpus():
    assert NeoXArgs.from_dict(small(), env=cpu()).global_num_gpus == 1
    args = NeoXArgs.from_dict(small(num_gpus=2), env=cpu())
    assert args.global_num_gpus == 2 and args.distributed_backend == "gloo"
    assert NeoXArgs.from_dict(small(num_gpus=2), env=gpus(4)).global_num_gpus == 2
    assert NeoXArgs.from_dict(small(include="localhost:1,3"), env=gpus(4)).global_num_gpus == 2
    with pytest.raises(ConfigError, match=r"'num_gpus' is 5 but only 4 GPU"):
        NeoXArgs.from_dict(small(num_gpus=5), env=gpus(4))


def test_world_size_from_environment_on_rank():
    args = NeoXArgs.from_dict(small(train_micro_batch_size_per_gpu=2), env=cpu(WORLD_SIZE=4, RANK=3, LOCAL_RANK=1))
    assert (args.global_num_gpus, args.world_size, args.rank, args.local_rank) == (4, 4, 3, 1)
    assert args.train_batch_size == 8


# ----------------------------------------------------------------------------- model checks
def test_model_errors():
    with pytest.raises(ConfigError, match="num_attention_heads=5 does not divide hidden_size=64"):
        NeoXArgs.from_dict(small(num_attention_heads=5), env=cpu())
    with pytest.raises(ConfigError, match="seq_length=64 exceeds max_position_embeddings=32"):
        NeoXArgs.from_dict(small(seq_length=64, max_position_embeddings=32), env=cpu())
    with pytest.raises(ConfigError, match="'rotary_pct' must be in"):
        NeoXArgs.from_dict(small(pos_emb="rotary", rotary_pct=1.5), env=cpu())
    with pytest.raises(ConfigError, match="'num_attention_heads' is 4, which is not divisible by model_parallel_size=3"):
        NeoXArgs.from_dict(small(model_parallel_size=3), env=gpus(3))
    with pytest.raises(ConfigError, match="'attention_config' describes 3 layers but num_layers is 2"):
        NeoXArgs.from_dict(small(attention_config=[[["global"], 3]]), env=cpu())
    with pytest.raises(ConfigError, match="attention_config type 'sparse_fixed'.*DeepSpeed sparse attention"):
        NeoXArgs.from_dict(small(attention_config=[[["sparse_fixed"], 2]]), env=cpu())
    with pytest.raises(ConfigError, match="attention type 'sparse_fixd'"):  # not a GPT-NeoX type either
        NeoXArgs.from_dict(small(attention_config=[[["sparse_fixd"], 2]]), env=cpu())


def test_model_defaults_derived():
    args = NeoXArgs.from_dict(small(max_position_embeddings=None, attention_config=[[["flash", "global"], 1]]),
                              env=cpu())
    assert args.max_position_embeddings == 32 and args.intermediate_size == 256
    assert args.attention_config == ["global", "global"]  # full attention rewrites every entry to global


@pytest.mark.parametrize("pipe,stages", [(0, 1), (1, 1), (2, 2)])
def test_pipe_stages_derived(pipe, stages):
    args = NeoXArgs.from_dict(small(pipe_parallel_size=pipe), env=gpus(4))
    assert args.pipe_stages == stages and args.data_parallel_size == 4 // stages


def test_attention_variant_derived_and_not_overridden():
    sepllm = dict(USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=[3])
    # The kernel flag defaults to True and gives way to any other mode (the checker's rule 1).
    for flags, variant in (({}, "full"), (dict(sepllm), "sep_kernel"),
                           (dict(sepllm, USE_SEP_ATTN_KERNEL_ACCELERATOR=False), "sepllm_mask"),
                           (dict(sepllm, streamingLLM=True), "streamingllm"),
                           (dict(sepllm, USE_SA_SOFTMAX=True), "sa_softmax")):
        args = NeoXArgs.from_dict(small(**flags), env=cpu())
        assert args.attention_variant == variant, flags
        assert NeoXArgs.from_dict(args.to_dict(), env=cpu()).attention_variant == variant  # resolved, re-read
    with pytest.raises(ConfigError, match="key 'attention_variant' is given as 'sep_kernel' but is derived as "
                                          "'full'"):
        NeoXArgs.from_dict(small(attention_variant="sep_kernel"), env=cpu())


# ----------------------------------------------------------------------------- precision
def test_precision_derivation():
    assert NeoXArgs.from_dict(small(), env=cpu()).precision == "fp32"
    assert NeoXArgs.from_dict(small(bf16={"enabled": True}), env=cpu()).precision == "bfloat16"
    assert NeoXArgs.from_dict(small(bf16=True), env=cpu()).precision == "bfloat16"
    args = NeoXArgs.from_dict(small(precision="bf16"), env=cpu())
    assert args.precision == "bfloat16" and args.bf16 == {"enabled": True}
    assert NeoXArgs.from_dict(small(fp16={"enabled": True}), env=gpus(1)).precision == "fp16"
    assert NeoXArgs.from_dict(small(fp16={"enabled": False}), env=gpus(1)).precision == "fp32"
    args = NeoXArgs.from_dict(small(precision="fp16"), env=gpus(1))
    assert args.fp16 == {"enabled": True}


def test_precision_errors():
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA GPU"):
        NeoXArgs.from_dict(small(fp16={"enabled": True}), env=cpu())
    with pytest.raises(ConfigError, match="'fp16' and 'bf16' are both enabled"):
        NeoXArgs.from_dict(small(fp16={"enabled": True}, bf16={"enabled": True}), env=gpus(1))
    with pytest.raises(ConfigError, match="'precision' is 'fp32' but the 'bf16' section is enabled"):
        NeoXArgs.from_dict(small(precision="fp32", bf16=True), env=cpu())
    with pytest.raises(ConfigError, match="'precision' is 'fp8'"):
        NeoXArgs.from_dict(small(precision="fp8"), env=cpu())
    with pytest.raises(ConfigError, match=r"'fp16.loss_scal' is unknown \(did you mean 'loss_scale'"):
        NeoXArgs.from_dict(small(fp16={"loss_scal": 0}), env=gpus(1))


# ----------------------------------------------------------------------------- optimizer and schedule
def test_optimizer_and_schedule_derivation():
    args = NeoXArgs.from_dict(small(optimizer={"type": "AdamW", "params": {"lr": 3e-4}}, train_iters=1000,
                                    warmup=0.01), env=cpu())
    assert args.optimizer_type == "adamw" and args.lr == 3e-4
    assert args.lr_decay_iters == 1000 and args.warmup_iters == 10
    args = NeoXArgs.from_dict(small(lr=1e-3, train_iters=1000, lr_decay_iters=500, warmup_iters=7), env=cpu())
    assert args.lr == 1e-3 and args.lr_decay_iters == 500 and args.warmup_iters == 7
    with pytest.raises(ConfigError, match="'warmup' .* and 'warmup_iters' .* are both given"):
        NeoXArgs.from_dict(small(train_iters=10, warmup=0.1, warmup_iters=1), env=cpu())
    with pytest.raises(ConfigError, match="optimizer.type' is 'Adamax'"):
        NeoXArgs.from_dict(small(optimizer={"type": "Adamax", "params": {}}), env=cpu())
    with pytest.raises(ConfigError, match=r"'lr' \(0.1\) disagrees with 'optimizer.params.lr' \(0.001\)"):
        NeoXArgs.from_dict(small(lr=0.1, optimizer={"type": "Adam", "params": {"lr": 1e-3}}), env=cpu())
    with pytest.raises(ConfigError, match="min_lr=0.1 exceeds lr=0.01"):
        NeoXArgs.from_dict(small(lr=0.01, min_lr=0.1), env=cpu())
    assert NeoXArgs.from_dict(small(lr_decay_style="exponential"), env=cpu()).lr_decay_style == "exponential"
    with pytest.raises(ConfigError, match="'lr_decay_style' has value 'triangular'"):
        NeoXArgs.from_dict(small(lr_decay_style="triangular"), env=cpu())
    with pytest.raises(ConfigError, match=r"warmup \(200 iterations.*longer than lr_decay_iters \(100\)"):
        NeoXArgs.from_dict(small(lr=1e-3, train_iters=100, warmup=200), env=cpu())


def test_training_script_needs_iters_lr_data(tmp_path):
    script = {"user_script": "/somewhere/train.py"}
    with pytest.raises(ConfigError, match="'train_iters' is required"):
        NeoXArgs.from_dict(small(**script, lr=1e-3), env=cpu())
    with pytest.raises(ConfigError, match="no learning rate"):
        NeoXArgs.from_dict(small(**script, train_iters=10), env=cpu())
    with pytest.raises(ConfigError, match="no training data"):
        NeoXArgs.from_dict(small(**script, train_iters=10, lr=1e-3), env=cpu())
    data = make_dataset(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer_type GPT2BPETokenizer needs key 'vocab_file'"):
        NeoXArgs.from_dict(small(**script, train_iters=10, lr=1e-3, data_path=data), env=cpu())
    args = NeoXArgs.from_dict(small(**script, train_iters=10, lr=1e-3, data_path=data,
                                    tokenizer_type="CharLevelTokenizer"), env=cpu())
    from megatron.tokenizer import make_tokenizer

    vocab = make_tokenizer("CharLevelTokenizer").vocab_size
    assert args.padded_vocab_size == -(-vocab // 128) * 128 and args.padded_vocab_size % 128 == 0


# ----------------------------------------------------------------------------- files
def test_missing_data_files(tmp_path):
    data = make_dataset(tmp_path)
    os.remove(data + ".idx")
    with pytest.raises(ConfigError, match=r"key 'data_path': dataset .* is missing .*\.idx"):
        NeoXArgs.from_dict(small(data_path=data), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'valid_data_paths': dataset '/nope/x' is missing /nope/x.bin"):
        NeoXArgs.from_dict(small(valid_data_paths=["/nope/x"]), env=cpu())
    good = make_dataset(tmp_path, "good")
    with pytest.raises(ConfigError, match="'train_data_weights' has 1 entries but 'train_data_paths' has 2"):
        NeoXArgs.from_dict(small(train_data_paths=[good, good], train_data_weights=[1.0]), env=cpu())
    with pytest.raises(ConfigError, match="'data_path' and 'train_data_paths' are both given"):
        NeoXArgs.from_dict(small(data_path=good, train_data_paths=[good]), env=cpu())
    with pytest.raises(ConfigError, match="key 'split' is '90,x'"):
        NeoXArgs.from_dict(small(data_path=good, split="90,x"), env=cpu())


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'vocab_file': tokenizer file not found: .*missing.json"):
        NeoXArgs.from_dict(small(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "missing.json")),
                           env=cpu())


def test_padded_vocab_from_pythia_tokenizer(pythia_tokenizer_path):
    d = small(tokenizer_type="HFTokenizer", vocab_file=str(pythia_tokenizer_path))
    del d["padded_vocab_size"]
    assert NeoXArgs.from_dict(d, env=cpu()).padded_vocab_size == 50304
    assert NeoXArgs.from_dict(dict(d, make_vocab_size_divisible_by=1000), env=cpu()).padded_vocab_size == 51000


def test_load_without_checkpoint(tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"key 'load': load=.*ckpt: no checkpoint there"):
        NeoXArgs.from_dict(small(load=str(empty)), env=cpu())
    with pytest.raises(ConfigError, match="key 'load': checkpoint directory not found"):
        NeoXArgs.from_dict(small(load=str(tmp_path / "nope")), env=cpu())
    # A global_step directory that 'latest' does not name may be a save that never finished: naming the
    # save directory is not enough, naming the step directory itself is.
    (empty / "global_step10").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint there"):
        NeoXArgs.from_dict(small(load=str(empty)), env=cpu())
    step = str(empty / "global_step10")
    assert NeoXArgs.from_dict(small(load=step), env=cpu()).load == step
    (empty / "latest").write_text("global_step10")
    assert NeoXArgs.from_dict(small(load=str(empty)), env=cpu()).load == str(empty)
    (empty / "latest").write_text("global_step20")
    with pytest.raises(ConfigError, match="'latest' names checkpoint 'global_step20'"):
        NeoXArgs.from_dict(small(load=str(empty)), env=cpu())


def test_zero_stage_and_pipeline():
    args = NeoXArgs.from_dict(small(zero_optimization={"stage": 2}), env=cpu())
    assert args.zero_stage == 2
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 cannot be used with pipe_parallel_size=1"):
        NeoXArgs.from_dict(small(zero_optimization={"stage": 2}, pipe_parallel_size=1), env=cpu())
    with pytest.raises(ConfigError, match=r"'zero_optimization.stage' is 4"):
        NeoXArgs.from_dict(small(zero_optimization={"stage": 4}), env=cpu())


def test_misc_ranges():
    with pytest.raises(ConfigError, match="'eval_interval' must be >= 1, got 0"):
        NeoXArgs.from_dict(small(eval_interval=0), env=cpu())
    with pytest.raises(ConfigError, match="'max_consecutive_bad_steps' must be >= 1"):
        NeoXArgs.from_dict(small(max_consecutive_bad_steps=0), env=cpu())
    with pytest.raises(ConfigError, match="'hidden_dropout' must be in"):
        NeoXArgs.from_dict(small(hidden_dropout=1.0), env=cpu())
    with pytest.raises(ConfigError, match="'extra_save_iters' must be a list"):
        NeoXArgs.from_dict(small(extra_save_iters=[1, -2]), env=cpu())


def test_project_key_defaults():
    args = NeoXArgs.from_dict(small(), env=cpu())
    assert args.torch_compile is False and args.peak_tflops_per_gpu == 989.0
    assert args.max_consecutive_bad_steps == 10 and args.eval_tasks is None


# ----------------------------------------------------------------------------- SepLLM checker hook
def test_sepllm_defaults_match_reference():
    args = NeoXArgs.fields()
    expected = {"separator_token_ids": None, "PADDING_ID": 0, "prefill_k": 0, "generate_k": 0,
                "prefill_local_window_size": 256, "generate_local_window_size": 256,
                "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": False,
                "prefill_loc_win_size_list": None, "generate_win_loc_size_list": None, "init_tok_max_idx": 2,
                "USE_ORIGINAL_FULL_ATTEN": False, "streamingLLM": False, "USE_SEP_ATTN_KERNEL_ACCELERATOR": True,
                "RECOMPILE_SEP_ATTN_KERNEL": False, "BATCH_ADAPTIVE_INIT_POS": False, "PRINT_KV_RATIO": False,
                "print_ratio_intervals": 8000, "USE_BiPE": False, "BiPE_seps": None, "EXCLUDE_DIAGONAL": True,
                "_DEFAULT_SPARSE_BLOCK_SIZE": 128, "USE_SA_SOFTMAX": False, "USE_SA_SOFTMAX_NO_DENO": False,
                "SA_Numerator_Bias": 0.0, "SA_Denominator_Bias": 1e-10}
    assert {k: args[k].default for k in expected} == expected


def _fake_checker(monkeypatch, fn):
    module = types.ModuleType("megatron.model.sepllm.checker")
    module.check_sepllm_args = fn
    monkeypatch.setitem(sys.modules, "megatron.model.sepllm.checker", module)


def test_checker_hook_called_and_rewrites_kept(monkeypatch):
    seen = []

    def check(args):
        seen.append(args.num_layers)
        args.prefill_local_window_size = 7
        return [">> prefill_local_window_size: 256 ----changed to----> 7"]

    _fake_checker(monkeypatch, check)
    args = NeoXArgs.from_dict(small(), env=cpu())
    assert seen == [2] and args.prefill_local_window_size == 7
    assert args._sepllm_changes == [">> prefill_local_window_size: 256 ----changed to----> 7"]


def test_checker_violation_becomes_config_error(monkeypatch):
    def check(args):
        raise ValueError("separator_token_ids must be a non-empty list, got [-1]")

    _fake_checker(monkeypatch, check)
    with pytest.raises(ConfigError, match="SepLLM argument check failed: separator_token_ids"):
        NeoXArgs.from_dict(small(), env=cpu())


def test_real_checker_rejects_two_modes():
    with pytest.raises(ConfigError, match="SepLLM argument check failed"):
        NeoXArgs.from_dict(small(streamingLLM=True), env=cpu())
