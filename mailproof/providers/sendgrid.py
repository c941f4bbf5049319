"""SendGrid v3 ``POST /v3/mail/send``, as the official ``sendgrid`` client calls it.

Covered: personalizations (each one a message of its own: to/cc/bcc, subject, headers,
substitutions, dynamic_template_data, custom_args), from, reply_to / reply_to_list, subject,
content (text/plain, text/html), attachments (base64, inline with content_id), headers,
categories, custom_args, template_id (recorded; rendered when the test registered the template
with ``capture.providers["sendgrid"].templates[id] = {"subject":..., "html":..., "text":...}``),
``mail_settings.sandbox_mode`` (validated, 200, nothing sent). Answer: 202, empty body,
``X-Message-Id``. ``Authorization: Bearer <key>``; errors as SendGrid's ``{"errors": [...]}``;
a 429 carries ``X-RateLimit-Limit/Remaining/Reset``. Not covered: ``send_at`` scheduling and
batches (sent at once), ASM groups, IP pools, tracking settings (no link rewriting).

The signed event webhook: a JSON array of events, signed with ECDSA P-256 / SHA-256 over
timestamp + body (``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``); the verification
key (``public_key``, base64 DER as SendGrid's settings page shows it) is made per capture.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from email.utils import formataddr
from typing import Optional

from aiohttp import web

from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Attachment, Outgoing, render

HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
MESSAGES = {
    400: "Bad Request",
    401: "The provided authorization grant is invalid, expired, or revoked",
    403: "access forbidden",
    413: "The JSON payload you have included in your request is too large.",
    429: "too many requests",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
}
EVENT_NAMES = {"delivered": "delivered", "bounce": "bounce", "complaint": "spamreport", "open": "open",
               "click": "click"}


class Invalid(Exception):
    def __init__(self, message: str, field: Optional[str]) -> None:
        super().__init__(message)
        self.field = field


def _address(value, field: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("email"), str) or "@" not in value["email"]:
        raise Invalid(f"The {field} object must be provided and have a valid email address: "
                      '{"email": "example@example.com"} or {"email": "example@example.com", "name": "Example"}.',
                      f"{field}.email")
    return formataddr((value.get("name") or "", value["email"]))


def _addresses(values, field: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise Invalid(f"The {field} field must be an array of email objects.", field)
    return [_address(v, field) for v in values]


class SendGrid(Provider):
    name = "sendgrid"
    domain = "geopod-ismtpd-1.sendgrid.net"

    def __init__(self, capture) -> None:
        super().__init__(capture)
        self.templates: dict[str, dict] = {}
        self._signing_key = None

    def new_message_id(self) -> str:
        return secrets.token_urlsafe(16)[:22]

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v3/mail/send", self.send)]

    def error(self, status: int, message: Optional[str] = None, *, retry_after: int = 1,
              field: Optional[str] = None) -> web.Response:
        body = {"errors": [{"message": message or MESSAGES.get(status, "error"), "field": field,
                            "help": HELP if status == 400 else None}]}
        headers = {}
        if status == 429:
            headers = {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset": str(int(time.time()) + retry_after)}
        return web.json_response(body, status=status, headers=headers)

    async def send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth:
            return self.error(401, "authorization required")
        if auth != f"Bearer {self.capture.keys.sendgrid}":
            return self.error(401)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self.error(400, "Bad Request", field=None)
        try:
            messages, sandbox = self.parse(body)
        except Invalid as exc:
            return self.error(400, str(exc), field=exc.field)
        if sandbox:
            return web.Response(status=200)
        message_id = None
        for out in messages:
            result = await self.capture.submit(self, out, peer=request.remote)
            if isinstance(result, web.Response):
                return result
            message_id = message_id or result.message_id
        return web.Response(status=202, headers={"X-Message-Id": message_id or ""})

    def parse(self, body) -> tuple[list[Outgoing], bool]:
        if not isinstance(body, dict):
            raise Invalid("Bad Request", None)
        personalizations = body.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            raise Invalid("The personalizations field is required and must have at least one personalization.",
                          "personalizations")
        sender = _address(body.get("from"), "from")
        template_id = body.get("template_id")
        template = self.templates.get(template_id) if template_id else None
        content = body.get("content") or []
        if not template_id and not content:
            raise Invalid("Unless a valid template_id is provided, the content parameter is required. There must "
                          "be at least one defined content block. We typically suggest both text/plain and "
                          "text/html blocks are included, but only one block is required.", "content")
        text = next((c.get("value") for c in content if c.get("type") == "text/plain"), None)
        html = next((c.get("value") for c in content if c.get("type") == "text/html"), None)
        reply_to = ([_address(body["reply_to"], "reply_to")] if body.get("reply_to")
                    else _addresses(body.get("reply_to_list"), "reply_to_list"))
        attachments = []
        for i, att in enumerate(body.get("attachments") or []):
            if not att.get("content") or not att.get("filename"):
                raise Invalid("The attachment content and filename are required.", f"attachments.{i}")
            try:
                data = base64.b64decode(att["content"], validate=True)
            except ValueError:
                raise Invalid("The attachment content must be base64 encoded.", f"attachments.{i}.content") from None
            attachments.append(Attachment(att["filename"], data, att.get("type") or "application/octet-stream",
                                          att.get("disposition") or "attachment", att.get("content_id")))
        messages = []
        for i, p in enumerate(personalizations):
            to = _addresses(p.get("to"), f"personalizations.{i}.to")
            if not to:
                raise Invalid("The to array is required for all personalization objects, and must have at least "
                              "one email object with a valid email address.", f"personalizations.{i}.to")
            subject = p.get("subject") or body.get("subject") or (template or {}).get("subject")
            if not subject and not template_id:
                raise Invalid("The subject is required. You can get around this requirement if you use a template "
                              "with a subject defined or if every personalization has a subject defined.", "subject")
            data = p.get("dynamic_template_data") or {}
            subs = p.get("substitutions") or {}
            headers = {**(body.get("headers") or {}), **(p.get("headers") or {})}
            m_text, m_html = (template.get("text"), template.get("html")) if template else (text, html)
            if template:
                subject, m_text, m_html = render(subject, data), render(m_text, data), render(m_html, data)
            for key, value in subs.items():  # legacy substitutions: plain text replacement
                m_text = m_text.replace(key, str(value)) if m_text else m_text
                m_html = m_html.replace(key, str(value)) if m_html else m_html
            details = {"template_id": template_id, "dynamic_template_data": data or None,
                       "categories": body.get("categories") or [],
                       "custom_args": {**(body.get("custom_args") or {}), **(p.get("custom_args") or {})}}
            messages.append(Outgoing(
                provider=self.name, sender=sender, to=to, cc=_addresses(p.get("cc"), f"personalizations.{i}.cc"),
                bcc=_addresses(p.get("bcc"), f"personalizations.{i}.bcc"), subject=subject or "",
                text=m_text, html=m_html, reply_to=reply_to, headers=list(headers.items()),
                attachments=attachments, details={k: v for k, v in details.items() if v}))
        sandbox = bool(((body.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable"))
        return messages, sandbox

    # -- the signed event webhook -------------------------------------------------------------

    @property
    def public_key(self) -> str:
        """The verification key the application is configured with (base64 DER, SendGrid's form)."""
        from cryptography.hazmat.primitives import serialization

        der = self._key().public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode("ascii")

    def _key(self):
        if self._signing_key is None:
            try:
                from cryptography.hazmat.primitives.asymmetric import ec
            except ImportError as exc:  # pragma: no cover - cryptography comes with the providers extra
                raise ImportError("SendGrid's signed event webhook needs cryptography: "
                                  "pip install 'mailproof[providers]'") from exc
            self._signing_key = ec.generate_private_key(ec.SECP256R1())
        return self._signing_key

    def webhook(self, event: Event, target) -> tuple[dict[str, str], bytes]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        record = {"email": event.recipient, "timestamp": int(event.at), "event": EVENT_NAMES.get(event.kind, event.kind),
                  "smtp-id": f"<{event.message_id}@{self.domain}>", "sg_event_id": secrets.token_urlsafe(16),
                  "sg_message_id": f"{event.message_id}.filter0001.{int(event.at)}.0"}
        if event.kind == "bounce":
            record.update(type="bounce", status="5.1.1", reason=event.reason)
        if event.kind == "delivered":
            record["response"] = "250 2.0.0 OK"
        if event.kind == "click" and event.url:
            record["url"] = event.url
        if event.details.get("categories"):
            record["category"] = event.details["categories"]
        record.update(event.details.get("custom_args") or {})
        body = json.dumps([record]).encode()
        timestamp = str(int(time.time()))
        signature = self._key().sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return ({"Content-Type": "application/json",
                 "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode("ascii"),
                 "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}, body)
