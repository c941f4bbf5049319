"""What every provider module implements, and the records they share (events, submissions)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import web

if TYPE_CHECKING:
    from mailproof.providers.server import ProviderCapture
    from mailproof.providers.webhooks import WebhookTarget


@dataclass
class Event:
    """Something the provider reports back about one recipient of one message."""

    kind: str                 # delivered | bounce | complaint | open | click
    provider: str
    recipient: str
    message_id: str
    sender: str = ""
    subject: str = ""
    bounce_type: Optional[str] = None  # the provider's own word: "Permanent", "HardBounce", ...
    reason: str = ""
    url: Optional[str] = None          # click
    at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)  # tags, metadata, custom args


class Provider:
    """One provider's API: its routes, authentication, error format, test addresses and webhooks."""

    name = ""
    domain = ""  # the provider's domain in the Message-IDs it writes

    def __init__(self, capture: "ProviderCapture") -> None:
        self.capture = capture

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def error(self, status: int, message: Optional[str] = None, *, retry_after: int = 1) -> web.Response:
        """An error answer in this provider's format (``message``: None for its usual text)."""
        raise NotImplementedError

    def new_message_id(self) -> str:
        """A message id in the provider's own form."""
        return str(uuid.uuid4())

    def simulated(self, recipient: str) -> Optional[tuple[str, Optional[str]]]:
        """(event kind, bounce type) for a documented test address of the provider, else None."""
        return None

    def webhook(self, event: Event, target: "WebhookTarget") -> tuple[dict[str, str], bytes]:
        """The headers and body of the event webhook, signed the way this provider signs it."""
        raise NotImplementedError
