"""The capture sink (mailproof/capture/smtp_sink.py) against real SMTP clients: smtplib and aiosmtplib.

Every wait here is on a queue fed by the sink's on_message callback (``queue.get(timeout=...)``);
the sink calls it inside handle_DATA, before the 250 reply, so once a client's send returns the
message is already in the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import random
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage

import aiosmtplib
import pytest
import trustme

from mailproof.capture.embedded import EmbeddedSink
from mailproof.capture.smtp_sink import CapturedMail, SinkError, SmtpSink
from mailproof.capture.tls import SinkCA, TLSUnavailable, parse_auth, parse_tls_mode
from mailproof.errors import MailproofError
from mailproof.mailbox import Mailbox
from mailproof.message import Message

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

CRLF_POLICY = EmailMessage().policy.clone(linesep="\r\n")


def _raw(to: str, subject: str = "Hello") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, subject
    msg.set_content("Hi there.\n")
    return msg.as_bytes(policy=CRLF_POLICY)


class Capture:
    """A started sink plus the queue its on_message callback fills."""

    def __init__(self, **options) -> None:
        self.queue: "queue.Queue[CapturedMail]" = queue.Queue()
        self.sink = SmtpSink(on_message=self.queue.put, **options).start()

    @property
    def port(self) -> int:
        return self.sink.port

    def get(self, timeout: float = 10) -> CapturedMail:
        return self.queue.get(timeout=timeout)

    def assert_empty(self) -> None:
        assert self.queue.empty(), f"unexpected capture: {self.queue.get_nowait()!r}"
        assert self.sink.captured_count == 0

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10)


@pytest.fixture
def capture():
    cap = Capture()
    yield cap
    cap.sink.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# -- plain delivery ------------------------------------------------------------------------


def test_smtplib_plain(capture):
    raw = _raw("alice@example.test", "Plain smtplib")
    with capture.smtp() as client:
        client.ehlo("client.example.test")
        refused = client.sendmail("app@example.test", ["alice@example.test", "bob@example.test"], raw)
    assert refused == {}
    mail = capture.get()
    assert mail.mail_from == "app@example.test"
    assert mail.rcpt_tos == ("alice@example.test", "bob@example.test")
    assert mail.data == raw
    assert mail.helo == "client.example.test"
    assert mail.peer[0] == "127.0.0.1"
    assert mail.tls is False and mail.auth_user is None and mail.smtputf8 is False
    assert mail.seq == 1 and capture.sink.captured_count == 1
    assert Message(mail.data).subject == "Plain smtplib"


def test_aiosmtplib_plain(capture):
    msg = EmailMessage()
    msg["From"] = "app@example.test"
    msg["To"] = "carol@example.test"
    msg["Subject"] = "Plain aiosmtplib"
    msg.set_content("sent by aiosmtplib\n")
    errors, reply = asyncio.run(
        aiosmtplib.send(msg, hostname="127.0.0.1", port=capture.port, start_tls=False, timeout=10)
    )
    assert errors == {} and "OK" in reply
    mail = capture.get()
    assert mail.rcpt_tos == ("carol@example.test",)
    parsed = Message(mail.data)
    assert parsed.subject == "Plain aiosmtplib"
    assert parsed.text.splitlines() == ["sent by aiosmtplib"]


def test_sequence_numbers_increase(capture):
    with capture.smtp() as client:
        for i in range(3):
            client.sendmail("app@example.test", [f"u{i}@example.test"], _raw(f"u{i}@example.test", f"n{i}"))
    seqs = [capture.get().seq for _ in range(3)]
    assert seqs == [1, 2, 3]


# -- STARTTLS and AUTH ---------------------------------------------------------------------


def test_starttls_smtplib_with_trusted_test_ca(server_tls, client_tls):
    cap = Capture(tls_context=server_tls)
    try:
        with cap.smtp() as client:
            client.ehlo()
            assert client.has_extn("starttls")
            client.starttls(context=client_tls)
            client.ehlo()
            assert isinstance(client.sock, ssl.SSLSocket)
            client.sendmail("app@example.test", ["tls@example.test"], _raw("tls@example.test", "Over TLS"))
        mail = cap.get()
        assert mail.tls is True
        assert Message(mail.data).subject == "Over TLS"
    finally:
        cap.sink.stop()


def test_starttls_aiosmtplib_upgrades_by_itself(server_tls, client_tls):
    cap = Capture(tls_context=server_tls)
    try:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.test", "tls2@example.test", "aiosmtplib TLS"
        msg.set_content("x\n")
        asyncio.run(aiosmtplib.send(msg, hostname="127.0.0.1", port=cap.port,
                                    tls_context=client_tls, timeout=10))
        assert cap.get().tls is True
    finally:
        cap.sink.stop()


def test_require_starttls_refuses_mail_in_clear(server_tls):
    cap = Capture(tls_context=server_tls, require_starttls=True)
    try:
        with cap.smtp() as client:
            client.ehlo()
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("app@example.test", ["x@example.test"], _raw("x@example.test"))
            assert refused.value.smtp_code == 530
            # plain commands, one at a time (what the connection answers from its received bytes)
            for command in ("MAIL FROM:<app@example.test>", "RCPT TO:<x@example.test>", "DATA"):
                assert client.docmd(command) == (530, b"Must issue a STARTTLS command first"), command
        cap.assert_empty()
    finally:
        cap.sink.stop()


@pytest.fixture
def auth_capture():
    cap = Capture(credentials={"user": "pw"}, auth_required=True)
    yield cap
    cap.sink.stop()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanisms(auth_capture, mechanism):
    with auth_capture.smtp() as client:
        client.ehlo()
        assert mechanism in client.esmtp_features["auth"].upper().split()
        client.user, client.password = "user", "pw"
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, _ = client.auth(mechanism, method)
        assert code == 235
        client.sendmail("app@example.test", ["auth@example.test"], _raw("auth@example.test", mechanism))
    mail = auth_capture.get()
    assert mail.auth_user == "user"
    assert Message(mail.data).subject == mechanism


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_wrong_password_gives_535_and_captures_nothing(auth_capture, mechanism):
    with auth_capture.smtp() as client:
        client.ehlo()
        client.user, client.password = "user", "not-the-password"
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth(mechanism, method)
        assert failed.value.smtp_code == 535
        # Not authenticated, so MAIL is refused; the refusal is synchronous, nothing to wait for.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.test", ["auth@example.test"], _raw("auth@example.test"))
        assert refused.value.smtp_code == 530
    auth_capture.assert_empty()


def test_unknown_user_gives_535(auth_capture):
    with auth_capture.smtp() as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("nobody", "pw")
        assert failed.value.smtp_code == 535
    auth_capture.assert_empty()


def test_auth_required_refuses_mail_before_auth(auth_capture):
    with auth_capture.smtp() as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.test", ["auth@example.test"], _raw("auth@example.test"))
        assert refused.value.smtp_code == 530
        # Then the same connection authenticates (smtplib picks PLAIN) and the mail goes through.
        client.login("user", "pw")
        client.sendmail("app@example.test", ["auth@example.test"], _raw("auth@example.test", "after auth"))
    mail = auth_capture.get()
    assert Message(mail.data).subject == "after auth"
    assert auth_capture.sink.captured_count == 1


# -- international mail and fidelity -------------------------------------------------------


def test_smtputf8_recipient_captured_intact(capture):
    rcpt = "josé+x@例え.test"
    raw = (
        "From: app@example.test\r\n"
        f"To: {rcpt}\r\n"
        "Subject: =?utf-8?q?Bienvenue_Jos=C3=A9?=\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Olá, José! 例え\r\n"
    ).encode("utf-8")
    with capture.smtp() as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        client.sendmail("app@example.test", [rcpt], raw, mail_options=["SMTPUTF8"])
    mail = capture.get()
    assert mail.rcpt_tos == (rcpt,)
    assert mail.smtputf8 is True
    assert mail.data == raw
    parsed = Message(mail.data, rcpt_tos=mail.rcpt_tos)
    assert parsed.to == [rcpt]
    assert parsed.subject == "Bienvenue José"
    assert parsed.text.splitlines() == ["Olá, José! 例え"]


def test_8bitmime_body_captured_byte_for_byte(capture):
    body_lines = [
        "Grüße aus Köln — ça va? 你好 🙂",
        ".a line that starts with a dot (dot-stuffed on the wire)",
        "..and one with two dots",
        "trailing spaces are kept   ",
        "\tand a tab",
        "",
        "Ünïcödé " * 50,
    ]
    raw = (
        "From: app@example.test\r\nTo: eight@example.test\r\nSubject: 8bit\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + "\r\n".join(body_lines) + "\r\n"
    ).encode("utf-8")
    with capture.smtp() as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        client.sendmail("app@example.test", ["eight@example.test"], raw, mail_options=["BODY=8BITMIME"])
    mail = capture.get()
    assert mail.data == raw
    assert "BODY=8BITMIME" in mail.mail_options
    assert Message(mail.data).text.splitlines() == body_lines


def test_10mb_attachment_captured_intact(capture):
    payload = random.Random(20240601).randbytes(10 * 1024 * 1024)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", "big@example.test", "Big attachment"
    msg.set_content("see attached\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="blob.bin")
    raw = msg.as_bytes(policy=CRLF_POLICY)
    with capture.smtp() as client:
        client.sendmail("app@example.test", ["big@example.test"], raw)
    mail = capture.get()
    assert len(mail.data) == len(raw)
    assert hashlib.sha256(mail.data).hexdigest() == hashlib.sha256(raw).hexdigest()
    att = Message(mail.data).attachment("blob.bin")
    assert att.size == len(payload)
    assert hashlib.sha256(att.data).digest() == hashlib.sha256(payload).digest()


# -- concurrency ---------------------------------------------------------------------------

SENDERS = 200


def test_200_concurrent_smtplib_senders_nothing_lost(capture):
    start = threading.Barrier(SENDERS)
    errors: "queue.Queue[BaseException]" = queue.Queue()

    def send(i: int) -> None:
        rcpt = f"burst{i:03d}@example.test"
        try:
            start.wait(timeout=30)
            with smtplib.SMTP("127.0.0.1", capture.port, timeout=30) as client:
                client.sendmail("app@example.test", [rcpt], _raw(rcpt, f"burst {i:03d}"))
        except BaseException as exc:  # reported below, not swallowed
            errors.put(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors.empty(), f"{errors.qsize()} senders failed, first: {errors.get_nowait()!r}"
    # Every send returned after its 250, which the sink writes after on_message: all are queued.
    captured = [capture.queue.get_nowait() for _ in range(capture.queue.qsize())]
    rcpts = sorted(r for m in captured for r in m.rcpt_tos)
    assert rcpts == [f"burst{i:03d}@example.test" for i in range(SENDERS)]
    assert sorted(Message(m.data).subject for m in captured) == [f"burst {i:03d}" for i in range(SENDERS)]
    assert sorted(m.seq for m in captured) == list(range(1, SENDERS + 1))
    assert capture.sink.captured_count == SENDERS


def test_200_concurrent_aiosmtplib_senders_nothing_lost(capture):
    async def send_all():
        async def one(i: int):
            rcpt = f"async{i:03d}@example.test"
            return await aiosmtplib.send(_raw(rcpt, f"async {i:03d}"), sender="app@example.test",
                                         recipients=[rcpt], hostname="127.0.0.1", port=capture.port,
                                         start_tls=False, timeout=30)
        return await asyncio.gather(*(one(i) for i in range(SENDERS)), return_exceptions=True)

    results = asyncio.run(send_all())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} sends failed, first: {failures[0]!r}"
    captured = [capture.queue.get_nowait() for _ in range(capture.queue.qsize())]
    assert sorted(Message(m.data).subject for m in captured) == [f"async {i:03d}" for i in range(SENDERS)]
    assert capture.sink.captured_count == SENDERS


# -- lifecycle -----------------------------------------------------------------------------


def test_stop_leaves_no_thread_and_closes_port():
    before = set(threading.enumerate())
    cap = Capture()
    port = cap.port
    assert cap.sink.running
    assert [t for t in threading.enumerate() if t not in before], "the sink runs on its own thread"
    idle = cap.smtp()  # an open client connection must not keep the sink alive
    idle.ehlo()
    idle.sendmail("app@example.test", ["x@example.test"], _raw("x@example.test"))
    assert cap.get().rcpt_tos == ("x@example.test",)

    cap.sink.stop()

    assert not cap.sink.running and cap.sink.loop is None
    leftover = [t for t in threading.enumerate() if t not in before]
    assert leftover == [], f"threads left after stop(): {leftover}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        idle.noop()
    idle.close()
    cap.sink.stop()  # idempotent


def test_start_twice_is_refused(capture):
    with pytest.raises(SinkError, match="already running"):
        capture.sink.start()


def test_busy_port_gives_sink_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    before = set(threading.enumerate())
    try:
        sink = SmtpSink(port=busy)
        with pytest.raises(SinkError) as failed:
            sink.start()
    finally:
        holder.close()
    text = str(failed.value)
    assert f"127.0.0.1:{busy}" in text
    assert "address already in use" in text.lower()
    assert "Choose a free port" in text
    assert isinstance(failed.value.__cause__, OSError)
    assert not sink.running
    assert [t for t in threading.enumerate() if t not in before] == []


def test_binds_loopback_only_by_default(capture):
    assert capture.sink.host == "127.0.0.1"
    bound = {sock.getsockname()[0] for sock in capture.sink._server.sockets}
    assert bound == {"127.0.0.1"}
    # Behaviourally: another loopback address (still 127/8) is refused, so it is not 0.0.0.0.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", capture.port), timeout=5).close()


def test_received_at_is_stamped_at_end_of_data(capture):
    with capture.smtp() as client:
        client.ehlo()
        connected = time.time()
        client.mail("app@example.test")
        client.rcpt("stamp@example.test")
        data_started = time.time()
        code, _ = client.data(_raw("stamp@example.test", "stamp"))
        replied = time.time()
    assert code == 250
    mail = capture.get()
    assert connected <= data_started <= mail.received_at <= replied


# -- STARTTLS and AUTH by option (EmbeddedSink(tls=..., auth=...), the plugin's sink) --------------


def _trusting(backend) -> ssl.SSLContext:
    """What the app under test does with ``tls_ca_file``: a verifying context that trusts it."""
    return ssl.create_default_context(cafile=backend.tls_ca_file)


def _message(to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, subject
    msg.set_content("x\n")
    return msg


def test_tls_option_makes_a_ca_file_the_client_trusts_and_marks_the_message():
    with EmbeddedSink(tls="starttls") as backend, Mailbox(backend.store) as mailbox:
        ca_file = backend.tls_ca_file
        assert ca_file and open(ca_file).read().startswith("-----BEGIN CERTIFICATE-----")
        secure, clear = mailbox.address("secure"), mailbox.address("clear")
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
            client.starttls(context=_trusting(backend))  # verifies the chain and 127.0.0.1
            client.sendmail("app@example.test", [secure], _raw(secure, "over TLS"))
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
            client.sendmail("app@example.test", [clear], _raw(clear, "in the clear"))  # optional TLS
        assert mailbox.wait_for(secure, within=10).tls is True
        plain = mailbox.wait_for(clear, within=10)
        assert plain.tls is False and plain.auth_user is None
    assert backend.tls_ca_file is None and not __import__("os").path.exists(ca_file)  # removed at stop


def test_the_ca_is_not_trusted_by_default():
    with EmbeddedSink(tls="starttls") as backend:
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(context=ssl.create_default_context())


def test_starttls_required_refuses_mail_before_starttls_with_530():
    with EmbeddedSink(tls="starttls-required") as backend:
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
            client.ehlo()
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("app@example.test", ["x@example.test"], _raw("x@example.test"))
            assert refused.value.smtp_code == 530 and b"STARTTLS" in refused.value.smtp_error
        assert len(backend.store) == 0
        # aiosmtplib upgrades by itself when the server offers STARTTLS, and then it goes through.
        with Mailbox(backend.store) as mailbox:
            to = mailbox.address("aio")
            asyncio.run(aiosmtplib.send(_message(to, "aiosmtplib TLS"), hostname=backend.smtp_host,
                                        port=backend.smtp_port, tls_context=_trusting(backend), timeout=10))
            assert mailbox.wait_for(to, within=10).tls is True


@pytest.fixture
def auth_backend():
    with EmbeddedSink(tls="starttls", auth="app:s3cret:with-colon") as backend:
        yield backend


def test_auth_option_refuses_mail_without_credentials_with_530(auth_backend):
    with smtplib.SMTP(auth_backend.smtp_host, auth_backend.smtp_port, timeout=10) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"].upper()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.test", ["x@example.test"], _raw("x@example.test"))
        assert refused.value.smtp_code == 530
    assert len(auth_backend.store) == 0


def test_auth_option_refuses_a_wrong_password_with_535(auth_backend):
    with smtplib.SMTP(auth_backend.smtp_host, auth_backend.smtp_port, timeout=10) as client:
        client.starttls(context=_trusting(auth_backend))
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("app", "s3cret")  # the password is everything after the first colon
        assert failed.value.smtp_code == 535
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
        asyncio.run(aiosmtplib.send(_message("x@example.test", "nope"), hostname=auth_backend.smtp_host,
                                    port=auth_backend.smtp_port, tls_context=_trusting(auth_backend),
                                    username="app", password="wrong", timeout=10))
    assert failed.value.code == 535
    assert len(auth_backend.store) == 0


def test_auth_option_with_the_right_credentials_sets_auth_user(auth_backend):
    with Mailbox(auth_backend.store) as mailbox:
        first, second = mailbox.address("smtplib"), mailbox.address("aiosmtplib")
        with smtplib.SMTP(auth_backend.smtp_host, auth_backend.smtp_port, timeout=10) as client:
            client.starttls(context=_trusting(auth_backend))
            client.login("app", "s3cret:with-colon")
            client.sendmail("app@example.test", [first], _raw(first, "authenticated"))
        asyncio.run(aiosmtplib.send(_message(second, "aio authenticated"), hostname=auth_backend.smtp_host,
                                    port=auth_backend.smtp_port, tls_context=_trusting(auth_backend),
                                    username="app", password="s3cret:with-colon", timeout=10))
        for to in (first, second):
            msg = mailbox.wait_for(to, within=10)
            assert (msg.tls, msg.auth_user) == (True, "app")
    assert auth_backend.auth_required


def test_tls_without_trustme_says_pip_install_trustme(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "trustme", None)  # an import of it now fails
    with pytest.raises(TLSUnavailable, match=r"pip install .mailproof\[tls\]."):
        SinkCA()
    backend = EmbeddedSink(tls="starttls")
    with pytest.raises(TLSUnavailable, match=r"pip install .mailproof\[tls\]."):
        backend.start()
    assert not backend.sink.running
    with EmbeddedSink() as plain:  # TLS off never needs it
        assert plain.tls_ca_file is None


def test_ca_file_can_be_placed_and_stays(tmp_path):
    target = tmp_path / "certs" / "sink-ca.pem"
    ca = SinkCA(["localhost", "127.0.0.1", "sink.internal"], ca_file=target)
    assert ca.ca_file == str(target) and target.read_bytes() == ca.ca_pem
    ca.cleanup()
    assert target.exists()  # the caller's file is the caller's
    with pytest.raises(MailproofError, match="not a host name"):
        SinkCA(["bad name"])


def test_tls_and_auth_settings_are_checked_without_echoing_the_password():
    assert [parse_tls_mode(v) for v in (None, "", "OFF", "starttls", "StartTLS-Required")] == \
        ["off", "off", "off", "starttls", "starttls-required"]
    with pytest.raises(MailproofError, match="off, starttls, starttls-required"):
        parse_tls_mode("ssl")
    assert parse_auth("u:p:q") == ("u", "p:q") and parse_auth("") is None and parse_auth(("u", "p")) == ("u", "p")
    for bad in ("hunter2", ":hunter2", "user:"):
        with pytest.raises(MailproofError, match="USER:PASSWORD") as failed:
            parse_auth(bad)
        assert "hunter2" not in str(failed.value)


# -- hostile input and heavy use: long lines, timeouts, large DATA, repeated warnings -----------

from mailproof.capture import smtp_sink as _smtp_sink  # noqa: E402


class RawClient:
    """A hand-driven SMTP client on a plain socket: for pacing bytes and pipelining at will."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        """One whole reply (all its lines); b"" once the server has closed."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def envelope(self, rcpt: str = "slow@example.test") -> None:
        assert self.cmd("EHLO raw.example.test").startswith(b"250")
        assert self.cmd("MAIL FROM:<app@example.test>").startswith(b"250")
        assert self.cmd(f"RCPT TO:<{rcpt}>").startswith(b"250")
        assert self.cmd("DATA").startswith(b"354")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _sink(**options) -> Capture:
    return Capture(**options)


