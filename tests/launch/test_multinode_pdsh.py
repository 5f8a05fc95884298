"""The real multi-node path: `deepy.py --hostfile` over DeepSpeed's pdsh runner and ssh, to two loopback hosts.

A throwaway sshd (tests/launch/loopback_sshd.py) serves `node1` (127.0.0.2) and `node2` (127.0.0.3), one slot
each; the ssh options reach pdsh and deepy.py's checks only through PDSH_SSH_ARGS_APPEND (`-F` our ssh_config)
and the `ssh_port` key. One run checks together: deepy.py's ssh check, master_addr from the first host's
HostName, the ranks' environment file (the user's own entry kept), gloo's interface, both ranks training,
losses bitwise equal to a local 2-process run, and a local resume of the multi-node checkpoint that continues
the local run's losses bitwise.

Needs root, sshd and pdsh (`.ci/run` installs openssh-server and pdsh); skips itself elsewhere.
"""
import glob
import os
import sys
from pathlib import Path

import pytest

from loopback_sshd import LISTEN, NODES, free_port_on_all, loopback_nodes, missing_tools
from multinode_runs import HALF, ITERS, REPO, common_keys, deepy, launch_env, local_baseline, tb_losses

pytestmark = [pytest.mark.multinode, pytest.mark.deepspeed, pytest.mark.slow]


def test_two_loopback_hosts_over_pdsh(tmp_path, tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip("cannot host loopback nodes here: missing " + ", ".join(missing))
    corpus, local = local_baseline(tmp_path_factory)
    common = common_keys(corpus)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in NODES))
    user_env = tmp_path / "user.deepspeed_env"
    user_env.write_text("# the user's own file: kept as it is\nSEPLLM_USER_ENTRY=kept\n")
    with loopback_nodes(tmp_path / "ssh") as (ssh_config, port):
        env = dict(launch_env(), PDSH_SSH_ARGS_APPEND=f"-F {ssh_config}", DS_ENV_FILE=str(user_env))
        multi_dir = tmp_path / "multi"
        # A free rendezvous port rather than the multi-node default 29500, which another run may hold.
        keys = dict(common, train_iters=HALF, ssh_port=port, hostfile=str(hostfile),
                    master_port=free_port_on_all(LISTEN))
        out = deepy(multi_dir, keys, env=env)
    assert "ssh check: 2 host(s) answer (node1, node2); each sees the 1 .idx file(s)" in out
    assert f"--master_addr {NODES['node1']} --launcher pdsh --ssh_port {port}" in out  # node1's HostName
    # DeepSpeed's pdsh command line (its log) carries the environment file's entries to every host.
    cmd = next(line for line in out.splitlines() if "cmd = pdsh" in line)
    for entry in (f"PATH={Path(sys.executable).parent}:", f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']};",
                  f"PYTHONPATH={REPO};", "SEPLLM_USER_ENTRY=kept;", f"MASTER_ADDR={NODES['node1']};"):
        assert f"export {entry}" in cmd, (entry, cmd)
    assert not (multi_dir / "resolved.deepspeed_env").exists()  # removed after the run
    # pdsh prefixes each host's lines: both hosts started a launcher and a rank.
    for node in NODES:
        assert any(line.startswith(f"{node}: ") and "launch.py" in line for line in out.splitlines()), node
    ckpt = multi_dir / "ckpt" / f"global_step{HALF}"
    assert len(glob.glob(str(ckpt / "*zero_pp_rank_*_optim_states.pt"))) == 2  # one optimizer shard per rank
    multi = tb_losses(multi_dir / "tb")
    assert multi == {i: local[i] for i in range(1, HALF + 1)}  # bit for bit

    resumed_dir = tmp_path / "resumed"
    deepy(resumed_dir, dict(common, load=str(multi_dir / "ckpt")), ["--num_gpus", "2"])
    resumed = tb_losses(resumed_dir / "tb")
    assert resumed == {i: local[i] for i in range(HALF + 1, ITERS + 1)}
