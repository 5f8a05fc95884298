"""Inputs that used to pass deepy.py and crash on the ranks: each is now one `configuration error` line, rc 2.

Data files (format and token ids), a garbage tokenizer file, deepspeed_extra_args, optimizer params and a
few other keys the ranks used to reject only after the model was built.
"""
import json
import os
import struct

import pytest

import deepy
from megatron.neox_arguments import ConfigError, NeoXArgs

from .helpers import Recorder, cpu, make_dataset, small, write


def launch(tmp_path, capsys, data_keys, extra_yaml=""):
    """deepy.main on a small CharLevelTokenizer config (padded vocabulary 512): (rc, stdout, stderr, launched)."""
    cfg = write(tmp_path / "run.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + "\n"
                + "\n".join(f"{k}: {json.dumps(v)}" for k, v in data_keys.items()) + f"""
train_iters: 10
optimizer: {{type: Adam, params: {{lr: 0.001}}}}
tokenizer_type: CharLevelTokenizer
train_micro_batch_size_per_gpu: 2
{extra_yaml}""")
    script = write(tmp_path / "train.py", "print('rank')\n")
    rec = Recorder()
    resolved = tmp_path / "resolved.yml"
    if resolved.exists():
        resolved.unlink()
    rc = deepy.main([script, cfg, "--resolved_config", str(resolved)], runner=rec, env=cpu())
    out, err = capsys.readouterr()
    assert (rc == 0) == bool(rec.calls) == resolved.exists()
    return rc, out, err, bool(rec.calls)


def assert_one_line(err, *parts):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepy.py: configuration error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


