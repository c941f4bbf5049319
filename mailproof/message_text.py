"""Text out of mail bytes, in bounded time and without raising: charsets, RFC 2047, header values.

Used by ``mailproof.message``. Every function here returns a best reading of its input; what it
had to guess is returned beside the text (a readable problem string), never raised.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import re
from email.headerregistry import AddressHeader, MessageIDHeader, UnstructuredHeader
from typing import Iterable, Optional

# A header is decoded for display by the email package's header registry (policy.default: address
# lists re-formatted, dates normalized, RFC 2047 decoded) when it is at most this long (structured
# headers: addresses, dates, MIME headers; their parsers cost 0.1 s for 2,000 hostile characters,
# and four times that for twice as many)...
HEADER_PARSE_MAX_CHARS = 4_000
STRUCTURED_HEADER_PARSE_MAX_CHARS = 1_000
# ... and while the message's budget lasts: the registry's parsers are quadratic on hostile input
# (an 88 KB Subject of broken encoded words takes 5.5 s), so a message gets this many characters
# of registry parsing, a structured header's weighing ten times as much. The budget is spent in
# header order, so which headers get the registry does not depend on which is asked for first.
# Every other header is decoded by ``decode_words``: the same text for unstructured headers (a
# property test holds it to that), the unfolded raw form for structured ones.
HEADER_PARSE_BUDGET = 100_000
_STRUCTURED_WEIGHT = 10

_POLICY = email.policy.default
_STRUCTURED = frozenset(name for name, cls in _POLICY.header_factory.registry.items()
                        if not issubclass(cls, UnstructuredHeader))

# Python codecs that are no mail charset: they transform text (IDNA lower-cases host labels) or
# fail on any error handler but strict. bytes.decode already refuses non-text codecs (base64...).
_NOT_MAIL_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape",
                                "undefined", "charmap"})

# Charset names seen in mail that Python's codec registry lacks (the WHATWG Encoding Standard's labels).
_CHARSET_ALIASES = {"iso-8859-8-i": "iso-8859-8", "iso-8859-8-e": "iso-8859-8", "iso-8859-6-i": "iso-8859-6",
                    "iso-8859-6-e": "iso-8859-6", "windows-874": "cp874", "x-sjis": "shift_jis",
                    "x-gbk": "gbk", "x-euc-jp": "euc_jp", "x-mac-roman": "mac-roman"}

# An RFC 2047 encoded word. Neither the charset nor the text may hold "?" or white space, so a
# match attempt stops at the next "?": finditer over any input is linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_LINE_BREAK = re.compile(r"\r|\n")

# Values the header registry would give back unchanged (or, for ``<addr>``, as the bare address),
# read without it: most of what applications send. The registry costs 40 us for a Subject and
# 170 us for a From, on every message a rehearsal reads; property tests hold these to the
# registry's own answer (tests/test_message_headers.py).
_PLAIN_TEXT = re.compile(r"[ !-~\t]*")  # printable ASCII, spaces and tabs: no encoded word asks decoding
_ADDR = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_ADDRESS = re.compile(rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) )?<(?P<angle>{_ADDR})>|(?P<bare>{_ADDR})")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ADDR}>")
_REGISTRY = _POLICY.header_factory.registry


def charset_codec(charset: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The Python codec for a MIME charset name, or None and why not."""
    name = (charset or "").strip().strip("\"'").strip().lower()
    if not name or len(name) > 64 or not name.isascii() or not name.isprintable():
        return None, f"charset {charset!r} is no charset name"
    try:
        info = codecs.lookup(_CHARSET_ALIASES.get(name, name))
    except Exception:  # LookupError; ValueError for a NUL
        return None, f"unknown charset {name!r}"
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_MAIL_CHARSETS:
        return None, f"charset {name!r} is no text charset"
    return info.name, None


