"""tools/ckpts/reshard.py: TP=2 -> 1 -> 2 gives back the same files' tensors bit for bit (both layouts, MHA with
the parallel residual and GQA + swiglu with the sequential residual, both MLP namings); the export of a resharded
TP=2 checkpoint equals the export of the TP=1 one; the vocabulary padding follows make_vocab_size_divisible_by x TP
(rows trimmed, zero rows added); the resolved config, layout and client state say the new sizes; bad input is
refused by name before anything is written."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_helpers import CASES, source_checkpoint  # noqa: E402

from megatron.checkpoint_io import CheckpointError, CheckpointReader  # noqa: E402
from megatron.checkpoint_reshard import RESHARD_MARKER, reshard  # noqa: E402
from megatron.checkpointing import NO_OPTIMIZER_MARKER  # noqa: E402


def tensors(ckpt: str) -> dict:
    """{(layer, tp rank, name as in the file): tensor} of a checkpoint, either layout."""
    reader = CheckpointReader(str(ckpt), 2)
    return {(idx, rank, name): t for idx in reader.layer_indices()
            for rank, state in enumerate(reader.layer(idx, file_names=True)) for name, t in state.items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_2_1_2_is_bitwise(tmp_path, case):
    src = source_checkpoint(tmp_path, **CASES[case])
    tp2 = reshard(str(src), str(tmp_path / "tp2"), 2, 1, log=lambda _: None)
    tp1 = reshard(str(tmp_path / "tp2"), str(tmp_path / "tp1"), 1, 0, log=lambda _: None)  # a save dir: its latest
    again = reshard(tp1, str(tmp_path / "tp2_again"), 2, 1, log=lambda _: None)
    first = tensors(tp2)
    assert {rank for _, rank, _ in first} == {0, 1}
    assert_same(first, tensors(again))
    assert_same(tensors(src), tensors(tp1))
    names = {name for _, _, name in first}
    if CASES[case].get("checkpoint_tensor_names") == "current":
        assert "mlp.linear1.weight" in names and "mlp.dense_h_to_4h.weight" not in names
    else:
        assert "mlp.dense_h_to_4h.weight" in names
    # A sharded tensor is half the size of the full one on each rank.
    full_qkv = tensors(src)[(2, 0, "attention.query_key_value.weight")]
    assert first[(2, 1, "attention.query_key_value.weight")].shape[0] * 2 == full_qkv.shape[0]


def test_written_layout_config_and_client_state(tmp_path):
    import yaml

    src = source_checkpoint(tmp_path)
    out = Path(reshard(str(src), str(tmp_path / "tp2"), 2, 2, log=lambda _: None))
    assert out == tmp_path / "tp2" / "global_step3" and (tmp_path / "tp2" / "latest").read_text() == "global_step3"
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("mp_rank")] == [f"mp_rank_{i:02d}_model_states.pt" for i in range(4)]
    from megatron import checkpoint_layout as cl

    cl.check_files(str(out), cl.read_layout(str(out)), cl.read_saved_config(str(out)))  # what DeepSpeed writes
    os.rename(out / "mp_rank_03_model_states.pt", tmp_path / "away.pt")
    with pytest.raises(CheckpointError, match="missing checkpoint file .*mp_rank_03_model_states.pt"):
        cl.check_files(str(out), cl.read_layout(str(out)), cl.read_saved_config(str(out)))
    os.rename(tmp_path / "away.pt", out / "mp_rank_03_model_states.pt")
    assert "layer_05-model_01-model_states.pt" in names and "layer_06-model_01-model_states.pt" in names
    resolved = yaml.safe_load((out / "configs" / "resolved_config.yml").read_text())
    assert (resolved["model_parallel_size"], resolved["pipe_parallel_size"], resolved["padded_vocab_size"]) == (2, 2, 512)
    assert json.loads((out / "layout.json").read_text()) == dict(world_size=4, data_parallel_size=1, pipe_parallel_size=2,
                                                                 model_parallel_size=2, zero_stage=0)
    client = torch.load(out / "mp_rank_03_model_states.pt", weights_only=False)
    assert client["module"] is None and client["optimizer"] is None and client["iteration"] == 1
    assert client["args"]["model_parallel_size"] == 2 and client["mp_world_size"] == 4
    assert "no_load_optim" in (out / NO_OPTIMIZER_MARKER).read_text()
    assert (out / "configs" / "model.yml").is_file()  # the user's YAML travels unchanged
    assert json.loads((tmp_path / "tp2" / RESHARD_MARKER).read_text())["model_parallel_size"] == 2


def test_vocab_padding_follows_the_tp_size(tmp_path):
    """512 characters padded to multiples of 100 x TP: 600 at TP 1 and 2, 800 at TP 4."""
    src = source_checkpoint(tmp_path, make_vocab_size_divisible_by=100)
    tp4 = reshard(str(src), str(tmp_path / "tp4"), 4, 1, log=lambda _: None)
    got, full = tensors(tp4), tensors(src)
    for idx, name in ((0, "word_embeddings.weight"), (6, "final_linear.weight")):
        rows = torch.cat([got[(idx, r, name)] for r in range(4)])
        assert rows.shape[0] == 800 and torch.equal(rows[:600], full[(idx, 0, name)]) and rows[600:].eq(0).all()
    back = reshard(tp4, str(tmp_path / "tp1"), 1, 0, log=lambda _: None)
    assert_same(tensors(back), full)


def test_export_of_the_resharded_checkpoint_equals_the_original(tmp_path):
    from safetensors.torch import load_file

    from megatron.hf.export import export

    src = source_checkpoint(tmp_path)
    tp2 = reshard(str(src), str(tmp_path / "tp2"), 2, 0, log=lambda _: None)
    a = load_file(os.path.join(export(str(src), None, str(tmp_path / "a"), architecture="neox", save_tokenizer=False,
                                      log=lambda _: None), "model.safetensors"))
    b = load_file(os.path.join(export(tp2, None, str(tmp_path / "b"), architecture="neox", save_tokenizer=False,
                                      log=lambda _: None), "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_before_writing(tmp_path):
    import yaml

    src = source_checkpoint(tmp_path)
    quiet = dict(log=lambda _: None)
    with pytest.raises(CheckpointError, match=r"--tp 3: key 'num_attention_heads' is 4 in .*cannot split"):
        reshard(str(src), str(tmp_path / "out"), 3, 0, **quiet)
    with pytest.raises(CheckpointError, match="--tp 0: must be >= 1"):
        reshard(str(src), str(tmp_path / "out"), 0, 0, **quiet)
    with pytest.raises(CheckpointError, match="--pp -1: must be >= 0"):
        reshard(str(src), str(tmp_path / "out"), 1, -1, **quiet)
    with pytest.raises(CheckpointError, match="overlaps the input checkpoint"):
        reshard(str(src), str(src / "inner"), 2, 0, **quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"--output_dir .*other exists and was not written by reshard.py"):
        reshard(str(src), str(tmp_path / "other"), 2, 0, **quiet)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"--input_dir: load=.*nowhere: no checkpoint there"):
        reshard(str(tmp_path / "nowhere"), str(tmp_path / "out"), 2, 0, **quiet)
    # A tokenizer that is not where the config says: the padding cannot be computed.
    moved = tmp_path / "moved" / "global_step3"
    import shutil
    shutil.copytree(src, moved)
    path = moved / "configs" / "resolved_config.yml"
    values = yaml.safe_load(path.read_text())
    values.update(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "gone.json"))
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(CheckpointError, match=r"vocab_file .*gone.json does not exist here.*give --vocab_file"):
        reshard(str(moved), str(tmp_path / "out"), 2, 0, **quiet)
    os.unlink(path)  # GPT-NeoX's checkpoints have no resolved config
    with pytest.raises(CheckpointError, match="has no configs/resolved_config.yml"):
        reshard(str(moved), str(tmp_path / "out"), 2, 0, **quiet)
    assert not (tmp_path / "out").exists()
    # Its own previous output is replaced.
    reshard(str(src), str(tmp_path / "out"), 2, 0, **quiet)
    reshard(str(src), str(tmp_path / "out"), 1, 1, **quiet)
    assert "layer_00-model_00-model_states.pt" in os.listdir(tmp_path / "out" / "global_step3")


def test_command_line(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "ckpts"))
    import reshard as cli

    src = source_checkpoint(tmp_path)
    assert cli.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "o"), "--tp", "3", "--pp", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reshard: error: --tp 3: key 'num_attention_heads'")
    assert cli.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "o"), "--tp", "2", "--pp", "1"]) == 0
    assert "to model parallel 2, pipeline stages 1 (padded vocabulary 512)" in capsys.readouterr().out
