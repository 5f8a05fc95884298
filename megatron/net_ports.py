"""The one helper that picks a free local TCP port (launcher, single-process start-up, tests)."""
import socket


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (the OS picks it). Another process may take it before
    the caller binds it; callers that can retry do so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
