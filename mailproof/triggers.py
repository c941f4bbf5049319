"""Triggers: which request (or mark) each expected email's latency is measured from.

A ``Mailbox`` owns one ``TriggerBook``; the Mailbox's ``on_request``, ``mark``, ``trigger_of`` and
``triggers_of`` and every wait read and write it, so the rule below lives in this module only.

**One trigger per expected email.** Every wait on an address (``wait_for``, ``expect``) gets
its own trigger, what the latency of the mail it returns is measured from (the rehearsal
ledger's included). For the k-th wait on an address, in order:

1. ``mark(address)`` made since the previous wait on it began: set explicitly;
2. whichever came first after the previous wait on it returned (for the first wait: after the
   address was handed out): the first request that carried the address (URL, query string, form
   data or JSON body; case-insensitive; percent-encoded forms included), or ``mark()`` (the
   trigger of every address whose next wait has none yet);
3. at the wait: the latest request or mark before the wait began and after the previous wait on
   the address returned (for ``expect``: the first one made inside the block, else the latest
   before it); for the first wait, the latest before it began;
4. else the previous wait's trigger (nothing happened since: the app sends two emails for one
   cause; a wait that begins while another on the address is still waiting also gets it).

A wait's trigger is fixed when it begins: requests made while it waits never count, and a
later request never moves it. ``Message.latency`` of a message a wait returns is
``received_at - that wait's trigger``; ``triggers_of(address)`` lists one trigger per expected
email (a ``count=2`` wait: two), in the order the waits were made, and is what the ledger
measures the same emails from: one computation, wherever it is read. ``trigger_of(address)`` is
the first of them (before any wait: the trigger decided so far for the first).

A wait without ``to`` measures each message from the trigger its first recipient's next wait
would have had when it began (no trigger decided: the latest request or mark before it began),
and moves no address's triggers.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable, Mapping, Optional

from mailproof.criteria import recipients_of
from mailproof.message import Message

__all__ = ["Triggers", "TriggerBook", "Fallback", "stamp"]

# Step 3 of the rule for one wait: given the size of the address's window (``since``: triggers
# added before the previous wait returned do not count), the trigger found at the wait, or None.
Fallback = Callable[[int], Optional[float]]


class Triggers:
    """The request starts and marks of one Mailbox, sorted (epoch seconds): the fallback trigger.

    Not the latency rule itself (that is ``TriggerBook``): ``before(t)`` is "the latest
    request or mark at or before t", ``latest(n, t)`` the same among those added after the first
    ``n``: used when a wait begins for an address nothing triggered since its previous wait.
    """

    __slots__ = ("_times", "_order")

    def __init__(self, times: Iterable[float] = ()) -> None:
        self._order: list[float] = [float(t) for t in times]
        self._times: list[float] = sorted(self._order)

    def add(self, at: float) -> None:
        bisect.insort(self._times, float(at))
        self._order.append(float(at))

    def before(self, at: Optional[float]) -> Optional[float]:
        """The latest trigger at or before ``at`` (None: none that early, or no time)."""
        if at is None or not self._times:
            return None
        index = bisect.bisect_right(self._times, at)
        return self._times[index - 1] if index else None

    def added_after(self, n: int) -> list[float]:
        """The triggers added after the first ``n``, in the order they were added."""
        return self._order[n:]

    def latest(self, since: int, at: Optional[float]) -> Optional[float]:
        """The latest trigger at or before ``at`` among those added after the first ``since``."""
        if since <= 0:
            return self.before(at)
        if at is None:
            return None
        recent = [t for t in self._order[since:] if t <= at]
        return max(recent) if recent else None

    @property
    def times(self) -> list[float]:
        return list(self._times)

    def __len__(self) -> int:
        return len(self._times)

    def __iter__(self):
        return iter(list(self._times))

    def __repr__(self) -> str:
        return f"Triggers({self._times!r})"


class _AddressTriggers:
    """What the book knows of one address's triggers (read and written under its lock)."""

    __slots__ = ("next", "since", "waits", "active", "handed_out")

    def __init__(self) -> None:
        self.next: Optional[float] = None  # the next wait's trigger, decided before it began (None: not yet)
        # The fallback window of the next wait: triggers added after the first ``since`` (the
        # previous wait returned then; 0 before the first wait). None while a wait is waiting.
        self.since: Optional[int] = 0
        self.waits: list[tuple[Optional[float], int]] = []  # (trigger, emails) of each wait begun, in order
        self.active = 0  # waits waiting now
        self.handed_out = False

    def previous(self) -> Optional[float]:
        return self.waits[-1][0] if self.waits else None

    def resolve(self, fallback: Fallback) -> Optional[float]:
        """The trigger a wait beginning now gets (rule in the module docstring)."""
        if self.next is not None:
            return self.next
        found = fallback(self.since) if self.since is not None else None
        return found if found is not None else self.previous()


