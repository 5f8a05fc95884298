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


@pytest.mark.parametrize("tokenizer", ["HFTokenizer", "CharLevelTokenizer"])
def test_trainer_checkpoint_through_deepy_eval_with_local_tasks_and_stderr(tmp_path, monkeypatch, capsys,
                                                                           pythia_tokenizer_path, tokenizer):
    """``deepy.py eval.py cfg --eval_tasks NAMES --include_path DIR``: local tasks by name, results with lm-eval's
    standard errors. An HF tokenizer goes through lm-eval's own HFLM, a char-level one through the adapter."""
    import json

    import deepy
    import eval as eval_script
    from megatron.hf.lm_eval_adapter import SepLLMEvalLM, evaluation_model
    from megatron.neox_arguments import NeoXArgs
    from tests.hf.helpers import build_trainer_model, save_checkpoint
    from tests.neox_arguments.helpers import Recorder, cpu

    cfg = base_config(pythia_tokenizer_path, separator_token_ids=SEPS, prefill_local_window_size=8,
                      generate_local_window_size=8)
    if tokenizer == "CharLevelTokenizer":
        cfg.update(tokenizer_type="CharLevelTokenizer", vocab_file=None, separator_token_ids=[46, 44, 32])
    args, model = build_trainer_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "ckpt" / "global_step1", resolved_args=args)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    run_yml = tmp_path / "run.yml"
    run_yml.write_text(json.dumps({**cfg, "load": str(tmp_path / "ckpt"), "eval_results_prefix": str(tmp_path / "r")}))
    resolved = tmp_path / "resolved.yml"
    assert deepy.main([str(Path(eval_script.__file__)), str(run_yml), "--eval_tasks", "tiny_mc", "tiny_rolling",
                       "--include_path", str(FIXTURES), "--resolved_config", str(resolved)],
                      runner=Recorder(), env=cpu()) == 0
    on_rank = NeoXArgs.from_resolved(str(resolved), env=cpu(WORLD_SIZE=1))
    assert on_rank.eval_include_path == str(FIXTURES) and on_rank.eval_tasks == ["tiny_mc", "tiny_rolling"]
    import megatron.hf.lm_eval_adapter as adapter

    used = []
    monkeypatch.setattr(adapter, "evaluation_model",
                        lambda *a, **k: used.append(evaluation_model(*a, **k)) or used[-1])
    monkeypatch.chdir(FIXTURES)  # the task YAMLs name their jsonl files relative to the working dir
    monkeypatch.setenv("RANK", "0")
    assert eval_script.main(["--neox_config_file", str(resolved)]) == 0
    written = json.loads(next(tmp_path.glob("r_eval_results_*.json")).read_text())
    mc = written["results"]["tiny_mc"]
    assert 0.0 < mc["acc_stderr,none"] < 1.0  # a standard error, not lm-eval's "N/A" of bootstrap_iters=0
    from lm_eval.models.huggingface import HFLM

    assert isinstance(used[0], HFLM if tokenizer == "HFTokenizer" else SepLLMEvalLM)
