"""Checkpoint faults in real deepy.py launches (CPU, gloo): SIGKILL during the very first save, resuming in
other layouts (weights only; with the optimizer through DeepSpeed's universal checkpoint; or refused before
launch), damaged checkpoints, and a full disk (a 3 MiB tmpfs)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch_utils import (FIXTURES, REPO, deepy_command, launch_env, mounted_tmpfs, write_run_config,
                          write_tiny_corpus)
from test_launch import BASE, run, tb_losses

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

SLOW_SAVE = str(FIXTURES / "slow_save" / "train.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_launch")
    return tmp, write_tiny_corpus(str(tmp / "corpus"))


def dry_run(configs, nprocs, *options):
    """deepy.py's validation only (--dry_run): (rc, output)."""
    command = deepy_command(configs, nprocs)
    proc = subprocess.run(command[:2] + ["--dry_run", *options] + command[2:],
                          cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout


def wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_during_the_first_save_then_restart(work):
    tmp, corpus = work
    run_dir = tmp / "killed"
    run_dir.mkdir()
    ckpt = run_dir / "ckpt"
    keys = dict(data_path=corpus, train_iters=2, pipe_parallel_size=1, zero_optimization={"stage": 0},
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, checkpoint_factor=2, save=str(ckpt))
    cfg = write_run_config(run_dir / "run.yml", **keys)
    proc = subprocess.Popen(deepy_command(BASE + [cfg], 1, SLOW_SAVE), cwd=REPO,
                            env=dict(launch_env(), TEST_SAVE_PAUSE="600"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # DeepSpeed has written its files into the temporary directory; the rank now waits before its RNG file.
        wait_for(ckpt / "global_step2.tmp" / "mp_rank_00_model_states.pt", proc)
        os.killpg(proc.pid, signal.SIGKILL)  # power loss / OOM killer: the launcher and the rank at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert sorted(os.listdir(ckpt)) == ["global_step2.tmp"]  # nothing named like a complete checkpoint, no latest

    rc, out = dry_run(BASE + [write_run_config(run_dir / "resume.yml", load=str(ckpt), **keys)], 1)
    assert rc == 2 and f"deepy.py: configuration error: key 'load': load={ckpt}: no checkpoint there" in out, out
    assert "global_step2.tmp are incomplete saves" in out

    _, out = run(tmp, "restarted", 1, save=str(ckpt), **{k: v for k, v in keys.items() if k != "save"})
    assert f"removed leftovers of an interrupted save: {ckpt / 'global_step2.tmp'}" in out
    assert sorted(os.listdir(ckpt)) == ["global_step2", "latest"]
    assert sorted(os.listdir(ckpt / "global_step2")) == ["configs", "layer_00-model_00-model_states.pt",
                                                         "layer_02-model_00-model_states.pt",
                                                         "layer_03-model_00-model_states.pt",
                                                         "layer_05-model_00-model_states.pt",
                                                         "layer_06-model_00-model_states.pt", "layout.json",
                                                         "mp_rank_00_model_states.pt", "rng_state"]


def check_weights_resumed(source, resumed_dir, out, last=3):
    """Step 3's loss is computed from the loaded weights before any update: it equals the source run's."""
    assert "loaded checkpoint" in out and "at iteration 2" in out, out[-3000:]
    resumed = tb_losses(resumed_dir / "tb")
    assert sorted(resumed) == list(range(3, last + 1)) and resumed[3] == pytest.approx(source[3], rel=1e-4), \
        (resumed, source)
    return resumed


def test_resume_into_other_layouts(work):
    tmp, corpus = work
    # Sequential, ZeRO-1, data parallel 2 -> 1.
    common = dict(data_path=corpus, checkpoint_factor=2, gradient_accumulation_steps=2)
    src_dir, _ = run(tmp, "dp2_zero1", 2, pipe_parallel_size=0, zero_optimization={"stage": 1},
                     train_micro_batch_size_per_gpu=1, train_iters=4, **common)
    source = tb_losses(src_dir / "tb")
    one = dict(pipe_parallel_size=0, zero_optimization={"stage": 1}, train_micro_batch_size_per_gpu=2, train_iters=4,
               **common)
    load = str(src_dir / "ckpt" / "global_step2")
    rc, out = dry_run(BASE + [write_run_config(tmp / "dp1_refused.yml", load=load, **one)], 1)
    assert rc == 2, out
    assert (f"deepy.py: configuration error: key 'load': checkpoint {load} was saved with world size 2 (data "
            "parallel 2, sequential model, model parallel 1, ZeRO stage 1); this run has world size 1 (data parallel "
            "1, sequential model, model parallel 1, ZeRO stage 1), and ZeRO stage 1 partitions") in out
    assert "set 'no_load_optim: true'" in out and "ds_to_universal --inject_missing_state" in out
    resumed_dir, out = run(tmp, "dp1_zero1", 1, load=load, no_load_optim=True, **one)
    fresh = check_weights_resumed(source, resumed_dir, out, last=4)
    assert abs(fresh[4] - source[4]) > 1e-3, (fresh, source)  # a fresh Adam takes another step than the saved one

    # The same with the optimizer state, through DeepSpeed's universal checkpoint (the command the refusal gives).
    universal = str(src_dir / "ckpt_universal" / "global_step2")
    convert = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                              "--input_folder", load, "--output_folder", universal], cwd=REPO, env=launch_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert convert.returncode == 0, convert.stdout[-3000:]
    resumed_dir, out = run(tmp, "dp1_universal", 1, load=universal, checkpoint={"load_universal": True}, **one)
    kept = check_weights_resumed(source, resumed_dir, out, last=4)
    assert kept[4] == pytest.approx(source[4], rel=1e-4), (kept, source)

    # Two pipeline stages -> one stage, and -> the sequential model.
    common["train_iters"] = 3
    src_dir, _ = run(tmp, "pp2", 2, pipe_parallel_size=2, zero_optimization={"stage": 0},
                     train_micro_batch_size_per_gpu=2, **common)
    source = tb_losses(src_dir / "tb")
    load = str(src_dir / "ckpt" / "global_step2")
    for name, pipe in (("pp1", 1), ("sequential", 0)):
        resumed_dir, out = run(tmp, f"pp2_to_{name}", 1, load=load, no_load_optim=True, pipe_parallel_size=pipe,
                               zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2, **common)
        check_weights_resumed(source, resumed_dir, out)


def test_damaged_checkpoints_are_named_before_launch_and_on_the_rank(work):
    tmp, corpus = work
    keys = dict(data_path=corpus, train_iters=2, pipe_parallel_size=1, zero_optimization={"stage": 0},
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, checkpoint_factor=2)
    src_dir, _ = run(tmp, "damaged_src", 1, **keys)
    keys["train_iters"] = 3

    def damaged(name, damage):
        ckpt = tmp / "damaged" / name
        shutil.copytree(src_dir / "ckpt", ckpt)
        damage(ckpt)
        return ckpt

    def launcher_says(ckpt, model=BASE[0]):
        rc, out = dry_run([model, BASE[1], write_run_config(ckpt.parent / f"{ckpt.name}.yml", load=str(ckpt), **keys)], 1)
        assert rc == 2, out
        return out.strip().splitlines()[-1]

    error = "deepy.py: configuration error: "
    layer = "global_step2/layer_03-model_00-model_states.pt"
    ckpt = damaged("missing", lambda c: os.unlink(c / layer))
    assert launcher_says(ckpt) == f"{error}key 'load': missing checkpoint file {ckpt / layer}: the checkpoint is " \
                                  "incomplete or damaged"
    ckpt = damaged("truncated", lambda c: (c / layer).write_bytes((c / layer).read_bytes()[:1000]))
    assert launcher_says(ckpt).startswith(f"{error}key 'load': checkpoint file {ckpt / layer} is truncated or corrupt")
    ckpt = damaged("empty_latest", lambda c: (c / "latest").write_text(""))
    assert launcher_says(ckpt).startswith(f"{error}key 'load': load={ckpt}: the 'latest' file {ckpt / 'latest'} is "
                                          f"empty; the newest complete checkpoint is {ckpt / 'global_step2'}")
    ckpt = damaged("layers", lambda c: None)
    model = tmp / "damaged" / "three_layers.yml"
    model.write_text(BASE[0].read_text().replace("num_layers: 2", "num_layers: 3"))
    assert launcher_says(ckpt, model) == (
        f"{error}key 'num_layers' is 3, but checkpoint {ckpt / 'global_step2'} was saved with num_layers=2 (its "
        "configs/resolved_config.yml); the weights cannot load into another shape")

    # A rank started without deepy.py (or a file damaged after the launch): DeepSpeed's bare error becomes a
    # line naming the file.
    resolved = tmp / "damaged" / "rank.yml"
    rc, out = dry_run(BASE + [write_run_config(tmp / "damaged" / "rank_run.yml", load=str(ckpt), **keys)], 1,
                      "--resolved_config", str(resolved))
    assert rc == 0, out
    (ckpt / layer).write_bytes((ckpt / layer).read_bytes()[:1000])
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--neox_config_file", str(resolved)], cwd=REPO,
                          env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1].removeprefix("[rank0]: ")  # torch's prefix of a rank's error
    assert last.startswith(f"megatron.checkpoint_io.CheckpointError: checkpoint file {ckpt / layer} is truncated"), \
        proc.stdout[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "3m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("policy", ["continue", "exit"])
def test_full_disk(work, small_disk, policy):
    """A tiny-model checkpoint takes ~2.1 MB: the first fits on the 3 MiB disk, the second does not."""
    tmp, corpus = work
    save = small_disk / "ckpt"
    run_dir, out = run(tmp, f"full_disk_{policy}", 1, expect_rc=0 if policy == "continue" else 3,
                       save=str(save), data_path=corpus, train_iters=3, checkpoint_factor=1, pipe_parallel_size=1,
                       zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                       checkpoint_save_failure=policy)
    assert sorted(os.listdir(save)) == ["global_step1", "latest"] and (save / "latest").read_text() == "global_step1"
    assert f"not enough disk space for a checkpoint in {save}:" in out and "'latest' still names global_step1" in out
    if policy == "continue":
        assert sorted(tb_losses(run_dir / "tb")) == [1, 2, 3]
        assert out.count("checkpoint save failed, training goes on") == 2
    else:
        assert sorted(tb_losses(run_dir / "tb")) == [1, 2]
        assert "checkpoint save failed, stopping (checkpoint_save_failure: exit)" in out
