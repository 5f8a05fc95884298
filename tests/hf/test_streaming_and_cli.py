"""Streaming perplexity on CPU, the generate/eval/convert CLIs, and the converter's bad-input errors."""
import json
import math
import os

import pytest
import torch

from tests.hf.helpers import SEPS, base_config, build_trainer_model, make_export, random_ids, save_checkpoint, \
    trainer_logits
from megatron.hf.export import ConversionError, export
from tools.ckpts.convert_neox_to_hf import main as convert_main
from tools.streaming_eval import make_cache, stream_perplexity


@pytest.fixture(scope="module")
def neox_export(tmp_path_factory, pythia_tokenizer_path):
    tmp = tmp_path_factory.mktemp("stream")
    _, out = make_export(tmp, base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True), "neox")
    return out


def test_streaming_perplexity_bounded_memory(neox_export):
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(neox_export, attn_implementation="eager").eval()
    tokens = random_ids(1, 161, seed=9)[0]
    full = stream_perplexity(model, tokens, make_cache(model, "full"), chunk=40)
    never = stream_perplexity(model, tokens, make_cache(model, "sepcache", cache_size=10_000, pe_shift=False),
                              chunk=40)
    # a SepCache that never compresses is the full cache
    assert [round(r["ppl"], 3) for r in never] == [round(r["ppl"], 3) for r in full]
    sep = stream_perplexity(model, tokens, make_cache(model, "sepcache", 2, 4, 8, 20, pe_shift=True,
                                                      separator_token_ids=SEPS), chunk=40)
    stream = stream_perplexity(model, tokens, make_cache(model, "streaming", 2, 0, 8, pe_shift=True), chunk=40)
    assert full[-1]["kv_slots"] == 160 and full[-1]["kv_bytes"] > 4 * sep[-1]["kv_bytes"]
    assert all(r["kv_slots"] <= 20 for r in sep) and all(r["kv_slots"] <= 11 for r in stream)
    # constant memory: the KV footprint of the later chunks does not grow with the stream
    assert max(r["kv_bytes"] for r in sep[1:]) <= 20 * sep[-1]["kv_bytes"] / sep[-1]["kv_slots"]
    assert all(math.isfinite(r["ppl"]) for r in sep + stream)


def test_generate_cli_export_and_empty_prompt(neox_export, capsys, tmp_path):
    import generate

    out_file = tmp_path / "samples.jsonl"
    rc = generate.main(["--model_dir", neox_export, "--text", "Hello, world", "--maximum_tokens", "5",
                        "--sample_output_file", str(out_file), "--sep_cache", "2,2,4,12"])
    assert rc == 0
    rec = json.loads(out_file.read_text().splitlines()[0])
    assert rec["context"] == "Hello, world" and rec["text"]
    assert rec["text"] in capsys.readouterr().out  # streamed to stdout
    assert generate.main(["--model_dir", neox_export, "--text", "   "]) == 2
    assert "empty" in capsys.readouterr().err


def test_generate_and_eval_from_trainer_checkpoint(tmp_path, pythia_tokenizer_path, monkeypatch, capsys):
    """The deepy.py path: a resolved config whose ``load`` names a checkpoint."""
    import eval as eval_script
    import generate

    cfg = base_config(pythia_tokenizer_path, separator_token_ids=SEPS, prefill_local_window_size=4,
                      generate_local_window_size=4)
    _, model = build_trainer_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "save" / "global_step3", "pipeline")
    (tmp_path / "save" / "latest").write_text("global_step3")
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(dict(cfg, load=str(tmp_path / "save"), eval_tasks=["tiny_mc"],
                                   sample_output_file=str(tmp_path / "samples.txt")))
    resolved = args.save_resolved(str(tmp_path / "resolved.yml"))
    assert generate.main(["--neox_config_file", resolved, "--text", "The cat", "--maximum_tokens", "4",
                          "--no_stream"]) == 0
    assert "\nThe cat" in capsys.readouterr().out
    assert json.loads((tmp_path / "samples.txt").read_text().splitlines()[0])["context"] == "The cat"
    # Without 'load' the checkpoint comes from 'save' (where this config's training wrote it).
    no_load = NeoXArgs.from_dict(dict(cfg, save=str(tmp_path / "save"),
                                      sample_output_file=str(tmp_path / "samples2.txt")))
    resolved2 = no_load.save_resolved(str(tmp_path / "resolved2.yml"))
    assert generate.main(["--neox_config_file", resolved2, "--text", "The cat", "--maximum_tokens", "2"]) == 0
    from megatron.hf.loading import load_from_neox_args

    loaded, _ = load_from_neox_args(NeoXArgs.from_resolved(resolved))
    ids = random_ids(1, 30, seed=4)
    with torch.no_grad():
        assert (loaded(ids, use_cache=False).logits - trainer_logits(model, ids)).abs().max() < 1e-5
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    monkeypatch.chdir(fixtures)
    monkeypatch.setattr("megatron.hf.lm_eval_adapter.run_lm_eval.__defaults__",
                        (None, None, 8, None, False))
    results_prefix = str(tmp_path / "run")
    assert eval_script.main(["--neox_config_file", resolved, "--include_path", fixtures, "--limit", "2",
                             "--eval_results_prefix", results_prefix]) == 0
    written = [p for p in os.listdir(tmp_path) if p.startswith("run_eval_results")]
    assert written and "tiny_mc" in json.load(open(tmp_path / written[0]))["results"]


