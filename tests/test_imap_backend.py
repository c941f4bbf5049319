"""The IMAP backend against real servers: private Dovecot (+ Postfix as root), no mocks.

One private stack is shared by the module; tests that need their own inbox view open a second
backend on the same Dovecot as an "external account", which is also how a staging inbox is used.
No test sleeps for mail: every wait is a ``Mailbox.wait_for`` woken by the watcher.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme
from imap_tools import MailBoxUnencrypted

from mailproof.servers.dovecot import Dovecot, live_group_members, tcp_sockets
from mailproof.faults import FaultError, FaultPlan, Faults, NoFaults
from mailproof.addresses import AddressBook
from mailproof.errors import MailproofError
from mailproof.imap import CONNECT_TIMEOUT, ImapAccount, ImapWatcher, open_imap_backend, recipients_for
from mailproof.net import free_port
from mailproof.mailbox import Mailbox, MailStore

ROOT = os.geteuid() == 0


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    with open_imap_backend({}) as running:
        yield running


@pytest.fixture
def view(backend):
    with Mailbox(backend.store, backend.address_book, default_within=15) as mailbox:
        yield mailbox


def raw_mail(to: str, subject: str, *, to_header: str = "") -> bytes:
    return (f"From: App <app@example.test>\r\nTo: {to_header or to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@example.test>\r\n\r\nHello {to}\r\n").encode()


def lmtp_deliver(dovecot: Dovecot, rcpt: str, subject: str, **kwargs) -> float:
    """Straight into Dovecot (no Postfix): returns when Dovecot has stored it."""
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, timeout=10) as lmtp:
        lmtp.sendmail("app@example.test", [rcpt], raw_mail(rcpt, subject, **kwargs))
    return time.time()


def account_options(dovecot: Dovecot, **overrides) -> dict:
    options = {"host": dovecot.host, "port": str(dovecot.imap_port), "tls": "plain", "user": "qa",
               "password": dovecot.users["qa"], "folder": "", "address": "qa@mailproof.test"}
    options.update(overrides)
    return options


def inbox(dovecot: Dovecot) -> list:
    with MailBoxUnencrypted(dovecot.host, dovecot.imap_port, timeout=5).login("qa", dovecot.users["qa"]) as box:
        return list(box.fetch(mark_seen=False, bulk=True))


def established_to(port: int) -> int:
    """Client-side TCP connections to ``port`` open right now (from /proc/net/tcp)."""
    return len([s for s in tcp_sockets("ESTABLISHED") if s[3] == port])


# -- settings ------------------------------------------------------------------------------------

EXTERNAL = {"host": "imap.example.com", "user": "qa@example.com", "password": "pw"}


def test_settings_defaults_and_derivations():
    account = ImapAccount.from_options({**EXTERNAL, "port": "", "tls": "", "folder": "", "address": ""})
    assert (account.port, account.tls, account.folder, account.address) == (993, "ssl", "INBOX", "qa@example.com")
    assert ImapAccount.from_options({**EXTERNAL, "tls": "STARTTLS"}).port == 143
    assert "pw" not in repr(account)


@pytest.mark.parametrize("override, setting", [
    ({"tls": "tls1.3"}, "mailproof_imap_tls"),
    ({"tls": "plain"}, "mailproof_imap_tls"),  # clear text to a non-loopback host
    ({"port": "imaps"}, "mailproof_imap_port"),
    ({"port": "70000"}, "mailproof_imap_port"),
    ({"password": ""}, "MAILPROOF_IMAP_PASSWORD"),
    ({"user": ""}, "mailproof_imap_user"),
    ({"user": "qa", "address": ""}, "mailproof_imap_address"),
    ({"address": "qa+x@example.com"}, "mailproof_imap_address"),
    ({"address": "not-an-address"}, "mailproof_imap_address"),
    ({"host": "imaps://imap.example.com"}, "mailproof_imap_host"),
])
def test_bad_settings_name_the_setting_to_fix(override, setting):
    with pytest.raises(MailproofError, match=setting):
        ImapAccount.from_options({**EXTERNAL, **override})


def test_recipients_come_from_the_most_precise_header_and_match_exactly():
    from email.parser import BytesHeaderParser

    def parse(text: str):
        return BytesHeaderParser().parsebytes(text.encode())

    copy = parse("Delivered-To: qa+r10@x.test\nDelivered-To: qa+old@x.test\nTo: qa+r1@x.test, qa+r10@x.test\n\n")
    assert recipients_for(copy, "qa", "x.test") == ["qa+r10@x.test"]  # topmost Delivered-To only
    assert recipients_for(parse("X-Original-To: qa+a@x.test\nDelivered-To: qa@x.test\n\n"), "qa", "x.test") == ["qa+a@x.test"]
    assert recipients_for(parse("To: QA+R1@X.TEST, qab+r1@x.test, qa+r1@y.test\n\n"), "qa", "x.test") == ["qa+r1@x.test"]
    assert recipients_for(parse("To: someone@else.test\n\n"), "qa", "x.test") == []


def test_fetch_replies_and_uid_sets():
    from mailproof.imap.headers import _fetch_dates, _parse_fetch, _uid_set

    assert _uid_set([9, 1, 3, 2, 7, 10, 3]) == "1:3,7,9:10"
    assert _uid_set([5]) == "5"
    body = (b'7 (UID 42 INTERNALDATE "17-Jul-1996 02:44:25 -0700" BODY[] {5}', b"hello")
    dates = _fetch_dates([b'7 (UID 42 INTERNALDATE "17-Jul-1996 02:44:25 -0700")', b"8 (UID 43)", b")"])
    assert [uid for uid, _ in dates] == [42, 43] and dates[1][1] is None
    assert dates[0][1] == 837596665.0  # 1996-07-17T09:44:25Z
    # The closing b")" and a FLAGS update carry no message.
    assert list(_parse_fetch([body, b")", b"7 (FLAGS (\\Seen))"])) == [(42, 837596665.0, b"hello")]


# -- the private stack ---------------------------------------------------------------------------


def test_private_backend_shape(backend):
    assert backend.name == "imap"
    assert backend.smtp_host == "127.0.0.1" and isinstance(backend.smtp_port, int)
    assert isinstance(backend.faults, Faults)
    # Behind Postfix no sink sees the SMTP session: a rule must fail loudly, never silently not fire.
    assert isinstance(backend.faults, NoFaults if ROOT else FaultPlan)
    if ROOT:
        with pytest.raises(FaultError, match="cannot be injected"):
            backend.faults.rule("rcpt", "451 4.3.0 later")
    assert (backend.address_book.local, backend.address_book.domain) == ("qa", "mailproof.test")
    assert backend.address_book.address("signup").startswith("qa+signup.")
    assert (backend.postfix is not None) == ROOT and (backend.relay is not None) == (not ROOT)
    assert backend.connections_opened >= 1


def test_lmtp_delivery_is_seen_by_the_watcher_without_marking_it_read(backend, view):
    address = view.address("lmtp")
    delivered = lmtp_deliver(backend.dovecot, address, "straight to dovecot")
    msg = view.wait_for(address, subject="straight to dovecot")
    assert msg.source == "imap" and msg.rcpt_tos == (address,)
    assert msg.mail_from == "app@example.test"
    assert isinstance(msg.extra["uid"], int) and msg.extra["folder"] == "INBOX"
    assert msg.received_at >= delivered - 0.001
    flags = {m.uid: m.flags for m in inbox(backend.dovecot)}
    assert "\\Seen" not in flags[str(msg.extra["uid"])]


def test_smtp_through_the_relay_to_imap_end_to_end(backend, view):
    address = view.address("signup")
    trigger = view.mark()
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port) as smtp:
        smtp.sendmail("app@example.test", [address], raw_mail(address, "Confirm your account"))
    msg = view.wait_for(address, subject="Confirm", within=10)
    assert msg.triggered_at == trigger and 0 < msg.latency < 10
    by = [hop["by"] for hop in msg.extra["hops"]]
    if ROOT:  # Postfix's hop, then Dovecot's, oldest first, each with a time
        assert by == ["smtp.mailproof.test", "imap.mailproof.test"]
    else:
        assert by[-1] == "imap.mailproof.test"
    assert all(abs(hop["at"] - trigger) < 5 for hop in msg.extra["hops"])


def test_plus_addresses_are_routed_exactly(backend, view):
    run = backend.address_book.run_id
    # Hand-made addresses: the AddressBook never makes one a prefix of another, on purpose.
    r1, r10 = f"qa+r1.{run}@mailproof.test", f"qa+r10.{run}@mailproof.test"
    with ThreadPoolExecutor(2) as pool:
        want_r1 = pool.submit(view.wait_for, r1, within=15)
        want_r10 = pool.submit(view.wait_for, r10, within=15)
        # The r10 copy names r1 in To: as well; only its Delivered-To decides.
        lmtp_deliver(backend.dovecot, r10, "for r10", to_header=f"{r1}, {r10}")
        lmtp_deliver(backend.dovecot, r1, "for r1")
        assert want_r10.result().subject == "for r10"
        assert want_r1.result().subject == "for r1"
    assert [m.subject for m in view.received(to=r1)] == ["for r1"]


def test_200_concurrent_waiters_share_one_imap_connection(backend, view):
    before = backend.connections_opened
    addresses = [view.address(f"burst{i}") for i in range(200)]
    with ThreadPoolExecutor(200) as pool:
        waits = [pool.submit(view.wait_for, address, within=30) for address in addresses]
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port) as smtp:
            for index, address in enumerate(addresses):
                smtp.sendmail("app@example.test", [address], raw_mail(address, f"burst #{index}"))
        results = [wait.result() for wait in waits]
        during = established_to(backend.dovecot.imap_port)
    assert [m.subject for m in results] == [f"burst #{i}" for i in range(200)]
    assert len({m.extra["uid"] for m in results}) == 200
    assert backend.connections_opened == before <= 2
    assert during <= 2  # server side too: the watcher's connection (and nothing per waiter)


def test_a_pending_wait_is_served_by_noop_not_by_idle(backend, view):
    """Dovecot's IDLE reports news 0.5 s after delivery; with a waiter pending the watcher
    NOOPs instead, so a direct LMTP delivery (no Postfix nudge) is seen well before that."""
    address = view.address("fast")
    registered = threading.Event()
    backend.store.add_waiter_listener(registered.set)
    noops = backend.watcher.noops
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: (view.wait_for(address, within=10), time.time()))
            assert registered.wait(10)
            delivered = lmtp_deliver(backend.dovecot, address, "fast path")
            msg, resumed = waiting.result()
    finally:
        backend.store.remove_waiter_listener(registered.set)
    assert msg.subject == "fast path"
    assert resumed - delivered < 0.45, "IDLE-speed: the NOOP cadence did not engage"
    assert backend.watcher.noops > noops


def test_dovecot_restart_during_a_wait_loses_and_duplicates_nothing(backend, view):
    first, second = view.address("restart"), view.address("restart")
    lmtp_deliver(backend.dovecot, first, "before the restart")
    view.wait_for(first)
    before = backend.connections_opened
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(view.wait_for, second, within=20)
        backend.dovecot.restart()  # the watcher's connection drops here
        lmtp_deliver(backend.dovecot, second, "after the restart")
        assert waiting.result().subject == "after the restart"
    assert backend.connections_opened > before
    assert backend.watcher.reconnects >= 1
    assert len(view.received(to=first)) == 1 and len(view.received(to=second)) == 1
    uids = Counter(m.extra["uid"] for m in backend.store.since(0) if m.extra["uidvalidity"] == backend.watcher.uidvalidity)
    assert all(count == 1 for count in uids.values())


def test_a_new_uidvalidity_is_rescanned_without_duplicates(backend, view):
    first, second = view.address("uidv"), view.address("uidv")
    lmtp_deliver(backend.dovecot, first, "under the old uidvalidity")
    view.wait_for(first)
    old = backend.watcher.uidvalidity
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(view.wait_for, second, within=20)
        backend.dovecot.restart(reset_uids=True)
        lmtp_deliver(backend.dovecot, second, "under the new uidvalidity")
        assert waiting.result().subject == "under the new uidvalidity"
    assert backend.watcher.uidvalidity != old
    assert len(view.received(to=first)) == 1, "the rescan must not deliver known mail again"


def test_a_plain_mailstore_without_the_waiter_hook_still_works(backend):
    """Fallback path: the watcher reads the store's waiters itself (no push from the store)."""
    store = MailStore()
    book = AddressBook("mailproof.test", local="qa")
    watcher = ImapWatcher(ImapAccount.from_options(account_options(backend.dovecot)), store).start()
    try:
        with Mailbox(store, book) as mailbox:
            address = mailbox.address("plain")
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(mailbox.wait_for, address, within=10)
                lmtp_deliver(backend.dovecot, address, "plain store")
                assert waiting.result().subject == "plain store"
    finally:
        watcher.stop()


