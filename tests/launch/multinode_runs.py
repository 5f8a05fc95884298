"""Launch helpers of the multi-node tests: one deepy.py run, and the local 2-process baseline both the pdsh and
the Slurm-variable tests compare with (run once per test session, kept under pytest's base temp folder)."""
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from launch_utils import FIXTURES, REPO, launch_env, tb_losses, write_run_config, write_tiny_corpus  # noqa: E402

BASE = [FIXTURES / "tiny_model.yml", FIXTURES / "tiny_train.yml"]
ITERS, HALF = 6, 3


def common_keys(corpus: str) -> dict:
    return dict(data_path=corpus, train_iters=ITERS, checkpoint_factor=HALF, zero_optimization={"stage": 1},
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)


def deepy(run_dir: Path, keys: dict, extra_argv=(), env=None, timeout=300):
    """Runs deepy.py train.py with the tiny model and a run YAML of `keys`; returns its output."""
    run_dir.mkdir(parents=True)
    keys = dict(keys, tensorboard_dir=str(run_dir / "tb"))
    keys.setdefault("save", str(run_dir / "ckpt"))
    cfg = write_run_config(run_dir / "run.yml", **keys)
    cmd = [sys.executable, str(REPO / "deepy.py"), *extra_argv, "--resolved_config", str(run_dir / "resolved.yml"),
           "train.py", *map(str, BASE), cfg]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    (run_dir / "log.txt").write_text(proc.stdout)
    print(f"{run_dir.name}: {time.monotonic() - start:.0f} s: {' '.join(cmd)}")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def local_baseline(tmp_path_factory):
    """(corpus prefix, {iteration: loss}) of `deepy.py --num_gpus 2` over ITERS iterations on this machine."""
    root = Path(tmp_path_factory.getbasetemp()) / "two_rank_baseline"
    record = root / "losses.json"
    if not record.exists():
        root.mkdir(exist_ok=True)
        corpus = write_tiny_corpus(str(root / "corpus"))
        deepy(root / "local", common_keys(corpus), ["--num_gpus", "2"])
        losses = tb_losses(root / "local" / "tb")
        assert sorted(losses) == list(range(1, ITERS + 1)), losses
        record.write_text(json.dumps({"corpus": corpus, "losses": losses}))
    saved = json.loads(record.read_text())
    return saved["corpus"], {int(k): v for k, v in saved["losses"].items()}
