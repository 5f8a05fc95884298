"""Training under tensor parallelism through deepy.py: the per-iteration losses of the golden runs (10 steps,
TP=1, tests/golden) are reproduced within 1e-5 relative at TP=2, on the pipeline and the sequential path, and
on 4 processes as TP=2 x DP=2 (ZeRO 2) and TP=2 x PP=2 (the same global batch: micro-batch 1 on two data-parallel
ranks takes the two samples one rank took); TP=2 x PP=2 against TP=1 x PP=2."""
import math

import pytest

import tp_harness  # noqa: F401  (puts tests/golden and tests/training on sys.path)
from golden_utils import BASE, MODES, load_golden, tensorboard_losses
from launch_utils import run_deepy, write_run_config, write_tiny_corpus

pytestmark = [pytest.mark.deepspeed]


def train(work_dir, mode: str, procs: int, **overrides) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = write_tiny_corpus(str(work_dir / "corpus"))
    keys = {**BASE, **MODES[mode], "data_path": corpus, "tensorboard_dir": str(work_dir / "tb"), **overrides}
    cfg = write_run_config(work_dir / "run.yml", **keys)
    rc, out = run_deepy([cfg], procs, log_path=work_dir / "log.txt", timeout=600)
    assert rc == 0, out[-3000:]
    return tensorboard_losses(work_dir / "tb")


def assert_close(losses: dict, expected: dict, tol: float = 1e-5) -> None:
    assert sorted(losses) == sorted(expected)
    bad = {i: (losses[i], expected[i]) for i in expected
           if not math.isclose(losses[i], expected[i], rel_tol=tol, abs_tol=0.0)}
    assert not bad, bad


@pytest.mark.parametrize("mode,pipe", [("full", 1), ("bipe_alibi", 0)])
def test_tp2_losses_equal_tp1(tmp_path, mode, pipe):
    losses = train(tmp_path, mode, 2, model_parallel_size=2, pipe_parallel_size=pipe)
    assert_close(losses, load_golden(mode)["losses"])


def test_tp2_dp2_zero2_equals_tp1(tmp_path):
    losses = train(tmp_path, "sepllm_mask", 4, model_parallel_size=2, pipe_parallel_size=0,
                   train_micro_batch_size_per_gpu=1, zero_optimization={"stage": 2})
    assert_close(losses, load_golden("sepllm_mask")["losses"])


@pytest.mark.slow
def test_tp2_pp2_equals_tp1_pp2(tmp_path):
    """Against TP=1 with the same two stages: a stage builds (and initialises) only its own layers, from a seed
    offset per stage, so the pipeline split itself changes the initial weights."""
    expected = train(tmp_path / "tp1", "sepllm_mask", 2, model_parallel_size=1, pipe_parallel_size=2)
    losses = train(tmp_path / "tp2", "sepllm_mask", 4, model_parallel_size=2, pipe_parallel_size=2)
    assert_close(losses, expected)


def tb_scalars(tb_dir, tag: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow
def test_tp2_exact_resume_and_kv_statistics(tmp_path):
    """TP=2 with ZeRO 1, dropout on the residual branches (default stream) and on the attention probabilities (the
    model-parallel stream, per TP rank): resuming at step 4 reproduces steps 5-8 bitwise;
    the KV statistics logged at TP=2 are the TP=1 run's (each TP rank sees the same batch; rank 0 logs its own)."""
    keys = dict(model_parallel_size=2, pipe_parallel_size=0, zero_optimization={"stage": 1}, hidden_dropout=0.1,
                attention_dropout=0.1, train_iters=8, lr_decay_iters=8, checkpoint_factor=4, PRINT_KV_RATIO=True, print_ratio_intervals=1)
    full = train(tmp_path / "full", "sepllm_mask", 2, save=str(tmp_path / "full" / "ckpt"), **keys)
    resumed = train(tmp_path / "resumed", "sepllm_mask", 2, load=str(tmp_path / "full" / "ckpt" / "global_step4"),
                    **keys)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {i: full[i] for i in range(5, 9)}  # bitwise (float32 as logged)
    one = dict(keys, model_parallel_size=1)
    train(tmp_path / "tp1", "sepllm_mask", 1, **one)
    tag = "sepllm/kv_ratio"
    kv_tp1, kv_tp2 = tb_scalars(tmp_path / "tp1" / "tb", tag), tb_scalars(tmp_path / "full" / "tb", tag)
    assert sorted(kv_tp2) == list(range(1, 9)) and kv_tp2 == kv_tp1, (kv_tp2, kv_tp1)
