"""Fake third-party email-validation API (Kickbox-like), for the app under test to call.

    api = ValidationApi(api_key="k")   # port=0: the OS picks
    api.start()                        # returns once listening
    api.url                            # "http://127.0.0.1:PORT"
    api.stop()

or as its own process: ``python -m fakes.validation_api --port N`` prints ``READY <url>``.

Fault injection plugs in as an aiohttp middleware (``faults=``, or ``api.faults = ...`` at runtime):
``async def faults(request, handler) -> web.StreamResponse``. It sits inside the stats middleware
(so faulted replies are counted) and outside auth and the verify handler (so it can replace any
reply: delay, 429, 5xx, outage, a malformed body).

Stdlib and aiohttp only: this stands for the outside world and imports nothing of the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
import threading
import unicodedata
from typing import Awaitable, Callable

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
    if local.lower().startswith("reject"):
        return verdict("undeliverable", "rejected_email")
    if domain in disposable_domains:
        return verdict("risky", "low_quality", disposable=True)
    return verdict("deliverable", "accepted_email")


class ValidationApi:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        deny_domains=DEFAULT_DENY_DOMAINS,
        disposable_domains=DEFAULT_DISPOSABLE_DOMAINS,
        faults: Middleware | None = None,
    ) -> None:
        self.host, self.port, self.api_key = host, port, api_key
        self.deny_domains = set(deny_domains)
        self.disposable_domains = set(disposable_domains)
        self.faults = faults  # read per request, so it can be swapped while running
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._by_status: collections.Counter[int] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None

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

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        faults = self.faults
        return await (faults(request, handler) if faults else handler(request))

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
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
