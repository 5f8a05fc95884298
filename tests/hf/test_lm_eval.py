"""lm-eval on an export through our adapter and through lm-eval's own HF backend (local jsonl tasks)."""
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the GPU image has none)")

from megatron.hf.lm_eval_adapter import run_lm_eval  # noqa: E402
from megatron.hf.loading import load_export  # noqa: E402
from tests.hf.helpers import SEPS, base_config, make_export  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def sep_export(tmp_path_factory, pythia_tokenizer_path):
    tmp = tmp_path_factory.mktemp("lmeval")
    cfg = base_config(pythia_tokenizer_path, separator_token_ids=SEPS, prefill_local_window_size=8,
                      generate_local_window_size=8)
    _, out = make_export(tmp, cfg, "sepllm_gpt_neox")
    return out


def test_local_tasks_through_adapter(sep_export, monkeypatch):
    monkeypatch.chdir(FIXTURES)  # the task YAMLs name their jsonl files relative to the working dir
    model, tok = load_export(sep_export)
    res = run_lm_eval(model, tok, ["tiny_mc", "tiny_rolling"], include_path=str(FIXTURES), batch_size=4,
                      include_defaults=False)
    mc = res["results"]["tiny_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0
    rolling = res["results"]["tiny_rolling"]
    # a random 2-layer model over a 50k vocabulary: per-byte perplexity is large but finite
    assert 1.0 < rolling["byte_perplexity,none"] < 1e6
    assert rolling["word_perplexity,none"] > rolling["byte_perplexity,none"]


def test_export_with_lm_eval_hf_backend(sep_export, monkeypatch):
    """The export loads in lm-eval's own HF model class with trust_remote_code (the documented command)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(FIXTURES)
    res = evaluator.simple_evaluate(model="hf", model_args=f"pretrained={sep_export},trust_remote_code=True",
                                    tasks=["tiny_mc"],
                                    task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
                                    batch_size=2, device="cpu", bootstrap_iters=0, log_samples=False)
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0
