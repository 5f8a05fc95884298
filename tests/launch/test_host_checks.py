"""Bad multi-node input stops deepy.py before any rank starts, naming the host or key (ssh is faked)."""
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_arguments.fake_ssh import FakeSsh  # noqa: E402
from neox_arguments.helpers import Recorder, cpu, write  # noqa: E402
from small_run import small_run  # noqa: E402

import deepy  # noqa: E402
from megatron.host_checks import data_mismatches, parse_stat, stat_command  # noqa: E402


@pytest.fixture()
def setup(tmp_path):
    cfg, script, hostfile, data = small_run(tmp_path, slots=2)
    return tmp_path, cfg, script, hostfile, os.path.abspath(data + ".idx")


def launch(setup, *extra, ssh=None, keys=""):
    tmp, cfg, script, hostfile, _ = setup
    configs = [cfg] + ([write(tmp / "extra.yml", keys)] if keys else [])
    rec = Recorder()
    rc = deepy.main([script, *configs, "--hostfile", hostfile, *extra, "--resolved_config", str(tmp / "r.yml"),
                     "--dry_run"], runner=rec, env=cpu(), host_resolver=lambda h: True, ssh=ssh or FakeSsh())
    return rc, rec


def test_every_host_is_checked_with_the_port_and_pdsh_options(setup, capsys, monkeypatch):
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-F /my/ssh_config -o User=me")
    ssh = FakeSsh()
    rc, _ = launch(setup, "--ssh_port", "2222", ssh=ssh)
    assert rc == 0
    checks = [c for c in ssh.commands if "-G" not in c]
    assert sorted(c[-2] for c in checks) == ["node-a", "node-b"]
    for c in ssh.commands:
        assert c[:9] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-F", "/my/ssh_config", "-o",
                         "User=me"] or c[:2] == ["ssh", "-G"], c
        assert c[c.index("-p") + 1] == "2222"
    out = capsys.readouterr().out
    assert "--ssh_port 2222" in out and "--no_ssh_check" in out  # DeepSpeed's own first-host check is replaced


def test_a_host_that_does_not_answer_is_named(setup, capsys):
    tmp = setup[0]
    rc, rec = launch(setup, ssh=FakeSsh(down={"node-b": "ssh: connect to host node-b port 22: Connection refused"}))
    err = capsys.readouterr().err
    assert rc == 2 and rec.calls == [] and not (tmp / "r.yml").exists()
    assert "host(s) not answering ssh: 'node-b': ssh: connect to host node-b port 22: Connection refused" in err
    assert "node-a" not in err.split("not answering ssh:")[1].split("(checked")[0]
    # no_ssh_check: true skips the check (and DeepSpeed's).
    ssh = FakeSsh(down={"node-b": "refused"})
    assert launch(setup, ssh=ssh, keys="no_ssh_check: true\n")[0] == 0
    assert all("-G" in c for c in ssh.commands)


def test_hosts_must_see_the_same_data(setup, capsys):
    idx = setup[4]
    size, mtime = os.stat(idx).st_size, int(os.stat(idx).st_mtime)
    rc, _ = launch(setup, ssh=FakeSsh(views={"node-b": {idx: (size, mtime + 60)}}))
    err = capsys.readouterr().err
    assert rc == 2 and "use_shared_fs: true" in err
    assert f"host 'node-b': {idx} has size {size} mtime {mtime + 60} (launch host: size {size} mtime {mtime})" in err
    assert "host 'node-a'" not in err
    # Per-node copies (use_shared_fs: false) may differ in mtime, not in size, and must exist.
    copies = FakeSsh(views={"node-b": {idx: (size, mtime + 60)}})
    assert launch(setup, ssh=copies, keys="use_shared_fs: false\n")[0] == 0
    rc, _ = launch(setup, ssh=FakeSsh(views={"node-a": {idx: None}}), keys="use_shared_fs: false\n")
    assert rc == 2 and f"host 'node-a': {idx} is missing" in capsys.readouterr().err


def test_stat_round_trip(tmp_path):
    f = write(tmp_path / "a b.idx", "xyz")
    assert stat_command([]) == "true"
    assert "'" + f + "'" in stat_command([f])
    assert parse_stat(f"3 1700000000 {f}\nstat: cannot statx 'x': No such file\n") == {f: (3, 1700000000)}
    assert data_mismatches({f: (3, 5)}, {f: (3, 5)}, True) == []
    assert data_mismatches({f: (3, 5)}, {f: (4, 5)}, False) == [f"{f} has size 4 mtime 5 (launch host: size 3 mtime 5)"]


def test_master_addr_is_the_first_hosts_ssh_hostname(setup, capsys):
    assert launch(setup, ssh=FakeSsh(aliases={"node-a": "10.0.0.7"}))[0] == 0
    assert "--master_addr 10.0.0.7 " in capsys.readouterr().out
    ssh = FakeSsh(aliases={"node-a": "10.0.0.7"})
    assert launch(setup, "--master_addr", "192.168.5.5", ssh=ssh)[0] == 0
    assert "--master_addr 192.168.5.5 " in capsys.readouterr().out and not any("-G" in c for c in ssh.commands)


@pytest.mark.parametrize("extra,keys,message", [
    (["--num_gpus", "3"], "", "key 'num_gpus' asks for 3 process\\(es\\) per host but the hostfile .* gives host "
                              "'node-a' slots=2, host 'node-b' slots=2"),
    (["--exclude", "node-c"], "", "key 'exclude' names host 'node-c', which is not in the hostfile"),
    (["--include", "node-a@node-x:0"], "", "key 'include' names host 'node-x', which is not in the hostfile"),
    ([], "comment: neox\n", "key 'comment' is an srun option; it needs launcher: slurm"),
    ([], "account: proj\nlauncher: openmpi\n", "key 'account' is an srun option; it needs launcher: slurm"),
])
def test_bad_launch_input_is_named(setup, capsys, extra, keys, message):
    rc, rec = launch(setup, *extra, keys=keys)
    assert rc == 2 and rec.calls == [] and re.search(message, capsys.readouterr().err)


def test_unparsable_hostfile_line_is_named(setup, capsys):
    tmp = setup[0]
    write(Path(setup[3]), "node-a slots=2\nnode-b slots = 2\n")
    rc, _ = launch(setup)
    assert rc == 2 and f"{setup[3]}:2: bad hostfile line 'node-b slots = 2'" in capsys.readouterr().err
    assert not (tmp / "r.yml").exists()
