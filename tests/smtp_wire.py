"""What the sink's wire-level tests share: a socket client and a view of lost connections.

Imported by tests/test_sink_fastpath.py and tests/test_sink_inline_adversarial.py (``from
tests.smtp_wire import ...``); the ``lost_connections`` fixture is used by importing it.
"""

from __future__ import annotations

import queue
import socket

import pytest

from mailproof.capture import smtp_sink


class WireClient:
    """A real socket to a started sink: bytes sent exactly as given, replies read whole."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """One whole reply (all its lines); b"" once the server has closed."""
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if not line or line[3:4] != b"-":
                return b"".join(lines)

    def greet(self) -> bytes:
        """Read the greeting, send EHLO; its reply."""
        assert self.reply().startswith(b"220")
        self.sock.sendall(b"EHLO x.test\r\n")
        return self.reply()

    def envelope(self, rcpt: bytes = b"c@d.test") -> None:
        """Greeting, EHLO, then MAIL, RCPT and DATA each in a packet of its own (answered inline)."""
        assert self.greet().endswith(b"250 HELP\r\n")
        for line, code in ((b"MAIL FROM:<a@b.test>", b"250"), (b"RCPT TO:<" + rcpt + b">", b"250"), (b"DATA", b"354")):
            self.sock.sendall(line + b"\r\n")
            assert self.reply().startswith(code)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def lost_connections(monkeypatch) -> "queue.Queue":
    """A queue of each sink connection's protocol object once its connection_lost has run."""
    lost: "queue.Queue" = queue.Queue()
    connection_lost = smtp_sink._SinkSMTP.connection_lost

    def note(self, error) -> None:
        connection_lost(self, error)
        lost.put(self)

    monkeypatch.setattr(smtp_sink._SinkSMTP, "connection_lost", note)
    return lost