def test_converter_bad_inputs(tmp_path, pythia_tokenizer_path):
    cfg = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True)
    _, model = build_trainer_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "ckpt", "pipeline")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="unknown --architecture 'llama2'"):
        export(str(ckpt), None, str(out), "fp32", "llama2")
    bad_yml = tmp_path / "bad.yml"
    bad_yml.write_text(json.dumps(dict(cfg, hidden_size=64, num_attention_heads=4)))
    with pytest.raises(ConversionError, match="gives hidden_size=64 but the checkpoint was trained with hidden_size=32"):
        export(str(ckpt), [str(bad_yml)], str(out), "fp32", "neox")
    sep_cfg = dict(cfg, USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=SEPS)
    sep_ckpt = save_checkpoint(model, sep_cfg, tmp_path / "sep_ckpt", "pipeline")
    with pytest.raises(ConversionError, match="use --architecture sepllm_gpt_neox"):
        export(str(sep_ckpt), None, str(out), "fp32", "neox")
    os.remove(ckpt / "layer_03-model_00-model_states.pt")
    with pytest.raises(ConversionError, match="missing layer file .*layer_03-model_00"):
        export(str(ckpt), None, str(out), "fp32", "neox")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no half-written export left
    assert convert_main(["--input_dir", str(ckpt), "--output_dir", str(out), "--architecture", "neox"]) == 2


def test_bf16_precision_export(tmp_path, pythia_tokenizer_path):
    from safetensors.torch import load_file

    cfg = base_config(pythia_tokenizer_path, separator_token_ids=SEPS)
    _, out = make_export(tmp_path, cfg, "sepllm_gpt_neox", precision="bf16")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for name in ("rule.py", "sep_cache.py", "modeling_sepllm_gpt_neox.py", "configuration_sepllm_gpt_neox.py",
                 "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name))
    from megatron.model import attention_math
    from megatron.model.sepllm import rule

    # The shared modules travel verbatim: the export computes what training computed.
    assert open(os.path.join(out, "rule.py")).read() == open(rule.__file__).read()
    assert open(os.path.join(out, "attention_math.py")).read() == open(attention_math.__file__).read()


def _book(path, sentences=40):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "slept"]
    text = " ".join(f"{' '.join(words[(i + j) % 10] for j in range(5))}{',' if i % 3 else '.'}"
                    for i in range(sentences))
    path.write_text(text + "\n")
    return path


