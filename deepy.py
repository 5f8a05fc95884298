#!/usr/bin/env python
"""Launcher: `python deepy.py train.py a.yml b.yml ...` (also eval.py / generate.py).

1. Load the YAML files (merged in order), derive and validate everything -- including the hostfile and
   the DeepSpeed config -- before any rank starts; bad input stops here with the key / file / host named.
2. Write the resolved configuration to a file (the ranks read it with `--neox_config_file`).
3. Run DeepSpeed's runner: all local GPUs by default, CPU processes (gloo) on a machine without GPUs,
   several nodes through a hostfile over pdsh / openmpi / mvapich / slurm.
   For a multi-node launch it first checks that every host answers ssh (and sees the data), picks
   master_addr, writes the ranks' environment file (megatron/launch_env_file.py) and builds the JIT ops
   once (docs/multinode.md).
4. Supervise it (RunSupervisor): Ctrl-C or SIGTERM to deepy.py saves a checkpoint at the next step and
   stops with exit 0; a repeat after 5 s kills the run (128 + signal); deepy.py's death ends the run too.

Command-line options override the launcher keys of the configs (see `python deepy.py --help`).
"""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

# Command-line options that override the config key of the same name.
_LAUNCH_OPTIONS = ("num_gpus", "num_nodes", "hostfile", "include", "exclude", "master_port", "master_addr",
                   "ssh_port", "launcher", "force_multi", "eval_tasks", "eval_include_path")


def parse_cli(argv):
    parser = argparse.ArgumentParser(
        prog="deepy.py", description="Validate GPT-NeoX-style YAML configs and launch a script on every rank.")
    parser.add_argument("user_script", help="per-rank script: train.py, eval.py or generate.py")
    parser.add_argument("conf_files", nargs="+", help="YAML config files, merged in order")
    parser.add_argument("-d", "--conf_dir", default=None, help="directory prefixed to relative config paths")
    parser.add_argument("--num_gpus", type=int, default=None,
                        help="devices per node; on a machine without GPUs the number of CPU processes")
    parser.add_argument("--num_nodes", type=int, default=None, help="use the first N hosts of the hostfile")
    parser.add_argument("--hostfile", default=None, help="hostfile with 'host slots=N' lines")
    parser.add_argument("--include", default=None, help="NODE_SPEC[@NODE_SPEC...], NODE_SPEC=host[:slot,...]")
    parser.add_argument("--exclude", default=None, help="resources to leave out (include's format)")
    parser.add_argument("--master_port", type=int, default=None, help="torch.distributed port")
    parser.add_argument("--master_addr", default=None,
                        help="address of node 0 (default: the first host, as ssh resolves its name)")
    parser.add_argument("--ssh_port", type=int, default=None, help="ssh port of the hostfile hosts")
    parser.add_argument("--launcher", default=None, choices=("pdsh", "openmpi", "mvapich", "slurm"),
                        help="multi-node launcher backend")
    parser.add_argument("--force_multi", action="store_true", default=None,
                        help="use the multi-node launcher even for one node")
    parser.add_argument("--eval_tasks", nargs="+", default=None,
                        help="lm-eval task names for eval.py (overrides the eval_tasks key)")
    parser.add_argument("--include_path", dest="eval_include_path", default=None,
                        help="folder of local lm-eval task YAMLs for eval.py (overrides the eval_include_path key)")
    parser.add_argument("--resolved_config", default=None,
                        help="where to write the resolved config (default runs/resolved/<name>.yml in the repo; "
                             "must be readable at the same path on every node)")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate and write the resolved config, print the runner command, launch nothing")
    return parser.parse_intermixed_args(argv)


def prepare_environment(environ=None):
    """Children inherit this process's environment: keep the venv's bin/ first on PATH (DeepSpeed's JIT
    build runs ninja from PATH) and cache JIT-built ops inside the checkout."""
    environ = os.environ if environ is None else environ
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    parts = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in parts if p != bin_dir])
    environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".torch_extensions"))
    return environ


def config_paths(conf_files, conf_dir=None):
    """Config paths with `conf_dir` prefixed to relative ones."""
    if not conf_dir:
        return list(conf_files)
    return [p if os.path.isabs(p) else os.path.join(conf_dir, p) for p in conf_files]


def cli_overrides(cli) -> dict:
    overrides = {key: getattr(cli, key) for key in _LAUNCH_OPTIONS if getattr(cli, key) is not None}
    overrides["user_script"] = os.path.abspath(cli.user_script)
    return overrides


def default_resolved_path(args) -> str:
    stem = os.path.splitext(os.path.basename(args.config_paths[-1]))[0] if args.config_paths else "config"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yml"
    return os.path.join(REPO_ROOT, "runs", "resolved", name)


DEFAULT_MULTI_NODE_PORT = 29500