# -- bad settings fail fast ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dovecot():
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tempfile.mkdtemp(prefix="mailproof-tls-", dir="/tmp")
    os.chmod(directory, 0o755)  # Dovecot reads the key as root at start; 0755 like its own dir
    cert, key, ca_file = (os.path.join(directory, name) for name in ("cert.pem", "key.pem", "ca.pem"))
    server_cert.cert_chain_pems[0].write_to_path(cert)
    server_cert.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    try:
        with Dovecot(users={"qa": "tls-secret"}, tls_cert=cert, tls_key=key) as dovecot:
            dovecot.ca_file = ca_file
            yield dovecot
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("override, setting, why", [
    ({"password": "not-the-password-7f3a"}, "MAILPROOF_IMAP_PASSWORD", "refused"),
    ({"port": "free"}, "mailproof_imap_port", "refused the connection"),
    ({"tls": "ssl"}, "mailproof_imap_tls", "TLS handshake"),
    ({"tls": "starttls"}, "mailproof_imap_tls", "STARTTLS"),
    ({"folder": "Missing/Folder"}, "mailproof_imap_folder", "Existing folders: INBOX"),
])
def test_bad_settings_fail_fast_and_clearly(backend, override, setting, why):
    if override.get("port") == "free":
        override = {"port": str(free_port())}
    started = time.monotonic()
    with pytest.raises(MailproofError, match=setting) as failure:
        with open_imap_backend(account_options(backend.dovecot, **override)):
            pass
    assert why in str(failure.value)
    assert time.monotonic() - started < CONNECT_TIMEOUT + 1
    if "password" in override:
        assert "mailproof_imap_password" in str(failure.value)
        assert "not-the-password-7f3a" not in str(failure.value)  # never echo a password


