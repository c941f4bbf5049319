"""Postmark ``POST /email`` and ``POST /email/batch``, as its documented HTTP API is called.

Postmark publishes no official Python client (``postmarker`` is a community library): the tests
and the demo app send the documented request with ``X-Postmark-Server-Token``.

Covered: From, To/Cc/Bcc (comma-separated), Subject, TextBody, HtmlBody, ReplyTo, Headers,
Attachments (Name, Content, ContentType, ContentID), Tag, Metadata, MessageStream, TrackOpens /
TrackLinks (recorded); ``/email/batch`` (up to 500, one result per message, HTTP 200);
``/email/withTemplate`` (TemplateAlias or TemplateId of a template the test registered in
``templates``, TemplateModel rendered: variables only, no Mustachio sections). Answer:
``{"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}``. Errors as Postmark's
``{"ErrorCode", "Message"}`` (401 with ErrorCode 10 for a missing or wrong token, 422 with 300
for an invalid request, 406 for an inactive recipient). The bounce test addresses
(``HardBounce@bounce-testing.postmarkapp.com``, ``SoftBounce@``, ``SpamComplaint@``, every
documented bounce type as the local part) bounce or complain as documented. Not covered:
``/email/batchWithTemplates``, the template, bounce and message APIs, inbound, link tracking.
A fault that refuses one message of a batch refuses the whole batch.

Webhooks: Delivery, Bounce, SpamComplaint, Open and Click records, with HTTP basic auth (the
credentials the application put in the webhook URL: ``target(..., user=, password=)``).
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
from datetime import datetime, timezone
from typing import Any, Optional

from aiohttp import web

from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Attachment, Outgoing, render

BOUNCE_TESTING = "bounce-testing.postmarkapp.com"
BOUNCE_TYPES = {"HardBounce": 1, "Transient": 2, "Unsubscribe": 16, "Subscribe": 32, "AutoResponder": 64,
                "AddressChange": 128, "DnsError": 256, "SpamNotification": 512, "OpenRelayTest": 1024,
                "Unknown": 2048, "SoftBounce": 4096, "VirusNotification": 8192, "ChallengeVerification": 16384,
                "BadEmailAddress": 100000, "SpamComplaint": 100001, "ManuallyDeactivated": 100002,
                "Unconfirmed": 100003, "Blocked": 100006, "SMTPApiError": 100007, "InboundError": 100008,
                "DMARCPolicy": 100009, "TemplateRenderingFailed": 100010}
_BY_LOWER = {name.lower(): name for name in BOUNCE_TYPES}
ERRORS = {400: (300, "Invalid email request"), 401: (10, "The Server API token is invalid or missing."),
          403: (10, "Access denied"), 406: (406, "You tried to send to recipient(s) that have been marked as inactive."),
          422: (300, "Invalid email request"), 429: (429, "Rate limit exceeded"),
          500: (500, "Internal Server Error"), 503: (503, "Service Unavailable")}
HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated", "SpamComplaint", "Blocked", "DMARCPolicy"}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class Invalid(Exception):
    pass


class Postmark(Provider):
    name = "postmark"
    domain = "mtasv.net"

    def __init__(self, capture) -> None:
        super().__init__(capture)
        self.templates: dict[str, dict] = {}  # alias or str(id) -> {"Subject", "TextBody", "HtmlBody"}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/email", self.send), web.post("/email/batch", self.send_batch),
                web.post("/email/withTemplate", self.send_with_template)]

    def error(self, status: int, message: Optional[str] = None, *, retry_after: int = 1) -> web.Response:
        code, text = ERRORS.get(status, (status, "Error"))
        headers = {"Retry-After": str(retry_after)} if status == 429 else {}
        status = 422 if status in (400, 406) else status  # Postmark answers request errors with 422
        return web.json_response({"ErrorCode": code, "Message": message or text}, status=status, headers=headers)

    def _refused(self, request: web.Request) -> Optional[web.Response]:
        token = request.headers.get("X-Postmark-Server-Token")
        if not token:
            return self.error(401, "No Account or Server API tokens were supplied in the HTTP headers. Please add "
                              "a header for either X-Postmark-Server-Token or X-Postmark-Account-Token.")
        if not hmac.compare_digest(token, self.capture.keys.postmark):
            return self.error(401, "Request does not contain a valid Server token.")
        return None

    def parse(self, item) -> Outgoing:
        if not isinstance(item, dict):
            raise Invalid("Invalid email request: the message must be a JSON object")
        if not item.get("From"):
            raise Invalid("Invalid 'From' address: ''.")
        to = [a for a in (item.get("To") or "").split(",") if a.strip()]
        cc = [a for a in (item.get("Cc") or "").split(",") if a.strip()]
        bcc = [a for a in (item.get("Bcc") or "").split(",") if a.strip()]
        if not (to or cc or bcc):
            raise Invalid("Zero recipients specified")
        if not (item.get("TextBody") or item.get("HtmlBody")):
            raise Invalid("Provide either email TextBody or HtmlBody or both.")
        attachments = []
        for att in item.get("Attachments") or []:
            try:
                data = base64.b64decode(att.get("Content") or "", validate=True)
            except ValueError:
                raise Invalid(f"Attachment {att.get('Name')!r}: Content must be base64") from None
            attachments.append(Attachment(att.get("Name") or "attachment", data,
                                          att.get("ContentType") or "application/octet-stream",
                                          "inline" if att.get("ContentID") else "attachment", att.get("ContentID")))
        details = {"tag": item.get("Tag"), "metadata": item.get("Metadata"),
                   "message_stream": item.get("MessageStream") or "outbound",
                   "track_opens": item.get("TrackOpens"), "track_links": item.get("TrackLinks")}
        return Outgoing(provider=self.name, sender=item["From"], to=to, cc=cc, bcc=bcc,
                        subject=item.get("Subject") or "", text=item.get("TextBody"), html=item.get("HtmlBody"),
                        reply_to=[a for a in (item.get("ReplyTo") or "").split(",") if a.strip()],
                        headers=[(h["Name"], h["Value"]) for h in item.get("Headers") or []],
                        attachments=attachments, details={k: v for k, v in details.items() if v is not None})

    async def _one(self, request: web.Request, item, **details) -> tuple[Optional[web.Response], dict]:
        try:
            out = self.parse(item)
        except Invalid as exc:
            return None, {"ErrorCode": 300, "Message": str(exc)}
        out.details.update({k: v for k, v in details.items() if v})
        result = await self.capture.submit(self, out, peer=request.remote)
        if isinstance(result, web.Response):
            return result, {}
        return None, {"To": item.get("To"), "SubmittedAt": _when(datetime.now().timestamp()),
                      "MessageID": result.message_id, "ErrorCode": 0, "Message": "OK"}

    async def _body(self, request: web.Request) -> tuple[Optional[web.Response], Any]:
        """(the answer refusing the request: bad token or not JSON, or None; its JSON body)."""
        refused = self._refused(request)
        if refused is not None:
            return refused, None
        try:
            return None, json.loads(await request.read())
        except ValueError:
            return self.error(422, "The request body is not valid JSON"), None

    async def _answer(self, request: web.Request, item, **details) -> web.Response:
        """The answer to one message (/email, /email/withTemplate)."""
        refusal, answer = await self._one(request, item, **details)
        if refusal is not None:
            return refusal
        return web.json_response(answer, status=422 if answer["ErrorCode"] else 200)

    async def send(self, request: web.Request) -> web.Response:
        refused, item = await self._body(request)
        if refused is not None:
            return refused
        return await self._answer(request, item)

    async def send_with_template(self, request: web.Request) -> web.Response:
        refused, item = await self._body(request)
        if refused is not None:
            return refused
        if not isinstance(item, dict):
            return self.error(422, "Invalid email request: the message must be a JSON object")
        key = item.get("TemplateAlias") or item.get("TemplateId")
        template = self.templates.get(str(key)) if key is not None else None
        if template is None:
            return web.json_response({"ErrorCode": 1101, "Message": f"The Template's 'TemplateId' or "
                                      f"'TemplateAlias' was not found: {key!r}."}, status=422)
        model = item.get("TemplateModel") or {}
        rendered = {**item, "Subject": render(template.get("Subject"), model),
                    "TextBody": render(template.get("TextBody"), model), "HtmlBody": render(template.get("HtmlBody"), model)}
        return await self._answer(request, rendered, template=str(key), model=model)

    async def send_batch(self, request: web.Request) -> web.Response:
        refused, items = await self._body(request)
        if refused is not None:
            return refused
        if not isinstance(items, list) or len(items) > 500:
            return self.error(422, "A batch is a JSON array of at most 500 messages.")
        answers = []
        for item in items:
            refusal, answer = await self._one(request, item)
            if refusal is not None:
                return refusal
            answers.append(answer)
        return web.json_response(answers)

    def simulated(self, recipient: str):
        local, _, domain = recipient.partition("@")
        if domain.lower() != BOUNCE_TESTING:
            return None
        kind = _BY_LOWER.get(local.lower())
        if kind is None:
            return None
        return ("complaint" if kind == "SpamComplaint" else "bounce"), kind

    # -- webhooks ----------------------------------------------------------------------------

    def webhook(self, event: Event, target) -> tuple[dict[str, str], bytes]:
        common = {"MessageID": event.message_id, "Tag": event.details.get("tag", ""), "ServerID": 1,
                  "Metadata": event.details.get("metadata") or {},
                  "MessageStream": event.details.get("message_stream", "outbound")}
        at = _when(event.at)
        if event.kind == "delivered":
            record = {"RecordType": "Delivery", "Recipient": event.recipient, "DeliveredAt": at,
                      "Details": "Test delivery", **common}
        elif event.kind in ("bounce", "complaint"):
            kind = event.bounce_type or ("SpamComplaint" if event.kind == "complaint" else "HardBounce")
            record = {"RecordType": "SpamComplaint" if event.kind == "complaint" else "Bounce",
                      "ID": secrets.randbelow(10**10), "Type": kind, "TypeCode": BOUNCE_TYPES.get(kind, 2048),
                      "Name": kind, "Description": event.reason or kind, "Details": event.reason or kind,
                      "Email": event.recipient, "From": event.sender, "BouncedAt": at, "DumpAvailable": False,
                      "Inactive": kind in HARD, "CanActivate": True, "Subject": event.subject, **common}
        elif event.kind == "open":
            record = {"RecordType": "Open", "Recipient": event.recipient, "ReceivedAt": at, "FirstOpen": True,
                      "Platform": "Desktop", "UserAgent": "mailproof", **common}
        else:
            record = {"RecordType": "Click", "Recipient": event.recipient, "ReceivedAt": at,
                      "OriginalLink": event.url, "ClickLocation": "HTML", "Platform": "Desktop",
                      "UserAgent": "mailproof", **common}
        return {"Content-Type": "application/json"}, json.dumps(record).encode()
