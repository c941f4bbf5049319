"""The IMAP backend: a real inbox (Dovecot, or a staging account) feeding a MailStore.

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
- Private servers also push: Postfix's "status=sent" log line (or the LMTP relay's 250) nudges
  the watcher to NOOP at once. With the nudge (the default): p50 6.1 ms, p99 16.5 ms, of
  which ~4 ms is Postfix handing the message to Dovecot; 83x faster than IDLE at p50.

The watcher reconnects by itself when the server drops the connection (Dovecot restart):
bounded exponential backoff, re-login, UIDVALIDITY check, then it continues from the last UID
it delivered, so nothing is lost or delivered twice; waits in progress simply keep waiting.

At stop it deletes the messages addressed to this run's addresses, and only those, by UID:
``UID STORE +FLAGS.SILENT (\\Deleted)`` then ``UID EXPUNGE`` (UIDPLUS) on those UIDs. Never a
plain EXPUNGE (imap-tools' ``delete()`` expunges the whole folder, other runs' mail included).

``open_imap_backend(options)`` is what the pytest plugin calls for ``--mailbox=imap``. With no
host it starts a private Dovecot (user ``qa``, domain ``mailproof.test``), behind a private
Postfix when running as root, else behind an LMTP relay sink.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hashlib
import imaplib
import logging
import os
import re
import secrets
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, Iterator, Mapping, Optional

from mailproof.extras import require

require("imap_tools", "the IMAP backend (--mailbox=imap)")

from imap_tools import MailBox, MailBoxStartTls, MailBoxUnencrypted  # noqa: E402
from imap_tools.errors import MailboxLoginError, MailboxStarttlsError

from mailproof.faults import Faults, NoFaults
from mailproof.addresses import AddressBook, is_handed_out_by
from mailproof.errors import MailproofError
from mailproof.mailbox import MailStore
from mailproof.net import is_loopback
from mailproof.message import Message

log = logging.getLogger("mailproof.imap")

TLS_MODES = ("ssl", "starttls", "plain")
CONNECT_TIMEOUT = 5.0  # connect, TLS handshake, greeting, login: a bad setting fails within this
COMMAND_TIMEOUT = 30.0  # once logged in: a server silent this long is treated as gone
NOOP_INTERVAL_LOOPBACK = 0.02  # measured (module docstring): ~1% CPU, p50 +20 ms without a nudge
NOOP_INTERVAL_REMOTE = 0.25  # a shared provider should not get 50 NOOPs a second from a test run
IDLE_RENEW = 25 * 60  # RFC 2177: re-issue IDLE before 29 minutes
IDLE_FALLBACK_INTERVAL = 1.0  # servers without IDLE: NOOP this often when no one waits
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 2.0
UID_CHUNK = 500  # UIDs per STORE/EXPUNGE command at cleanup
PRIVATE_DOMAIN = "mailproof.test"
PRIVATE_USER = "qa"

_EXISTS_CHANGES = ("EXISTS",)
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_INTERNALDATE = re.compile(rb'INTERNALDATE "([^"]+)"')
_RECEIVED_FROM = re.compile(r"\bfrom\s+(\S+)", re.IGNORECASE)
_RECEIVED_BY = re.compile(r"\bby\s+(\S+)", re.IGNORECASE)
_RECEIVED_WITH = re.compile(r"\bwith\s+(\S+)", re.IGNORECASE)
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def setting_name(key: str) -> str:
    """How a user sets ``key``: the ini key and the environment variable."""
    return f"mailproof_imap_{key} / MAILPROOF_IMAP_{key.upper()}"


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImapAccount:
    """One IMAP inbox and how to reach it. Build it with ``from_options`` (validates)."""

    host: str
    port: int
    tls: str
    user: str
    password: str = ""
    folder: str = "INBOX"
    address: str = ""
    ca_file: Optional[str] = None  # extra CA to trust (tests with a trustme CA); else system CAs
    timeout: float = CONNECT_TIMEOUT

    def __repr__(self) -> str:  # never print the password
        return (f"ImapAccount(host={self.host!r}, port={self.port}, tls={self.tls!r}, user={self.user!r}, "
                f"folder={self.folder!r}, address={self.address!r})")

    @property
    def local(self) -> str:
        return self.address.rsplit("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port} ({self.tls}, folder {self.folder!r})"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ImapAccount":
        """Validate the plugin's settings (all strings, possibly empty). Errors name the setting."""
        get = lambda key: str(options.get(key) or "").strip()  # noqa: E731
        host = get("host")
        if not host:
            raise MailproofError(f"no IMAP host: set {setting_name('host')} (leave it empty only for the private Dovecot)")
        if "://" in host or "/" in host or " " in host:
            raise MailproofError(f"invalid IMAP host {host!r}: give a bare host name such as imap.example.com ({setting_name('host')})")
        tls = get("tls").lower() or "ssl"
        if tls not in TLS_MODES:
            raise MailproofError(f"invalid IMAP tls mode {tls!r}: use ssl, starttls or plain ({setting_name('tls')})")
        if tls == "plain" and not is_loopback(host):
            raise MailproofError(
                f"tls=plain would send the IMAP password in clear to {host}: plain is for loopback test "
                f"servers only; use ssl or starttls ({setting_name('tls')})"
            )
        port_text = get("port")
        if port_text:
            try:
                port = int(port_text)
            except ValueError:
                port = 0
            if not 0 < port < 65536:
                raise MailproofError(f"invalid IMAP port {port_text!r}: a number from 1 to 65535 ({setting_name('port')})")
        else:
            port = 993 if tls == "ssl" else 143
        user = get("user")
        if not user:
            raise MailproofError(f"no IMAP user: set {setting_name('user')}")
        password = str(options.get("password") or "")
        if not password:
            raise MailproofError(f"no IMAP password for {user!r}: set {setting_name('password')} (prefer the environment variable)")
        folder = get("folder") or "INBOX"
        address = get("address").lower() or (user.lower() if "@" in user else "")
        if not address:
            raise MailproofError(
                f"no address for the IMAP inbox: set {setting_name('address')} to the inbox's own "
                "address (test addresses plus-address it: local+token@domain)"
            )
        local, _, domain = address.rpartition("@")
        if not local or not domain or "." not in domain or " " in address:
            raise MailproofError(f"invalid inbox address {address!r}: expected local@domain ({setting_name('address')})")
        if "+" in local:
            raise MailproofError(
                f"the inbox address {address!r} already has a +detail: give the bare address, mailproof "
                f"adds +token itself ({setting_name('address')})"
            )
        ca_file = get("ca_file") or None
        if ca_file and not os.path.isfile(ca_file):
            raise MailproofError(f"CA file {ca_file!r} not found (IMAP ca_file)")
        timeout = float(options.get("timeout") or CONNECT_TIMEOUT)
        return cls(host=host, port=port, tls=tls, user=user, password=password, folder=folder,
                   address=address, ca_file=ca_file, timeout=timeout)