def master_port(args) -> int:
    from megatron.net_ports import free_local_port

    if args.master_port is not None:
        return args.master_port
    return DEFAULT_MULTI_NODE_PORT if args.hostfile else free_local_port()


def build_runner_argv(args, resolved_path: str, has_cuda: bool) -> list:
    """argv for `deepspeed.launcher.runner.main`, from the resolved arguments."""
    argv = []
    if args.hostfile:
        argv += ["--hostfile", os.path.abspath(args.hostfile)]
    if args.include:
        argv += ["--include", args.include]
    if args.exclude:
        argv += ["--exclude", args.exclude]
    if args.num_nodes not in (None, -1):
        argv += ["--num_nodes", str(args.num_nodes)]
    if args.num_gpus is not None:
        argv += ["--num_gpus", str(args.num_gpus)]
    elif not has_cuda and not args.hostfile and not args.include and not args.exclude:
        # Without a GPU DeepSpeed would count NUMA nodes; say exactly how many CPU processes we validated for.
        argv += ["--num_gpus", str(args.global_num_gpus)]
    argv += ["--master_port", str(master_port(args))]
    if args.master_addr:
        argv += ["--master_addr", args.master_addr]
    argv += ["--launcher", args.launcher]
    if args.ssh_port is not None:
        argv += ["--ssh_port", str(args.ssh_port)]
    if args.launcher == "slurm":
        # Stock DeepSpeed's runner has no --comment/--account (GPT-NeoX's DeeperSpeed does, and puts them on
        # srun after the launcher arguments); as launcher arguments they land in the same place.
        srun = [w for key in ("comment", "account") if getattr(args, key) is not None
                for w in (f"--{key}", getattr(args, key))]
        if srun:
            argv += ["--launcher_args", shlex.join(srun)]
    if args.force_multi:
        argv.append("--force_multi")
    if args.no_ssh_check or remote_hosts(args):
        # deepy.py's own check (every host, with the port and pdsh's ssh options) replaces DeepSpeed's
        # first-host check, which predates ssh options.
        argv.append("--no_ssh_check")
    argv += [args.user_script, "--neox_config_file", resolved_path]
    return argv


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# DeepSpeed's runner, run by the child that leads the run's process group. Its own session keeps the
# terminal's signals away from it, but then a SIGKILL of deepy.py (OOM killer, `kill -9 -PGID`) would no
# longer reach the run: the kernel tells the child of its parent's death (PR_SET_PDEATHSIG), and the child
# kills its process group (runner, launcher, ranks, data workers), as a shared process group did before.
RUNNER_CHILD = """
import ctypes, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: os.killpg(0, signal.SIGKILL))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))  # 1: PR_SET_PDEATHSIG (Linux)
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):  # deepy.py died before prctl
    os.killpg(0, signal.SIGKILL)
sys.argv = ["deepspeed"] + sys.argv[2:]
from deepspeed.launcher.runner import main
main()
"""


