"""A captured message's MIME structure, read in bounded time and without raising.

``parse`` builds the email package's tree with the compat32 policy, whose header values stay raw
strings: the default policy parses every structured header each time it is read (a 10,000-part
message took 4.3 s to parse that way, 0.27 s this way). Header values are decoded for display by
``mailproof.message_text``; parameters, filenames and charsets are read here, each behind its
own guard. The limits below bound the work a hostile message can cause; reaching one is a defect.
"""

from __future__ import annotations

import base64
import binascii
import io
import quopri
import re
import sys
import types
from dataclasses import dataclass, field
from email import errors
from email import feedparser as _feedparser
from email import message as email_message
from email import utils as email_utils
from email.feedparser import FeedParser
from email.generator import BytesGenerator
from email.policy import compat32
from typing import Optional, Union

from mailproof.message_text import decode_bytes, decode_words

MAX_PARTS = 1_000       # leaf parts read; the rest of a bigger message is left out, with a defect
MAX_DEPTH = 64          # multipart / message nesting parsed; deeper entities are kept unparsed
MAX_PARAMETERS = 100    # parameters read of a Content-Type or Content-Disposition

_PARAMETERIZED = ("content-type", "content-disposition")
_TRANSFER_ENCODINGS = {"", "7bit", "8bit", "binary", "base64", "quoted-printable",
                       "x-uuencode", "uuencode", "uue", "x-uue"}
_BAD_QP = re.compile(rb"=(?![0-9A-Fa-f]{2}|[ \t]*(?:\r\n|\n|\r|\Z))")
_GENERATOR_POLICIES = {"\r\n": compat32.clone(linesep="\r\n"), "\n": compat32}

_DESCRIPTIONS = {
    "NoBoundaryInMultipartDefect": "multipart without a boundary parameter: its body is read as one part",
    "StartBoundaryNotFoundDefect": "the multipart boundary never appears: its body is read as one part",
    "CloseBoundaryNotFoundDefect": "the closing multipart boundary is missing",
    "FirstHeaderLineIsContinuationDefect": "the first header line is a continuation line",
    "MisplacedEnvelopeHeaderDefect": "a 'From ' envelope line among the headers",
    "MissingHeaderBodySeparatorDefect": "a line that is no header ends the headers (no empty line before the body)",
    "MultipartInvariantViolationDefect": "a multipart whose body is not split into parts",
    "InvalidMultipartContentTransferEncodingDefect": "a multipart with a transfer encoding other than 7bit, 8bit or binary",
}


class Note(errors.MessageDefect):
    """A defect found by mailproof (the email package's own defects are listed by their class)."""


@dataclass(frozen=True)
class Part:
    """One leaf MIME part: a body, an attachment, an attached message (message/*), ..."""

    index: int                          # position in Message.parts
    content_type: str                   # lower case, "type/subtype"
    content: Union[str, bytes] = field(repr=False)  # decoded: str for text/*, bytes otherwise
    data: bytes = field(repr=False)     # the transfer-decoded bytes (for text/*, still in its charset)
    filename: Optional[str] = None
    charset: Optional[str] = None       # as declared, lower case
    disposition: Optional[str] = None   # "attachment", "inline" or what the header says, lower case
    content_id: Optional[str] = None
    params: tuple[tuple[str, str], ...] = ()  # Content-Type parameters, names lower case

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_text(self) -> bool:
        return isinstance(self.content, str)

    def param(self, name: str, default: Optional[str] = None) -> Optional[str]:
        key = name.lower()
        return next((value for pname, value in self.params if pname == key), default)


class Entity(email_message.Message):
    """A parsed MIME entity that caps its parameters and knows when it is nested too deep."""

    too_deep = False

    def set_raw(self, name, value):  # called by the parser for every header line
        if name.lower() in _PARAMETERIZED and value.count(";") > MAX_PARAMETERS:
            cut = -1
            for _ in range(MAX_PARAMETERS + 1):
                cut = value.find(";", cut + 1)
            self.defects.append(Note(f"{name} has {value.count(';')} parameters; "
                                     f"only the first {MAX_PARAMETERS} are read"))
            value = value[:cut]
        super().set_raw(name, value)

    def get_content_type(self):
        # Seen by the parser: an entity nested too deep is parsed as an opaque leaf.
        return "application/octet-stream" if self.too_deep else super().get_content_type()


def declared_type(entity) -> str:
    try:
        return email_message.Message.get_content_type(entity)
    except Exception:
        return "application/octet-stream"


