"""lm-eval through the registered ``sepllm_hf`` model class: ``python -m megatron.hf.lm_eval`` runs a local
multiple-choice task and a rolling-loglikelihood task with a training-free config, the reference's ``--model hf``
spelling, the ``sep_cache=a,s,w,c`` variant on a local generation task, and refusals before the weights load."""
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the GPU image has none)")

from megatron.hf import lm_eval as cli  # noqa: E402
from megatron.hf.lm_eval_model import SepLLMHFLM, parse_sep_cache  # noqa: E402
from tests.hf.helpers import SEPS  # noqa: E402
from tests.hf.training_free_models import tiny_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pythia_tokenizer_path):
    """A tiny GPT-NeoX with the Pythia tokenizer, saved as a local HF model directory."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tf_lm_eval") / "model"
    tiny_model("gpt_neox", "sdpa", vocab=50304).save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(pythia_tokenizer_path), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def _config(tmp_path, name="cfg.yml", **overrides):
    cfg = dict(Layer_num=2, separator_token_ids=SEPS, PADDING_ID=0, prefill_local_window_size=2,
               generate_local_window_size=2, init_tok_max_idx=0, BATCH_ADAPTIVE_INIT_POS=False)
    cfg.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(argv, out: Path) -> dict:
    cli.main(argv + ["--output_path", str(out), "--device", "cpu", "--batch_size", "2"])
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def _evaluate(model, model_args: str, tasks, include_path) -> dict:
    """lm-eval in-process, without indexing its built-in tasks (seconds on 2 cores)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return evaluator.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                     batch_size=2, device="cpu", bootstrap_iters=0, log_samples=False)["results"]


@pytest.mark.slow  # lm-eval's command indexes its built-in tasks first
def test_local_tasks_through_the_command_and_the_registered_class(model_dir, tmp_path, monkeypatch):
    """The documented command on a multiple-choice and a rolling-loglikelihood task; the class's scores move with
    the SepLLM window and equal the stock model's under the vanilla config."""
    monkeypatch.chdir(FIXTURES)  # the task YAMLs name their jsonl files relative to the working dir
    sep = _run(["--model", "sepllm_hf", "--model_args",
                f"pretrained={model_dir},sepllm_config={_config(tmp_path)},attn_implementation=sdpa",
                "--tasks", "tiny_mc", "tiny_rolling", "--include_path", str(FIXTURES)], tmp_path / "sep")
    assert 0.0 <= sep["tiny_mc"]["acc,none"] <= 1.0
    tasks = ["tiny_rolling"]
    eager = _evaluate("sepllm_hf", f"pretrained={model_dir},sepllm_config={_config(tmp_path)},"
                                   "attn_implementation=eager", tasks, FIXTURES)
    stock = _evaluate("hf", f"pretrained={model_dir}", tasks, FIXTURES)
    vanilla_cfg = _config(tmp_path, "v.yml", USE_ORIGINAL_FULL_ATTEN=True)
    vanilla = _evaluate("sepllm_hf", f"pretrained={model_dir},sepllm_config={vanilla_cfg}", tasks, FIXTURES)
    ppl = {name: r["tiny_rolling"]["word_perplexity,none"] for name, r in
           (("sep", sep), ("eager", eager), ("stock", stock), ("vanilla", vanilla))}
    assert ppl["sep"] == pytest.approx(ppl["eager"], rel=1e-5)  # sdpa and eager: the same SepLLM model
    assert ppl["vanilla"] == ppl["stock"]
    assert abs(ppl["sep"] - ppl["stock"]) > 1e-4 * ppl["stock"]  # a window of 2 changes the scores


def test_the_reference_spelling_maps_to_the_registered_class():
    argv = ["--model", "hf", "--model_args", "pretrained=x,sepllm_config=c.yml", "--tasks", "t"]
    assert cli.rewrite_argv(argv) == ["--model", "sepllm_hf"] + argv[2:]
    assert cli.rewrite_argv(["--model_args", "pretrained=x,sep_cache=4,64,256,512,dtype=float32"]) == \
        ["--model", "sepllm_hf", "--model_args", "pretrained=x,sep_cache=4:64:256:512,dtype=float32"]
    plain = ["--model", "hf", "--model_args", "pretrained=x"]
    assert cli.rewrite_argv(plain) == plain


def test_sep_cache_variant_generates_with_a_sepcache(model_dir, tmp_path, monkeypatch):
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"q": f"Count {i}, then", "a": "x"}) + "\n"
                                                for i in range(2)))
    (tmp_path / "tiny_gen.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "gen.jsonl"}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    monkeypatch.chdir(tmp_path)
    made = []
    original = SepLLMHFLM.new_sep_cache
    monkeypatch.setattr(SepLLMHFLM, "new_sep_cache", lambda self: made.append(original(self)) or made[-1])
    res = _evaluate("sepllm_hf", f"pretrained={model_dir},sep_cache=1,2,4,8", ["tiny_gen"], tmp_path)
    assert "exact_match,none" in res["tiny_gen"]
    assert made and all(c.layers[0].cache_size == 8 for c in made)
    # the prompt plus 12 new tokens passed cache_size 8: the cache compressed and stayed bounded
    assert all(c.layers[0].compressions > 0 and c.physical_length(0) < 8 for c in made)


def test_bad_model_args_are_refused_before_the_weights_load(model_dir, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(HFLM, "__init__", no_loading)
    with pytest.raises(ValueError, match="Layer_num is 5 but the model has 2 layers"):
        SepLLMHFLM(pretrained=str(model_dir), sepllm_config=str(_config(tmp_path, Layer_num=5)))
    with pytest.raises(ValueError, match=r"init \+ sep \+ local = 324 must be < cache_size 300"):
        SepLLMHFLM.create_from_arg_string(f"pretrained={model_dir},sep_cache=4,64,256,300")
    with pytest.raises(ValueError, match="not both"):
        SepLLMHFLM(pretrained=str(model_dir), sepllm_config=str(_config(tmp_path)), sep_cache="1,2,4,8")
    with pytest.raises(ValueError, match="USE_SA_SOFTMAX is true"):
        SepLLMHFLM(pretrained=str(model_dir), sepllm_config=str(_config(tmp_path, USE_SA_SOFTMAX=True)))
    assert parse_sep_cache("4,64,256,512") == parse_sep_cache("4:64:256:512") == (4, 64, 256, 512)