def test_a_10000_byte_data_line_is_accepted_byte_exact(capture):
    long_line = b"X-Long: " + bytes(random.Random(7).choice(b"abcdefghij.") for _ in range(10_000 - 8))
    raw = _raw("long@example.test").replace(b"\r\n\r\n", b"\r\n" + long_line + b"\r\n\r\n", 1)
    raw += b"." * 5000 + b"\r\n" + b".leading dot\r\n"
    with capture.smtp() as client:
        assert client.sendmail("app@example.test", ["long@example.test"], raw) == {}
    mail = capture.get()
    assert mail.data == raw
    assert long_line in mail.data.split(b"\r\n")


def test_max_line_length_refuses_longer_lines_and_the_session_goes_on():
    cap = _sink(max_line_length=100)
    try:
        with cap.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("app@example.test", ["a@example.test"], b"Subject: x\r\n\r\n" + b"y" * 101 + b"\r\n")
            assert refused.value.smtp_code == 500 and b"Line too long" in refused.value.smtp_error
            client.rset()
            ok = b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n"
            assert client.sendmail("app@example.test", ["a@example.test"], ok) == {}
        assert cap.get().data == ok and cap.sink.captured_count == 1
    finally:
        cap.sink.stop()


def test_command_lines_keep_their_limit(capture):
    raw = RawClient(capture.port)
    try:
        assert raw.cmd("EHLO raw.example.test").startswith(b"250")
        assert raw.cmd("NOOP " + "x" * 2000).startswith(b"500")
        assert raw.cmd("NOOP").startswith(b"250")
    finally:
        raw.close()