# -- parsing helpers ------------------------------------------------------------------------------


def parse_hops(headers) -> list[dict]:
    """The Received: chain, oldest hop first: ``{"from", "by", "with", "at"}`` (``at`` is epoch
    seconds, None when the date is missing or broken; Postfix and Dovecot write whole seconds)."""
    hops = []
    for value in reversed(headers.get_all("Received") or []):
        text = " ".join(str(value).split())
        head, _, date = text.rpartition(";")
        at = None
        if date.strip():
            try:
                at = parsedate_to_datetime(date.strip()).timestamp()
            except (TypeError, ValueError, IndexError):
                at = None
        head = head or text
        hop = {}
        for key, regex in (("from", _RECEIVED_FROM), ("by", _RECEIVED_BY), ("with", _RECEIVED_WITH)):
            found = regex.search(head)
            hop[key] = found.group(1) if found else None
        hop["at"] = at
        hops.append(hop)
    return hops


def recipients_for(headers, local: str, domain: str) -> list[str]:
    """The recipients of this copy that belong to the inbox ``local@domain`` (plus-addresses).

    Taken from the first header kind that names one, most precise first: X-Original-To (Postfix
    local/virtual delivery), the topmost Delivered-To (Dovecot LMTP writes it per copy), then
    To/Cc (providers that add neither). The address match is exact, so ``qa+r1`` never takes
    mail for ``qa+r10``.
    """
    local, domain = local.lower(), domain.lower()

    def ours(address: str) -> bool:
        addr_local, _, addr_domain = address.lower().rpartition("@")
        return addr_domain == domain and (addr_local == local or addr_local.startswith(local + "+"))

    for names, top_only in ((("X-Original-To",), True), (("Delivered-To",), True), (("To", "Cc"), False)):
        values: list[str] = []
        for name in names:
            found = headers.get_all(name) or []
            values.extend(found[:1] if top_only else found)
        addresses = [addr.strip().lower() for _, addr in getaddresses([str(v) for v in values]) if addr]
        matching = [a for a in addresses if ours(a)]
        if matching:
            return list(dict.fromkeys(matching))
    return []


