"""The embedded backend: an in-process aiosmtpd sink feeding a MailStore (functional CI)."""

from __future__ import annotations

from typing import Any, Optional

from mailproof.faults import FaultPlan
from mailproof.capture.smtp_sink import SmtpSink
from mailproof.mailbox import MailStore


class EmbeddedSink:
    """Where the application sends (``smtp_host``/``smtp_port``) and where mail lands (``store``)."""

    name = "sink"

    def __init__(self, store: Optional[MailStore] = None, **sink_options: Any) -> None:
        self.store = store if store is not None else MailStore()
        self.faults = sink_options.pop("faults", None) or FaultPlan()
        self.sink = SmtpSink(on_message=self.store.deliver_captured, faults=self.faults, **sink_options)

    def start(self) -> "EmbeddedSink":
        self.sink.start()
        return self

    def stop(self) -> None:
        self.sink.stop()

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
