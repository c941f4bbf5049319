"""The HTTP API's handlers (aiohttp); the endpoints are documented in ``mailproof.capture.service``.

``SinkApi(service).app()`` is the aiohttp application: token check, query-parameter checks (a
malformed one is a 400 naming it), and one handler per endpoint over the service's store,
sink and fault plan.

Beyond what the package docstring lists: ``/health`` also answers ``"tls": {"mode", "ca_file"}``
(``ca_file``: the CA certificate the app under test must trust, null with TLS off) and
``"auth_required"``; every ``/stream`` message line also carries ``tls`` and ``auth_user`` (the
SMTP session's STARTTLS and AUTH, see ``mailproof.capture.tls``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Optional

from aiohttp import web

from mailproof.capture.service.store import (DATA, OFF_LOOP_BYTES, SEQ, Record, Slicer, Stream, Waiter)
from mailproof.capture.service.views import near_misses, parsed_view_json, record_summary, stream_line, summary
from mailproof.criteria import Criteria
from mailproof.faults.specs import FaultError, parse_chaos_profile, rule_from_spec, rule_to_spec

if TYPE_CHECKING:
    from mailproof.capture.service.server import SinkService

log = logging.getLogger("mailproof.sink_service")

DEFAULT_HEARTBEAT = 5.0
MAX_WAIT_TIMEOUT = 3600.0
STREAM_BATCH = 256  # messages per write on a stream (backpressure is applied per write)
CLIENT_MAX_SIZE = 1024 * 1024  # request bodies (fault specs) are small
MAX_PAGE = 1000  # summaries per GET /messages answer at most (``limit`` is capped; ``next`` pages on)
MAX_STATS_WAIT = 60.0


MAX_SPEC_DEPTH = 32  # a Script of Delays of Chaos is about 6 levels deep; more is an attack or a bug


def _depth(value, limit: int = MAX_SPEC_DEPTH + 1) -> int:
    """How deeply ``value`` nests lists and dicts, counting no further than ``limit``."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
        level = [child for child in level if isinstance(child, (list, dict))]
    return depth


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


def _line(event: dict) -> bytes:
    return json.dumps(event).encode() + b"\n"


async def _summaries_json(store, records: list[Record]) -> str:
    """The JSON array of the summaries of ``records``, made yielding to the loop as it goes (a
    Subject is parsed once, then remembered by the store; one big ``json.dumps`` would hold
    the loop for a whole page)."""
    await store.remember_subjects(records)
    found = []
    async with Slicer() as slicer:
        for rec in records:
            await slicer.tick()
            subject = store.subjects.get(rec[SEQ])
            if subject is None:  # evicted meanwhile, or never remembered
                subject = await store.subject(rec)
            found.append(json.dumps(record_summary(rec, subject)))
    return "[" + ",".join(found) + "]"