def _uid_set(uids) -> str:
    """Compact IMAP sequence set: 1:3,7,9:10."""
    ordered = sorted(set(uids))
    parts = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


# -- the watcher ---------------------------------------------------------------------------------


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

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.account.ca_file:
            context.load_verify_locations(self.account.ca_file)
        return context

    def _connect(self, first: bool = False) -> None:
        """Open, log in, select; set or check the baseline. Raises MailproofError (bad
        settings) or _Dropped (server unreachable right now: retry later) when not ``first``."""
        acct = self.account
        where = f"{acct.host}:{acct.port}"
        try:
            try:
                if acct.tls == "ssl":
                    mailbox = MailBox(acct.host, acct.port, timeout=acct.timeout, ssl_context=self._ssl_context())
                elif acct.tls == "starttls":
                    mailbox = MailBoxStartTls(acct.host, acct.port, timeout=acct.timeout, ssl_context=self._ssl_context())
                else:
                    mailbox = MailBoxUnencrypted(acct.host, acct.port, timeout=acct.timeout)
            except socket.gaierror as exc:
                raise MailproofError(f"cannot resolve the IMAP host {acct.host!r}: {exc}. Check {setting_name('host')}") from exc
            except ssl.SSLCertVerificationError as exc:
                raise MailproofError(
                    f"the IMAP server {where} presented a certificate this machine does not trust "
                    f"({exc.verify_message}). Check {setting_name('host')} (the name must match the "
                    "certificate) or trust its CA (SSL_CERT_FILE)"
                ) from exc
            except ssl.SSLError as exc:
                raise MailproofError(
                    f"TLS handshake with {where} failed ({exc.reason or exc}): the port does not speak "
                    f"implicit TLS. Check {setting_name('tls')} (ssl for port 993, starttls or plain for "
                    f"143) and {setting_name('port')}"
                ) from exc
            except (socket.timeout, TimeoutError) as exc:
                raise MailproofError(
                    f"no IMAP greeting from {where} within {acct.timeout:g} s: wrong host/port, a firewall, "
                    f"or a TLS port reached without TLS. Check {setting_name('host')}, {setting_name('port')} "
                    f"and {setting_name('tls')} (tls={acct.tls})"
                ) from exc
            except ConnectionRefusedError as exc:
                raise MailproofError(
                    f"the IMAP server {where} refused the connection: nothing listens there. Check "
                    f"{setting_name('host')} and {setting_name('port')}"
                ) from exc
            except (MailboxStarttlsError, imaplib.IMAP4.error) as exc:
                raise MailproofError(
                    f"IMAP server {where} does not allow STARTTLS ({exc}). Check {setting_name('tls')}: "
                    "ssl for an implicit-TLS port, plain only for loopback test servers"
                ) from exc
            except OSError as exc:
                raise MailproofError(f"cannot reach the IMAP server {where}: {exc}. Check {setting_name('host')} and {setting_name('port')}") from exc
            self.connections_opened += 1
            try:
                self._login_and_select(mailbox)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    mailbox.client.shutdown()
                if isinstance(exc, (imaplib.IMAP4.error, OSError, EOFError)):
                    raise MailproofError(f"the IMAP session with {where} broke during login: {exc}") from exc
                raise
        except MailproofError as exc:
            if first:
                raise
            raise _Dropped(str(exc)) from exc

    def _login_and_select(self, mailbox) -> None:
        acct = self.account
        client = mailbox.client
        try:
            mailbox.login(acct.user, acct.password, initial_folder=None)
        except MailboxLoginError as exc:
            raise MailproofError(
                f"IMAP login as {acct.user!r} at {acct.host}:{acct.port} was refused ({_server_text(exc)}): "
                f"wrong user or password. Check {setting_name('password')} and {setting_name('user')}"
            ) from exc
        except (socket.timeout, TimeoutError) as exc:
            raise MailproofError(f"IMAP login at {acct.host}:{acct.port} got no answer within {acct.timeout:g} s") from exc
        typ, data = client.capability()  # after login: UIDPLUS and friends appear only now
        if typ == "OK" and data and data[0]:
            self._capabilities = frozenset(c.upper() for c in data[0].decode(errors="replace").split())
        else:
            self._capabilities = frozenset(c.upper() for c in client.capabilities)
        try:
            typ, data = client.select(_quote_folder(acct.folder))
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            typ, data = "NO", [str(exc).encode()]
        if typ != "OK":
            folders = []
            with contextlib.suppress(Exception):
                folders = [f.name for f in mailbox.folder.list()]
            raise MailproofError(
                f"IMAP folder {acct.folder!r} cannot be opened for {acct.user!r} "
                f"({(data[0] or b'').decode(errors='replace') if data else typ}). Existing folders: "
                f"{', '.join(folders) or 'none listed'}. Check {setting_name('folder')}"
            )
        uidvalidity = _untagged_int(client, "UIDVALIDITY")
        uidnext = _untagged_int(client, "UIDNEXT")
        if uidnext is None:  # rare servers: ask for the last UID instead
            typ, data = client.uid("SEARCH", "ALL")
            uids = [int(u) for u in (data[0] or b"").split()] if typ == "OK" else []
            uidnext = (max(uids) + 1) if uids else 1
        client.untagged_responses.clear()
        client.sock.settimeout(COMMAND_TIMEOUT)
        self._mailbox = mailbox
        if self.uidvalidity is None:
            self.uidvalidity = uidvalidity
            self.last_uid = uidnext - 1
            self._uidvalidity_changed = False
        elif uidvalidity != self.uidvalidity:
            log.warning("IMAP UIDVALIDITY of %s changed (%s -> %s): rescanning by content",
                        acct.folder, self.uidvalidity, uidvalidity)
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
        entries = []  # (uid, internaldate)
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            uid = _FETCH_UID.search(line) if isinstance(line, bytes) else None
            if uid:
                date = _FETCH_INTERNALDATE.search(line)
                entries.append((int(uid.group(1)), _internaldate(date.group(1)) if date else None))
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
        headers = _HEADER_PARSER.parsebytes(raw)
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


