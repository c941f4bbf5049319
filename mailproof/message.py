"""A read-only, lazily parsed view of one captured email.

Capture stores raw bytes only; every parsed attribute is computed on first access and cached.
Headers (subject, addresses, ``recipients`` without an envelope) need only the header section,
which is parsed alone until something asks for the body, and a header is decoded only when it is
asked for. ``parts`` is every leaf MIME part; ``text`` and ``html`` are the bodies the email
package's ``get_body`` picks; ``attachments`` is every other part (a calendar invite, a CSV
without a filename, a second text/plain, a bounce's delivery status, an attached mail...);
``body_contains`` searches every text part.

No accessor raises on any input except the ``LookupError`` of the find methods
(``link``, ``code``, ``attachment``): what cannot be read is read as best it can be and listed in
``defects``. The work a hostile message can cause is bounded (``mailproof.message_parts``:
MAX_PARTS, MAX_DEPTH, MAX_PARAMETERS; ``mailproof.message_text``: HEADER_PARSE_*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import getaddresses, parsedate_to_datetime
from functools import cached_property
from typing import Iterable, Optional, Pattern, Union

from mailproof.message_html import HtmlReading
from mailproof.message_parts import Entity, Part, Tree, describe_defect, parse, read_part
from mailproof.message_text import decode_bytes, display_header, header_plan

__all__ = ["Attachment", "Link", "Message", "Part", "DEFAULT_CODE_PATTERN"]

DEFAULT_CODE_PATTERN = re.compile(r"(?<![\w-])(\d{6})(?![\w-])")
_URL_IN_TEXT = re.compile(r"""https?://[^\s<>"'\)\]]+""", re.IGNORECASE)
# A line break followed by another one is an empty line, whichever of CRLF, LF or CR they are:
# the header section ends at the first one (or earlier, at a line that is no header at all).
_EMPTY_LINE = re.compile(rb"\n\n|\n\r|\r\r")
_ADDRESS = re.compile(r"[^\s<>,;:\"()\[\]]+@[^\s<>,;:\"()\[\]]+")
# Parts that are text for body_contains besides text/*: a bounce's delivery status fields.
_TEXTUAL = ("message/delivery-status", "message/disposition-notification")


@dataclass(frozen=True)
class Attachment:
    """A part that is not the chosen text or HTML body."""

    filename: Optional[str]
    content_type: str
    data: bytes  # transfer-decoded bytes
    content_id: Optional[str] = None
    inline: bool = False
    # The declared charset of a text/* part, for text(); not compared, so an Attachment written
    # out in a test with the five fields above still equals the one read.
    charset: Optional[str] = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    def text(self, encoding: Optional[str] = None) -> str:
        """The data as text: in ``encoding`` if given, else in the declared charset (UTF-8 if none)."""
        if encoding is not None:
            return self.data.decode(encoding, "replace")
        return decode_bytes(self.data, self.charset, default="utf-8")[0]


@dataclass(frozen=True)
class Link:
    url: str
    text: str  # anchor text for HTML links, "" for links found in the plain text
    source: str  # "html" or "text"


