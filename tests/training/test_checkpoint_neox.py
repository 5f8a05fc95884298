"""Checkpoints both ways with GPT-NeoX (its megatron/checkpointing.py at neox_checkpoint.NEOX_COMMIT): a
checkpoint in GPT-NeoX's exact layout is checked before launch (its args, its tensors) and loads; a checkpoint
of this project carries every key GPT-NeoX's load_checkpoint reads."""
import random

import numpy as np
import pytest
import torch

from megatron import checkpoint_layout as cl
from megatron import checkpoint_neox as cn
from megatron import checkpointing as ck
from megatron.neox_arguments.errors import ConfigError
from neox_checkpoint import (NEOX_ARGS, NEOX_COMMIT, NEOX_LOAD_KEYS, deepspeed_keys, neox_client_state,
                             neox_layer_states, write_neox_checkpoint)

LAYERS, HIDDEN, VOCAB = 2, 64, 128


def run_args(tmp_path, **over):
    from megatron.neox_arguments import Environment, NeoXArgs

    keys = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, seq_length=64,
                padded_vocab_size=VOCAB, USE_ORIGINAL_FULL_ATTEN=True, no_weight_tying=True, gpt_j_residual=True,
                pos_emb="rotary", rotary_pct=0.25, num_gpus=1, pipe_parallel_size=1, train_iters=10, lr=1e-3,
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    keys.update(over)
    args = NeoXArgs.from_dict(keys, env=Environment(cuda_device_count=0, environ={}))
    args.world_size = 1
    # set after validation, which would ask for data and an existing load directory
    args.user_script, args.save, args.load = "/x/train.py", str(tmp_path / "ours"), str(tmp_path / "neox")
    return args


def neox_checkpoint(tmp_path, args, layer_states=None, record=None, iteration=6):
    record = dict(cn.args_record(args), **(record or {}))
    mp_state = dict(deepspeed_keys(iteration, args.train_batch_size), **neox_client_state(iteration, record))
    states = layer_states or neox_layer_states(LAYERS, HIDDEN, VOCAB)
    return write_neox_checkpoint(str(tmp_path / "neox"), iteration, states, mp_state)


def test_source_commit_is_the_one_read():
    assert NEOX_COMMIT == "ea7aefd8f8e183256992d9fede4d7c71a46d67a5"
    assert cn.ARGS_KEYS == NEOX_ARGS


def test_neox_checkpoint_passes_the_launch_check(tmp_path):
    args = run_args(tmp_path)
    step = neox_checkpoint(tmp_path, args)
    cl.check_resume_before_launch(args)  # args, layout, files and every tensor fit
    layout = cl.Layout(world_size=1, data_parallel_size=1, pipe_parallel_size=1, model_parallel_size=1,
                       zero_stage=0)
    assert cl.read_layout(step) == layout and cl.resume_plan(args, step) == (True, layout)
    # In another layout (sequential, ZeRO 1) only weights load: refused without no_load_optim, by layout
    other = run_args(tmp_path, pipe_parallel_size=0, zero_optimization={"stage": 1})
    with pytest.raises(ConfigError, match="ZeRO stage changes"):
        cl.check_resume_before_launch(other)


def test_first_mismatching_tensor_before_launch(tmp_path):
    args = run_args(tmp_path)
    states = neox_layer_states(LAYERS, HIDDEN, VOCAB)
    states[3]["mlp.linear1.weight"] = torch.zeros(3 * HIDDEN, HIDDEN)  # another intermediate size, layer 3 only
    step = neox_checkpoint(tmp_path, args, layer_states=states)
    with pytest.raises(ConfigError) as err:
        cl.check_resume_before_launch(args)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"key 'load': {step}/layer_03-model_00-model_states.pt: tensor 'mlp.linear1.weight' of "
                       f"layer 3 has shape [192, 64] in the checkpoint, but the model this config builds has "
                       f"[256, 64]")


