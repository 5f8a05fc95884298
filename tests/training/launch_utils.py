"""Helpers of the launch tests: a tiny byte-level corpus, run configs, and deepy.py launches."""
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

WORDS = ("the cat sat on the mat. a dog ran to the park, and the bird sang! why? because it could; "
         "one two three four five six seven eight nine ten.").split(" ")


def write_tiny_corpus(prefix: str, num_docs: int = 400, seed: int = 0) -> str:
    """Byte-level (CharLevelTokenizer) documents of shuffled words in the mmap format; 0 ends a document."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(8, 40))
        text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
        builder.add_item(np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16).tolist() + [0])
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def write_run_config(path: Path, **keys) -> str:
    import yaml

    path.write_text(yaml.safe_dump(keys, sort_keys=True))
    return str(path)


# torch.distributed variables of this test process (in-process tests start a one-rank group here): a child
# that inherited them would reuse this process's port, which its store is listening on.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "CROSS_RANK", "CROSS_SIZE")


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WANDB_API_KEY", None)
    return env


def deepy_command(configs, num_procs: int, script: str = "train.py") -> list:
    return [sys.executable, str(REPO / "deepy.py"), "--num_gpus", str(num_procs), script, *map(str, configs)]


def run_deepy(configs, num_procs: int, script: str = "train.py", timeout: int = 300, log_path=None):
    """Runs ``deepy.py`` to completion; returns (returncode, combined output)."""
    proc = subprocess.run(deepy_command(configs, num_procs, script), cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if log_path is not None:
        Path(log_path).write_text(proc.stdout)
    return proc.returncode, proc.stdout


def tb_losses(tb_dir) -> dict:
    """{step: train/lm_loss} from the TensorBoard event files of a run (float32 as logged: exact)."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted(glob.glob(os.path.join(str(tb_dir), "events.*"))):
        acc = EventAccumulator(path)
        acc.Reload()
        if "train/lm_loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/lm_loss")})
    return out


LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| loss (\S+)")


def losses_by_iteration(output: str) -> dict:
    """{iteration: loss string as printed} from the console lines (log_interval 1 gives every step)."""
    return {int(m.group(1)): m.group(2) for m in LOSS_LINE.finditer(output)}


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str):
    """A tmpfs of ``size`` (e.g. "2m") at ``mount_point``, for full-disk tests; skips the test where mounting is
    not allowed (needs root)."""
    import pytest

    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
