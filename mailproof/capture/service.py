"""The sink service: the capture sink as its own process, with an HTTP API.

Locust rehearsals send far more mail than one test process should capture (aiosmtpd can stall
with many large messages in one process, upstream #293), so under load the sink runs here, and
the harness reads it through ``mailproof.capture.remote.RemoteSink``.

    python -m mailproof.capture.service --host 127.0.0.1 --smtp-port 0 --http-port 0 [--token T]
                                 [--max-messages N] [--chaos PROFILE [--chaos-seed S]]

prints ``READY http://127.0.0.1:HTTP_PORT smtp=127.0.0.1:SMTP_PORT`` once both listen, and serves
until SIGTERM or SIGINT. SMTP (aiosmtpd, through ``SmtpSink``) and HTTP (aiohttp) share ONE event
loop: a captured message reaches waiters and streams without a cross-thread hop.

Safe by default: it refuses a non-loopback ``--host`` unless ``--token`` is given (exit code 2);
with a token every endpoint requires ``Authorization: Bearer TOKEN`` (401 otherwise). The token
may also come from the environment variable ``MAILPROOF_SINK_TOKEN`` (kept out of ``ps``).

Capture keeps raw bytes and the envelope only; headers are parsed when a client asks for a parsed
view. Retention is bounded (``--max-messages``, oldest first); every eviction is counted in
``/stats`` and the first one is logged.

HTTP API (JSON unless said otherwise):

``GET /health``
    ``{"status": "ok", "smtp": {"host", "port"}, "http": {...}, "last_seq", "token_required",
    "instance"}`` (``instance``: a random id of this run of the service).
``GET /messages?to=&since=SEQ&limit=N``
    Summaries of retained messages with seq > SEQ, oldest first: seq, mail_from, rcpt_tos,
    received_at, size, subject (parsed on request).
``GET /messages/{seq}``
    Parsed view: headers, subject, from, to, cc, message_id, date, text, html, attachments
    (filename, content_type, size, inline), defects. 404 when never captured or evicted.
``GET /messages/{seq}/raw``
    The exact bytes received (``message/rfc822``).
``DELETE /messages``
    Forget every retained message (counted as ``cleared``, not ``evicted``).
``GET /wait?to=&subject=&count=1&timeout=10&since=0``
    Long-poll: answers the moment ``count`` messages with seq > since, to the recipient (exact,
    case-insensitive) whose Subject contains ``subject``, are captured (already retained ones
    count). 200 ``{"messages": [summaries]}``; 408 with ``error``, ``found`` and ``near_misses``
    (other mail since ``since``, same recipient first, with the reason it did not match).
``GET /stream?since=SEQ&heartbeat=SECONDS&instance=ID``
    Chunked NDJSON. First a ``{"hello": {"instance", "since", "last_seq", "reset"}}`` line, then
    every retained message with seq > SEQ, then every new arrival, one line each
    ``{"seq", "mail_from", "rcpt_tos", "received_at", "raw": base64}``. ``instance`` is the id a
    client saw before (``/health``, hello): when it is not this run's (the service restarted and
    numbers from 1 again), SEQ is ignored, everything retained is replayed and hello says
    ``"reset": true``. Idle streams
    get ``{"heartbeat": time, "last_seq": N}`` every ``heartbeat`` seconds (default 5) so a
    client can tell a dead connection from a quiet one. If messages after SEQ are no longer
    retained, a ``{"missing": {"from", "to", "evicted", "cleared"}}`` line says so first.
    Without ``since`` the stream starts with the next arrival.
``DELETE /streams``
    Drop every open stream connection abruptly (a chaos hook: clients must reconnect with
    ``since`` and lose nothing).
``GET /stats``
    received, retained, retained_bytes, evicted, cleared, bytes, last_seq, max_messages,
    connections {total, active}, streams, waiters, faults (per rule: fired, acted).
``GET /faults`` / ``POST /faults`` / ``DELETE /faults/{id}`` / ``DELETE /faults?scope=S``
    Fault rules as JSON (``mailproof.faults.specs``). POST takes one rule spec (201, the rule with its
    id) or ``{"profile": "5%:rcpt:451,...", "seed": 1, "scope": "s"}`` (201, ``{"faults": [...]}``).
    A malformed spec is a 400 naming the bad field.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email
import email.parser
import email.policy
import email.utils
import gc
import hmac
import inspect
import itertools
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any, Iterable, Optional

from aiohttp import web

from mailproof.faults.specs import FaultError, parse_chaos_profile, rule_from_spec, rule_to_spec
from mailproof.faults import FaultPlan
from mailproof.capture.smtp_sink import CapturedMail, SinkError, SmtpSink, _Handler
from mailproof.net import LOOPBACK, is_loopback

log = logging.getLogger("mailproof.sink_service")

# aiosmtpd builds a new SMTP object per connection and, because the sink's handler has an EHLO
# hook, computes inspect.signature() of that hook every time (about 15 us plus garbage: some 3 %
# of a one-message connection). A __signature__ on the function is what inspect.signature()
# returns first; it is the very signature it would compute, so nothing changes but the cost.
# (Belongs in smtp_sink.py next to _Handler.)
if "__signature__" not in vars(_Handler.handle_EHLO):
    _Handler.handle_EHLO.__signature__ = inspect.signature(_Handler.handle_EHLO)

DEFAULT_MAX_MESSAGES = 200_000
DEFAULT_HEARTBEAT = 5.0
MAX_WAIT_TIMEOUT = 3600.0
NEAR_MISSES_SHOWN = 10
STREAM_BATCH = 256  # messages per write on a stream (backpressure is applied per write)
TOKEN_ENV = "MAILPROOF_SINK_TOKEN"

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.default)


class ServiceError(RuntimeError):
    """The service could not start; the message names the cause and the fix."""


# -- lazy parsing (only when a client asks) -------------------------------------------------------


def _headers_only(raw: bytes):
    try:
        return _HEADER_PARSER.parsebytes(raw)
    except Exception:  # never let one broken message break a listing
        return None


def _text(value: Any) -> str:
    try:
        text = str(value)
    except Exception:
        text = repr(value)
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def subject_of(raw: bytes) -> str:
    headers = _headers_only(raw)
    if headers is None:
        return ""
    try:
        return _text(headers.get("Subject", "") or "")
    except Exception:
        return ""


# A retained message is a plain tuple in CapturedMail's field order, not a CapturedMail: the
# garbage collector untracks tuples of atomic values, so 200,000 retained messages add nothing
# to its full collections (dataclass instances would be scanned on every one of them).
SEQ, FROM, RCPTS, DATA, AT = 0, 1, 2, 3, 4
Record = tuple


def record_of(msg: CapturedMail) -> Record:
    return (msg.seq, msg.mail_from, msg.rcpt_tos, msg.data, msg.received_at, msg.peer, msg.helo,
            msg.smtputf8, msg.tls, msg.auth_user, msg.mail_options)


def rcpts_lower(rec: Record) -> set[str]:
    return {r.lower() for r in rec[RCPTS]}


def summary(rec: Record, *, subject: bool = True) -> dict:
    out = {"seq": rec[SEQ], "mail_from": rec[FROM], "rcpt_tos": list(rec[RCPTS]),
           "received_at": rec[AT], "size": len(rec[DATA])}
    if subject:
        out["subject"] = subject_of(rec[DATA])
    return out


def parsed_view(rec: Record) -> dict:
    """A JSON view of the whole message (parsed now, never at capture)."""
    msg = CapturedMail(*rec)
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    try:
        items = list(parsed.items())
    except Exception:
        items = list(parsed._headers)  # type: ignore[attr-defined]
    headers = [[name, _text(value)] for name, value in items]

    def first(name: str) -> Optional[str]:
        for hname, value in headers:
            if hname.lower() == name.lower():
                return value
        return None

    def addresses(name: str) -> list[str]:
        values = [value for hname, value in headers if hname.lower() == name.lower()]
        return [addr for _, addr in email.utils.getaddresses(values) if addr]

    body_parts: dict[str, Any] = {}
    for kind in ("plain", "html"):
        try:
            part = parsed.get_body(preferencelist=(kind,))
        except Exception:
            part = None
        if part is None and not parsed.is_multipart() and parsed.get_content_type() == f"text/{kind}":
            part = parsed
        body_parts[kind] = part

    def body(kind: str) -> Optional[str]:
        part = body_parts[kind]
        if part is None:
            return None
        try:
            return part.get_content()
        except Exception:
            payload = part.get_payload(decode=True) or b""
            try:
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
            except LookupError:
                return payload.decode("utf-8", "replace")

    attachments = []
    chosen = [p for p in body_parts.values() if p is not None]
    for part in parsed.walk():
        if part.is_multipart() or any(part is p for p in chosen):
            continue
        disposition = (part.get_content_disposition() or "").lower()
        try:
            filename = part.get_filename()
        except Exception:
            filename = None
        if disposition in ("attachment", "inline") or filename or part.get_content_maintype() != "text":
            payload = part.get_payload(decode=True)
            attachments.append({
                "filename": filename, "content_type": part.get_content_type(),
                "size": len(payload) if isinstance(payload, bytes) else 0,
                "inline": disposition == "inline", "content_id": part.get("Content-ID"),
            })
    defects = [type(d).__name__ for p in parsed.walk() for d in p.defects]
    return {
        **summary(rec, subject=False),
        "subject": first("Subject") or "",
        "from": first("From") or "",
        "to": addresses("To"), "cc": addresses("Cc"),
        "message_id": first("Message-ID"), "date": first("Date"),
        "headers": headers, "text": body("plain"), "html": body("html"),
        "attachments": attachments, "defects": defects,
        "helo": msg.helo, "peer": list(msg.peer) if msg.peer else None,
        "smtputf8": msg.smtputf8, "tls": msg.tls, "auth_user": msg.auth_user,
        "mail_options": list(msg.mail_options),
    }


def stream_line(rec: Record) -> bytes:
    return (json.dumps({"seq": rec[SEQ], "mail_from": rec[FROM], "rcpt_tos": list(rec[RCPTS]),
                        "received_at": rec[AT],
                        "raw": base64.b64encode(rec[DATA]).decode("ascii")}, separators=(",", ":"))
            + "\n").encode("ascii")


# -- the capture store (lives on the loop: no locks) ----------------------------------------------


class _Waiter:
    __slots__ = ("to", "subject", "count", "since", "found", "future")

    def __init__(self, to: Optional[str], subject: Optional[str], count: int, since: int) -> None:
        self.to = to.lower() if to else None
        self.subject = subject
        self.count = count
        self.since = since
        self.found: list[Record] = []
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def mismatches(self, rec: Record) -> list[str]:
        reasons = []
        if self.to is not None and self.to not in rcpts_lower(rec):
            reasons.append(f"to {list(rec[RCPTS])} not {self.to!r}")
        if self.subject is not None:
            subject = subject_of(rec[DATA])
            if self.subject not in subject:
                reasons.append(f"subject {subject!r} does not contain {self.subject!r}")
        return reasons

    def offer(self, rec: Record) -> bool:
        """Take ``rec`` if it matches; True once the waiter has all it waits for."""
        if rec[SEQ] <= self.since or self.future.done() or self.mismatches(rec):
            return False
        self.found.append(rec)
        if len(self.found) >= self.count:
            self.future.set_result(None)
            return True
        return False


class _Stream:
    __slots__ = ("pending", "event", "overflowed", "closing", "drop", "transport")

    def __init__(self, transport) -> None:
        self.pending: list[Record] = []
        self.event = asyncio.Event()
        self.overflowed = False
        self.closing = False
        self.drop = False
        self.transport = transport


class CaptureStore:
    """Retained raw messages in seq order, plus the long-poll waiters and stream subscribers.

    Everything runs on the service's one event loop, so nothing here needs a lock. ``add`` is
    the sink's ``on_message``: it runs inside the DATA handler, before the 250 reply.
    """

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        if max_messages < 1:
            raise ServiceError("--max-messages must be at least 1")
        self.max_messages = max_messages
        self.messages: deque[Record] = deque()
        self.received = 0
        self.bytes = 0
        self.retained_bytes = 0
        self.evicted = 0
        self.cleared = 0
        self.last_seq = 0
        self.waiters_by_rcpt: dict[str, list[_Waiter]] = {}
        self.waiters_any: list[_Waiter] = []
        self.streams: set[_Stream] = set()

    # -- capture (hot path: keep it short) -------------------------------------------------------

    def add(self, msg: CapturedMail) -> None:
        rec = (msg.seq, msg.mail_from, msg.rcpt_tos, msg.data, msg.received_at, msg.peer, msg.helo,
               msg.smtputf8, msg.tls, msg.auth_user, msg.mail_options)  # record_of(), inlined
        self.messages.append(rec)
        size = len(msg.data)
        self.received += 1
        self.bytes += size
        self.retained_bytes += size
        self.last_seq = msg.seq
        if len(self.messages) > self.max_messages:
            old = self.messages.popleft()
            self.retained_bytes -= len(old[DATA])
            self.evicted += 1
            if self.evicted == 1:
                log.warning("retention limit of %d messages reached: evicting the oldest (counted in "
                            "/stats as 'evicted'); raise --max-messages to keep more", self.max_messages)
        if self.streams:
            for stream in self.streams:
                stream.pending.append(rec)
                if len(stream.pending) > self.max_messages:
                    stream.overflowed = True  # a stuck client: drop it, it reconnects with since=
                stream.event.set()
        if self.waiters_by_rcpt or self.waiters_any:
            self._offer(rec)

    def _offer(self, rec: Record) -> None:
        for rcpt in rcpts_lower(rec):
            waiters = self.waiters_by_rcpt.get(rcpt)
            if waiters:
                waiters[:] = [w for w in waiters if not w.offer(rec)]
                if not waiters:
                    del self.waiters_by_rcpt[rcpt]
        if self.waiters_any:
            self.waiters_any[:] = [w for w in self.waiters_any if not w.offer(rec)]

    # -- reading ---------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self.messages[0][SEQ] if self.messages else self.last_seq + 1

    def get(self, seq: int) -> Optional[Record]:
        if not self.messages:
            return None
        index = seq - self.messages[0][SEQ]
        if 0 <= index < len(self.messages):
            rec = self.messages[index]
            if rec[SEQ] == seq:
                return rec
        return next((m for m in self.messages if m[SEQ] == seq), None)  # never expected: seqs are dense

    def since(self, seq: int) -> list[Record]:
        """Retained messages with seq > ``seq``, oldest first."""
        messages = self.messages
        if not messages or seq >= messages[-1][SEQ]:
            return []
        skip = max(0, seq - messages[0][SEQ] + 1)
        keep = len(messages) - skip
        if skip > keep:  # near the end: walk from the right (deque indexing is O(n))
            found = list(itertools.islice(reversed(messages), keep))
            found.reverse()
            return [m for m in found if m[SEQ] > seq]
        return [m for m in itertools.islice(messages, skip, None) if m[SEQ] > seq]

    def clear(self) -> int:
        count = len(self.messages)
        self.messages.clear()
        self.retained_bytes = 0
        self.cleared += count
        return count

    # -- waiters ---------------------------------------------------------------------------------

    def add_waiter(self, waiter: _Waiter) -> None:
        if waiter.to:
            self.waiters_by_rcpt.setdefault(waiter.to, []).append(waiter)
        else:
            self.waiters_any.append(waiter)

    def remove_waiter(self, waiter: _Waiter) -> None:
        waiters = self.waiters_by_rcpt.get(waiter.to) if waiter.to else self.waiters_any
        if waiters and waiter in waiters:
            waiters.remove(waiter)
        if waiter.to and waiter.to in self.waiters_by_rcpt and not self.waiters_by_rcpt[waiter.to]:
            del self.waiters_by_rcpt[waiter.to]

    @property
    def waiter_count(self) -> int:
        return len(self.waiters_any) + sum(len(w) for w in self.waiters_by_rcpt.values())


# -- the HTTP API -------------------------------------------------------------------------------


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _BadRequest(Exception):
    pass


def _int_param(request: web.Request, name: str, default: Optional[int], *, minimum: int = 0) -> Optional[int]:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadRequest(f"query parameter {name!r} must be an integer, not {value!r}") from None
    if number < minimum:
        raise _BadRequest(f"query parameter {name!r} must be at least {minimum}, not {number}")
    return number


def _float_param(request: web.Request, name: str, default: float, *, minimum: float, maximum: float) -> float:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise _BadRequest(f"query parameter {name!r} must be a number of seconds, not {value!r}") from None
    if not minimum <= number <= maximum:
        raise _BadRequest(f"query parameter {name!r} must be between {minimum:g} and {maximum:g}, not {value}")
    return number


class SinkService:
    """SMTP capture plus its HTTP API on the running event loop.

    >>> service = SinkService(); await service.start(); ...; await service.stop()
    """

    def __init__(self, *, host: str = LOOPBACK, smtp_port: int = 0, http_port: int = 0,
                 token: Optional[str] = None, max_messages: int = DEFAULT_MAX_MESSAGES,
                 smtp_timeout: float = 60.0, data_size_limit: int = 64 * 1024 * 1024) -> None:
        self.host = host
        self.http_port = http_port
        self.token = token or None
        self.store = CaptureStore(max_messages)
        self.faults = FaultPlan()
        self.sink = SmtpSink(on_message=self.store.add, host=host, port=smtp_port, faults=self.faults,
                             timeout=smtp_timeout, data_size_limit=data_size_limit)
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex[:16]  # a restarted service numbers from 1 again: clients must know
        self._runner: Optional[web.AppRunner] = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def smtp_port(self) -> int:
        return self.sink.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def ready_line(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"READY {self.url} smtp={host}:{self.smtp_port}"

    async def start(self) -> "SinkService":
        await self.sink.start_async()
        app = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/messages", self.list_messages)
        app.router.add_delete("/messages", self.clear_messages)
        app.router.add_get("/messages/{seq}", self.get_message)
        app.router.add_get("/messages/{seq}/raw", self.get_raw)
        app.router.add_get("/wait", self.wait)
        app.router.add_get("/stream", self.stream)
        app.router.add_delete("/streams", self.drop_streams)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/faults", self.list_faults)
        app.router.add_post("/faults", self.add_fault)
        app.router.add_delete("/faults", self.clear_faults)
        app.router.add_delete("/faults/{id}", self.remove_fault)
        app.on_shutdown.append(self._on_shutdown)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.http_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            await self.sink.stop_async()
            raise ServiceError(f"cannot listen for HTTP on {self.host}:{self.http_port}: {exc}. "
                               "Choose a free port (0 lets the OS pick one).") from exc
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._stopping = True
        await self._close_clients()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.sink.stop_async()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self._close_clients()

    async def _close_clients(self) -> None:
        for stream in list(self.store.streams):
            stream.closing = True
            stream.event.set()
        for waiter in list(self.store.waiters_any) + [w for ws in self.store.waiters_by_rcpt.values() for w in ws]:
            if not waiter.future.done():
                waiter.future.cancel()

    # -- middleware ------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {self.token}".encode()):
                return web.json_response(
                    {"error": "this sink service requires 'Authorization: Bearer <token>' (the --token it was started with)"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="mailproof-sink"'})
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _bad(str(exc))

    # -- endpoints -------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "stopping" if self._stopping else "ok",
            "smtp": {"host": self.host, "port": self.smtp_port},
            "http": {"host": self.host, "port": self.http_port},
            "last_seq": self.store.last_seq, "token_required": self.token is not None,
            "instance": self.instance, "pid": os.getpid(),
        })

    async def list_messages(self, request: web.Request) -> web.Response:
        to = (request.query.get("to") or "").lower() or None
        since = _int_param(request, "since", 0)
        limit = _int_param(request, "limit", 100, minimum=1)
        found = []
        for msg in self.store.since(since):
            if to is None or to in rcpts_lower(msg):
                found.append(summary(msg))
                if len(found) >= limit:
                    break
        return web.json_response({"messages": found, "last_seq": self.store.last_seq,
                                  "retained": len(self.store.messages)})

    def _message_or_404(self, request: web.Request) -> Record:
        raw = request.match_info["seq"]
        try:
            seq = int(raw)
        except ValueError:
            raise _BadRequest(f"message seq must be an integer, not {raw!r}") from None
        msg = self.store.get(seq)
        if msg is None:
            why = ("it was evicted or cleared" if 0 < seq <= self.store.last_seq
                   else f"only {self.store.last_seq} were captured")
            raise web.HTTPNotFound(text=json.dumps({"error": f"no message #{seq}: {why}"}),
                                   content_type="application/json")
        return msg

    async def get_message(self, request: web.Request) -> web.Response:
        return web.json_response(parsed_view(self._message_or_404(request)))

    async def get_raw(self, request: web.Request) -> web.Response:
        msg = self._message_or_404(request)
        return web.Response(body=msg[DATA], content_type="message/rfc822")

    async def clear_messages(self, request: web.Request) -> web.Response:
        return web.json_response({"cleared": self.store.clear(), "last_seq": self.store.last_seq})

    async def wait(self, request: web.Request) -> web.Response:
        to = request.query.get("to") or None
        subject = request.query.get("subject") or None
        count = _int_param(request, "count", 1, minimum=1)
        since = _int_param(request, "since", 0)
        timeout = _float_param(request, "timeout", 10.0, minimum=0.0, maximum=MAX_WAIT_TIMEOUT)
        waiter = _Waiter(to, subject, count, since)
        started = time.time()
        for msg in self.store.since(since):  # retained mail counts; no await until registered
            if waiter.offer(msg):
                break
        if not waiter.future.done():
            self.store.add_waiter(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                return _bad("the sink service is stopping", status=503)
            finally:
                self.store.remove_waiter(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            return web.json_response({"messages": [summary(m) for m in waiter.found[:count]],
                                      "waited": round(time.time() - started, 6)})
        return web.json_response(self._near_misses(waiter, timeout), status=408)

    def _near_misses(self, waiter: _Waiter, timeout: float) -> dict:
        wanted = " ".join(filter(None, [f"to {waiter.to}" if waiter.to else "",
                                        f"with subject containing {waiter.subject!r}" if waiter.subject else ""])) or "at all"
        taken = {m[SEQ] for m in waiter.found}
        others = [m for m in self.store.since(waiter.since) if m[SEQ] not in taken]
        same = [m for m in others if waiter.to and waiter.to in rcpts_lower(m)]
        rest = [m for m in reversed(others) if m not in same][:NEAR_MISSES_SHOWN]
        shown = (same[-NEAR_MISSES_SHOWN:] + rest)[:NEAR_MISSES_SHOWN]
        have = f"only {len(waiter.found)} of {waiter.count} mails" if waiter.found else "no mail"
        return {
            "error": f"{have} {wanted} within {timeout:g} s; {len(others)} other mail(s) since seq {waiter.since}",
            "found": [summary(m) for m in waiter.found],
            "near_misses": [{**summary(m), "why": waiter.mismatches(m)} for m in shown],
            "other_count": len(others),
        }

    async def stream(self, request: web.Request) -> web.StreamResponse:
        since = _int_param(request, "since", None)
        heartbeat = _float_param(request, "heartbeat", DEFAULT_HEARTBEAT, minimum=0.05, maximum=300.0)
        known = request.query.get("instance")
        store = self.store
        reset = bool(known) and known != self.instance
        if reset:
            since = 0  # the client's seqs belong to an earlier run of the service: replay all we have
        elif since is None:
            since = store.last_seq
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        # Subscribe and snapshot in one step on the loop: nothing can be captured in between,
        # so the replay and the live part neither overlap nor leave a gap.
        sub = _Stream(request.transport)
        replay = store.since(since)
        store.streams.add(sub)
        try:
            await response.write(json.dumps({"hello": {"instance": self.instance, "since": since,
                                                       "last_seq": store.last_seq, "reset": reset}}).encode() + b"\n")
            first = replay[0][SEQ] if replay else store.last_seq + 1
            if since + 1 < first and since < store.last_seq:
                missing = {"from": since + 1, "to": first - 1,
                           "evicted": store.evicted, "cleared": store.cleared}
                await response.write(json.dumps({"missing": missing}).encode() + b"\n")
            for start in range(0, len(replay), STREAM_BATCH):
                await response.write(b"".join(stream_line(m) for m in replay[start:start + STREAM_BATCH]))
            del replay
            while not sub.closing and not self._stopping:
                if sub.overflowed:
                    log.warning("a /stream client fell %d messages behind: dropping it (it reconnects with since=)",
                                len(sub.pending))
                    sub.drop = True
                    break
                if sub.pending:
                    batch, sub.pending = sub.pending[:STREAM_BATCH], sub.pending[STREAM_BATCH:]
                    if not sub.pending:
                        sub.event.clear()
                    await response.write(b"".join(stream_line(m) for m in batch))
                    continue
                sub.event.clear()
                try:
                    await asyncio.wait_for(sub.event.wait(), heartbeat)
                except asyncio.TimeoutError:
                    await response.write(json.dumps({"heartbeat": time.time(),
                                                     "last_seq": store.last_seq}).encode() + b"\n")
        except ConnectionError:
            return response  # the client went away: nothing to tell anybody
        finally:
            store.streams.discard(sub)
        if sub.drop and sub.transport is not None:
            sub.transport.close()  # DELETE /streams: an abrupt drop, no terminating chunk
            return response
        try:
            await response.write_eof()
        except ConnectionError:
            pass  # the client left while we were stopping
        return response

    async def drop_streams(self, request: web.Request) -> web.Response:
        streams = list(self.store.streams)
        for sub in streams:
            sub.closing = sub.drop = True
            sub.event.set()
        return web.json_response({"dropped": len(streams)})

    async def stats(self, request: web.Request) -> web.Response:
        store = self.store
        return web.json_response({
            "received": store.received, "retained": len(store.messages),
            "retained_bytes": store.retained_bytes, "evicted": store.evicted, "cleared": store.cleared,
            "bytes": store.bytes, "last_seq": store.last_seq, "max_messages": store.max_messages,
            "connections": {"total": self.sink.connections_total, "active": len(self.sink._connections)},
            "streams": len(store.streams), "waiters": store.waiter_count,
            "faults": [{"id": r.id, "name": r.name, "stage": r.stage, "scope": r.scope,
                        "fired": r.fired, "acted": r.acted} for r in self.faults.rules],
            "uptime": round(time.time() - self.started_at, 3),
        })

    async def list_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [rule_to_spec(r) for r in self.faults.rules]})

    async def add_fault(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _bad(f"the body must be a JSON fault rule: {exc}")
        try:
            if isinstance(spec, dict) and "profile" in spec:
                extra = sorted(set(spec) - {"profile", "seed", "scope", "to_pattern"})
                if extra:
                    raise FaultError(f"{extra[0]}: unknown field for a chaos profile; use profile, seed, scope, to_pattern")
                seed = spec.get("seed")
                if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                    raise FaultError(f"seed: must be an integer, not {seed!r}")
                rules = parse_chaos_profile(spec["profile"], seed=seed, scope=spec.get("scope"),
                                            to_pattern=spec.get("to_pattern"))
                added = [self.faults.add(rule) for rule in rules]
                return web.json_response({"faults": [rule_to_spec(r) for r in added]}, status=201)
            rule = self.faults.add(rule_from_spec(spec))
        except FaultError as exc:
            return _bad(str(exc))
        return web.json_response(rule_to_spec(rule), status=201)

    async def remove_fault(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        try:
            rule_id = int(raw)
        except ValueError:
            return _bad(f"fault id must be an integer, not {raw!r}")
        rule = self.faults.remove(rule_id)
        if rule is None:
            return _bad(f"no fault rule with id {rule_id}", status=404)
        return web.json_response(rule_to_spec(rule))

    async def clear_faults(self, request: web.Request) -> web.Response:
        scope = request.query.get("scope")
        return web.json_response({"removed": self.faults.clear(scope=scope)})


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailproof.capture.service",
        description="mailproof sink service: SMTP capture plus an HTTP API, in one process.")
    parser.add_argument("--host", default=LOOPBACK,
                        help="address SMTP and HTTP bind (default 127.0.0.1; anything else needs --token)")
    parser.add_argument("--smtp-port", type=int, default=0, help="SMTP port (0: the OS picks one)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP API port (0: the OS picks one)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' on every endpoint (or set {TOKEN_ENV})")
    parser.add_argument("--max-messages", type=int, default=DEFAULT_MAX_MESSAGES,
                        help=f"messages retained, oldest evicted first and counted (default {DEFAULT_MAX_MESSAGES})")
    parser.add_argument("--smtp-timeout", type=float, default=60.0, help="idle SMTP session timeout, seconds")
    parser.add_argument("--chaos", default=None, metavar="PROFILE",
                        help="fault rules to install at start, e.g. '5%%:rcpt:451,1%%:after_data:disconnect' "
                             "(see mailproof.faults.specs.parse_chaos_profile); scope 'chaos'")
    parser.add_argument("--chaos-seed", type=int, default=None, help="seed for --chaos (repeatable runs)")
    return parser


def parse_args(argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    args.token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not args.token:
        parser.error(  # exits with code 2 before anything listens
            f"refusing to listen on {args.host!r}: it is not a loopback address, and the API reads "
            f"every captured mail and changes faults. Give --token TOKEN (or set {TOKEN_ENV}); "
            "clients then send 'Authorization: Bearer TOKEN'. Or bind 127.0.0.1.")
    if args.max_messages < 1:
        parser.error("--max-messages must be at least 1")
    if args.chaos:
        try:
            args.chaos_rules = parse_chaos_profile(args.chaos, seed=args.chaos_seed, scope="chaos")
        except FaultError as exc:
            parser.error(f"--chaos: {exc}")
    else:
        args.chaos_rules = []
    return args


async def _serve(args: argparse.Namespace) -> int:
    service = SinkService(host=args.host, smtp_port=args.smtp_port, http_port=args.http_port,
                          token=args.token, max_messages=args.max_messages, smtp_timeout=args.smtp_timeout)
    for rule in args.chaos_rules:
        service.faults.add(rule)
    try:
        await service.start()
    except (SinkError, ServiceError) as exc:
        print(f"sink service: {exc}", file=sys.stderr, flush=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything imported and built so far lives as long as the process: keep it out of the
    # garbage collector's full collections (they would rescan it thousands of times under load).
    gc.freeze()
    print(service.ready_line, flush=True)
    await stop.wait()
    await service.stop()
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
