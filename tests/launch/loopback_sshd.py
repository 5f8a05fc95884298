"""Two loopback "hosts" behind a throwaway sshd, for the real multi-node launch test.

Everything lives in one temporary folder: host and client keys, authorized_keys (sshd's AuthorizedKeysFile
points there), the sshd and ssh configs, known_hosts. Nothing of the system's ssh configuration is read or
written; the sshd is stopped by its PID. The one path outside the folder is sshd's compiled-in
privilege-separation directory /run/sshd, created only if it is missing and removed again afterwards.
"""
import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
NODES = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
LISTEN = ("127.0.0.1", *NODES.values())
PRIVSEP_DIR = Path("/run/sshd")


def missing_tools() -> list:
    """What this machine lacks to host the loopback nodes (empty: it can)."""
    missing = [t for t in ("ssh", "ssh-keygen", "pdsh") if shutil.which(t) is None]
    if not os.path.exists(SSHD):
        missing.append(SSHD)
    if os.geteuid() != 0:
        missing.append("root (sshd must switch users)")
    return missing


def free_port_on_all(addresses) -> int:
    """A TCP port no address of `addresses` listens on."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for addr in addresses[1:]:
                with socket.socket() as s:
                    s.bind((addr, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no TCP port free on all of " + ", ".join(addresses))


def _wait_for_port(addr: str, port: int, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((addr, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on {addr}:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def loopback_nodes(folder: Path):
    """Yields (ssh_config path, port). sshd listens on 127.0.0.1-3; `node1`/`node2` are ssh-config aliases of
    127.0.0.2 / 127.0.0.3 (no Port there: the test passes the port through the ssh_port key)."""
    folder.mkdir(parents=True, exist_ok=True)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(f"{client_key}.pub", folder / "authorized_keys")
    port = free_port_on_all(LISTEN)
    sshd_config = folder / "sshd_config"
    sshd_config.write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {a}" for a in LISTEN),
        f"HostKey {host_key}", f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
        "StrictModes no",  # the keys live under /tmp, whose permissions sshd's strict mode refuses
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "LogLevel ERROR", ""]))
    ssh_config = folder / "ssh_config"
    ssh_config.write_text("".join(f"Host {n}\n  HostName {a}\n" for n, a in NODES.items()) + "\n".join([
        f"Host {' '.join(NODES)}", f"  User {getpass.getuser()}", f"  IdentityFile {client_key}",
        "  IdentitiesOnly yes", "  StrictHostKeyChecking no", f"  UserKnownHostsFile {folder / 'known_hosts'}",
        "  LogLevel ERROR", ""]))
    made_privsep = not PRIVSEP_DIR.exists()
    if made_privsep:
        PRIVSEP_DIR.mkdir(mode=0o755)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd_config)], stdout=subprocess.DEVNULL,
                            stderr=open(folder / "sshd.log", "w"))
    try:
        _wait_for_port(LISTEN[1], port, proc)
        yield ssh_config, port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)  # sshd's own PID; its per-connection children end with their sessions
            proc.wait(timeout=10)
        if made_privsep:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
