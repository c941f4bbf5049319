"""Event webhooks from the capture back to the application, and the log a test waits on.

``capture.webhooks.target("mailgun", url, secret=...)`` says where the application listens for a
provider's events. After each accepted message the capture posts that provider's events (delivered,
bounce, complaint; open and click when a test asks with ``capture.emit``) in the provider's format,
signed as it signs them. Every post is recorded with the application's answer, and
``capture.webhooks.wait(kind, recipient)`` returns once the application has answered one: a test
waits on that push, never on a sleep, before it checks what the application did with the event.

Only loopback URLs are accepted: the capture never sends anything off the machine.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from mailproof.errors import MailproofError
from mailproof.providers.base import Event


class WebhookError(MailproofError):
    """A webhook target that cannot be used, or a webhook that never came."""


@dataclass
class WebhookTarget:
    url: str
    secret: Optional[str] = None   # Mailgun's signing key; SendGrid: made by the capture
    user: Optional[str] = None     # Postmark: basic-auth user and password in the webhook URL
    password: Optional[str] = None


@dataclass
class WebhookRecord:
    event: Event
    url: str
    status: Optional[int]          # the application's HTTP status (None: no answer)
    error: str = ""
    body: bytes = b""
    at: float = field(default_factory=time.time)

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def loopback_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise WebhookError(f"webhook URL {url!r} is not on loopback: the capture posts events only to "
                           "http://127.0.0.1:PORT/... (or localhost), so nothing leaves the machine")
    return url


class WebhookLog:
    """Targets per provider, and every webhook posted, with a push wait on them."""

    def __init__(self) -> None:
        self.targets: dict[str, WebhookTarget] = {}
        self.records: list[WebhookRecord] = []
        self._cond = threading.Condition()

    def target(self, provider: str, url: str, **options) -> WebhookTarget:
        target = self.targets[provider] = WebhookTarget(loopback_url(url), **options)
        return target

    def record(self, record: WebhookRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def wait(self, kind: str, recipient: str, *, timeout: float = 10.0,
             provider: Optional[str] = None) -> WebhookRecord:
        """The first posted ``kind`` webhook for ``recipient`` (waits for it; push, no polling)."""
        def found() -> Optional[WebhookRecord]:
            for rec in self.records:
                if (rec.event.kind == kind and rec.event.recipient.lower() == recipient.lower()
                        and (provider is None or rec.event.provider == provider)):
                    return rec
            return None

        with self._cond:
            rec = self._cond.wait_for(found, timeout=timeout)
        if rec is None:
            sent = [(r.event.provider, r.event.kind, r.event.recipient) for r in self.records][-10:]
            raise WebhookError(f"no {kind!r} webhook for {recipient} within {timeout} s (last posted: {sent}). "
                               "Is a webhook target set for the provider (capture.webhooks.target)?")
        return rec
