"""RemoteSink: the sink service as a Mailbox backend, over one event stream per process.

Real service processes, real SMTP. Ordering without sleeps: a store that signals when a waiter
has registered lets a test send only after a wait really blocks.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
import threading
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailproof.faults import Script
from mailproof.servers.app_process import AppProcess
from mailproof.faults import FaultError, ScopedFaults
from mailproof.mailbox import Mailbox, MailStore
from mailproof.capture.remote import RemoteSink, SinkServiceError

ROOT = Path(__file__).resolve().parent.parent


def make_raw(to: str, subject: str = "Hello", body: str = "Hi there.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "app@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


class SignallingStore(MailStore):
    """A real MailStore that releases a semaphore each time a waiter registers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiters_added = threading.Semaphore(0)

    def _add_waiter(self, waiter) -> None:
        super()._add_waiter(waiter)
        self.waiters_added.release()

    def await_waiters(self, n: int = 1, timeout: float = 20.0) -> None:
        for _ in range(n):
            assert self.waiters_added.acquire(timeout=timeout), "a waiter did not register"


def send_all(sink: RemoteSink, mails: list[tuple[str, bytes]], connections: int = 1) -> None:
    """Send over ``connections`` parallel SMTP sessions; the first SMTP error is raised here."""
    errors: list[BaseException] = []

    def worker(chunk):
        try:
            with smtplib.SMTP(sink.smtp_host, sink.smtp_port, timeout=30) as smtp:
                for to, raw in chunk:
                    smtp.sendmail("app@example.test", [to], raw)
        except BaseException as exc:
            errors.append(exc)

    if connections == 1:
        worker(mails)
    else:
        threads = [threading.Thread(target=worker, args=(mails[i::connections],)) for i in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def service():
    """One sink service process for the module (its own RemoteSink is just the launcher)."""
    launched = RemoteSink.launch()
    yield launched
    process = launched.process
    launched.stop()
    assert process.stop() == 0


@pytest.fixture
def remote(service):
    with RemoteSink(service.url, store=SignallingStore()) as sink:
        yield sink


def test_backend_shape(remote, service):
    assert remote.name == "sink-service"
    assert (remote.smtp_host, remote.smtp_port) == ("127.0.0.1", service.smtp_port)
    assert isinstance(remote.store, MailStore)
    assert remote.running and remote.stream_connections == 1


def test_wait_for_wakes_on_arrival(remote):
    store = remote.store
    with Mailbox(store) as mailbox:
        to = mailbox.address("wake")
        result: dict = {}
        waiter = threading.Thread(target=lambda: result.update(
            msg=mailbox.wait_for(to, subject="Confirm", within=20)))
        mailbox.mark()
        waiter.start()
        store.await_waiters(1)  # the wait is blocked: this delivery has to wake it
        send_all(remote, [(to, make_raw(to, "Confirm your address", "Code 424242"))])
        waiter.join(timeout=30)
    msg = result["msg"]
    assert msg.subject == "Confirm your address" and msg.code() == "424242"
    assert msg.source == "sink-service" and msg.rcpt_tos == (to,)
    assert msg.raw == remote.raw(msg.extra["service_seq"])  # the bytes the service captured
    assert 0 <= msg.latency < 20


def test_200_waiters_on_200_addresses_over_one_stream():
    store = SignallingStore()
    with RemoteSink.launch(store=store) as sink, Mailbox(store) as mailbox:
        addresses = [mailbox.address(f"crowd{i}") for i in range(200)]
        results: dict[str, object] = {}

        def wait(to: str) -> None:
            try:
                results[to] = mailbox.wait_for(to, subject="Hello", within=30)
            except Exception as exc:  # reported by the assertion below
                results[to] = exc

        threads = [threading.Thread(target=wait, args=(to,)) for to in addresses]
        for t in threads:
            t.start()
        store.await_waiters(200)
        send_all(sink, [(to, make_raw(to, f"Hello {to}")) for to in addresses], connections=8)
        for t in threads:
            t.join(timeout=60)
        wrong = {to: r for to, r in results.items() if getattr(r, "rcpt_tos", None) != (to,)}
        assert not wrong and len(results) == 200
        stats = sink.stats()
        assert stats["streams"] == 1 and sink.stream_connections == 1  # one stream fed them all
        assert stats["waiters"] == 0  # and no HTTP long-poll was used
        assert sink.received == 200 and sink.duplicates == 0 and sink.missing == 0


def test_stream_reconnects_lose_nothing_and_duplicate_nothing(remote, service):
    store = remote.store
    with Mailbox(store) as mailbox:
        to = mailbox.address("reconnect")
        sent = 0

        def batch(n: int, connections: int = 1) -> None:
            nonlocal sent
            send_all(remote, [(to, make_raw(to, f"Mail {sent + i}")) for i in range(n)], connections)
            sent += n

        batch(10)
        mailbox.wait_for(to, count=10, within=20)

        assert service.drop_streams() >= 1  # server side: the connection is cut mid-stream
        batch(10)
        mailbox.wait_for(to, count=10, within=20)  # only the reconnected stream can bring these

        remote.reconnect_stream()  # client side: shut the socket under the reader
        batch(10)
        mailbox.wait_for(to, count=10, within=20)

        # Drops while mail is flowing: a sender and repeated server-side cuts at once.
        flowing = threading.Thread(target=batch, args=(60, 4))
        flowing.start()
        for _ in range(5):
            service.drop_streams()
        flowing.join(timeout=60)
        mailbox.wait_for(to, count=60, within=30)

    service_seqs = [m.extra["service_seq"] for m in store.since(0) if to in m.rcpt_tos]
    assert len(service_seqs) == sent == 90
    assert not [seq for seq, n in Counter(service_seqs).items() if n > 1]
    subjects = sorted(m.subject for m in store.since(0) if to in m.rcpt_tos)
    assert subjects == sorted(f"Mail {i}" for i in range(90))
    assert remote.duplicates == 0 and remote.missing == 0
    assert remote.stream_connections >= 3


def test_faults_through_remote_plan_with_scoped_faults(remote):
    with Mailbox(remote.store) as mailbox:
        to = mailbox.address("flaky")
        scoped = ScopedFaults(remote.faults, scope="test-remote-faults")
        rule = scoped.rule("rcpt", Script(["451 4.3.0 try later"] * 2), to=to)
        assert rule.id > 0
        codes = []
        for _ in range(3):
            try:
                send_all(remote, [(to, make_raw(to, "Flaky"))])
                codes.append(250)
            except smtplib.SMTPRecipientsRefused as exc:
                codes.append(exc.recipients[to][0])
        assert codes == [451, 451, 250]
        assert mailbox.wait_for(to, within=10).subject == "Flaky"
        # The rule the test holds reads its counts from the service, as a FaultPlan's rule is live.
        assert (rule.fired, rule.acted) == (3, 2)
        [live] = scoped.rules
        assert (live.id, live.fired, live.acted, live.to) == (rule.id, 3, 2, to)
        assert isinstance(live.action, Script)
        other = remote.faults.rule("data", "554 5.0.0 no", to="someone@else.test", scope="other")
        assert scoped.clear() == 1
        assert [r.id for r in remote.faults.rules] == [other.id]
        remote.faults.remove(other)
        assert remote.faults.rules == []
        assert (rule.fired, rule.acted) == (3, 2)  # removed: the last known counts, not an error
        with pytest.raises(FaultError):
            remote.faults.rule("helo", "451 4.3.0 x")  # rejected locally, as FaultPlan does


def test_token_protected_service():
    with RemoteSink.launch(token="t0ken") as sink, Mailbox(sink.store) as mailbox:
        to = mailbox.address("secure")
        send_all(sink, [(to, make_raw(to, "Secret"))])
        assert mailbox.wait_for(to, within=10).subject == "Secret"
        assert "t0ken" not in " ".join(sink.process.command)  # passed in the environment
        with pytest.raises(SinkServiceError, match="401"):
            RemoteSink(sink.url).start()


def test_launch_with_tls_and_auth_carries_the_session_into_each_message():
    import asyncio
    import ssl

    import aiosmtplib

    with RemoteSink.launch(tls="starttls", auth="app:pa55") as sink, Mailbox(sink.store) as mailbox:
        assert (sink.tls_mode, sink.auth_required) == ("starttls", True)
        assert Path(sink.tls_ca_file).read_text().startswith("-----BEGIN CERTIFICATE")
        assert "pa55" not in " ".join(sink.process.command)  # in the environment, not in ps
        trusting = ssl.create_default_context(cafile=sink.tls_ca_file)
        secure = mailbox.address("aio")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.test", secure, "Over TLS with AUTH"
        msg.set_content("x\n")
        asyncio.run(aiosmtplib.send(msg, hostname=sink.smtp_host, port=sink.smtp_port, tls_context=trusting,
                                    username="app", password="pa55", timeout=10))
        got = mailbox.wait_for(secure, within=10)
        assert (got.tls, got.auth_user, got.source) == (True, "app", "sink-service")
        clear = mailbox.address("clear")  # TLS is optional here, AUTH is not
        with smtplib.SMTP(sink.smtp_host, sink.smtp_port, timeout=10) as smtp:
            smtp.login("app", "pa55")
            smtp.sendmail("app@example.test", [clear], make_raw(clear, "Clear"))
        got = mailbox.wait_for(clear, within=10)
        assert (got.tls, got.auth_user) == (False, "app")
        ca_file = sink.tls_ca_file
    assert not Path(ca_file).exists()  # the service removed its temporary CA at exit


def test_plain_service_reports_no_tls(remote):
    assert (remote.tls_mode, remote.tls_ca_file, remote.auth_required) == ("off", None, False)
    with Mailbox(remote.store) as mailbox:
        to = mailbox.address("plain")
        send_all(remote, [(to, make_raw(to, "Plain"))])
        got = mailbox.wait_for(to, within=10)
        assert (got.tls, got.auth_user) == (False, None)


def test_accept_sets_aside_what_this_process_does_not_want(service):
    store = SignallingStore()
    with RemoteSink(service.url, store=store, accept=lambda m: "keep" in m.rcpt_tos[0]) as sink, \
            Mailbox(store) as mailbox:
        keep, drop = mailbox.address("keep"), mailbox.address("drop")
        send_all(sink, [(drop, make_raw(drop, "Not mine")), (keep, make_raw(keep, "Mine"))])
        assert mailbox.wait_for(keep, within=10).subject == "Mine"  # the stream is past the dropped one
        assert [m.rcpt_tos for m in mailbox.messages] == [(keep,)]
        assert (sink.set_aside, sink.received) == (1, 1)
        assert sink.last_seq == sink.health()["last_seq"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restarted_service_is_followed_without_losing_its_new_mail():
    ports = ["--smtp-port", str(free_port()), "--http-port", str(free_port())]
    command = [sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1", *ports]

    def start() -> AppProcess:
        return AppProcess(command, cwd=str(ROOT), ready_pattern=r"READY (http://\S+)", name="sink service").start()

    first = start()
    try:
        with RemoteSink(first.url, store=SignallingStore()) as sink, Mailbox(sink.store) as mailbox:
            to = mailbox.address("restart")
            send_all(sink, [(to, make_raw(to, f"Before {i}")) for i in range(3)])
            assert len(mailbox.wait_for(to, count=3, within=10)) == 3
            assert first.stop() == 0
            second = start()  # same ports, seqs from 1 again
            try:
                send_all(sink, [(to, make_raw(to, "After"))])  # seq 1 of the new run, below last_seq 3
                assert mailbox.wait_for(to, subject="After", within=20).extra["service_seq"] == 1
                assert sink.restarts == 1 and sink.duplicates == 0
                assert sorted(m.subject for m in mailbox.received(to)) == ["After", "Before 0", "Before 1", "Before 2"]
            finally:
                sink.stop()
                assert second.stop() == 0
    finally:
        first.stop()


def test_launch_stop_ends_the_process():
    sink = RemoteSink.launch()
    process = sink.process
    assert process.running
    sink.stop()
    assert not process.running
    assert process.stop() == 0  # already ended: stop() only reports its exit code (0: a clean SIGTERM exit)
    assert not sink.running


GEVENT_SCRIPT = r'''
from gevent import monkey
monkey.patch_all()

import json, smtplib, sys, threading
import gevent
from email.message import EmailMessage
from mailproof.mailbox import Mailbox, MailStore
from mailproof.capture.remote import RemoteSink

url = sys.argv[1]

class Signalling(MailStore):
    def __init__(self):
        super().__init__()
        self.added = threading.Semaphore(0)
    def _add_waiter(self, waiter):
        super()._add_waiter(waiter)
        self.added.release()

def raw(to):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, "Greenlet " + to
    msg.set_content("hello from a greenlet")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

store = Signalling()
delivered_in = set()  # where store.deliver runs: the stream reader
store.add_listener(lambda msg: delivered_in.add(
    "greenlet" if isinstance(gevent.getcurrent(), gevent.Greenlet) else "os-thread"))
sink = RemoteSink(url, store=store).start()
mailbox = Mailbox(store)
addresses = [mailbox.address(f"green{i}") for i in range(50)]

def wait(to):
    return mailbox.wait_for(to, subject="Greenlet", within=30).rcpt_tos == (to,)

def send(chunk):
    with smtplib.SMTP(sink.smtp_host, sink.smtp_port, timeout=30) as smtp:
        for to in chunk:
            smtp.sendmail("app@example.test", [to], raw(to))

waiters = [gevent.spawn(wait, to) for to in addresses]
for _ in addresses:
    assert store.added.acquire(timeout=30)
senders = [gevent.spawn(send, addresses[i::5]) for i in range(5)]
gevent.joinall(senders + waiters, timeout=60)
report = {
    "ok": sum(1 for g in waiters if g.value is True),
    "errors": [repr(g.exception) for g in senders + waiters if g.exception is not None],
    "patched": monkey.is_module_patched("socket") and monkey.is_module_patched("threading"),
    "delivered_in": sorted(delivered_in),
    "stream_connections": sink.stream_connections,
    "received": sink.received,
}
sink.stop()
print("RESULT " + json.dumps(report), flush=True)
'''


def test_remote_sink_in_a_gevent_monkey_patched_process(service, tmp_path):
    script = tmp_path / "gevent_users.py"
    script.write_text(GEVENT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), service.url], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    assert report == {"ok": 50, "errors": [], "patched": True, "delivered_in": ["greenlet"],
                      "stream_connections": 1, "received": 50}
