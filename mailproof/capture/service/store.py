"""The capture store: retained raw mail in seq order, and the waiters and streams that want it.

It keeps bytes and the envelope, never a parsed message: a ``Message`` is built from a record
when somebody asks (``message_of``), and a ``Criteria`` decides what a waiter takes. Everything
runs on the service's one event loop, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Optional

from mailproof.capture.service import ServiceError
from mailproof.capture.smtp_sink import CapturedMail
from mailproof.criteria import Criteria
from mailproof.message import Message

log = logging.getLogger("mailproof.sink_service")

DEFAULT_MAX_MESSAGES = 200_000

# A retained message is a plain tuple in CapturedMail's field order, not a CapturedMail: the
# garbage collector untracks tuples of atomic values, so 200,000 retained messages add nothing
# to its full collections (dataclass instances would be scanned on every one of them).
Record = tuple
SEQ, FROM, RCPTS, DATA, AT, PEER, HELO, SMTPUTF8, TLS, AUTH_USER, MAIL_OPTIONS = range(11)


def message_of(rec: Record) -> Message:
    """The record as a ``Message``: cheap to build, it parses only what is then asked of it."""
    return Message(rec[DATA], mail_from=rec[FROM], rcpt_tos=rec[RCPTS], received_at=rec[AT],
                   seq=rec[SEQ], source="sink-service")


class Waiter:
    """One ``/wait`` long-poll: what it waits for, how many, after which seq, and its future."""

    __slots__ = ("criteria", "count", "since", "found", "future")

    def __init__(self, criteria: Criteria, count: int, since: int) -> None:
        self.criteria = criteria
        self.count = count
        self.since = since
        self.found: list[Message] = []
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def offer(self, msg: Message) -> bool:
        """Take ``msg`` if it matches; True once the waiter has all it waits for."""
        if msg.seq <= self.since or self.future.done() or not self.criteria.matches(msg):
            return False
        self.found.append(msg)
        if len(self.found) >= self.count:
            self.future.set_result(None)
            return True
        return False


class Stream:
    """One ``/stream`` subscriber: the arrivals it has not written yet, and how it should end."""

    __slots__ = ("pending", "event", "overflowed", "closing", "drop", "transport")

    def __init__(self, transport) -> None:
        self.pending: list[Record] = []
        self.event = asyncio.Event()
        self.overflowed = False
        self.closing = False
        self.drop = False
        self.transport = transport


class CaptureStore:
    """Retained raw messages in seq order, plus the long-poll waiters and stream subscribers.

    ``add`` is the sink's ``on_message``: it runs inside the DATA handler, before the 250 reply.
    """

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        if max_messages < 1:
            raise ServiceError("--max-messages must be at least 1")
        self.max_messages = max_messages
        self.messages: deque[Record] = deque()
        self.received = 0
        self.bytes = 0
        self.retained_bytes = 0
        self.evicted = 0
        self.cleared = 0
        self.last_seq = 0
        self.waiters_by_rcpt: dict[str, list[Waiter]] = {}
        self.waiters_any: list[Waiter] = []
        self.streams: set[Stream] = set()

    # -- capture (hot path: keep it short) -------------------------------------------------------

    def add(self, msg: CapturedMail) -> None:
        rec = (msg.seq, msg.mail_from, msg.rcpt_tos, msg.data, msg.received_at, msg.peer, msg.helo,
               msg.smtputf8, msg.tls, msg.auth_user, msg.mail_options)
        self.messages.append(rec)
        size = len(msg.data)
        self.received += 1
        self.bytes += size
        self.retained_bytes += size
        self.last_seq = msg.seq
        if len(self.messages) > self.max_messages:
            old = self.messages.popleft()
            self.retained_bytes -= len(old[DATA])
            self.evicted += 1
            if self.evicted == 1:
                log.warning("retention limit of %d messages reached: evicting the oldest (counted in "
                            "/stats as 'evicted'); raise --max-messages to keep more", self.max_messages)
        if self.streams:
            for stream in self.streams:
                stream.pending.append(rec)
                if len(stream.pending) > self.max_messages:
                    stream.overflowed = True  # a stuck client: drop it, it reconnects with since=
                stream.event.set()
        if self.waiters_by_rcpt or self.waiters_any:
            self._offer(message_of(rec))

    def _offer(self, msg: Message) -> None:
        # One Message for every waiter: its headers are parsed once at most.
        for rcpt in msg.recipients:
            waiters = self.waiters_by_rcpt.get(rcpt)
            if waiters:
                waiters[:] = [w for w in waiters if not w.offer(msg)]
                if not waiters:
                    del self.waiters_by_rcpt[rcpt]
        if self.waiters_any:
            self.waiters_any[:] = [w for w in self.waiters_any if not w.offer(msg)]

    # -- reading ---------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self.messages[0][SEQ] if self.messages else self.last_seq + 1

    def get(self, seq: int) -> Optional[Record]:
        if not self.messages:
            return None
        index = seq - self.messages[0][SEQ]
        if 0 <= index < len(self.messages):
            rec = self.messages[index]
            if rec[SEQ] == seq:
                return rec
        return next((m for m in self.messages if m[SEQ] == seq), None)  # never expected: seqs are dense

    def since(self, seq: int) -> list[Record]:
        """Retained messages with seq > ``seq``, oldest first."""
        messages = self.messages
        if not messages or seq >= messages[-1][SEQ]:
            return []
        skip = max(0, seq - messages[0][SEQ] + 1)
        keep = len(messages) - skip
        if skip > keep:  # near the end: walk from the right (deque indexing is O(n))
            found = list(itertools.islice(reversed(messages), keep))
            found.reverse()
            return [m for m in found if m[SEQ] > seq]
        return [m for m in itertools.islice(messages, skip, None) if m[SEQ] > seq]

    def clear(self) -> int:
        count = len(self.messages)
        self.messages.clear()
        self.retained_bytes = 0
        self.cleared += count
        return count

    # -- waiters ---------------------------------------------------------------------------------

    def add_waiter(self, waiter: Waiter) -> None:
        """Offer ``waiter`` the retained mail after its ``since``, then, unless that was enough,
        every arrival (keyed by its recipient). No await in between: nothing slips past."""
        for rec in self.since(waiter.since):
            if waiter.offer(message_of(rec)):
                return
        rcpt = waiter.criteria.recipient
        if rcpt:
            self.waiters_by_rcpt.setdefault(rcpt, []).append(waiter)
        else:
            self.waiters_any.append(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        rcpt = waiter.criteria.recipient
        waiters = self.waiters_by_rcpt.get(rcpt) if rcpt else self.waiters_any
        if waiters and waiter in waiters:
            waiters.remove(waiter)
        if rcpt and rcpt in self.waiters_by_rcpt and not self.waiters_by_rcpt[rcpt]:
            del self.waiters_by_rcpt[rcpt]

    @property
    def waiters(self) -> list[Waiter]:
        return self.waiters_any + [w for ws in self.waiters_by_rcpt.values() for w in ws]

    @property
    def waiter_count(self) -> int:
        return len(self.waiters_any) + sum(len(w) for w in self.waiters_by_rcpt.values())

    # -- ending clients --------------------------------------------------------------------------

    def drop_streams(self) -> int:
        """End every stream abruptly (no terminating chunk): ``DELETE /streams``."""
        streams = list(self.streams)
        for stream in streams:
            stream.closing = stream.drop = True
            stream.event.set()
        return len(streams)

    def close_clients(self) -> None:
        """The service is stopping: end every stream cleanly and cancel every waiter."""
        for stream in list(self.streams):
            stream.closing = True
            stream.event.set()
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.cancel()
