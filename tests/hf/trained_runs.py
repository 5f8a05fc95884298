"""Helpers of the tests that train a tiny model with deepy.py, export it with the README's command, and compare the
export with the trainer's model loaded from the same checkpoint."""
import subprocess
import sys
from pathlib import Path

import yaml

from tests.training.launch_utils import FIXTURES, REPO, launch_env, run_deepy


def train_tiny(tmp_path: Path, model_keys: dict, corpus: str, iters: int, pipe_parallel_size: int = 1):
    """Trains ``model_keys`` + the tiny training fixture for ``iters`` steps on one rank, saving at the last one.
    Returns ``(configs, log, step_dir)``; the run must succeed."""
    (tmp_path / "model.yml").write_text(yaml.safe_dump(model_keys))
    (tmp_path / "run.yml").write_text(yaml.safe_dump(dict(
        data_path=corpus, train_iters=iters, checkpoint_factor=iters, pipe_parallel_size=pipe_parallel_size,
        zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
        save=str(tmp_path / "save"))))
    configs = [tmp_path / "model.yml", FIXTURES / "tiny_train.yml", tmp_path / "run.yml"]
    rc, log = run_deepy(configs, 1, log_path=tmp_path / "train.log")
    assert rc == 0, log[-4000:]
    return configs, log, tmp_path / "save" / f"global_step{iters}"


def export_as_readme(step: Path, out: Path, architecture: str, configs=()) -> None:
    """``tools/ckpts/convert_neox_to_hf.py`` as the README runs it (``--config_file`` only when given)."""
    argv = [sys.executable, str(REPO / "tools" / "ckpts" / "convert_neox_to_hf.py"), "--input_dir", str(step)]
    if configs:
        argv += ["--config_file", *map(str, configs)]
    argv += ["--output_dir", str(out), "--precision", "auto", "--architecture", architecture]
    proc = subprocess.run(argv, cwd=out.parent, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def trainer_from_step(step: Path):
    """The trainer's own model, built from the config training resolved, with the checkpoint's weights."""
    from megatron.checkpoint_io import CheckpointReader
    from megatron.model import build_sequential_model
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.environment import Environment

    args = NeoXArgs.from_resolved(str(step / "configs" / "resolved_config.yml"),
                                  env=Environment(0, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}))
    trainer = build_sequential_model(args).eval()
    reader = CheckpointReader(str(step), args.num_layers)
    prefix = next(iter(trainer.state_dict())).split(".")[0]
    trainer.load_state_dict({f"{prefix}.{idx}.{name}": value for idx in reader.layer_indices()
                             for name, value in reader.layer(idx)[0].items()})
    return trainer
