"""End-to-end launches through deepy.py on CPU (gloo): the pipeline and sequential paths, ZeRO 0/1/2,
1 and 2 processes, 1 and 2 pipeline stages, exact resume, interrupted save, SIGTERM, NaN skip.

Each launch costs 10-30 s, so every launch checks several things. Losses are read from TensorBoard
(float32, exact) for the bitwise comparisons.
"""
import glob
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from launch_utils import (FIXTURES, REPO, deepy_command, launch_env, run_deepy, tb_losses, write_run_config,
                          write_tiny_corpus)

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

BASE = [FIXTURES / "tiny_model.yml", FIXTURES / "tiny_train.yml"]
FAULTS = str(FIXTURES / "fault_injection" / "train.py")


def run(tmp, name, nprocs, script="train.py", expect_rc=0, **keys):
    """One deepy.py launch with a run YAML of ``keys`` (+ data, save, TensorBoard under ``tmp/name``)."""
    run_dir = tmp / name
    run_dir.mkdir()
    keys.setdefault("save", str(run_dir / "ckpt"))
    keys.setdefault("tensorboard_dir", str(run_dir / "tb"))
    keys.setdefault("checkpoint_factor", 4)
    cfg = write_run_config(run_dir / "run.yml", **keys)
    rc, out = run_deepy(BASE + [cfg], nprocs, script, log_path=run_dir / "log.txt")
    assert rc == expect_rc, out[-4000:]
    return run_dir, out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    corpus = write_tiny_corpus(str(tmp / "corpus"))
    return tmp, corpus


@pytest.fixture(scope="module")
def reference(work):
    """1 process, pipeline path (pipe_parallel_size 1), ZeRO 0, 8 iterations, saves at 4 and 8."""
    tmp, corpus = work
    run_dir, out = run(tmp, "reference", 1, data_path=corpus, train_iters=8, pipe_parallel_size=1,
                       zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2,
                       gradient_accumulation_steps=2)
    return run_dir, out, tb_losses(run_dir / "tb")


def test_reference_run_trains_logs_and_saves(reference):
    run_dir, out, losses = reference
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0, losses  # it learns
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step8"
    for step in (4, 8):
        d = ckpt / f"global_step{step}"
        assert (d / "mp_rank_00_model_states.pt").exists()
        assert glob.glob(str(d / "layer_02-model_00-model_states.pt"))  # pipeline layout, layer files
        assert sorted(p.name for p in (d / "configs").iterdir()) == ["resolved_config.yml", "run.yml",
                                                                     "tiny_model.yml", "tiny_train.yml"]
        assert (d / "rng_state" / "rank_00000.pt").exists()
    assert not glob.glob(str(ckpt / "**" / "*.tmp.*"), recursive=True)
    for text in ("validation results at iteration 4", "validation results at iteration 8",
                 "test results at iteration 8", "TFLOP/s/GPU", "MFU", "tokens/s", "grad norm", "100.0%"):
        assert text in out, text


def test_exact_resume_pipeline_after_interrupted_save(reference, work):
    """Resuming at step 4 reproduces steps 5-8 bitwise, even with a half-written newer checkpoint present
    (a save that crashed before `latest` moved)."""
    ref_dir, _, ref_losses = reference
    tmp, corpus = work
    crashed = tmp / "crashed_save"
    shutil.copytree(ref_dir / "ckpt", crashed)
    (crashed / "latest").write_text("global_step4")
    for f in (crashed / "global_step8").glob("*.pt"):
        f.write_bytes(b"truncated")
    run_dir, out = run(tmp, "resume_pipe", 1, data_path=corpus, train_iters=8, pipe_parallel_size=1,
                       zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2,
                       gradient_accumulation_steps=2, load=str(crashed))
    assert "loaded checkpoint" in out and "at iteration 4" in out
    losses = tb_losses(run_dir / "tb")
    assert sorted(losses) == [5, 6, 7, 8]
    assert [losses[i] for i in range(5, 9)] == [ref_losses[i] for i in range(5, 9)]  # bitwise (float32)


