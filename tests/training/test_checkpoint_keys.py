"""GPT-NeoX's checkpoint keys: keep_last_n_checkpoints, no_save_optim / no_load_optim, no_save_rng,
no_load_rng, and the learning-rate schedule of a resumed run (override_lr_scheduler)."""
import glob
import os
from pathlib import Path

import pytest
import torch

from launch_utils import FIXTURES, run_deepy, write_run_config, write_tiny_corpus
from megatron import checkpointing


def _fake_checkpoint(save: Path, step: int) -> None:
    (save / f"global_step{step}" / "configs").mkdir(parents=True)


def test_prune_keeps_the_newest_and_latest(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "global_step9.tmp").mkdir()  # being written: not a checkpoint
    (tmp_path / "latest").write_text("global_step8")
    assert checkpointing.prune_old_checkpoints(str(tmp_path), 2) == ["global_step2", "global_step4"]
    assert sorted(os.listdir(tmp_path)) == ["global_step6", "global_step8", "global_step9.tmp", "latest"]
    # latest names an older checkpoint (a run resumed from it): that one stays whatever its age.
    (tmp_path / "latest").write_text("global_step6")
    assert checkpointing.prune_old_checkpoints(str(tmp_path), 1) == ["global_step8"]


def test_drop_optimizer_states(tmp_path):
    torch.save({"module": {"w": torch.ones(2)}, "optimizer": {"state": {0: torch.ones(2)}}, "iteration": 3},
               tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"x": 1}, tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "layer_02-model_00-model_states.pt")
    checkpointing.drop_optimizer_states(str(tmp_path))
    blob = torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=False)
    assert blob["optimizer"] is None and blob["iteration"] == 3 and torch.equal(blob["module"]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["layer_02-model_00-model_states.pt", "mp_rank_00_model_states.pt",
                                           checkpointing.NO_OPTIMIZER_MARKER]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_keys_in_real_runs(tmp_path):
    import yaml

    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    base = [FIXTURES / "tiny_model.yml"]
    save = tmp_path / "ckpt"
    # The training fixture's keys, merged here so that a resumed run can change one of them.
    common = yaml.safe_load((FIXTURES / "tiny_train.yml").read_text())
    common.update(data_path=corpus, pipe_parallel_size=0, zero_optimization={"stage": 1},
                  train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, save=str(save))
    first = write_run_config(tmp_path / "a.yml", train_iters=8, checkpoint_factor=2, keep_last_n_checkpoints=2,
                             no_save_optim=True, no_save_rng=True, **common)
    rc, out = run_deepy(base + [first], 1)
    assert rc == 0, out[-3000:]
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step6", "global_step8"]
    step8 = save / "global_step8"
    assert (step8 / checkpointing.NO_OPTIMIZER_MARKER).is_file()
    assert not glob.glob(str(step8 / "*optim_states.pt")) and not (step8 / "rng_state").exists()
    # Resuming it with the optimizer is refused by name; with no_load_optim (and no_load_rng) it trains on.
    again = write_run_config(tmp_path / "b.yml", train_iters=10, load=str(save), **common)
    rc, out = run_deepy(base + [again], 1)
    assert rc != 0 and "holds no optimizer state (saved with no_save_optim: true;" in out, out[-3000:]
    # A longer decay for the continued run: GPT-NeoX's rule wants the schedule change confirmed.
    common["lr_decay_iters"] = 10
    fresh = write_run_config(tmp_path / "c.yml", train_iters=10, load=str(save), no_load_optim=True,
                             no_load_rng=True, **common)
    rc, out = run_deepy(base + [fresh], 1)
    assert rc != 0 and "override_lr_scheduler" in out and "end_iter 8 (checkpoint) vs 10 (config)" in out, out[-3000:]
    ok = write_run_config(tmp_path / "d.yml", train_iters=10, load=str(save), no_load_optim=True, no_load_rng=True,
                          override_lr_scheduler=True, **common)
    rc, out = run_deepy(base + [ok], 1)
    assert rc == 0 and "iteration       10/" in out, out[-3000:]
