"""The full optimizer state into another tensor-parallel size, through DeepSpeed's universal checkpoint (deepy.py,
CPU, gloo, ZeRO-1, the sequential model): a TP=2 checkpoint converted by ds_to_universal resumes at TP=1, and a
TP=1 one at TP=2, with the losses of the uninterrupted runs (1e-5; a fresh optimizer would move them), because
the checkpoint records the tensor-parallel patterns (universal_checkpoint_info) from megatron/checkpoint_partition.py.
Without them (a checkpoint of GPT-NeoX) the TP change is refused before launch, naming both sizes."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))
import tp_harness  # noqa: E402,F401  (puts tests/golden and tests/training on sys.path)
from golden_utils import BASE, MODES, tensorboard_losses  # noqa: E402
from launch_utils import REPO, deepy_command, launch_env, run_deepy, write_run_config, write_tiny_corpus  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
KEYS = {**BASE, **MODES["sepllm_mask"], "train_iters": 12, "lr_decay_iters": 12, "pipe_parallel_size": 0,
        "zero_optimization": {"stage": 1}}


def train(work_dir: Path, procs: int, corpus: str, **overrides) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = write_run_config(work_dir / "run.yml", **{**KEYS, "data_path": corpus, "tensorboard_dir": str(work_dir / "tb"),
                                                    **overrides})
    rc, out = run_deepy([cfg], procs, log_path=work_dir / "log.txt", timeout=600)
    assert rc == 0, out[-3000:]
    return tensorboard_losses(work_dir / "tb")


def to_universal(ckpt: Path, out: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                           "--input_folder", str(ckpt), "--output_folder", str(out)], cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return str(out)


def test_optimizer_state_moves_between_tp_sizes(tmp_path):
    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    runs, universal = {}, {}
    for tp in (1, 2):
        runs[tp] = train(tmp_path / f"tp{tp}", tp, corpus, model_parallel_size=tp, save=str(tmp_path / f"tp{tp}" / "ckpt"),
                         checkpoint_factor=10)
        universal[tp] = to_universal(tmp_path / f"tp{tp}" / "ckpt" / "global_step10", tmp_path / f"uni{tp}" / "global_step10")
    assert all(math.isclose(runs[2][i], runs[1][i], rel_tol=1e-5) for i in runs[1]), runs
    for saved, new in ((2, 1), (1, 2)):
        resumed = train(tmp_path / f"from{saved}_to{new}", new, corpus, model_parallel_size=new, load=universal[saved],
                        checkpoint={"load_universal": True})
        assert sorted(resumed) == [11, 12], resumed
        bad = {i: (resumed[i], runs[new][i]) for i in resumed if not math.isclose(resumed[i], runs[new][i], rel_tol=1e-5)}
        assert not bad, (saved, new, bad)
    # Without the patterns DeepSpeed would concatenate every shard on dim 0: refused by name before launch.
    ckpt = Path(universal[2])
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        blob = torch.load(ckpt / name, weights_only=False)
        blob.pop("universal_checkpoint_info")
        torch.save(blob, ckpt / name)
    cfg = write_run_config(tmp_path / "refused.yml", **{**KEYS, "data_path": corpus, "model_parallel_size": 1,
                                                        "load": str(ckpt), "checkpoint": {"load_universal": True}})
    command = deepy_command([cfg], 1)
    proc = subprocess.run(command[:2] + ["--dry_run"] + command[2:], cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert (f"key 'checkpoint.load_universal': checkpoint {ckpt} was saved with model_parallel_size=2 and this run has "
            "model_parallel_size=1, but it records no tensor-parallel patterns") in proc.stdout, proc.stdout[-2000:]
