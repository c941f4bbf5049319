"""What a fetched message says: its recipients, sender and hops, and the FETCH reply it came in.

A message read back from an inbox has no SMTP envelope, so the envelope is rebuilt from the
headers the delivering servers wrote:

- recipients (``recipients_for``): the first header kind that names the inbox, most precise
  first: X-Original-To (Postfix), the topmost Delivered-To (Dovecot LMTP writes it per copy),
  then To/Cc. Many test addresses share one inbox as plus-addresses, so the match is exact:
  ``qa+r1`` never takes mail for ``qa+r10``;
- sender (``_return_path``): Return-Path, written at final delivery from MAIL FROM;
- hops (``parse_hops``): the Received: chain, oldest first, for per-hop timings.

Also here: the parts of IMAP's wire format the watcher reads and writes (``_parse_fetch``,
``_fetch_dates``, ``_internaldate``) and the compact UID sets it sends (``_uid_set``).
"""

from __future__ import annotations

import email.parser
import email.policy
import imaplib
import re
import time
from email.utils import getaddresses, parsedate_to_datetime
from typing import Iterator, Optional

_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_INTERNALDATE = re.compile(rb'INTERNALDATE "([^"]+)"')
_RECEIVED_FROM = re.compile(r"\bfrom\s+(\S+)", re.IGNORECASE)
_RECEIVED_BY = re.compile(r"\bby\s+(\S+)", re.IGNORECASE)
_RECEIVED_WITH = re.compile(r"\bwith\s+(\S+)", re.IGNORECASE)
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def parse_headers(raw: bytes):
    """The header block of ``raw`` (compat32: header values as the servers wrote them)."""
    return _HEADER_PARSER.parsebytes(raw)


# -- message headers ------------------------------------------------------------------------------


def parse_hops(headers) -> list[dict]:
    """The Received: chain, oldest hop first: ``{"from", "by", "with", "at"}`` (``at`` is epoch
    seconds, None when the date is missing or broken; Postfix and Dovecot write whole seconds)."""
    hops = []
    for value in reversed(headers.get_all("Received") or []):
        text = " ".join(str(value).split())
        head, _, date = text.rpartition(";")
        at = None
        if date.strip():
            try:
                at = parsedate_to_datetime(date.strip()).timestamp()
            except (TypeError, ValueError, IndexError):
                at = None
        head = head or text
        hop = {}
        for key, regex in (("from", _RECEIVED_FROM), ("by", _RECEIVED_BY), ("with", _RECEIVED_WITH)):
            found = regex.search(head)
            hop[key] = found.group(1) if found else None
        hop["at"] = at
        hops.append(hop)
    return hops


def recipients_for(headers, local: str, domain: str) -> list[str]:
    """The recipients of this copy that belong to the inbox ``local@domain`` (plus-addresses).

    Taken from the first header kind that names one, most precise first: X-Original-To (Postfix
    local/virtual delivery), the topmost Delivered-To (Dovecot LMTP writes it per copy), then
    To/Cc (providers that add neither). The address match is exact, so ``qa+r1`` never takes
    mail for ``qa+r10``.
    """
    local, domain = local.lower(), domain.lower()

    def ours(address: str) -> bool:
        addr_local, _, addr_domain = address.lower().rpartition("@")
        return addr_domain == domain and (addr_local == local or addr_local.startswith(local + "+"))

    for names, top_only in ((("X-Original-To",), True), (("Delivered-To",), True), (("To", "Cc"), False)):
        values: list[str] = []
        for name in names:
            found = headers.get_all(name) or []
            values.extend(found[:1] if top_only else found)
        addresses = [addr.strip().lower() for _, addr in getaddresses([str(v) for v in values]) if addr]
        matching = [a for a in addresses if ours(a)]
        if matching:
            return list(dict.fromkeys(matching))
    return []


def _return_path(headers) -> str:
    value = headers.get("Return-Path")
    if not value:
        return ""
    found = getaddresses([str(value)])
    return found[0][1] if found and found[0][1] else ""


# -- the IMAP wire format -------------------------------------------------------------------------


def _uid_set(uids) -> str:
    """Compact IMAP sequence set: 1:3,7,9:10."""
    ordered = sorted(set(uids))
    parts = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


def _internaldate(text: bytes) -> Optional[float]:
    try:
        parsed = imaplib.Internaldate2tuple(b'INTERNALDATE "' + text + b'"')
    except (ValueError, OverflowError):
        return None
    return time.mktime(parsed) if parsed else None


def _parse_fetch(data) -> Iterator[tuple[int, Optional[float], bytes]]:
    """``(uid, internaldate, raw)`` for each message of a ``(UID INTERNALDATE BODY.PEEK[])`` reply."""
    for item in data or []:
        if not isinstance(item, tuple) or len(item) < 2:
            continue  # closing b')' or an unsolicited FLAGS update
        head, raw = item[0], item[1]
        uid = _FETCH_UID.search(head)
        if not uid or not isinstance(raw, bytes):
            continue
        date = _FETCH_INTERNALDATE.search(head)
        yield int(uid.group(1)), (_internaldate(date.group(1)) if date else None), raw


def _fetch_dates(data) -> list[tuple[int, Optional[float]]]:
    """``(uid, internaldate)`` for each message of a ``(UID INTERNALDATE)`` reply."""
    entries = []
    for item in data:
        line = item[0] if isinstance(item, tuple) else item
        uid = _FETCH_UID.search(line) if isinstance(line, bytes) else None
        if uid:
            date = _FETCH_INTERNALDATE.search(line)
            entries.append((int(uid.group(1)), _internaldate(date.group(1)) if date else None))
    return entries