def _stuffed(body: bytes) -> bytes:
    lines = body.split(b"\r\n")  # SMTP lines end at CRLF only, not at a bare CR or LF
    return b"\r\n".join((b"." + line if line.startswith(b".") else line) for line in lines)


def test_data_reader_undoes_dot_stuffing_across_any_chunk_boundary():
    rng = random.Random(1)
    atoms = [b".", b"..", b"\r\n", b"\r", b"\n", b"a", b"bc", b".\r", b"\r\n.", b"x" * 50]

    async def read(stream: bytes, cuts: list[int]):
        fake = type("Fake", (), {})()
        fake._reader = asyncio.StreamReader(limit=1001)
        task = asyncio.ensure_future(_smtp_sink._SinkSMTP._read_data(fake, None, None, 64))
        prev = 0
        for cut in cuts + [len(stream)]:
            fake._reader.feed_data(stream[prev:cut])
            prev = cut
            await asyncio.sleep(0)
        content, too_much, too_long = await task
        return content, bytes(fake._reader._buffer)

    for _ in range(300):
        body = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 60)))
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        stream = _stuffed(body) + b".\r\nQUIT\r\n"
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
        content, left = asyncio.run(read(stream, cuts))
        assert content == body, (stream, cuts)
        assert left == b"QUIT\r\n"


