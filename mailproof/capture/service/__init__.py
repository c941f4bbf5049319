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
may also come from the environment variable ``MAILPROOF_SINK_TOKEN`` (kept out of ``ps``); one of
only white space is refused. Off loopback, SMTP requires AUTH too (user ``mailproof``, the token
as password, unless ``--auth`` gives others or ``--open-smtp`` accepts anyone's mail).

Capture keeps raw bytes and the envelope only; headers are parsed when a client asks for a parsed
view. SMTP capture shares the loop with the API, so no request holds it long: listings are pages,
recipients are indexed, remaining scans yield to the loop, and big parses (a parsed view, many
Subjects at once) run in parser processes (``benchmarks/service_canary.py`` measures it). Retention is bounded (``--max-messages``, oldest first); every eviction is counted in
``/stats`` and the first one is logged.

HTTP API (JSON unless said otherwise):

``GET /health``
    ``{"status": "ok", "smtp": {"host", "port"}, "http": {...}, "last_seq", "token_required",
    "instance", "pid"}`` (``instance``: a random id of this run of the service; ``status`` is
    ``"stopping"`` once it stops).
``GET /messages?to=&since=SEQ&limit=N``
    One page of summaries of retained messages with seq > SEQ, oldest first: seq, mail_from,
    rcpt_tos, received_at, size, subject (parsed on request, once). ``limit`` (default 100) is
    capped at 1,000 (the answer says the ``limit`` used); ``next`` is the ``since`` of the next
    page, null on the last. ``to=`` reads a per-recipient index of retained seqs.
``GET /messages/{seq}``
    Parsed view (``mailproof.message.Message``): the summary fields, then headers (``[name,
    value]`` pairs, decoded and unfolded), from, to, cc, message_id, date (the header text),
    text and html (CRLF read as LF), attachments (filename, content_type, size, inline,
    content_id), defects; and the SMTP session: helo, peer, smtputf8, tls, auth_user,
    mail_options. 404 when never captured or evicted.
``GET /messages/{seq}/raw``
    The exact bytes received (``message/rfc822``).
``DELETE /messages``
    Forget every retained message (counted as ``cleared``, not ``evicted``).
``GET /wait?to=&subject=&count=1&timeout=10&since=0``
    Long-poll: answers the moment ``count`` messages with seq > since, to the recipient (exact,
    case-insensitive) whose Subject contains ``subject``, are captured (already retained ones
    count); matched by ``mailproof.criteria.Criteria``, as a Mailbox wait is. 200
    ``{"messages": [summaries], "waited"}``; 408 with ``error``, ``found``, ``other_count`` and
    ``near_misses`` (other mail since ``since``, same recipient first, each with ``why``: the
    ``Criteria.mismatches`` reasons it did not match), ``evicted_since`` (messages after
    ``since`` evicted by the retention limit: they may have matched; the ``error`` says so) and
    the ``evicted`` and ``cleared`` totals. A client that hangs up ends its wait at once
    (counted in ``/stats`` as ``waiters_abandoned``).
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
    Without ``since`` the stream starts with the next arrival. ``client=ID`` names the client:
    mail it has not been sent yet is then never evicted, for ``--stream-hold`` seconds after its
    connection ends too (a reconnect replays instead of finding a gap); past the cap such mail
    is kept and counted in ``over_cap``.
``DELETE /streams/{client}``
    The named client is done: it holds no mail any more (``RemoteSink.stop`` sends it).
``DELETE /streams``
    Drop every open stream connection abruptly (a chaos hook: clients must reconnect with
    ``since`` and lose nothing).
``GET /stats``
    received, retained, retained_bytes, evicted, cleared, over_cap, renumbered (messages that came
    numbered at or below the last seq, kept under the next one: a harness fault), stream_clients, bytes,
    last_seq, max_messages, connections {total, active}, streams, waiters, waiters_abandoned, faults (per rule: fired,
    acted), uptime. ``?waiters=N&timeout=S`` (at most 60, default 10) answers once N ``/wait``
    waiters are registered, or after S seconds: see a wait begin or end without polling.
``GET /faults`` / ``POST /faults`` / ``DELETE /faults/{id}`` / ``DELETE /faults?scope=S``
    Fault rules as JSON (``mailproof.faults.specs``). POST takes one rule spec (201, the rule with its
    id) or ``{"profile": "5%:rcpt:451,...", "seed": 1, "scope": "s"}`` (201, ``{"faults": [...]}``).
    A malformed spec is a 400 naming the bad field.

Modules, one concept each: ``store`` (retained mail, seqs, waiters and streams), ``views`` (the JSON
shapes), ``api`` (the aiohttp handlers), ``server`` (``SinkService``: SMTP plus HTTP on one loop),
``cli`` (the command line; ``__main__`` runs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

TOKEN_ENV = "MAILPROOF_SINK_TOKEN"  # the token, kept out of argv (``ps``); RemoteSink.launch sets it


class ServiceError(RuntimeError):
    """The service could not start; the message names the cause and the fix."""


# The rest is imported on first use: RemoteSink (gevent-friendly, no aiohttp) imports TOKEN_ENV
# from here, and should not load aiohttp and the server for it.
_LAZY = {"SinkService": "server", "CaptureStore": "store", "DEFAULT_MAX_MESSAGES": "store", "main": "cli"}

if TYPE_CHECKING:
    from mailproof.capture.service.cli import main
    from mailproof.capture.service.server import SinkService
    from mailproof.capture.service.store import DEFAULT_MAX_MESSAGES, CaptureStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["CaptureStore", "DEFAULT_MAX_MESSAGES", "ServiceError", "SinkService", "TOKEN_ENV", "main"]
