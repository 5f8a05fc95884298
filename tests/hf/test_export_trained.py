"""A run trained through deepy.py with its own tokenizer exports, with the README's command, the separators and
padding id that training derived, and a model whose logits equal the trainer's (issue 10's done-when test)."""
import json

import numpy as np
import pytest
import torch
import yaml

from tests.hf.helpers import trainer_logits
from tests.hf.trained_runs import export_as_readme, train_tiny, trainer_from_step
from tests.training.launch_utils import FIXTURES, WORDS

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

PYTHIA_SEPARATORS = [15, 13, 32, 2, 28, 27, 209, 186, 187]
TEXT = "the cat sat on the mat. a dog ran to the park, and\tthe bird sang!\nwhy? because it could; one two three"


def _corpus(tmp, tokenizer_path):
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(300):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(8, 40)))]
        docs.append("".join(w + ("\t" if j % 7 == 3 else "\n" if j % 11 == 5 else " ") for j, w in enumerate(words)))
    tok = train_bpe_tokenizer(docs, vocab_size=320, min_frequency=1)
    save_tokenizer(tok, str(tokenizer_path))
    prefix = str(tmp / "corpus")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(tok.encode(doc).ids + [0])
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_own_tokenizer_run_exports_what_training_resolved(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = tmp_path / "tokenizer.json"
    corpus = _corpus(tmp_path, tokenizer)
    model_keys = yaml.safe_load((FIXTURES / "tiny_model.yml").read_text())
    model_keys.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer), USE_ORIGINAL_FULL_ATTEN=False,
                      USE_SEP_ATTN_KERNEL_ACCELERATOR=False, prefill_local_window_size=8,
                      generate_local_window_size=8, init_tok_max_idx=2)
    configs, log, step = train_tiny(tmp_path, model_keys, corpus, iters=2)  # no separator_token_ids: derived
    resolved = yaml.safe_load((step / "configs" / "resolved_config.yml").read_text())
    derived = [line for line in log.splitlines() if "separator_token_ids derived from" in line]
    assert derived and derived[0].endswith(str(resolved["separator_token_ids"])), derived
    assert resolved["separator_token_ids"] != PYTHIA_SEPARATORS  # own tokenizer: space/tab/newline ids differ

    out = tmp_path / "export"
    export_as_readme(step, out, "sepllm_gpt_neox", configs)
    exported = json.loads((out / "config.json").read_text())
    assert exported["separator_token_ids"] == resolved["separator_token_ids"]
    assert exported["PADDING_ID"] == resolved["PADDING_ID"]
    assert exported["vocab_size"] == resolved["padded_vocab_size"]

    trainer = trainer_from_step(step)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(str(out)).encode(TEXT)])
    seps = set(resolved["separator_token_ids"])
    assert ids.shape[1] > 16 and sum(int(t) in seps for t in ids[0]) >= 10
    with torch.no_grad():
        got = hf(ids).logits
    torch.testing.assert_close(got, trainer_logits(trainer, ids), rtol=1e-5, atol=1e-5)
