"""Outbox: an asyncio.Queue served by a pool of workers that deliver with retries, over SMTP or a
provider's HTTP API (``transports``: ``--transport``).

A transient failure (4xx, connection refused/reset, timeout, disconnect, a relay that refuses the
session) puts the message back on the queue after a capped exponential backoff with full jitter,
instead of holding a worker asleep, so a greylisting receiver cannot stall the whole pool. A 5xx
for the message (MAIL, RCPT, DATA) is permanent and recorded as a bounce at once.

Transient failures are retried for as long as the message is younger than ``retry_for`` seconds
(``--retry-for``), whatever the number of attempts: a relay that throttles a burst can refuse the
same message many times in a row, and a count of attempts would turn a rate limit into lost mail
(an 8-attempt cap lost 7 of 200 confirmations behind a 20/s relay limit). Past that age, the
message is given up and recorded as a bounce ("gave up after N attempts").

A disconnect after the message was sent but before the 250 is also transient: the relay may have
taken it, and the retry may deliver it twice. That is SMTP's at-least-once contract (RFC 5321,
section 6.1); the retry resends the very same message (same Message-ID), so duplicates can be
recognised. Each attempt logs one line: to, subject, attempt, outcome, code, elapsed, retry_in.

Over a provider's API the same rules hold with HTTP codes: 429 and 5xx are transient, any other
4xx permanent (``transports.http_error``). An address a provider reported bounced or complained
about (its event webhook, ``web.py``) is suppressed: mail to it is not sent again but recorded as
a bounce at once, as providers' own suppression lists do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage

import aiosmtplib

from . import transports
from .backoff import full_jitter
from .config import Config
from .metrics import Metrics
from .transports import Permanent, Transient

log = logging.getLogger("demo_app.mailer")

BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0


@dataclass
class Job:
    msg: EmailMessage
    to: str
    attempt: int = 0
    queued_at: float = field(default_factory=time.monotonic)
    signed: bytes | None = None  # the DKIM-signed bytes, made once: every retry sends the same


@dataclass
class Bounce:
    to: str
    code: int | None
    message: str
    subject: str
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def classify(exc: BaseException) -> Transient:
    """Map a send error to Transient or Permanent, keeping the SMTP reply code when there is one."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError)):
        # The relay refused the session (a 5xx greeting or EHLO/HELO), not this message or recipient:
        # an overloaded or misconfigured relay, like Postfix's smtp_skip_5xx_greeting. Retry.
        return Transient(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        kind = Permanent if 500 <= exc.code < 600 else Transient
        return kind(exc.code, exc.message)
    if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError,
                        aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError, ConnectionError, OSError)):
        return Transient(None, f"{type(exc).__name__}: {exc}")
    # SMTPNotSupported (e.g. no SMTPUTF8 for a unicode address) and anything unexpected: retrying won't help.
    return Permanent(None, f"{type(exc).__name__}: {exc}")


class Mailer:
    def __init__(self, cfg: Config, metrics: Metrics, suppressed: dict[str, str] | None = None) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.transport = transports.make(cfg)
        self.suppressed = suppressed if suppressed is not None else {}  # address -> why (bounce webhooks)
        self.signer = None
        if cfg.dkim_key and self.transport.name == "smtp":
            # Over SMTP the app signs its own mail; through a provider's API the provider signs
            # (with the domain's key it holds), as SendGrid, Mailgun, SES and Postmark do.
            from .dkim import Signer  # dkimpy only when signing

            self.signer = Signer(cfg.dkim_key, cfg.dkim_selector, cfg.mail_domain)
        self.bounces: list[Bounce] = []
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._retry_timers: set[asyncio.TimerHandle] = set()
        self._pending = 0  # accepted and not yet finished: queued + in flight + waiting to retry
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        return self._pending

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(i), name=f"mailer-{i}") for i in range(self.cfg.workers)]

    def enqueue(self, msg: EmailMessage, to: str) -> None:
        self.metrics.emails_queued += 1
        self._pending += 1
        self._idle.clear()
        self._queue.put_nowait(Job(msg, to))

    async def wait_idle(self, timeout: float) -> bool:
        """True once every accepted message is sent or bounced; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, drain: float = 2.0) -> None:
        """Give in-flight and queued mail up to `drain` seconds, then stop the workers."""
        if not await self.wait_idle(drain):
            log.warning("outbox not drained at shutdown: %d messages dropped", self._pending)
        for timer in self._retry_timers:
            timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.transport.close()

    def _done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    async def _work(self, worker: int) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._attempt(job)
            except Exception:  # a bug in one message must not kill the worker
                log.exception("mailer worker %d crashed on a message to %s", worker, job.to)
                self._done()
            finally:
                self._queue.task_done()

    async def _attempt(self, job: Job) -> None:
        job.attempt += 1
        self.metrics.send_attempts += 1
        started = time.monotonic()
        code: int | None = 250
        detail = ""
        try:
            if job.to in self.suppressed:
                raise Permanent(None, f"suppressed: {self.suppressed[job.to]}")
            if self.signer is not None:
                # Signed here, just before the first send: nothing changes the message after this.
                utf8 = not (self.cfg.from_address.addr_spec + job.to).isascii()
                if job.signed is None:
                    job.signed = self.signer.sign(job.msg, utf8)
                await self.transport.send(job.signed, self.cfg.from_address.addr_spec, job.to,
                                          mail_options=["SMTPUTF8"] if utf8 else None)
            else:
                await self.transport.send(job.msg, self.cfg.from_address.addr_spec, job.to)
            outcome = "sent"
            self.metrics.emails_sent += 1
            self._done()
        except Exception as exc:
            err = exc if isinstance(exc, Transient) else classify(exc)
            code, detail = err.code, str(err)
            too_old = time.monotonic() - job.queued_at >= self.cfg.retry_for
            if isinstance(err, Permanent) or too_old:
                outcome = "bounced" if isinstance(err, Permanent) else "gave_up"
                self.metrics.permanent_failures += 1
                message = str(err) if isinstance(err, Permanent) else f"gave up after {job.attempt} attempts: {err}"
                self.bounces.append(Bounce(job.to, err.code, message, str(job.msg["Subject"])))
                self._done()
            else:
                outcome = "retry"
                self.metrics.transient_failures += 1
                retry_in = self._schedule_retry(job)
        # One line per attempt, key=value, so a log search can follow one message through retries.
        log.info("send to=%s subject=%r attempt=%d outcome=%s code=%s elapsed_ms=%.1f retry_in_ms=%s error=%r",
                 job.to, str(job.msg["Subject"]), job.attempt, outcome, code,
                 (time.monotonic() - started) * 1000,
                 f"{retry_in * 1000:.0f}" if outcome == "retry" else "-", detail)

    def _schedule_retry(self, job: Job) -> float:
        delay = full_jitter(job.attempt, BACKOFF_BASE, BACKOFF_CAP)
        self.metrics.retry_wait_seconds += delay
        loop = asyncio.get_running_loop()

        def requeue() -> None:
            self._retry_timers.discard(timer)
            self._queue.put_nowait(job)

        timer = loop.call_later(delay, requeue)
        self._retry_timers.add(timer)
        return delay