def test_missing_and_extra_tensors_are_named(tmp_path):
    args = run_args(tmp_path)
    states = neox_layer_states(LAYERS, HIDDEN, VOCAB)
    del states[2]["attention.dense.bias"]
    neox_checkpoint(tmp_path, args, layer_states=states)
    with pytest.raises(ConfigError, match=r"layer_02-model_00-model_states.pt: tensor 'attention.dense.bias' of "
                                          r"layer 2 is missing"):
        cl.check_resume_before_launch(args)
    states = neox_layer_states(LAYERS, HIDDEN, VOCAB)
    states[5]["norm.scale"] = torch.ones(HIDDEN)
    neox_checkpoint(tmp_path, args, layer_states=states)
    with pytest.raises(ConfigError, match=r"tensor 'norm.scale' of layer 5 \(shape \[64\]\) is in the checkpoint "
                                          r"but not in the model"):
        cl.check_resume_before_launch(args)


def test_neox_args_are_checked_by_its_rule(tmp_path):
    args = run_args(tmp_path)
    neox_checkpoint(tmp_path, args, record={"max_position_embeddings": 2048})
    with pytest.raises(ConfigError, match=r"key 'max_position_embeddings' is 64, but checkpoint .*global_step6 was "
                                          r"saved with max_position_embeddings=2048 \(its GPT-NeoX 'args'\)"):
        cl.check_resume_before_launch(args)


def test_both_mlp_namings_load_into_the_model(tmp_path):
    from megatron.model.transformer import ParallelMLP

    args = run_args(tmp_path)
    mlp = ParallelMLP(args, torch.nn.init.zeros_, torch.nn.init.zeros_)
    states = neox_layer_states(1, HIDDEN, VOCAB)[2]
    current = {k[len("mlp."):]: v for k, v in states.items() if k.startswith("mlp.")}
    mlp.load_state_dict(current)
    assert torch.equal(mlp.dense_h_to_4h.weight, current["linear1.weight"])
    assert torch.equal(mlp.dense_4h_to_h.bias, current["linear2.bias"])
    pythia = {"dense_h_to_4h.weight": current["linear1.weight"] * 2, "dense_h_to_4h.bias": current["linear1.bias"],
              "dense_4h_to_h.weight": current["linear2.weight"], "dense_4h_to_h.bias": current["linear2.bias"]}
    mlp.load_state_dict(pythia)
    assert torch.equal(mlp.dense_h_to_4h.weight, pythia["dense_h_to_4h.weight"])
    with pytest.raises(ValueError, match="both 'linear1.weight' and 'dense_h_to_4h.weight'"):
        mlp.load_state_dict(dict(pythia, **{"linear1.weight": current["linear1.weight"]}))


class LoadingEngine:
    """engine.load_checkpoint as DeepSpeed answers it: the mp_rank_00 file minus module and optimizer."""

    def __init__(self, module=None):
        self.module = module or torch.nn.Linear(2, 2)

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states, **_):
        import os

        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        blob = torch.load(path, weights_only=False)
        return path, {k: v for k, v in blob.items() if k not in ("module", "optimizer")}


def test_neox_iteration_and_rng_restore(tmp_path):
    args = run_args(tmp_path)
    neox_checkpoint(tmp_path, args, iteration=6)
    random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)  # the streams the checkpoint holds
    expected = (random.random(), np.random.rand(), torch.rand(3))
    engine = LoadingEngine()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert ck.load_checkpoint(args, engine) == (6, 6 * args.train_batch_size)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    # finetune, as GPT-NeoX's: the seed's streams stay
    args.finetune = True
    torch.manual_seed(7)
    fresh = torch.rand(3)
    engine = LoadingEngine()  # its Linear draws from the stream
    torch.manual_seed(7)
    ck.load_checkpoint(args, engine, load_optimizer_states=False)
    assert torch.equal(torch.rand(3), fresh)


def neox_check_checkpoint_args(neox_args, checkpoint_args):
    """GPT-NeoX's check_checkpoint_args at NEOX_COMMIT: each recorded value equals the config's."""
    assert isinstance(checkpoint_args, dict)
    for name, value in checkpoint_args.items():
        assert value == getattr(neox_args, name), name