# -- small helpers --------------------------------------------------------------------------------


def _server_text(exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"\[(?:AUTHENTICATIONFAILED|AUTHORIZATIONFAILED)\][^'\"]*", text)
    return found.group(0).strip() if found else text[-200:]


def _quote_folder(folder: str) -> bytes:
    from imap_tools.utils import encode_folder

    return encode_folder(folder)  # modified UTF-7, quoted


def _untagged_int(client, name: str) -> Optional[int]:
    values = client.untagged_responses.get(name) or []
    for value in values:
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None


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


def _internaldate(text: bytes) -> Optional[float]:
    try:
        parsed = imaplib.Internaldate2tuple(b'INTERNALDATE "' + text + b'"')
    except (ValueError, OverflowError):
        return None
    return time.mktime(parsed) if parsed else None


def _parse_fetch(data) -> Iterator[tuple[int, Optional[float], bytes]]:
    for item in data or []:
        if not isinstance(item, tuple) or len(item) < 2:
            continue  # closing b')' or an unsolicited FLAGS update
        head, raw = item[0], item[1]
        uid = _FETCH_UID.search(head)
        if not uid or not isinstance(raw, bytes):
            continue
        date = _FETCH_INTERNALDATE.search(head)
        yield int(uid.group(1)), (_internaldate(date.group(1)) if date else None), raw


def _return_path(headers) -> str:
    value = headers.get("Return-Path")
    if not value:
        return ""
    found = getaddresses([str(value)])
    return found[0][1] if found and found[0][1] else ""


# -- the backend ----------------------------------------------------------------------------------


