"""ProviderCapture: the four providers' send APIs on one loopback port, feeding a MailStore.

One aiohttp application serves SendGrid, Mailgun, Amazon SES v2 and Postmark at once: their
paths do not overlap (``/v3/mail/send``, ``/v3/{domain}/messages``, ``/v2/email/...``, ``/email``),
so one port and one thread cover every transport, and an application that sends through two
providers needs no second server. Each client library takes the one base URL (``capture.url``).

Like the SMTP sink it runs on a private event loop in a daemon thread, so synchronous tests and
Locust users can use it; the sink service runs it on its own loop instead (``start_async``), with
``deliver=`` its store's ``add``, so a rehearsal's Locust workers see provider mail in their stream. An accepted request becomes a ``CapturedMail`` and is delivered with
``Message.from_captured(..., source=<provider>)`` into the same ``MailStore`` the SMTP sink feeds,
so Mailbox waits, latency, triggers and the rehearsal ledger work unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import string
import threading
import time
import uuid
from dataclasses import dataclass
import json
import os
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional, Union

import aiohttp
from aiohttp import web

from mailproof.capture.smtp_sink import CapturedMail
from mailproof.errors import MailproofError
from mailproof.mailbox import MailStore
from mailproof.message import Message
from mailproof.net import LOOPBACK
from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Outgoing, compose, strip_bcc
from mailproof.providers.faults import PROVIDERS, ProviderFaultPlan
from mailproof.providers.mailgun import Mailgun
from mailproof.providers.postmark import Postmark
from mailproof.providers.sendgrid import SendGrid
from mailproof.providers.ses import Ses
from mailproof.providers.webhooks import WebhookLog, WebhookRecord

log = logging.getLogger("mailproof.providers")


KEYS_ENV = "MAILPROOF_PROVIDER_KEYS"  # JSON of Keys: how a launcher hands one set to the capture and the app


class ProviderCaptureError(MailproofError):
    """The provider capture could not start or stop; the message names the cause and the fix."""


@dataclass
class Keys:
    """The credentials the capture accepts (random per capture; give them to the application)."""

    sendgrid: str
    mailgun: str
    ses_access_key: str
    ses_secret_key: str
    postmark: str
    mailgun_webhook: str = ""    # Mailgun's webhook signing key
    postmark_webhook: str = ""   # "user:password" Postmark puts in front of the webhook URL

    @classmethod
    def random(cls) -> "Keys":
        upper = string.ascii_uppercase + string.digits
        return cls(
            sendgrid=f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}",
            mailgun=f"key-{secrets.token_hex(16)}",
            ses_access_key="AKIA" + "".join(secrets.choice(upper) for _ in range(16)),
            ses_secret_key=secrets.token_urlsafe(30),
            postmark=str(uuid.uuid4()),
            mailgun_webhook=secrets.token_hex(16),
            postmark_webhook=f"hook:{secrets.token_urlsafe(12)}",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ=None) -> "Keys":
        """The keys in ``MAILPROOF_PROVIDER_KEYS`` (JSON), else random ones."""
        text = (os.environ if environ is None else environ).get(KEYS_ENV)
        if not text:
            return cls.random()
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise ProviderCaptureError(f"{KEYS_ENV} is not a JSON object of provider keys ({exc}); "
                                       "unset it to get random keys") from None


@dataclass
class Submitted:
    message_id: str
    messages: list[Message]
    events: list[Event]


class ProviderCapture:
    """``start()``, then point each client at ``url``; mail lands in ``store`` (see module doc)."""

    name = "providers"

    def __init__(self, store: Optional[MailStore] = None, *, host: str = LOOPBACK, port: int = 0,
                 keys: Optional[Keys] = None, faults: Optional[ProviderFaultPlan] = None,
                 deliver: Optional[Callable[[CapturedMail], Any]] = None,
                 seqs: Optional[Iterator[int]] = None) -> None:
        self.store = store if store is not None else MailStore()
        # Where captured records go instead of ``store`` (the sink service's CaptureStore.add).
        self.deliver = deliver
        self.host, self.port = host, port
        self.keys = keys or Keys.random()
        self.faults = faults or ProviderFaultPlan()
        self.webhooks = WebhookLog()
        self.accepted: dict[str, int] = {p: 0 for p in PROVIDERS}
        # The seqs of captured records: beside an SMTP sink feeding the same store (the sink service
        # with --providers), the sink's own counter, so that every message gets a seq of its own.
        self._seq = seqs if seqs is not None else itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._client: Optional[aiohttp.ClientSession] = None
        self._tasks: set[asyncio.Task] = set()
        self.providers: dict[str, Provider] = {
            "sendgrid": SendGrid(self), "mailgun": Mailgun(self), "ses": Ses(self), "postmark": Postmark(self)}

    # -- life cycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "ProviderCapture":
        if self._thread is not None:
            raise ProviderCaptureError("the provider capture is already running; stop() it first")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mailproof-providers", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout=30)
        except BaseException as exc:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            if isinstance(exc, OSError):
                raise ProviderCaptureError(
                    f"cannot listen for provider APIs on {self.host}:{self.port}: {exc}. Choose a free "
                    "port (0 lets the OS pick one) or stop whatever holds it.") from exc
            raise
        self._loop, self._thread = loop, thread
        return self

    async def start_async(self) -> "ProviderCapture":
        """Listen on the running event loop (the sink service's); ``port`` is known on return."""
        if self._thread is not None or self._runner is not None:
            raise ProviderCaptureError("the provider capture is already running; stop it first")
        try:
            await self._start()
        except OSError as exc:
            raise ProviderCaptureError(f"cannot listen for provider APIs on {self.host}:{self.port}: {exc}. "
                                       "Choose a free port (0 lets the OS pick one).") from exc
        self._loop = asyncio.get_running_loop()
        return self

    async def stop_async(self) -> None:
        if self._thread is not None or self._runner is None:
            return
        await self._shutdown()
        self._runner = None
        self._loop = None

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _start(self) -> None:
        app = web.Application(client_max_size=40 * 1024 * 1024)  # providers take 20-40 MB messages
        for provider in self.providers.values():
            app.add_routes(provider.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None
        self._runner = None

    def __enter__(self) -> "ProviderCapture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def webhook_key(self, provider: str) -> str:
        """What the application checks ``provider``'s webhooks with: SendGrid's verification key,
        Mailgun's signing key, Postmark's ``user:password``; SES: none (the SNS certificate is
        fetched from this capture's URL)."""
        if provider == "sendgrid":
            return self.providers["sendgrid"].public_key
        return {"mailgun": self.keys.mailgun_webhook, "postmark": self.keys.postmark_webhook}.get(provider, "")

    def send_webhooks_to(self, provider: str, url: str) -> None:
        """Post ``provider``'s events to ``url``, signed with this capture's keys (``webhook_key``)."""
        user, _, password = self.keys.postmark_webhook.partition(":")
        options = {"mailgun": {"secret": self.keys.mailgun_webhook},
                   "postmark": {"user": user, "password": password}}.get(provider, {})
        self.webhooks.target(provider, url, **options)

    # -- the accept path every provider shares ----------------------------------------------

    async def submit(self, provider: Provider, out: Outgoing, *, raw: Optional[bytes] = None,
                     peer=None, domain: Optional[str] = None) -> Union[web.Response, Submitted]:
        """Faults, test addresses, MIME, delivery into the store, events: in that order.

        Returns the provider's error answer when a fault refuses the request, else what was
        accepted (the handler writes the provider's success answer from it).
        """
        recipients = out.recipients
        rules = self.faults.take(provider.name, recipients)
        delay = max((r.delay for r in rules), default=0.0)
        if delay:
            await asyncio.sleep(delay)  # the slow answer the rule asked for
        refusal = next((r for r in rules if r.status is not None), None)
        if refusal is not None:
            return provider.error(refusal.status, refusal.message, retry_after=refusal.retry_after)
        message_id = provider.new_message_id()
        events: list[Event] = []
        delivered: list[str] = []
        for rcpt in recipients:
            kind, bounce_type = provider.simulated(rcpt) or (None, None)
            for rule in rules:
                if rule.event is not None and rule.applies_to(rcpt):
                    kind, bounce_type = rule.event, None
            if kind != "bounce":
                delivered.append(rcpt)
            event = Event(kind=kind or "delivered", provider=provider.name, recipient=rcpt,
                          message_id=message_id, sender=out.sender, subject=out.subject,
                          bounce_type=bounce_type, details=dict(out.details))
            if kind == "bounce":
                event.reason = "550 5.1.1 The email account that you tried to reach does not exist"
            events.append(Event(**{**event.__dict__, "kind": "delivered"}) if kind == "complaint" else event)
            if kind == "complaint":
                events.append(event)
        try:
            data = strip_bcc(raw) if raw is not None else compose(out, message_id, domain=domain or provider.domain)
        except ValueError as exc:  # e.g. a CR or LF in a header value: the request's fault, refused
            return provider.error(400, f"the message cannot be built: {exc}")
        except Exception as exc:  # a bug of the capture: counted as the harness's, never as the app's
            text = self.store.record_harness_error(("provider compose", type(exc)), exc,
                                                   f"composing a {provider.name} message to {recipients}")
            return provider.error(500, f"mailproof harness error: {text}")
        messages = []
        if delivered:
            captured = CapturedMail(seq=next(self._seq), mail_from=out.mail_from, rcpt_tos=tuple(delivered),
                                    data=data, received_at=time.time(), peer=peer)
            if self.deliver is not None:
                self.deliver(captured)
            else:
                msg = Message.from_captured(captured, source=provider.name)
                msg.extra["provider"] = {"name": provider.name, "message_id": message_id, **out.details}
                messages.append(self.store.deliver(msg))
        self.accepted[provider.name] += 1
        self._post_later(provider, events)
        return Submitted(message_id, messages, events)

    # -- events ------------------------------------------------------------------------------

    def emit(self, kind: str, msg: Message, recipient: Optional[str] = None, *, url: Optional[str] = None) -> None:
        """Post an ``open`` or ``click`` (or any) event for a captured message: what the reader did."""
        info = msg.extra.get("provider") or {}
        provider = self.providers.get(info.get("name", msg.source))
        if provider is None or self._loop is None:
            raise ProviderCaptureError(f"{msg.describe()} did not come through a provider API of a running capture")
        event = Event(kind=kind, provider=provider.name, recipient=recipient or sorted(msg.rcpt_tos)[0],
                      message_id=info.get("message_id", ""), sender=str(msg.header("From") or ""),
                      subject=msg.subject or "", url=url,
                      details={k: v for k, v in info.items() if k not in ("name", "message_id")})
        self._loop.call_soon_threadsafe(self._post_later, provider, [event])

    def _post_later(self, provider: Provider, events: list[Event]) -> None:
        """Post one submission's events after the answer, one after the other: delivered before
        the complaint about it."""
        if provider.name not in self.webhooks.targets or not events:
            return

        async def post_all() -> None:
            for event in events:
                await self._post(provider, event)

        task = asyncio.get_running_loop().create_task(post_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, provider: Provider, event: Event) -> None:
        target = self.webhooks.targets[provider.name]
        headers, body = provider.webhook(event, target)
        if target.user:  # Postmark: the credentials the application put in its webhook URL
            token = base64.b64encode(f"{target.user}:{target.password or ''}".encode()).decode("ascii")
            headers = {**headers, "Authorization": f"Basic {token}"}
        try:
            assert self._client is not None
            async with self._client.post(target.url, data=body, headers=headers) as resp:
                answer = await resp.read()
                self.webhooks.record(WebhookRecord(event, target.url, resp.status, body=answer))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.webhooks.record(WebhookRecord(event, target.url, None, error=f"{type(exc).__name__}: {exc}"))

