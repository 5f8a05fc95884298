"""Ranks that srun / mpirun start without DeepSpeed's launcher (megatron/rank_env.py), and gloo's interface."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_arguments.helpers import cpu, small  # noqa: E402

from megatron.initialize import choose_gloo_interface  # noqa: E402
from megatron.neox_arguments import ConfigError, NeoXArgs  # noqa: E402
from megatron.rank_env import (RankEnvError, expand_hostlist, gloo_interface, interface_for_address,  # noqa: E402
                               launcher_rank_env, source_address)


@pytest.mark.parametrize("nodelist,hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,7],login-1", ["gpu01", "gpu02", "gpu03", "gpu7", "login-1"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("r[1-2]c[3,5]", ["r1c3", "r1c5", "r2c3", "r2c5"]),
    ("a,b[2]", ["a", "b2"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu[a-b]", "", "x[1-]"])
def test_expand_hostlist_refuses_bad_lists(bad):
    with pytest.raises(RankEnvError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(bad)


def args_with(**keys):
    return NeoXArgs.from_dict(small(**keys), env=cpu())


SRUN = dict(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4", SLURM_JOB_NODELIST="gpu[07-08]")


def test_slurm_variables_become_torch_variables():
    args = args_with(deepspeed_slurm=True)
    assert launcher_rank_env(args, SRUN) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                             "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    # launcher: slurm implies the key; a MASTER_ADDR / MASTER_PORT already set (deepy.py's file) is kept.
    args = args_with(launcher="slurm", master_port=1234)
    assert args.deepspeed_slurm
    assert launcher_rank_env(args, dict(SRUN, MASTER_ADDR="10.0.0.1")) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "1234"}
    # GPT-NeoX's fallback: nodes x tasks per node (Slurm writes "2(x2)" for repeated counts).
    env = {k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}
    assert launcher_rank_env(args, dict(env, SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="2(x2)"))["WORLD_SIZE"] == "4"


def test_launcher_variables_are_left_alone_when_they_do_not_apply():
    assert launcher_rank_env(args_with(), SRUN) == {}  # key off: an sbatch step's variables mean nothing
    slurm = args_with(deepspeed_slurm=True)
    assert launcher_rank_env(slurm, dict(SRUN, RANK="0", WORLD_SIZE="1")) == {}  # DeepSpeed's launcher set them
    assert launcher_rank_env(slurm, {}) == {}  # not started by srun (a tool reading the resolved config)


def test_bad_slurm_variables_are_named():
    slurm = args_with(deepspeed_slurm=True)
    with pytest.raises(RankEnvError, match="SLURM_NTASKS='four'"):
        launcher_rank_env(slurm, dict(SRUN, SLURM_NTASKS="four"))
    with pytest.raises(RankEnvError, match="MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST"):
        launcher_rank_env(slurm, {k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"})


def test_mpi_variables():
    args = args_with(launcher="openmpi")
    assert args.deepspeed_mpi
    ompi = dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_COMM_WORLD_SIZE="2",
                MASTER_ADDR="node-a")
    assert launcher_rank_env(args, ompi) == {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    mv2 = dict(MV2_COMM_WORLD_RANK="5", MV2_COMM_WORLD_LOCAL_RANK="1", MV2_COMM_WORLD_SIZE="8", MASTER_ADDR="a",
               MASTER_PORT="7")
    assert launcher_rank_env(args_with(deepspeed_mpi=True), mv2) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    with pytest.raises(RankEnvError, match="MASTER_ADDR is not set"):
        launcher_rank_env(args, {k: v for k, v in ompi.items() if k != "MASTER_ADDR"})


def test_a_rank_derives_its_numbers_from_slurm(tmp_path):
    resolved = NeoXArgs.from_dict(small(deepspeed_slurm=True), env=cpu(WORLD_SIZE=4)).save_resolved(
        str(tmp_path / "resolved.yml"))
    on_rank = NeoXArgs.from_resolved(resolved, env=cpu(**SRUN))
    assert (on_rank.rank, on_rank.local_rank, on_rank.world_size, on_rank.data_parallel_size) == (3, 1, 4, 4)
    with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
        NeoXArgs.from_resolved(resolved, env=cpu(**dict(SRUN, SLURM_PROCID="x")))


def test_interface_for_address():
    table = {"lo": "127.0.0.1", "eth0": "10.0.0.5", "ib0": None}
    interfaces = [(1, "lo"), (2, "eth0"), (3, "ib0")]
    assert interface_for_address("10.0.0.5", interfaces, table.get) == "eth0"
    assert interface_for_address("127.0.0.1", interfaces, table.get) == "lo"
    assert interface_for_address("192.168.1.1", interfaces, table.get) is None


def test_gloo_interface_of_loopback_hosts():
    # Loopback addresses only: the routing table is consulted, no packet leaves.
    assert source_address("127.0.0.3") == "127.0.0.1"
    assert gloo_interface("127.0.0.2") == "lo"
    environ = {"MASTER_ADDR": "127.0.0.2", "MASTER_PORT": "29500", "WORLD_SIZE": "2"}
    assert choose_gloo_interface(environ) == "lo" and environ["GLOO_SOCKET_IFNAME"] == "lo"
    mine = dict(environ, GLOO_SOCKET_IFNAME="eth9")
    assert choose_gloo_interface(mine) is None and mine["GLOO_SOCKET_IFNAME"] == "eth9"  # the user's choice stays
    single = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "1"}
    assert choose_gloo_interface(single) is None and "GLOO_SOCKET_IFNAME" not in single