class _BoundaryMatcher:
    """A multipart's boundary line, matched as CPython 3.13's feedparser does (``boundarymatch``):
    a prefix test, then one precompiled pattern for the rest of the line. Before 3.13 the parser
    compiles a regex per boundary, and every message has a boundary of its own, so each parse paid
    a regex compilation (some 40 % of reading a two-part message): docs/performance.md."""

    __slots__ = ("separator",)
    _END = re.compile(r"(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$")

    def __init__(self, separator: str) -> None:
        self.separator = separator

    def match(self, line: str):
        if not line.startswith(self.separator):
            return None
        return self._END.match(line, len(self.separator))


class _BoundaryRe:
    """``re`` as the pre-3.13 ``FeedParser._parsegen`` sees it: its one per-message pattern,
    ``'(?P<sep>' + re.escape(separator) + SUFFIX``, becomes a ``_BoundaryMatcher`` (``escape``
    is the identity so the separator arrives as it is); any other pattern is ``re.compile``'s."""

    PREFIX = "(?P<sep>"
    SUFFIX = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"

    @staticmethod
    def escape(text: str) -> str:
        return text

    @classmethod
    def compile(cls, pattern: str, flags: int = 0):
        if not flags and pattern.startswith(cls.PREFIX) and pattern.endswith(cls.SUFFIX):
            return _BoundaryMatcher(pattern[len(cls.PREFIX):-len(cls.SUFFIX)])
        return re.compile(pattern, flags)


def _parsegen_matching_boundaries():
    """The stdlib's own ``_parsegen`` code, its ``re`` global a ``_BoundaryRe`` (3.11 and 3.12)."""
    stock = FeedParser._parsegen
    if sys.version_info >= (3, 13) or "re" not in stock.__code__.co_names:
        return stock
    scope = dict(_feedparser.__dict__, re=_BoundaryRe)
    return types.FunctionType(stock.__code__, scope, stock.__name__, stock.__defaults__, stock.__closure__)


class _FeedParser(FeedParser):
    _parsegen = _parsegen_matching_boundaries()

    def _new_message(self):
        super()._new_message()
        if len(self._msgstack) > MAX_DEPTH:
            self._cur.too_deep = True


def parse(raw: bytes, headersonly: bool = False) -> Entity:
    """The MIME tree of ``raw`` (headers only if asked); never raises."""
    text = raw.decode("ascii", "surrogateescape")
    try:
        return _parse(text, headersonly)
    except Exception as exc:  # RecursionError and whatever a future parser may raise
        problem = f"the MIME structure could not be parsed ({type(exc).__name__}); only the headers are read"
    try:
        root = _parse(text, True)
    except Exception:
        root = Entity()
    root.defects.append(Note(problem))
    return root


def _parse(text: str, headersonly: bool) -> Entity:
    parser = _FeedParser(Entity, policy=compat32)
    if headersonly:
        parser._set_headersonly()
    parser.feed(text)
    return parser.close()


