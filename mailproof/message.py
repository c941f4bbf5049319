"""A read-only, lazily parsed view of one captured email.

Capture stores raw bytes only; every parsed attribute is computed on first access and cached.
Headers (subject, addresses, ``recipients`` without an envelope) need only the header section,
which is parsed alone until something asks for the body. Parsing never raises on malformed input:
a broken header or MIME part is kept as best it can be decoded and listed in ``defects``.
"""

from __future__ import annotations

import email
import email.policy
from email import errors
from email.parser import BytesParser
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from functools import cached_property
from html.parser import HTMLParser
from typing import Iterable, Optional, Pattern, Union

DEFAULT_CODE_PATTERN = re.compile(r"(?<![\w-])(\d{6})(?![\w-])")
_URL_IN_TEXT = re.compile(r"""https?://[^\s<>"'\)\]]+""", re.IGNORECASE)
# A line break followed by another one is an empty line, whichever of CRLF, LF or CR they are:
# the header section ends at the first one (or earlier, at a line that is no header at all).
_EMPTY_LINE = re.compile(rb"\n\n|\n\r|\r\r")
_HEADER_PARSER = BytesParser(policy=email.policy.default)


@dataclass(frozen=True)
class Attachment:
    filename: Optional[str]
    content_type: str
    data: bytes
    content_id: Optional[str] = None
    inline: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def text(self, encoding: str = "utf-8") -> str:
        return self.data.decode(encoding, "replace")


@dataclass(frozen=True)
class Link:
    url: str
    text: str  # anchor text for HTML links, "" for links found in the plain text
    source: str  # "html" or "text"


