"""The DeepSpeed config derived from the arguments, and DeepSpeed's own parser accepting it."""
import pytest

from megatron.neox_arguments import NeoXArgs

from .helpers import cpu, gpus, small

PYTHIA_FP16 = {"fp16": True, "enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
               "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}


def _ds_parse(config):
    """DeepSpeed's config parser (world size 1 in this process, so scale the batch to one rank)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = dict(config)
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    return DeepSpeedConfig(config)


def test_batch_clipping_and_defaults():
    args = NeoXArgs.from_dict(small(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
                                    gradient_clipping=0.5, steps_per_print=7, wall_clock_breakdown=True), env=gpus(4))
    ds = args.deepspeed_config()
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["steps_per_print"] == 7 and ds["wall_clock_breakdown"] is True
    assert ds["zero_optimization"] == {"stage": 0}
    assert "fp16" not in ds and "bf16" not in ds and "optimizer" not in ds
    assert "sparse_gradients" not in ds  # removed from DeepSpeed 0.19; only written when set


def test_fp16_section_keeps_loss_scaling_keys():
    args = NeoXArgs.from_dict(small(fp16=dict(PYTHIA_FP16)), env=gpus(1))
    ds = args.deepspeed_config()
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 12,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert "bf16" not in ds
    parsed = _ds_parse(ds)
    assert parsed.float16_config.enabled and parsed.float16_config.initial_scale_power == 12
    assert parsed.float16_config.loss_scale_window == 1000 and parsed.float16_config.hysteresis == 2


def test_bf16_section():
    ds = NeoXArgs.from_dict(small(precision="bfloat16"), env=cpu()).deepspeed_config()
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    ds = NeoXArgs.from_dict(small(bf16={"enabled": True, "immediate_grad_update": True}), env=cpu()).deepspeed_config()
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert _ds_parse(ds).bfloat16_config.enabled


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    zero = {"stage": stage, "allgather_partitions": True, "allgather_bucket_size": 500000000, "overlap_comm": True,
            "reduce_scatter": True, "reduce_bucket_size": 500000000, "contiguous_gradients": True,
            "cpu_offload": False}
    args = NeoXArgs.from_dict(small(zero_optimization=zero), env=cpu())
    ds = args.deepspeed_config()
    expected = {k: v for k, v in zero.items() if k != "cpu_offload"}
    assert ds["zero_optimization"] == expected and args.zero_stage == stage
    assert args.zero_optimization["cpu_offload"] is False  # the args keep what the user wrote
    assert _ds_parse(ds).zero_optimization_stage == stage


def test_cpu_offload_translated():
    ds = NeoXArgs.from_dict(small(zero_optimization={"stage": 2, "cpu_offload": True}), env=cpu()).deepspeed_config()
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert _ds_parse(ds).zero_config.offload_optimizer.device == "cpu"


def test_optimizer_only_when_deepspeed_builds_it():
    adam = {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}}
    args = NeoXArgs.from_dict(small(optimizer=adam), env=cpu())
    assert "optimizer" not in args.deepspeed_config() and not args.deepspeed_builds_optimizer
    args = NeoXArgs.from_dict(small(optimizer=adam, use_deepspeed_optimizer=True), env=cpu())
    assert args.deepspeed_config()["optimizer"] == adam and args.deepspeed_builds_optimizer
    lamb = {"type": "Lamb", "params": {"lr": 1e-3}}
    ds = NeoXArgs.from_dict(small(optimizer=lamb), env=cpu()).deepspeed_config()
    assert ds["optimizer"] == lamb
    assert _ds_parse(ds).optimizer_name == "lamb"


def test_activation_checkpointing_and_extra_args():
    args = NeoXArgs.from_dict(small(partition_activations=True, synchronize_each_layer=True,
                                    deepspeed_extra_args={"zero_allow_untested_optimizer": True},
                                    flops_profiler={"enabled": False}, prescale_gradients=True), env=cpu())
    ds = args.deepspeed_config()
    # Activation checkpointing is torch.utils.checkpoint: no section that nothing would read.
    assert "activation_checkpointing" not in ds
    assert ds["zero_allow_untested_optimizer"] is True and ds["flops_profiler"] == {"enabled": False}
    assert ds["prescale_gradients"] is True
    _ds_parse(ds)


def test_config_is_fresh_each_call():
    args = NeoXArgs.from_dict(small(zero_optimization={"stage": 1}), env=cpu())
    ds = args.deepspeed_config()
    ds["zero_optimization"]["stage"] = 3
    assert args.deepspeed_config()["zero_optimization"]["stage"] == 1
