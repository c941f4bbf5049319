"""Shared helpers for the harness's own tests (not fixtures of the product flows).

Test modules reach these through fixtures (``make_raw``, ``signalling_store``), never by
importing this file: without packages, "conftest" is not a stable module name (the root
conftest.py has it too).
"""

from __future__ import annotations

import threading
import time

import pytest
from email.message import EmailMessage
from typing import Optional

from mailproof.mailbox import MailStore
from mailproof.message import Message

pytest_plugins = ["pytester"]


def make_raw(to: str, subject: str = "Hello", body: str = "Hi there.\n", *,
             sender: str = "app@example.test", html: Optional[str] = None) -> bytes:
    """A small, well-formed RFC 5322 message as bytes (CRLF line endings, as on the wire)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def make_message(to: str, subject: str = "Hello", body: str = "Hi there.\n", *,
                 received_at: Optional[float] = None, **kwargs) -> Message:
    return Message(make_raw(to, subject, body, **kwargs), mail_from="app@example.test",
                   rcpt_tos=[to], received_at=time.time() if received_at is None else received_at)


class SignallingStore(MailStore):
    """A real MailStore that also tells the test when a waiter has registered.

    ``waiters_added`` is released once per registered waiter, so a test can deliver *after*
    a wait is really blocked (testing the wake path, not the already-captured path) without
    sleeping or polling.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiters_added = threading.Semaphore(0)

    def _add_waiter(self, waiter) -> None:
        super()._add_waiter(waiter)
        self.waiters_added.release()

    def await_waiters(self, n: int = 1, timeout: float = 10.0) -> None:
        for _ in range(n):
            if not self.waiters_added.acquire(timeout=timeout):
                raise AssertionError(f"no waiter registered within {timeout} s")


@pytest.fixture(name="make_raw")
def make_raw_fixture():
    """``make_raw(to, subject="Hello", body=..., sender=..., html=None) -> bytes``."""
    return make_raw


@pytest.fixture(name="make_message")
def make_message_fixture():
    """``make_message(to, subject, body, received_at=None) -> Message`` (envelope set)."""
    return make_message


@pytest.fixture
def signalling_store() -> SignallingStore:
    return SignallingStore()


class WebhookReceiver:
    """A loopback HTTP endpoint standing for an application's webhook URL: it records each POST
    (headers, body) before it answers ``status``, so once the capture has its answer the request
    is in ``requests``."""

    def __init__(self) -> None:
        import http.server

        receiver = self
        self.requests: list[tuple[dict, bytes]] = []
        self.status = 200

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


# -- the provider capture (tests/test_providers_<provider>.py) --------------------------------------
# A module with a ``capture`` of its own (test_sink.py) overrides these.


@pytest.fixture(scope="module")
def capture():
    """One running ProviderCapture per test module (module scope: each module gets its own)."""
    from mailproof.providers import ProviderCapture

    with ProviderCapture(MailStore()) as running:
        yield running


@pytest.fixture
def store(capture):
    """The capture's store, emptied and its fault rules dropped before each test."""
    capture.store.clear()
    capture.faults.clear()
    return capture.store
