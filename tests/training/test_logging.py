"""Console line, progress bar, FLOPs formula, TensorBoard events under GPT-NeoX's names."""
import io
import glob
import types

import pytest

from megatron import logging as tlog


def tiny_args(**over):
    """A resolved config of the tiny model the formulas below are written for (4 sequences of 32 tokens)."""
    from megatron.neox_arguments import Environment, NeoXArgs

    keys = dict(hidden_size=64, seq_length=32, num_layers=2, num_attention_heads=4, padded_vocab_size=512,
                train_micro_batch_size_per_gpu=4, train_iters=10, peak_tflops_per_gpu=1e-3,
                USE_ORIGINAL_FULL_ATTEN=True, lr=1e-3)
    keys.update(over)
    return NeoXArgs.from_dict(keys, env=Environment(cuda_device_count=0, environ={}))


def test_flops_formula_counts_matmuls_attention_logits_and_recompute():
    a = tiny_args()
    h, s, L, V = 64, 32, 2, 512
    # Count each matmul of one token's forward pass explicitly.
    qkv, dense, mlp = 2 * h * 3 * h, 2 * h * h, 2 * (2 * h * 4 * h)
    attn = 2 * s * h * 2  # QK^T and AV
    fwd_layers = L * (qkv + dense + mlp + attn)
    logits = 2 * h * V
    assert tlog.flops_per_token(a) == 3 * fwd_layers + 3 * logits
    assert tlog.flops_per_token(a, recompute=True) == 4 * fwd_layers + 3 * logits
    # Megatron's closed form with recomputation: 96 L h^2 (1 + s/6h + V/16Lh) per token.
    assert tlog.flops_per_token(a, True) == pytest.approx(96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h)))


def test_flops_formula_counts_grouped_kv_heads_and_the_swiglu_mlp():
    a = tiny_args(num_kv_heads=1, activation="swiglu", intermediate_size=192, mlp_multiple_of=8)
    h, s, L, V, f = 64, 32, 2, 512, 64  # swiglu width: int(192 * 2 / 3) // 2 = 64
    qkv, dense, mlp = 2 * h * (h + 2 * 16), 2 * h * h, 2 * 3 * h * f  # one kv head of 16 dims; up, gate, down
    fwd_layers = L * (qkv + dense + mlp + 2 * s * h * 2)
    assert a.mlp_inner_size == f
    assert tlog.flops_per_token(a) == 3 * fwd_layers + 3 * 2 * h * V


def test_throughput_and_mfu():
    a = tiny_args(checkpoint_activations=True)
    m = tlog.throughput_metrics(a, iterations=5, elapsed_s=2.0)
    tokens = 5 * 4 * 32
    assert m["tokens_per_sec"] == pytest.approx(tokens / 2.0)
    assert m["tflops_per_gpu"] == pytest.approx(tokens * tlog.flops_per_token(a, True) / 2.0 / 1e12)
    # MFU uses model FLOPs (no recomputation) against the configured peak.
    assert m["mfu"] == pytest.approx(tokens * tlog.flops_per_token(a, False) / 2.0 / 1e12 / 1e-3)


def test_progress_bar_and_duration():
    assert tlog.format_duration(3725) == "1:02:05"
    assert tlog.format_duration(65) == "01:05"
    bar = tlog.progress_bar(25, 100, elapsed_s=50.0, width=10)
    assert bar.startswith("|###.......|") or bar.startswith("|##........|")
    assert "25.0%" in bar and "[00:50<02:30]" in bar  # 2 s/iter x 75 left
    assert "<?]" in tlog.progress_bar(0, 100, 1.0)


