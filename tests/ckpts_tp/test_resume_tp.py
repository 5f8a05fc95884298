"""Resuming into another tensor-parallel size: the weights-only load (no_load_optim / finetune) merges the saved
shards and cuts them for this run (TP=1 checkpoint into a TP=2 model on 2 ranks, a TP=2 checkpoint into a TP=1
model), with the vocabulary padded again (600 rows at TP=1, 800 at TP=2 for make_vocab_size_divisible_by 200), and
gives the saved model's logits; the launcher refuses, naming both sizes, a TP change with the optimizer, through a
universal checkpoint without tensor-parallel patterns, and a checkpoint without optimizer state without
no_load_optim / finetune; a GPT-NeoX TP=2
checkpoint with parallel-residual biases is converted (its ranks' biases summed)."""
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))
import tp_harness as h  # noqa: E402
from ckpt_helpers import TINY, logits, source_checkpoint, source_model  # noqa: E402

from megatron import checkpoint_layout as cl  # noqa: E402
from megatron.checkpoint_reshard import reshard  # noqa: E402
from megatron.neox_arguments.errors import ConfigError  # noqa: E402

VOCAB = dict(make_vocab_size_divisible_by=200)  # 512 characters: 600 rows at TP=1, 800 at TP=2


def run_args(tp: int, **keys):
    from megatron.hf.export_config import _environment
    from megatron.neox_arguments import NeoXArgs

    return NeoXArgs.from_dict({**TINY, **VOCAB, "model_parallel_size": tp, **keys}, env=_environment(tp))


def _load_into_tp2(rank, world, ckpt, want_path):
    from megatron import mpu
    from megatron.model import build_sequential_model

    h.init_grid(world)
    args = run_args(2, no_load_optim=True)
    assert args.padded_vocab_size == 800
    model = build_sequential_model(args, parallel_output=False).eval()
    client = cl.load_weights_any_layout(types.SimpleNamespace(module=model, optimizer=None), ckpt, args)
    assert client["iteration"] == 1
    got = logits(model)
    want = torch.load(want_path)
    assert got.shape[-1] == 800 and h.rel_err(got[..., :600], want) <= 1e-5, h.rel_err(got[..., :600], want)
    assert got[..., 600:].eq(0).all()  # the new padding rows are zeros (and there is no output bias)
    assert mpu.get_model_parallel_world_size() == 2


@pytest.mark.deepspeed
def test_weights_resume_into_another_tp_size(tmp_path):
    from megatron.model import build_sequential_model

    _, _, model = source_model(**VOCAB)
    want = logits(model)
    torch.save(want, tmp_path / "want.pt")
    src = source_checkpoint(tmp_path, **VOCAB)
    args = run_args(2, no_load_optim=True)
    assert cl.resume_plan(args, str(src)) == (False, cl.read_layout(str(src)))
    h.run_ranks(_load_into_tp2, 2, str(src), str(tmp_path / "want.pt"))
    # A TP=2 checkpoint (800 rows) into the TP=1 model (600 rows).
    tp2 = reshard(str(src), str(tmp_path / "tp2"), 2, 1, log=lambda _: None)
    one = run_args(1, no_load_optim=True)
    assert cl.resume_plan(one, tp2)[0] is False
    target = build_sequential_model(one).eval()
    cl.load_weights_any_layout(types.SimpleNamespace(module=target, optimizer=None), tp2, one)
    assert torch.equal(logits(target), want)