def test_data_size_limit_counts_the_message_exactly():
    body = b"Subject: s\r\n\r\n" + b"x" * 80 + b"\r\n..stuffed\r\n"  # sent with one dot more
    cap = _sink(data_size_limit=len(body) + 1)
    try:
        with cap.smtp() as client:
            assert client.sendmail("app@example.test", ["a@example.test"], body) == {}
            # MAIL without SIZE= (smtplib's sendmail declares it, and aiosmtpd refuses at MAIL)
            client.mail("app@example.test")
            client.rcpt("a@example.test")
            assert client.data(body + b"y\r\n")[0] == 552
        assert cap.get().data == body and cap.sink.captured_count == 1
    finally:
        cap.sink.stop()


def test_commands_pipelined_after_the_final_dot_are_answered(capture):
    raw = RawClient(capture.port)
    try:
        raw.envelope()
        raw.sock.sendall(b"Subject: p\r\n\r\nbody\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n")
        assert raw.reply().startswith(b"250 2.0.0 OK queued")
        assert raw.reply().startswith(b"250")
        assert raw.reply().startswith(b"221")
        assert capture.get().data == b"Subject: p\r\n\r\nbody\r\n.dot\r\n"
    finally:
        raw.close()


def test_a_slow_but_steady_data_stream_outlives_the_idle_timeout():
    cap = _sink(timeout=0.5)
    raw = RawClient(cap.port)
    try:
        raw.envelope()
        sent = bytearray(b"Subject: slow\r\n\r\n")
        raw.sock.sendall(sent)
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 2.0:  # 2 s in all, 0.2 s apart: 4 idle timeouts' worth
            piece = f"line {i} ".encode() * 20 + b"\r\n"
            raw.sock.sendall(piece)
            sent += piece
            i += 1
            time.sleep(0.2)  # pacing the client is the point of this test
        raw.sock.sendall(b".\r\n")
        assert raw.reply().startswith(b"250 2.0.0 OK queued")
        assert cap.get().data == bytes(sent)
    finally:
        raw.close()
        cap.sink.stop()