# ----------------------------------------------------------------------------- data files
def test_corrupt_data_files_stop_before_launch(tmp_path, capsys):
    data = make_dataset(tmp_path)
    with open(data + ".bin", "r+b") as f:
        f.truncate(4)
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": data})
    assert rc == 2
    assert_one_line(err, "key 'data_path': data file ", "corpus_text_document.bin is 4 bytes", "says its sequences end")

    good, bad = make_dataset(tmp_path, "good"), make_dataset(tmp_path, "bad")
    with open(bad + ".idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 2))  # version 2
    rc, _, err, _ = launch(tmp_path, capsys, {"train_data_paths": [good], "valid_data_paths": [good, bad]})
    assert rc == 2
    assert_one_line(err, "key 'valid_data_paths': index file ", "bad.idx has version 2")


def test_token_ids_beyond_the_vocabulary_stop_before_launch(tmp_path, capsys):
    data = make_dataset(tmp_path, ids=(5, 17, 0, 600, 3, 0))
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": data})
    assert rc == 2
    assert_one_line(err, "key 'data_path': data file ", "corpus_text_document.bin holds token id 600",
                    "first at sequence 1, token 0", "vocabulary of 512 ids",
                    "padded_vocab_size, from tokenizer_type CharLevelTokenizer")

    good = make_dataset(tmp_path, "good", ids=(5, 511, 0))
    rc, out, err, launched = launch(tmp_path, capsys, {"data_path": good})
    assert rc == 0 and launched and "scanned the token ids of " in out and "ids [0, 511]" in out
    assert os.path.isfile(good + "_token_ids.json")
    # The scan is cached: a second launch says nothing about it.
    rc, out, _, _ = launch(tmp_path, capsys, {"data_path": good})
    assert rc == 0 and "scanned the token ids" not in out


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("content", [b"garbage{{", b'{"version": "1.0"}', b"\xff\xfe\x00binary"])
def test_garbage_tokenizer_file_is_a_configuration_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    d = small(tokenizer_type="HFTokenizer", vocab_file=str(path))
    with pytest.raises(ConfigError, match=r"key 'vocab_file' \(tokenizer_type HFTokenizer\): vocab-file .*tokenizer.json"):
        NeoXArgs.from_dict(d, env=cpu())


def test_garbage_tokenizer_through_deepy(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    path.write_text("garbage{{")
    cfg = write(tmp_path / "run.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + f"""
train_iters: 10
optimizer: {{type: Adam, params: {{lr: 0.001}}}}
data_path: {make_dataset(tmp_path)}
tokenizer_type: HFTokenizer
vocab_file: {path}
""")
    script = write(tmp_path / "train.py", "print('rank')\n")
    rec = Recorder()
    assert deepy.main([script, cfg], runner=rec, env=cpu()) == 2 and rec.calls == []
    assert_one_line(capsys.readouterr().err, "key 'vocab_file'", "is not a valid HuggingFace tokenizer.json")


# ----------------------------------------------------------------------------- deepspeed_extra_args
@pytest.mark.parametrize("extra,parts", [
    ({"train_batch_size": 64}, ["key 'deepspeed_extra_args.train_batch_size' is a key of this config"]),
    ({"zero_optimization": {"stage": 2}}, ["'deepspeed_extra_args.zero_optimization' is a key of this config"]),
    ({"memory_breakdwn": True}, ["'deepspeed_extra_args.memory_breakdwn' is not a key DeepSpeed's config reads",
                                 "did you mean 'memory_breakdown'"]),
    ({"memory_breakdown": "yes"}, ["'deepspeed_extra_args.memory_breakdown' is 'yes'; DeepSpeed expects true or false"]),
    ({"dataloader_drop_last": 1}, ["'deepspeed_extra_args.dataloader_drop_last' is 1; DeepSpeed expects true or false"]),
    ({"disable_allgather": {}}, ["'deepspeed_extra_args.disable_allgather' is {}; DeepSpeed expects true or false"]),
    # DeepSpeed's own (pydantic) rejection, several lines and a URL before, on one line.
    ({"tensorboard": 3}, ["DeepSpeed rejects the derived DeepSpeed config: DeepSpeedMonitorConfig: tensorboard: "
                          "Input should be a valid dictionary"]),
])
def test_bad_deepspeed_extra_args_stop_before_launch(tmp_path, capsys, extra, parts):
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": make_dataset(tmp_path)},
                           extra_yaml=f"deepspeed_extra_args: {json.dumps(extra)}\n")
    assert rc == 2
    assert_one_line(err, *parts)


def test_good_deepspeed_extra_args_reach_the_deepspeed_config(tmp_path, capsys):
    extra = {"memory_breakdown": True, "dataloader_drop_last": False, "gradient_allreduce_op": "mean"}
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": make_dataset(tmp_path)},
                           extra_yaml=f"deepspeed_extra_args: {json.dumps(extra)}\n")
    assert rc == 0, err
    config = NeoXArgs.from_resolved(str(tmp_path / "resolved.yml"), env=cpu(WORLD_SIZE=1)).deepspeed_config()
    assert {k: config[k] for k in extra} == extra


# ----------------------------------------------------------------------------- optimizer and other keys
@pytest.mark.parametrize("params,message", [
    ({"lr": 1e-3, "betas": [0.9]}, r"'optimizer.params.betas' must be two numbers in \[0, 1\) .*got \[0.9\]"),
    ({"lr": 1e-3, "betas": [0.9, 0.95, 0.99]}, r"'optimizer.params.betas' must be two numbers"),
    ({"lr": 1e-3, "betas": [0.9, 1.5]}, r"'optimizer.params.betas' must be two numbers"),
    ({"lr": 1e-3, "betas": "0.9,0.95"}, r"'optimizer.params.betas' must be two numbers"),
    ({"lr": 1e-3, "eps": 0}, r"'optimizer.params.eps' must be a number > 0, got 0"),
    ({"lr": 1e-3, "weight_decay": 0.1}, r"'optimizer.params.weight_decay' is not used by the trainer's adam "
                                        r"\(it takes lr, betas, eps; weight decay is the key 'weight_decay'\)"),
])
def test_optimizer_params_checked_before_a_rank_builds_the_optimizer(params, message):
    with pytest.raises(ConfigError, match=message):
        NeoXArgs.from_dict(small(optimizer={"type": "Adam", "params": params}), env=cpu())


def test_deepspeed_built_optimizer_keeps_its_own_params():
    args = NeoXArgs.from_dict(small(optimizer={"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.1,
                                                                          "max_coeff": 10.0}}), env=cpu())
    assert args.deepspeed_config()["optimizer"]["params"]["max_coeff"] == 10.0
    with pytest.raises(ConfigError, match="'optimizer.params.betas' must be two numbers"):
        NeoXArgs.from_dict(small(optimizer={"type": "Lamb", "params": {"lr": 1e-3, "betas": [0.9]}}), env=cpu())


def test_other_keys_the_ranks_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'seed' must be in \[0, 2\*\*32\), got -1"):
        NeoXArgs.from_dict(small(seed=-1), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'seed' must be in \[0, 2\*\*32\), got 4294967296"):
        NeoXArgs.from_dict(small(seed=2**32), env=cpu())
    with pytest.raises(ConfigError, match="key 'weight_decay' must be >= 0, got -0.1"):
        NeoXArgs.from_dict(small(weight_decay=-0.1), env=cpu())
    with pytest.raises(ConfigError, match="key 'data_impl' is 'cached', which this project does not implement"):
        NeoXArgs.from_dict(small(data_impl="cached"), env=cpu())
    data = make_dataset(tmp_path)
    # With data_path the per-split lists and the document weighting were silently ignored.
    with pytest.raises(ConfigError, match="key 'valid_data_paths' applies to train/valid/test_data_paths, but "
                                          "'data_path' is given"):
        NeoXArgs.from_dict(small(data_path=data, valid_data_paths=[data]), env=cpu())
    with pytest.raises(ConfigError, match="key 'weight_by_num_documents' applies to"):
        NeoXArgs.from_dict(small(data_path=data, weight_by_num_documents=True), env=cpu())


def test_data_that_leaves_nothing_to_train_on(tmp_path, capsys):
    data = make_dataset(tmp_path, ids=(5, 0, 6, 0, 7, 0))
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": data, "split": "1,1,0"})
    assert rc == 0, err  # 3 documents: train gets one
    rc, _, err, _ = launch(tmp_path, capsys, {"data_path": data, "split": "0,1,0"})
    assert rc == 2
    assert_one_line(err, "key 'split' is '0,1,0': over the 3 documents of data_path ", "no documents")
    empty = make_dataset(tmp_path, "empty", ids=())
    rc, _, err, _ = launch(tmp_path, capsys, {"train_data_paths": [data], "valid_data_paths": [empty]})
    assert rc == 2
    assert_one_line(err, "key 'valid_data_paths': dataset ", "empty holds no tokens (0 sequences)")


def test_dataset_named_with_its_suffix_gets_the_prefix_suggested(tmp_path):
    data = make_dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"is missing .*\.bin\.bin, .*\.bin\.idx \(a dataset is named by its "
                                          r"prefix: '.*corpus_text_document'\)"):
        NeoXArgs.from_dict(small(data_path=data + ".bin"), env=cpu())


# ----------------------------------------------------------------------------- generation
def test_missing_prompt_file_stops_before_launch(tmp_path, capsys):
    data = {"data_path": make_dataset(tmp_path)}
    rc, _, err, launched = launch(tmp_path, capsys, data, extra_yaml="text_gen_type: input-file\n")
    assert rc == 2 and not launched
    assert_one_line(err, "key 'text_gen_type' is input-file", "'sample_input_file'", "not set")
    missing = tmp_path / "prompts.txt"
    rc, _, err, _ = launch(tmp_path, capsys, data,
                           extra_yaml=f"text_gen_type: input-file\nsample_input_file: {missing}\n")
    assert rc == 2
    assert_one_line(err, "key 'sample_input_file'", f"{missing} does not exist")
    missing.write_text("It is a truth\n")
    rc, _, err, launched = launch(tmp_path, capsys, data,
                                  extra_yaml=f"text_gen_type: input-file\nsample_input_file: {missing}\n")
    assert rc == 0 and launched, err
