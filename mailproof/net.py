"""Loopback: where every server of mailproof binds unless told otherwise, and how to tell it apart."""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK = "127.0.0.1"
# Addresses a server reports when it listens on every interface: a client then uses the host
# it reached the server by.
UNSPECIFIED = frozenset({"", "0.0.0.0", "::", "[::]"})


def is_loopback(host: str) -> bool:
    """True for localhost and any 127.0.0.0/8 or ::1 address (brackets allowed)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS reports free right now, for a server that cannot be given port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