def test_a_client_silent_mid_data_is_dropped_after_the_idle_timeout():
    cap = _sink(timeout=0.5)
    raw = RawClient(cap.port)
    try:
        raw.envelope()
        raw.sock.sendall(b"Subject: silent\r\n\r\nhalf a mess")
        started = time.monotonic()
        reply = raw.reply()  # waits for the sink's 421, then its close
        waited = time.monotonic() - started
        assert reply.startswith(b"421 4.4.2") and b"timeout" in reply
        assert raw.reply() == b""  # closed
        assert 0.45 <= waited < 5
        cap.assert_empty()
    finally:
        raw.close()
        cap.sink.stop()


def test_data_timeout_bounds_one_data_phase_even_if_bytes_keep_coming():
    cap = _sink(timeout=5, data_timeout=0.6)
    raw = RawClient(cap.port)
    try:
        raw.envelope()
        stop = threading.Event()

        def stream() -> None:  # bytes every 0.05 s: the idle timeout never fires
            try:
                while not stop.wait(0.05):
                    raw.sock.sendall(b"still going\r\n")
            except OSError:
                pass  # the sink hung up

        streamer = threading.Thread(target=stream)
        started = time.monotonic()
        streamer.start()
        try:
            reply = raw.reply()  # waits for the 421
        finally:
            stop.set()
            streamer.join(timeout=5)
        assert reply.startswith(b"421 4.4.2") and b"DATA took too long" in reply
        assert 0.55 <= time.monotonic() - started < 5
        cap.assert_empty()
    finally:
        raw.close()
        cap.sink.stop()