def decode_bytes(data: bytes, charset: Optional[str], default: str = "us-ascii") -> tuple[str, Optional[str]]:
    """``data`` as text in ``charset`` (``default`` when None): the text, and what went wrong if anything.

    Bytes the charset cannot decode are replaced by U+FFFD; an unusable charset is read as UTF-8.
    """
    declared = charset if charset is not None and charset.strip() else None
    codec, problem = charset_codec(declared or default)
    if codec is not None:
        try:
            return data.decode(codec), None
        except UnicodeDecodeError:
            what = (f"bytes that are not valid {codec}" if declared
                    else f"8-bit bytes but no charset declared: read as {codec}, bytes that are not")
            try:
                return data.decode(codec, "replace"), f"{what} replaced by U+FFFD"
            except Exception as exc:  # a codec that honours no error handler
                problem = f"charset {codec!r} cannot decode it ({type(exc).__name__})"
        except Exception as exc:
            problem = f"charset {codec!r} cannot decode it ({type(exc).__name__})"
    text = data.decode("utf-8", "replace")
    return text, f"{problem}: read as UTF-8" + (", undecodable bytes replaced" if "\ufffd" in text else "")


def sanitize(text: str) -> str:
    """Raw 8-bit header bytes (kept as surrogate escapes by the parser) read as UTF-8, as the email package does."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _decode_word(charset: str, encoding: str, encoded: str) -> Optional[str]:
    charset = charset.partition("*")[0]  # RFC 2231 language suffix: utf-8*en
    try:
        raw = encoded.encode("ascii", "surrogateescape")
    except UnicodeError:
        return None
    if encoding in "bB":
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            return None
    else:
        data = _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw.replace(b"_", b" "))
    return decode_bytes(data, charset)[0]


def decode_words(value: str) -> str:
    """A header value unfolded and its RFC 2047 encoded words decoded, in linear time.

    White space between two adjacent encoded words is dropped (RFC 2047 6.2); a word that does
    not decode is kept as it is.
    """
    value = _LINE_BREAK.sub("", value)
    if "=?" not in value:
        return sanitize(value)
    out: list[str] = []
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos:match.start()]
        decoded = _decode_word(*match.groups())
        if decoded is None:
            out.append(between + match.group())
            after_word = False
        else:
            if not (after_word and not between.strip(" \t")):
                out.append(between)
            out.append(decoded)
            after_word = True
        pos = match.end()
    out.append(value[pos:])
    return sanitize("".join(out))


def header_plan(items: Iterable[tuple[str, str]]) -> list[bool]:
    """For each header in order: is it decoded by the email package's registry (True) or by ``decode_words``."""
    budget = HEADER_PARSE_BUDGET
    plan = []
    for name, value in items:
        size = len(value)
        structured = name.lower() in _STRUCTURED
        cost = size * (_STRUCTURED_WEIGHT if structured else 1)
        limit = STRUCTURED_HEADER_PARSE_MAX_CHARS if structured else HEADER_PARSE_MAX_CHARS
        use = size <= limit and cost <= budget
        if use:
            budget -= cost
        plan.append(use)
    return plan


def _plain_value(name: str, value: str) -> Optional[str]:
    """What the registry's ``str`` of this header is, for the plain values that need no parsing;
    None for any other (the registry reads those)."""
    kind = _REGISTRY.get(name.lower(), UnstructuredHeader)
    if issubclass(kind, UnstructuredHeader):
        return value if "=?" not in value and _PLAIN_TEXT.fullmatch(value) else None
    if issubclass(kind, AddressHeader):
        match = _PLAIN_ADDRESS.fullmatch(value)
        if match is None:
            return None
        return value if match["name"] or match["bare"] else match["angle"]
    if issubclass(kind, MessageIDHeader):
        return value if _PLAIN_MESSAGE_ID.fullmatch(value) else None
    return None


def display_header(name: str, value: str, registry: bool) -> str:
    """A header value as text: decoded, unfolded, on one line."""
    text = None
    if registry:
        plain = _plain_value(name, value)
        if plain is not None:
            return plain
        try:
            text = str(_POLICY.header_fetch_parse(name, value))
        except Exception:  # the registry's parsers raise on some hostile values (RecursionError...)
            text = None
    if text is None:
        text = decode_words(value)
    return " ".join(text.split()) if "\n" in text or "\r" in text else text
