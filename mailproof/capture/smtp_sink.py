"""The capture sink: a real aiosmtpd server on its own event-loop thread.

It stands in for the mail relay the application under test talks to. Every accepted message is
stamped with its arrival time and handed, as raw bytes, to a callback; parsing is left to whoever
asserts on it (parsing headers at capture costs a third of the throughput, see docs/performance.md).

The server runs on a private loop in a daemon thread so that synchronous code (pytest tests,
Locust users) can use it without sharing an event loop (a session-scoped async fixture with
function-scoped async tests hangs).

STARTTLS and AUTH: ``tls_context`` offers STARTTLS (``require_starttls`` refuses mail before it
with 530), ``credentials`` offers AUTH PLAIN/LOGIN (``auth_required`` refuses mail before it with
530; a wrong password gets 535). ``mailproof.capture.tls`` makes the context from a throwaway CA
and documents how the application under test trusts it. Every ``CapturedMail`` records ``tls``
and ``auth_user``, and ``Message.from_captured`` carries them into the ``Message``.

Timeouts (aiosmtpd's own ``timeout`` is a deadline since the last *command*, which cuts a client
that streams a large DATA steadily): ``timeout`` here is an idle timeout that any received byte
resets (421 4.4.2 then close, like Postfix's ``smtpd_timeout``). ``data_timeout`` bounds one DATA
phase from the 354 to the final dot (421 4.4.2 ... DATA took too long). ``session_timeout``
(off by default) bounds a whole connection: without it a client sending a NOOP more often than
``timeout`` keeps its session open for ever, as it would against Postfix, whose closest guard is
``smtpd_junk_command_limit``.

DATA is read in chunks rather than lines: lines of any length up to ``max_line_length`` (1 MiB
by default; ``None`` for no limit within ``data_size_limit``) are accepted byte-exact, where
aiosmtpd refuses any line over 1,001 bytes and Postfix accepts them. A message above
``spool_threshold`` is spooled to a temporary file, so the peak memory of a large message stays
close to its size (aiosmtpd keeps a list of lines and then joins it: 2.4-3.6 times). Command
lines keep aiosmtpd's limits (512 bytes, more with ESMTP extensions).

Speed (issue 12, docs/performance.md "Capture"): the connection setup reuses per-class method
tables instead of aiosmtpd's dir()/getmembers() per connection, plain ``<local@domain>``
addresses skip the email package's parser, EHLO goes out in one write, no fault coroutine runs
while no rule is installed, and commands do not churn the idle timer. Per command (four per
message on a reused connection): while the command loop has nothing buffered, the connection
answers the common commands from the bytes it receives, without waking the loop (see
"answering from the received bytes" below); the loop builds its log lines only when mail.log
emits them, MAIL and RCPT with a plain address and no parameters skip aiosmtpd's check
coroutines, and a reply is not followed by a drain() unless writing is paused. Each is tested to
give aiosmtpd's own replies and mail (tests/test_sink_fastpath.py, tests/test_data_scanner.py).

aiosmtpd logs each unrecognised command at WARNING on ``mail.log``; a :class:`RepeatedWarningFilter`
on that logger lets the first few of each kind through per minute and counts the rest.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import inspect
import itertools
import logging
import re
import ssl
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import aiosmtpd
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from aiosmtpd.smtp import __ident__ as _AIOSMTPD_IDENT
from aiosmtpd.smtp import _AuthMechAttr
from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS as _ALLOWED_BEFORE_STARTTLS
from aiosmtpd.smtp import BOGUS_LIMIT as _BOGUS_LIMIT
from aiosmtpd.smtp import TLSSetupException, sanitized_log

from mailproof.capture.data_scanner import DataScanner
from mailproof.net import LOOPBACK

log = logging.getLogger("mailproof.sink")
_mail_log = logging.getLogger("mail.log")  # aiosmtpd's logger


# aiosmtpd 1.4.6 sets its own deprecated Session.login_data on every successful AUTH.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
# ... and warns on every connection when AUTH is required without TLS, which is deliberate for a
# loopback test double.
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


class RepeatedWarningFilter(logging.Filter):
    """Let the first ``burst`` records of each kind through per ``period`` seconds; count the rest.

    A kind is the record's level and unformatted message ("%r unrecognised: %s"), so a client
    that sends thousands of bogus commands, each from a new peer or with a new verb, is still
    one kind. Records below ``level`` always pass. The first record of a kind let through after
    some were suppressed says how many; ``suppressed`` holds the running totals per kind.
    """

    def __init__(self, burst: int = 5, period: float = 60.0, *, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.level = level
        self.clock = clock
        self.suppressed: collections.Counter = collections.Counter()
        self._windows: dict[tuple, list] = {}  # kind -> [window start, passed, suppressed in window]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        kind = (record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= self.period:
                held = window[2] if window is not None else 0
                if len(self._windows) > 1000:  # bound the table; kinds are few in practice
                    self._windows.clear()
                self._windows[kind] = [now, 1, 0]
                if held and isinstance(record.args, tuple):
                    record.msg = f"{record.msg} (%d similar suppressed in the last %gs)"
                    record.args = record.args + (held, self.period)
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            self.suppressed[kind[1]] += 1
            return False


def install_warning_filter(logger_name: str = "mail.log", **options) -> RepeatedWarningFilter:
    """Put a :class:`RepeatedWarningFilter` on aiosmtpd's logger once; return the one in place."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, RepeatedWarningFilter):
            return existing
    flt = RepeatedWarningFilter(**options)
    logger.addFilter(flt)
    return flt


