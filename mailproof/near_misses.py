"""The text of a failed expectation: what did arrive, and why each near miss did not match.

A test that fails on missing mail is only useful if it says what came instead ("2 other mails
arrived: ...", each with why it did not match), so the Mailbox's MailNotDelivered and
UnexpectedMail messages are written here. Lists are capped: a busy store must not make a
failure unreadable.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mailproof.criteria import Criteria, recipients_of
from mailproof.message import Message
from mailproof.store import describe

__all__ = ["NEAR_MISSES_SHOWN", "explain_missing", "explain_extra"]

NEAR_MISSES_SHOWN = 10


def explain_missing(criteria: Criteria, count: int, found: Sequence[Message], within: float, timeout: float,
                    window_start: float, trigger: Optional[float], messages: Sequence[Message]) -> str:
    """Why a wait for ``count`` mails got only ``found``: those, then the other ``messages``
    (everything the Mailbox saw) that arrived since the window started, the same recipient's first."""
    lines = [
        f"no mail {criteria.describe()} within {within:g} s"
        if not found
        else f"only {len(found)} of {count} mails {criteria.describe()} within {within:g} s",
        f"(the SLO; waited {timeout:g} s in all, for late mail too)",
    ]
    for msg in found:
        latency = None if trigger is None or msg.received_at is None else msg.received_at - trigger
        when = "" if latency is None else f" {latency:.3f} s after the trigger"
        lines.append(f"arrived: {describe(msg)}{when}")
    if trigger is not None:
        window_start = min(window_start, trigger)
    found_seqs = {f.seq for f in found}
    arrived = [m for m in messages if (m.received_at or 0) >= window_start and m.seq not in found_seqs]
    if not arrived:
        lines.append(f"no other mail arrived in that window ({len(messages)} captured in this test).")
        return "\n".join(lines)
    same = [m for m in arrived if criteria.recipient and criteria.recipient in recipients_of(m)]
    others = [m for m in arrived if m not in same]
    lines.append(f"{len(arrived)} other mail(s) arrived in that window:")
    for msg in (same + others)[:NEAR_MISSES_SHOWN]:
        try:
            why = "; ".join(criteria.mismatches(msg)) or "already claimed by an earlier wait"
        except Exception as exc:
            why = f"could not be checked: {type(exc).__name__}: {exc}"
        lines.append(f"  - {describe(msg)} at +{(msg.received_at or 0) - window_start:.3f} s: {why}")
    if len(arrived) > NEAR_MISSES_SHOWN:
        lines.append(f"  ... and {len(arrived) - NEAR_MISSES_SHOWN} more")
    return "\n".join(lines)


def explain_extra(criteria: Criteria, count: int, extra: Sequence[Message], entered_at: float) -> str:
    """Why an ``expect`` of exactly ``count`` mails failed: the ``extra`` ones that matched too."""
    lines = [f"expected exactly {count} mail(s) {criteria.describe()}, but {count + len(extra)} "
             f"had arrived by the time the {count} expected had: {len(extra)} more:"]
    lines += [f"  - {describe(m)} at +{(m.received_at or 0) - entered_at:.3f} s"
              for m in extra[:NEAR_MISSES_SHOWN]]
    if len(extra) > NEAR_MISSES_SHOWN:
        lines.append(f"  ... and {len(extra) - NEAR_MISSES_SHOWN} more")
    return "\n".join(lines)
