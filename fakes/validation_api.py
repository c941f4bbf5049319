"""Fake third-party email-validation API (Kickbox-like), for the app under test to call.

    api = ValidationApi(api_key="k")   # port=0: the OS picks
    api.start()                        # returns once listening
    api.url                            # "http://127.0.0.1:PORT"
    api.stop()

or as its own process: ``python -m fakes.validation_api --port N`` prints ``READY <url>``.

Faults, the way a real provider misbehaves during a launch (``api.faults`` is an ``ApiFaults``)::

    api.faults.set(latency=0.2, jitter=0.1, seed=7)        # slow, with seeded jitter
    api.faults.set(rate_limit=20, retry_after=1)           # past 20 requests/s: 429 + Retry-After
    api.faults.set(errors=3)                               # a burst: the next 3 requests get 503
    api.faults.set(error_rate=0.1, error_status=500, seed=1)  # 10 % 500s, the same ones every run
    api.faults.set(outage=5)                               # down for 5 s: connection refused
    api.faults.set(outage=5, outage_mode="503")            # ... or 503 for 5 s ("429": throttled)
    api.faults.set(malformed=2)                            # the next 2 good answers are garbled
    api.faults.fired                                       # what fired: {"rate_limited": 3, ...}
    api.faults.clear()                                     # healthy again, counters back to zero

``set`` replaces the whole configuration (its windows and bursts start at the call); ``fired``
counts since the last ``clear``. Settings combine: per request, an outage is checked first, then
the rate limit, then 5xx bursts and the error rate, then latency is added to whatever answer
results, and malformed bodies replace good answers. Randomness (jitter, error and malformed
rates) comes from ``random.Random(seed)``: the same settings and request order give the same
faults. ``ValidationApi(faults=FaultSettings(...))`` starts with faults set. In a test, use the
``validation_faults`` fixture (root conftest.py): it clears them when the test ends.

A custom aiohttp middleware still plugs in (``faults=callable`` or ``api.faults = callable``):
``async def faults(request, handler) -> web.StreamResponse``; it runs inside the built-in faults.
Faults sit inside the stats middleware (so faulted replies are counted) and outside auth and the
verify handler (so they can replace any reply).

Stdlib and aiohttp only: this stands for the outside world and imports nothing of the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import math
import random
import signal
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

DEFAULT_DENY_DOMAINS = frozenset({"invalid.test", "bounce.test"})
DEFAULT_DISPOSABLE_DOMAINS = frozenset({"mailinator.com"})

# Characters allowed unquoted in a local part (RFC 5322 atext); non-ASCII is allowed too (RFC 6531).
_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


def _syntax_ok(addr: str) -> bool:
    if not addr or len(addr) > 254 or addr.count("@") != 1:
        return False
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in addr):
        return False
    local, domain = addr.split("@")
    if not local or len(local) > 64 or not domain or "." not in domain:
        return False
    if any(not atom or any(c not in _ATEXT and ord(c) < 128 for c in atom) for atom in local.split(".")):
        return False
    for label in domain.split("."):
        if not label or label.startswith("-") or label.endswith("-"):
            return False
        if any(not (c.isalnum() or c == "-") for c in label):
            return False
    return True


def verify(addr: str, deny_domains=DEFAULT_DENY_DOMAINS, disposable_domains=DEFAULT_DISPOSABLE_DOMAINS) -> dict:
    """The verdict rules, as a pure function (the handler only adds HTTP around it)."""

    def verdict(result: str, reason: str, disposable: bool = False) -> dict:
        return {"email": addr, "result": result, "reason": reason, "disposable": disposable, "did_you_mean": None}

    if not _syntax_ok(addr):
        return verdict("undeliverable", "invalid_email")
    local, domain = addr.split("@")
    domain = domain.lower()
    if domain in deny_domains:
        return verdict("undeliverable", "invalid_domain")
    # "reject*" addresses are undeliverable; so are plus-addressed ones tagged "reject*"
    # (qa+reject-1@...), the form test addresses take on a real inbox.
    if local.lower().startswith("reject") or local.lower().partition("+")[2].startswith("reject"):
        return verdict("undeliverable", "rejected_email")
    if domain in disposable_domains:
        return verdict("risky", "low_quality", disposable=True)
    return verdict("deliverable", "accepted_email")


# --- faults ---------------------------------------------------------------------------------------

OUTAGE_MODES = ("refuse", "503", "429")

# What a "malformed" answer looks like, in turn: truncated JSON, a proxy's HTML page sent with 200,
# and well-formed JSON without a verdict.
MALFORMED_BODIES = (
    (b'{"email": "x@example.com", "result": "deliv', "application/json"),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    (b'{"status": "ok"}', "application/json"),
)


class FaultSettingsError(ValueError):
    """A fault setting is out of range; the message names it and what is allowed."""


def _real(name: str, value: Any, *, low: float = 0.0, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or math.isnan(value) or math.isinf(value):
        bound = f"between {low:g} and {high:g}" if high != math.inf else f"a finite number >= {low:g}"
        raise FaultSettingsError(f"{name} must be {bound}, not {value!r}")


@dataclass(frozen=True)
class FaultSettings:
    """One fault configuration of the validation API. Every field defaults to "healthy"."""

    latency: float = 0.0  # seconds added to every answer
    jitter: float = 0.0  # plus uniform(0, jitter) seconds, seeded
    rate_limit: Optional[float] = None  # requests per second (sliding 1 s window, counting those let
    #                                     through); past it: 429 + Retry-After
    retry_after: int = 1  # the Retry-After header (seconds) on every 429
    errors: int = 0  # a burst: the next N requests answer error_status
    error_status: int = 503  # any 5xx (or 429) for bursts and the error rate
    error_rate: float = 0.0  # after the burst, each request fails with this probability (seeded)
    outage: float = 0.0  # seconds, from set(): the API is down
    outage_mode: str = "refuse"  # "refuse": connection refused; "503"; "429" (+ Retry-After)
    malformed: int = 0  # the next N good (200) answers have a garbled body
    malformed_rate: float = 0.0  # after those, each good answer is garbled with this probability
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("latency", "jitter", "outage"):
            _real(name, getattr(self, name))
        for name in ("error_rate", "malformed_rate"):
            _real(name, getattr(self, name), high=1.0)
        if self.rate_limit is not None:
            _real("rate_limit", self.rate_limit)
            if self.rate_limit <= 0:
                raise FaultSettingsError("rate_limit must be a positive number of requests per second")
        for name in ("errors", "malformed", "retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FaultSettingsError(f"{name} must be a whole number >= 0, not {value!r}")
        if self.error_status != 429 and not (isinstance(self.error_status, int) and 500 <= self.error_status <= 599):
            raise FaultSettingsError(f"error_status must be a 5xx status or 429, not {self.error_status!r}")
        if self.outage_mode not in OUTAGE_MODES:
            raise FaultSettingsError(f"outage_mode must be one of {', '.join(OUTAGE_MODES)}, not {self.outage_mode!r}")


FIRED_KEYS = ("requests", "delayed", "rate_limited", "errors", "outage", "malformed")


class ApiFaults:
    """The live fault state of one ValidationApi: ``set``, ``clear``, ``fired``; also its middleware.

    Thread-safe: tests call ``set``/``clear`` from their thread while the API answers on its own.
    """

    def __init__(self, on_change: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # windows (rate limit, outage) are measured on it; tests may drive it
        self._lock = threading.Lock()
        self._on_change = on_change
        self.custom: Optional[Middleware] = None  # a hand-written middleware, run inside ours
        self._fired: collections.Counter[str] = collections.Counter()
        self._install(None)

    def _install(self, settings: Optional[FaultSettings]) -> None:
        self._settings = settings
        self._rng = random.Random(settings.seed if settings else None)
        self._errors_left = settings.errors if settings else 0
        self._malformed_left = settings.malformed if settings else 0
        self._malformed_seq = 0
        self._window: collections.deque[float] = collections.deque()
        self._outage_until = self.clock() + settings.outage if settings and settings.outage else 0.0

    # --- the test's side -----------------------------------------------------------------------

    def set(self, settings: Optional[FaultSettings] = None, /, **fields: Any) -> FaultSettings:
        """Replace the configuration: ``set(rate_limit=5)`` or ``set(FaultSettings(...), seed=2)``.

        Windows (outage) and bursts (errors, malformed) start now. Returns the settings in force.
        """
        try:
            settings = dataclasses.replace(settings, **fields) if settings else FaultSettings(**fields)
        except TypeError as exc:
            known = ", ".join(f.name for f in dataclasses.fields(FaultSettings))
            raise FaultSettingsError(f"{exc}; the settings are: {known}") from None
        with self._lock:
            self._install(settings)
        self._changed()
        return settings

    def clear(self) -> None:
        """Healthy again (an outage ends now), no custom middleware, counters back to zero."""
        with self._lock:
            self._install(None)
            self.custom = None
            self._fired.clear()
        self._changed()

    @property
    def settings(self) -> Optional[FaultSettings]:
        return self._settings

    @property
    def fired(self) -> dict[str, int]:
        """How often each fault fired since the last clear(); ``requests`` counts every request seen.

        A connection refused by a closed listener never reaches the API and cannot be counted:
        ``outage`` counts the requests that were answered 503/429 or dropped during an outage.
        """
        with self._lock:
            return {key: self._fired.get(key, 0) for key in FIRED_KEYS}

    def refusing_for(self) -> float:
        """Seconds the listener must stay closed from now (0: it must listen)."""
        with self._lock:
            s = self._settings
            remaining = self._outage_until - self.clock()
            if s is None or s.outage_mode != "refuse" or remaining <= 0:
                return 0.0
            return remaining

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # --- the server's side: an aiohttp middleware ------------------------------------------------

    def _decide(self) -> tuple[Optional[str], float, Optional[FaultSettings]]:
        """(fault, delay, settings) for one request; fault: None, drop, outage, rate_limited, errors."""
        now = self.clock()
        with self._lock:
            self._fired["requests"] += 1
            s = self._settings
            if s is None:
                return None, 0.0, None
            fault: Optional[str] = None
            if now < self._outage_until:
                fault = "drop" if s.outage_mode == "refuse" else "outage"
            elif s.rate_limit is not None:
                span = max(1.0, 1.0 / s.rate_limit)  # under 1/s: one request per 1/rate seconds
                while self._window and now - self._window[0] >= span:
                    self._window.popleft()
                if len(self._window) >= max(1, math.floor(s.rate_limit * span + 1e-9)):
                    fault = "rate_limited"
                else:
                    self._window.append(now)
            if fault is None:
                if self._errors_left > 0:
                    self._errors_left -= 1
                    fault = "errors"
                elif s.error_rate and self._rng.random() < s.error_rate:
                    fault = "errors"
            delay = s.latency + (self._rng.uniform(0.0, s.jitter) if s.jitter else 0.0)
            if fault is not None:
                self._fired["outage" if fault == "drop" else fault] += 1
            if delay > 0 and fault != "drop":
                self._fired["delayed"] += 1
            return fault, delay, s

    def _garble(self) -> Optional[tuple[bytes, str]]:
        with self._lock:
            s = self._settings
            if s is None:
                return None
            if self._malformed_left > 0:
                self._malformed_left -= 1
            elif not (s.malformed_rate and self._rng.random() < s.malformed_rate):
                return None
            self._fired["malformed"] += 1
            body = MALFORMED_BODIES[self._malformed_seq % len(MALFORMED_BODIES)]
            self._malformed_seq += 1
            return body

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        fault, delay, settings = self._decide()
        if fault == "drop":  # on a kept-alive connection during a refusing outage: hang up, no answer
            request.protocol.force_close()
            raise asyncio.CancelledError()
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is not None and settings is not None:
            status = {"outage": 429 if settings.outage_mode == "429" else 503,
                      "rate_limited": 429, "errors": settings.error_status}[fault]
            headers = {"Retry-After": str(settings.retry_after)} if status == 429 else {}
            message = {429: "rate limit exceeded", 503: "service unavailable"}.get(status, "internal error")
            return web.json_response({"message": message}, status=status, headers=headers)
        custom = self.custom
        response = await (custom(request, handler) if custom else handler(request))
        if response.status == 200 and isinstance(response, web.Response):
            garbled = self._garble()
            if garbled is not None:
                body, content_type = garbled
                return web.Response(body=body, status=200, content_type=content_type)
        return response


class ValidationApi:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        deny_domains=DEFAULT_DENY_DOMAINS,
        disposable_domains=DEFAULT_DISPOSABLE_DOMAINS,
        faults: FaultSettings | Middleware | dict | None = None,
    ) -> None:
        self.host, self.port, self.api_key = host, port, api_key
        self.deny_domains = set(deny_domains)
        self.disposable_domains = set(disposable_domains)
        self._faults = ApiFaults(on_change=self._sync_listener_threadsafe)
        self._listener: asyncio.base_events.Server | None = None
        self._reopen: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task | None = None
        self._up = threading.Event()  # set while the listener accepts connections
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._by_status: collections.Counter[int] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None
        self.faults = faults  # through the setter: settings, a dict, a custom middleware or None

    # --- the aiohttp application -------------------------------------------------------------

    def make_app(self) -> web.Application:
        # Outermost first: count everything, then faults, then auth, then the handler.
        app = web.Application(middlewares=[self._stats_mw, self._faults_mw, self._auth_mw])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v2/verify", self._verify)
        return app

    @web.middleware
    async def _stats_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            with self._stats_lock:
                self._requests += 1
                self._by_status[status] += 1

    @property
    def faults(self) -> ApiFaults:
        """The fault controls: ``api.faults.set(...)``, ``api.faults.clear()``, ``api.faults.fired``."""
        return self._faults

    @faults.setter
    def faults(self, value: FaultSettings | Middleware | dict | None) -> None:
        """Shorthand: None clears, FaultSettings or a dict sets, a callable becomes the custom middleware."""
        if value is None:
            self._faults.clear()
        elif isinstance(value, FaultSettings):
            self._faults.set(value)
        elif isinstance(value, dict):
            self._faults.set(**value)
        elif isinstance(value, ApiFaults):
            if value is not self._faults:
                raise TypeError("an ApiFaults belongs to its own ValidationApi; pass FaultSettings instead")
        elif callable(value):
            self._faults.custom = value
        else:
            raise TypeError(f"faults must be FaultSettings, a dict of settings, a middleware or None, not {value!r}")

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self._faults(request, handler)

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key is not None and request.path != "/health":
            if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                return web.json_response({"message": "invalid or missing API key"}, status=401)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _verify(self, request: web.Request) -> web.Response:
        addr = request.query.get("email")
        if addr is None:
            return web.json_response({"message": "missing required parameter: email"}, status=400)
        return web.json_response(verify(addr, self.deny_domains, self.disposable_domains))

    @property
    def stats(self) -> dict:
        with self._stats_lock:
            return {"requests": self._requests, "by_status": dict(self._by_status)}

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._requests = 0
            self._by_status.clear()

    # --- serving, in-process on a daemon thread -----------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve_async(self) -> None:
        """Bind and start serving on the running loop; sets self.port to the real port."""
        self._loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._listen()
        self._sync_listener()  # faults set before the start (a refusing outage) take effect now

    async def close_async(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        if self._listener is not None:
            self._up.clear()
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # The listener is our own asyncio server around aiohttp's protocol factory (not a TCPSite), so
    # an outage can close it (connection refused) and open it again on the same port.

    async def _listen(self) -> None:
        if self._listener is not None or self._runner is None:
            return
        assert self._runner.server is not None
        self._listener = await asyncio.get_running_loop().create_server(
            self._runner.server, self.host, self.port, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]
        self._up.set()

    def wait_listening(self, timeout: float) -> bool:
        """Block until the API accepts connections (e.g. a refusing outage ended); False on timeout."""
        return self._up.wait(timeout)

    def _sync_listener(self) -> None:
        """On the loop: close the listener during a refusing outage, reopen it when it ends."""
        if self._runner is None:
            return
        loop = asyncio.get_running_loop()
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        refusing_for = self._faults.refusing_for()
        if refusing_for:
            if self._listener is not None:
                self._up.clear()
                self._listener.close()  # stops accepting at once: new connections are refused
                self._listener = None
                assert self._runner.server is not None
                for conn in self._runner.server.connections:
                    conn.force_close()  # kept-alive connections drop too, as when a server goes down
            self._reopen = loop.call_later(refusing_for, self._sync_listener)
        elif self._listener is None:
            self._opening = loop.create_task(self._listen())

    def _sync_listener_threadsafe(self) -> None:
        """Apply a fault change to the listener; from another thread, wait until it is applied."""
        loop = self._loop
        if loop is None or self._runner is None or loop.is_closed():
            return  # not serving: serve_async applies the faults when it starts
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._sync_listener()
            return

        async def apply() -> None:
            self._sync_listener()
            if self._opening is not None and not self._opening.done():
                await self._opening

        asyncio.run_coroutine_threadsafe(apply(), loop).result(timeout=5)

    def start(self) -> "ValidationApi":
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._stopped = asyncio.Event()
                loop.run_until_complete(self.serve_async())
            except BaseException as exc:  # surface bind errors etc. in start(), not in a dead thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._stopped.wait())
                loop.run_until_complete(self.close_async())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="validation-api", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(self._stopped.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("validation API thread did not stop")
        self._thread = self._loop = None

    def __enter__(self) -> "ValidationApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _main_async(args: argparse.Namespace) -> None:
    api = ValidationApi(host=args.host, port=args.port, api_key=args.api_key)
    await api.serve_async()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {api.url}", flush=True)
    await stop.wait()
    await api.close_async()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fakes.validation_api", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    asyncio.run(_main_async(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