class Tree:
    """The walked structure: leaves (up to MAX_PARTS) and containers, in document order."""

    def __init__(self, root: Entity) -> None:
        self.root = root
        self.leaves: list = []
        self.order: list = []  # every walked entity, containers and leaves, in document order
        self.spans: dict[int, tuple[int, int]] = {}  # id(container) -> leaf indexes it holds [a, b)
        self.walked: set[int] = set()
        self.notes: list[str] = []
        self._types: dict[int, str] = {}  # id(entity) -> declared_type, read once per entity
        self._walk()

    def type_of(self, entity) -> str:
        """``declared_type(entity)``, remembered (the walk, both body searches and every part read ask)."""
        found = self._types.get(id(entity))
        if found is None:
            found = self._types[id(entity)] = declared_type(entity)
        return found

    def _walk(self) -> None:
        stack: list = [self.root]
        starts: dict[int, int] = {}  # id(container) -> index of its first leaf
        while stack:
            entity = stack.pop()
            if isinstance(entity, tuple):  # the end marker of a container
                self.spans[id(entity[1])] = (entity[0], len(self.leaves))
                continue
            payload = entity._payload
            container = isinstance(payload, list) and self.type_of(entity).startswith("multipart/")
            if len(self.order) >= 4 * MAX_PARTS or (not container and len(self.leaves) >= MAX_PARTS):
                self.notes.append(f"the message has more than {MAX_PARTS} parts; only the first "
                                  f"{len(self.leaves)} are read")
                break
            self.order.append(entity)
            self.walked.add(id(entity))
            if container:
                stack.append((len(self.leaves), entity))
                starts[id(entity)] = len(self.leaves)
                stack.extend(reversed([p for p in payload if isinstance(p, email_message.Message)]))
            else:
                self.leaves.append(entity)
        self.index = {id(leaf): i for i, leaf in enumerate(self.leaves)}
        for key, first in starts.items():  # containers left open by the cap end where reading stopped
            self.spans.setdefault(key, (first, len(self.leaves)))

    def body(self, kind: str) -> Optional[int]:
        """Index of the leaf the email package's ``get_body(preferencelist=(kind,))`` picks."""
        found = self._find_body(self.root, kind, 0)
        return None if found is None else self.index.get(id(found))

    def _find_body(self, entity, kind: str, depth: int):
        if id(entity) not in self.walked or depth > MAX_DEPTH + 1 or disposition(entity) == "attachment":
            return None
        maintype, subtype = self.type_of(entity).split("/", 1)
        if maintype == "text":
            return entity if subtype == kind else None
        payload = entity._payload
        if maintype != "multipart" or not isinstance(payload, list):
            return None
        if subtype != "related":
            for sub in payload:
                found = self._find_body(sub, kind, depth + 1)
                if found is not None:
                    return found
            return None
        start = param(entity, "start")
        candidate = None
        if start:
            candidate = next((sub for sub in payload if _header(sub, "content-id") == start.strip()), None)
        if candidate is None and payload:
            candidate = payload[0]
        return None if candidate is None else self._find_body(candidate, kind, depth + 1)

    def label(self, entity) -> str:
        ctype = self.type_of(entity)
        if id(entity) in self.spans:
            if entity is self.root:
                return f"message ({ctype})"
            first, end = self.spans[id(entity)]
            held = ("no parts" if end <= first else f"part {first}" if end == first + 1
                    else f"parts {first}-{end - 1}")
            return f"{ctype} holding {held}"
        return f"part {self.index.get(id(entity))} ({ctype})"


# -- reading one entity ----------------------------------------------------------------------------


def _header(entity, name: str) -> Optional[str]:
    try:
        value = entity.get(name)
    except Exception:
        return None
    if value is None:
        return None
    try:
        text = str(value)
    except Exception:
        return None
    return " ".join(text.split())


def disposition(entity) -> Optional[str]:
    value = _header(entity, "content-disposition")
    if value is None:
        return None
    return value.partition(";")[0].strip().lower() or None


def _collapse(value, notes: list) -> str:
    """A parameter value: RFC 2231 decoded (charset'lang'%XX) or unquoted; RFC 2047 words decoded."""
    if isinstance(value, tuple) and len(value) == 3:
        charset, _lang, text = value
        try:
            raw = text.encode("raw-unicode-escape")
        except Exception:
            raw = str(text).encode("utf-8", "replace")
        text, problem = decode_bytes(raw, charset or None)
        if problem:
            notes.append(f"parameter value: {problem}")
    else:
        text = email_utils.unquote(str(value))
    return decode_words(text) if "=?" in text else text


def param(entity, name: str, header: str = "content-type", notes: Optional[list] = None) -> Optional[str]:
    try:
        value = entity.get_param(name, None, header)
    except Exception:
        return None
    if value is None:
        return None
    return _collapse(value, [] if notes is None else notes)


def _all_params(entity, header: str = "content-type") -> Optional[list]:
    """``entity.get_params(None, header)``: the header's parameters, the first being the value
    itself; None when it is missing or cannot be read (where ``param`` finds nothing)."""
    try:
        return entity.get_params(None, header)
    except Exception:
        return None


def _param_of(found: Optional[list], name: str, notes: list) -> Optional[str]:
    """``param`` on parameters ``_all_params`` read once: the first named ``name``, as get_param."""
    key = name.lower()
    for pname, value in found or ():
        if pname.lower() == key:
            return _collapse(value, notes)
    return None


def _params(found: Optional[list], notes: list) -> tuple[tuple[str, str], ...]:
    """Content-Type parameters (``_all_params``), names lower case, values decoded."""
    out = []
    for name, value in (found or [])[1:]:  # the first is the type itself
        try:
            out.append((str(name).strip().lower(), _collapse(value, notes).strip()))
        except Exception:
            continue
    return tuple(out)


