"""Tensor-parallel configurations before launch: GPT-NeoX's TP configs (copied from GPT-NeoX ea7aefd8 into
fixtures/gpt_neox/) pass ``deepy.py --dry_run`` on a simulated node of 8 GPUs, and bad input stops with one
line naming the key and the values."""
from pathlib import Path

import pytest
import yaml

import deepy
from megatron.neox_arguments import ConfigError, NeoXArgs
from tests.neox_arguments.helpers import Recorder, gpus

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gpt_neox"
REPO = Path(__file__).resolve().parents[2]

SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, padded_vocab_size=128,
             USE_ORIGINAL_FULL_ATTEN=True)


@pytest.mark.parametrize("config,tp,pp,dp", [("20B.yml", 2, 4, 1), ("pythia/6-9B.yml", 2, 1, 4)])
def test_gpt_neox_tp_configs_pass_dry_run(tmp_path, config, tp, pp, dp):
    from tools.gpt_neox_compat_table import StandIns, _merged_values, path_overrides

    values = _merged_values([FIXTURES / config])
    # Their data, tokenizer and checkpoint paths do not exist here: local stand-ins, as the compat table uses;
    # every other key as GPT-NeoX ships it.
    values.update(path_overrides(values, StandIns(tmp_path / "standins")))
    path = tmp_path / Path(config).name
    path.write_text(yaml.safe_dump(values))
    resolved = tmp_path / "resolved.yml"
    rec = Recorder()
    rc = deepy.main([str(REPO / "train.py"), str(path), "--dry_run", "--resolved_config", str(resolved)],
                    runner=rec, env=gpus(8))
    assert rc == 0 and rec.calls == []
    args = NeoXArgs.from_resolved(str(resolved), env=gpus(8))
    assert (args.model_parallel_size, args.pipe_stages, args.data_parallel_size) == (tp, pp, dp)
    assert args.padded_vocab_size % (128 * tp) == 0


def test_pythia_12b_is_refused_for_its_per_parameter_logging_not_for_tp(tmp_path):
    """pythia/12B.yml (TP 4) sets log_grad_norm with ZeRO 1 and fp16, which the logger refuses on its own."""
    from tools.gpt_neox_compat_table import StandIns, _merged_values, path_overrides

    values = _merged_values([FIXTURES / "pythia/12B.yml"])
    values.update(path_overrides(values, StandIns(tmp_path / "standins")))
    values["user_script"] = str(REPO / "train.py")
    with pytest.raises(ConfigError, match="key 'log_grad_norm'"):
        NeoXArgs.from_dict(values, env=gpus(8))
    values.update(log_grad_norm=False)
    assert NeoXArgs.from_dict(values, env=gpus(8)).model_parallel_size == 4


@pytest.mark.parametrize("keys,n,message", [
    ({"num_attention_heads": 6, "hidden_size": 96}, 4,
     "key 'num_attention_heads' is 6, which is not divisible by model_parallel_size=4"),
    ({"num_kv_heads": 2}, 4, "key 'num_kv_heads' is 2, which is not divisible by model_parallel_size=4"),
    ({"intermediate_size": 66, "hidden_size": 64}, 4,
     "key 'mlp_inner_size' is 66, which is not divisible by model_parallel_size=4"),
    ({"padded_vocab_size": 130}, 4, "key 'padded_vocab_size' is 130, which is not divisible by model_parallel_size=4"),
    ({"zero_optimization": {"stage": 3}}, 4, "zero_optimization.stage=3 cannot be combined with model_parallel_size=4"),
    ({}, 6, r"world size 6 \(global_num_gpus\) is not divisible by pipe_parallel_size x model_parallel_size = 1 x 4"),
    ({"pipe_parallel_size": 2}, 4,
     r"world size 4 \(global_num_gpus\) is not divisible by pipe_parallel_size x model_parallel_size = 2 x 4"),
    ({"model_parallel_size": 0}, 4, "key 'model_parallel_size' must be >= 1, got 0"),
    ({"output_layer_parallelism": "row"}, 4, "key 'output_layer_parallelism' is 'row', which is not supported"),
])
def test_bad_tensor_parallel_input_is_refused_by_name(keys, n, message):
    with pytest.raises(ConfigError, match=message):
        NeoXArgs.from_dict({**SMALL, "model_parallel_size": 4, **keys}, env=gpus(n))


def test_zero_one_and_two_combine_with_tp():
    for stage in (0, 1, 2):
        args = NeoXArgs.from_dict({**SMALL, "model_parallel_size": 2, "zero_optimization": {"stage": stage}},
                                  env=gpus(4))
        assert args.zero_stage == stage and args.data_parallel_size == 2