class RunSupervisor:
    """Runs DeepSpeed's runner as a child in a session of its own and turns signals to deepy.py into stops.

    In its own session the runner, DeepSpeed's launcher and the ranks are out of reach of a terminal's
    Ctrl-C and of `kill -TERM -<deepy's pgid>`: only deepy.py is signalled, and it never signals the runner
    or the launcher. That matters: DeepSpeed's launcher SIGTERMs the ranks on top of the user's signal and
    exits 1, and its multi-node pdsh runner answers a signal with `pkill -f` of every DeepSpeed launch of
    the same command line on every host, other users' runs included.

    The first SIGINT / SIGTERM / SIGHUP (and repeats within GRACE_SECONDS) asks for a checkpoint at the
    next step boundary: a stop-request file appears beside the resolved config
    (megatron.utils.stop_request_path), which the ranks of every host poll at step boundaries, and the
    local ranks that already handle the signal get it too. A repeat after the window forces: SIGKILL to the child's process group and,
    for pdsh hosts, `pkill -KILL` of the processes that carry this launch's resolved-config path.
    """

    GRACE_SECONDS = 5.0

    def __init__(self, argv, remote_hosts=(), launcher="pdsh", environ=None, ssh_port=None):
        from megatron.utils import stop_request_path

        self.environ = dict(os.environ if environ is None else environ)
        self.ssh_port = ssh_port
        self.argv = list(argv)
        self.resolved = self.argv[self.argv.index("--neox_config_file") + 1]
        self.stop_file = stop_request_path(self.resolved)
        self.remote_hosts, self.launcher = list(remote_hosts), launcher
        self.child = None
        self.first_at = None
        self.forced = None

    def run(self) -> int:
        if os.path.exists(self.stop_file):  # left by an earlier launch with the same --resolved_config
            os.remove(self.stop_file)
        handled = list(STOP_SIGNALS)
        # Under nohup SIGHUP is ignored and must stay so; otherwise a closed terminal would orphan the run.
        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            handled.append(signal.SIGHUP)
        previous = {s: signal.signal(s, self._handle) for s in handled}
        try:
            self.child = subprocess.Popen([sys.executable, "-u", "-c", RUNNER_CHILD, str(os.getpid()), *self.argv],
                                          start_new_session=True, env=self.environ)
            print(f"deepy.py: runner started (pid {self.child.pid}); Ctrl-C or SIGTERM to deepy.py saves a "
                  "checkpoint at the next step and stops", flush=True)
            code = self.child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if os.path.exists(self.stop_file):
                os.remove(self.stop_file)
        if self.forced is not None:
            return 128 + self.forced
        return 128 - code if code < 0 else code

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            print(f"deepy.py: {name}: asking the ranks to save a checkpoint at the next step boundary and stop "
                  f"(a repeat within {self.GRACE_SECONDS:.0f} s is the same request; a later one forces an exit)",
                  file=sys.stderr, flush=True)
            forwarded = signal.SIGTERM if signum == signal.SIGHUP else signum
            self._write_stop_file(signal.Signals(forwarded).name)
            for proc in self.local_ranks():
                # A rank still starting up would die of the signal: it learns of the request from the file.
                if catches(proc.pid, forwarded):
                    try:
                        proc.send_signal(forwarded)
                    except Exception:  # psutil.NoSuchProcess: it ended meanwhile
                        pass
            timer = threading.Timer(self.GRACE_SECONDS, self._window_closed)
            timer.daemon = True  # must not keep deepy.py alive once the run has ended
            timer.start()
        elif now - self.first_at > self.GRACE_SECONDS and self.forced is None:
            self.forced = signum
            print(f"deepy.py: {name} again: killing the run now, nothing more is saved", file=sys.stderr, flush=True)
            self._kill()

    def _window_closed(self) -> None:
        if self.child is not None and self.child.poll() is None:
            print("deepy.py: still stopping; a further SIGINT/SIGTERM now kills the run", file=sys.stderr, flush=True)

    def _write_stop_file(self, content: str) -> None:
        tmp = f"{self.stop_file}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content + "\n")
        os.replace(tmp, self.stop_file)

    def local_ranks(self) -> list:
        """The child's descendants that are ranks of this launch (not their forked data-loader workers)."""
        import psutil

        def is_rank(proc) -> bool:
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                return False
            return self.resolved in cmd and any(a.startswith("--local_rank=") for a in cmd)

        if self.child is None:
            return []
        try:
            descendants = psutil.Process(self.child.pid).children(recursive=True)
        except psutil.Error:
            return []
        ranks = []
        for proc in descendants:
            try:
                parent = proc.parent()
            except psutil.Error:
                continue
            if is_rank(proc) and not (parent is not None and is_rank(parent)):
                ranks.append(proc)
        return ranks

    def _kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.remote_hosts and self.launcher == "pdsh":
            # Matches only processes started with this launch's resolved config (ranks, their launcher),
            # unlike DeepSpeed's own kill command.
            from megatron.host_checks import pdsh_environment

            pattern = shlex.quote(re.escape(f"--neox_config_file {self.resolved}"))
            subprocess.run(["pdsh", "-S", "-w", ",".join(self.remote_hosts), "pkill", "-KILL", "-f", "--", pattern],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False,
                           env=pdsh_environment(self.ssh_port, self.environ))


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: the SigCgt mask of /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def remote_hosts(args) -> list:
    """Hosts the multi-node backend starts ranks on (none for a local launch)."""
    hosts = list(args._resources)
    return hosts if args.hostfile and (len(hosts) > 1 or args.force_multi) else []


def _deepspeed_runner(argv, hosts=(), launcher="pdsh", environ=None, ssh_port=None):
    return RunSupervisor(argv, hosts, launcher, environ=environ, ssh_port=ssh_port).run()


def check_hosts_before_launch(args, environ, log=print, popen=None) -> None:
    """Every host of a multi-node launch answers ssh and sees the data as this host does."""
    from megatron import host_checks
    from megatron.data.indexed_dataset import index_file_path
    from megatron.neox_arguments.preflight import data_prefixes

    if args.no_ssh_check or args.launcher == "slurm":  # srun starts Slurm ranks; ssh may be closed there
        return
    hosts = remote_hosts(args)
    idx = list(dict.fromkeys(os.path.abspath(index_file_path(p)) for _, p in data_prefixes(args)))
    host_checks.check_hosts(hosts, idx, args.use_shared_fs, args.ssh_port, environ, popen=popen or subprocess.Popen)
    log(f"ssh check: {len(hosts)} host(s) answer ({', '.join(hosts)})"
        + (f"; each sees the {len(idx)} .idx file(s) as this host does" if idx else ""))