def _transfer_decoded(entity, notes: list) -> bytes:
    payload = entity._payload
    if not isinstance(payload, str):
        payload = "" if payload is None else str(payload)
    try:
        data = payload.encode("ascii", "surrogateescape")
    except UnicodeError:  # only a tree built in code holds such text; the parser's is ASCII
        data = payload.encode("utf-8", "surrogateescape")
    cte = (_header(entity, "content-transfer-encoding") or "").lower()
    if cte not in _TRANSFER_ENCODINGS:
        notes.append(f"unknown Content-Transfer-Encoding {cte[:40]!r}: content kept as it is")
        return data
    if cte == "quoted-printable":
        if _BAD_QP.search(data):
            notes.append("quoted-printable with invalid escapes: kept as they are")
        return quopri.decodestring(data)
    if cte == "base64":
        return _base64(b"".join(data.splitlines()), notes)
    if cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        try:
            return _uudecode(data)
        except Exception:
            notes.append("uuencoded content that does not decode: kept as it is")
    return data


def _base64(data: bytes, notes: list) -> bytes:
    """As the email package decodes base64 bodies, with its defects told in words."""
    missing = -len(data) % 4
    try:
        decoded = base64.b64decode(data + b"=" * missing, validate=True)
        if missing:
            notes.append("base64 with missing padding")
        return decoded
    except (binascii.Error, ValueError):
        pass
    for suffix in (b"", b"=="):
        try:
            decoded = base64.b64decode(data + suffix, validate=False)
        except (binascii.Error, ValueError):
            continue
        notes.append("base64 with characters outside its alphabet (skipped)")
        return decoded
    notes.append("base64 of impossible length: content kept undecoded")
    return data


def _uudecode(data: bytes) -> bytes:
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin "):
            mode = line[6:].partition(b" ")[0]
            if mode and all(48 <= c <= 55 for c in mode):
                break
    else:
        raise ValueError("no begin line")
    out = []
    for line in lines:
        if line.strip(b" \t\r\n\f") == b"end":
            break
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            out.append(binascii.a2b_uu(line[:(((line[0] - 32) & 63) * 4 + 5) // 3]))
    return b"".join(out)


def _message_bytes(entity, linesep: str) -> bytes:
    """The body of a message/* entity (an attached mail, delivery-status fields) as bytes again."""
    chunks = []
    for sub in entity._payload:
        buffer = io.BytesIO()
        BytesGenerator(buffer, mangle_from_=False, policy=_GENERATOR_POLICIES[linesep]).flatten(sub, unixfrom=False)
        chunks.append(buffer.getvalue())
    if declared_type(entity) == "message/delivery-status":  # blocks of fields, one empty line apart
        nl = linesep.encode()
        return nl.join(c[:-len(nl)] if c.endswith(nl + nl) else c for c in chunks)
    return b"".join(chunks)


def read_part(index: int, entity, linesep: str = "\r\n", ctype: Optional[str] = None) -> tuple[Part, list[str]]:
    """The part at leaf ``index`` and what went wrong reading it.

    ``linesep`` is the message's line ending, for the bytes of an attached message; ``ctype`` its
    ``declared_type`` when already known.
    """
    notes: list[str] = []
    if ctype is None:
        ctype = declared_type(entity)
    try:
        if entity.too_deep:
            notes.append(f"nested more than {MAX_DEPTH} levels deep: kept unparsed")
            data = str(entity._payload or "").encode("ascii", "surrogateescape")
        elif isinstance(entity._payload, list):
            data = _message_bytes(entity, linesep)
        else:
            data = _transfer_decoded(entity, notes)
    except Exception as exc:
        notes.append(f"content could not be read ({type(exc).__name__}): left empty")
        data = b""
    content_params = _all_params(entity)  # read once: charset, name and params come from it
    charset = _param_of(content_params, "charset", notes)
    if charset is not None:
        charset = charset.strip().lower() or None
    if ctype.startswith("text/"):
        content, problem = decode_bytes(data, charset)
        if problem:
            notes.append(problem)
        content = content.replace("\r\n", "\n")
    else:
        content = data
    filename = param(entity, "filename", "content-disposition", notes)
    if filename is None:
        filename = _param_of(content_params, "name", notes)
    part = Part(index=index, content_type=ctype, content=content, data=data,
                filename=filename.strip() if filename is not None else None, charset=charset,
                disposition=disposition(entity), content_id=_header(entity, "content-id"),
                params=_params(content_params, notes))
    return part, notes


def describe_defect(defect) -> str:
    if isinstance(defect, Note):
        return str(defect)
    name = type(defect).__name__
    detail = _DESCRIPTIONS.get(name)
    if detail is None:
        text = str(defect)
        detail = f"{name}: {text}" if text else name
    return detail
