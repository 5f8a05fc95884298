"""A tiny Llama-style model and a GQA model (with Mistral's sliding window) train through deepy.py, export with the
README's command to stock LlamaForCausalLM / MistralForCausalLM, and match the trainer's logits (issue 11)."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.hf.helpers import trainer_logits
from tests.training.launch_utils import FIXTURES, REPO, launch_env, losses_by_iteration, run_deepy, write_tiny_corpus

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

# GPT-NeoX's llama/*.yml model keys, tiny.
LLAMA_KEYS = dict(pos_emb="rotary", rotary_pct=1, gpt_j_residual=False, norm="rmsnorm", rms_norm_epsilon=1.0e-6,
                  use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False, activation="swiglu",
                  intermediate_size=256, mlp_multiple_of=16, make_vocab_size_divisible_by=1)

CASES = {
    "llama": (dict(), 1, "LlamaForCausalLM"),
    "gqa_sliding_window": (dict(num_kv_heads=2, sliding_window_width=8), 0, "MistralForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_family_trains_and_exports_to_stock_hf(tmp_path, case):
    from transformers import AutoModelForCausalLM

    from megatron.checkpoint_io import CheckpointReader
    from megatron.model import build_sequential_model
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.environment import Environment

    extra, pipe, architecture = CASES[case]
    model_keys = yaml.safe_load((FIXTURES / "tiny_model.yml").read_text())
    model_keys.pop("USE_ORIGINAL_FULL_ATTEN")  # no SepLLM key at all: a GPT-NeoX config, full attention
    model_keys.update(LLAMA_KEYS, **extra)
    (tmp_path / "model.yml").write_text(yaml.safe_dump(model_keys))
    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    (tmp_path / "run.yml").write_text(yaml.safe_dump(dict(
        data_path=corpus, train_iters=3, checkpoint_factor=3, pipe_parallel_size=pipe, zero_optimization={"stage": 0},
        train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, save=str(tmp_path / "save"))))
    configs = [tmp_path / "model.yml", FIXTURES / "tiny_train.yml", tmp_path / "run.yml"]
    rc, log = run_deepy(configs, 1, log_path=tmp_path / "train.log")
    assert rc == 0, log[-4000:]
    assert "attention: full causal attention" in log
    losses = losses_by_iteration(log)
    assert sorted(losses) == [1, 2, 3], log[-3000:]

    step = tmp_path / "save" / "global_step3"
    out = tmp_path / "export"
    readme = [sys.executable, str(REPO / "tools" / "ckpts" / "convert_neox_to_hf.py"), "--input_dir", str(step),
              "--output_dir", str(out), "--precision", "auto", "--architecture", "llama"]
    proc = subprocess.run(readme, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert not list(out.glob("*.py"))  # stock classes: no custom code shipped

    args = NeoXArgs.from_resolved(str(step / "configs" / "resolved_config.yml"),
                                  env=Environment(0, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}))
    trainer = build_sequential_model(args).eval()
    reader = CheckpointReader(str(step), args.num_layers)
    prefix = next(iter(trainer.state_dict())).split(".")[0]
    trainer.load_state_dict({f"{prefix}.{idx}.{name}": value for idx in reader.layer_indices()
                             for name, value in reader.layer(idx)[0].items()})
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == architecture
    ids = torch.tensor([list(b"the cat sat on the mat. a dog ran to the park, and the bird sang!")])
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - trainer_logits(trainer, ids)).abs().max().item() < 1e-5
