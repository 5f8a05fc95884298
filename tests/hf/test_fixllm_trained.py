"""FixLLM (USE_FIXED_SEP_INTERVALs) trains through deepy.py on CPU and exports to sepllm_gpt_neox with the README's
command; the export's logits equal the trainer's, and its decode steps equal one forward over the sequence."""
import json

import pytest
import torch
import yaml

from tests.hf.helpers import trainer_logits
from tests.hf.test_export_trained import TEXT, _corpus
from tests.hf.trained_runs import export_as_readme, train_tiny, trainer_from_step
from tests.training.launch_utils import FIXTURES

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_fixllm_trains_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tmp_path / "tokenizer.json"
    corpus = _corpus(tmp_path, tokenizer)
    model_keys = yaml.safe_load((FIXTURES / "tiny_model.yml").read_text())
    model_keys.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer), USE_ORIGINAL_FULL_ATTEN=False,
                      USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[3, 5], prefill_local_window_size=4,
                      generate_local_window_size=4, init_tok_max_idx=1)
    configs, log, step = train_tiny(tmp_path, model_keys, corpus, iters=2)
    assert "attention: fixllm" in log
    out = tmp_path / "export"
    export_as_readme(step, out, "sepllm_gpt_neox", configs)
    exported = json.loads((out / "config.json").read_text())
    assert exported["USE_FIXED_SEP_INTERVALs"] is True and exported["fixed_sep_intervals_list"] == [3, 5]

    trainer = trainer_from_step(step)
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
