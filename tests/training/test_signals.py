"""Stopping and restarting runs: signals delivered as a terminal, a scheduler or a user would, a forced
second signal, a resume of a finished run, and a non-finite loss whose gradients are finite.

deepy.py is started in a session of its own, as a shell starts a foreground job, so that the test can signal
its process group like a terminal's Ctrl-C or `kill -TERM -PGID`. Signals are timed by the run's output,
never by a clock.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from launch_utils import FIXTURES, REPO, deepy_command, launch_env, write_run_config, write_tiny_corpus

BASE = [FIXTURES / "tiny_model.yml", FIXTURES / "tiny_train.yml"]
FAULTS = str(FIXTURES / "fault_injection" / "train.py")
STEP_LINE = re.compile(r"iteration\s+3/")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("signals") / "corpus"))


def run_to_end(cfg, script="train.py", env=None):
    proc = subprocess.run(deepy_command(BASE + [cfg], 1, script), cwd=REPO, env=dict(launch_env(), **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


def long_run_config(run_dir, corpus, nprocs, **extra):
    """A run that is surely still training when signalled: 10000 iterations of a tiny model, no scheduled
    saves, so that any checkpoint is the stop's."""
    run_dir.mkdir()
    keys = dict(data_path=corpus, train_iters=10000, save=str(run_dir / "ckpt"), checkpoint_factor=100000,
                train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                pipe_parallel_size=1 if nprocs == 1 else 0, zero_optimization={"stage": 0 if nprocs == 1 else 1})
    keys.update(extra)
    return write_run_config(run_dir / "run.yml", **keys)


class Run:
    """deepy.py in a session of its own; its output is read line by line."""

    def __init__(self, cfg, nprocs, script="train.py", env=None):
        self.proc = subprocess.Popen(deepy_command(BASE + [cfg], nprocs, script), cwd=REPO,
                                     env=dict(launch_env(), **(env or {})), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []

    def wait_for(self, predicate) -> str:
        for line in self.proc.stdout:
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError("the run ended before the expected line:\n" + "".join(self.lines)[-4000:])

    def processes(self) -> list:
        """deepy.py and everything below it (runner, DeepSpeed's launcher, ranks, data-loader workers)."""
        me = psutil.Process(self.proc.pid)
        return [me] + me.children(recursive=True)

    def ranks(self) -> list:
        return [p for p in self.processes()[1:] if p.name() != "pt_data_worker"
                and any(a.startswith("--local_rank=") for a in p.cmdline())]

    def finish(self, timeout=240):
        rest, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + rest

    def kill(self):
        if self.proc.poll() is None:
            for p in self.processes():
                p.kill()
            self.proc.wait()


def assert_all_gone(procs):
    """Every process of the run has ended (bounded wait for exits already under way, not a sleep)."""
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]


def deliver(run: Run, how: str, nprocs: int) -> None:
    if how == "rank":
        ranks = run.ranks()
        assert len(ranks) == nprocs, ranks
        # One rank only: the others learn of it through the per-step all-reduce.
        ranks[-1].send_signal(signal.SIGTERM)
    elif how == "group_sigint":  # a terminal's Ctrl-C
        os.killpg(run.proc.pid, signal.SIGINT)
    elif how == "group_sigterm":  # kill -TERM -PGID
        os.killpg(run.proc.pid, signal.SIGTERM)
    elif how == "deepy_sigterm":
        run.proc.send_signal(signal.SIGTERM)
    else:
        raise ValueError(how)