def test_streaming_cli_reference_flags_write_log_and_ppl(neox_export, tmp_path, capsys):
    from tools.streaming_eval import main

    book = _book(tmp_path / "book.txt")
    ref = ["--model_name_or_path", neox_export, "--init_cache_size", "2", "--sep_cache_size", "4",
           "--local_size", "8", "--num_samples", "5000000", "--num_eval_tokens", "50", "--task", "default",
           "--split", "test"]
    runs = {"sep": ["--cache_size", "20", "--enable_kv_cache_manager", "True", "--enable_SepLLM", "True",
                    "--enable_StreamingLLM", "False", "--enable_pos_shift", "True"],
            "stream": ["--cache_size", "10", "--enable_kv_cache_manager", "True", "--enable_SepLLM", "False",
                       "--enable_StreamingLLM", "True", "--enable_pos_shift", "True"],
            "full": ["--cache_size", "20", "--enable_kv_cache_manager", "False", "--enable_SepLLM", "False",
                     "--enable_StreamingLLM", "False"]}
    ppl = {}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(ref + flags + ["--dataset_name", str(book), "--output_dir", str(out)]) == 0
        nlls = [float(line) for line in (out / "log.txt").read_text().splitlines()]
        assert len(nlls) == 50
        ppl[name] = float((out / "ppl.txt").read_text())
        assert math.isclose(ppl[name], math.exp(sum(nlls) / 50), rel_tol=1e-9)
        summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
        assert summary[-1]["final"] and summary[-1]["tokens"] == 50 and summary[-1]["mode"] in (
            "sepcache", "streaming", "full")
        printed = capsys.readouterr()
        assert f"overall perplexity: {ppl[name]:.4f} over 50 tokens" in printed.out
        assert "tok/s" in printed.err  # the progress bar's rate
    assert json.loads((tmp_path / "full" / "summary.jsonl").read_text().splitlines()[-1])["kv_slots"] == 50
    assert json.loads((tmp_path / "stream" / "summary.jsonl").read_text().splitlines()[-1])["kv_slots"] <= 11
    assert len(set(ppl.values())) == 3
    # pg19: the local folder's split, one book of two
    (tmp_path / "pg19" / "test").mkdir(parents=True)
    _book(tmp_path / "pg19" / "test" / "1.txt", 10)
    _book(tmp_path / "pg19" / "test" / "2.txt", 10)
    assert main(ref[:-6] + runs["sep"] + ["--dataset_name", "pg19", "--pg19_dir", str(tmp_path / "pg19"),
                                          "--num_samples", "1", "--output_dir", str(tmp_path / "pg"),
                                          "--no_progress"]) == 0
    one_book = len((tmp_path / "pg" / "log.txt").read_text().splitlines())
    assert 0 < one_book < 100


def test_streaming_cli_bad_input_is_one_line(neox_export, tmp_path, capsys):
    from tools.streaming_eval import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a book")
    base = ["--model_name_or_path", neox_export, "--dataset_name", str(_book(tmp_path / "b.txt"))]
    cases = [
        (["--enable_kv_cache_manager", "True", "--enable_StreamingLLM", "True", "--init_cache_size", "4",
          "--local_size", "8", "--cache_size", "20"], "StreamingLLM needs --cache_size == --init_cache_size + "
                                                    "--local_size, got 20 != 4 + 8"),
        (["--enable_kv_cache_manager", "True", "--enable_SepLLM", "True", "--init_cache_size", "4",
          "--sep_cache_size", "8", "--local_size", "8", "--cache_size", "20"], "4 + 8 + 8 >= 20"),
        (["--enable_kv_cache_manager", "True", "--enable_SepLLM", "True", "--enable_StreamingLLM", "True"],
         "choose one mode"),
        (["--enable_SepLLM", "True", "--enable_kv_cache_manager", "False"], "needs --enable_kv_cache_manager True"),
        (["--dataset_name", str(empty)], "holds no non-empty .txt file"),
        (["--dataset_name", "pg19"], "--pg19_dir"),
        (["--task", "pg19_long"], "--task pg19_long"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    with pytest.raises(SystemExit):
        main(base + ["--enable_SepLLM", "maybe"])


def test_streaming_compression_steps_match_the_reference(neox_export):
    """SepLLM (§12.3): the token that finds c - 1 cached compresses. StreamingLLM (evict after the forward down to
    a + w = c): every query sees the a initial tokens, the w before it and itself."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(neox_export, attn_implementation="eager").eval()
    tokens = random_ids(1, 40, seed=2)
    a, s, w, c = 2, 3, 6, 14
    sep = make_cache(model, "sepcache", a, s, w, c, pe_shift=False, separator_token_ids=SEPS)
    stream = make_cache(model, "streaming", a, 0, w, a + w, pe_shift=True)
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            for cache in (sep, stream):
                model(input_ids=tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            if t == c - 2:
                assert sep.layers[0].compressions == 0
            if t == c - 1:
                assert sep.layers[0].compressions == 1
            seen = list(range(t + 1)) if t <= a + w else list(range(a)) + list(range(t - w, t + 1))
            assert stream.layers[0].text_pos[0].tolist() == seen, t
    assert max(layer.length() for layer in sep.layers) < c