def test_two_pipeline_stages_two_processes(reference, work):
    _, _, ref_losses = reference
    tmp, corpus = work
    run_dir, out = run(tmp, "pipe2", 2, data_path=corpus, train_iters=8, pipe_parallel_size=2,
                       zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2,
                       gradient_accumulation_steps=2)
    assert "stage=1" in out
    losses = tb_losses(run_dir / "tb")
    assert sorted(losses) == list(range(1, 9))
    # Stages are seeded differently (GPT-NeoX: seed + 100 x stage), so the initial weights, and the losses,
    # differ from the one-stage run; the model still learns at the same pace.
    assert losses[8] < losses[1] - 1.0 and abs(losses[8] - ref_losses[8]) < 0.5, (losses, ref_losses)
    assert "validation results at iteration 8" in out and "test results at iteration 8" in out
    files = {os.path.basename(p) for p in glob.glob(str(run_dir / "ckpt" / "global_step8" / "*.pt"))}
    assert {"layer_02-model_00-model_states.pt", "layer_06-model_00-model_states.pt"} <= files


def _deepspeed_shm_files() -> set:
    return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


def test_two_process_launch_leaves_no_shared_memory(work):
    """DeepSpeed's CPU all-reduce creates a ~66 MB /dev/shm segment per rank and never unlinks it; the
    ranks remove their own after start-up (megatron.initialize.release_deepspeed_shm)."""
    tmp, corpus = work
    before = _deepspeed_shm_files()
    run(tmp, "shm", 2, data_path=corpus, train_iters=2, pipe_parallel_size=0, checkpoint_factor=None,
        zero_optimization={"stage": 1}, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    assert _deepspeed_shm_files() - before == set()


def test_sequential_zero1_two_processes_sigterm_and_exact_resume(reference, work):
    """Data parallel over 2 ranks gives the reference's losses; SIGTERM saves and exits 0; resuming from
    that checkpoint reproduces the uninterrupted run bitwise."""
    _, _, ref_losses = reference
    tmp, corpus = work
    common = dict(data_path=corpus, train_iters=8, pipe_parallel_size=0, zero_optimization={"stage": 1},
                  train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)
    full_dir, _ = run(tmp, "seq_full", 2, **common)
    full = tb_losses(full_dir / "tb")
    for i in range(1, 9):
        assert full[i] == pytest.approx(ref_losses[i], rel=1e-4), i
    files = os.listdir(full_dir / "ckpt" / "global_step8")
    assert "mp_rank_00_model_states.pt" in files and any("optim_states" in f for f in files)

    # Interrupted run: slow steps so the signal lands mid-run; SIGTERM goes to the ranks, as a scheduler's does.
    term_dir = tmp / "seq_sigterm"
    term_dir.mkdir()
    cfg = write_run_config(term_dir / "run.yml", save=str(term_dir / "ckpt"), tensorboard_dir=str(term_dir / "tb"),
                           checkpoint_factor=100, **common)
    env = dict(launch_env(), TEST_STEP_SLEEP="0.4")
    proc = subprocess.Popen(deepy_command(BASE + [cfg], 2, FAULTS), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    import psutil

    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "iteration        2/" in line:
                # The ranks are the launcher's children started with --local_rank (not their data workers).
                ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if p.name() != "pt_data_worker" and any(a.startswith("--local_rank") for a in p.cmdline())]
                assert len(ranks) == 2, ranks
                for p in ranks:
                    p.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-4000:]
    assert "exiting at iteration" in out and "signal SIGTERM" in out
    stopped_at = int((term_dir / "ckpt" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped_at < 8
    assert tb_losses(term_dir / "tb") == {i: full[i] for i in range(1, stopped_at + 1)}

    resumed_dir, out = run(tmp, "seq_resumed", 2, load=str(term_dir / "ckpt"), **common)
    resumed = tb_losses(resumed_dir / "tb")
    assert resumed == {i: full[i] for i in range(stopped_at + 1, 9)}  # bitwise


def test_nan_steps_are_skipped_then_training_stops_zero2(work):
    """A NaN loss at step 3 is skipped (weights and Adam state untouched, training goes on); NaN from step 6
    on stops the run after max_consecutive_bad_steps=2 with exit code 1 and nothing saved after step 4."""
    tmp, corpus = work
    env_before = os.environ.get("TEST_NAN_ITERS")
    os.environ["TEST_NAN_ITERS"] = "3,6-"
    try:
        run_dir, out = run(tmp, "nan", 1, script=FAULTS, expect_rc=1, data_path=corpus, train_iters=8,
                           pipe_parallel_size=0, zero_optimization={"stage": 2}, train_micro_batch_size_per_gpu=2,
                           gradient_accumulation_steps=2, checkpoint_factor=2, max_consecutive_bad_steps=2)
    finally:
        if env_before is None:
            os.environ.pop("TEST_NAN_ITERS")
        else:
            os.environ["TEST_NAN_ITERS"] = env_before
    assert "iteration 3: non-finite loss/gradients, step skipped (1 in a row)" in out
    assert "stopping: 2 consecutive bad steps" in out
    losses = tb_losses(run_dir / "tb")
    assert sorted(losses) == [1, 2, 4, 5] and all(map(torch.isfinite, map(torch.tensor, losses.values())))
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step4"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step2", "global_step4"]
    state = torch.load(ckpt / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
    weights = state["module"]
    assert weights and all(torch.isfinite(w).all() for w in weights.values() if torch.is_tensor(w))


def test_zero3_two_processes_exact_resume_and_hf_export(work):
    """ZeRO-3 (parameters partitioned over 2 CPU ranks, sequential path): the run learns, resuming from its
    sharded checkpoint reproduces the losses bitwise, and the converter gathers the shards into a stock
    GPTNeoXForCausalLM whose logits equal our model's with the same weights."""
    from transformers import GPTNeoXForCausalLM

    from megatron.model import build_sequential_model
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.environment import Environment
    from megatron.checkpoint_io import CheckpointReader
    from megatron.hf.export import export

    tmp, corpus = work
    keys = dict(data_path=corpus, train_iters=6, pipe_parallel_size=0, zero_optimization={"stage": 3},
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, checkpoint_factor=3)
    full_dir, _ = run(tmp, "zero3", 2, **keys)
    full = tb_losses(full_dir / "tb")
    assert sorted(full) == list(range(1, 7)) and full[6] < full[1], full
    step6 = full_dir / "ckpt" / "global_step6"
    assert (step6 / "zero_pp_rank_1_mp_rank_00_model_states.pt").exists()

    resumed_dir, out = run(tmp, "zero3_resume", 2, load=str(full_dir / "ckpt" / "global_step3"), **keys)
    resumed = tb_losses(resumed_dir / "tb")
    assert [resumed[i] for i in (4, 5, 6)] == [full[i] for i in (4, 5, 6)]  # bitwise (float32)

    out_dir = tmp / "zero3_hf"
    export(str(step6), None, str(out_dir), precision="fp32", architecture="neox", save_tokenizer=False)
    hf = GPTNeoXForCausalLM.from_pretrained(str(out_dir)).eval()
    # Rank 0 of the 2-process run, as the resolved config describes it.
    args = NeoXArgs.from_resolved(str(step6 / "configs" / "resolved_config.yml"),
                                  env=Environment(cuda_device_count=0,
                                                  environ={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}))
    ours = build_sequential_model(args).eval()
    state = CheckpointReader(str(step6), args.num_layers)._seq_states[0]
    ours.load_state_dict(state)
    tokens = torch.randint(0, 250, (2, 32))
    with torch.no_grad():
        expected = ours((tokens, torch.arange(32).expand(2, 32)))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected[..., : got.shape[-1]], rtol=1e-5, atol=1e-5)
