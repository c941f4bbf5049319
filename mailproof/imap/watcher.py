"""The watcher: one IMAP connection per account, feeding a MailStore as mail arrives.

One watcher per account holds ONE IMAP connection, whatever the number of waiters (Dovecot
allows 10 per user and IP). It takes a baseline (UIDVALIDITY and the highest UID at start),
then learns of new mail and fetches only UIDs above the last one seen, with BODY.PEEK (the
\\Seen flag is left alone), and delivers each message to the store, which wakes the waiters.

How new mail is noticed (numbers from benchmarks/imap_latency.py: 200 messages one at a time,
Postfix -> Dovecot LMTP -> IMAP, latency from Postfix's 250 to ``wait_for`` returning):

- No waiter pending: IDLE. Dovecot reports news in IDLE 0.5 s after delivery (a fixed notify
  delay in its source: IDLE-only measured p50 507 ms, p99 521 ms), but nobody waits for it
  then, and IDLE costs nothing.
- A waiter pending (the store tells the watcher the moment a wait begins): leave IDLE at once
  and send NOOP every ``noop_interval`` until no waiter is left. A NOOP makes Dovecot sync the
  mailbox and answer EXISTS at once. Measured p50/p99: every 5 ms 7.5/10.1 ms (182 NOOP/s,
  ~3% of a core in Dovecot), 10 ms 12.6/16.6, 20 ms 23.5/25.9 (49 NOOP/s, ~1% CPU), 50 ms
  52.9/57.3. The default is 20 ms on loopback (250 ms for a remote provider, which should not
  get 50 commands a second from a test run).
  This cadence is the one place mailproof waits on a short timer instead of a push, and only
  because IMAP has no faster push: IDLE is Dovecot's push and it is late by design.
- ``nudge()``: a caller that knows a message was just delivered (the private servers: wiring
  and measured latency in mailproof/imap/backend.py) makes the watcher NOOP at once.

The watcher reconnects by itself when the server drops the connection (Dovecot restart):
bounded exponential backoff, re-login, UIDVALIDITY check, then it continues from the last UID
it delivered, so nothing is lost or delivered twice; waits in progress simply keep waiting.
A new UIDVALIDITY means a rescan since start, skipping by content what was delivered already.

At stop it deletes the messages addressed to this run's addresses, and only those, by UID:
``UID STORE +FLAGS.SILENT (\\Deleted)`` then ``UID EXPUNGE`` (UIDPLUS) on those UIDs. Never a
plain EXPUNGE (imap-tools' ``delete()`` expunges the whole folder, other runs' mail included).
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import logging
import select
import socket
import ssl
import threading
import time
from typing import Optional

from mailproof.addresses import is_handed_out_by
from mailproof.errors import MailproofError
from mailproof.imap.account import ImapAccount
from mailproof.imap.connection import COMMAND_TIMEOUT, connect, login_and_select
from mailproof.imap.headers import (_fetch_dates, _parse_fetch, _return_path, _uid_set, parse_headers,
                                    parse_hops, recipients_for)
from mailproof.mailbox import MailStore
from mailproof.message import Message
from mailproof.net import is_loopback

log = logging.getLogger("mailproof.imap")

NOOP_INTERVAL_LOOPBACK = 0.02  # measured (module docstring): ~1% CPU, p50 +20 ms without a nudge
NOOP_INTERVAL_REMOTE = 0.25  # a shared provider should not get 50 NOOPs a second from a test run
IDLE_RENEW = 25 * 60  # RFC 2177: re-issue IDLE before 29 minutes
IDLE_FALLBACK_INTERVAL = 1.0  # servers without IDLE: NOOP this often when no one waits
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 2.0
UID_CHUNK = 500  # UIDs per STORE/EXPUNGE command at cleanup

_EXISTS_CHANGES = ("EXISTS",)


class _Dropped(Exception):
    """The connection is gone (server restart, network): reconnect."""


class ImapWatcher:
    """One IMAP connection for one account, feeding ``store``.

    ``strategy``: ``"hybrid"`` (IDLE while nobody waits, NOOP every ``noop_interval`` while
    someone does; the default) or ``"idle"`` (IDLE only: the baseline the benchmark compares).
    ``cleanup_run_id``: at stop, delete the messages addressed to this run's addresses.
    """

    def __init__(self, account: ImapAccount, store: MailStore, *, strategy: str = "hybrid",
                 noop_interval: Optional[float] = None, cleanup_run_id: Optional[str] = None) -> None:
        if strategy not in ("hybrid", "idle"):
            raise ValueError("strategy must be 'hybrid' or 'idle'")
        self.account = account
        self.store = store
        self.strategy = strategy
        self.noop_interval = noop_interval if noop_interval is not None else (
            NOOP_INTERVAL_LOOPBACK if is_loopback(account.host) else NOOP_INTERVAL_REMOTE)
        self.cleanup_run_id = cleanup_run_id
        self.connections_opened = 0
        self.reconnects = 0
        self.delivered = 0
        self.noops = 0
        self.idles = 0
        self.last_error: Optional[str] = None
        self.uidvalidity: Optional[int] = None
        self.last_uid = 0
        self.cleanup_report: dict = {}
        self._mailbox = None
        self._capabilities: frozenset = frozenset()
        self._started_at = 0.0
        self._fingerprints: dict[bytes, int] = {}  # sha1(raw) -> store seq: dedupe if UIDVALIDITY changes
        self._ours: dict[int, int] = {}  # uid -> store seq, messages of this run (cleanup)
        self._ours_seqs: set[int] = set()
        self._uidvalidity_changed = False
        self._cleanup_wanted = True
        self._nudged = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: Optional[threading.Thread] = None
        store.add_waiter_listener(self.wake)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "ImapWatcher":
        """Connect, log in, select and take the baseline in the caller's thread (so a bad
        setting raises MailproofError here, within the connect timeout), then watch."""
        self._started_at = time.time()
        try:
            self._connect(first=True)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name=f"mailproof-imap-{self.account.user}", daemon=True)
        self._thread.start()
        return self

    def stop(self, cleanup: bool = True) -> None:
        if self._thread is None:
            return
        self._cleanup_wanted = cleanup
        self._stop.set()
        self.wake()
        self._thread.join(COMMAND_TIMEOUT + 10)
        self._thread = None
        self._release()

    def _release(self) -> None:
        self.store.remove_waiter_listener(self.wake)
        self._wake_r.close()
        self._wake_w.close()

    def nudge(self) -> None:
        """Something just delivered into the inbox (the private Postfix logged status=sent, or the
        LMTP relay got its 250): look now, with a NOOP, instead of waiting for IDLE's report."""
        self._nudged = True
        self.wake()

    def wake(self) -> None:
        """Interrupt IDLE or the NOOP pause (a waiter arrived, or stop). Never blocks."""
        try:
            self._wake_w.send(b"!")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed at stop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- connection ------------------------------------------------------------------------------

    def _connect(self, first: bool = False) -> None:
        """Open, log in, select; set or check the baseline. Raises MailproofError (bad
        settings) or _Dropped (server unreachable right now: retry later) when not ``first``."""
        try:
            mailbox = connect(self.account)
            self.connections_opened += 1
            selected = login_and_select(mailbox, self.account)
        except MailproofError as exc:
            if first:
                raise
            raise _Dropped(str(exc)) from exc
        self._capabilities = selected.capabilities
        self._mailbox = mailbox
        self._baseline(selected.uidvalidity, selected.uidnext)

    def _baseline(self, uidvalidity: Optional[int], uidnext: int) -> None:
        """First connection: start after ``uidnext - 1``; later ones: keep ``last_uid`` if UIDVALIDITY holds."""
        if self.uidvalidity is None:
            self.uidvalidity = uidvalidity
            self.last_uid = uidnext - 1
            self._uidvalidity_changed = False
        elif uidvalidity != self.uidvalidity:
            log.warning("IMAP UIDVALIDITY of %s changed (%s -> %s): rescanning by content",
                        self.account.folder, self.uidvalidity, uidvalidity)
            self.uidvalidity = uidvalidity
            self.last_uid = 0
            self._uidvalidity_changed = True
            self._ours.clear()  # old UIDs mean nothing now; the rescan re-learns ours

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        pending_since: Optional[float] = time.time()  # sync once right after connecting
        while not self._stop.is_set():
            try:
                if self._mailbox is None:
                    self._connect()
                    self.reconnects += 1
                    backoff = BACKOFF_FIRST
                    pending_since = time.time()
                    log.info("IMAP watcher reconnected to %s", self.account.describe())
                if pending_since is not None:
                    self._fetch_new(pending_since)
                    pending_since = None
                if self.strategy == "hybrid" and self.store.has_waiters():
                    pending_since = self._noop_tick()
                else:
                    pending_since = self._idle_until_news()
            except (_Dropped, imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError, EOFError) as exc:
                if self._stop.is_set():
                    break
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self._mailbox is not None:
                    log.warning("IMAP connection to %s lost (%s); reconnecting", self.account.describe(), self.last_error)
                else:
                    log.info("IMAP reconnect to %s failed (%s); next try in %.2f s",
                             self.account.describe(), self.last_error, backoff)
                self._drop()
                self._pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception:  # a bug here must not kill the watcher silently
                log.exception("IMAP watcher error; reconnecting")
                self._drop()
                self._pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self._finish()

    def _pause(self, seconds: float) -> bool:
        """Wait up to ``seconds`` or until woken; True when woken."""
        readable, _, _ = select.select([self._wake_r], [], [], seconds)
        if readable:
            self._drain_wake()
            return True
        return False

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _noop_tick(self) -> Optional[float]:
        """One NOOP (a waiter is pending): returns the time news was seen, or None."""
        client = self._mailbox.client
        self._nudged = False
        typ, _ = client.noop()
        self.noops += 1
        if typ != "OK":
            raise _Dropped(f"NOOP answered {typ}")
        if self._take_news(client):
            return time.time()
        self._pause(self.noop_interval)
        return None

    def _idle_until_news(self) -> Optional[float]:
        """IDLE until the server reports news, a waiter arrives, stop, or renewal time."""
        client = self._mailbox.client
        if "IDLE" not in self._capabilities:
            typ, _ = client.noop()
            if self._take_news(client):
                return time.time()
            self._pause(IDLE_FALLBACK_INTERVAL)
            return None
        self._drain_wake()
        tag = client._command("IDLE")
        while client._get_response() is not None:  # until the "+ idling" continuation
            if client.tagged_commands.get(tag):
                typ, data = client.tagged_commands.pop(tag)
                log.warning("IMAP server refused IDLE (%s %s): polling with NOOP instead", typ, data)
                self._capabilities = self._capabilities - {"IDLE"}
                return None
        self.idles += 1
        seen_at = None
        deadline = time.monotonic() + IDLE_RENEW
        tick = None  # a new waiter wakes this loop through the store's waiter listener
        try:
            while not self._stop.is_set():
                if self.strategy == "hybrid" and (self._nudged or self.store.has_waiters()):
                    break
                if not _buffered(client):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    timeout = left if tick is None else min(left, tick)
                    readable, _, _ = select.select([client.sock, self._wake_r], [], [], timeout)
                    if self._wake_r in readable:
                        self._drain_wake()
                        if client.sock not in readable:
                            continue
                    if client.sock not in readable:
                        continue
                client._get_response()
                client._check_bye()
                if "EXISTS" in client.untagged_responses:
                    seen_at = time.time()
                    break
        finally:
            if self._mailbox is not None:
                client.send(b"DONE\r\n")
                while client.tagged_commands.get(tag) is None:
                    client._get_response()
                typ, data = client.tagged_commands.pop(tag)
                if typ != "OK":
                    raise _Dropped(f"IDLE ended with {typ} {data}")
        if self._take_news(client) and seen_at is None:
            seen_at = time.time()
        if self._nudged and seen_at is None:
            self._nudged = False
            typ, _ = client.noop()  # DONE may answer before the new mail is synced
            self.noops += 1
            if self._take_news(client):
                seen_at = time.time()
        return seen_at

    def _take_news(self, client) -> bool:
        """True when the server announced new messages (EXISTS); clears the untagged backlog."""
        client._check_bye()
        news = any(key in client.untagged_responses for key in _EXISTS_CHANGES)
        client.untagged_responses.clear()
        return news

    def _fetch_new(self, seen_at: float) -> None:
        """Fetch and deliver every message above ``last_uid`` (or, after a UIDVALIDITY change, every
        message since start not delivered yet), in UID order."""
        client = self._mailbox.client
        if self._uidvalidity_changed:
            self._rescan(client, seen_at)
            self._uidvalidity_changed = False
            return
        typ, data = client.uid("FETCH", f"{self.last_uid + 1}:*", "(UID INTERNALDATE BODY.PEEK[])")
        if typ != "OK":
            raise _Dropped(f"UID FETCH answered {typ} {data}")
        # "N:*" returns the last message even when nothing is above N: filter ourselves.
        for uid, internaldate, raw in sorted(_parse_fetch(data)):
            if uid > self.last_uid:
                self._deliver(uid, internaldate, raw, seen_at)
                self.last_uid = uid

    def _rescan(self, client, seen_at: float) -> None:
        typ, data = client.uid("FETCH", "1:*", "(UID INTERNALDATE)")
        if typ != "OK":
            raise _Dropped(f"UID FETCH answered {typ}")
        since = self._started_at - 2  # INTERNALDATE has whole seconds
        entries = _fetch_dates(data)  # (uid, internaldate)
        highest = max((uid for uid, _ in entries), default=0)
        wanted = sorted(uid for uid, when in entries if when is None or when >= since)
        for chunk_start in range(0, len(wanted), UID_CHUNK):
            chunk = wanted[chunk_start:chunk_start + UID_CHUNK]
            typ, data = client.uid("FETCH", _uid_set(chunk), "(UID INTERNALDATE BODY.PEEK[])")
            for uid, internaldate, raw in sorted(_parse_fetch(data)):
                known_seq = self._fingerprints.get(hashlib.sha1(raw).digest())
                if known_seq is not None:
                    if known_seq in self._ours_seqs:
                        self._ours[uid] = known_seq  # still ours to clean up, under its new UID
                    continue
                self._deliver(uid, internaldate, raw, seen_at)
        self.last_uid = max(self.last_uid, highest)

    def _deliver(self, uid: int, internaldate: Optional[float], raw: bytes, seen_at: float) -> None:
        headers = parse_headers(raw)
        rcpts = recipients_for(headers, self.account.local, self.account.domain)
        extra = {
            "uid": uid,
            "uidvalidity": self.uidvalidity,
            "folder": self.account.folder,
            "internaldate": internaldate,
            "hops": parse_hops(headers),
        }
        msg = Message(raw, rcpt_tos=rcpts, received_at=seen_at, source="imap",
                      mail_from=_return_path(headers), extra=extra)
        self.store.deliver(msg)
        self.delivered += 1
        self._fingerprints[hashlib.sha1(raw).digest()] = msg.seq
        if self.cleanup_run_id and any(is_handed_out_by(r, self.cleanup_run_id) for r in rcpts):
            self._ours[uid] = msg.seq
            self._ours_seqs.add(msg.seq)

    # -- stop and cleanup ------------------------------------------------------------------------

    def _drop(self) -> None:
        mailbox, self._mailbox = self._mailbox, None
        if mailbox is not None:
            with contextlib.suppress(Exception):
                mailbox.client.shutdown()

    def _finish(self) -> None:
        try:
            if self._mailbox is not None:
                # Mail that arrived since the last sync: into the store, and into the cleanup.
                with contextlib.suppress(Exception):
                    self._fetch_new(time.time())
            if self._cleanup_wanted and self.cleanup_run_id is not None:
                self._cleanup()
        finally:
            mailbox, self._mailbox = self._mailbox, None
            if mailbox is not None:
                with contextlib.suppress(Exception):
                    mailbox.logout()
                with contextlib.suppress(Exception):
                    mailbox.client.shutdown()

    def _cleanup(self) -> None:
        """Delete this run's messages by UID: STORE \\Deleted then UID EXPUNGE on those UIDs only."""
        uids = sorted(self._ours)
        report = {"to_delete": len(uids), "deleted": 0, "left": 0, "reason": None}
        self.cleanup_report = report
        if not uids:
            return
        try:
            if self._mailbox is None:
                self._connect()
            client = self._mailbox.client
            if "UIDPLUS" not in self._capabilities:
                report.update(left=len(uids), reason="the server lacks UIDPLUS (no UID EXPUNGE); "
                              "messages left in place rather than expunging the whole folder")
                log.warning("IMAP cleanup skipped on %s: %s", self.account.describe(), report["reason"])
                return
            for start in range(0, len(uids), UID_CHUNK):
                chunk = _uid_set(uids[start:start + UID_CHUNK])
                typ, data = client.uid("STORE", chunk, "+FLAGS.SILENT", r"(\Deleted)")
                if typ != "OK":
                    raise imaplib.IMAP4.error(f"UID STORE answered {typ} {data}")
                typ, data = client.uid("EXPUNGE", chunk)
                if typ != "OK":
                    raise imaplib.IMAP4.error(f"UID EXPUNGE answered {typ} {data}")
                report["deleted"] += len(uids[start:start + UID_CHUNK])
        except Exception as exc:  # cleanup is best effort; say what was left
            report["left"] = len(uids) - report["deleted"]
            report["reason"] = f"{type(exc).__name__}: {exc}"
            log.warning("IMAP cleanup on %s left %d message(s): %s", self.account.describe(),
                        report["left"], report["reason"])


def _buffered(client) -> bool:
    """True when bytes from the server already sit in imaplib's (or the TLS layer's) buffer,
    where select() on the socket cannot see them."""
    sock = client.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    old = sock.gettimeout()
    sock.settimeout(0)
    try:
        return bool(client.file.peek(1))
    except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
        return False
    finally:
        sock.settimeout(old)
