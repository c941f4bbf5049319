"""The JSON the HTTP API answers with, made from retained records.

Nothing here parses or matches mail itself: the parsed fields are ``Message`` attributes, and
near-miss reasons are ``Criteria.mismatches``, exactly what a Mailbox wait reports.
"""

from __future__ import annotations

import base64
import json

from mailproof.capture.service.store import (AT, AUTH_USER, DATA, FROM, HELO, MAIL_OPTIONS, PEER, RCPTS,
                                             SEQ, SMTPUTF8, TLS, Record, Waiter, message_of)
from mailproof.criteria import Criteria
from mailproof.message import Message

NEAR_MISSES_SHOWN = 10


def summary(msg: Message) -> dict:
    """What a listing shows of one message (the subject is the only header it parses)."""
    return {"seq": msg.seq, "mail_from": msg.mail_from, "rcpt_tos": list(msg.rcpt_tos),
            "received_at": msg.received_at, "size": msg.size, "subject": msg.subject}


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


def stream_line(rec: Record) -> bytes:
    """One NDJSON line of ``/stream``: the envelope, the SMTP session's ``tls`` and ``auth_user``,
    and the raw bytes, nothing parsed."""
    return (json.dumps({"seq": rec[SEQ], "mail_from": rec[FROM], "rcpt_tos": list(rec[RCPTS]),
                        "received_at": rec[AT], "tls": rec[TLS], "auth_user": rec[AUTH_USER],
                        "raw": base64.b64encode(rec[DATA]).decode("ascii")}, separators=(",", ":"))
            + "\n").encode("ascii")


def near_misses(waiter: Waiter, retained: list[Record], timeout: float) -> dict:
    """The 408 answer of a ``/wait`` that timed out: what it found, and the mail it did not take.

    ``retained`` is the mail since the waiter's ``since``. The near misses shown are the latest
    mail to the same recipient first, then the latest other mail, each with ``why``: its
    ``Criteria.mismatches``.
    """
    criteria = waiter.criteria
    taken = {m.seq for m in waiter.found}
    others = [message_of(rec) for rec in retained if rec[SEQ] not in taken]
    same: list[Message] = []
    if criteria.to:
        same_recipient = Criteria(to=criteria.to)
        same = [m for m in others if same_recipient.matches(m)]
    same_seqs = {m.seq for m in same}
    rest = [m for m in reversed(others) if m.seq not in same_seqs][:NEAR_MISSES_SHOWN]
    shown = (same[-NEAR_MISSES_SHOWN:] + rest)[:NEAR_MISSES_SHOWN]
    wanted = "at all" if criteria == Criteria() else criteria.describe()
    have = f"only {len(waiter.found)} of {waiter.count} mails" if waiter.found else "no mail"
    return {
        "error": f"{have} {wanted} within {timeout:g} s; {len(others)} other mail(s) since seq {waiter.since}",
        "found": [summary(m) for m in waiter.found],
        "near_misses": [{**summary(m), "why": criteria.mismatches(m)} for m in shown],
        "other_count": len(others),
    }
