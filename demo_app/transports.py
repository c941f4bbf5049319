"""How the outbox hands a message over: SMTP, or a provider's HTTP API through its official client.

Each transport's ``send(msg, sender, to)`` returns once the relay or provider accepted the
message, and raises ``Transient`` (retry later: 4xx SMTP, HTTP 429 or 5xx, timeouts, refused
connections) or ``Permanent`` (5xx SMTP, any other HTTP 4xx). The blocking clients (sendgrid,
mailgun, boto3) run in a thread; Postmark has no official Python client, so its documented
request goes out with aiohttp. Every client's own retries are off: the outbox retries, with its
backoff and its ``--retry-for`` budget, so a 429 is seen (and logged) once per attempt.
"""

from __future__ import annotations

import asyncio
import base64
import json
from email.message import EmailMessage
from email.utils import getaddresses, parseaddr

import aiohttp
import aiosmtplib

from .config import Config

TRANSPORTS = ("smtp", "sendgrid", "mailgun", "ses", "postmark")
# Written by the provider from the API fields; everything else goes over as a custom header.
_OWN_HEADERS = {"from", "to", "cc", "bcc", "subject", "reply-to", "date", "mime-version", "content-type",
                "content-transfer-encoding"}


class Transient(Exception):
    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class Permanent(Transient):
    pass


def http_error(status: int, body: str) -> Transient:
    """429 and 5xx are worth a retry; any other 4xx will fail the same way again."""
    kind = Transient if status == 429 or status >= 500 else Permanent
    return kind(status, f"HTTP {status}: {body[:300]}")


class Parts:
    """An EmailMessage taken apart into the fields a provider API asks for."""

    def __init__(self, msg: EmailMessage) -> None:
        self.sender = str(msg["From"])
        self.subject = str(msg["Subject"] or "")
        self.to = [str(msg["To"])] if msg["To"] else []
        text, html = msg.get_body(("plain",)), msg.get_body(("html",))
        self.text = text.get_content() if text is not None else None
        self.html = html.get_content() if html is not None else None
        self.headers = [(k, str(v)) for k, v in msg.items() if k.lower() not in _OWN_HEADERS]
        self.attachments = [(part.get_filename() or "attachment", part.get_content_type(),
                             part.get_payload(decode=True) or b"") for part in msg.iter_attachments()]


class SmtpTransport:
    name = "smtp"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def send(self, msg: EmailMessage | bytes, sender: str, to: str,
                   mail_options: list[str] | None = None) -> None:
        """``msg``: the message, or its DKIM-signed wire bytes (sent exactly as signed)."""
        cfg = self.cfg
        await aiosmtplib.send(msg, sender=sender, recipients=[to], mail_options=mail_options,
                              hostname=cfg.smtp_host, port=cfg.smtp_port,
                              # aiosmtplib upgrades to STARTTLS on its own when offered (None); never do so unasked.
                              start_tls=cfg.smtp_starttls, username=cfg.smtp_user, password=cfg.smtp_password,
                              timeout=cfg.smtp_timeout)

    async def close(self) -> None:
        pass


