"""Checkpoint layout, atomic `latest`, interrupted saves and RNG restore, with a fake engine."""
import os
import random
import types

import numpy as np
import pytest
import torch

from megatron import checkpointing as ck


class FakeEngine:
    """Writes/reads one file per tag as DeepSpeed's engine would; can die half-way through a save."""

    def __init__(self, crash_after_partial_write=False):
        self.crash = crash_after_partial_write
        self.loaded = None
        self.module = torch.nn.Linear(4, 4)
        self.device = torch.device("cpu")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to write, after the configs
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
        if self.crash:
            with open(path, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt("killed mid-save")
        torch.save({"client_state": client_state}, path)

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states, load_module_only):
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            return None, None
        self.loaded = (load_dir, tag)
        self.module_only = load_module_only
        return path, torch.load(path, weights_only=False)["client_state"]


def make_args(tmp_path, **over):
    """A resolved config of a tiny run saving under ``tmp_path``; ``over`` then changes fields of it as a test
    needs (a resolved config edited afterwards, e.g. another layout)."""
    from megatron.neox_arguments import Environment, NeoXArgs

    args = NeoXArgs.from_dict(dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                                   padded_vocab_size=128, USE_ORIGINAL_FULL_ATTEN=True, lr=1e-3, train_iters=10,
                                   train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
                                   save=str(tmp_path / "ckpt"), checkpoint_factor=3, extra_save_iters=[1, 4]),
                              env=Environment(cuda_device_count=0, environ={}))
    args.world_size = 1
    args.config_files = {"model.yml": "num_layers: 2\n", "data.yml": "seq_length: 64\n"}
    for key, value in over.items():
        setattr(args, key, value)
    return args


def test_layout_latest_and_config_copies(tmp_path):
    args = make_args(tmp_path)
    ck.save_checkpoint(args, 3, FakeEngine(), consumed_train_samples=24, client_state={"extra": 1})
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text() == "global_step3"
    step = root / "global_step3"
    assert (step / "configs" / "model.yml").read_text() == "num_layers: 2\n"
    assert (step / "configs" / "data.yml").exists()
    import yaml

    resolved = yaml.safe_load((step / "configs" / "resolved_config.yml").read_text())
    assert resolved["num_layers"] == 2 and resolved["train_batch_size"] == 8
    assert (step / "rng_state" / "rank_00000.pt").exists()
    assert not [p for p in root.rglob("*") if ".tmp." in p.name]  # no temporaries left behind
    state = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["client_state"]
    assert state["iteration"] == 3 and state["consumed_train_samples"] == 24 and state["extra"] == 1


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    args = make_args(tmp_path)
    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(args, 4, FakeEngine(crash_after_partial_write=True), 32)
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step2"
    args.load = args.save
    engine = FakeEngine()
    assert ck.load_checkpoint(args, engine) == (2, 16)
    assert engine.loaded[1] == "global_step2"
    assert engine.module_only is False  # the optimizer state is loaded with the weights


def test_rng_state_round_trip(tmp_path):
    args = make_args(tmp_path)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ck.save_checkpoint(args, 5, FakeEngine(), 40)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    args.load = args.save
    ck.load_checkpoint(args, FakeEngine())
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resolve_errors_and_explicit_tag(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"load={empty}: no checkpoint"):
        ck.resolve_checkpoint(str(empty))
    (empty / "latest").write_text("global_step9")
    with pytest.raises(FileNotFoundError, match="global_step9"):
        ck.resolve_checkpoint(str(empty))
    args = make_args(tmp_path)
    ck.save_checkpoint(args, 1, FakeEngine(), 8)
    ck.save_checkpoint(args, 3, FakeEngine(), 24)
    assert ck.resolve_checkpoint(args.save) == (args.save, "global_step3")
    assert ck.resolve_checkpoint(os.path.join(args.save, "global_step1")) == (args.save, "global_step1")
    args.load = os.path.join(args.save, "global_step1")
    assert ck.load_checkpoint(args, FakeEngine()) == (1, 8)


def test_save_schedule(tmp_path):
    args = make_args(tmp_path)
    assert [i for i in range(1, 10) if ck.should_save(args, i)] == [1, 3, 4, 6, 9]
    args.save = None
    assert not ck.should_save(args, 3)