DELIVERIES = ("rank", "group_sigint", "group_sigterm", "deepy_sigterm")


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("nprocs", (1, 2))
@pytest.mark.parametrize("how", DELIVERIES)
def test_signal_saves_at_next_step_and_exits_0(tmp_path, corpus, how, nprocs):
    run_dir = tmp_path / "run"
    cfg = long_run_config(run_dir, corpus, nprocs)
    run = Run(cfg, nprocs)
    try:
        run.wait_for(STEP_LINE.search)
        procs = run.processes()
        assert len(procs) >= 3 + nprocs  # deepy, runner, launcher, ranks
        deliver(run, how, nprocs)
        rc, out = run.finish()
    finally:
        run.kill()
    assert rc == 0, out[-4000:]
    stopped = re.search(r"exiting at iteration (\d+) on (signal SIG\w+|a stop request on another rank)", out)
    assert stopped, out[-4000:]
    step = int(stopped.group(1))
    assert step >= 3
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text() == f"global_step{step}"
    assert (ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt").exists()
    assert [p.name for p in ckpt.glob("global_step*")] == [f"global_step{step}"]
    assert_all_gone(procs)
    assert not os.path.exists(cfg_resolved(out) + ".stop")


def cfg_resolved(out: str) -> str:
    return re.search(r"resolved config (\S+)", out).group(1)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_signal_during_start_up_stops_before_training(tmp_path, corpus):
    """SIGTERM to deepy.py as soon as it has started the runner: the ranks, still starting (they cannot be signalled
    yet), read the stop-request file and every one exits 0 before the first step, saving nothing."""
    run_dir = tmp_path / "run"
    cfg = long_run_config(run_dir, corpus, 2)
    run = Run(cfg, 2)
    try:
        run.wait_for(lambda line: line.startswith("deepy.py: runner started"))
        run.proc.send_signal(signal.SIGTERM)
        rc, out = run.finish()
    finally:
        run.kill()
    assert rc == 0, out[-4000:]
    assert "stop requested before training started (deepy.py's stop request (SIGTERM" in out, out[-4000:]
    assert not STEP_LINE.search(out) and not (run_dir / "ckpt").exists()
    assert not os.path.exists(cfg_resolved(out) + ".stop")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_repeat_after_grace_window_forces_exit(tmp_path, corpus):
    """A rank that never reaches a step boundary: the first SIGTERM asks for a save, a repeat within the
    window changes nothing, one after it kills every process of the run; exit 128 + 15, nothing saved."""
    run_dir = tmp_path / "run"
    cfg = long_run_config(run_dir, corpus, 1)
    run = Run(cfg, 1, script=FAULTS, env={"TEST_HANG_ITER": "3"})
    try:
        run.wait_for(lambda line: "fault injection: hanging in iteration 3" in line)
        procs = run.processes()
        os.killpg(run.proc.pid, signal.SIGTERM)
        run.wait_for(lambda line: "asking the ranks to save a checkpoint" in line)
        os.killpg(run.proc.pid, signal.SIGTERM)  # within the window: the same request
        run.wait_for(lambda line: "a further SIGINT/SIGTERM now kills the run" in line)
        os.killpg(run.proc.pid, signal.SIGTERM)
        rc, out = run.finish(timeout=60)  # a forced stop is immediate
    finally:
        run.kill()
    assert rc == 128 + signal.SIGTERM, out[-4000:]
    assert "deepy.py: SIGTERM again: killing the run now" in out
    assert not (run_dir / "ckpt" / "latest").exists()
    assert_all_gone(procs)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("pipe", (1, 0))
def test_inf_loss_is_a_bad_step_and_finished_run_restarts_cleanly(tmp_path, corpus, pipe):
    """An inf added to the loss at step 3 leaves the gradients finite; the step is still skipped and kept
    out of the logged loss. Resuming the finished run (latest = train_iters) runs nothing and exits 0."""
    keys = dict(data_path=corpus, train_iters=4, save=str(tmp_path / "ckpt"), checkpoint_factor=100,
                pipe_parallel_size=pipe, zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=2)
    cfg = write_run_config(tmp_path / "run.yml", **keys)
    rc, out = run_to_end(cfg, FAULTS, env={"TEST_INF_ITERS": "3"})
    assert rc == 0, out[-4000:]
    assert "iteration 3: non-finite loss/gradients, step skipped (1 in a row)" in out
    losses = dict(re.findall(r"iteration\s+(\d+)/\s*4 \| loss (\S+)", out))
    assert sorted(losses) == ["1", "2", "4"] and all(re.match(r"\d\.\d+E[+-]\d+$", v) for v in losses.values()), losses
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step4"

    resume = write_run_config(tmp_path / "resume.yml", load=str(tmp_path / "ckpt"), **keys)
    rc, out = run_to_end(resume)
    assert rc == 0, out[-4000:]
    assert "training is complete: the checkpoint is at iteration 4, train_iters is 4; nothing to run" in out
    assert "iteration        " not in out and "results at iteration" not in out
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step4"


STOP_SIGNAL_SCRIPT = textwrap.dedent("""
    import signal, sys
    from megatron.utils import StopSignal
    now = [0.0]
    stop = StopSignal(sys.argv[1], clock=lambda: now[0]).install()
    assert not stop.requested
    open(sys.argv[1], "w").write("SIGINT\\n")
    assert stop.requested and stop.name.startswith("deepy.py's stop request (SIGINT"), stop.name
    signal.raise_signal(signal.SIGTERM)
    now[0] = StopSignal.GRACE_SECONDS  # a repeat at the end of the window is still the same request
    signal.raise_signal(signal.SIGINT)
    assert stop.name == "signal SIGTERM", stop.name
    print("survived", flush=True)
    now[0] = StopSignal.GRACE_SECONDS + 0.1
    signal.raise_signal(signal.SIGINT)
    print("not reached", flush=True)
""")


def test_stop_signal_grace_window_and_stop_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", STOP_SIGNAL_SCRIPT, str(tmp_path / "r.yml.stop")], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert proc.stdout == "survived\n", proc.stdout
    assert "SIGINT again" in proc.stderr and "nothing saved" in proc.stderr


def test_forced_stop_on_pdsh_hosts_kills_only_this_launch(tmp_path, monkeypatch):
    """The remote kill is a pkill whose pattern matches this launch's ranks and launcher, not another
    DeepSpeed launch of the same script (DeepSpeed's own pdsh kill matches every one)."""
    sys.path.insert(0, str(REPO))
    import deepy

    resolved = str(tmp_path / "runs" / "a.yml")
    calls = []
    monkeypatch.setattr(deepy.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    sup = deepy.RunSupervisor(["--hostfile", "h", "train.py", "--neox_config_file", resolved], ["node1", "node2"])
    sup._kill()
    assert len(calls) == 1 and calls[0][:4] == ["pdsh", "-S", "-w", "node1,node2"], calls
    assert calls[0][4:8] == ["pkill", "-KILL", "-f", "--"]
    pattern = shlex.split(calls[0][8])[0]  # as the remote shell unquotes it
    ours = f"python -u -m deepspeed.launcher.launch --world_info=X --node_rank=0 train.py --neox_config_file {resolved}"
    rank = f"python -u train.py --local_rank=0 --neox_config_file {resolved}"
    other = f"python -u train.py --local_rank=0 --neox_config_file {tmp_path}/runs/aXyml"
    assert re.search(pattern, ours) and re.search(pattern, rank) and not re.search(pattern, other)
    assert deepy.RunSupervisor(["x.py", "--neox_config_file", resolved])._kill() is None and len(calls) == 1


@pytest.mark.slow
@pytest.mark.deepspeed
def test_sigkill_of_deepy_takes_the_whole_run_down(tmp_path, corpus):
    """deepy.py killed outright (OOM killer, kill -9 -PGID): its runner, the launcher and the ranks, in a
    session of their own, die with it instead of training on as orphans."""
    cfg = long_run_config(tmp_path / "run", corpus, 2)
    run = Run(cfg, 2)
    try:
        run.wait_for(STEP_LINE.search)
        procs = run.processes()
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=60)
        _, alive = psutil.wait_procs(procs, timeout=30)  # bounded wait for deaths under way
    finally:
        run.kill()
    left = [(p.pid, p.cmdline()) for p in alive]
    for p in alive:
        p.kill()
    assert left == []