def test_launcher_refuses_another_tp_size_by_name(tmp_path):
    src = str(source_checkpoint(tmp_path, **VOCAB))
    with pytest.raises(ConfigError) as err:
        cl.resume_plan(run_args(2), src)
    text = str(err.value)
    assert text.startswith(f"key 'model_parallel_size' is 2, but checkpoint {src} was saved with model_parallel_size=1")
    assert "'no_load_optim: true'" in text and "'finetune: true'" in text
    assert f"python tools/ckpts/reshard.py --input_dir {src} --output_dir {tmp_path / 'src'}_tp2_pp0 --tp 2 --pp 0" \
        in text
    os.mkdir(os.path.join(src, "zero"))
    with pytest.raises(ConfigError, match=r"'checkpoint.load_universal': .*model_parallel_size=1 and this run has "
                                          r"model_parallel_size=2, but it records no tensor-parallel patterns"):
        cl.resume_plan(run_args(2, checkpoint={"load_universal": True}), src)
    # A vocabulary that differs by more than the padding is still a model-key mismatch.
    with pytest.raises(ConfigError, match="key 'padded_vocab_size' is 1024"):
        cl.resume_plan(run_args(2, no_load_optim=True, make_vocab_size_divisible_by=512), src)
    # A resharded checkpoint has no optimizer state: refused before launch without no_load_optim / finetune.
    tp2 = reshard(src, str(tmp_path / "tp2"), 2, 1, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"^key 'load': checkpoint .* holds no optimizer state \(resharded by "
                                          r"tools/ckpts/reshard.py .*\); set 'no_load_optim: true'"):
        cl.resume_plan(run_args(2, pipe_parallel_size=1), tp2)
    assert cl.resume_plan(run_args(2, pipe_parallel_size=1, finetune=True), tp2)[0] is True  # its layout: DeepSpeed


def test_vocab_paddings_agree():
    saved = dict(padded_vocab_size=600, make_vocab_size_divisible_by=200, model_parallel_size=1)
    ns = types.SimpleNamespace
    assert cl.vocab_paddings_agree(saved, ns(padded_vocab_size=800, make_vocab_size_divisible_by=200,
                                             model_parallel_size=2))
    # 600 at multiples of 200 means 400 < v <= 600: 1200 at multiples of 200 x 4 cannot hold such a v.
    assert not cl.vocab_paddings_agree(saved, ns(padded_vocab_size=1600, make_vocab_size_divisible_by=200,
                                                 model_parallel_size=4))
    assert cl.vocab_paddings_agree(saved, ns(padded_vocab_size=800, make_vocab_size_divisible_by=200,
                                             model_parallel_size=4))
    # Only the tensor-parallel size may have changed the padding.
    assert not cl.vocab_paddings_agree(saved, ns(padded_vocab_size=800, make_vocab_size_divisible_by=400,
                                                 model_parallel_size=2))
    assert not cl.vocab_paddings_agree(saved, ns(padded_vocab_size=800, make_vocab_size_divisible_by=200,
                                                 model_parallel_size=1))


