"""Pre-launch checks of the hosts of a multi-node run, over the same ssh the launcher will use.

Before any rank starts, deepy.py runs one `ssh HOST stat ...` per selected host, all at once:

- a host that does not answer (ssh exit 255: unreachable, refused, no passwordless key) is named with
  ssh's own last line;
- each host reports the size and mtime of every dataset's `.idx`. With `use_shared_fs: true` the index
  caches are built once, by global rank 0, so every host must see the very same files (same size and
  mtime as the launch host); with `use_shared_fs: false` each node has its own copy, which must at least
  exist with the same size.

ssh gets the options pdsh will get (`PDSH_SSH_ARGS_APPEND`, `-p ssh_port`) plus BatchMode (never prompt)
and a connect timeout, so a check that passes means pdsh's connection will too.
"""
import os
import re
import shlex
import subprocess

from megatron.neox_arguments.errors import ConfigError

CONNECT_TIMEOUT_S = 10
_STAT_LINE = re.compile(r"^(\d+) (\d+) (.+)$")


def ssh_options(ssh_port, environ) -> list:
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
    opts += shlex.split(environ.get("PDSH_SSH_ARGS_APPEND", ""))
    if ssh_port is not None:
        opts += ["-p", str(ssh_port)]
    return opts


def pdsh_environment(ssh_port, environ) -> dict:
    """What pdsh needs to reach the hosts as DeepSpeed's runner starts it (ssh, with the port)."""
    env = dict(environ, PDSH_RCMD_TYPE="ssh")
    if ssh_port is not None:
        env["PDSH_SSH_ARGS_APPEND"] = f"{environ.get('PDSH_SSH_ARGS_APPEND', '')} -p {ssh_port}".strip()
    return env


def ssh_hostname(host: str, ssh_port, environ, popen=subprocess.Popen) -> str:
    """The address ssh connects to for `host`: its config's HostName (an alias such as `node1` -> 10.0.0.7),
    else the name itself. `ssh -G` only evaluates the configuration; it opens no connection."""
    try:
        proc = popen(["ssh", "-G", *ssh_options(ssh_port, environ), host], stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(environ))
        out, _ = proc.communicate(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return host
    if proc.returncode == 0:
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key.lower() == "hostname" and value.strip():
                return value.strip()
    return host


def stat_command(paths) -> str:
    """Remote shell command printing `SIZE MTIME PATH` per existing file; missing ones print nothing on stdout."""
    if not paths:
        return "true"
    return "stat -L -c '%s %Y %n' -- " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null; exit 0"


def parse_stat(output: str) -> dict:
    out = {}
    for line in output.splitlines():
        m = _STAT_LINE.match(line.strip())
        if m:
            out[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    return out


def probe_hosts(hosts, paths, ssh_port, environ, popen=subprocess.Popen, timeout=60) -> dict:
    """host -> (error line or None, {path: (size, mtime)}), every host at once."""
    command = stat_command(paths)
    procs = {host: popen(["ssh", *ssh_options(ssh_port, environ), host, command], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(environ))
             for host in hosts}
    results = {}
    for host, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results[host] = (f"no answer within {timeout} s", {})
            continue
        if proc.returncode != 0:
            last = (err or "").strip().splitlines()
            results[host] = ((last[-1] if last else f"ssh exit {proc.returncode}"), {})
        else:
            results[host] = (None, parse_stat(out))
    return results


def local_stats(paths) -> dict:
    out = {}
    for p in paths:
        st = os.stat(p)
        out[p] = (st.st_size, int(st.st_mtime))
    return out


def data_mismatches(local: dict, remote: dict, shared_fs: bool) -> list:
    """One phrase per file a host sees differently from the launch host."""
    problems = []
    for path, (size, mtime) in local.items():
        if path not in remote:
            problems.append(f"{path} is missing")
        elif remote[path][0] != size or (shared_fs and remote[path][1] != mtime):
            r_size, r_mtime = remote[path]
            problems.append(f"{path} has size {r_size} mtime {r_mtime} (launch host: size {size} mtime {mtime})")
    return problems


def check_hosts(hosts, idx_paths, shared_fs: bool, ssh_port, environ, popen=subprocess.Popen):
    """Raise ConfigError naming every host that does not answer, then every host whose view of the data differs."""
    local = local_stats(idx_paths)
    results = probe_hosts(hosts, list(local), ssh_port, environ, popen=popen)
    silent = {h: err for h, (err, _) in results.items() if err is not None}
    if silent:
        port = f" -p {ssh_port}" if ssh_port is not None else ""
        raise ConfigError("host(s) not answering ssh: " + "; ".join(f"'{h}': {e}" for h, e in silent.items())
                          + f" (checked with `ssh -o BatchMode=yes{port} HOST`; passwordless ssh to every hostfile "
                          f"host is needed, see docs/multinode.md; no_ssh_check: true skips this check)")
    wrong = {h: data_mismatches(local, stats, shared_fs) for h, (_, stats) in results.items()}
    wrong = {h: p for h, p in wrong.items() if p}
    if wrong:
        why = ("use_shared_fs: true (index caches are built once, by global rank 0, for every host), so every host "
               "must see the launch host's files" if shared_fs else
               "use_shared_fs: false, so every host needs its own copy of each dataset")
        raise ConfigError(f"{why}: " + "; ".join(f"host '{h}': " + ", ".join(p) for h, p in wrong.items()))
