"""MailStore: every captured message, and the waiters a delivery wakes.

Any backend (the in-process sink, the sink service client, an IMAP watcher) feeds the store with
``deliver``. A delivery wakes exactly the waiters whose criteria it meets, from the delivering
thread: nobody polls.

Two rules keep its verdicts true:

- **A harness fault is never read as a product fault.** Every waiter's check and every listener
  runs in its own ``try``. One that raises is logged (once per kind), counted in
  ``harness_errors`` (the last few texts in ``harness_error_samples``), and the others still run;
  a waiter whose own criteria raised fails its wait with ``HarnessError``.
- **Nothing is dropped silently.** Retention is bounded by ``max_messages``, but mail to an
  address a live Mailbox holds is never evicted. Eviction is amortised O(1): a message joins the
  eviction queue when it becomes evictable (at delivery, or when the last live address it was
  sent to is released), and is checked again when it leaves it. When everything retained is
  still live, the store keeps it all, logs that once and counts each such delivery in
  ``over_cap``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable, Iterable, Optional

from mailproof.criteria import Criteria, recipients_of
from mailproof.message import Message

log = logging.getLogger("mailproof.store")

HARNESS_ERROR_SAMPLES = 10


def describe(msg: Message) -> str:
    """``msg.describe()``, or as much of it as can be read (for harness-error texts)."""
    try:
        return msg.describe()
    except Exception:  # the message itself may be what is broken
        return f"mail #{msg.seq} to {sorted(msg.rcpt_tos)}"


class _Waiter:
    __slots__ = ("criteria", "count", "exclude", "found", "event", "error", "failed_on", "_base", "_match")

    def __init__(self, criteria: Criteria, count: int, exclude: set[int]) -> None:
        self.criteria = criteria
        self.count = count
        self.exclude = exclude
        self.found: list[Message] = []
        self.event = threading.Event()
        self.error: Optional[BaseException] = None
        self.failed_on: Optional[Message] = None
        # Criteria turns an exception of the user's match= into a mismatch; called here instead,
        # a raising callable fails the wait as a harness error rather than a silent "no mail".
        self._match = criteria.match
        self._base = dataclasses.replace(criteria, match=None) if criteria.match is not None else criteria

    def matches(self, msg: Message) -> bool:
        """The criteria, with whatever they raise (a ``match=`` callable's exception included)."""
        return self._base.matches(msg) and (self._match is None or bool(self._match(msg)))

    def offer(self, msg: Message) -> bool:
        """Take ``msg`` if it matches; True once the waiter has all it waits for.

        Runs under the store lock. Taking a message claims it at once (``exclude`` is the
        Mailbox's shared claimed set), so two concurrent waits never return the same message.
        Raises whatever the criteria raise, before claiming anything.
        """
        if msg.seq in self.exclude or not self.matches(msg):
            return False
        self.exclude.add(msg.seq)
        self.found.append(msg)
        if len(self.found) >= self.count:
            self.event.set()
            return True
        return False

    def fail(self, exc: BaseException, msg: Message) -> None:
        self.error, self.failed_on = exc, msg
        self.event.set()


class MailStore:
    """Thread-safe store of captured messages with push-based waiters (see the module docstring)."""

    def __init__(self, max_messages: int = 100_000) -> None:
        self.max_messages = max_messages
        self.evicted = 0
        self.delivered = 0
        self.over_cap = 0  # deliveries kept beyond max_messages because every message was live
        self.harness_errors = 0
        self.harness_error_samples: collections.deque[str] = collections.deque(maxlen=HARNESS_ERROR_SAMPLES)
        self._lock = threading.RLock()
        self._seq = 0
        # seq -> message, in seq order (dicts keep insertion order; deleting is O(1)).
        self._messages: dict[int, Message] = {}
        self._rcpts: dict[int, frozenset[str]] = {}
        self._by_rcpt: dict[str, dict[int, Message]] = {}
        self._evictable: collections.deque[int] = collections.deque()
        self._queued: set[int] = set()
        self._waiters_by_rcpt: dict[str, list[_Waiter]] = {}
        self._waiters_any: list[_Waiter] = []
        self._live: dict[str, int] = {}
        self._listeners: list[Callable[[Message], None]] = []
        self._waiter_listeners: list[Callable[[], None]] = []
        self._logged: set[tuple] = set()
        self._over_cap_logged = False

    # -- feeding -----------------------------------------------------------------------------

    def deliver(self, msg: Message) -> Message:
        with self._lock:
            self._seq += 1
            msg.seq = self._seq
            try:
                rcpts = frozenset(recipients_of(msg))
            except Exception as exc:  # unreadable headers and no envelope: kept, under no address
                self.record_harness_error(("recipients", type(exc)), exc, f"reading the recipients of {describe(msg)}")
                rcpts = frozenset()
            self._messages[msg.seq] = msg
            self._rcpts[msg.seq] = rcpts
            for rcpt in rcpts:
                self._by_rcpt.setdefault(rcpt, {})[msg.seq] = msg
            self.delivered += 1
            if not self._is_live(rcpts):
                self._queue(msg.seq)
            self._trim()
            for rcpt in rcpts:
                waiters = self._waiters_by_rcpt.get(rcpt)
                if waiters:
                    self._offer_all(waiters, msg)
                    if not waiters:
                        del self._waiters_by_rcpt[rcpt]
            if self._waiters_any:
                self._offer_all(self._waiters_any, msg)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(msg)
            except Exception as exc:
                name = getattr(listener, "__qualname__", type(listener).__name__)
                self.record_harness_error(("listener", name, type(exc)), exc,
                                          f"listener {name} on {describe(msg)}")
        return msg

    def add_listener(self, listener: Callable[[Message], None]) -> None:
        """Call ``listener(message)`` after every delivery (outside the lock; one that raises is
        logged and counted in ``harness_errors``, and the others still run)."""
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

    # -- harness errors ----------------------------------------------------------------------

    def record_harness_error(self, kind: tuple, exc: BaseException, context: str) -> str:
        """Count a fault of the harness (not of the product); log the first of each ``kind``."""
        text = f"{context}: {type(exc).__name__}: {exc}"
        with self._lock:
            self.harness_errors += 1
            self.harness_error_samples.append(text)
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.error("mailproof harness error (logged once per kind; store.harness_errors counts "
                      "them all): %s", text, exc_info=exc)
        return text

    # -- reading -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def since(self, seq: int, to: Optional[str] = None) -> list[Message]:
        """Messages after ``seq`` (to one recipient, when given), oldest first. O(what it returns)."""
        with self._lock:
            pool = self._messages if to is None else self._by_rcpt.get(to.lower(), {})
            newer = []
            for key in reversed(pool):
                if key <= seq:
                    break
                newer.append(pool[key])
            newer.reverse()
            return newer

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._rcpts.clear()
            self._by_rcpt.clear()
            self._evictable.clear()
            self._queued.clear()

    # -- used by Mailbox ---------------------------------------------------------------------

    def _arm(self, waiter: _Waiter, since_seq: int) -> bool:
        """Offer ``waiter`` what is already here after ``since_seq``, then register it for
        deliveries. True when it is already done (satisfied, or failed) and was not registered."""
        with self._lock:
            for msg in self.since(since_seq, to=waiter.criteria.recipient):
                if self._offer(waiter, msg):
                    return True
            self._add_waiter(waiter)
            return False

    def _disarm(self, waiter: _Waiter) -> None:
        with self._lock:
            self._remove_waiter(waiter)

    def _offer(self, waiter: _Waiter, msg: Message) -> bool:
        """``waiter.offer(msg)``, isolated: a waiter whose criteria raise fails alone (True: done)."""
        try:
            return waiter.offer(msg)
        except Exception as exc:
            self.record_harness_error(("criteria", type(exc)), exc,
                                      f"checking {describe(msg)} against {waiter.criteria.describe()}")
            waiter.fail(exc, msg)
            return True

    def _offer_all(self, waiters: list[_Waiter], msg: Message) -> None:
        waiters[:] = [w for w in waiters if not self._offer(w, msg)]

    def _add_waiter(self, waiter: _Waiter) -> None:
        key = waiter.criteria.recipient
        if key:
            self._waiters_by_rcpt.setdefault(key, []).append(waiter)
        else:
            self._waiters_any.append(waiter)
        for listener in self._waiter_listeners:
            try:
                listener()
            except Exception as exc:
                name = getattr(listener, "__qualname__", type(listener).__name__)
                self.record_harness_error(("waiter listener", name, type(exc)), exc, f"waiter listener {name}")

    def _remove_waiter(self, waiter: _Waiter) -> None:
        key = waiter.criteria.recipient
        waiters = self._waiters_by_rcpt.get(key) if key else self._waiters_any
        if waiters and waiter in waiters:
            waiters.remove(waiter)
        if key and key in self._waiters_by_rcpt and not self._waiters_by_rcpt[key]:
            del self._waiters_by_rcpt[key]

    def _hold(self, address: str) -> None:
        with self._lock:
            key = address.lower()
            self._live[key] = self._live.get(key, 0) + 1

    def _release(self, addresses: Iterable[str]) -> None:
        """Addresses no longer live: their mail may go, mail of closed Mailboxes first."""
        with self._lock:
            for address in addresses:
                key = address.lower()
                held = self._live.get(key, 0) - 1
                if held > 0:
                    self._live[key] = held
                    continue
                self._live.pop(key, None)
                for seq in reversed(self._by_rcpt.get(key, {})):
                    if seq not in self._queued and not self._is_live(self._rcpts[seq]):
                        self._evictable.appendleft(seq)
                        self._queued.add(seq)
            self._trim()

    # -- retention ---------------------------------------------------------------------------

    def _is_live(self, rcpts: frozenset[str]) -> bool:
        live = self._live
        return any(r in live for r in rcpts)

    def _queue(self, seq: int) -> None:
        self._evictable.append(seq)
        self._queued.add(seq)

    def _trim(self) -> None:
        while len(self._messages) > self.max_messages:
            if not self._evict_one():
                self._note_over_cap()
                return

    def _evict_one(self) -> bool:
        """Evict the first queued message that is still evictable. Each queued entry is looked at
        once, and every entry was queued by a delivery or a release: amortised O(1)."""
        while self._evictable:
            seq = self._evictable.popleft()
            self._queued.discard(seq)
            msg = self._messages.get(seq)
            if msg is None:
                continue  # cleared meanwhile
            rcpts = self._rcpts[seq]
            if self._is_live(rcpts):
                continue  # an address of it is live again: queued again when released
            del self._messages[seq]
            del self._rcpts[seq]
            for rcpt in rcpts:
                pool = self._by_rcpt.get(rcpt)
                if pool is not None:
                    pool.pop(seq, None)
                    if not pool:
                        del self._by_rcpt[rcpt]
            self.evicted += 1
            return True
        return False

    def _note_over_cap(self) -> None:
        self.over_cap += 1
        if not self._over_cap_logged:
            self._over_cap_logged = True
            log.warning("mailproof: the mail store holds %d messages, over its cap of %d, because every "
                        "one is still expected by an open Mailbox; it keeps them all rather than drop one "
                        "(logged once; store.over_cap counts such deliveries)",
                        len(self._messages), self.max_messages)