def _gpt_neox_tp2(tmp_path, **vocab):
    """The source model as GPT-NeoX would write it at TP=2 with gpt_j_residual: no resolved config, layer files,
    each rank's row-parallel bias half of the model's (its ranks' copies are summed)."""
    from megatron import checkpoint_partition as cp

    cfg, args, model = source_model(**(vocab or VOCAB))
    ckpt = tmp_path / "neox" / "global_step1"
    ckpt.mkdir(parents=True)
    layers = {}
    for key, value in model.state_dict().items():
        _, idx, name = key.split(".", 2)
        layers.setdefault(int(idx), {})[name] = value
    for idx, state in layers.items():
        for rank in range(2):
            shard = {}
            for name, t in state.items():
                rule = cp.tensor_rule(name, args, gpt_neox=True)
                shard[name] = (t / 2 if rule.kind == cp.SUMMED else cp.split(t, rule, 2, name)[rank]).clone()
            torch.save(shard, ckpt / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
    record = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads")}
    record["model_parallel_size"] = 2
    client = {"module": None, "iteration": 1, "args": record, "dp_world_size": 1,
              "checkpoint_parallel_dimensions": {"tp_degree": 2, "pp_degree": 1}}
    for mp in range(2):
        torch.save(client, ckpt / f"mp_rank_{mp:02d}_model_states.pt")
    return model, str(ckpt)


def test_gpt_neox_tp2_parallel_residual_biases_are_converted(tmp_path):
    from megatron.model import build_sequential_model

    model, ckpt = _gpt_neox_tp2(tmp_path)
    # In its own layout DeepSpeed would load the halves as they are: refused, the weights-only load converts.
    with pytest.raises(ConfigError, match=r"is GPT-NeoX's, at model_parallel_size=2 with gpt_j_residual .*set "
                                          r"'no_load_optim: true'"):
        cl.resume_plan(run_args(2, pipe_parallel_size=1), ckpt)
    assert cl.resume_plan(run_args(2, pipe_parallel_size=1, finetune=True), ckpt)[0] is False
    # GPT-NeoX's own rule refuses another model_parallel_size; so does this trainer, but for the weights alone.
    with pytest.raises(ConfigError, match=r"key 'model_parallel_size' is 1, but checkpoint .* was saved with "
                                          r"model_parallel_size=2 \(its GPT-NeoX 'args'\)"):
        cl.resume_plan(run_args(1), ckpt)
    assert cl.resume_plan(run_args(1, no_load_optim=True), ckpt)[0] is False
    one = run_args(1, no_load_optim=True)
    target = build_sequential_model(one).eval()
    cl.load_weights_any_layout(types.SimpleNamespace(module=target, optimizer=None), ckpt, one)
    assert h.rel_err(logits(target), logits(model)) <= 1e-6
    shutil.rmtree(tmp_path / "neox")


def test_gpt_neox_tp2_tensors_are_checked_per_rank_before_launch(tmp_path):
    from megatron import checkpoint_neox

    _, ckpt = _gpt_neox_tp2(tmp_path, make_vocab_size_divisible_by=128)
    assert checkpoint_neox.first_tensor_mismatch(run_args(2, pipe_parallel_size=1, make_vocab_size_divisible_by=128),
                                                 ckpt) is None
    wider = run_args(2, pipe_parallel_size=1, make_vocab_size_divisible_by=128, hidden_size=64)
    assert checkpoint_neox.first_tensor_mismatch(wider, ckpt) == (
        f"{ckpt}/layer_00-model_00-model_states.pt: tensor 'word_embeddings.weight' of layer 0 has shape [256, 32] in "
        "the checkpoint, but the model this config builds has [256, 64] on each of its 2 tensor-parallel ranks")


def test_zero3_shards_of_several_tp_ranks_are_refused(tmp_path):
    from megatron.checkpoint_io import CheckpointError, CheckpointReader

    for mp in (0, 1):
        (tmp_path / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="ZeRO-3 shards of 2 model-parallel ranks"):
        CheckpointReader(str(tmp_path), 2)


def _with_universal_info(ckpt: str, args) -> str:
    """``ckpt`` as ds_to_universal leaves it for the launcher's check: the patterns in the client state, zero/."""
    from megatron import checkpoint_partition as cp
    from megatron.model.layer_list import build_sequential_model

    names = [n for n, _ in build_sequential_model(args).named_parameters()]
    for name in os.listdir(ckpt):
        if name.startswith("mp_rank_"):
            blob = torch.load(os.path.join(ckpt, name), weights_only=False)
            blob["universal_checkpoint_info"] = cp.universal_checkpoint_info(args, names)
            torch.save(blob, os.path.join(ckpt, name))
    os.makedirs(os.path.join(ckpt, "zero"), exist_ok=True)
    return ckpt


def test_universal_checkpoint_into_another_tp_size_where_deepspeed_can(tmp_path):
    src = _with_universal_info(str(source_checkpoint(tmp_path, **VOCAB)), run_args(1))
    universal = dict(checkpoint={"load_universal": True})
    assert cl.resume_plan(run_args(2, **universal), src)[0] is True  # 600 -> 800 rows: DeepSpeed pads
    with pytest.raises(ConfigError, match=r"model_parallel_size=2, but DeepSpeed's universal checkpoint moves between "
                                          r"tensor-parallel sizes here on the sequential model only"):
        cl.resume_plan(run_args(2, pipe_parallel_size=1, **universal), src)
    tp2 = _with_universal_info(reshard(src, str(tmp_path / "tp2"), 2, 0, log=lambda _: None), run_args(1))
    blob_path = os.path.join(tp2, "mp_rank_00_model_states.pt")
    blob = torch.load(blob_path, weights_only=False)
    blob["universal_checkpoint_info"]["original_vocab_size"] = 800  # as a TP=2 run records it
    torch.save(blob, blob_path)
    os.unlink(os.path.join(tp2, "no_optimizer_states"))  # a trained run's, which has its optimizer state
    with pytest.raises(ConfigError, match=r"its vocabulary is padded to 800 rows and this run pads to 600: DeepSpeed "
                                          r"adds padding rows, never drops them"):
        cl.resume_plan(run_args(1, **universal), tp2)
