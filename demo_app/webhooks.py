"""Providers' event webhooks: bounces and complaints mark the address undeliverable.

One route per provider, each checked the way that provider signs (a request that fails the
check gets 403 and changes nothing):

- SendGrid: ECDSA signature over timestamp + body, checked with the official client's
  ``EventWebhook`` and the verification key (``--webhook-key``);
- Mailgun: HMAC-SHA256 of timestamp + token with the webhook signing key (``--webhook-key``).
  The signature does not cover the event data, so a token is accepted once only (replays are
  refused) and only within 5 minutes of its timestamp, as Mailgun's documentation advises;
- Postmark: HTTP basic auth with the credentials in the webhook URL (``--webhook-key user:password``);
- SES: an SNS notification, signature checked against the certificate at ``SigningCertURL``,
  which must be under ``--provider-url`` (in production: https://sns.<region>.amazonaws.com/).

A bounce or complaint adds the address to ``store.suppressed``; the outbox then refuses mail to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time

import aiohttp
from aiohttp import web

log = logging.getLogger("demo_app.webhooks")

MAILGUN_MAX_AGE = 300.0
_seen_tokens: dict[str, None] = {}  # Mailgun tokens already accepted, oldest first (one app per process)


def _suppress(request: web.Request, provider: str, email: str, why: str) -> None:
    from .web import SHOP

    shop = request.app[SHOP]
    key = email.strip().lower()
    shop.store.suppressed.setdefault(key, f"{provider} {why}")  # the first reason stays
    shop.metrics.webhook_suppressions += 1
    log.warning("address suppressed provider=%s email=%s why=%s", provider, key, why)


def _config(request: web.Request):
    from .web import SHOP

    return request.app[SHOP].cfg


async def sendgrid(request: web.Request) -> web.Response:
    from sendgrid.helpers.eventwebhook import EventWebhook

    body = (await request.read()).decode("utf-8", "replace")
    signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
    timestamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
    key = _config(request).webhook_key
    try:
        valid = bool(key and signature and EventWebhook(key).verify_signature(body, signature, timestamp))
    except ValueError:  # a garbled key or signature
        valid = False
    if not valid:
        return web.json_response({"error": "bad signature"}, status=403)
    for event in json.loads(body):
        if event.get("event") in ("bounce", "dropped", "spamreport"):
            _suppress(request, "sendgrid", event["email"], event["event"])
    return web.json_response({"ok": True})


async def mailgun(request: web.Request) -> web.Response:
    payload = await request.json()
    sig = payload.get("signature") or {}
    key = (_config(request).webhook_key or "").encode()
    expected = hmac.new(key, f"{sig.get('timestamp', '')}{sig.get('token', '')}".encode(), hashlib.sha256).hexdigest()
    if not key or not hmac.compare_digest(expected, str(sig.get("signature", ""))):
        return web.json_response({"error": "bad signature"}, status=403)
    try:
        fresh = abs(time.time() - float(sig.get("timestamp", 0))) < MAILGUN_MAX_AGE
    except ValueError:
        fresh = False
    if not fresh or sig.get("token") in _seen_tokens:
        return web.json_response({"error": "stale or replayed webhook"}, status=403)
    _seen_tokens[sig["token"]] = None
    while len(_seen_tokens) > 10_000:  # bounded: the oldest tokens are past MAILGUN_MAX_AGE anyway
        _seen_tokens.pop(next(iter(_seen_tokens)))
    data = payload.get("event-data") or {}
    if (data.get("event") == "failed" and data.get("severity") == "permanent") or data.get("event") == "complained":
        _suppress(request, "mailgun", data["recipient"], data["event"])
    return web.json_response({"ok": True})


async def postmark(request: web.Request) -> web.Response:
    expected = "Basic " + base64.b64encode((_config(request).webhook_key or "").encode()).decode()
    if not _config(request).webhook_key or not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
        return web.json_response({"error": "unauthorized"}, status=401)
    record = await request.json()
    if record.get("RecordType") == "SpamComplaint" or (record.get("RecordType") == "Bounce" and record.get("Inactive")):
        _suppress(request, "postmark", record["Email"], record.get("Type", record["RecordType"]))
    return web.json_response({"ok": True})


async def ses(request: web.Request) -> web.Response:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    envelope = json.loads(await request.read())
    cert_url = str(envelope.get("SigningCertURL", ""))
    trusted = (_config(request).provider_url or "").rstrip("/") + "/"
    if not cert_url.startswith(trusted) or envelope.get("Type") != "Notification":
        return web.json_response({"error": "untrusted certificate URL"}, status=403)
    async with aiohttp.ClientSession() as session, session.get(cert_url) as answer:
        cert = x509.load_pem_x509_certificate(await answer.read())
    signed = "".join(f"{k}\n{envelope[k]}\n" for k in ("Message", "MessageId", "Timestamp", "TopicArn", "Type"))
    digest = hashes.SHA256() if envelope.get("SignatureVersion") == "2" else hashes.SHA1()
    try:
        cert.public_key().verify(base64.b64decode(envelope["Signature"]), signed.encode(), padding.PKCS1v15(), digest)
    except (InvalidSignature, KeyError, ValueError):
        return web.json_response({"error": "bad signature"}, status=403)
    event = json.loads(envelope["Message"])
    kind = event.get("eventType") or event.get("notificationType")
    if kind == "Bounce" and event["bounce"].get("bounceType") == "Permanent":
        for rcpt in event["bounce"]["bouncedRecipients"]:
            _suppress(request, "ses", rcpt["emailAddress"], "bounce")
    elif kind == "Complaint":
        for rcpt in event["complaint"]["complainedRecipients"]:
            _suppress(request, "ses", rcpt["emailAddress"], "complaint")
    return web.json_response({"ok": True})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/webhooks/sendgrid", sendgrid)
    router.add_post("/webhooks/mailgun", mailgun)
    router.add_post("/webhooks/postmark", postmark)
    router.add_post("/webhooks/ses", ses)
