"""Slurm, OpenMPI and MVAPICH launches, up to the command DeepSpeed's runner would start.

deepy.py's runner argv goes through DeepSpeed's real `runner.main` with the backends' presence faked and
`subprocess.Popen` recording instead of starting. The Slurm line is compared with what GPT-NeoX builds for the
same config: GPT-NeoX's `get_deepspeed_main_args` (megatron/neox_arguments/arguments.py at ea7aefd8) passes
`--launcher slurm --force_multi --comment C --account A`, and DeeperSpeed's SlurmRunner turns that into
`srun -n N <launcher_args> --comment C --account A --export=ALL,<exports> python -u SCRIPT ARGS`.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_arguments.fake_ssh import FakeSsh  # noqa: E402
from neox_arguments.helpers import cpu, write  # noqa: E402
from small_run import small_run  # noqa: E402

import deepy  # noqa: E402

pytestmark = pytest.mark.deepspeed


@pytest.fixture()
def setup(tmp_path):
    cfg, script, hostfile, _ = small_run(tmp_path)
    return tmp_path, cfg, script, hostfile


class _Started:
    """Popen stand-in: records the command, starts nothing."""
    commands = []

    def __init__(self, cmd, env=None, **kwargs):
        _Started.commands.append((list(cmd), dict(env or {})))
        self.returncode = 0

    def wait(self):
        return 0


def deepspeed_command(setup, monkeypatch, keys):
    """(deepy's runner argv, the command and environment DeepSpeed's runner would start)."""
    import deepspeed.launcher.multinode_runner as backends
    import deepspeed.launcher.runner as ds_runner

    tmp, cfg, script, hostfile = setup
    _Started.commands = []
    monkeypatch.setattr(ds_runner, "subprocess", types.SimpleNamespace(
        Popen=_Started, CalledProcessError=subprocess.CalledProcessError))
    # pdsh's runner installs its kill-on-signal handlers; not in the test process.
    monkeypatch.setattr(ds_runner, "signal", types.SimpleNamespace(signal=lambda *a: None, SIGINT=2, SIGTERM=15))
    # The backends' programs (pdsh, sinfo, ompi_info, mpiname) need not be installed. Not shutil.which itself:
    # torch's JIT build asks it for ccache.
    for backend in (backends.PDSHRunner, backends.SlurmRunner, backends.OpenMPIRunner, backends.MVAPICHRunner):
        monkeypatch.setattr(backend, "backend_exists", lambda self: True)
    monkeypatch.setattr(backends, "MVAPICH_TMP_HOSTFILE", str(tmp / "mvapich_hosts"))
    seen = {}

    def runner(argv):
        seen["argv"] = argv
        resolved = argv[argv.index("--neox_config_file") + 1]
        # The runner child reads DS_ENV_FILE when DeepSpeed's runner module is imported; here it is imported.
        monkeypatch.setattr(ds_runner, "DEEPSPEED_ENVIRONMENT_NAME", resolved[:-len(".yml")] + ".deepspeed_env")
        ds_runner.main(argv)
        return 0

    extra = write(tmp / "launch.yml", keys)
    assert deepy.main([script, cfg, extra, "--hostfile", hostfile, "--resolved_config", str(tmp / "r.yml")],
                      runner=runner, env=cpu(), host_resolver=lambda h: True,
                      ssh=FakeSsh(aliases={"node-a": "10.0.0.1"})) == 0
    (cmd, env), = _Started.commands
    return seen["argv"], cmd, env


def test_slurm_srun_matches_gpt_neox(setup, monkeypatch):
    argv, cmd, _ = deepspeed_command(setup, monkeypatch,
                                     "launcher: slurm\ndeepspeed_slurm: true\ncomment: neox\naccount: proj\n")
    tmp, _, script, _ = setup
    # GPT-NeoX's runner options for this config (those that differ from DeepSpeed's defaults).
    assert argv[argv.index("--launcher") + 1] == "slurm" and "--force_multi" in argv
    assert cmd[:7] == ["srun", "-n", "2", "--comment", "neox", "--account", "proj"]
    exports = dict(kv.split("=", 1) for kv in cmd[7].split(",")[1:])
    assert cmd[7].startswith("--export=ALL,")  # srun passes deepy.py's whole environment, plus these
    assert exports["MASTER_ADDR"] == "10.0.0.1" and exports["MASTER_PORT"] == "29500"
    assert exports["TORCH_EXTENSIONS_DIR"] == os.environ["TORCH_EXTENSIONS_DIR"]
    assert cmd[8:] == [sys.executable, "-u", os.path.abspath(script), "--neox_config_file", str(tmp / "r.yml")]


def test_openmpi_mpirun(setup, monkeypatch):
    argv, cmd, _ = deepspeed_command(setup, monkeypatch, "launcher: openmpi\n")
    tmp, _, script, hostfile = setup
    assert "--force_multi" in argv  # deepspeed_mpi, implied, as GPT-NeoX's get_deepspeed_main_args does
    assert cmd[:11] == ["mpirun", "-n", "2", "-hostfile", os.path.abspath(hostfile), "--mca", "btl", "^openib",
                        "--mca", "btl_tcp_if_include", "eth0"]
    exports = dict(cmd[i + 1].split("=", 1) for i in range(len(cmd)) if cmd[i] == "-x")
    assert exports["UCX_TLS"] == "tcp" and exports["MASTER_ADDR"] == "10.0.0.1"
    assert exports["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert cmd[-5:] == [sys.executable, "-u", os.path.abspath(script), "--neox_config_file", str(tmp / "r.yml")]


def test_mvapich_mpirun(setup, monkeypatch):
    _, cmd, _ = deepspeed_command(setup, monkeypatch, "launcher: mvapich\n")
    tmp, _, script, _ = setup
    assert cmd[:7] == ["mpirun", "-np", "2", "-ppn", "1", "--hostfile", str(tmp / "mvapich_hosts")]
    assert (tmp / "mvapich_hosts").read_text() == "node-a\nnode-b\n"
    exports = dict(cmd[i + 1].split("=", 1) for i in range(len(cmd)) if cmd[i] == "-env")
    assert exports["MV2_SUPPORT_DL"] == "1" and exports["MASTER_ADDR"] == "10.0.0.1"
    assert cmd[-5:] == [sys.executable, "-u", os.path.abspath(script), "--neox_config_file", str(tmp / "r.yml")]


def test_pdsh_command(setup, monkeypatch):
    _, cmd, env = deepspeed_command(setup, monkeypatch, "ssh_port: 2222\n")
    tmp, _, script, _ = setup
    assert cmd[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-b"]
    assert env["PDSH_RCMD_TYPE"] == "ssh" and env["PDSH_SSH_ARGS_APPEND"].split()[-2:] == ["-p", "2222"]
    assert f"export TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}; " in cmd[6]
    assert "--master_addr=10.0.0.1" in cmd and cmd[-3:] == [os.path.abspath(script), "--neox_config_file",
                                                            str(tmp / "r.yml")]