class Message:
    """One captured email. Construct from raw bytes; everything else is derived lazily.

    The SMTP envelope facts ``tls``, ``smtputf8``, ``eight_bit_mime`` (BODY=8BITMIME), ``helo`` and
    ``auth_user`` are None when the backend does not know them (IMAP, a remote sink).
    """

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
        helo: Optional[str] = None,
        tls: Optional[bool] = None,
        smtputf8: Optional[bool] = None,
        eight_bit_mime: Optional[bool] = None,
        auth_user: Optional[str] = None,
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
        self.helo = helo
        self.tls = tls
        self.smtputf8 = smtputf8
        self.eight_bit_mime = eight_bit_mime
        self.auth_user = auth_user
        self.triggered_at: Optional[float] = None  # set when a Mailbox claims the message

    @classmethod
    def from_captured(cls, captured, source: str = "sink") -> "Message":
        """A message from the in-process sink's ``mailproof.capture.smtp_sink.CapturedMail``."""
        options = tuple(getattr(captured, "mail_options", None) or ())
        return cls(
            captured.data, mail_from=captured.mail_from, rcpt_tos=captured.rcpt_tos,
            received_at=captured.received_at, seq=captured.seq, source=source,
            helo=getattr(captured, "helo", None), tls=getattr(captured, "tls", None),
            smtputf8=getattr(captured, "smtputf8", None),
            eight_bit_mime=any(str(o).strip().upper() == "BODY=8BITMIME" for o in options),
            auth_user=getattr(captured, "auth_user", None),
            extra={"peer": getattr(captured, "peer", None), "mail_options": options},
        )

    # -- envelope and timing -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_property
    def recipients(self) -> frozenset[str]:
        """Lower-cased envelope recipients, or To/Cc/Delivered-To where no envelope is known (IMAP)."""
        if self.rcpt_tos:
            return frozenset(str(r).lower() for r in self.rcpt_tos)
        found = set(self.to) | set(self.cc) | set(self._addresses("Delivered-To"))
        return frozenset(r.lower() for r in found)

    @property
    def latency(self) -> Optional[float]:
        """Seconds from the trigger (the flow's HTTP request or mark) to capture."""
        if self.triggered_at is None or self.received_at is None:
            return None
        try:
            return self.received_at - self.triggered_at
        except TypeError:
            return None

    # -- parsing -----------------------------------------------------------------------------

    @cached_property
    def parsed(self) -> Entity:
        """The email package's MIME tree (an ``email.message.Message``; header values stay raw strings)."""
        return parse(self.raw)

    @cached_property
    def _head(self) -> Entity:
        """The header section: the whole parse if there already is one, else the headers alone.

        The bytes up to the first empty line hold every header line (the parser ends the headers
        there at the latest), so parsing them alone gives the very headers a full parse gives,
        without reading, let alone decoding, the body.
        """
        parsed = self.__dict__.get("parsed")
        if parsed is not None:
            return parsed
        end = _EMPTY_LINE.search(self.raw)
        return parse(self.raw if end is None else self.raw[:end.end()], headersonly=True)

    @cached_property
    def _reading(self) -> "_Reading":
        """The parts read once: the walked tree, every part, what went wrong, which are the bodies."""
        return _Reading(self.parsed, "\r\n" if b"\r\n" in self.raw else "\n")

    @property
    def parts(self) -> list[Part]:
        """Every leaf MIME part in order (up to ``message_parts.MAX_PARTS``), decoded."""
        return self._reading.parts

    @cached_property
    def defects(self) -> list[str]:
        """What is wrong with the message, one readable line each, naming the part (``parts`` index)."""
        reading = self._reading
        tree = reading.tree
        found = []
        for entity in tree.order:
            label = tree.label(entity)
            found.extend(f"{label}: {describe_defect(d)}" for d in entity.defects)
            found.extend(f"{label}: {note}" for note in reading.notes.get(id(entity), ()))
        found.extend(f"message: {note}" for note in tree.notes)
        return found

    # -- headers -----------------------------------------------------------------------------

    @cached_property
    def _header_items(self) -> list[tuple[str, str]]:
        try:
            return [(str(name), str(value)) for name, value in self._head._headers]
        except Exception:
            return []

    @cached_property
    def _header_index(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(self._header_items):
            index.setdefault(name.lower(), []).append(i)
        return index

    @cached_property
    def _header_plan(self) -> list[bool]:
        return header_plan(self._header_items)

    @cached_property
    def _decoded(self) -> dict[int, str]:
        return {}

    def _header_value(self, i: int) -> str:
        value = self._decoded.get(i)
        if value is None:
            name, raw = self._header_items[i]
            value = self._decoded[i] = display_header(name, raw, self._header_plan[i])
        return value

    @cached_property
    def headers(self) -> list[tuple[str, str]]:
        """All headers in order, values decoded (RFC 2047) and unfolded."""
        return [(name, self._header_value(i)) for i, (name, _) in enumerate(self._header_items)]

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.header_all(name)
        return values[0] if values else default

    def header_all(self, name: str) -> list[str]:
        return [self._header_value(i) for i in self._header_index.get(str(name).lower(), ())]

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
        except Exception:  # TypeError, ValueError, OverflowError on nonsense dates
            return None

    def _addresses(self, name: str) -> list[str]:
        found = []
        for value in self.header_all(name):
            try:
                found.extend(addr for _, addr in getaddresses([value]) if addr)
            except Exception:  # getaddresses recurses on some hostile values
                found.extend(_ADDRESS.findall(value))
        return found

    # -- bodies and attachments --------------------------------------------------------------

    def _body(self, kind: str) -> Optional[str]:
        index = self._reading.bodies[kind]
        return None if index is None else self.parts[index].content

    @cached_property
    def text(self) -> Optional[str]:
        """The plain-text body (first text/plain part that is not an attachment)."""
        return self._body("plain")

    @cached_property
    def html(self) -> Optional[str]:
        """The HTML body (first text/html part that is not an attachment)."""
        return self._body("html")

    @cached_property
    def _html_reading(self) -> Optional[HtmlReading]:
        return HtmlReading(self.html) if self.html else None

    @cached_property
    def html_as_text(self) -> str:
        return self._html_reading.text() if self._html_reading else ""

    @cached_property
    def attachments(self) -> list[Attachment]:
        """Every part that is not the chosen text or HTML body, in order."""
        bodies = {i for i in self._reading.bodies.values() if i is not None}
        return [
            Attachment(
                filename=part.filename or ("attached.eml" if part.content_type == "message/rfc822" else None),
                content_type=part.content_type, data=part.data, content_id=part.content_id,
                inline=part.disposition == "inline", charset=part.charset,
            )
            for part in self.parts if part.index not in bodies
        ]

    def attachment(self, filename: str) -> Attachment:
        for att in self.attachments:
            if att.filename == filename:
                return att
        names = [a.filename for a in self.attachments]
        raise LookupError(f"no attachment named {filename!r} in {self.describe()}; attachments: {names}")

    @cached_property
    def _searched_texts(self) -> tuple[str, ...]:
        """What ``body_contains`` searches: every text part, HTML also as its visible text."""
        texts = []
        for part in self.parts:
            if part.is_text:
                texts.append(part.content)
                if part.content_type == "text/html":
                    texts.append(HtmlReading(part.content).text())
            elif part.content_type in _TEXTUAL:
                texts.append(decode_bytes(part.data, None, default="utf-8")[0].replace("\r\n", "\n"))
        return tuple(texts)

    def body_contains(self, needle: Union[str, Pattern[str]]) -> bool:
        """Whether any text part (text/* and a bounce's delivery status; HTML also as visible text)
        contains ``needle`` (a pattern: has a match). An attached mail (message/rfc822) is not searched."""
        if isinstance(needle, re.Pattern):
            return any(needle.search(h) for h in self._searched_texts)
        return any(needle in h for h in self._searched_texts)

    # -- links and codes ---------------------------------------------------------------------

    @cached_property
    def links(self) -> list[Link]:
        """Links from HTML hrefs (with anchor text) and from URLs in the text body, deduplicated."""
        found: list[Link] = []
        seen: set[str] = set()
        for url, text in self._html_reading.links if self._html_reading else ():
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

    # -- deliverability checks --------------------------------------------------------------

    @cached_property
    def checks(self):
        """The deliverability checks of this email (``mailproof.checks.Checks``): ``dkim()``,
        ``unsubscribe()``, ``structure()``, ``spam()``, ``clients()``, ``all()``."""
        from mailproof.checks.runner import Checks  # their libraries load only when a check runs

        return Checks(self)

    def describe(self) -> str:
        rcpts = ", ".join(map(str, self.rcpt_tos)) or ", ".join(self.to) or "?"
        return f"mail #{self.seq} to {rcpts} subject {self.subject!r}"

    def __repr__(self) -> str:
        return f"<Message #{self.seq} from={self.mail_from!r} to={list(self.rcpt_tos)} subject={self.subject!r} {self.size} B>"


class _Reading:
    """A message's parts, read once from one parsed tree."""

    def __init__(self, root: Entity, linesep: str) -> None:
        self.tree = Tree(root)
        self.parts: list[Part] = []
        self.notes: dict[int, list[str]] = {}
        for index, entity in enumerate(self.tree.leaves):
            part, notes = read_part(index, entity, linesep, self.tree.type_of(entity))
            self.parts.append(part)
            self.notes[id(entity)] = notes
        # Which parts are the text and the HTML body: as the email package's get_body picks them.
        self.bodies = {kind: self.tree.body(kind) for kind in ("plain", "html")}