class SinkApi:
    """The endpoints of one ``SinkService``."""

    def __init__(self, service: "SinkService") -> None:
        self.service = service
        self.store = service.store

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=CLIENT_MAX_SIZE)
        app.router.add_get("/health", self.health)
        app.router.add_get("/messages", self.list_messages)
        app.router.add_delete("/messages", self.clear_messages)
        app.router.add_get("/messages/{seq}", self.get_message)
        app.router.add_get("/messages/{seq}/raw", self.get_raw)
        app.router.add_get("/wait", self.wait)
        app.router.add_get("/stream", self.stream)
        app.router.add_delete("/streams", self.drop_streams)
        app.router.add_delete("/streams/{client}", self.release_stream)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/faults", self.list_faults)
        app.router.add_post("/faults", self.add_fault)
        app.router.add_delete("/faults", self.clear_faults)
        app.router.add_delete("/faults/{id}", self.remove_fault)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        token = self.service.token
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode()):
                return web.json_response(
                    {"error": "this sink service requires 'Authorization: Bearer <token>' (the --token it was started with)"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="mailproof-sink"'})
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _bad(str(exc))

    # -- health and messages ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        service = self.service
        return web.json_response({
            "status": "stopping" if service.stopping else "ok",
            "smtp": {"host": service.host, "port": service.smtp_port},
            "http": {"host": service.host, "port": service.http_port},
            "last_seq": self.store.last_seq, "token_required": service.token is not None,
            "instance": service.instance, "pid": os.getpid(),
            "tls": {"mode": service.tls_mode, "ca_file": service.tls_ca_file},
            "auth_required": service.auth is not None,
            # The provider APIs (--providers): their URL and the requests each accepted.
            "providers": ({"url": service.providers.url, "accepted": dict(service.providers.accepted)}
                          if service.providers is not None else None),
        })

    async def list_messages(self, request: web.Request) -> web.Response:
        """One page, at most ``MAX_PAGE`` summaries; ``next`` is the ``since`` of the next page
        (null on the last one). ``to=`` reads the store's recipient index, not every record."""
        to = request.query.get("to") or None
        since = _int_param(request, "since", 0)
        limit = min(_int_param(request, "limit", 100, minimum=1), MAX_PAGE)
        store = self.store
        if to:
            seqs = store.seqs_to(to, since)
            more = len(seqs) > limit
            records = [rec for rec in map(store.get, seqs[:limit]) if rec is not None]
        else:
            records = store.after(since, limit + 1)
            more = len(records) > limit
            del records[limit:]
        next_since = records[-1][SEQ] if more and records else None
        found = await _summaries_json(store, records)
        rest = json.dumps({"last_seq": store.last_seq, "retained": len(store.messages), "limit": limit,
                           "next": next_since})
        return web.Response(text='{"messages": ' + found + ", " + rest[1:], content_type="application/json")

    def _record_or_404(self, request: web.Request) -> Record:
        raw = request.match_info["seq"]
        try:
            seq = int(raw)
        except ValueError:
            raise _BadRequest(f"message seq must be an integer, not {raw!r}") from None
        rec = self.store.get(seq)
        if rec is None:
            why = ("it was evicted or cleared" if 0 < seq <= self.store.last_seq
                   else f"only {self.store.last_seq} were captured")
            raise web.HTTPNotFound(text=json.dumps({"error": f"no message #{seq}: {why}"}),
                                   content_type="application/json")
        return rec

    async def get_message(self, request: web.Request) -> web.Response:
        rec = self._record_or_404(request)
        if len(rec[DATA]) < OFF_LOOP_BYTES // 16:
            text = parsed_view_json(rec)
        else:  # a full parse (10,000 parts, many MB) must not stall SMTP capture on the loop
            text = await self.store.off_process(parsed_view_json, rec)
        return web.Response(text=text, content_type="application/json")

    async def get_raw(self, request: web.Request) -> web.Response:
        return web.Response(body=self._record_or_404(request)[DATA], content_type="message/rfc822")

    async def clear_messages(self, request: web.Request) -> web.Response:
        return web.json_response({"cleared": self.store.clear(), "last_seq": self.store.last_seq})

    # -- waiting and streaming -------------------------------------------------------------------

    async def wait(self, request: web.Request) -> web.Response:
        criteria = Criteria(to=request.query.get("to") or None, subject=request.query.get("subject") or None)
        count = _int_param(request, "count", 1, minimum=1)
        since = _int_param(request, "since", 0)
        timeout = _float_param(request, "timeout", 10.0, minimum=0.0, maximum=MAX_WAIT_TIMEOUT)
        waiter = Waiter(criteria, count, since)
        started = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.store.add_waiter(waiter)  # retained mail counts; registered before any await
            if not waiter.future.done():
                await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            if not self.service.stopping:
                # The client hung up (the runner cancels the handler: handler_cancellation): the
                # waiter goes now, not at its timeout.
                self.store.waiters_abandoned += 1
                log.info("a /wait client hung up after %.3f s: its waiter is removed", time.time() - started)
                raise
            return _bad("the sink service is stopping", status=503)
        finally:
            self.store.remove_waiter(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            found = []
            async with Slicer() as slicer:
                for msg in waiter.found[:count]:
                    await slicer.tick()
                    found.append(summary(msg))
            return web.json_response({"messages": found, "waited": round(time.time() - started, 6)})
        return web.json_response(await near_misses(waiter, self.store, timeout), status=408)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        since = _int_param(request, "since", None)
        heartbeat = _float_param(request, "heartbeat", DEFAULT_HEARTBEAT, minimum=0.05, maximum=300.0)
        known = request.query.get("instance")
        client = request.query.get("client") or None  # a named client keeps a cursor (retention)
        run = (request.query.get("run") or "").strip().lower() or None  # only this run's mail (and strays)
        store, service = self.store, self.service
        reset = bool(known) and known != service.instance
        if reset:
            since = 0  # the client's seqs belong to an earlier run of the service: replay all we have
        elif since is None:
            since = store.last_seq
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        # Subscribe, snapshot and queue the replay in one step on the loop (no await): nothing can
        # be captured in between, so the replay and the live part neither overlap nor leave a gap,
        # and the replay is queued ahead of every arrival.
        sub = Stream(request.transport, run=run, since=since)
        replay = store.since(since)
        store.streams.add(sub)
        cursor = store.attach(client, since) if client else None
        first = replay[0][SEQ] if replay else store.last_seq + 1
        gap = (since + 1, first - 1) if since + 1 < first and since < store.last_seq else None
        if gap:
            sub.considered = sub.accounted = gap[1]
        for rec in replay:
            sub.take(rec)
        del replay
        try:
            await response.write(_line({"hello": {"instance": service.instance, "since": since,
                                                  "last_seq": store.last_seq, "reset": reset, "run": run}}))
            if gap:
                await response.write(_line({"missing": {"from": gap[0], "to": gap[1],
                                                        "evicted": store.evicted, "cleared": store.cleared}}))
            while not sub.closing and not service.stopping:
                if sub.overflowed:
                    log.warning("a /stream client fell %d messages behind: dropping it (it reconnects with since=)",
                                len(sub.pending))
                    sub.drop = True
                    break
                if sub.pending:
                    batch, sub.pending = sub.pending[:STREAM_BATCH], sub.pending[STREAM_BATCH:]
                    if not sub.pending:
                        sub.event.clear()
                    await response.write(b"".join(stream_line(rec, first if run else None) for first, rec in batch))
                    if cursor is not None:
                        store.sent(cursor, batch[-1][1][SEQ])
                    continue
                if sub.considered > sub.accounted:  # only filtered mail since the last line
                    sub.accounted = through = sub.considered
                    await response.write(_line({"through": through}))
                    if cursor is not None:
                        store.sent(cursor, through)
                    continue
                sub.event.clear()
                try:
                    await asyncio.wait_for(sub.event.wait(), heartbeat)
                except asyncio.TimeoutError:
                    await response.write(_line({"heartbeat": time.time(), "last_seq": store.last_seq}))
        except ConnectionError:
            return response  # the client went away: nothing to tell anybody
        finally:
            store.streams.discard(sub)
            if cursor is not None:
                store.detach(cursor)
        if sub.drop and sub.transport is not None:
            sub.transport.close()  # DELETE /streams: an abrupt drop, no terminating chunk
            return response
        try:
            await response.write_eof()
        except ConnectionError:
            pass  # the client left while we were stopping
        return response

    async def drop_streams(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": self.store.drop_streams()})

    async def release_stream(self, request: web.Request) -> web.Response:
        """``DELETE /streams/ID``: the named client is done; its cursor holds no mail any more."""
        return web.json_response({"released": self.store.release(request.match_info["client"])})

    # -- stats and faults ------------------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        """``?waiters=N&timeout=S``: answer once N ``/wait`` waiters are registered (or after S
        seconds, default 10): a client can see a waiter come or go without polling."""
        store, service = self.store, self.service
        settle = _int_param(request, "waiters", None)
        if settle is not None:
            await store.waiters_settle(settle, _float_param(request, "timeout", 10.0, minimum=0.0,
                                                            maximum=MAX_STATS_WAIT))
        return web.json_response({
            "received": store.received, "retained": len(store.messages),
            "retained_bytes": store.retained_bytes, "evicted": store.evicted, "cleared": store.cleared,
            "over_cap": store.over_cap, "renumbered": store.renumbered, "stream_clients": len(store.cursors),
            "stream_client_ids": sorted(store.cursors),
            "bytes": store.bytes, "last_seq": store.last_seq, "max_messages": store.max_messages,
            "connections": {"total": service.sink.connections_total, "active": len(service.sink._connections)},
            "streams": len(store.streams), "waiters": store.waiter_count,
            "waiters_abandoned": store.waiters_abandoned,
            "faults": [{"id": r.id, "name": r.name, "stage": r.stage, "scope": r.scope,
                        "fired": r.fired, "acted": r.acted} for r in service.faults.rules],
            "uptime": round(time.time() - service.started_at, 3),
        })

    async def list_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [rule_to_spec(r) for r in self.service.faults.rules]})

    async def add_fault(self, request: web.Request) -> web.Response:
        faults = self.service.faults
        try:
            spec = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _bad(f"the body must be a JSON fault rule: {exc}")
        except RecursionError:
            return _bad("the body is nested too deeply to be a fault rule (a rule nests a few levels)")
        if _depth(spec) > MAX_SPEC_DEPTH:
            return _bad(f"the fault rule is nested deeper than {MAX_SPEC_DEPTH} levels; a rule needs a few")
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
                added = [faults.add(rule) for rule in rules]
                return web.json_response({"faults": [rule_to_spec(r) for r in added]}, status=201)
            rule = faults.add(rule_from_spec(spec))
        except FaultError as exc:
            return _bad(str(exc))
        return web.json_response(rule_to_spec(rule), status=201)

    async def remove_fault(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        try:
            rule_id = int(raw)
        except ValueError:
            return _bad(f"fault id must be an integer, not {raw!r}")
        rule = self.service.faults.remove(rule_id)
        if rule is None:
            return _bad(f"no fault rule with id {rule_id}", status=404)
        return web.json_response(rule_to_spec(rule))

    async def clear_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"removed": self.service.faults.clear(scope=request.query.get("scope"))})
