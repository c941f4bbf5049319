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
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailproof.net import LOOPBACK

log = logging.getLogger("mailproof.sink")


# aiosmtpd 1.4.6 sets its own deprecated Session.login_data on every successful AUTH.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
# ... and warns on every connection when AUTH is required without TLS, which is deliberate for a
# loopback test double.
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


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
        reply = await self.sink._fault("ehlo", server, session, envelope)
        return [reply] if reply else responses

    async def handle_MAIL(self, server, session, envelope: Envelope, address, mail_options):
        reply = await self.sink._fault("mail", server, session, envelope, address=address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope: Envelope, address, rcpt_options):
        reply = await self.sink._fault("rcpt", server, session, envelope, address=address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope):
        reply = await self.sink._fault("data", server, session, envelope)
        if reply:
            return reply
        # Stamped after a data-stage fault (a slow relay's Delay): the mail is accepted now, and
        # latency from the trigger must include the delay the test injected.
        captured = self.sink._record(session, envelope, time.time())
        reply = await self.sink._fault("after_data", server, session, envelope, captured=captured)
        return reply or f"250 2.0.0 OK queued as {captured.seq}"


# aiosmtpd builds a new SMTP object per connection and, because the handler has an EHLO hook,
# computes inspect.signature() of that hook every time (about 15 us plus garbage: some 3 % of a
# one-message connection). A __signature__ on the function is what inspect.signature() returns
# first; it is the very signature it would compute, so nothing changes but the cost.
_Handler.handle_EHLO.__signature__ = inspect.signature(_Handler.handle_EHLO)  # type: ignore[attr-defined]


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with a greeting-stage fault seam and connection tracking for clean stops."""

    def __init__(self, sink: "SmtpSink", *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def connection_made(self, transport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._sink._connections.add(self)
            self._sink.connections_total += 1

    def connection_lost(self, error) -> None:
        self._sink._connections.discard(self)
        super().connection_lost(error)

    async def _handle_client(self):
        reply = await self._sink._fault("connect", self, self.session, self.envelope)
        if reply:
            await self.push(reply)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()


class SmtpSink:
    """A real SMTP server that captures mail in-process.

    >>> sink = SmtpSink(on_message=print).start()
    >>> sink.port  # OS-chosen, on 127.0.0.1
    >>> sink.stop()

    ``credentials`` enables AUTH PLAIN/LOGIN (allowed without TLS, since the sink is a test
    double on loopback). ``tls_context`` enables STARTTLS. ``faults`` is any object with an
    ``async def apply(stage, server, session, envelope, **details) -> Optional[str]`` method;
    a returned string is sent as the SMTP reply for that stage.
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
        self.timeout = timeout
        self.faults = faults
        self.captured_count = 0
        self.connections_total = 0
        self._seq = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: set[_SinkSMTP] = set()

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
        try:
            server = await loop.create_server(self._protocol, self.host, self.port)
        except OSError as exc:
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
        auth = self._authenticate if self.credentials is not None else None
        return _SinkSMTP(
            self,
            _Handler(self),
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
            seq=next(self._seq),
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
