"""Free TCP ports for replicas on the host network."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now. The kernel may hand it out again before the replica
    binds it; the window is short, and a replica that loses the race exits and is restarted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
