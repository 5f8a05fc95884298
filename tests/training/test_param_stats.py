"""Per-parameter statistics (log_param_norm, log_grad_norm, log_grad_pct_zeros, log_optimizer_states) and
text logs (log_dir): against direct computations, refused where they would be partial, and end to end."""
import glob
import os

import pytest
import torch

from launch_utils import FIXTURES, run_deepy, write_run_config, write_tiny_corpus
from megatron.neox_arguments import ConfigError, Environment, NeoXArgs
from megatron.param_stats import ParameterStatistics
from megatron.training import NonFiniteStepGuard

CPU = Environment(cuda_device_count=0, environ={})
SMALL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
         "padded_vocab_size": 128, "USE_ORIGINAL_FULL_ATTEN": True, "lr": 1e-3, "train_iters": 10}
ALL_STATS = {"log_param_norm": True, "log_grad_norm": True, "log_grad_pct_zeros": True,
             "log_optimizer_states": True}


def _model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(8, 6)
    return model, x


def test_statistics_equal_direct_computation():
    model, x = _model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = NonFiniteStepGuard(opt)
    guard.stats = ParameterStatistics(model, opt, NeoXArgs.from_dict({**SMALL, **ALL_STATS}, env=CPU))
    for step in range(3):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        model[0].bias.grad[:2] = 0.0  # known zero entries: 2 of 5
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if step == 2:
            guard.stats.arm()
        opt.step()
    values = guard.stats.collect()
    for name, p in model.named_parameters():
        assert values[f"gradient_norms/{name}"] == pytest.approx(float(torch.linalg.vector_norm(grads[name])))
        assert values[f"parameter_norms/{name}"] == pytest.approx(float(torch.linalg.vector_norm(p.detach())))
        state = opt.state[p]
        assert values[f"optimizer_state_norms/exp_avg_{name}"] == pytest.approx(
            float(torch.linalg.vector_norm(state["exp_avg"])))
        assert values[f"optimizer_state_norms/exp_avg_sq_{name}"] == pytest.approx(
            float(torch.linalg.vector_norm(state["exp_avg_sq"])))
        zeros = float((grads[name] == 0).sum()) * 100.0 / grads[name].numel()
        assert values[f"pct_grad_zeros/{name}"] == pytest.approx(zeros)
    assert values["pct_grad_zeros/0.bias"] >= 40.0
    # Only armed steps capture gradients; a collect without one has no gradient entries.
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert not any(k.startswith("gradient_norms/") for k in guard.stats.collect())


@pytest.mark.parametrize("key", ["log_grad_norm", "log_grad_pct_zeros", "log_optimizer_states"])
def test_per_parameter_gradient_keys_refused_where_partial(key):
    with pytest.raises(ConfigError, match=f"key '{key}'.*ZeRO stage 0 and precision fp32"):
        NeoXArgs.from_dict({**SMALL, key: True, "zero_optimization": {"stage": 1}}, env=CPU)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        NeoXArgs.from_dict({**SMALL, key: True, "precision": "bfloat16"}, env=CPU)
    with pytest.raises(ConfigError, match="'log_param_norm' is not supported with ZeRO stage 3"):
        NeoXArgs.from_dict({**SMALL, "log_param_norm": True, "zero_optimization": {"stage": 3}}, env=CPU)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_statistics_and_text_logs_end_to_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    cfg = write_run_config(tmp_path / "run.yml", data_path=corpus, train_iters=4,
                           pipe_parallel_size=1, zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2,
                           gradient_accumulation_steps=1, tensorboard_dir=str(tmp_path / "tb"),
                           log_dir=str(tmp_path / "logs"), **ALL_STATS)
    rc, out = run_deepy([FIXTURES / "tiny_model.yml", FIXTURES / "tiny_train.yml", cfg], 1)
    assert rc == 0, out[-3000:]
    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "events.*"))[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # Pipeline layer 2 is the first transformer block (GPT-NeoX's layer numbering).
    for tag in ("gradient_norms/2.attention.query_key_value.weight", "parameter_norms/2.mlp.dense_h_to_4h.bias",
                "pct_grad_zeros/0.word_embeddings.weight", "optimizer_state_norms/exp_avg_sq_2.attention.dense.weight"):
        assert tag in tags, sorted(tags)[:20]
    assert [e.step for e in acc.Scalars("gradient_norms/2.attention.query_key_value.weight")] == [1, 2, 3, 4]
    assert "gradient_norms" not in out  # dashboards only, not the console line
    stdout_logs = glob.glob(str(tmp_path / "logs" / "*_rank0_stdout.txt"))
    assert len(stdout_logs) == 1 and "iteration        4/" in open(stdout_logs[0]).read()
    assert os.path.exists(stdout_logs[0].replace("_stdout.txt", "_stderr.txt"))
