"""Mailgun ``POST /v3/{domain}/messages`` (form fields) and ``/v3/{domain}/messages.mime``, as the
official ``mailgun`` SDK calls them (``Client(auth=("api", key), api_url=capture.url)``).

Covered: from, to/cc/bcc (repeated or comma-separated), subject, text, html, attachment and inline
files, ``h:`` custom headers, ``h:Reply-To``, ``o:tag``, ``v:`` user variables, ``template`` with
``t:variables`` (rendered when the test registered it in ``templates``), ``recipient-variables``
(batch sending: one message per To recipient, ``%recipient.KEY%`` filled in), ``o:testmode``
(accepted, nothing delivered); ``messages.mime`` with ``to`` and the ``message`` file, sent as is
(its Bcc header dropped). Answer: 200 ``{"id": "<...@domain>", "message": "Queued. Thank you."}``.
Basic auth ``api:<key>``, else 401 ``Forbidden``; errors as ``{"message": ...}``; a 429 carries
``Retry-After`` and ``X-RateLimit-*``. Not covered: ``o:deliverytime`` scheduling (sent at once),
tracking (no link rewriting), sending domains (any domain in the path is accepted).

Webhooks: ``{"signature": {timestamp, token, signature}, "event-data": {...}}`` with signature =
HMAC-SHA256(webhook signing key, timestamp + token), events delivered, failed (permanent),
complained, opened, clicked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import replace
from email.utils import parseaddr
from datetime import datetime, timezone
from typing import Optional

from aiohttp import web

from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Attachment, Outgoing, render

MESSAGES = {400: "Bad Request", 401: "Forbidden", 403: "Forbidden", 404: "Domain not found",
            429: "Too many requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
EVENT_NAMES = {"delivered": "delivered", "bounce": "failed", "complaint": "complained", "open": "opened",
               "click": "clicked"}


_RECIPIENT_VAR = re.compile(r"%recipient\.([A-Za-z0-9_\-]+)%")


def _split(values: list[str]) -> list[str]:
    """Mailgun takes a recipient field repeated, or comma-separated in one field."""
    out = []
    for value in values:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


class Mailgun(Provider):
    name = "mailgun"
    domain = "mailgun.org"

    def __init__(self, capture) -> None:
        super().__init__(capture)
        self.templates: dict[str, dict] = {}

    def new_message_id(self) -> str:
        return f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}.{secrets.token_hex(8)}"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v3/{domain}/messages", self.send), web.post("/v3/{domain}/messages.mime", self.send_mime)]

    def error(self, status: int, message: Optional[str] = None, *, retry_after: int = 1) -> web.Response:
        text = message or MESSAGES.get(status, "error")
        headers = {}
        if status == 429:
            headers = {"Retry-After": str(retry_after), "X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset": str(int((time.time() + retry_after) * 1000))}
        if status == 401:  # Mailgun answers a bad key with a bare text body
            return web.Response(status=401, text=text, headers=headers)
        return web.json_response({"message": text}, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"api:{self.capture.keys.mailgun}".encode()).decode()
        return hmac.compare_digest(request.headers.get("Authorization", ""), expected)

    async def _form(self, request: web.Request):
        fields: dict[str, list[str]] = {}
        files: list[tuple[str, Attachment]] = []
        form = await request.post()
        for key, value in form.items():
            if hasattr(value, "file"):
                content_type = value.content_type if value.content_type != "application/octet-stream" else None
                files.append((key, Attachment(value.filename or key, value.file.read(),
                                              content_type or _guess(value.filename))))
            else:
                fields.setdefault(key, []).append(str(value))
        return fields, files

    async def send(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self.error(401)
        fields, files = await self._form(request)
        first = lambda key: (fields.get(key) or [None])[0]  # noqa: E731
        if not first("from"):
            return self.error(400, "from parameter is missing")
        to = _split(fields.get("to", []))
        if not to:
            return self.error(400, "to parameter is missing")
        template = first("template")
        if not (first("text") or first("html") or template or first("amp-html")):
            return self.error(400, "Need at least one of 'text', 'html' or 'template' parameters specified")
        variables = json.loads(first("t:variables") or first("h:X-Mailgun-Variables") or "{}")
        text, html, subject = first("text"), first("html"), first("subject") or ""
        stored = self.templates.get(template) if template else None
        if stored:
            text, html = render(stored.get("text"), variables), render(stored.get("html"), variables)
            subject = subject or render(stored.get("subject"), variables) or ""
        headers = [(k[2:], v) for k, values in fields.items() if k.startswith("h:") for v in values
                   if k[2:].lower() not in ("reply-to", "x-mailgun-variables")]
        reply_to = fields.get("h:Reply-To", [])
        attachments = [att for key, att in files if key == "attachment"]
        attachments += [Attachment(att.filename, att.content, att.content_type, "inline", att.filename)
                        for key, att in files if key == "inline"]
        details = {"domain": request.match_info["domain"], "tags": fields.get("o:tag", []),
                   "user_variables": {k[2:]: v[0] for k, v in fields.items() if k.startswith("v:")},
                   "template": template, "template_variables": variables or None,
                   "recipient_variables": json.loads(first("recipient-variables") or "null")}
        out = Outgoing(provider=self.name, sender=first("from"), to=to, cc=_split(fields.get("cc", [])),
                       bcc=_split(fields.get("bcc", [])), subject=subject, text=text, html=html,
                       reply_to=reply_to, headers=headers, attachments=attachments,
                       details={k: v for k, v in details.items() if v})
        batch = details["recipient_variables"]
        if isinstance(batch, dict) and batch:
            return await self._batch(request, out, batch, testmode=first("o:testmode"))
        return await self._submit(request, out, testmode=first("o:testmode"))

    async def _batch(self, request: web.Request, out: Outgoing, variables: dict, testmode) -> web.Response:
        """Batch sending: with ``recipient-variables`` every To recipient gets a message of its own,
        addressed to it alone, with ``%recipient.KEY%`` replaced from its variables (one id for all)."""
        answer = None
        for rcpt in out.to:
            addr = parseaddr(rcpt)[1]
            mine = variables.get(addr) or variables.get(addr.lower()) or {}

            def fill(text):
                if text is None:
                    return None
                return _RECIPIENT_VAR.sub(lambda m: str(mine.get(m.group(1), "")), text)

            single = replace(out, to=[rcpt], cc=[], bcc=[], subject=fill(out.subject) or "", text=fill(out.text),
                             html=fill(out.html), details={**out.details, "recipient_variables": mine or None})
            answer = await self._submit(request, single, testmode=testmode)
            if answer.status >= 400:
                return answer
        assert answer is not None
        return answer

    async def send_mime(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self.error(401)
        fields, files = await self._form(request)
        message = next((att.content for key, att in files if key == "message"), None)
        if message is None:
            return self.error(400, "message parameter is missing")
        to = _split(fields.get("to", []))
        if not to:
            return self.error(400, "to parameter is missing")
        from email.parser import BytesHeaderParser

        head = BytesHeaderParser().parsebytes(message)
        out = Outgoing(provider=self.name, sender=str(head.get("From", "")), to=to, subject=str(head.get("Subject", "")),
                       details={"domain": request.match_info["domain"], "tags": fields.get("o:tag", [])})
        return await self._submit(request, out, raw=message, testmode=(fields.get("o:testmode") or [None])[0])

    async def _submit(self, request: web.Request, out: Outgoing, *, raw: Optional[bytes] = None,
                      testmode: Optional[str] = None) -> web.Response:
        domain = request.match_info["domain"]
        if testmode and testmode.lower() in ("yes", "true", "1"):
            msg_id = f"<{datetime.now(timezone.utc):%Y%m%d%H%M%S}.{secrets.token_hex(8)}@{domain}>"
            return web.json_response({"id": msg_id, "message": "Queued. Thank you."})
        result = await self.capture.submit(self, out, raw=raw, peer=request.remote, domain=domain)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"id": f"<{result.message_id}@{domain}>", "message": "Queued. Thank you."})

    # -- webhooks ----------------------------------------------------------------------------

    def webhook(self, event: Event, target) -> tuple[dict[str, str], bytes]:
        timestamp = str(int(time.time()))
        token = secrets.token_hex(25)
        signature = hmac.new((target.secret or "").encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
        data = {"event": EVENT_NAMES.get(event.kind, event.kind), "id": secrets.token_urlsafe(16),
                "timestamp": event.at, "recipient": event.recipient, "tags": event.details.get("tags", []),
                "user-variables": event.details.get("user_variables", {}),
                "message": {"headers": {"message-id": event.message_id, "from": event.sender, "to": event.recipient,
                                        "subject": event.subject}}}
        if event.kind == "bounce":
            data.update(severity="permanent", reason="bounce",
                        **{"delivery-status": {"code": 550, "message": event.reason, "description": event.reason}})
        if event.kind == "delivered":
            data["delivery-status"] = {"code": 250, "message": "OK"}
        if event.kind == "click":
            data["url"] = event.url
        body = json.dumps({"signature": {"timestamp": timestamp, "token": token, "signature": signature},
                           "event-data": data}).encode()
        return {"Content-Type": "application/json"}, body


def _guess(filename: Optional[str]) -> str:
    import mimetypes

    return mimetypes.guess_type(filename or "")[0] or "application/octet-stream"

