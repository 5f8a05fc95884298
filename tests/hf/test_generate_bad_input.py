"""generate.py: every bad input is one line on stderr and exit status 2, never a traceback."""
import shutil

import pytest

from tests.hf.helpers import SEPS, base_config, make_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, pythia_tokenizer_path):
    tmp = tmp_path_factory.mktemp("gen_bad")
    _, out = make_export(tmp, base_config(pythia_tokenizer_path, separator_token_ids=SEPS), "sepllm_gpt_neox")
    return out


def _run(capsys, *argv):
    import generate

    try:
        rc = generate.main(list(argv))
    except SystemExit as stop:  # argparse's own errors
        rc = stop.code
    captured = capsys.readouterr()
    # transformers' weight-loading progress bar also writes to stderr
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading weights")]
    return rc, lines, captured.out


def test_bad_inputs_are_one_line(export_dir, tmp_path, capsys):
    ok = ["--model_dir", export_dir, "--text", "Hello, world", "--maximum_tokens", "2"]
    cases = [
        (["--model_dir", str(tmp_path / "nope"), "--text", "Hi"], "does not exist"),
        (["--model_dir", export_dir, "--sample_input_file", str(tmp_path / "prompts.txt")], "prompt file"),
        (ok + ["--maximum_tokens", "0"], "--maximum_tokens must be >= 1, got 0"),
        (ok + ["--maximum_tokens", "-5"], "--maximum_tokens must be >= 1, got -5"),
        (ok + ["--temperature", "-0.5"], "--temperature must be >= 0"),
        (ok + ["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (ok + ["--top_p", "-0.1"], "--top_p must be in (0, 1]"),
        (ok + ["--top_k", "-1"], "--top_k must be >= 0"),
        (ok + ["--maximum_tokens", "many"], "argument --maximum_tokens: invalid int value"),
        (ok + ["--sep_cache", "4,64,256"], "--sep_cache wants four integers"),
        (ok + ["--sep_cache", "4,64,256,100"], "--sep_cache 4,64,256,100: SepCache"),
    ]
    for argv, message in cases:
        rc, err, out = _run(capsys, *argv)
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert err[0].startswith("generate.py: error: ") and not out, (argv, out)
    assert _run(capsys, *ok, "--top_p", "0.9", "--temperature", "0.7", "--top_k", "5")[0] == 0


def test_truncated_weights_name_the_file(export_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) - 100, 4, 0):
        weights.write_bytes(data[:cut])
        rc, err, _ = _run(capsys, "--model_dir", str(broken), "--text", "Hi")
        assert rc == 2 and len(err) == 1 and str(weights) in err[0], (cut, err)


def test_trainer_mode_bad_config_is_one_line(tmp_path, capsys):
    rc, err, _ = _run(capsys, "--neox_config_file", str(tmp_path / "missing.yml"))
    assert rc == 2 and len(err) == 1 and "resolved config not found" in err[0], err
