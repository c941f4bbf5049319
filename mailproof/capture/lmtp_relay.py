"""An SMTP front for Dovecot where Postfix cannot run (not root): capture, then relay over LMTP.

The application talks SMTP to an ``SmtpSink`` (the same aiosmtpd sink, with the same fault
plan); each accepted message is handed to Dovecot over LMTP before the sink answers 250, so a
250 means "stored in the inbox", as with a real relay. A message Dovecot does not take turns
into a ``451`` for the application (it retries), never a silent loss.

One LMTP transaction per recipient: Dovecot writes ``Delivered-To: <recipient>`` (and ``for
<recipient>`` in its Received header) only when a transaction has a single recipient, and the
IMAP side routes each copy on that header. Postfix is configured the same way
(``lmtp_destination_recipient_limit = 1``).

The relay runs in a worker thread (``run_in_executor``) so the sink's event loop keeps serving
other sessions while Dovecot stores the message.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from typing import Any, Callable, Optional

from mailproof.faults import FaultPlan
from mailproof.capture.smtp_sink import CapturedMail, SmtpSink

log = logging.getLogger("mailproof.lmtp_relay")


class _RelayThenFaults:
    """The sink's ``faults`` seam: relay at ``after_data`` (the message is captured by then), then
    let the user's FaultPlan act at every stage exactly as on the plain sink."""

    def __init__(self, relay: "LmtpRelay", plan: Any) -> None:
        self.relay = relay
        self.plan = plan

    async def apply(self, stage: str, server, session, envelope, **details) -> Optional[str]:
        if stage == "after_data":
            captured: CapturedMail = details["captured"]
            loop = asyncio.get_running_loop()
            failure = await loop.run_in_executor(None, self.relay.relay, captured)
            if failure:
                return failure
        if self.plan is None:
            return None
        return await self.plan.apply(stage, server, session, envelope, **details)


class LmtpRelay:
    """``SmtpSink`` on 127.0.0.1 whose accepted mail is delivered to ``lmtp_host:lmtp_port``.

    Attributes: ``host``/``port`` (where the application sends), ``faults`` (the sink's
    FaultPlan), ``relayed`` / ``failed`` (counts), ``sink`` (the SmtpSink itself).
    """

    def __init__(self, lmtp_host: str, lmtp_port: int, *, faults: Optional[FaultPlan] = None,
                 on_message: Optional[Callable[[CapturedMail], None]] = None,
                 lmtp_timeout: float = 30.0, **sink_options: Any) -> None:
        self.lmtp_host = lmtp_host
        self.lmtp_port = lmtp_port
        self.lmtp_timeout = lmtp_timeout
        self.faults = faults if faults is not None else FaultPlan()
        self.relayed = 0
        self.failed = 0
        self.on_relayed: list[Callable[[CapturedMail], None]] = []  # called after Dovecot said 250
        self.sink = SmtpSink(on_message=on_message, faults=_RelayThenFaults(self, self.faults),
                             **sink_options)

    @property
    def host(self) -> str:
        return self.sink.host

    @property
    def port(self) -> int:
        return self.sink.port

    def start(self) -> "LmtpRelay":
        self.sink.start()
        return self

    def stop(self) -> None:
        self.sink.stop()

    def __enter__(self) -> "LmtpRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def relay(self, captured: CapturedMail) -> Optional[str]:
        """Deliver one captured message, one LMTP transaction per recipient.

        Returns None when every recipient was stored, else the SMTP reply for the application.
        Recipients already stored stay stored: a retry by the application then duplicates them,
        which the harness reports, rather than losing the others.
        """
        refused: dict[str, Any] = {}
        try:
            with smtplib.LMTP(self.lmtp_host, self.lmtp_port, timeout=self.lmtp_timeout) as lmtp:
                for rcpt in captured.rcpt_tos:
                    try:
                        lmtp.sendmail(captured.mail_from, [rcpt], captured.data)
                    except smtplib.SMTPRecipientsRefused as exc:
                        refused.update(exc.recipients)
                    except smtplib.SMTPResponseException as exc:
                        refused[rcpt] = (exc.smtp_code, exc.smtp_error)
                        lmtp.rset()
        except (OSError, smtplib.SMTPException) as exc:
            self.failed += 1
            log.warning("LMTP relay of message %s to %s:%s failed: %s", captured.seq,
                        self.lmtp_host, self.lmtp_port, exc)
            return f"451 4.4.1 relay to LMTP {self.lmtp_host}:{self.lmtp_port} failed: {type(exc).__name__}"
        if refused:
            self.failed += 1
            log.warning("LMTP refused %s for message %s", refused, captured.seq)
            permanent = all(code >= 500 for code, _ in refused.values())
            code = "550 5.1.1" if permanent else "451 4.3.0"
            return f"{code} LMTP refused {', '.join(sorted(refused))}"
        self.relayed += 1
        for listener in list(self.on_relayed):
            try:
                listener(captured)
            except Exception:
                log.exception("on_relayed listener failed")
        return None
