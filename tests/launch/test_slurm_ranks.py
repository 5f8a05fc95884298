"""Ranks started the way `srun` starts them (no DeepSpeed launcher): two local train.py processes whose only
rank information is Slurm's variables. With `deepspeed_slurm: true` they form one 2-rank group and train as
`deepy.py --num_gpus 2` does, bit for bit."""
import os
import subprocess
import sys

import pytest

from megatron.net_ports import free_local_port
from multinode_runs import HALF, REPO, common_keys, deepy, launch_env, local_baseline, tb_losses

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def test_srun_style_ranks_train_like_a_local_launch(tmp_path, tmp_path_factory):
    corpus, local = local_baseline(tmp_path_factory)
    port = free_local_port()
    run_dir = tmp_path / "srun"
    # deepy.py validates and writes the resolved config; the "srun" below starts the ranks.
    deepy(run_dir, dict(common_keys(corpus), train_iters=HALF, deepspeed_slurm=True, master_port=port),
          ["--num_gpus", "2", "--dry_run"])
    resolved = run_dir / "resolved.yml"
    procs = []
    for rank in range(2):
        env = dict(launch_env(), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost")
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env)
        procs.append(subprocess.Popen([sys.executable, "-u", str(REPO / "train.py"), "--neox_config_file",
                                       str(resolved)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outs)):
        (run_dir / f"rank{rank}.txt").write_text(out)
        assert proc.returncode == 0, out[-4000:]
    assert tb_losses(run_dir / "tb") == {i: local[i] for i in range(1, HALF + 1)}
    assert len([p for p in os.listdir(run_dir / "ckpt" / f"global_step{HALF}") if "zero_pp_rank_" in p]) == 2
