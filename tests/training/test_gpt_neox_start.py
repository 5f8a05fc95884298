"""GPT-NeoX's canonical start, `deepy.py train.py configs/125M.yml configs/local_setup.yml`, launches for real on
CPU and resumes on the second launch.

What differs from the command as a user types it, and why:

* the run's working directory is a temporary folder holding ``data/default/`` (a tiny corpus and tokenizer where
  the quickstart's data prep would put them), so local_setup.yml's relative paths (data, ``checkpoints``,
  ``tensorboard``, ``logs``) land there and not in the checkout;
* configs/125M.yml is a real 125M model in fp16 (GPU only), and a key given twice is an error (in GPT-NeoX too),
  so no override file can shrink it: the test loads a copy with the values in ``CPU_SIZE`` replaced and every
  other key of the file kept (ZeRO 1, activation checkpointing, ``hostfile: /mock_path``, ...).
  configs/local_setup.yml is used as it is.
"""
import sys

import pytest
import yaml

from launch_utils import REPO, launch_env, write_tiny_corpus

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

# fp16.enabled false: fp32, by GPT-NeoX's rule that the section is on only when enabled is true.
CPU_SIZE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
            "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 2, "lr_decay_iters": 4,
            "checkpoint_factor": 2, "log_interval": 1, "wall_clock_breakdown": False}


def cpu_copy_of_125m(path, train_iters):
    from megatron.neox_arguments.loading import read_yaml_keys

    keys = {key: value for key, value, _ in read_yaml_keys(str(REPO / "configs" / "125M.yml"))}
    assert set(CPU_SIZE) <= set(keys) and keys["hostfile"] == "/mock_path"
    keys.update(CPU_SIZE, train_iters=train_iters)
    keys["fp16"] = dict(keys["fp16"], enabled=False)
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return str(path)


def byte_tokenizer(path):
    """A tokenizer.json whose ids 0..255 cover the byte corpus (0 is <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1, **{f"b{i}": i for i in range(2, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="b2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def launch(cwd, config_125m):
    import subprocess

    cmd = [sys.executable, str(REPO / "deepy.py"), str(REPO / "train.py"), config_125m,
           str(REPO / "configs" / "local_setup.yml")]
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_125m_with_local_setup_launches_then_resumes(tmp_path):
    (tmp_path / "data" / "default").mkdir(parents=True)
    write_tiny_corpus(str(tmp_path / "data" / "default" / "default_text_document"))
    byte_tokenizer(tmp_path / "data" / "default" / "tokenizer.json")

    out = launch(tmp_path, cpu_copy_of_125m(tmp_path / "125M.yml", train_iters=2))
    assert ("deepy.py: warning: hostfile /mock_path (key 'hostfile' in " in out
            and "not found: running on local resources only" in out), out[-4000:]
    assert "deepy.py: note: 'load' checkpoints is the 'save' directory and holds no checkpoint yet" in out
    assert "attention: full causal attention on all 2 layers (no SepLLM key set" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "global_step2"
    resolved = yaml.safe_load((tmp_path / "checkpoints" / "global_step2" / "configs" /
                               "resolved_config.yml").read_text())
    assert resolved["load"] is None and resolved["load_was_empty"] == "checkpoints"
    assert resolved["precision"] == "fp32" and resolved["hostfile"] is None and resolved["zero_stage"] == 1

    # The same pair again, now with a checkpoint in 'checkpoints': GPT-NeoX's resume.
    out = launch(tmp_path, cpu_copy_of_125m(tmp_path / "125M_longer.yml", train_iters=4))
    assert "holds no checkpoint yet" not in out
    assert "loaded checkpoint from checkpoints at iteration 2" in out, out[-4000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "global_step4"