@dataclass(frozen=True)
class CapturedMail:
    """One message as the sink accepted it: envelope, raw bytes and arrival time."""

    seq: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    received_at: float  # time.time() when the sink accepted the DATA (after any data-stage fault), before the 250
    peer: Optional[tuple] = None
    helo: Optional[str] = None
    smtputf8: bool = False
    tls: bool = False
    auth_user: Optional[str] = None
    mail_options: tuple[str, ...] = field(default=())


class SinkError(RuntimeError):
    """The sink could not start or stop; the message names the cause and the fix."""


class _Handler:
    """aiosmtpd handler: stamps, records and hands over each message; the seam for faults."""

    def __init__(self, sink: "SmtpSink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session: Session, envelope, hostname, responses):
        session.host_name = hostname
        reply = await self.sink._fault("ehlo", server, session, envelope) if self.sink._faulting() else None
        # One write for the whole reply (aiosmtpd pushes each line with its own write and drain):
        # the same bytes on the wire, one send() instead of six.
        return [reply] if reply else ["\r\n".join(responses)]

    async def handle_MAIL(self, server, session, envelope: Envelope, address, mail_options):
        if self.sink._faulting():
            reply = await self.sink._fault("mail", server, session, envelope, address=address)
            if reply:
                return reply
        return self.accept_mail(envelope, address, mail_options)

    async def handle_RCPT(self, server, session, envelope: Envelope, address, rcpt_options):
        if self.sink._faulting():
            reply = await self.sink._fault("rcpt", server, session, envelope, address=address)
            if reply:
                return reply
        return self.accept_rcpt(envelope, address, rcpt_options)

    async def handle_DATA(self, server, session: Session, envelope: Envelope):
        faulting = self.sink._faulting()
        if faulting:
            reply = await self.sink._fault("data", server, session, envelope)
            if reply:
                return reply
        captured = self.accept_data(session, envelope)
        if faulting or self.sink._faulting():  # a rule may have come in during on_message
            return await self.after_data(server, session, envelope, captured)
        return self.queued(captured)

    async def after_data(self, server, session: Session, envelope: Envelope, captured: CapturedMail) -> str:
        reply = await self.sink._fault("after_data", server, session, envelope, captured=captured)
        return reply or self.queued(captured)

    # What each hook does when no fault applies: no awaits, so that the sink's connections can
    # answer the common case straight from the bytes they receive (_SinkSMTP._answer).

    @staticmethod
    def accept_mail(envelope: Envelope, address: str, mail_options) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    @staticmethod
    def accept_rcpt(envelope: Envelope, address: str, rcpt_options) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    def accept_data(self, session: Session, envelope: Envelope) -> CapturedMail:
        # Stamped after a data-stage fault (a slow relay's Delay): the mail is accepted now, and
        # latency from the trigger must include the delay the test injected.
        return self.sink._record(session, envelope, time.time())

    @staticmethod
    def queued(captured: CapturedMail) -> str:
        return f"250 2.0.0 OK queued as {captured.seq}"


# aiosmtpd builds a new SMTP object per connection and, because the handler has an EHLO hook,
# computes inspect.signature() of that hook every time (about 15 us plus garbage: some 3 % of a
# one-message connection). A __signature__ on the function is what inspect.signature() returns
# first; it is the very signature it would compute, so nothing changes but the cost.
_Handler.handle_EHLO.__signature__ = inspect.signature(_Handler.handle_EHLO)  # type: ignore[attr-defined]


_CHUNK = 64 * 1024

# The commands a connection answers from its received bytes (_SinkSMTP._answer), upper-cased:
# the common ones. STARTTLS, AUTH (which reads more lines) and the rest go to the command loop.
_ANSWERED = {name.encode(): name for name in ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT")}


async def _raising(error: BaseException) -> None:
    raise error


@types.coroutine
def _rest_of(command, waiting):
    """Await the rest of a coroutine whose first step, run outside any task, yielded ``waiting``
    (the future it waits on): what a task would have done with it from there."""
    while True:
        try:
            yield waiting
        except BaseException as error:  # thrown into the awaiting task (a cancel): pass it on
            step = command.throw, error
        else:
            step = command.send, None
        try:
            waiting = step[0](step[1])
        except StopIteration as done:
            return done.value

# An angle address whose local part and domain are plain dot-atoms (RFC 5322 atext, ASCII):
# what nearly every MAIL FROM and RCPT TO carries. For these the email package's parser, which
# aiosmtpd's _getaddr runs (and which defines a typing.Protocol class on every call), returns the
# text itself; anything else (quoted local parts, comments, encoded words, non-ASCII, routes)
# still goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)>")


# _SinkSMTP.__init__ mirrors aiosmtpd 1.4.6's SMTP.__init__ with its per-class work done once;
# any other version takes aiosmtpd's own __init__ (correct, only slower).
_FAST_INIT = aiosmtpd.__version__ == "1.4.6"


class _ClassTables:
    """What aiosmtpd's SMTP.__init__ rebuilds on every connection from dir() and
    inspect.getmembers() of the protocol and the handler (about a third of the setup cost of a
    one-message connection): the names of the smtp_*, auth_* and handle_* methods. Computed
    once per (protocol class, handler class); each connection binds its hooks, smtp_* on lookup."""

    _cache: dict[tuple[type, type], "_ClassTables"] = {}

    def __init__(self, proto_cls: type, handler_cls: type) -> None:
        self.smtp = {m[5:]: getattr(proto_cls, m) for m in dir(proto_cls) if m.startswith("smtp_")}
        self.hooks = [(m[7:], m) for m in dir(handler_cls) if m.startswith("handle_")]
        # Name as aiosmtpd computes it: the decorator's name, else auth_X__Y -> X-Y.
        self.auth = [(getattr(getattr(cls, m), "__auth_mechanism_name__", m.replace("auth_", "").replace("__", "-")),
                      m, cls is proto_cls)
                     for cls in (proto_cls, handler_cls) for m in dir(cls) if m.startswith("auth_")
                     and callable(getattr(cls, m))]
        self.auth.sort(key=lambda item: item[0])

    @classmethod
    def of(cls, proto_cls: type, handler_cls: type) -> "_ClassTables":
        tables = cls._cache.get((proto_cls, handler_cls))
        if tables is None:
            tables = cls._cache[(proto_cls, handler_cls)] = cls(proto_cls, handler_cls)
        return tables


class _BoundMethods(collections.abc.Mapping):
    """A name -> bound method table that binds on lookup: aiosmtpd's ``_smtp_methods`` is read
    once per command, so binding ~20 methods for every connection is wasted work."""

    __slots__ = ("_functions", "_owner")

    def __init__(self, functions: dict, owner: object) -> None:
        self._functions = functions
        self._owner = owner

    def __getitem__(self, name: str):
        return types.MethodType(self._functions[name], self._owner)

    def get(self, name, default=None):
        function = self._functions.get(name)
        return default if function is None else types.MethodType(function, self._owner)

    def __iter__(self):
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with a greeting-stage fault seam, connection tracking for clean stops,
    an idle timeout any byte resets, DATA and session deadlines, and a chunked DATA reader."""

    def __init__(self, sink: "SmtpSink", handler, *, loop: asyncio.AbstractEventLoop, **kwargs) -> None:
        if _FAST_INIT and not kwargs:
            self._fast_init(sink, handler, loop)
        else:
            super().__init__(handler, loop=loop, **kwargs)
        self._sink = sink
        self._last_rx = 0.0
        self._session_handle: Optional[asyncio.TimerHandle] = None
        # Answering from the received bytes (_answer): the command loop's parking future, what it
        # must await when it wakes, the DATA phase being read and its deadline.
        self._parked: Optional[asyncio.Future] = None
        self._resume: Optional[collections.abc.Awaitable] = None
        self._scanner: Optional[DataScanner] = None
        self._data_deadline: Optional[asyncio.TimerHandle] = None
        self._log_info = self._log_debug = False

    def _fast_init(self, sink: "SmtpSink", handler, loop: asyncio.AbstractEventLoop) -> None:
        """aiosmtpd 1.4.6's SMTP.__init__ for the options SmtpSink._protocol passes, line for line,
        but with the method tables from _ClassTables. Its warnings (TLS verify mode, AUTH without
        TLS) are issued once by SmtpSink, not per connection; its INFO log of the AUTH
        mechanisms is not built."""
        self.__ident__ = _AIOSMTPD_IDENT
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = handler
        self.data_size_limit = sink.data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits.clear()  # aiosmtpd's (class-wide) table, reset per connection as it does
        self.hostname = sink.hostname
        self.tls_context = sink.tls_context
        self.require_starttls = sink.tls_context and sink.require_starttls
        self._timeout_duration = sink.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = False
        self._proxy_timeout = None
        if sink.credentials is not None:
            self._authenticator = sink._authenticate
            self._auth_callback = None
        else:
            from aiosmtpd.smtp import login_always_fail

            self._auth_callback = login_always_fail
            self._authenticator = None
        self._auth_required = sink.auth_required
        tables = _ClassTables.of(type(self), type(handler))
        self._auth_methods = {name: _AuthMechAttr(getattr(self if own else handler, attr), own)
                              for name, attr, own in tables.auth}
        self._handle_hooks = {name: getattr(handler, attr) for name, attr in tables.hooks}
        self._ehlo_hook_ver = "new" if "EHLO" in self._handle_hooks else None  # _Handler's: 5 arguments
        self._smtp_methods = _BoundMethods(tables.smtp, self)
        self._enforce_call_limit = False

    def connection_made(self, transport) -> None:
        first = self.transport is None
        self._last_rx = self.loop.time()
        super().connection_made(transport)
        if first:
            self._sink._connections.add(self)
            self._sink.connections_total += 1
            if self._sink.session_timeout:
                self._session_handle = self.loop.call_later(
                    self._sink.session_timeout, self._close_with, "session took too long")

    def connection_lost(self, error) -> None:
        self._sink._connections.discard(self)
        if self._session_handle is not None:
            self._session_handle.cancel()
        self._end_inline_data()  # a message cut off mid-DATA is not accepted: nothing to keep
        super().connection_lost(error)

    # -- idle timeout ------------------------------------------------------------------------
    # aiosmtpd re-arms its timer only when a valid command arrives. Here every received byte
    # counts: data_received stamps the time (cheap: no timer churn per packet) and the timer,
    # when it fires, re-arms itself for the rest of the idle period if bytes came meanwhile.

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        parked = self._parked
        if parked is not None and not parked.done():
            rest = self._answer(data)
            if rest is None:
                return
            self._parked = None  # the command loop takes the rest
            if not parked.done():  # (QUIT cancelled it: the loop is ending)
                parked.set_result(None)
            if not rest:
                return
            data = rest
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        remaining = self._last_rx + self._timeout_duration - self.loop.time()
        if remaining > 0.001:
            self._timeout_handle = self.loop.call_later(remaining, self._timeout_cb)
            return
        log.info("%r idle for %ss: closing", self.session.peer if self.session else None,
                 self._timeout_duration)
        self._close_with("timeout exceeded")

    def _close_with(self, why: str) -> None:
        """Send 421 4.4.2 and close (the transport flushes the reply first)."""
        if self.transport is None:
            return
        try:
            self._writer.write(f"421 4.4.2 {self.hostname} Error: {why}\r\n".encode("ascii"))
        except Exception:  # the transport may be closing already
            pass
        self.transport.close()

    async def _handle_client(self):
        reply = (await self._sink._fault("connect", self, self.session, self.envelope)
                 if self._sink._faulting() else None)
        if reply:
            await self.push(reply)
            if self.transport is not None:
                self.transport.close()
            return
        if _FAST_INIT and self._proxy_timeout is None and not self._enforce_call_limit:
            await self._command_loop()
        else:
            await super()._handle_client()

    async def _command_loop(self) -> None:
        """aiosmtpd 1.4.6's _handle_client loop (without its PROXY and call-limit parts, which
        take aiosmtpd's own), step for step, but for its two log lines per command: aiosmtpd builds
        their sanitized arguments even when the logger drops them; here only when it would log."""
        self._log_info = log_info = _mail_log.isEnabledFor(logging.INFO)
        self._log_debug = log_debug = _mail_log.isEnabledFor(logging.DEBUG)
        _mail_log.info("%r handling connection", self.session.peer)
        await self.push(f"220 {self.hostname} {self.__ident__}")
        bogus_budget = _BOGUS_LIMIT
        reader = self._reader
        methods = self._smtp_methods
        answers = not self.require_starttls  # before STARTTLS only the loop refuses MAIL with 530
        while self.transport is not None:
            try:
                resume = self._resume
                if resume is not None:  # what _answer left to finish (a fault's hook, a drain)
                    self._resume = None
                    await resume
                    continue
                if answers and not reader._buffer and self._tls_protocol is None:  # type: ignore[attr-defined]
                    # Nothing buffered: park, and let data_received answer the common commands
                    # itself until one needs this loop.
                    self._parked = parked = self.loop.create_future()
                    await parked
                    continue
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # Line too long. Read until end of line before sending 500.
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as e:
                            await reader.read(e.consumed)
                    await self.push("500 Command line too long")
                    continue
                if log_debug:
                    sanitized_log(_mail_log.debug, "_handle_client readline: %r", line)
                line = line.rstrip(b"\r\n")
                if log_info:
                    sanitized_log(_mail_log.info, "%r >> %r", self.session.peer, line)
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode(encoding="ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                if not arg_bytes:
                    arg: Optional[str] = None
                else:
                    arg_bytes = arg_bytes.strip()
                    if self.enable_SMTPUTF8:
                        arg = str(arg_bytes, encoding="utf-8", errors="surrogateescape")
                    else:
                        try:
                            arg = str(arg_bytes, encoding="ascii", errors="strict")
                        except UnicodeDecodeError:
                            await self.push("500 Error: strict ASCII mode")
                            continue
                max_sz = (self.command_size_limits[command] if self.session.extended_smtp
                          else self.command_size_limit)
                if len(line) > max_sz:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if self.require_starttls and not self._tls_protocol and command not in _ALLOWED_BEFORE_STARTTLS:
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                method = methods.get(command)
                if method is None:
                    _mail_log.warning("%r unrecognised: %s", self.session.peer, command)
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        _mail_log.warning("%r too many bogus commands", self.session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                await method(arg)
            except asyncio.CancelledError:
                _mail_log.info("%r Connection lost during _handle_client()", self.session.peer)
                self._writer.close()
                raise
            except ConnectionResetError:
                _mail_log.info("%r Connection lost during _handle_client()", self.session.peer)
                self._writer.close()
                raise
            except Exception as error:
                status = None
                try:
                    status = await self.handle_exception(error)
                except Exception as inner_error:
                    try:
                        _mail_log.exception("%r Exception in handle_exception()", self.session.peer)
                        status = "500 Error: ({}) {}".format(inner_error.__class__.__name__, str(inner_error))
                    except Exception:
                        status = "500 Error: Cannot describe error"
                finally:
                    if isinstance(error, TLSSetupException):
                        self.transport.close()
                        self.connection_lost(error)
                    else:
                        await self.push(status)

    def _getaddr(self, arg: str) -> tuple[Optional[str], Optional[str]]:
        """aiosmtpd's _getaddr, answered without the email parser for a plain ``<local@domain>``
        (about a third of the CPU of a message on a reused connection). Same results: a test
        compares both on generated addresses."""
        match = _PLAIN_ANGLE_ADDR.match(arg) if arg and "=?" not in arg else None
        if match is not None:
            rest = arg[match.end():]
            if rest[:1] in (" ", "\t"):  # the parser drops the white space after '>' (CFWS) ...
                rest = rest.lstrip()
            if rest[:1] != "(":  # ... and a comment, which it alone reads
                address = match.group(1)
                if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
                    return None, None
                return address, rest
        return super()._getaddr(arg)

    # -- the per-command path ------------------------------------------------------------------
    # On a reused connection each message is four commands (MAIL, RCPT, DATA, the body), and the
    # per-command Python around aiosmtpd's steps is most of the CPU a message costs (issue 12).
    # The common case is answered here with aiosmtpd's replies; anything else goes to aiosmtpd.

    async def push(self, status) -> None:
        """aiosmtpd's push without its drain while the transport takes the bytes.

        StreamWriter.drain() returns at once unless writing is paused (the client does not read
        its replies) or the connection is closing; it is awaited exactly then, as aiosmtpd does."""
        if self._write_reply(status):
            await self._writer.drain()

    def _write_reply(self, status) -> bool:
        """Write one reply; True when the writer must be drained before the next command."""
        response = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        writer = self._writer
        writer.write(response + b"\r\n")
        _mail_log.debug("%r << %r", self.session.peer, response)
        return self._paused or writer.transport.is_closing()

    def _needs_helo_or_auth(self) -> bool:
        """True when aiosmtpd's check_helo_needed or check_auth_needed would refuse the command."""
        session = self.session
        return not session.host_name or (self._auth_required and not session.authenticated)

    def _plain_address(self, arg: Optional[str], keyword: str) -> Optional[str]:
        """The address of ``FROM:<a@b>`` / ``TO:<a@b>`` with no parameters, as aiosmtpd parses it
        (_strip_command_keyword, then _getaddr); None for anything else, which aiosmtpd answers."""
        if not arg or arg[:len(keyword)].upper() != keyword:
            return None
        address, rest = self._getaddr(arg[len(keyword):].strip())
        return address if address and not rest else None

    def _plain_sender(self, arg: Optional[str]) -> Optional[str]:
        """MAIL's plain address when the fast path may take it (after EHLO/AUTH, no sender yet)."""
        return None if self._needs_helo_or_auth() or self.envelope.mail_from else self._plain_address(arg, "FROM:")

    def _plain_recipient(self, arg: Optional[str]) -> Optional[str]:
        """RCPT's plain address when the fast path may take it (after EHLO/AUTH and MAIL)."""
        return None if self._needs_helo_or_auth() or not self.envelope.mail_from else self._plain_address(arg, "TO:")

    def _mail_status(self, address: str, status) -> str:
        if status is MISSING:
            self.envelope.mail_from = address
            status = "250 OK"
        _mail_log.info("%r sender: %s", self.session.peer, address)
        return status

    def _rcpt_status(self, address: str, status) -> str:
        if status is MISSING:
            self.envelope.rcpt_tos.append(address)
            status = "250 OK"
        _mail_log.info("%r recip: %s", self.session.peer, address)
        return status

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: Optional[str]) -> None:
        """aiosmtpd's MAIL for a plain address without parameters (its steps, none of its
        coroutines but the hook's); everything else is aiosmtpd's own smtp_MAIL."""
        address = self._plain_sender(arg)
        if address is None:
            return await super().smtp_MAIL(arg)
        self.envelope.smtp_utf8 = False
        hook = self._handle_hooks.get("MAIL")  # _call_handler_hook, without its own coroutine
        status = MISSING if hook is None else await hook(self, self.session, self.envelope, address, [])
        await self.push(self._mail_status(address, status))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: Optional[str]) -> None:
        """aiosmtpd's RCPT for a plain address without parameters; everything else is its own."""
        address = self._plain_recipient(arg)
        if address is None:
            return await super().smtp_RCPT(arg)
        hook = self._handle_hooks.get("RCPT")
        status = MISSING if hook is None else await hook(self, self.session, self.envelope, address, [])
        await self.push(self._rcpt_status(address, status))

    # -- answering from the received bytes -----------------------------------------------------
    # While the command loop has nothing buffered it parks, and data_received answers the common
    # commands itself: the loop's checks, then the command's own method run to its end at once
    # (EHLO, HELO, MAIL, RCPT, RSET, NOOP, QUIT), or DATA with its message read by DataScanner;
    # no task wakes per command. The first line it does not answer, and everything after it, goes
    # to the loop, and so does whatever a method left waiting (_resume). It answers only while no
    # fault rule is installed (the handler's hooks then never wait) and writing is not paused.

    def _answer(self, data: bytes) -> Optional[bytes]:
        """Answer what ``data`` holds; None when all of it was answered, else the bytes from the
        first that the command loop must take (possibly none, when it must first finish
        something: ``_resume``, never set while a message is being read)."""
        while True:
            if self._resume is not None:
                return data
            if not data:
                return None
            scanner = self._scanner
            if scanner is not None:
                rest = scanner.feed(data)
                if rest is None:
                    return None
                data = rest
                if not self._end_data(scanner):
                    return data
                continue
            if self._paused or self.transport is None or self.transport.is_closing():
                return data
            end = data.find(b"\n") + 1
            if not end or not self._answer_line(data[:end]):
                return data
            data = data[end:]

    def _answer_line(self, line: bytes) -> bool:
        """Answer one command line as the command loop would (its checks, then the command's own
        method, run to its end now); False, with nothing done, for what only the loop answers."""
        if self._sink._faulting() or not self._tls_handshake_okay:
            return False
        stripped = line.rstrip(b"\r\n")
        command_bytes, _, arg_bytes = stripped.partition(b" ")
        command = _ANSWERED.get(command_bytes.upper())
        if command is None:
            return False
        max_size = self.command_size_limits[command] if self.session.extended_smtp else self.command_size_limit
        if len(stripped) > max_size:
            return False
        arg = str(arg_bytes.strip(), encoding="utf-8", errors="surrogateescape") if arg_bytes else None
        if command == "DATA" and (arg or self._needs_helo_or_auth() or not self.envelope.rcpt_tos):
            return False  # DATA with an argument, before EHLO/AUTH or RCPT: smtp_DATA's replies
        if self._log_debug:
            sanitized_log(_mail_log.debug, "_handle_client readline: %r", line)
        if self._log_info:
            sanitized_log(_mail_log.info, "%r >> %r", self.session.peer, stripped)
        self._reset_timeout()
        if command != "DATA":
            if not (command in ("MAIL", "RCPT") and self._answer_plain(command, arg)):
                self._run_now(self._smtp_methods[command](arg))
            return True
        sink = self._sink
        self._scanner = DataScanner(self.data_size_limit, sink.max_line_length, sink.spool_threshold)
        if sink.data_timeout:
            self._data_deadline = self.loop.call_later(sink.data_timeout, self._close_with, "DATA took too long")
        # Its drain, were writing paused now, waits for the reply that ends the message: the
        # bytes after the 354 are the message's, which the loop must not read as commands.
        self._write_reply("354 End data with <CR><LF>.<CR><LF>")
        return True

    def _answer_plain(self, command: str, arg: Optional[str]) -> bool:
        """MAIL or RCPT with a plain address and no parameters (most of all commands), answered
        with smtp_MAIL's or smtp_RCPT's steps but none of their coroutines; False otherwise."""
        try:
            address = self._plain_sender(arg) if command == "MAIL" else self._plain_recipient(arg)
        except Exception:  # aiosmtpd's parser raised: its method answers it (500), not this
            return False
        if address is None:
            return False
        handler, envelope = self.event_handler, self.envelope
        if command == "MAIL":
            envelope.smtp_utf8 = False
            reply = self._mail_status(address, handler.accept_mail(envelope, address, []))
        else:
            reply = self._rcpt_status(address, handler.accept_rcpt(envelope, address, []))
        self._reply_now(reply)
        return True

    def _reply_now(self, reply: str) -> None:
        """Write a reply from the received bytes; the loop waits for the drain when one is due."""
        if self._write_reply(reply):
            self._resume = self._writer.drain()

    def _run_now(self, command) -> None:
        """Run a command method's coroutine to its end now: with no fault rule and writing not
        paused, nothing in it waits. If it does wait (or raises), the command loop takes over
        what is left, as if it had awaited the method itself (``_resume``)."""
        try:
            waiting = command.send(None)
        except StopIteration:
            return
        except BaseException as error:  # the loop's handling: handle_exception's reply, ...
            self._resume = _raising(error)
            return
        self._resume = _rest_of(command, waiting)

    def _end_data(self, scanner: DataScanner) -> bool:
        """The DATA phase ``scanner`` read has ended: accept or refuse the message as smtp_DATA
        does. False when a fault rule came in meanwhile: the loop then finishes it (``_resume``)."""
        content, too_much, too_long = scanner.result()
        self._end_inline_data()
        if too_long or too_much:
            self._set_post_data_state()
            reply = "500 5.5.2 Line too long (see max_line_length)" if too_long else "552 Error: Too much mail data"
        else:
            envelope = self.envelope
            envelope.content = envelope.original_content = content
            if self._sink._faulting():
                self._resume = self._finish_data(None)
                return False
            captured = self.event_handler.accept_data(self.session, envelope)
            if self._sink._faulting():  # a rule came in during on_message: its after_data stage
                self._resume = self._finish_data(captured)
                return False
            self._set_post_data_state()
            reply = self.event_handler.queued(captured)
        self._reply_now(reply)
        return True

    def _end_inline_data(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            scanner.close()
        if self._data_deadline is not None:
            self._data_deadline.cancel()
            self._data_deadline = None

    async def _finish_data(self, captured: Optional[CapturedMail]) -> None:
        """The end of smtp_DATA for a message read from the received bytes, when faults apply."""
        if captured is None:
            status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
        else:
            status = await self.event_handler.after_data(self, self.session, self.envelope, captured)
        self._set_post_data_state()
        await self.push(status)

    def _reset_timeout(self, duration: Optional[float] = None) -> None:
        # aiosmtpd cancels and re-creates its timer on every command. Once armed, the timer
        # re-arms itself from _last_rx (_timeout_cb), so a command need not touch it.
        handle = self._timeout_handle
        if duration is None and handle is not None and not handle.cancelled():
            return
        super()._reset_timeout(duration)

    # -- DATA ----------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, read in chunks: long lines accepted, large messages spooled.

        The checks, the replies and the hook call are aiosmtpd 1.4.6's; the reading is not.
        Bytes read past the final dot (a pipelining client's next command) go back to the reader.
        """
        if self._needs_helo_or_auth() and (await self.check_helo_needed() or await self.check_auth_needed("DATA")):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        sink = self._sink
        deadline = (self.loop.call_later(sink.data_timeout, self._close_with, "DATA took too long")
                    if sink.data_timeout else None)
        try:
            content, too_much, too_long = await self._read_data(
                self.data_size_limit, sink.max_line_length, sink.spool_threshold)
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        if too_long or too_much:
            self._set_post_data_state()
            if too_long:
                await self.push("500 5.5.2 Line too long (see max_line_length)")
            else:
                await self.push("552 Error: Too much mail data")
            return
        self.envelope.content = content
        self.envelope.original_content = content
        hook = self._handle_hooks.get("DATA")
        status = MISSING if hook is None else await hook(self, self.session, self.envelope)
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, limit: Optional[int], max_line: Optional[int],
                         spool_threshold: Optional[int]) -> tuple[Optional[bytes], bool, bool]:
        """Read DATA from the stream reader up to the lone dot (DataScanner); returns (content,
        too_much, too_long). Bytes read past the dot go back to the reader."""
        reader = self._reader
        # The reader's limit (aiosmtpd: 1,001 bytes, for command lines) also decides when it
        # pauses the transport (twice the limit buffered): raised for DATA so that 64 KiB reads
        # do not pause and resume the socket every 2 KB. Restored for the commands that follow.
        command_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(command_limit, _CHUNK)  # type: ignore[attr-defined]
        scanner = DataScanner(limit, max_line, spool_threshold)
        try:
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:  # EOF (eof_received normally cancels us first)
                    raise asyncio.CancelledError()
                rest = scanner.feed(chunk)
                if rest is not None:
                    if rest:  # pipelined commands after the dot: hand them back
                        reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                    return scanner.result()
        finally:
            reader._limit = command_limit  # type: ignore[attr-defined]
            scanner.close()


class SmtpSink:
    """A real SMTP server that captures mail in-process.

    >>> sink = SmtpSink(on_message=print).start()
    >>> sink.port  # OS-chosen, on 127.0.0.1
    >>> sink.stop()

    ``credentials`` enables AUTH PLAIN/LOGIN (allowed without TLS, since the sink is a test
    double on loopback). ``tls_context`` enables STARTTLS. ``faults`` is any object with an
    ``async def apply(stage, server, session, envelope, **details) -> Optional[str]`` method;
    a returned string is sent as the SMTP reply for that stage.

    ``timeout`` is an idle timeout (any byte resets it), ``data_timeout`` bounds one DATA phase,
    ``session_timeout`` (default None: unbounded) a whole connection; each ends the session with
    421 4.4.2. ``max_line_length`` bounds a DATA line (1 MiB; None: only ``data_size_limit``);
    ``spool_threshold`` is the size above which DATA is spooled to a temporary file.
    """

    def __init__(
        self,
        on_message: Optional[Callable[[CapturedMail], None]] = None,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        hostname: str = "mailproof.sink",
        tls_context: Optional[ssl.SSLContext] = None,
        require_starttls: bool = False,
        credentials: Optional[Mapping[str, str]] = None,
        auth_required: bool = False,
        data_size_limit: int = 64 * 1024 * 1024,
        timeout: float = 60,
        data_timeout: Optional[float] = 600,
        session_timeout: Optional[float] = None,
        max_line_length: Optional[int] = 1024 * 1024,
        spool_threshold: Optional[int] = 8 * 1024 * 1024,
        faults: Any = None,
    ) -> None:
        self.on_message = on_message
        self.host = host
        self.port = port
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.credentials = dict(credentials) if credentials else None
        self.auth_required = auth_required
        self.data_size_limit = data_size_limit
        self.timeout = timeout  # idle: any received byte resets it
        self.data_timeout = data_timeout  # one DATA phase, 354 to the final dot
        self.session_timeout = session_timeout  # a whole connection; None: unbounded
        self.max_line_length = max_line_length  # DATA lines, CRLF excluded; None: no limit
        self.spool_threshold = spool_threshold  # DATA above this goes to a temporary file
        self.faults = faults
        install_warning_filter()
        self.captured_count = 0
        self.connections_total = 0
        self.seqs = itertools.count(1)  # each captured message's seq; shared with any other path into the same store
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: set[_SinkSMTP] = set()
        self._handler = _Handler(self)  # stateless but for the sink: one for every connection

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "SmtpSink":
        if self._thread is not None:
            raise SinkError("the sink is already running; call stop() before start()")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(self._protocol, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="mailproof-sink", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            exc = failure[0]
            raise SinkError(
                f"cannot listen for SMTP on {self.host}:{self.port}: {exc}. "
                "Choose a free port (0 lets the OS pick one) or stop whatever holds it."
            ) from exc
        log.debug("SMTP sink listening on %s:%s", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop listening, close every client connection and join the loop thread."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            # Let connection_lost callbacks and cancelled client tasks finish.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self._server = None

    # -- running inside an existing event loop (added for the sink service) --------------------
    # The threaded start()/stop() above give the sink a private loop. A process that already runs
    # a loop (the sink service: SMTP and its HTTP API on one loop, no cross-thread hop per
    # message) uses these instead: the server then lives on the caller's running loop.

    async def start_async(self) -> "SmtpSink":
        """Listen on the running event loop; ``port`` is known when this returns."""
        if self._thread is not None or self._server is not None:
            raise SinkError("the sink is already running; stop it before starting it again")
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            server = await loop.create_server(self._protocol, self.host, self.port)
        except OSError as exc:
            self._loop = None
            raise SinkError(
                f"cannot listen for SMTP on {self.host}:{self.port}: {exc}. "
                "Choose a free port (0 lets the OS pick one) or stop whatever holds it."
            ) from exc
        self._loop = loop
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        log.debug("SMTP sink listening on %s:%s (caller's loop)", self.host, self.port)
        return self

    async def stop_async(self) -> None:
        """Stop listening, close every client connection and end their session tasks.

        Only this sink's own tasks are cancelled: the loop belongs to the caller.
        """
        if self._server is None or self._thread is not None:
            return  # not running, or running threaded (use stop())
        server, self._server = self._server, None
        server.close()
        tasks = []
        for conn in list(self._connections):
            task = getattr(conn, "_handler_coroutine", None)
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
            if conn.transport is not None:
                conn.transport.close()
        await server.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None

    @property
    def serving(self) -> bool:
        """True while the sink listens, threaded or on the caller's loop."""
        return self._server is not None

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        return self._loop

    # -- internals ---------------------------------------------------------------------------

    def _protocol(self) -> SMTP:
        if _FAST_INIT:
            return _SinkSMTP(self, self._handler, loop=self._loop)
        auth = self._authenticate if self.credentials is not None else None
        return _SinkSMTP(
            self,
            self._handler,
            loop=self._loop,
            hostname=self.hostname,
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,  # keep bytes: 8BITMIME bodies arrive unchanged
            tls_context=self.tls_context,
            require_starttls=self.require_starttls,
            authenticator=auth,
            auth_required=self.auth_required,
            auth_require_tls=False,
            timeout=self.timeout,
        )

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if self.credentials is not None and self.credentials.get(user) == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    def _faulting(self) -> bool:
        """False when no fault can fire: no fault object, or a FaultPlan with no rules (read
        without its lock, as FaultPlan.apply does). Saves two coroutines per stage under load."""
        faults = self.faults
        if faults is None:
            return False
        rules = getattr(faults, "_rules", None)
        return rules is None or bool(rules)  # another Faults object: always ask it

    async def _fault(self, stage: str, server, session, envelope, **details) -> Optional[str]:
        if self.faults is None:
            return None
        return await self.faults.apply(stage, server, session, envelope, **details)

    def _record(self, session: Session, envelope: Envelope, received_at: float) -> CapturedMail:
        data = envelope.original_content or b""
        if isinstance(data, str):  # only with decode_data=True, which the sink never sets
            data = data.encode("utf-8", "surrogateescape")
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        captured = CapturedMail(
            seq=next(self.seqs),
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            received_at=received_at,
            peer=session.peer,
            helo=session.host_name,
            smtputf8=envelope.smtp_utf8,
            tls=session.ssl is not None,
            auth_user=auth_user,
            mail_options=tuple(envelope.mail_options),
        )
        self.captured_count += 1
        if self.on_message is not None:
            try:
                self.on_message(captured)
            except Exception:  # a broken consumer must not turn into a 5xx for the app
                log.exception("on_message callback failed for message %s", captured.seq)
        return captured