class Message:
    """One captured email. Construct from raw bytes; everything else is derived lazily."""

    def __init__(
        self,
        raw: bytes,
        *,
        mail_from: str = "",
        rcpt_tos: Iterable[str] = (),
        received_at: Optional[float] = None,
        seq: int = 0,
        source: str = "sink",
        extra: Optional[dict] = None,
    ) -> None:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        self.raw: bytes = bytes(raw)
        self.mail_from = mail_from
        self.rcpt_tos: tuple[str, ...] = tuple(rcpt_tos)
        self.received_at = received_at
        self.seq = seq
        self.source = source
        self.extra = dict(extra or {})
        self.triggered_at: Optional[float] = None  # set when a Mailbox claims the message

    # -- envelope and timing -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_property
    def recipients(self) -> frozenset[str]:
        """Lower-cased envelope recipients, or To/Cc/Delivered-To where no envelope is known (IMAP)."""
        if self.rcpt_tos:
            return frozenset(r.lower() for r in self.rcpt_tos)
        found = set(self.to) | set(self.cc) | set(self.header_all("Delivered-To"))
        return frozenset(r.lower() for r in found)

    @property
    def latency(self) -> Optional[float]:
        """Seconds from the trigger (the flow's HTTP request or mark) to capture."""
        if self.triggered_at is None or self.received_at is None:
            return None
        return self.received_at - self.triggered_at

    # -- parsing -----------------------------------------------------------------------------

    @cached_property
    def parsed(self) -> EmailMessage:
        try:
            return email.message_from_bytes(self.raw, policy=email.policy.default)
        except RecursionError:  # absurdly deep nesting: keep the headers, give up on the body
            msg = _HEADER_PARSER.parsebytes(self.raw, headersonly=True)
            msg.defects.append(errors.MessageDefect("MIME nesting too deep to parse; body not parsed"))
            return msg

    @cached_property
    def _head(self) -> EmailMessage:
        """The header section: the whole parse if there already is one, else the headers alone.

        The bytes up to the first empty line hold every header line (the parser ends the headers
        there at the latest), so parsing them alone gives the very headers a full parse gives,
        without reading, let alone decoding, the body.
        """
        parsed = self.__dict__.get("parsed")
        if parsed is not None:
            return parsed
        end = _EMPTY_LINE.search(self.raw)
        head = self.raw if end is None else self.raw[:end.end()]
        return _HEADER_PARSER.parsebytes(head, headersonly=True)

    @cached_property
    def defects(self) -> list[str]:
        found = [type(d).__name__ for d in self.parsed.defects]
        for part in self.parsed.walk():
            if part is not self.parsed:
                found.extend(type(d).__name__ for d in part.defects)
        return found

    @cached_property
    def headers(self) -> list[tuple[str, str]]:
        """All headers in order, values decoded (RFC 2047) and unfolded."""
        return [(name, self._header_text(name, value)) for name, value in self._raw_header_items()]

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.header_all(name)
        return values[0] if values else default

    def header_all(self, name: str) -> list[str]:
        key = name.lower()
        return [value for hname, value in self.headers if hname.lower() == key]

    @property
    def subject(self) -> str:
        return self.header("Subject", "") or ""

    @property
    def from_(self) -> str:
        return self.header("From", "") or ""

    @cached_property
    def to(self) -> list[str]:
        return self._addresses("To")

    @cached_property
    def cc(self) -> list[str]:
        return self._addresses("Cc")

    @property
    def message_id(self) -> Optional[str]:
        return self.header("Message-ID")

    @cached_property
    def date(self):
        value = self.header("Date")
        try:
            return parsedate_to_datetime(value) if value else None
        except (TypeError, ValueError):
            return None

    @cached_property
    def text(self) -> Optional[str]:
        """The plain-text body (first text/plain part that is not an attachment)."""
        return self._body("plain")

    @cached_property
    def html(self) -> Optional[str]:
        """The HTML body (first text/html part that is not an attachment)."""
        return self._body("html")

    @cached_property
    def html_as_text(self) -> str:
        if not self.html:
            return ""
        parser = _TextExtractor()
        parser.feed(self.html)
        parser.close()
        return parser.text()

    @cached_property
    def attachments(self) -> list[Attachment]:
        found = []
        inside_attached_mail: set[int] = set()
        for part in self.parsed.walk():
            if id(part) in inside_attached_mail:
                continue
            if part.get_content_type() == "message/rfc822":  # a forwarded mail: one attachment
                inner = part.get_payload()
                inner = inner[0] if isinstance(inner, list) and inner else inner
                for sub in inner.walk() if hasattr(inner, "walk") else ():
                    inside_attached_mail.add(id(sub))
                data = _safe_bytes(inner)
                found.append(Attachment(filename=_safe(part.get_filename) or "attached.eml",
                                        content_type="message/rfc822", data=data,
                                        inline=(part.get_content_disposition() or "") == "inline"))
                continue
            if part.is_multipart() or part in self._body_parts:
                continue
            disposition = (part.get_content_disposition() or "").lower()
            filename = _safe(part.get_filename)
            if disposition in ("attachment", "inline") or filename or not part.get_content_maintype() == "text":
                payload = part.get_payload(decode=True)
                found.append(
                    Attachment(
                        filename=filename,
                        content_type=part.get_content_type(),
                        data=payload if isinstance(payload, bytes) else b"",
                        content_id=_safe(lambda: part.get("Content-ID")),
                        inline=disposition == "inline",
                    )
                )
        return found

    def attachment(self, filename: str) -> Attachment:
        for att in self.attachments:
            if att.filename == filename:
                return att
        names = [a.filename for a in self.attachments]
        raise LookupError(f"no attachment named {filename!r} in {self.describe()}; attachments: {names}")

    @cached_property
    def links(self) -> list[Link]:
        """Links from HTML hrefs (with anchor text) and from URLs in the text body, deduplicated."""
        found: list[Link] = []
        seen: set[str] = set()
        if self.html:
            parser = _LinkExtractor()
            parser.feed(self.html)
            parser.close()
            for url, text in parser.links:
                if url not in seen:
                    seen.add(url)
                    found.append(Link(url=url, text=text, source="html"))
        for url in _URL_IN_TEXT.findall(self.text or ""):
            url = url.rstrip(".,;:!?")
            if url not in seen:
                seen.add(url)
                found.append(Link(url=url, text="", source="text"))
        return found

    def link(self, text: Optional[str] = None, contains: Optional[str] = None) -> str:
        """The first link whose anchor text contains ``text`` and/or whose URL contains ``contains``."""
        for link in self.links:
            if text is not None and text.lower() not in link.text.lower():
                continue
            if contains is not None and contains not in link.url:
                continue
            return link.url
        raise LookupError(
            f"no link with text={text!r} contains={contains!r} in {self.describe()}; "
            f"links: {[(l.text, l.url) for l in self.links]}"
        )

    def code(self, pattern: Union[str, Pattern[str], None] = None) -> str:
        """A one-time code from the body (default: a standalone 6-digit number).

        A pattern with a group returns the first group; searched in the text body, then the
        HTML's visible text, then the subject.
        """
        regex = DEFAULT_CODE_PATTERN if pattern is None else re.compile(pattern)
        for haystack in (self.text or "", self.html_as_text, self.subject):
            found = regex.search(haystack)
            if found:
                return found.group(1) if regex.groups else found.group(0)
        raise LookupError(f"no code matching {regex.pattern!r} in {self.describe()}")

    def body_contains(self, needle: Union[str, Pattern[str]]) -> bool:
        haystacks = (self.text or "", self.html or "", self.html_as_text)
        if isinstance(needle, re.Pattern):
            return any(needle.search(h) for h in haystacks)
        return any(needle in h for h in haystacks)

    def describe(self) -> str:
        rcpts = ", ".join(self.rcpt_tos) or ", ".join(self.to) or "?"
        return f"mail #{self.seq} to {rcpts} subject {self.subject!r}"

    def __repr__(self) -> str:
        return f"<Message #{self.seq} from={self.mail_from!r} to={list(self.rcpt_tos)} subject={self.subject!r} {self.size} B>"

    # -- helpers -----------------------------------------------------------------------------

    def _raw_header_items(self) -> list[tuple[str, object]]:
        try:
            return list(self._head.items())
        except Exception:  # a header the policy cannot parse at all: fall back to raw strings
            return list(self._head._headers)  # type: ignore[attr-defined]

    @staticmethod
    def _header_text(name: str, value: object) -> str:
        try:
            text = str(value)
        except Exception:
            text = repr(value)
        return " ".join(text.split()) if "\n" in text or "\r" in text else text

    def _addresses(self, name: str) -> list[str]:
        values = self.header_all(name)
        return [addr for _, addr in getaddresses(values) if addr]

    @cached_property
    def _body_parts(self) -> list:
        parts = []
        for kind in ("plain", "html"):
            part = self._find_body_part(kind)
            if part is not None:
                parts.append(part)
        return parts

    def _find_body_part(self, kind: str):
        try:
            part = self.parsed.get_body(preferencelist=(kind,))
        except Exception:
            part = None
        if part is None and not self.parsed.is_multipart() and self.parsed.get_content_type() == f"text/{kind}":
            part = self.parsed
        return part

    def _body(self, kind: str) -> Optional[str]:
        part = self._find_body_part(kind)
        if part is None:
            return None
        try:
            text = part.get_content()
        except Exception:  # unknown charset or broken transfer encoding: decode leniently
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "utf-8"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
        # SMTP carries CRLF; assertions are written with Python's "\n".
        return text.replace("\r\n", "\n")


def _safe_bytes(msg) -> bytes:
    try:
        return msg.as_bytes()
    except Exception:
        try:
            return str(msg).encode("utf-8", "replace")
        except Exception:
            return b""


def _safe(getter):
    try:
        value = getter()
    except Exception:
        return None
    return str(value) if value is not None else None


class _LinkExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self._href: Optional[str] = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href.strip(), " ".join("".join(self._text).split())))
            self._href = None


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self._chunks.append(data)

    def text(self) -> str:
        return " ".join(" ".join(self._chunks).split())
