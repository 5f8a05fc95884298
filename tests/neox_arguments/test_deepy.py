"""deepy.py up to the DeepSpeed runner call (the runner itself is replaced by a recorder)."""
import os
import sys

import pytest

import deepy
from megatron.neox_arguments import NeoXArgs

from .fake_ssh import FakeSsh
from .helpers import Recorder, cpu, gpus, make_dataset, small, write


@pytest.fixture()
def run_setup(tmp_path):
    data = make_dataset(tmp_path)
    cfg = write(tmp_path / "small.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + f"""
train_iters: 10
optimizer: {{type: Adam, params: {{lr: 0.001}}}}
data_path: {data}
tokenizer_type: CharLevelTokenizer
train_micro_batch_size_per_gpu: 2
""")
    script = write(tmp_path / "train.py", "print('rank')\n")
    return cfg, script


def test_cpu_launch_argv_and_resolved_config(tmp_path, run_setup):
    cfg, script = run_setup
    rec = Recorder()
    resolved = tmp_path / "out" / "resolved.yml"
    rc = deepy.main([script, cfg, "--num_gpus", "2", "--resolved_config", str(resolved)], runner=rec, env=cpu())
    assert rc == 0 and len(rec.calls) == 1
    argv = rec.calls[0]
    assert argv[argv.index("--num_gpus") + 1] == "2"
    assert argv[argv.index("--launcher") + 1] == "pdsh"
    assert 0 < int(argv[argv.index("--master_port") + 1]) < 65536  # a free local port, not a fixed one
    assert "--hostfile" not in argv
    assert argv[-3:] == [os.path.abspath(script), "--neox_config_file", str(resolved)]
    on_rank = NeoXArgs.consume_neox_args(argv[-2:], env=cpu(WORLD_SIZE=2, RANK=1, LOCAL_RANK=1))
    assert on_rank.global_num_gpus == 2 and on_rank.train_batch_size == 4 and on_rank.rank == 1
    assert on_rank.config_paths == [cfg] and "small.yml" in on_rank.config_files


def test_cpu_default_is_one_process(tmp_path, run_setup):
    cfg, script = run_setup
    rec = Recorder()
    # A WORLD_SIZE inherited from an outer job does not count: deepy.py is the launcher.
    assert deepy.main([script, cfg, "--resolved_config", str(tmp_path / "r.yml")], runner=rec,
                      env=cpu(WORLD_SIZE=8, RANK=0)) == 0
    argv = rec.calls[0]
    assert argv[argv.index("--num_gpus") + 1] == "1"


def test_gpu_launch_uses_all_gpus_by_default(tmp_path, run_setup):
    cfg, script = run_setup
    rec = Recorder()
    assert deepy.main([script, cfg, "--resolved_config", str(tmp_path / "r.yml")], runner=rec, env=gpus(4)) == 0
    assert "--num_gpus" not in rec.calls[0]
    assert NeoXArgs.from_resolved(str(tmp_path / "r.yml"), env=gpus(4, WORLD_SIZE=4)).train_batch_size == 8


def test_hostfile_launch_argv(tmp_path, run_setup):
    cfg, script = run_setup
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=2\n")
    rec = Recorder()
    rc = deepy.main([script, cfg, "--hostfile", hostfile, "--include", "node-a@node-b:1", "--launcher", "openmpi",
                     "--master_port", "1234", "--force_multi", "--resolved_config", str(tmp_path / "r.yml")],
                    runner=rec, env=cpu(), host_resolver=lambda h: True, ssh=FakeSsh())
    assert rc == 0
    argv = rec.calls[0]
    assert argv[:4] == ["--hostfile", hostfile, "--include", "node-a@node-b:1"]
    assert argv[argv.index("--launcher") + 1] == "openmpi" and argv[argv.index("--master_port") + 1] == "1234"
    assert "--force_multi" in argv and "--num_gpus" not in argv
    rec = Recorder()
    deepy.main([script, cfg, "--hostfile", hostfile, "--resolved_config", str(tmp_path / "r2.yml")], runner=rec,
               env=cpu(), host_resolver=lambda h: True, ssh=FakeSsh())
    assert rec.calls[0][rec.calls[0].index("--master_port") + 1] == "29500"  # multi-node default
    assert NeoXArgs.from_resolved(str(tmp_path / "r.yml"), env=cpu(WORLD_SIZE=3)).global_num_gpus == 3


@pytest.mark.parametrize("extra,message", [
    (["--include", "node-c"], "'include' names host 'node-c', which is not in the hostfile"),
    ([], r"unknown host\(s\) \['node-b'\]"),
])
def test_hostfile_errors_stop_before_launch(tmp_path, run_setup, capsys, extra, message):
    cfg, script = run_setup
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=2\n")
    rec = Recorder()
    rc = deepy.main([script, cfg, "--hostfile", hostfile, *extra, "--resolved_config", str(tmp_path / "r.yml")],
                    runner=rec, env=cpu(), host_resolver={"node-a"}.__contains__)
    assert rc == 2 and rec.calls == [] and not (tmp_path / "r.yml").exists()
    err = capsys.readouterr().err
    assert "configuration error" in err
    import re
    assert re.search(message, err)


def test_config_errors_stop_before_launch(tmp_path, run_setup, capsys):
    cfg, script = run_setup
    bad = write(tmp_path / "bad.yml", "num_layer: 3\n")
    rec = Recorder()
    assert deepy.main([script, cfg, bad], runner=rec, env=cpu()) == 2 and rec.calls == []
    assert "unknown key 'num_layer'" in capsys.readouterr().err
    assert deepy.main([str(tmp_path / "nope.py"), cfg], runner=rec, env=cpu()) == 2
    assert "script not found" in capsys.readouterr().err


def test_deepspeed_rejection_stops_before_launch(tmp_path, run_setup, capsys):
    cfg, script = run_setup
    extra = write(tmp_path / "extra.yml", "zero_optimization: {stage: 1, not_a_zero_key: 3}\n")
    rec = Recorder()
    assert deepy.main([script, cfg, extra], runner=rec, env=cpu()) == 2 and rec.calls == []
    err = capsys.readouterr().err
    assert "DeepSpeed rejects" in err and "not_a_zero_key" in err


def test_conf_dir_and_dry_run(tmp_path, run_setup, capsys):
    cfg, script = run_setup
    rec = Recorder()
    rc = deepy.main([script, "-d", str(tmp_path), "small.yml", "--dry_run", "--resolved_config",
                     str(tmp_path / "r.yml")], runner=rec, env=cpu())
    assert rc == 0 and rec.calls == [] and (tmp_path / "r.yml").is_file()
    assert "--neox_config_file" in capsys.readouterr().out


def test_prepare_environment_puts_venv_bin_first():
    env = deepy.prepare_environment({"PATH": f"/usr/bin:{os.path.dirname(os.path.abspath(sys.executable))}"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
    assert env["PATH"].count(os.path.dirname(os.path.abspath(sys.executable))) == 1
    assert env["TORCH_EXTENSIONS_DIR"] == os.path.join(deepy.REPO_ROOT, ".torch_extensions")
    assert deepy.prepare_environment({"PATH": "", "TORCH_EXTENSIONS_DIR": "/x"})["TORCH_EXTENSIONS_DIR"] == "/x"


def test_eval_tasks_on_the_command_line_reach_the_ranks(tmp_path, run_setup):
    cfg, script = run_setup
    rec = Recorder()
    resolved = tmp_path / "r.yml"
    assert deepy.main([script, cfg, "--eval_tasks", "piqa", "sciq", "--resolved_config", str(resolved)],
                      runner=rec, env=cpu()) == 0
    on_rank = NeoXArgs.consume_neox_args(rec.calls[0][-2:], env=cpu(WORLD_SIZE=1, RANK=0, LOCAL_RANK=0))
    assert on_rank.eval_tasks == ["piqa", "sciq"]
