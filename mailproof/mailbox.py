"""The Mailbox: the one API flows use to expect mail, whatever captured it.

``MailStore`` holds captured messages and the waiters; any backend (the in-process sink, the
sink service client, an IMAP watcher) feeds it with ``deliver``. A delivery wakes exactly the
waiters whose criteria it meets, from the delivering thread: nobody polls.

``Mailbox`` is a view on a store for one test or one flow run: it hands out addresses, records
trigger times for latency, only sees mail captured after it was opened, and never returns the
same message twice (each ``wait_for`` claims what it returns).

``Triggers`` is the one definition of an email's delivery latency: seconds from the latest
trigger at or before its capture. A wait stamps each message it returns with it
(``Message.triggered_at``, hence ``Message.latency``); the rehearsal ledger measures every
arrival with the same object's ``latency``, so both give the same number for the same message.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from typing import Callable, Iterable, Optional, Union

from mailproof.addresses import AddressBook
from mailproof.criteria import Criteria, Text, recipients_of
from mailproof.errors import MailLate, MailNotDelivered, UnexpectedMail
from mailproof.message import Message

NEAR_MISSES_SHOWN = 10


class Triggers:
    """Sorted trigger times (epoch seconds) of one test or flow run; what latency is measured from.

    Not locked: one flow run marks its own triggers, and readers copy them once it has finished.
    """

    __slots__ = ("_times",)

    def __init__(self, times: Iterable[float] = ()) -> None:
        self._times: list[float] = sorted(float(t) for t in times)

    def add(self, at: float) -> None:
        bisect.insort(self._times, float(at))

    def before(self, received_at: Optional[float]) -> Optional[float]:
        """The latest trigger at or before ``received_at`` (None: no trigger that early, or no time)."""
        if received_at is None or not self._times:
            return None
        index = bisect.bisect_right(self._times, received_at)
        return self._times[index - 1] if index else None

    def latency(self, received_at: Optional[float]) -> Optional[float]:
        """Seconds from ``before(received_at)`` to ``received_at``: exactly ``Message.latency``
        of a message captured then and stamped by ``stamp``."""
        trigger = self.before(received_at)
        return None if trigger is None or received_at is None else received_at - trigger

    def stamp(self, msg: Message) -> Optional[float]:
        """Set ``msg.triggered_at`` (so ``msg.latency`` is this latency) and return the latency."""
        msg.triggered_at = self.before(msg.received_at)
        return msg.latency

    @property
    def times(self) -> list[float]:
        return list(self._times)

    def __len__(self) -> int:
        return len(self._times)

    def __iter__(self):
        return iter(list(self._times))

    def __repr__(self) -> str:
        return f"Triggers({self._times!r})"


class _Waiter:
    __slots__ = ("criteria", "count", "exclude", "found", "event")

    def __init__(self, criteria: Criteria, count: int, exclude: set[int]) -> None:
        self.criteria = criteria
        self.count = count
        self.exclude = exclude
        self.found: list[Message] = []
        self.event = threading.Event()

    def offer(self, msg: Message) -> bool:
        """Take ``msg`` if it matches; True once the waiter has all it waits for.

        Runs under the store lock. Taking a message claims it at once (``exclude`` is the
        Mailbox's shared claimed set), so two concurrent waits never return the same message.
        """
        if msg.seq in self.exclude or not self.criteria.matches(msg):
            return False
        self.exclude.add(msg.seq)
        self.found.append(msg)
        if len(self.found) >= self.count:
            self.event.set()
            return True
        return False


class MailStore:
    """Thread-safe store of captured messages with push-based waiters.

    Retention is bounded by ``max_messages``; eviction takes the oldest message that no live
    address still expects (a message to an address of an open Mailbox is kept), and counts it.
    """

    def __init__(self, max_messages: int = 100_000) -> None:
        self.max_messages = max_messages
        self.evicted = 0
        self.delivered = 0
        self._lock = threading.RLock()
        self._seq = 0
        self._messages: list[Message] = []  # in seq order
        self._by_rcpt: dict[str, list[Message]] = defaultdict(list)
        self._waiters_by_rcpt: dict[str, list[_Waiter]] = defaultdict(list)
        self._waiters_any: list[_Waiter] = []
        self._live: dict[str, int] = defaultdict(int)
        self._listeners: list[Callable[[Message], None]] = []
        self._waiter_listeners: list[Callable[[], None]] = []

    # -- feeding -----------------------------------------------------------------------------

    def deliver(self, msg: Message) -> Message:
        with self._lock:
            self._seq += 1
            msg.seq = self._seq
            self._messages.append(msg)
            rcpts = recipients_of(msg)
            for rcpt in rcpts:
                self._by_rcpt[rcpt].append(msg)
            self.delivered += 1
            while len(self._messages) > self.max_messages and self._evict():
                pass
            for waiters in [self._waiters_by_rcpt.get(r) for r in rcpts] + [self._waiters_any]:
                if waiters:
                    waiters[:] = [w for w in waiters if not w.offer(msg)]
            listeners = list(self._listeners)
        for listener in listeners:
            listener(msg)
        return msg

    def deliver_captured(self, captured) -> Message:
        """Adapter for ``mailproof.capture.CapturedMail`` (the in-process sink's callback)."""
        return self.deliver(
            Message(
                captured.data,
                mail_from=captured.mail_from,
                rcpt_tos=captured.rcpt_tos,
                received_at=captured.received_at,
                source="sink",
            )
        )

    def add_listener(self, listener: Callable[[Message], None]) -> None:
        """Call ``listener(message)`` after every delivery (outside the lock)."""
        with self._lock:
            self._listeners.append(listener)

    def add_waiter_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` each time a wait begins, under the store lock: keep it tiny.

        Backends without push (IMAP) use it to check faster only while somebody waits.
        """
        with self._lock:
            self._waiter_listeners.append(listener)

    def remove_waiter_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._waiter_listeners:
                self._waiter_listeners.remove(listener)

    def has_waiters(self) -> bool:
        with self._lock:
            return bool(self._waiters_any) or bool(self._waiters_by_rcpt)

    # -- reading -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def since(self, seq: int, to: Optional[str] = None) -> list[Message]:
        """Messages after ``seq`` (to one recipient, when given), oldest first."""
        with self._lock:
            pool = self._messages if to is None else self._by_rcpt.get(to.lower(), [])
            start = bisect.bisect_right(pool, seq, key=lambda m: m.seq)
            return pool[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._by_rcpt.clear()

    # -- used by Mailbox ---------------------------------------------------------------------

    def _add_waiter(self, waiter: _Waiter) -> None:
        key = waiter.criteria.recipient
        if key:
            self._waiters_by_rcpt[key].append(waiter)
        else:
            self._waiters_any.append(waiter)
        for listener in self._waiter_listeners:
            listener()

    def _remove_waiter(self, waiter: _Waiter) -> None:
        key = waiter.criteria.recipient
        waiters = self._waiters_by_rcpt.get(key) if key else self._waiters_any
        if waiters and waiter in waiters:
            waiters.remove(waiter)
        if key and key in self._waiters_by_rcpt and not self._waiters_by_rcpt[key]:
            del self._waiters_by_rcpt[key]

    def _hold(self, address: str) -> None:
        with self._lock:
            self._live[address.lower()] += 1

    def _release(self, addresses: Iterable[str]) -> None:
        with self._lock:
            for address in addresses:
                key = address.lower()
                self._live[key] -= 1
                if self._live[key] <= 0:
                    del self._live[key]

    def _evict(self) -> bool:
        for index, msg in enumerate(self._messages):
            rcpts = recipients_of(msg)
            if not (rcpts & self._live.keys()):
                del self._messages[index]
                for rcpt in rcpts:
                    pool = self._by_rcpt.get(rcpt)
                    if pool is not None:
                        pool.remove(msg)
                        if not pool:
                            del self._by_rcpt[rcpt]
                self.evicted += 1
                return True
        # Every message is still expected: keep them all rather than drop one silently.
        return False


class Mailbox:
    """One test's (or one flow run's) view of a MailStore."""

    def __init__(
        self,
        store: MailStore,
        addresses: Optional[AddressBook] = None,
        *,
        default_within: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.addresses = addresses or AddressBook()
        self.default_within = default_within
        self.clock = clock
        self.handed_out: list[str] = []
        # address -> (messages expected, seconds allowed): what the ledger reconciles against.
        self.expected: dict[str, tuple[int, float]] = {}
        self.claimed: set[int] = set()
        self.triggers = Triggers()
        self._start_seq = store.last_seq
        self._observers: list[Callable[..., None]] = []
        self._closed = False

    # -- addresses and triggers --------------------------------------------------------------

    def address(self, label: str = "user") -> str:
        """A fresh address that nobody else will receive mail at."""
        address = self.addresses.address(label)
        self.handed_out.append(address)
        self.store._hold(address)
        return address

    def mark(self, at: Optional[float] = None) -> float:
        """Record a trigger: latency of later mail is measured from the latest mark before it."""
        at = self.clock() if at is None else at
        self.triggers.add(at)
        return at

    def trigger_for(self, received_at: Optional[float]) -> Optional[float]:
        """The trigger a message captured at ``received_at`` is measured from (``Triggers.before``)."""
        return self.triggers.before(received_at)

    def observe(self, observer: Callable[..., None]) -> None:
        """Call ``observer(event, message, criteria, error)`` on each outcome of a wait.

        Events: "delivered", "late" (with MailLate), "missing" (message None, MailNotDelivered),
        "unexpected" (with UnexpectedMail).
        """
        self._observers.append(observer)

    def _notify(self, event: str, msg: Optional[Message], criteria: Criteria, error: Optional[Exception]) -> None:
        for observer in self._observers:
            observer(event, msg, criteria, error)

    # -- reading -----------------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        """Every message captured since this view opened, claimed or not."""
        return self.store.since(self._start_seq)

    def received(self, to: Optional[str] = None, **criteria) -> list[Message]:
        """Messages already captured that match, without waiting (claimed ones included)."""
        wanted = Criteria(to=to, **criteria)
        return [m for m in self.messages if wanted.matches(m)]

    # -- waiting -----------------------------------------------------------------------------

    def wait_for(
        self,
        to: Optional[str] = None,
        *,
        subject: Optional[Text] = None,
        contains: Optional[Text] = None,
        header: Union[tuple, dict, None] = None,
        sender: Optional[str] = None,
        match: Optional[Callable[[Message], bool]] = None,
        count: int = 1,
        within: Optional[float] = None,
    ) -> Union[Message, list[Message]]:
        """Return the matching message(s) the moment they are captured.

        Raises MailNotDelivered after ``within`` seconds (naming what did arrive), or MailLate
        when a message came but its latency from the trigger exceeds ``within``.
        """
        if count < 1:
            raise ValueError("count must be at least 1; use expect_no_mail() to expect none")
        criteria = Criteria(to=to, subject=subject, contains=contains, header=header,
                            sender=sender, match=match)
        within = self.default_within if within is None else within
        if criteria.recipient:
            expected, allowed = self.expected.get(criteria.recipient, (0, 0.0))
            self.expected[criteria.recipient] = (expected + count, max(allowed, within))
        started = self.clock()
        found = self._wait(criteria, count, within)
        if len(found) < count:
            error = MailNotDelivered(self._explain_missing(criteria, count, found, within, started))
            self._notify("missing", None, criteria, error)
            raise error
        found = found[:count]
        late = None
        for msg in found:
            self.claimed.add(msg.seq)
            self.triggers.stamp(msg)
            if late is None and msg.latency is not None and msg.latency > within:
                late = MailLate(
                    f"{criteria.describe()}: arrived {msg.latency:.3f} s after the trigger, "
                    f"more than the {within:g} s allowed ({msg.describe()})"
                )
                self._notify("late", msg, criteria, late)
            else:
                self._notify("delivered", msg, criteria, None)
        if late is not None:
            raise late
        return found[0] if count == 1 else found

    def expect_no_mail(
        self,
        to: Optional[str] = None,
        *,
        within: float = 1.0,
        subject: Optional[Text] = None,
        contains: Optional[Text] = None,
        header: Union[tuple, dict, None] = None,
        match: Optional[Callable[[Message], bool]] = None,
    ) -> None:
        """Assert that no matching mail arrives within ``within`` seconds (fails the moment one does)."""
        criteria = Criteria(to=to, subject=subject, contains=contains, header=header, match=match)
        if criteria.recipient:
            self.expected.setdefault(criteria.recipient, (0, within))
        found = self._wait(criteria, 1, within)
        if found:
            error = UnexpectedMail(
                f"expected no mail {criteria.describe()} within {within:g} s, "
                f"but got {found[0].describe()}"
            )
            self._notify("unexpected", found[0], criteria, error)
            raise error

    def close(self) -> None:
        """Release this view's addresses so the store may evict their mail."""
        if not self._closed:
            self._closed = True
            self.store._release(self.handed_out)

    def __enter__(self) -> "Mailbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _wait(self, criteria: Criteria, count: int, within: float) -> list[Message]:
        """Offer the waiter what is already here, then let deliveries wake it."""
        store = self.store
        waiter = _Waiter(criteria, count, self.claimed)
        with store._lock:
            for msg in store.since(self._start_seq, to=criteria.recipient):
                if waiter.offer(msg):
                    return waiter.found
            store._add_waiter(waiter)
        try:
            waiter.event.wait(max(within, 0.0))
        finally:
            with store._lock:
                store._remove_waiter(waiter)
                found = list(waiter.found)
                if len(found) < count:  # a failed wait gives back what it took
                    self.claimed.difference_update(m.seq for m in found)
        return found

    def _explain_missing(self, criteria, count, found, within, started) -> str:
        lines = [
            f"no mail {criteria.describe()} within {within:g} s"
            if not found
            else f"only {len(found)} of {count} mails {criteria.describe()} within {within:g} s"
        ]
        last_trigger = self.triggers.before(started)
        window_start = started if last_trigger is None else min(started, last_trigger)
        arrived = [m for m in self.messages if (m.received_at or 0) >= window_start and m.seq not in {f.seq for f in found}]
        if not arrived:
            lines.append(f"no other mail arrived in that window ({len(self.messages)} captured in this test).")
            return "\n".join(lines)
        same = [m for m in arrived if criteria.recipient and criteria.recipient in recipients_of(m)]
        others = [m for m in arrived if m not in same]
        lines.append(f"{len(arrived)} other mail(s) arrived in that window:")
        for msg in (same + others)[:NEAR_MISSES_SHOWN]:
            why = "; ".join(criteria.mismatches(msg)) or "already claimed by an earlier wait"
            lines.append(f"  - {msg.describe()} at +{(msg.received_at or 0) - window_start:.3f} s: {why}")
        if len(arrived) > NEAR_MISSES_SHOWN:
            lines.append(f"  ... and {len(arrived) - NEAR_MISSES_SHOWN} more")
        return "\n".join(lines)
