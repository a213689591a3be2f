"""Free TCP ports for test and benchmark clusters."""

import socket

_handed_out: set[int] = set()


def free_port(ip: str = "127.0.0.1") -> int:
    """A port free on `ip` now, never one this process handed out before (the kernel may give
    the same ephemeral port twice in a row once the probing socket is closed)."""
    while True:
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
