"""The real mail servers the IMAP backend runs on: private Dovecot, private Postfix, LMTP relay.

Real processes, loopback only, no mocks. Postfix needs root; its tests skip otherwise.
"""

from __future__ import annotations

import os
import re
import smtplib
import time
from pathlib import Path

import pytest
from imap_tools import MailBoxUnencrypted

from mailproof.servers import dovecot as dovecot_module
from mailproof.servers.dovecot import APT_PACKAGES, Dovecot, DovecotError, find_binary
from mailproof.net import free_port
from mailproof.servers.process import live_group_members, processes_matching, tcp_sockets
from mailproof.capture.lmtp_relay import LmtpRelay
from mailproof.servers.postfix import Postfix, PostfixError
from mailproof.faults import FaultPlan

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="a private Postfix needs root")


def _raw(to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: app@example.test\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\nhello\r\n").encode()


def _inbox(dovecot: Dovecot, user: str = "qa") -> list:
    with MailBoxUnencrypted(dovecot.host, dovecot.imap_port, timeout=5).login(user, dovecot.users[user]) as box:
        return list(box.fetch(mark_seen=False, bulk=True))


def _gone(pid: int) -> bool:
    """Neither the master nor anything in its process group is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return not live_group_members(pid)
    return False


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(users={"qa": "secret-qa", "other": "secret-other"}) as server:
        yield server


def test_dovecot_starts_listening_on_loopback_and_stops_leaving_no_process():
    server = Dovecot().start()
    pid, directory = server.pid, server.directory
    try:
        assert server.running and server.host == "127.0.0.1"
        assert live_group_members(pid), "the master should have started its children"
        assert len(processes_matching(directory.name)) > 1  # master (-c DIR/..) and children
        assert oct(os.stat(directory).st_mode & 0o777) == "0o755"
        listening = {(ip, port) for ip, port, _, _ in tcp_sockets("LISTEN")}
        for port in (server.imap_port, server.lmtp_port):
            assert {(ip, p) for ip, p in listening if p == port} == {("127.0.0.1", port)}
    finally:
        server.stop()
    assert _gone(pid)
    assert not directory.exists()
    assert not processes_matching(directory.name)  # the children's titles name the instance
    server.stop()  # idempotent


def test_dovecot_stop_ends_the_imap_process_serving_a_logged_in_client():
    # Signalled alone, the master leaves logged-in imap processes serving their clients.
    server = Dovecot(users={"qa": "secret-qa"}).start()
    pid = server.pid
    client = MailBoxUnencrypted(server.host, server.imap_port, timeout=5).login("qa", "secret-qa")
    try:
        titles = [Path(f"/proc/{p}/cmdline").read_bytes() for p in live_group_members(pid)]
        assert [t for t in titles if t.endswith(b"/imap\x00")], titles  # qa's session process
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert _gone(pid)
    finally:
        server.stop()
        try:
            client.client.shutdown()
        except OSError:
            pass


def test_process_helpers_stay_importable_from_dovecot():
    # tests/test_imap_backend.py imports them from mailproof.servers.dovecot.
    assert dovecot_module.live_group_members is live_group_members
    assert dovecot_module.tcp_sockets is tcp_sockets and dovecot_module.free_port is free_port


def test_lmtp_delivery_lands_in_the_users_inbox_with_the_full_plus_address(dovecot):
    rcpt = "qa+servers.abc123.000001@mailproof.test"
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        lmtp.sendmail("app@example.test", [rcpt], _raw(rcpt, "lmtp plus"))
    found = [m for m in _inbox(dovecot) if m.subject == "lmtp plus"]
    assert len(found) == 1
    assert found[0].headers["delivered-to"] == (rcpt,)
    assert not _inbox(dovecot, "other"), "the +detail must not create or pick another user"


def test_dovecot_restart_keeps_ports_and_mail(dovecot):
    rcpt = "qa+servers.abc123.000002@mailproof.test"
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        lmtp.sendmail("app@example.test", [rcpt], _raw(rcpt, "before restart"))
    ports, old_pid = (dovecot.imap_port, dovecot.lmtp_port), dovecot.pid
    dovecot.restart()
    assert (dovecot.imap_port, dovecot.lmtp_port) == ports and dovecot.pid != old_pid
    assert _gone(old_pid)
    assert "before restart" in [m.subject for m in _inbox(dovecot)]


def test_a_missing_binary_names_the_package_to_install(monkeypatch):
    with pytest.raises(DovecotError, match="apt-get install -y dovecot-imapd dovecot-lmtpd"):
        find_binary("dovecot-not-installed-here", APT_PACKAGES)
    monkeypatch.setattr("mailproof.servers.dovecot.shutil.which", lambda name: None)
    monkeypatch.setattr("mailproof.servers.dovecot.os.access", lambda path, mode: False)
    with pytest.raises(DovecotError, match="dovecot-imapd"):
        Dovecot()
    with pytest.raises(PostfixError, match="apt-get install -y postfix"):
        Postfix(lmtp_port=24)


def test_postfix_refuses_clearly_without_root(monkeypatch):
    monkeypatch.setattr("mailproof.servers.postfix.os.geteuid", lambda: 1000)
    with pytest.raises(PostfixError, match="LmtpRelay"):
        Postfix(lmtp_port=24)


@needs_root
def test_postfix_relays_each_recipient_to_dovecot_and_leaves_nothing_behind(dovecot):
    postfix = Postfix(lmtp_port=dovecot.lmtp_port).start()
    master, directory = postfix.pid, postfix.directory
    try:
        listening = {(ip, port) for ip, port, _, _ in tcp_sockets("LISTEN")}
        assert {(ip, p) for ip, p in listening if p == postfix.smtp_port} == {("127.0.0.1", postfix.smtp_port)}
        a, b = "qa+servers.abc123.000003@mailproof.test", "qa+servers.abc123.000004@mailproof.test"
        with smtplib.SMTP(postfix.host, postfix.smtp_port) as smtp:
            smtp.sendmail("app@example.test", [a, b], _raw(f"{a}, {b}", "via postfix"))
        for rcpt in (a, b):
            assert postfix.wait_for_log(rf"to=<{re.escape(rcpt)}>.*status=sent", timeout=10), postfix.log_tail()
        copies = [m for m in _inbox(dovecot) if m.subject == "via postfix"]
        # One LMTP transaction per recipient: each copy names its own recipient.
        assert sorted(m.headers["delivered-to"][0] for m in copies) == [a, b]
        assert (directory / "maillog").read_text().count("status=sent") >= 2
    finally:
        postfix.stop()
    assert _gone(master)
    assert not directory.exists()
    assert not processes_matching(str(directory))  # master -c DIR


def test_lmtp_relay_stores_each_recipient_before_answering_250(dovecot):
    a, b = "qa+servers.abc123.000005@mailproof.test", "qa+servers.abc123.000006@mailproof.test"
    with LmtpRelay(dovecot.host, dovecot.lmtp_port) as relay:
        with smtplib.SMTP(relay.host, relay.port) as smtp:
            smtp.sendmail("app@example.test", [a, b], _raw(f"{a}, {b}", "via relay"))
        assert relay.relayed == 1
    copies = [m for m in _inbox(dovecot) if m.subject == "via relay"]
    assert sorted(m.headers["delivered-to"][0] for m in copies) == [a, b]


def test_lmtp_relay_keeps_the_sinks_fault_plan(dovecot):
    rcpt = "qa+servers.abc123.000007@mailproof.test"
    plan = FaultPlan()
    with LmtpRelay(dovecot.host, dovecot.lmtp_port, faults=plan) as relay:
        rule = relay.faults.rule("rcpt", "451 4.3.0 try later", to=rcpt)
        with smtplib.SMTP(relay.host, relay.port) as smtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("app@example.test", [rcpt], _raw(rcpt, "faulted"))
        assert relay.faults is plan and rule.fired == 1 and relay.relayed == 0


def test_lmtp_relay_answers_451_when_dovecot_is_down():
    with LmtpRelay("127.0.0.1", free_port()) as relay:  # nothing listens there
        with smtplib.SMTP(relay.host, relay.port) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("app@example.test", ["qa@mailproof.test"], _raw("qa@mailproof.test", "lost?"))
        assert refused.value.smtp_code == 451 and relay.failed == 1
