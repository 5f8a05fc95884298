"""Hostfile parsing and resource selection, checked before any rank starts.

The format and the `--include/--exclude` syntax are DeepSpeed's (`host slots=N` lines;
`NODE_SPEC[@NODE_SPEC ...]` with `NODE_SPEC = host[:slot[,slot ...]]`). We parse them ourselves so
that a mistake (an unknown host in `include`, a slot a host does not have, a malformed line) stops
in deepy.py with the file, line or host in the message, instead of failing later inside the runner
or, worse, on a remote node.
"""
import collections
import fnmatch
import os
import re
import socket

from .errors import ConfigError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def parse_hostfile(path: str) -> "collections.OrderedDict[str, int]":
    """Read `host slots=N` lines (comments with #, blank lines ignored) into host -> slots."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile not found: {path} (key 'hostfile')")
    pool = collections.OrderedDict()
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _LINE.match(line)
            if m is None:
                raise ConfigError(f"{path}:{lineno}: bad hostfile line {raw.strip()!r}; expected 'host slots=N'")
            host, slots = m.group(1), int(m.group(2))
            if host in pool:
                raise ConfigError(f"{path}:{lineno}: host '{host}' is listed twice")
            if slots < 1:
                raise ConfigError(f"{path}:{lineno}: host '{host}' has slots={slots}; need at least 1")
            pool[host] = slots
    if not pool:
        raise ConfigError(f"hostfile {path} lists no hosts")
    return pool


def _parse_spec(spec: str, key: str) -> "collections.OrderedDict[str, list]":
    """`a@b:0,2` -> {a: [], b: [0, 2]} ([] = every slot of that host)."""
    out = collections.OrderedDict()
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise ConfigError(f"key '{key}' has an empty node spec in {spec!r}")
        host, _, slots = part.partition(":")
        chosen = out.setdefault(host, [])
        if slots:
            try:
                chosen.extend(int(s) for s in slots.split(","))
            except ValueError:
                raise ConfigError(f"key '{key}': slots of host '{host}' must be integers, got {slots!r}") from None
    return out


def select_resources(pool, include=None, exclude=None, num_nodes=-1, num_gpus=None, source="hostfile"):
    """Apply include / exclude / num_nodes / num_gpus to `pool` (host -> slot count) like DeepSpeed.

    Returns host -> sorted list of slot ids. Hosts or slots the pool lacks are errors naming them.
    """
    if include and exclude:
        raise ConfigError(f"keys 'include' ({include!r}) and 'exclude' ({exclude!r}) are mutually exclusive")
    if (include or exclude) and (num_nodes not in (None, -1) or num_gpus is not None):
        raise ConfigError("keys 'num_nodes'/'num_gpus' cannot be combined with 'include'/'exclude' "
                          f"(num_nodes={num_nodes}, num_gpus={num_gpus}, include={include!r}, exclude={exclude!r})")
    active = collections.OrderedDict((h, list(range(n))) for h, n in pool.items())
    for key, spec in (("include", include), ("exclude", exclude)):
        if not spec:
            continue
        for host, slots in _parse_spec(spec, key).items():
            if host not in pool:
                raise ConfigError(f"key '{key}' names host '{host}', which is not in the {source} "
                                  f"(hosts: {', '.join(pool)})")
            bad = [s for s in slots if not 0 <= s < pool[host]]
            if bad:
                raise ConfigError(f"key '{key}' names slot(s) {bad} of host '{host}', which has {pool[host]} slot(s)")
        spec_map = _parse_spec(spec, key)
        if key == "include":
            active = collections.OrderedDict(
                (h, sorted(set(s)) if s else list(range(pool[h]))) for h, s in spec_map.items())
        else:
            for host, slots in spec_map.items():
                remaining = [s for s in active[host] if slots and s not in slots]
                if remaining:
                    active[host] = remaining
                else:
                    del active[host]
    if num_nodes not in (None, -1):
        if num_nodes < 1 or num_nodes > len(active):
            raise ConfigError(f"key 'num_nodes' is {num_nodes} but the {source} has {len(active)} host(s)")
        active = collections.OrderedDict(list(active.items())[:num_nodes])
    if num_gpus is not None:
        if num_gpus < 1:
            raise ConfigError(f"key 'num_gpus' must be >= 1, got {num_gpus}")
        short = {h: pool[h] for h in active if pool[h] < num_gpus}
        if short:
            # DeepSpeed would start num_gpus ranks on each host regardless of its slot count.
            raise ConfigError(f"key 'num_gpus' asks for {num_gpus} process(es) per host but the {source} gives "
                              + ", ".join(f"host '{h}' slots={n}" for h, n in short.items()))
        active = collections.OrderedDict((h, list(range(num_gpus))) for h in active)
    if not active:
        raise ConfigError(f"no resources left after include={include!r} exclude={exclude!r}")
    return active


def _ssh_config_patterns(path=None) -> list:
    path = path or os.path.expanduser("~/.ssh/config")
    patterns = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if len(words) >= 2 and words[0].lower() == "host":
                    patterns.extend(w for w in words[1:] if not w.startswith("!"))
    return patterns


def ssh_config_file(environ) -> str:
    """The ssh client config pdsh's ssh will read: a `-F FILE` in PDSH_SSH_ARGS_APPEND, else ~/.ssh/config."""
    import shlex

    words = shlex.split(environ.get("PDSH_SSH_ARGS_APPEND", ""))
    for i, word in enumerate(words):
        if word == "-F" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("-F") and len(word) > 2:
            return word[2:]
    return os.path.expanduser("~/.ssh/config")


def host_is_known(host: str, ssh_config=None) -> bool:
    """True if `host` resolves (DNS or /etc/hosts) or matches a Host pattern of the ssh config."""
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError, OSError):
        pass
    return any(fnmatch.fnmatch(host, p) for p in _ssh_config_patterns(ssh_config))


def check_hosts_known(hosts, hostfile: str, resolver=host_is_known, ssh_config="~/.ssh/config"):
    """Raise ConfigError listing every host of `hosts` that `resolver` does not know."""
    unknown = [h for h in hosts if not resolver(h)]
    if unknown:
        raise ConfigError(f"hostfile {hostfile} names unknown host(s) {unknown}: they neither resolve nor match "
                          f"a Host entry of {ssh_config} (set check_hostfile_hosts: false to skip this check)")
