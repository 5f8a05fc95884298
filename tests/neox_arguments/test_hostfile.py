"""Hostfile parsing and resource selection, including errors that must stop deepy.py before launch."""
import pytest

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.hostfile import host_is_known, parse_hostfile, select_resources

from .helpers import cpu, small, write

HOSTS = """
    # two nodes
    worker-0 slots=4
    worker-1 slots=2   # trailing comment

    """


def test_parse_hostfile(tmp_path):
    pool = parse_hostfile(write(tmp_path / "hostfile", HOSTS))
    assert list(pool.items()) == [("worker-0", 4), ("worker-1", 2)]


@pytest.mark.parametrize("text,match", [
    ("worker-0 slots=4\nworker-0 slots=2\n", r"hostfile:2: host 'worker-0' is listed twice"),
    ("worker-0 gpus=4\n", r"hostfile:1: bad hostfile line 'worker-0 gpus=4'"),
    ("worker-0 slots=0\n", r"hostfile:1: host 'worker-0' has slots=0"),
    ("# nothing\n", r"lists no hosts"),
])
def test_bad_hostfiles(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_hostfile(write(tmp_path / "hostfile", text))


def test_select_resources():
    pool = {"a": 4, "b": 2}
    assert select_resources(pool) == {"a": [0, 1, 2, 3], "b": [0, 1]}
    assert select_resources(pool, include="a:0,2@b") == {"a": [0, 2], "b": [0, 1]}
    assert select_resources(pool, exclude="a:1") == {"a": [0, 2, 3], "b": [0, 1]}
    assert select_resources(pool, exclude="b") == {"a": [0, 1, 2, 3]}
    assert select_resources(pool, num_nodes=1) == {"a": [0, 1, 2, 3]}
    assert select_resources(pool, num_gpus=1) == {"a": [0], "b": [0]}


@pytest.mark.parametrize("kwargs,match", [
    ({"include": "c"}, r"'include' names host 'c', which is not in the hostfile \(hosts: a, b\)"),
    ({"exclude": "c:0"}, r"'exclude' names host 'c'"),
    ({"include": "b:5"}, r"'include' names slot\(s\) \[5\] of host 'b', which has 2 slot"),
    ({"include": "a", "exclude": "b"}, "mutually exclusive"),
    ({"include": "a", "num_gpus": 1}, "cannot be combined"),
    ({"num_nodes": 3}, r"'num_nodes' is 3 but the hostfile has 2 host"),
    ({"include": "a:x"}, "must be integers"),
])
def test_select_resources_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select_resources({"a": 4, "b": 2}, **kwargs)


def test_hostfile_sets_world_size_and_checks_hosts(tmp_path):
    hostfile = write(tmp_path / "hostfile", HOSTS)
    known = {"worker-0", "worker-1"}
    args = NeoXArgs.from_dict(small(hostfile=hostfile), env=cpu(), host_resolver=known.__contains__)
    assert args.global_num_gpus == 6 and args.data_parallel_size == 6
    args = NeoXArgs.from_dict(small(hostfile=hostfile, include="worker-1"), env=cpu(), host_resolver=known.__contains__)
    assert args.global_num_gpus == 2
    with pytest.raises(ConfigError, match=r"names unknown host\(s\) \['worker-1'\]"):
        NeoXArgs.from_dict(small(hostfile=hostfile), env=cpu(), host_resolver={"worker-0"}.__contains__)
    # Hosts left out by --include are not checked.
    NeoXArgs.from_dict(small(hostfile=hostfile, include="worker-0"), env=cpu(), host_resolver={"worker-0"}.__contains__)
    # The check can be switched off for clusters whose names resolve only on the nodes.
    NeoXArgs.from_dict(small(hostfile=hostfile, check_hostfile_hosts=False), env=cpu(), host_resolver=lambda h: False)
    with pytest.raises(ConfigError, match="hostfile not found"):
        NeoXArgs.from_dict(small(hostfile=str(tmp_path / "nope")), env=cpu())


def test_fp16_with_hostfile_not_judged_by_launch_node(tmp_path):
    hostfile = write(tmp_path / "hostfile", "gpu-node slots=8\n")
    args = NeoXArgs.from_dict(small(hostfile=hostfile, fp16={"enabled": True}), env=cpu(),
                              host_resolver=lambda h: True)
    assert args.precision == "fp16" and args.global_num_gpus == 8


def test_host_is_known(tmp_path, monkeypatch):
    import socket

    real = socket.getaddrinfo

    def offline_resolver(host, *args, **kwargs):
        # Keep the test independent of the machine's DNS: only localhost resolves.
        if host != "localhost":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", offline_resolver)
    assert host_is_known("localhost")
    ssh_config = write(tmp_path / "ssh_config", "Host gpu-*\n  User me\n")
    assert host_is_known("gpu-7.invalid", ssh_config=ssh_config)
    assert not host_is_known("no-such-host.invalid", ssh_config=ssh_config)