def test_project_checkpoint_has_every_key_neox_reads(tmp_path):
    from test_checkpointing import FakeEngine

    args = run_args(tmp_path)
    args.config_files = {"run.yml": "num_layers: 2\n"}
    torch.manual_seed(4321)
    ck.save_checkpoint(args, 3, FakeEngine(), consumed_train_samples=6)
    state = torch.load(tmp_path / "ours" / "global_step3" / "mp_rank_00_model_states.pt",
                       weights_only=False)["client_state"]
    assert set(NEOX_LOAD_KEYS) <= set(state)
    assert state["iteration"] == 3 and tuple(state["args"]) == NEOX_ARGS
    neox_check_checkpoint_args(args, state["args"])
    # the five RNG entries restore as GPT-NeoX restores them (CUDA ones in the format torch.cuda returns)
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    for cuda in (state["cuda_rng_state"], state["rng_tracker_states"]["model-parallel-rng"]):
        assert cuda.dtype == torch.uint8 and cuda.shape == (16,)
    assert int.from_bytes(bytes(state["cuda_rng_state"][:8].tolist()), "little") == 4321
    assert int.from_bytes(bytes(state["rng_tracker_states"]["model-parallel-rng"][:8].tolist()), "little") == 7039
    # no_save_rng: none of them, as GPT-NeoX
    args.no_save_rng = True
    ck.save_checkpoint(args, 4, FakeEngine(), consumed_train_samples=8)
    state = torch.load(tmp_path / "ours" / "global_step4" / "mp_rank_00_model_states.pt",
                       weights_only=False)["client_state"]
    assert not set(cn.RNG_KEYS) & set(state) and "args" in state


@pytest.mark.gpu
def test_cuda_state_format_is_torch_cuda_s():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.cuda.manual_seed(4321)
    assert torch.equal(torch.cuda.get_rng_state(), cn.cuda_generator_state(4321))
    torch.cuda.set_rng_state(cn.cuda_generator_state(99))
    drawn = torch.rand(8, device="cuda")
    torch.cuda.manual_seed(99)
    assert torch.equal(torch.rand(8, device="cuda"), drawn)


def test_current_names_written_on_request_and_both_read(tmp_path):
    import types

    from megatron.checkpoint_io import CheckpointReader
    from megatron.model.layer_list import build_sequential_model

    pythia = build_sequential_model(run_args(tmp_path))
    current = build_sequential_model(run_args(tmp_path, checkpoint_tensor_names="current"))
    names = set(current.sequential[2].state_dict())
    assert names == set(neox_layer_states(1, HIDDEN, VOCAB)[2])  # GPT-NeoX's own names, linear1 / linear2
    assert {"mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.bias"} <= set(pythia.sequential[2].state_dict())
    # A Pythia-era (v2.0) checkpoint into the model that writes current names, layer by layer (weights only) ...
    ckpt = tmp_path / "global_step2"
    ckpt.mkdir()
    for idx in (0, 2, 3, 5, 6):
        torch.save(pythia.sequential[idx].state_dict(), ckpt / f"layer_{idx:02d}-model_00-model_states.pt")
    torch.save({"module": None, "iteration": 2}, ckpt / "mp_rank_00_model_states.pt")
    cl.load_weights_any_layout(types.SimpleNamespace(module=current, optimizer=None), str(ckpt), run_args(tmp_path))
    for a, b in zip(pythia.parameters(), current.parameters()):
        assert torch.equal(a, b)
    # ... and readers that build no model (the exporter) see the module names in either naming.
    torch.save(current.sequential[3].state_dict(), ckpt / "layer_03-model_00-model_states.pt")
    reader = CheckpointReader(str(ckpt), LAYERS)
    assert reader.layer(3)[0].keys() == reader.layer(2)[0].keys() == pythia.sequential[3].state_dict().keys()
    assert "mlp.linear1.weight" in reader.layer(3, file_names=True)[0]


def test_gated_mlp_names_are_left_alone():
    from megatron.model.neox_names import normalise_layer

    gated = {"mlp.linear1.weight": torch.zeros(2 * 24, 8), "mlp.linear2.weight": torch.zeros(8, 24)}
    assert normalise_layer(gated) == gated
    ungated = {"mlp.linear1.weight": torch.zeros(24, 8), "mlp.linear2.weight": torch.zeros(8, 24)}
    assert set(normalise_layer(ungated)) == {"mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"}
