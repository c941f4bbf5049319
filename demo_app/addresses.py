"""Strict parsing of the email addresses users type in.

Stricter than RFC 5322 on purpose (no display names, comments or quoted local parts: nobody types
those into a signup form), but open to SMTPUTF8: non-ASCII local parts and domains are allowed.
"""

from __future__ import annotations

import unicodedata
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.utils import parseaddr

# RFC 5322 atext: what an unquoted local-part atom may hold (plus any non-ASCII, RFC 6531).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


class InvalidAddress(ValueError):
    """The message is the reason, fit to show to the user."""


def _is_control_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("C")


def parse(raw: object) -> str:
    """Return the normalised address (domain lowercased) or raise InvalidAddress."""
    if not isinstance(raw, str) or not raw:
        raise InvalidAddress("an address is required")
    if len(raw) > 254:
        raise InvalidAddress("too long")
    if any(_is_control_or_space(ch) for ch in raw):
        raise InvalidAddress("contains spaces or control characters")
    if raw.count("@") != 1:
        raise InvalidAddress("must contain exactly one @")
    local, domain = raw.split("@")
    if not local:
        raise InvalidAddress("missing the part before @")
    if len(local) > 64:
        raise InvalidAddress("the part before @ is too long")
    for atom in local.split("."):
        if not atom:
            raise InvalidAddress("misplaced dot before @")
        if any(c not in _ATEXT and c.isascii() for c in atom):
            raise InvalidAddress("invalid character before @")
    if not domain:
        raise InvalidAddress("missing domain")
    if "." not in domain:
        raise InvalidAddress("domain must contain a dot")
    for label in domain.split("."):
        if not label or len(label) > 63:
            raise InvalidAddress("malformed domain")
        if label.startswith("-") or label.endswith("-") or not all(c.isalnum() or c == "-" for c in label):
            raise InvalidAddress("malformed domain")
    try:
        domain.encode("idna")  # rejects labels IDNA cannot represent
    except UnicodeError:
        raise InvalidAddress("malformed domain") from None
    if local.isascii():
        # Second opinion from the stdlib parsers; they reject non-ASCII local parts, so skip those.
        try:
            parsed = Address(addr_spec=raw)
        except (HeaderParseError, ValueError, IndexError) as exc:
            raise InvalidAddress("not a valid address") from exc
        if parseaddr(raw) != ("", raw) or parsed.addr_spec != raw:
            raise InvalidAddress("not a valid address")
    return f"{local}@{domain.lower()}"
