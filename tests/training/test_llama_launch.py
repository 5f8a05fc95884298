"""A tiny Llama-style model and a GQA model (with Mistral's sliding window) train through deepy.py, export with the
README's command to stock LlamaForCausalLM / MistralForCausalLM, and match the trainer's logits (issue 11)."""
import json

import pytest
import torch
import yaml

from tests.hf.helpers import trainer_logits
from tests.hf.trained_runs import export_as_readme, train_tiny, trainer_from_step
from tests.training.launch_utils import FIXTURES, losses_by_iteration, write_tiny_corpus

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

    extra, pipe, architecture = CASES[case]
    model_keys = yaml.safe_load((FIXTURES / "tiny_model.yml").read_text())
    model_keys.pop("USE_ORIGINAL_FULL_ATTEN")  # no SepLLM key at all: a GPT-NeoX config, full attention
    model_keys.update(LLAMA_KEYS, **extra)
    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    configs, log, step = train_tiny(tmp_path, model_keys, corpus, iters=3, pipe_parallel_size=pipe)
    assert "attention: full causal attention" in log
    losses = losses_by_iteration(log)
    assert sorted(losses) == [1, 2, 3], log[-3000:]

    out = tmp_path / "export"
    export_as_readme(step, out, "llama")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert not list(out.glob("*.py"))  # stock classes: no custom code shipped

    trainer = trainer_from_step(step)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == architecture
    ids = torch.tensor([list(b"the cat sat on the mat. a dog ran to the park, and the bird sang!")])
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - trainer_logits(trainer, ids)).abs().max().item() < 1e-5
