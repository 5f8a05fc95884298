"""The environment file deepy.py hands DeepSpeed's multi-node runner (megatron/launch_env_file.py)."""
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_arguments.fake_ssh import FakeSsh  # noqa: E402
from neox_arguments.helpers import cpu, write  # noqa: E402
from small_run import small_run  # noqa: E402

import deepy  # noqa: E402
from megatron.launch_env_file import (launch_entries, merged_entries, read_env_file, user_env_files,  # noqa: E402
                                      write_env_file)
from megatron.neox_arguments import ConfigError  # noqa: E402


def test_user_env_files_follow_deepspeed(tmp_path):
    assert user_env_files({}, "/work", "/home/me") == ["/home/me/.deepspeed_env", "/work/.deepspeed_env"]
    assert user_env_files({"DS_ENV_FILE": "my.env"}, "/work", "/home/me") == ["/home/me/my.env", "/work/my.env"]
    assert user_env_files({"DS_ENV_FILE": "/etc/x.env"}, "/work", "/home/me") == ["/etc/x.env"]


def test_read_env_file(tmp_path):
    path = write(tmp_path / "e", "# comment\n\nA=1\nexport B = two words \nC=x=y\n")
    assert dict(read_env_file(path)) == {"A": "1", "B": "two words", "C": "x=y"}
    with pytest.raises(ConfigError, match=r"e2:2: bad environment line 'no equals sign'"):
        read_env_file(write(tmp_path / "e2", "A=1\nno equals sign\n"))


def test_users_entries_win_and_ours_fill_the_rest(tmp_path):
    home = write(tmp_path / "home.env", "PATH=/home/bin\nNCCL_IB_HCA=mlx5\n")
    cwd = write(tmp_path / "cwd.env", "PATH=/cwd/bin\n")
    ours = {"PATH": "/venv/bin:/usr/bin", "TORCH_EXTENSIONS_DIR": "/repo/.torch_extensions"}
    entries, source = merged_entries([home, cwd, str(tmp_path / "absent.env")], ours)
    assert dict(entries) == {"PATH": "/cwd/bin", "NCCL_IB_HCA": "mlx5",
                             "TORCH_EXTENSIONS_DIR": "/repo/.torch_extensions"}
    assert source == {"PATH": cwd, "NCCL_IB_HCA": home, "TORCH_EXTENSIONS_DIR": "deepy.py"}


def test_launch_entries():
    environ = {"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/extra:/repo", "TORCH_EXTENSIONS_DIR": "/te",
               "WANDB_API_KEY": "k", "GLOO_SOCKET_IFNAME": "eth1", "UNRELATED": "x"}
    assert dict(launch_entries(environ, "/repo", "/cwd", "node-a", 29500)) == {
        "PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/repo:/cwd:/extra", "TORCH_EXTENSIONS_DIR": "/te",
        "MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "GLOO_SOCKET_IFNAME": "eth1", "WANDB_API_KEY": "k"}


def test_write_env_file_is_private_and_atomic(tmp_path):
    path = write_env_file(str(tmp_path / "sub" / "run.deepspeed_env"), {"A": "1", "B": "x y"})
    assert Path(path).read_text() == "A=1\nB=x y\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ConfigError, match="B holds a newline"):
        write_env_file(path, {"A": "2", "B": "x\ny"})
    assert Path(path).read_text() == "A=1\nB=x y\n" and os.listdir(tmp_path / "sub") == ["run.deepspeed_env"]


def test_deepy_writes_the_file_and_builds_the_ops_before_the_runner(tmp_path, monkeypatch):
    cfg, script, hostfile, _ = small_run(tmp_path)
    user_file = write(tmp_path / "user.env", "PATH=/users/own/bin\nMY_FLAG=1\n")
    monkeypatch.setenv("DS_ENV_FILE", user_file)
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    seen, order = {}, []
    import megatron.jit_ops

    monkeypatch.setattr(megatron.jit_ops, "build_jit_ops", lambda log: order.append("JIT ops built"))

    def runner(argv):
        order.append("runner started")
        resolved = argv[argv.index("--neox_config_file") + 1]
        path = resolved[:-len(".yml")] + ".deepspeed_env"
        seen.update(read_env_file(path), mode=stat.S_IMODE(os.stat(path).st_mode), path=path)
        return 0

    resolved = tmp_path / "out" / "r.yml"
    assert deepy.main([script, cfg, "--hostfile", hostfile, "--resolved_config", str(resolved)], runner=runner,
                      env=cpu(), host_resolver=lambda h: True, ssh=FakeSsh(aliases={"node-a": "10.9.8.7"})) == 0
    assert seen["PATH"] == "/users/own/bin" and seen["MY_FLAG"] == "1"  # the user's entries, untouched
    assert seen["TORCH_EXTENSIONS_DIR"] == os.environ["TORCH_EXTENSIONS_DIR"]
    assert seen["PYTHONPATH"].split(os.pathsep)[0] == deepy.REPO_ROOT
    assert (seen["MASTER_ADDR"], seen["MASTER_PORT"], seen["WANDB_API_KEY"]) == ("10.9.8.7", "29500", "secret")
    assert seen["mode"] == 0o600 and not os.path.exists(seen["path"])  # it held the key: gone after the run
    assert Path(user_file).read_text() == "PATH=/users/own/bin\nMY_FLAG=1\n"
    assert order == ["JIT ops built", "runner started"]  # once, before any rank