def test_plain_against_a_tls_port_times_out_naming_the_tls_setting(tls_dovecot):
    started = time.monotonic()
    options = account_options(tls_dovecot, port=str(tls_dovecot.imaps_port), timeout="1")
    with pytest.raises(MailproofError, match="mailproof_imap_tls"):
        with open_imap_backend(options):
            pass
    assert time.monotonic() - started < 3


def test_tls_and_starttls_work_with_a_trusted_ca_and_fail_clearly_without(tls_dovecot):
    implicit = account_options(tls_dovecot, port=str(tls_dovecot.imaps_port), tls="ssl", ca_file=tls_dovecot.ca_file)
    starttls = account_options(tls_dovecot, tls="starttls", ca_file=tls_dovecot.ca_file)
    for options in (implicit, starttls):
        with open_imap_backend(options) as external:
            assert external.connections_opened == 1 and external.smtp_host is None
    with pytest.raises(MailproofError, match="does not trust"):
        with open_imap_backend({**implicit, "ca_file": ""}):
            pass


# -- cleanup -------------------------------------------------------------------------------------


def test_cleanup_deletes_only_this_runs_messages(backend, view):
    dovecot = backend.dovecot
    other_run = view.address("other-run")  # the module backend's run: a concurrent run, same inbox
    foreign = "qa+foreign.zzzzzz.000001@mailproof.test"
    with open_imap_backend(account_options(dovecot)) as run:
        assert run.smtp_host is None and run.smtp_port is None
        with Mailbox(run.store, run.address_book) as mailbox:
            ours = [mailbox.address("cleanup") for _ in range(3)]
            for index, address in enumerate(ours):
                lmtp_deliver(dovecot, address, f"ours {index}")
            lmtp_deliver(dovecot, foreign, "foreign plus-address")
            lmtp_deliver(dovecot, "qa@mailproof.test", "foreign bare address")
            lmtp_deliver(dovecot, other_run, "another run's mail")
            for address in ours:
                mailbox.wait_for(address)
            mailbox.wait_for(other_run)  # seen by this watcher too, but not this run's to delete
        watcher = run.watcher
    assert watcher.cleanup_report == {"to_delete": 3, "deleted": 3, "left": 0, "reason": None}
    remaining = {m.subject: m for m in inbox(dovecot)}
    assert not [s for s in remaining if s.startswith("ours ")]
    for subject in ("foreign plus-address", "foreign bare address", "another run's mail"):
        assert subject in remaining and "\\Deleted" not in remaining[subject].flags
    assert view.wait_for(other_run).subject == "another run's mail"  # still there for its own run


def test_private_backend_stops_every_server_it_started():
    with open_imap_backend({}) as private:
        pids = [server.pid for server in (private.dovecot, private.postfix) if server is not None]
        directories = [server.directory for server in (private.dovecot, private.postfix) if server is not None]
        watcher = private.watcher
    assert not watcher.running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not live_group_members(pid)
    assert not any(directory.exists() for directory in directories)