class SendGridTransport:
    name = "sendgrid"

    def __init__(self, cfg: Config) -> None:
        from sendgrid import SendGridAPIClient

        self.client = SendGridAPIClient(cfg.provider_key, host=cfg.provider_url)
        # No timeout by default: a provider that never answers would hold a worker for ever. The
        # python_http_client underneath passes its timeout on to every path it builds.
        self.client.client.timeout = cfg.smtp_timeout

    def _mail(self, parts: Parts, to: str):
        from sendgrid.helpers.mail import (Attachment, Disposition, FileContent, FileName, FileType, From, Header,
                                           Mail, To)

        name, addr = parseaddr(parts.sender)
        to_name, to_addr = parseaddr(parts.to[0] if parts.to else to)
        mail = Mail(from_email=From(addr, name or None), to_emails=To(to_addr or to, to_name or None),
                    subject=parts.subject, plain_text_content=parts.text, html_content=parts.html)
        for key, value in parts.headers:
            mail.add_header(Header(key, value))
        for filename, content_type, data in parts.attachments:
            mail.add_attachment(Attachment(FileContent(base64.b64encode(data).decode()), FileName(filename),
                                           FileType(content_type), Disposition("attachment")))
        return mail

    async def send(self, msg: EmailMessage, sender: str, to: str) -> None:
        from python_http_client.exceptions import HTTPError

        mail = self._mail(Parts(msg), to)
        try:
            await asyncio.to_thread(self.client.send, mail)
        except HTTPError as exc:
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body)
            raise http_error(exc.status_code, body) from None
        except OSError as exc:  # urllib's URLError, refused connections, timeouts
            raise Transient(None, f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        pass


class MailgunTransport:
    name = "mailgun"

    def __init__(self, cfg: Config) -> None:
        from mailgun.client import Client
        from mailgun.config import RetryPolicy

        self.domain = cfg.mailgun_domain or cfg.mail_domain
        self.client = Client(auth=("api", cfg.provider_key), api_url=cfg.provider_url,
                             retry_policy=RetryPolicy(max_retries=0),
                             timeout=(cfg.smtp_timeout, cfg.smtp_timeout))  # (connect, read); default 60 s

    async def send(self, msg: EmailMessage, sender: str, to: str) -> None:
        import requests
        from mailgun.handlers.error_handler import ApiError

        parts = Parts(msg)
        data: dict = {"from": parts.sender, "to": parts.to or [to], "subject": parts.subject}
        if parts.text is not None:
            data["text"] = parts.text
        if parts.html is not None:
            data["html"] = parts.html
        for key, value in parts.headers:
            data[f"h:{key}"] = value
        files = [("attachment", (filename, content)) for filename, _type, content in parts.attachments]
        try:
            response = await asyncio.to_thread(self.client.messages.create, data=data, files=files or None,
                                               domain=self.domain)
        except (ApiError, requests.RequestException) as exc:
            # The SDK wraps a refused connection or a timeout in its ApiError (HTTP errors come back
            # as responses): the network, so worth a retry (docs/traps.md, "Provider client libraries").
            raise Transient(None, f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise http_error(response.status_code, response.text)

    async def close(self) -> None:
        pass


class SesTransport:
    name = "ses"

    def __init__(self, cfg: Config) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.client = boto3.client(
            "sesv2", endpoint_url=cfg.provider_url, region_name=cfg.provider_region,
            aws_access_key_id=cfg.provider_key, aws_secret_access_key=cfg.provider_secret,
            # total_max_attempts, not max_attempts: in standard mode max_attempts=1 still retries once.
            config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"},
                              connect_timeout=cfg.smtp_timeout, read_timeout=cfg.smtp_timeout))

    async def send(self, msg: EmailMessage, sender: str, to: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        parts = Parts(msg)
        body = {}
        if parts.text is not None:
            body["Text"] = {"Data": parts.text, "Charset": "UTF-8"}
        if parts.html is not None:
            body["Html"] = {"Data": parts.html, "Charset": "UTF-8"}
        simple = {"Subject": {"Data": parts.subject, "Charset": "UTF-8"}, "Body": body,
                  "Headers": [{"Name": k, "Value": v} for k, v in parts.headers]}
        if parts.attachments:
            simple["Attachments"] = [{"FileName": f, "ContentType": t, "RawContent": d}
                                     for f, t, d in parts.attachments]
        to_addrs = [a for _, a in getaddresses(parts.to)] or [to]
        try:
            await asyncio.to_thread(self.client.send_email, FromEmailAddress=parts.sender,
                                    Destination={"ToAddresses": to_addrs}, Content={"Simple": simple})
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 400
            raise http_error(status, str(exc)) from None
        except BotoCoreError as exc:  # EndpointConnectionError, timeouts
            raise Transient(None, f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        pass


class PostmarkTransport:
    """Postmark's documented ``POST /email`` (no official Python client exists)."""

    name = "postmark"

    def __init__(self, cfg: Config) -> None:
        self.url = cfg.provider_url.rstrip("/") + "/email"
        self.token = cfg.provider_key or ""
        self.timeout = aiohttp.ClientTimeout(total=cfg.smtp_timeout)
        self.session: aiohttp.ClientSession | None = None

    async def send(self, msg: EmailMessage, sender: str, to: str) -> None:
        parts = Parts(msg)
        body = {"From": parts.sender, "To": ", ".join(parts.to) or to, "Subject": parts.subject,
                "Headers": [{"Name": k, "Value": v} for k, v in parts.headers], "MessageStream": "outbound"}
        if parts.text is not None:
            body["TextBody"] = parts.text
        if parts.html is not None:
            body["HtmlBody"] = parts.html
        if parts.attachments:
            body["Attachments"] = [{"Name": f, "ContentType": t, "Content": base64.b64encode(d).decode()}
                                   for f, t, d in parts.attachments]
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        headers = {"Accept": "application/json", "X-Postmark-Server-Token": self.token}
        try:
            async with self.session.post(self.url, data=json.dumps(body), headers=headers) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Transient(None, f"{type(exc).__name__}: {exc}") from None
        if response.status >= 400:
            raise http_error(response.status, text)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def make(cfg: Config):
    return {"smtp": SmtpTransport, "sendgrid": SendGridTransport, "mailgun": MailgunTransport,
            "ses": SesTransport, "postmark": PostmarkTransport}[cfg.transport](cfg)