class TriggerBook:
    """The triggers of one Mailbox: every request and mark, and each address's waits.

    Addresses are keyed lower-cased. Thread-safe: one lock guards all of it (the fallbacks
    waits pass in are called under it, so they must only read ``triggers``).
    """

    def __init__(self) -> None:
        self.triggers = Triggers()  # every request start and mark: what step 3 searches
        self._lock = threading.Lock()
        self._addresses: dict[str, _AddressTriggers] = {}
        self._pending: dict[str, None] = {}  # handed out, not waited on now, next trigger not decided (ordered)

    # -- what happens: addresses handed out, requests, marks ---------------------------------

    def hand_out(self, address: str) -> None:
        """``address`` was handed out: a request that carries it can now be its next trigger."""
        with self._lock:
            key = address.lower()
            state = self._state(key)
            state.handed_out = True
            if not state.active and state.next is None:
                self._pending[key] = None

    def request(self, at: float) -> list[str]:
        """A request starts at ``at``: a fallback trigger. Returns the addresses it may be the
        trigger of (scan the request for them, then pass those it carries to ``carried``)."""
        with self._lock:
            self.triggers.add(at)
            return list(self._pending)

    def carried(self, keys: Iterable[str], at: float) -> None:
        """The request at ``at`` carried these addresses: the trigger of their next wait, unless
        one was decided (or a wait began) while the request was scanned."""
        with self._lock:
            for key in keys:
                if key in self._pending:
                    del self._pending[key]
                    self._addresses[key].next = at

    def mark(self, address: Optional[str], at: float) -> None:
        """``Mailbox.mark``: of one address's next wait, or (None) of every pending one and a fallback."""
        with self._lock:
            if address is None:
                self.triggers.add(at)
                for key in self._pending:
                    self._addresses[key].next = at
                self._pending.clear()
                return
            key = address.lower()
            self._state(key).next = at
            self._pending.pop(key, None)

    # -- what the waits are measured from ----------------------------------------------------

    def first(self, address: str) -> Optional[float]:
        """``Mailbox.trigger_of``: the first expected email's trigger, or the one decided so far."""
        with self._lock:
            state = self._addresses.get(address.lower())
            if state is None:
                return None
            return state.waits[0][0] if state.waits else state.next

    def each(self, address: str, expected: Mapping[str, tuple[int, float]]) -> list[Optional[float]]:
        """``Mailbox.triggers_of``: one trigger per email expected at ``address``; ``expected`` is
        the Mailbox's (lower-cased address -> (emails, seconds)), read under the lock. Emails
        expected that no wait has begun for get the next wait's trigger, else the last wait's."""
        key = address.lower()
        with self._lock:
            state = self._addresses.get(key)
            out = [trigger for trigger, n in state.waits for _ in range(n)] if state else []
            armed = expected.get(key, (0, 0.0))[0]
            if len(out) < armed:
                pad = None if state is None else state.next if state.next is not None else state.previous()
                out += [pad] * (armed - len(out))
            return out

    def added(self) -> int:
        """How many requests and marks there have been (an ``expect`` block's window starts here)."""
        with self._lock:
            return len(self.triggers)

    def latest_before(self, at: float) -> Fallback:
        """Step 3 for ``wait_for`` and ``expect_no_mail``: the latest in the window, at or before ``at``."""
        return lambda since: self.triggers.latest(since, at)

    def inside_else_before(self, entered: int, entered_at: float) -> Fallback:
        """Step 3 for ``expect``: the first request or mark inside the block (``entered``: ``added()``
        when it began, at ``entered_at``), else the latest before it."""
        def fallback(since: int) -> Optional[float]:
            inside = self.triggers.added_after(max(since, entered))
            return inside[0] if inside else self.triggers.latest(since, entered_at)
        return fallback

    def begin(self, key: Optional[str], count: int, fallback: Fallback
              ) -> tuple[Optional[float], Optional[dict[str, Optional[float]]]]:
        """A wait for ``count`` emails begins: fix its trigger (``fallback(since)``: the latest
        request or mark in the address's window, see ``_AddressTriggers``), so nothing done while
        it waits moves it. Returns (the wait's trigger, None); for a wait without ``to``: (the
        latest request or mark before it began, the trigger each address's next wait would get now)."""
        with self._lock:
            if key is None:
                return fallback(0), {k: state.resolve(fallback) for k, state in self._addresses.items()}
            state = self._state(key)
            trigger = state.resolve(fallback)
            state.waits.append((trigger, count))
            state.next = None
            state.since = None
            state.active += 1
            self._pending.pop(key, None)
            return trigger, None

    def end(self, key: Optional[str]) -> None:
        """A wait on ``key`` returned (or raised): what happens from now on is for the next one."""
        if key is None:
            return
        with self._lock:
            state = self._addresses[key]
            state.active -= 1
            if state.active == 0:
                state.since = len(self.triggers)
                if state.handed_out and state.next is None:
                    self._pending[key] = None

    def unexpected(self, keys: Iterable[str], fallback: Fallback) -> Optional[float]:
        """The trigger of an unexpected message to ``keys``: the first that the address's next
        wait would get now (moves nothing)."""
        with self._lock:
            for key in keys:
                state = self._addresses.get(key)
                trigger = state.resolve(fallback) if state is not None else None
                if trigger is not None:
                    return trigger
        return None

    def _state(self, key: str) -> _AddressTriggers:
        state = self._addresses.get(key)
        if state is None:
            state = self._addresses[key] = _AddressTriggers()
        return state


def stamp(msg: Message, recipient: Optional[str], trigger: Optional[float],
          resolved: Optional[dict[str, Optional[float]]]) -> None:
    """``msg.triggered_at = the wait's trigger``. Without ``to`` (no ``recipient``): the trigger its
    first recipient with one would have had when the wait began (``resolved``), else the latest
    request or mark before the wait began (a request made while waiting never counts)."""
    if recipient or resolved is None:
        msg.triggered_at = trigger
        return
    for rcpt in sorted(recipients_of(msg)):
        known = resolved.get(rcpt, trigger)
        if known is not None:
            msg.triggered_at = known
            return
    msg.triggered_at = trigger