def test_noops_keep_a_session_open_past_the_idle_timeout_unless_session_timeout_is_set():
    # Without session_timeout, a NOOP more often than the idle timeout keeps a session alive,
    # as against Postfix (whose closest guard is smtpd_junk_command_limit). session_timeout ends it.
    for session_timeout in (None, 1.0):
        cap = _sink(timeout=0.5, session_timeout=session_timeout)
        raw = RawClient(cap.port)
        try:
            started = time.monotonic()
            replies = []
            while time.monotonic() - started < 1.6:
                replies.append(raw.cmd("NOOP"))
                if not replies[-1].startswith(b"250"):
                    break
                time.sleep(0.2)  # pacing the client is the point
            if session_timeout is None:
                assert all(r.startswith(b"250") for r in replies)
            else:
                assert replies[-1].startswith(b"421 4.4.2") and b"session took too long" in replies[-1]
                assert 0.95 <= time.monotonic() - started < 1.6
        finally:
            raw.close()
            cap.sink.stop()


def test_large_data_is_spooled_and_peak_memory_stays_under_one_and_a_half_times():
    import tracemalloc

    size = 24 * 1024 * 1024
    line = b"0123456789abcdef" * 4 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * ((size - 20) // len(line))
    payload = memoryview(body + b".\r\n")
    cap = _sink(spool_threshold=4 * 1024 * 1024)
    raw = RawClient(cap.port, timeout=60)
    try:
        raw.envelope("big@example.test")
        tracemalloc.start()
        try:
            for off in range(0, len(payload), 1 << 20):
                raw.sock.sendall(payload[off:off + (1 << 20)])
            assert raw.reply().startswith(b"250 2.0.0 OK queued")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        mail = cap.get()
        assert mail.data == body
        assert peak < 1.5 * len(body), f"peak {peak / len(body):.2f} x the message"
    finally:
        raw.close()
        cap.sink.stop()


def test_repeated_warnings_pass_the_first_few_per_minute_and_are_counted():
    now = [1000.0]
    flt = _smtp_sink.RepeatedWarningFilter(burst=3, period=60, clock=lambda: now[0])

    def rec(msg, *args, level=logging.WARNING):
        return logging.LogRecord("mail.log", level, __file__, 1, msg, args, None)

    passed = [flt.filter(rec("%r unrecognised: %s", ("127.0.0.1", i), f"CMD{i}")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert flt.filter(rec("%r too many bogus commands", ("127.0.0.1", 1)))  # another kind
    assert flt.filter(rec("%r unrecognised: %s", "p", "X", level=logging.INFO))  # below WARNING
    assert flt.suppressed["%r unrecognised: %s"] == 7
    now[0] += 60
    first = rec("%r unrecognised: %s", "p", "Y")
    assert flt.filter(first) and "7 similar suppressed" in first.getMessage()


def test_the_sink_rate_limits_aiosmtpd_unrecognised_command_warnings(capture, caplog):
    logger = logging.getLogger("mail.log")
    installed = [f for f in logger.filters if isinstance(f, _smtp_sink.RepeatedWarningFilter)]
    assert len(installed) == 1  # SmtpSink() put it there, once
    for f in installed:
        logger.removeFilter(f)
    fresh = _smtp_sink.install_warning_filter(burst=4)
    try:
        with caplog.at_level(logging.WARNING, logger="mail.log"):
            for _ in range(4):
                raw = RawClient(capture.port)
                try:
                    for _ in range(4):  # aiosmtpd hangs up after 5 bogus commands
                        assert raw.cmd("BOGUS").startswith(b"500")
                finally:
                    raw.close()
        unrecognised = [r for r in caplog.records if "unrecognised" in r.msg]
        assert len(unrecognised) == 4
        assert fresh.suppressed["%r unrecognised: %s"] == 12
    finally:
        logger.removeFilter(fresh)
        for f in installed:
            logger.addFilter(f)