def test_log_line_and_gpt_neox_dashboard_names(tmp_path):
    tb = tmp_path / "tb"
    a = tiny_args(tensorboard_dir=str(tb))
    out = io.StringIO()
    logger = tlog.TrainingLogger(a, rank=0, stream=out)
    metrics = {"lm_loss": 3.5, "learning_rate": 1e-3, "grad_norm": 0.75, "loss_scale": 1.0, "skipped_iters": 1,
               "sepllm/kv_ratio": 0.25, "sepllm/kv_ratio/layer_00": 0.125, "sepllm/kv_ratio/layer_01": 0.375,
               "sepllm/attn_density": 0.5, "sepllm/attn_density/layer_00": 0.5,
               "sepllm/attn_density/layer_01": 0.5}
    line = logger.log_training(5, metrics, interval_iters=5, interval_s=1.0)
    logger.log_evaluation(5, "validation", 2.0)
    logger.close()
    text = out.getvalue()
    assert line in text and "validation results at iteration 5" in text
    for part in ("iteration        5/      10", "loss 3.500000E+00", "lr 1.0000E-03", "grad norm 0.7500",
                 "loss scale 1.0", "tokens/s 640", "TFLOP/s/GPU", "MFU", "skipped 1", "rss GiB", "ms/iter 200.0",
                 "sepllm/kv_ratio 0.25 (layers 0.125..0.375)", "50.0%"):
        assert part in line, (part, line)
    # Per-layer values stay off the console: equal layers print no range, and no layer key is printed.
    assert "layer_0" not in line and "sepllm/attn_density 0.5 |" in line
    assert "flops_per_sec_per_gpu" not in line and "runtime/" not in line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tb / "events.*"))[0])
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[0] for tag in acc.Tags()["scalars"]}
    # GPT-NeoX's names (megatron/logging.py at ea7aefd8), with its units.
    tokens = 5 * 4 * 32
    expected = {"train/lm_loss": 3.5, "train/learning_rate": 1e-3, "train/loss_scale": 1.0,
                "runtime/samples_per_sec": 20.0, "runtime/iteration_time": 0.2, "runtime/steps_per_sec": 5.0,
                "runtime/tokens_per_sec": tokens,
                "runtime/flops_per_sec_per_gpu": tokens * tlog.flops_per_token(a, False),
                "runtime/model_flops_utilization": 100 * tokens * tlog.flops_per_token(a, False) / 1e9,
                "validation/lm_loss": 2.0, "validation/lm_loss_ppl": 7.389056,
                "sepllm/kv_ratio": 0.25, "sepllm/kv_ratio/layer_01": 0.375, "train/grad_norm": 0.75}
    for tag, value in expected.items():
        assert tag in scalars, (tag, sorted(scalars))
        assert scalars[tag].value == pytest.approx(value, rel=1e-5), tag
        assert scalars[tag].step == 5
    assert not [t for t in scalars if t.startswith("train/sepllm") or t in ("train/mfu", "train/tokens_per_sec")]


def test_non_zero_rank_writes_nothing(tmp_path):
    out = io.StringIO()
    logger = tlog.TrainingLogger(tiny_args(tensorboard_dir=str(tmp_path / "tb")), rank=1, stream=out)
    logger.log_training(1, {"lm_loss": 1.0}, 1, 1.0)
    assert out.getvalue() == "" and not (tmp_path / "tb").exists()


def test_deepspeed_progress_line_is_off_unless_asked():
    from megatron.neox_arguments.deepspeed_config import DEEPSPEED_PRINTS_OFF, build_deepspeed_config

    # GPT-NeoX's configs set steps_per_print: 10; that alone must not interleave DeepSpeed's line.
    assert build_deepspeed_config(tiny_args(steps_per_print=10))["steps_per_print"] == DEEPSPEED_PRINTS_OFF
    assert build_deepspeed_config(tiny_args(steps_per_print=3, deepspeed_progress_log=True))["steps_per_print"] == 3
    assert build_deepspeed_config(tiny_args(steps_per_print=4, wall_clock_breakdown=True))["steps_per_print"] == 4


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    a = tiny_args(use_wandb=True, wandb_dir=str(tmp_path), wandb_project="t", wandb_group=None)
    logger = tlog.TrainingLogger(a, rank=0, stream=io.StringIO())
    assert logger.wandb is not None and logger.wandb.settings.mode == "offline"
    logger.log_training(1, {"lm_loss": 1.0}, 1, 1.0)
    logger.close()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