class ImapBackend:
    """What ``mailproof_backend`` yields for ``--mailbox=imap``.

    ``store`` (fed by the watcher), ``smtp_host``/``smtp_port`` (where the application sends:
    the private Postfix or LMTP relay; None for an external account, whose mail arrives by
    the product's own route), ``faults`` (the relay sink's FaultPlan when there is one, else a
    FaultPlan no server consults), ``address_book`` (plus-addresses on the inbox),
    ``connections_opened`` (IMAP connections so far).
    """

    name = "imap"

    def __init__(self, options: Optional[Mapping[str, Any]] = None, *, strategy: str = "hybrid",
                 noop_interval: Optional[float] = None, relay: str = "auto", nudge: bool = True,
                 store: Optional[MailStore] = None) -> None:
        self.options = dict(options or {})
        self.nudge = nudge
        self.strategy = strategy
        self.noop_interval = noop_interval
        self.relay_kind = relay
        self.store = store if store is not None else MailStore()
        self.faults: Faults = NoFaults("mail reaches this external IMAP account by its own route")
        self.smtp_host: Optional[str] = None
        self.smtp_port: Optional[int] = None
        self.dovecot = None
        self.postfix = None
        self.relay = None
        self.watcher: Optional[ImapWatcher] = None
        self.account: Optional[ImapAccount] = None
        self.address_book: Optional[AddressBook] = None

    @property
    def connections_opened(self) -> int:
        return self.watcher.connections_opened if self.watcher else 0

    @property
    def private(self) -> bool:
        return not str(self.options.get("host") or "").strip()

    def start(self) -> "ImapBackend":
        try:
            if self.private:
                self.account = self._start_private_servers()
            else:
                self.account = ImapAccount.from_options(self.options)
            self.address_book = AddressBook(self.account.domain, local=self.account.local)
            self.watcher = ImapWatcher(self.account, self.store, strategy=self.strategy,
                                       noop_interval=self.noop_interval,
                                       cleanup_run_id=self.address_book.run_id).start()
            if self.nudge:
                self._wire_nudges(self.watcher)
        except BaseException:
            self._stop_servers()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.watcher is not None:
                self.watcher.stop(cleanup=True)
        finally:
            self._stop_servers()

    def __enter__(self) -> "ImapBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_private_servers(self) -> ImapAccount:
        from mailproof.servers.dovecot import Dovecot, DovecotError
        from mailproof.capture.lmtp_relay import LmtpRelay

        password = secrets.token_hex(12)
        use_postfix = self.relay_kind == "postfix" or (self.relay_kind == "auto" and os.geteuid() == 0)
        try:
            self.dovecot = Dovecot(users={PRIVATE_USER: password}, domain=PRIVATE_DOMAIN).start()
            if use_postfix:
                from mailproof.servers.postfix import Postfix

                self.postfix = Postfix(lmtp_port=self.dovecot.lmtp_port, domain=PRIVATE_DOMAIN).start()
                self.faults = NoFaults("mail reaches the inbox through the private Postfix")
                self.smtp_host, self.smtp_port = self.postfix.host, self.postfix.smtp_port
            else:
                self.relay = LmtpRelay(self.dovecot.host, self.dovecot.lmtp_port).start()
                self.faults = self.relay.faults
                self.smtp_host, self.smtp_port = self.relay.host, self.relay.port
        except (DovecotError, RuntimeError) as exc:
            raise MailproofError(f"cannot start the private IMAP servers: {exc}") from exc
        options = {"host": self.dovecot.host, "port": str(self.dovecot.imap_port), "tls": "plain",
                   "user": PRIVATE_USER, "password": password, "folder": self.options.get("folder") or "INBOX",
                   "address": f"{PRIVATE_USER}@{PRIVATE_DOMAIN}"}
        return ImapAccount.from_options(options)

    def _wire_nudges(self, watcher: ImapWatcher) -> None:
        """The private servers say when a message was handed to Dovecot: the watcher looks at once.

        Postfix logs ``postfix/lmtp[..]: ... status=sent`` after Dovecot's 250 (the log reaches
        us through a pipe in well under a millisecond); the LMTP relay calls back after its 250.
        """
        if self.postfix is not None:
            def on_line(line: str) -> None:
                if "status=sent" in line and "postfix/lmtp[" in line:
                    watcher.nudge()

            self.postfix.add_line_listener(on_line)
        if self.relay is not None:
            self.relay.on_relayed.append(lambda captured: watcher.nudge())

    def _stop_servers(self) -> None:
        for server in (self.relay, self.postfix, self.dovecot):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        self.relay = self.postfix = self.dovecot = None


@contextlib.contextmanager
def open_imap_backend(options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Iterator[ImapBackend]:
    """Start the IMAP backend for the plugin's settings dict; stop and clean up on exit."""
    backend = ImapBackend(options, **kwargs).start()
    try:
        yield backend
    finally:
        backend.stop()
