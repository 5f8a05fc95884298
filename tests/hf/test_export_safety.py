"""The exporter never destroys what it did not write, reads the checkpoint's resolved config, and turns every
damaged or contradicting input into one line naming the file, tensor or key."""
import json
import os
import stat

import pytest
import torch
import yaml

from megatron.hf.export import EXPORT_MARKER, ConversionError, export
from tests.hf.helpers import SEPS, base_config, build_trainer_model, save_checkpoint
from tools.ckpts.convert_neox_to_hf import main as convert_main


@pytest.fixture
def ckpt(tmp_path, pythia_tokenizer_path):
    """A pipeline-layout checkpoint with its resolved config, as training writes it."""
    cfg = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True)
    args, model = build_trainer_model(cfg)
    return save_checkpoint(model, cfg, tmp_path / "save" / "global_step1", "pipeline", resolved_args=args)


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def _convert(capsys, *argv):
    try:
        rc = convert_main(list(argv))
    except SystemExit as stop:  # argparse's own errors
        rc = stop.code
    return rc, capsys.readouterr().err.strip().splitlines()


def test_output_dir_only_replaces_previous_exports(tmp_path, ckpt, capsys, monkeypatch):
    base = ["--input_dir", str(ckpt), "--architecture", "neox", "--no_save_tokenizer"]
    save = ckpt.parent
    (save / "latest").write_text("global_step1")
    before = _tree(save)
    for extra in ([], ["--overwrite"]):  # a training save directory: never, even with --overwrite
        rc, err = _convert(capsys, *base, "--output_dir", str(save), *extra)
        assert rc == 2 and len(err) == 1 and "holds training checkpoints" in err[0], err
    assert _tree(save) == before

    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    rc, err = _convert(capsys, *base, "--output_dir", str(regular))
    assert rc == 2 and "is not a directory" in err[0] and regular.read_text() == "mine"

    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("keep")
    monkeypatch.chdir(work)
    for extra in ([], ["--overwrite"]):  # '.': the working directory, whatever the flags
        rc, err = _convert(capsys, *base, "--output_dir", ".", *extra)
        assert rc == 2 and len(err) == 1, err
    assert (work / "data.txt").read_text() == "keep"

    other = tmp_path / "other"
    other.mkdir()
    (other / "results.csv").write_text("1,2")
    rc, err = _convert(capsys, *base, "--output_dir", str(other))
    assert rc == 2 and f"no {EXPORT_MARKER}" in err[0] and (other / "results.csv").exists()
    assert _convert(capsys, *base, "--output_dir", str(other), "--overwrite")[0] == 0  # the user said so
    assert not (other / "results.csv").exists() and (other / EXPORT_MARKER).is_file()

    old = tmp_path / "old_export"
    assert _convert(capsys, *base, "--output_dir", str(old))[0] == 0
    (old / "stale.bin").write_text("from the previous export")
    marker = json.loads((old / EXPORT_MARKER).read_text())
    assert marker["config"].endswith("resolved_config.yml") and marker["architecture"] == "neox"
    assert _convert(capsys, *base, "--output_dir", str(old))[0] == 0  # a previous export is replaced
    assert not (old / "stale.bin").exists() and (old / "model.safetensors").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_uses_the_umask(tmp_path, ckpt, umask):
    previous = os.umask(umask)
    try:
        out = export(str(ckpt), None, str(tmp_path / "hf"), "fp32", "sepllm_gpt_neox", True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~umask, name


def test_damaged_checkpoints_name_the_file(tmp_path, ckpt, capsys):
    base = ["--input_dir", str(ckpt), "--output_dir", str(tmp_path / "hf"), "--architecture", "neox"]
    layer = ckpt / "layer_03-model_00-model_states.pt"
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    rc, err = _convert(capsys, *base)
    assert rc == 2 and len(err) == 1 and str(layer) in err[0] and "truncated or corrupt" in err[0], err
    layer.write_bytes(b"")
    rc, err = _convert(capsys, *base)
    assert rc == 2 and str(layer) in err[0], err
    layer.unlink()
    rc, err = _convert(capsys, *base)
    assert rc == 2 and f"missing layer file {layer}" in err[0], err
    assert not (tmp_path / "hf").exists()


def _rewrite_resolved(ckpt, **changes):
    path = ckpt / "configs" / "resolved_config.yml"
    values = yaml.safe_load(path.read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def test_weights_and_config_agree_on_every_dimension(tmp_path, ckpt):
    out = str(tmp_path / "hf")
    _rewrite_resolved(ckpt, num_layers=3, attention_config=["global"] * 3)
    with pytest.raises(ConversionError, match=r"holds 2 transformer blocks .* num_layers=3"):
        export(str(ckpt), None, out, "fp32", "neox")
    _rewrite_resolved(ckpt, num_layers=1, attention_config=["global"])
    with pytest.raises(ConversionError, match=r"holds 2 transformer blocks .* num_layers=1"):
        export(str(ckpt), None, out, "fp32", "neox")
    _rewrite_resolved(ckpt, num_layers=2, attention_config=["global"] * 2, intermediate_size=96)
    with pytest.raises(ConversionError, match=r"layer_02-model_00-model_states.pt: tensor gpt_neox.layers.0.mlp."
                                              r"dense_h_to_4h.weight has shape \(128, 32\) but the config implies "
                                              r"\(96, 32\) \(intermediate_size=96\)"):
        export(str(ckpt), None, out, "fp32", "neox")
    layer = ckpt / "layer_02-model_00-model_states.pt"
    state = torch.load(layer, weights_only=False)
    state.pop("mlp.dense_h_to_4h.bias")
    torch.save(state, layer)
    _rewrite_resolved(ckpt, intermediate_size=128)
    with pytest.raises(ConversionError, match=r"layer_02-model_00-model_states.pt: tensor gpt_neox.layers.0.mlp."
                                              r"dense_h_to_4h.bias is missing .*use_bias_in_mlp=True"):
        export(str(ckpt), None, out, "fp32", "neox")
    _rewrite_resolved(ckpt, intermediate_size=128, make_vocab_size_divisible_by=256)  # re-derived: 50432 rows
    with pytest.raises(ConversionError, match=r"tensor gpt_neox.embed_in.weight has shape \(50304, 32\) .* "
                                              r"\(padded_vocab_size=50432\)"):
        export(str(ckpt), None, out, "fp32", "neox")


def test_config_file_is_checked_against_the_resolved_config(tmp_path, ckpt, pythia_tokenizer_path, capsys):
    """Heads and the residual flag are invisible in the shapes: the checkpoint's resolved config decides."""
    cfg = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True)
    base = ["--input_dir", str(ckpt), "--output_dir", str(tmp_path / "hf"), "--architecture", "neox"]
    for key, value in (("num_attention_heads", 8), ("gpt_j_residual", False)):
        user = tmp_path / f"{key}.yml"
        user.write_text(yaml.safe_dump(dict(cfg, **{key: value})))
        rc, err = _convert(capsys, *base, "--config_file", str(user))
        saved = cfg[key]
        assert rc == 2 and len(err) == 1, err
        assert f"gives {key}={value!r} but the checkpoint was trained with {key}={saved!r}" in err[0], err
    twice = tmp_path / "twice.yml"
    twice.write_text(yaml.safe_dump(cfg) + "num-layers: 2\n")
    rc, err = _convert(capsys, *base, "--config_file", str(twice))
    assert rc == 2 and "key 'num_layers' is given twice" in err[0], err
    typo = tmp_path / "typo.yml"
    typo.write_text(yaml.safe_dump(dict(cfg, num_layer=2)))
    rc, err = _convert(capsys, *base, "--config_file", str(typo))
    assert rc == 2 and "unknown key 'num_layer'" in err[0] and "did you mean 'num_layers'" in err[0], err
    same = tmp_path / "same.yml"
    same.write_text(yaml.safe_dump(cfg))
    assert _convert(capsys, *base, "--config_file", str(same))[0] == 0


def test_checkpoint_without_resolved_config_reads_its_yamls(tmp_path, pythia_tokenizer_path, capsys):
    cfg = base_config(pythia_tokenizer_path, separator_token_ids=SEPS[:4], PADDING_ID=0)
    _, model = build_trainer_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "old" / "global_step1", "sequential")
    out = export(str(ckpt), None, str(tmp_path / "hf"), "fp32", "sepllm_gpt_neox", False)
    assert "has no configs/resolved_config.yml" in capsys.readouterr().out
    assert json.loads(open(os.path.join(out, "config.json")).read())["separator_token_ids"] == SEPS[:4]


