"""From an accepted API request to the raw MIME message the provider would have sent.

Every provider module turns its request into an ``Outgoing`` (addresses, subject, text and HTML,
custom headers, attachments, and what the provider records besides: template id, tags, ...);
``compose`` writes the message the way the providers do: multipart/alternative for text + HTML,
inside multipart/mixed when there are attachments, a Message-ID and a Date of the provider's own
unless the request set them. Bcc recipients are in the envelope only, never in a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses, parseaddr
from datetime import datetime, timezone
from typing import Any, Optional

# Headers a request may not set through its custom headers: the provider writes them itself.
RESERVED_HEADERS = frozenset({"from", "to", "cc", "bcc", "subject", "reply-to", "content-type",
                              "content-transfer-encoding", "mime-version"})


@dataclass
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"
    disposition: str = "attachment"  # or "inline"
    content_id: Optional[str] = None


@dataclass
class Outgoing:
    """One message as a provider's API accepted it (before any MIME is written)."""

    provider: str
    sender: str                      # the From header, display name included
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    subject: str = ""
    text: Optional[str] = None
    html: Optional[str] = None
    reply_to: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    envelope_from: Optional[str] = None  # the bounce address; default: the From address
    details: dict[str, Any] = field(default_factory=dict)  # template id, data, tags, metadata...

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: every To, Cc and Bcc address, once each, in order."""
        return unique_addresses(self.to + self.cc + self.bcc)

    @property
    def mail_from(self) -> str:
        return self.envelope_from or parseaddr(self.sender)[1]


def unique_addresses(values: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for _name, addr in getaddresses(values):
        if addr and addr.lower() not in seen:
            seen[addr.lower()] = addr
    return list(seen.values())


def compose(out: Outgoing, message_id: str, *, domain: str) -> bytes:
    """The raw message (CRLF line ends), as the provider hands it to the receiving MTA."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = out.sender
    if out.to:
        msg["To"] = ", ".join(out.to)
    if out.cc:
        msg["Cc"] = ", ".join(out.cc)
    if out.reply_to:
        msg["Reply-To"] = ", ".join(out.reply_to)
    msg["Subject"] = out.subject
    custom = {name.lower() for name, _ in out.headers}
    if "date" not in custom:
        msg["Date"] = format_datetime(datetime.now(timezone.utc))
    if "message-id" not in custom:
        msg["Message-ID"] = f"<{message_id}@{domain}>"
    for name, value in out.headers:
        if name.lower() not in RESERVED_HEADERS:
            msg[name] = value
    if out.text is not None:
        msg.set_content(out.text)
    if out.html is not None:
        if out.text is not None:
            msg.add_alternative(out.html, subtype="html")
        else:
            msg.set_content(out.html, subtype="html")
    if out.text is None and out.html is None:
        msg.set_content("")
    for att in out.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        kwargs: dict[str, Any] = {"filename": att.filename, "disposition": att.disposition}
        if att.content_id:
            kwargs["cid"] = f"<{att.content_id.strip('<>')}>"
        msg.add_attachment(att.content, maintype=maintype or "application", subtype=subtype or "octet-stream",
                           **kwargs)
    return msg.as_bytes()


def strip_bcc(raw: bytes) -> bytes:
    """A raw message without its Bcc header (in the header block only, continuation lines too):
    the recipients stay in the envelope, as a provider (or ``sendmail -t``) sends it."""
    lines = raw.splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):  # end of the header block: the rest is body, unchanged
            return b"".join(kept + lines[i:])
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line[:4].lower() == b"bcc:"
        if not dropping:
            kept.append(line)
    return b"".join(kept)


_TEMPLATE_VAR = re.compile(r"{{{?\s*([A-Za-z0-9_.\-]+)\s*}?}}")


def render(template: Optional[str], data: dict) -> Optional[str]:
    """``{{name}}`` / ``{{{name}}}`` / ``{{a.b}}`` replaced from ``data`` (a missing name: empty).

    Only Handlebars' variable substitution: no helpers, blocks or partials, and no HTML escaping
    (SendGrid and SES escape ``{{x}}`` in HTML; a test's data rarely needs it).
    """
    if template is None:
        return None

    def value(found: re.Match) -> str:
        current: Any = data
        for key in found.group(1).split("."):
            current = current.get(key) if isinstance(current, dict) else None
        return "" if current is None else str(current)

    return _TEMPLATE_VAR.sub(value, template)