def write_ranks_env_file(args, resolved_path, environ, log=print) -> str:
    """The environment file DeepSpeed's multi-node runner exports to every rank (DS_ENV_FILE); its path."""
    from megatron import launch_env_file

    ours = launch_env_file.launch_entries(environ, REPO_ROOT, os.getcwd(), args.master_addr, args.master_port)
    user_files = launch_env_file.user_env_files(environ, os.getcwd(), os.path.expanduser("~"))
    entries, source = launch_env_file.merged_entries(user_files, ours)
    path = launch_env_file.write_env_file(launch_env_file.env_file_path(resolved_path), entries)
    mine = [k for k in entries if source[k] == "deepy.py"]
    theirs = sorted(set(source.values()) - {"deepy.py"})
    log(f"ranks' environment file {path}: {', '.join(mine)} from deepy.py"
        + (f"; {', '.join(k for k in entries if k not in mine)} from {', '.join(theirs)}" if theirs else ""))
    return path


def default_master_addr(args, environ, popen=None) -> str:
    """master_addr of a multi-node launch: the first selected host, as ssh resolves its name."""
    from megatron.host_checks import ssh_hostname

    return ssh_hostname(remote_hosts(args)[0], args.ssh_port, environ, popen=popen or subprocess.Popen)


def main(argv=None, runner=None, env=None, host_resolver=None, ssh=None) -> int:
    """Validate, write the resolved config, launch. `runner`, `env`, `host_resolver` and `ssh` (a Popen
    stand-in for the ssh commands of the host checks) are for tests."""
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    prepare_environment()
    # Make `megatron` importable when deepy.py is run from another directory.
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from megatron.neox_arguments import ConfigError, NeoXArgs, detect_environment
    from megatron.neox_arguments.environment import RANK_VARIABLES

    env = env or detect_environment()
    # deepy.py is the launcher, not a rank: a WORLD_SIZE inherited from an outer job must not decide the
    # world size; the selected resources do.
    env.environ = {k: v for k, v in env.environ.items() if k not in RANK_VARIABLES}
    try:
        if not os.path.isfile(cli.user_script):
            raise ConfigError(f"script not found: {cli.user_script}")
        args = NeoXArgs.from_ymls(config_paths(cli.conf_files, cli.conf_dir), overrides=cli_overrides(cli),
                                  env=env, host_resolver=host_resolver)
        from megatron.neox_arguments.preflight import check_before_launch  # DeepSpeed's parser, data files
        check_before_launch(args)
        from megatron.checkpoint_layout import check_resume_before_launch  # damaged checkpoint, other layout
        check_resume_before_launch(args)
    except ConfigError as err:
        print(f"deepy.py: configuration error: {err}", file=sys.stderr)
        return 2
    from megatron.neox_arguments.compat import launch_notes

    for note in launch_notes(args):
        print(f"deepy.py: {note}", file=sys.stderr)
    if args.user_script.endswith("train.py"):
        from megatron.neox_arguments.derive import describe_attention

        print(f"deepy.py: {describe_attention(args)}", flush=True)
    multi_node = bool(remote_hosts(args))
    log = lambda line: print(f"deepy.py: {line}", flush=True)  # noqa: E731
    env_file = None
    try:
        if multi_node:
            check_hosts_before_launch(args, os.environ, log=log, popen=ssh)
            # Settled here, before the resolved config is written, so that the ranks and the record agree.
            args.master_port = master_port(args)
            if args.master_addr is None:
                args.master_addr = default_master_addr(args, os.environ, popen=ssh)
        resolved = args.save_resolved(cli.resolved_config or default_resolved_path(args))
        if multi_node:
            env_file = write_ranks_env_file(args, resolved, os.environ, log=log)
    except ConfigError as err:
        print(f"deepy.py: configuration error: {err}", file=sys.stderr)
        return 2
    runner_argv = build_runner_argv(args, resolved, env.has_cuda)
    print(f"deepy.py: {args.global_num_gpus} rank(s) (data parallel {args.data_parallel_size}, pipeline "
          f"{args.pipe_parallel_size}), resolved config {resolved}", flush=True)
    print("deepy.py: deepspeed " + " ".join(runner_argv), flush=True)
    if cli.dry_run:
        return 0
    from megatron.jit_ops import build_jit_ops

    build_jit_ops(log=log)
    child_env = dict(os.environ)
    if env_file:
        child_env["DS_ENV_FILE"] = env_file
    try:
        # Only the real runner is supervised in a child process; a test's `runner` is called in-process.
        result = runner(runner_argv) if runner else _deepspeed_runner(
            runner_argv, remote_hosts(args), args.launcher, environ=child_env, ssh_port=args.ssh_port)
    finally:
        if env_file and os.path.exists(env_file):
            os.remove(env_file)  # it may hold WANDB_API_KEY; the runner has read it
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
