"""Amazon SES v2 ``SendEmail`` (``POST /v2/email/outbound-emails``) and ``CreateEmailTemplate``
(``POST /v2/email/templates``), as boto3's ``sesv2`` client calls them with ``endpoint_url``.

Covered: FromEmailAddress, Destination (To/Cc/Bcc), ReplyToAddresses, Content.Simple (Subject,
Body.Text/Html, Headers, Attachments), Content.Raw (sent as is, its Bcc header dropped; the
recipients from Destination, else from its To/Cc/Bcc headers), Content.Template (TemplateName of a
template created through CreateEmailTemplate, TemplateArn, inline TemplateContent; TemplateData
rendered), EmailTags and ConfigurationSetName (recorded). Answer: 200 ``{"MessageId": ...}``.

Requests must be SigV4-signed: the ``Authorization`` header is parsed, the access key id checked
and the signature recomputed with the secret key (``MissingAuthenticationTokenException``,
``UnrecognizedClientException``, ``SignatureDoesNotMatch``, as SES answers). Errors are rest-json
(``x-amzn-ErrorType`` and ``{"message": ...}``). The mailbox simulator: success@, bounce@,
complaint@, suppressionlist@ and ooto@simulator.amazonses.com (with +labels) behave as documented.
Not covered: SendBulkEmail, identities and sending quotas (every sender is verified), the
sandbox's verified-recipient rule, list management.

Events (delivered, bounce, complaint, open, click) go out as SES event publishing records in an
SNS ``Notification`` envelope, signed with SignatureVersion 2 (SHA256withRSA); the certificate is
served by the capture at ``/sns/SimpleNotificationService.pem`` (``SigningCertURL``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import uuid
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Optional
from urllib.parse import quote

from aiohttp import web

from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Attachment, Outgoing, render

ERRORS = {400: ("BadRequestException", "Bad request"), 403: ("AccessDeniedException", "Access denied"),
          401: ("UnrecognizedClientException", "The security token included in the request is invalid."),
          404: ("NotFoundException", "Not found"), 429: ("TooManyRequestsException", "Too many requests"),
          500: ("InternalFailure", "An internal error occurred."), 503: ("ServiceUnavailable", "Service unavailable")}
SIMULATOR = "simulator.amazonses.com"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
                   r"/aws4_request, ?SignedHeaders=(?P<headers>[^,]+), ?Signature=(?P<sig>[0-9a-f]{64})$")
TOPIC = "arn:aws:sns:{region}:123456789012:mailproof-ses-events"
EVENT_TYPES = {"delivered": "Delivery", "bounce": "Bounce", "complaint": "Complaint", "open": "Open", "click": "Click"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Ses(Provider):
    name = "ses"
    domain = "email.amazonses.com"

    def __init__(self, capture) -> None:
        super().__init__(capture)
        self.templates: dict[str, dict] = {}
        self.region = "us-east-1"
        self._sns_key = None
        self._sns_cert: Optional[bytes] = None

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v2/email/outbound-emails", self.send_email),
                web.post("/v2/email/templates", self.create_template),
                web.get("/sns/SimpleNotificationService.pem", self.certificate)]

    def error(self, status: int, message: Optional[str] = None, *, retry_after: int = 1,
              code: Optional[str] = None) -> web.Response:
        default_code, default_message = ERRORS.get(status, ("InternalFailure" if status >= 500 else "BadRequestException",
                                                            "error"))
        status = 403 if status == 401 else status  # AWS answers a bad key with 403
        headers = {"x-amzn-ErrorType": f"{code or default_code}:", "x-amzn-RequestId": str(uuid.uuid4())}
        if status == 429:
            headers["Retry-After"] = str(retry_after)
        return web.json_response({"message": message or default_message}, status=status, headers=headers)

    # -- SigV4 -------------------------------------------------------------------------------

    def _check_signature(self, request: web.Request, body: bytes) -> Optional[web.Response]:
        auth = request.headers.get("Authorization")
        if not auth:
            return self.error(403, "Missing Authentication Token", code="MissingAuthenticationTokenException")
        found = _AUTH.match(auth)
        amz_date = request.headers.get("X-Amz-Date", "")
        if found is None or not amz_date:
            return self.error(403, "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
                              "(and an X-Amz-Date header).", code="IncompleteSignatureException")
        keys = self.capture.keys
        if found["key"] != keys.ses_access_key:
            return self.error(403, "The security token included in the request is invalid.",
                              code="UnrecognizedClientException")
        self.region = found["region"]
        signed = found["headers"].split(";")
        canonical_headers = "".join(f"{h}:{' '.join(request.headers.get(h, '').split())}\n" for h in signed)
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(request.query.items()))
        canonical = "\n".join([request.method, quote(request.path, safe="/~"), query, canonical_headers,
                               found["headers"], hashlib.sha256(body).hexdigest()])
        scope = f"{found['date']}/{found['region']}/{found['service']}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + keys.ses_secret_key).encode()
        for part in (found["date"], found["region"], found["service"], "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, found["sig"]):
            return self.error(403, "The request signature we calculated does not match the signature you provided. "
                              "Check your AWS Secret Access Key and signing method.", code="SignatureDoesNotMatch")
        return None

    async def _body(self, request: web.Request):
        body = await request.read()
        refused = self._check_signature(request, body)
        if refused is not None:
            return refused
        try:
            return json.loads(body or b"{}")
        except ValueError:
            return self.error(400, "Request body is not valid JSON", code="SerializationException")

    # -- operations --------------------------------------------------------------------------

    async def create_template(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("TemplateName")
        if not name or not isinstance(body.get("TemplateContent"), dict):
            return self.error(400, "TemplateName and TemplateContent are required")
        if name in self.templates:
            return self.error(400, f"Template {name} already exists.", code="AlreadyExistsException")
        self.templates[name] = body["TemplateContent"]
        return web.json_response({})

    async def send_email(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        content = body.get("Content") or {}
        dest = body.get("Destination") or {}
        sender = body.get("FromEmailAddress")
        details = {"configuration_set": body.get("ConfigurationSetName"),
                   "tags": {t["Name"]: t["Value"] for t in body.get("EmailTags") or []}}
        raw = None
        if "Raw" in content:
            try:
                raw = base64.b64decode(content["Raw"]["Data"])
            except (KeyError, TypeError, ValueError):
                return self.error(400, "Raw message data must be base64", code="BadRequestException")
            head = BytesHeaderParser().parsebytes(raw)
            sender = sender or str(head.get("From", ""))
            if not dest:
                dest = {key: [a for _, a in getaddresses(head.get_all(field, []))]
                        for key, field in (("ToAddresses", "To"), ("CcAddresses", "Cc"), ("BccAddresses", "Bcc"))}
            subject, text, html, headers, attachments = str(head.get("Subject", "")), None, None, [], []
        elif "Simple" in content:
            simple = content["Simple"]
            subject = (simple.get("Subject") or {}).get("Data", "")
            text = ((simple.get("Body") or {}).get("Text") or {}).get("Data")
            html = ((simple.get("Body") or {}).get("Html") or {}).get("Data")
            headers = [(h["Name"], h["Value"]) for h in simple.get("Headers") or []]
            attachments = self._attachments(simple)
        elif "Template" in content:
            tpl = content["Template"]
            name = tpl.get("TemplateName") or (tpl.get("TemplateArn") or "").rpartition("/")[2]
            stored = tpl.get("TemplateContent") or self.templates.get(name)
            if stored is None:
                return self.error(404, f"Template {name} does not exist.", code="NotFoundException")
            data = json.loads(tpl.get("TemplateData") or "{}")
            subject, text, html = (render(stored.get("Subject"), data) or "", render(stored.get("Text"), data),
                                   render(stored.get("Html"), data))
            headers = [(h["Name"], h["Value"]) for h in tpl.get("Headers") or []]
            attachments = self._attachments(tpl)
            details.update(template=name or None, template_data=data or None)
        else:
            return self.error(400, "Content must have exactly one of Simple, Raw or Template")
        if not sender:
            return self.error(400, "Missing required field FromEmailAddress", code="BadRequestException")
        to, cc, bcc = (dest.get(k) or [] for k in ("ToAddresses", "CcAddresses", "BccAddresses"))
        if not (to or cc or bcc):
            return self.error(400, "Missing final '@domain'", code="MessageRejected")
        out = Outgoing(provider=self.name, sender=sender, to=to, cc=cc, bcc=bcc, subject=subject, text=text,
                       html=html, reply_to=body.get("ReplyToAddresses") or [], headers=headers,
                       attachments=attachments, details={k: v for k, v in details.items() if v})
        result = await self.capture.submit(self, out, raw=raw, peer=request.remote)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"MessageId": result.message_id})

    @staticmethod
    def _attachments(part: dict) -> list[Attachment]:
        found = []
        for att in part.get("Attachments") or []:
            found.append(Attachment(att["FileName"], base64.b64decode(att["RawContent"]),
                                    att.get("ContentType") or "application/octet-stream",
                                    (att.get("ContentDisposition") or "ATTACHMENT").lower(), att.get("ContentId")))
        return found

    def simulated(self, recipient: str):
        local, _, domain = recipient.lower().partition("@")
        if domain != SIMULATOR:
            return None
        kind = local.partition("+")[0]
        return {"success": ("delivered", None), "ooto": ("delivered", None), "bounce": ("bounce", "Permanent"),
                "complaint": ("complaint", None), "suppressionlist": ("bounce", "Permanent")}.get(kind)

    def new_message_id(self) -> str:
        return f"0100{secrets.token_hex(6)}-{uuid.uuid4()}-000000"

    # -- events in an SNS envelope -----------------------------------------------------------

    async def certificate(self, request: web.Request) -> web.Response:
        self._signer()
        return web.Response(body=self._sns_cert, content_type="application/x-pem-file")

    def _signer(self):
        if self._sns_key is None:
            import datetime as dt

            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import rsa
            from cryptography.x509.oid import NameOID

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sns.{self.region}.amazonaws.com")])
            now = dt.datetime.now(dt.timezone.utc)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + dt.timedelta(days=2)).sign(key, hashes.SHA256()))
            self._sns_key, self._sns_cert = key, cert.public_bytes(serialization.Encoding.PEM)
        return self._sns_key

    def webhook(self, event: Event, target) -> tuple[dict[str, str], bytes]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        at = _iso(event.at)
        record: dict = {"eventType": EVENT_TYPES.get(event.kind, event.kind),
                        "mail": {"timestamp": at, "source": event.sender, "messageId": event.message_id,
                                 "destination": [event.recipient], "headersTruncated": False,
                                 "commonHeaders": {"from": [event.sender], "to": [event.recipient],
                                                   "subject": event.subject},
                                 "tags": {k: [v] for k, v in (event.details.get("tags") or {}).items()}}}
        if event.kind == "delivered":
            record["delivery"] = {"timestamp": at, "processingTimeMillis": 120, "recipients": [event.recipient],
                                  "smtpResponse": "250 2.6.0 Message received",
                                  "reportingMTA": "a8-70.smtp-out.amazonses.com"}
        elif event.kind == "bounce":
            record["bounce"] = {"bounceType": event.bounce_type or "Permanent", "bounceSubType": "General",
                                "bouncedRecipients": [{"emailAddress": event.recipient, "action": "failed",
                                                       "status": "5.1.1", "diagnosticCode": f"smtp; {event.reason}"}],
                                "timestamp": at, "feedbackId": f"0100{secrets.token_hex(8)}-000000"}
        elif event.kind == "complaint":
            record["complaint"] = {"complainedRecipients": [{"emailAddress": event.recipient}], "timestamp": at,
                                   "feedbackId": f"0100{secrets.token_hex(8)}-000000",
                                   "complaintFeedbackType": "abuse"}
        elif event.kind == "open":
            record["open"] = {"ipAddress": "127.0.0.1", "timestamp": at, "userAgent": "mailproof"}
        elif event.kind == "click":
            record["click"] = {"ipAddress": "127.0.0.1", "timestamp": at, "userAgent": "mailproof",
                               "link": event.url, "linkTags": {}}
        topic = TOPIC.format(region=self.region)
        envelope = {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic,
                    "Message": json.dumps(record), "Timestamp": _iso(event.at), "SignatureVersion": "2",
                    "SigningCertURL": f"{self.capture.url}/sns/SimpleNotificationService.pem",
                    "UnsubscribeURL": f"{self.capture.url}/sns/unsubscribe"}
        signed = "".join(f"{k}\n{envelope[k]}\n" for k in ("Message", "MessageId", "Timestamp", "TopicArn", "Type"))
        signature = self._signer().sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        envelope["Signature"] = base64.b64encode(signature).decode("ascii")
        return ({"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification",
                 "x-amz-sns-message-id": envelope["MessageId"], "x-amz-sns-topic-arn": topic},
                json.dumps(envelope).encode())
