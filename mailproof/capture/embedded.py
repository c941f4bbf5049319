"""The embedded backend: an in-process aiosmtpd sink feeding a MailStore (functional CI).

STARTTLS and AUTH are options: ``EmbeddedSink(tls="starttls-required", auth="app:secret")``
(the plugin's ``mailproof_sink_tls`` and ``mailproof_sink_auth``). With TLS on, ``start()`` makes a
throwaway CA and writes its certificate to ``tls_ca_file``; the application under test trusts
that file, e.g. ``SSL_CERT_FILE=<tls_ca_file>`` for a Python app, ``NODE_EXTRA_CA_CERTS=<tls_ca_file>``
for a Node app (``mailproof.capture.tls`` has the details). ``stop()`` removes it. Every captured
``Message`` says whether its session used STARTTLS (``tls``) and as whom it authenticated
(``auth_user``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from mailproof.capture.smtp_sink import CapturedMail, SinkError, SmtpSink
from mailproof.capture.tls import Credentials, SinkCA, parse_auth, parse_tls_mode, sink_security
from mailproof.faults import FaultPlan
from mailproof.mailbox import MailStore
from mailproof.message import Message


class EmbeddedSink:
    """Where the application sends (``smtp_host``/``smtp_port``) and where mail lands (``store``)."""

    name = "sink"

    def __init__(self, store: Optional[MailStore] = None, *, tls: str = "off",
                 auth: Union[None, str, Credentials] = None, tls_hostnames: Iterable[str] = (),
                 **sink_options: Any) -> None:
        self.store = store if store is not None else MailStore()
        self.faults = sink_options.pop("faults", None) or FaultPlan()
        self.tls_mode = parse_tls_mode(tls, source="tls")
        self.auth = parse_auth(auth, source="auth")
        self.tls_hostnames = tuple(tls_hostnames)
        self.ca: Optional[SinkCA] = None
        self.sink = SmtpSink(on_message=self._deliver, faults=self.faults, **sink_options)

    def _deliver(self, captured: CapturedMail) -> Message:
        return self.store.deliver(Message.from_captured(captured, source="sink"))

    def start(self) -> "EmbeddedSink":
        if self.sink.running:
            raise SinkError("the sink is already running; call stop() before start()")
        ca, security = sink_security(self.tls_mode, self.auth, host=self.sink.host, hostnames=self.tls_hostnames)
        for key, value in security.items():
            setattr(self.sink, key, value)
        self.ca = ca
        try:
            self.sink.start()
        except BaseException:
            self._drop_ca()
            raise
        return self

    def stop(self) -> None:
        self.sink.stop()
        self._drop_ca()

    def _drop_ca(self) -> None:
        ca, self.ca = self.ca, None
        if ca is not None:
            ca.cleanup()

    @property
    def tls_ca_file(self) -> Optional[str]:
        """The CA certificate (PEM) the app under test must trust; None with TLS off."""
        return self.ca.ca_file if self.ca is not None else None

    @property
    def auth_required(self) -> bool:
        return self.auth is not None

    @property
    def smtp_host(self) -> str:
        return self.sink.host

    @property
    def smtp_port(self) -> int:
        return self.sink.port

    def __enter__(self) -> "EmbeddedSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