def test_generation_from_a_checkpoint_refuses_a_contradicting_config(tmp_path, ckpt, pythia_tokenizer_path):
    from megatron.hf.loading import load_from_neox_args
    from megatron.neox_arguments import NeoXArgs

    cfg = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True, load=str(ckpt.parent))
    (ckpt.parent / "latest").write_text(ckpt.name)
    assert load_from_neox_args(NeoXArgs.from_dict(cfg))[0] is not None
    with pytest.raises(ValueError, match="gives num_attention_heads=8 but checkpoint .* with num_attention_heads=4"):
        load_from_neox_args(NeoXArgs.from_dict(dict(cfg, num_attention_heads=8)))


def test_checkpoint_resolved_config_is_the_launchers(tmp_path, pythia_tokenizer_path):
    """One writer: the checkpoint's copy is NeoXArgs.save_resolved's file, internal fields included."""
    from megatron.checkpointing import write_config_copies
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True,
                                          _DEFAULT_SPARSE_BLOCK_SIZE=64))
    write_config_copies(args, str(tmp_path))
    copy = (tmp_path / "configs" / "resolved_config.yml").read_text()
    assert copy == open(args.save_resolved(str(tmp_path / "launcher.yml"))).read()
    assert yaml.safe_load(copy)["_DEFAULT_SPARSE_BLOCK_SIZE"] == 64


