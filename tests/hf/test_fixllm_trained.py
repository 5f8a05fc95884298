"""FixLLM (USE_FIXED_SEP_INTERVALs) trains through deepy.py on CPU and exports to sepllm_gpt_neox with the README's
command; the export's logits equal the trainer's, and its decode steps equal one forward over the sequence."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.hf.helpers import trainer_logits
from tests.hf.test_export_trained import TEXT, _corpus
from tests.training.launch_utils import FIXTURES, REPO, launch_env, run_deepy

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_fixllm_trains_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron.checkpoint_io import CheckpointReader
    from megatron.model import build_sequential_model
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.environment import Environment

    tokenizer = tmp_path / "tokenizer.json"
    corpus = _corpus(tmp_path, tokenizer)
    model_keys = yaml.safe_load((FIXTURES / "tiny_model.yml").read_text())
    model_keys.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer), USE_ORIGINAL_FULL_ATTEN=False,
                      USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[3, 5], prefill_local_window_size=4,
                      generate_local_window_size=4, init_tok_max_idx=1)
    (tmp_path / "model.yml").write_text(yaml.safe_dump(model_keys))
    (tmp_path / "run.yml").write_text(yaml.safe_dump(dict(
        data_path=corpus, train_iters=2, checkpoint_factor=2, pipe_parallel_size=1, zero_optimization={"stage": 0},
        train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, save=str(tmp_path / "save"))))
    configs = [tmp_path / "model.yml", FIXTURES / "tiny_train.yml", tmp_path / "run.yml"]
    rc, log = run_deepy(configs, 1, log_path=tmp_path / "train.log")
    assert rc == 0, log[-4000:]
    assert "attention: fixllm" in log
    step = tmp_path / "save" / "global_step2"
    out = tmp_path / "export"
    readme = [sys.executable, str(REPO / "tools" / "ckpts" / "convert_neox_to_hf.py"), "--input_dir", str(step),
              "--config_file", *map(str, configs), "--output_dir", str(out), "--precision", "auto",
              "--architecture", "sepllm_gpt_neox"]
    proc = subprocess.run(readme, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads((out / "config.json").read_text())
    assert exported["USE_FIXED_SEP_INTERVALs"] is True and exported["fixed_sep_intervals_list"] == [3, 5]

    args = NeoXArgs.from_resolved(str(step / "configs" / "resolved_config.yml"),
                                  env=Environment(0, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}))
    trainer = build_sequential_model(args).eval()
    reader = CheckpointReader(str(step), args.num_layers)
    prefix = next(iter(trainer.state_dict())).split(".")[0]
    trainer.load_state_dict({f"{prefix}.{idx}.{name}": value for idx in reader.layer_indices()
                             for name, value in reader.layer(idx)[0].items()})
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(out)).encode(TEXT)])
    assert ids.shape[1] > 16
    with torch.no_grad():
        whole = hf(ids).logits
        torch.testing.assert_close(whole, trainer_logits(trainer, ids), rtol=1e-5, atol=1e-5)
        step_out = hf(ids[:, :10], use_cache=True)
        steps, cache = [step_out.logits], step_out.past_key_values
        for t in range(10, ids.shape[1]):
            step_out = hf(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(step_out.logits)
            cache = step_out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
