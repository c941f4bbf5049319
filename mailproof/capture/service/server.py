"""``SinkService``: the capture sink (SMTP) and its HTTP API on the running event loop."""

from __future__ import annotations

import time
import uuid
from typing import Optional

from aiohttp import web

from mailproof.capture.service import ServiceError
from mailproof.capture.service.api import SinkApi
from mailproof.capture.service.store import DEFAULT_MAX_MESSAGES, DEFAULT_STREAM_HOLD, CaptureStore
from mailproof.capture.smtp_sink import SmtpSink
from mailproof.capture.tls import Credentials, SinkCA, sink_security
from mailproof.faults import FaultPlan
from mailproof.net import LOOPBACK


class SinkService:
    """SMTP capture plus its HTTP API on the running event loop.

    >>> service = SinkService(); await service.start(); ...; await service.stop()

    ``tls`` (off | starttls | starttls-required) and ``auth`` (``(user, password)``) secure the
    SMTP side (``mailproof.capture.tls``): with TLS on, ``start()`` makes a throwaway CA and
    writes its certificate to ``tls_ca_file`` (``ca_file``, else a temporary file that ``stop()``
    removes); ``/health`` and the READY line (``ca=PATH``) name it for the app under test.
    """

    def __init__(self, *, host: str = LOOPBACK, smtp_port: int = 0, http_port: int = 0,
                 token: Optional[str] = None, max_messages: int = DEFAULT_MAX_MESSAGES,
                 stream_hold: float = DEFAULT_STREAM_HOLD, smtp_timeout: float = 60.0, data_timeout: float = 600.0,
                 data_size_limit: int = 64 * 1024 * 1024,
                 tls: str = "off", auth: Optional[Credentials] = None,
                 tls_hostnames: tuple[str, ...] = (), ca_file: Optional[str] = None,
                 providers: bool = False, providers_port: int = 0) -> None:
        self.host = host
        self.http_port = http_port
        self.token = token or None
        self.tls_mode = tls
        self.auth = auth
        self.tls_hostnames = tuple(tls_hostnames)
        self.ca_file_option = ca_file
        self.ca: Optional[SinkCA] = None
        self.store = CaptureStore(max_messages, stream_hold)
        self.faults = FaultPlan()
        self.sink = SmtpSink(on_message=self.store.add, host=host, port=smtp_port, faults=self.faults,
                             timeout=smtp_timeout, data_timeout=data_timeout, data_size_limit=data_size_limit)
        # The providers' HTTP APIs too (--providers): same loop, same store, so the stream carries
        # their mail like SMTP mail; keys from MAILPROOF_PROVIDER_KEYS (the launcher sets it).
        self.providers = None
        if providers:
            from mailproof.providers.server import Keys, ProviderCapture

            self.providers = ProviderCapture(host=host, port=providers_port, keys=Keys.from_env(),
                                             deliver=self.store.add, seqs=self.sink.seqs)
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex[:16]  # a restarted service numbers from 1 again: clients must know
        self.stopping = False
        self._runner: Optional[web.AppRunner] = None

    @property
    def smtp_port(self) -> int:
        return self.sink.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def tls_ca_file(self) -> Optional[str]:
        """The CA certificate (PEM) the app under test must trust; None with TLS off."""
        return self.ca.ca_file if self.ca is not None else None

    @property
    def ready_line(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        line = f"READY {self.url} smtp={host}:{self.smtp_port}"
        line += f" providers={self.providers.url}" if self.providers is not None else ""
        return line + (f" ca={self.tls_ca_file}" if self.tls_ca_file else "")

    async def start(self) -> "SinkService":
        self.ca, security = sink_security(self.tls_mode, self.auth, host=self.host,
                                          hostnames=self.tls_hostnames, ca_file=self.ca_file_option)
        for key, value in security.items():
            setattr(self.sink, key, value)
        try:
            await self.sink.start_async()
        except BaseException:
            self._drop_ca()
            raise
        app = SinkApi(self).app()
        app.on_shutdown.append(self._on_shutdown)
        # handler_cancellation: a client that hangs up cancels its handler (aiohttp 3.9+; off by
        # default), so a /wait waiter goes at once, not at its timeout.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.http_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            await self.sink.stop_async()
            self._drop_ca()
            raise ServiceError(f"cannot listen for HTTP on {self.host}:{self.http_port}: {exc}. "
                               "Choose a free port (0 lets the OS pick one).") from exc
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.providers is not None:
            try:
                await self.providers.start_async()
            except BaseException:
                await self.stop()
                raise
        return self

    async def stop(self) -> None:
        self.stopping = True
        self.store.close_clients()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.store.close()
        if self.providers is not None:
            await self.providers.stop_async()
        await self.sink.stop_async()
        self._drop_ca()

    def _drop_ca(self) -> None:
        ca, self.ca = self.ca, None
        if ca is not None:
            ca.cleanup()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.store.close_clients()