def test_tokenizer_moved_since_training(tmp_path, pythia_tokenizer_path, capsys):
    import shutil

    trained_with = tmp_path / "tok" / "tokenizer.json"
    trained_with.parent.mkdir()
    shutil.copyfile(pythia_tokenizer_path, trained_with)
    cfg = base_config(trained_with, USE_ORIGINAL_FULL_ATTEN=True)
    args, model = build_trainer_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "save" / "global_step1", "pipeline", resolved_args=args)
    trained_with.unlink()
    out = str(tmp_path / "hf")
    with pytest.raises(ConversionError, match="tokenizer .* is not available here"):
        export(str(ckpt), None, out, "fp32", "neox")
    assert not os.path.exists(out)
    export(str(ckpt), None, out, "fp32", "neox", save_tokenizer=False)
    moved = tmp_path / "moved.yml"
    moved.write_text(yaml.safe_dump(dict(cfg, vocab_file=str(pythia_tokenizer_path))))
    export(str(ckpt), [str(moved)], out, "fp32", "neox")
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_input_dir_must_be_a_checkpoint(tmp_path, ckpt, capsys):
    rc, err = _convert(capsys, "--input_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "hf"))
    assert rc == 2 and "is not a directory" in err[0], err
    (ckpt.parent / "latest").write_text(ckpt.name)
    rc, err = _convert(capsys, "--input_dir", str(ckpt.parent), "--output_dir", str(tmp_path / "hf"))
    assert rc == 2 and "is a save directory" in err[0] and str(ckpt) in err[0], err
    rc, err = _convert(capsys, "--input_dir", str(ckpt), "--output_dir", str(tmp_path / "hf"), "--precision", "int8")
    assert rc == 2 and len(err) == 1 and "invalid choice: 'int8'" in err[0], err
    (ckpt / "configs" / "resolved_config.yml").write_text("num_layers: [2\n")
    rc, err = _convert(capsys, "--input_dir", str(ckpt), "--output_dir", str(tmp_path / "hf"))
    assert rc == 2 and len(err) == 1 and "broken resolved config" in err[0], err
