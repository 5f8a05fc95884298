"""generate.py's GPT-NeoX text-generation keys: text_gen_type (unconditional with num_samples, input-file,
interactive from stdin) and recompute (no KV cache; greedy output equal to the cached one)."""
import io
import json

import pytest

from tests.hf.helpers import base_config, make_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, pythia_tokenizer_path):
    _, out = make_export(tmp_path_factory.mktemp("genmodes"),
                         base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True), "neox")
    return out


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(export_dir, tmp_path, *extra):
    import generate

    out = tmp_path / "samples.jsonl"
    rc = generate.main(["--model_dir", export_dir, "--maximum_tokens", "6", "--no_stream",
                        "--sample_output_file", str(out), *extra])
    return rc, out


def test_unconditional_writes_num_samples(export_dir, tmp_path):
    rc, out = _run(export_dir, tmp_path, "--text_gen_type", "unconditional", "--num_samples", "3",
                   "--temperature", "1.0", "--top_k", "50")
    assert rc == 0
    recs = _records(out)
    assert len(recs) == 3 and all(r["context"] == "<|endoftext|>" and r["text"] for r in recs)


def test_recompute_gives_the_cached_greedy_text(export_dir, tmp_path):
    rc, cached = _run(export_dir, tmp_path, "--text", "The cat sat on")
    assert rc == 0
    (tmp_path / "r").mkdir()
    rc, recomputed = _run(export_dir, tmp_path / "r", "--text", "The cat sat on", "--recompute")
    assert rc == 0
    assert _records(recomputed) == _records(cached)


def test_recompute_uses_no_cache(export_dir, tmp_path, monkeypatch):
    from megatron.hf import generation

    seen = []
    real = generation.generate_text

    def spy(*args, **kwargs):
        seen.append(kwargs["use_cache"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_text", spy)
    assert _run(export_dir, tmp_path, "--text", "Hi", "--recompute")[0] == 0
    assert seen == [False]


def test_interactive_reads_stdin_until_eof(export_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("The cat\n\nA dog ran\n"))
    rc, out = _run(export_dir, tmp_path, "--text_gen_type", "interactive")
    assert rc == 0
    assert [r["context"] for r in _records(out)] == ["The cat", "A dog ran"]


def test_contradictions_are_one_line(export_dir, tmp_path, capsys):
    assert _run(export_dir, tmp_path, "--text", "x", "--recompute", "--sep_cache", "2,2,4,12")[0] == 2
    assert "recompute" in capsys.readouterr().err
    assert _run(export_dir, tmp_path, "--text_gen_type", "unconditional", "--num_samples", "0")[0] == 2
    assert "--num_samples must be >= 1" in capsys.readouterr().err
    assert _run(export_dir, tmp_path, "--text_gen_type", "input-file")[0] == 2
    assert "needs sample_input_file" in capsys.readouterr().err


def test_unconditional_prompt_is_the_tokenizers_own_end_of_document_token():
    import types

    import generate

    llama_like = types.SimpleNamespace(eod=2, decode=lambda ids: {2: "</s>"}[ids[0]])
    assert generate.end_of_document_text(llama_like) == "</s>"
    with pytest.raises(generate.BadInput, match="has none"):
        generate.end_of_document_text(types.SimpleNamespace(eod=None, decode=str))
