"""The JSON the HTTP API answers with, made from retained records.

Nothing here parses or matches mail itself: the parsed fields are ``Message`` attributes, and
near-miss reasons are ``Criteria.mismatches``, exactly what a Mailbox wait reports.
"""

from __future__ import annotations

import base64
import json

from typing import TYPE_CHECKING, Optional

from mailproof.capture.service.store import (AT, AUTH_USER, DATA, FROM, HELO, MAIL_OPTIONS, PEER, RCPTS,
                                             SEQ, SMTPUTF8, TLS, Record, Waiter, _rcpt_keys, message_of,
                                             prepared)
from mailproof.criteria import Criteria
from mailproof.message import Message

if TYPE_CHECKING:
    from mailproof.capture.service.store import CaptureStore

NEAR_MISSES_SHOWN = 10


def summary(msg: Message) -> dict:
    """What a listing shows of one message (the subject is the only header it parses)."""
    return {"seq": msg.seq, "mail_from": msg.mail_from, "rcpt_tos": list(msg.rcpt_tos),
            "received_at": msg.received_at, "size": msg.size, "subject": msg.subject}


def record_summary(rec: Record, subject: str) -> dict:
    """``summary`` made from the record and its (remembered) Subject, without a ``Message``."""
    return {"seq": rec[SEQ], "mail_from": rec[FROM], "rcpt_tos": list(rec[RCPTS]),
            "received_at": rec[AT], "size": len(rec[DATA]), "subject": subject}


def parsed_view_json(rec: Record) -> str:
    """``parsed_view`` as JSON text: what a worker thread makes for ``GET /messages/{seq}``."""
    return json.dumps(parsed_view(rec))


def parsed_view(rec: Record) -> dict:
    """The whole message, parsed now (never at capture), with its SMTP session."""
    msg = message_of(rec)
    msg.parsed  # the body is wanted too: parse it all at once, the headers then come from this parse
    return {
        **summary(msg),
        "from": msg.from_, "to": msg.to, "cc": msg.cc,
        "message_id": msg.message_id, "date": msg.header("Date"),
        "headers": [[name, value] for name, value in msg.headers],
        "text": msg.text, "html": msg.html,
        "attachments": [{"filename": a.filename, "content_type": a.content_type, "size": a.size,
                         "inline": a.inline, "content_id": a.content_id} for a in msg.attachments],
        "defects": msg.defects,
        "helo": rec[HELO], "peer": list(rec[PEER]) if rec[PEER] else None,
        "smtputf8": rec[SMTPUTF8], "tls": rec[TLS], "auth_user": rec[AUTH_USER],
        "mail_options": list(rec[MAIL_OPTIONS]),
    }


def stream_line(rec: Record, first: Optional[int] = None) -> bytes:
    """One NDJSON line of ``/stream``: the envelope, the SMTP session's ``tls`` and ``auth_user``,
    and the raw bytes, nothing parsed. On a filtered stream (``run=``), ``from``: the first seq
    this line accounts for (seqs from there to ``seq`` - 1 were other runs' mail)."""
    event = {"seq": rec[SEQ], "mail_from": rec[FROM], "rcpt_tos": list(rec[RCPTS]),
             "received_at": rec[AT], "tls": rec[TLS], "auth_user": rec[AUTH_USER],
             "raw": base64.b64encode(rec[DATA]).decode("ascii")}
    if first is not None:
        event["from"] = first
    return (json.dumps(event, separators=(",", ":")) + "\n").encode("ascii")


async def near_misses(waiter: Waiter, store: "CaptureStore", timeout: float) -> dict:
    """The 408 answer of a ``/wait`` that timed out: what it found, and the mail it did not take.

    The near misses shown are the latest mail since the waiter's ``since`` to the same recipient
    first (through the store's recipient index), then the latest other mail, each with ``why``:
    its ``Criteria.mismatches``. It also says how many messages after ``since`` were evicted
    (``evicted_since``): "no mail" is never said of mail the service may have thrown away.
    Only the few messages shown are parsed, never every retained one.
    """
    criteria, since = waiter.criteria, waiter.since
    taken = {m.seq for m in waiter.found}
    other_count = store.count_after(since) - sum(1 for seq in taken if seq > since and store.get(seq) is not None)
    rcpt = criteria.recipient
    shown_seqs: list[int] = []
    if rcpt:
        shown_seqs = [seq for seq in store.seqs_to(rcpt, since) if seq not in taken][-NEAR_MISSES_SHOWN:]
    rest: list[int] = []
    if len(shown_seqs) < NEAR_MISSES_SHOWN:
        for rec in reversed(store.messages):  # no await here: skips only taken and same-recipient mail
            if rec[SEQ] <= since or len(shown_seqs) + len(rest) >= NEAR_MISSES_SHOWN:
                break
            if rec[SEQ] in taken or (rcpt and rcpt in _rcpt_keys(rec)):
                continue
            rest.append(rec[SEQ])
    records = [rec for rec in map(store.get, shown_seqs + rest) if rec is not None]
    shown = [await prepared(rec, lambda m: {**summary(m), "why": criteria.mismatches(m)}) for rec in records]
    evicted_since = store.evicted_after(since)
    wanted = "at all" if criteria == Criteria() else criteria.describe()
    have = f"only {len(waiter.found)} of {waiter.count} mails" if waiter.found else "no mail"
    if evicted_since:
        evictions = (f"{evicted_since} message(s) after seq {since} were evicted (retention limit "
                     f"{store.max_messages}): the mail may have been among them; raise --max-messages")
    else:
        evictions = f"none evicted after seq {since}"
    return {
        "error": f"{have} {wanted} within {timeout:g} s; {other_count} other mail(s) since seq {since}; {evictions}",
        "found": [summary(m) for m in waiter.found],
        "near_misses": shown,
        "other_count": other_count,
        "evicted_since": evicted_since, "evicted": store.evicted, "cleared": store.cleared,
    }
