"""The Mailbox: the one API flows use to expect mail, whatever captured it.

A ``Mailbox`` is a view on a ``MailStore`` (``mailproof.store``) for one test or one flow run: it
hands out addresses, knows each address's trigger, only sees mail captured after it was opened,
and never returns the same message twice (each wait claims what it returns).

**The SLO and the timeout are two numbers.** ``wait_for(within=SLO, timeout=...)`` waits up to
the timeout (default: the Mailbox's ``default_timeout``, else ``max(3 * within, within + 10)``).
Mail later than the SLO but before the timeout raises ``MailLate`` (the message claimed, on the
exception); none by the timeout raises ``MailNotDelivered``.

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
import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from mailproof.addresses import AddressBook
from mailproof.criteria import Criteria, Text, recipients_of
from mailproof.errors import HarnessError, MailLate, MailNotDelivered, MailproofError, UnexpectedMail
from mailproof.http import carried_addresses
from mailproof.message import Message
from mailproof.store import MailStore, _Waiter, describe

__all__ = ["Mailbox", "MailStore", "Triggers", "ExpectedMail"]

NEAR_MISSES_SHOWN = 10


class Triggers:
    """The request starts and marks of one Mailbox, sorted (epoch seconds): the fallback trigger.

    Not the latency rule itself (that is ``Mailbox.triggers_of``): ``before(t)`` is "the latest
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


class _Address:
    """What a Mailbox knows of one address's triggers (read and written under its lock)."""

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

    def resolve(self, fallback: Callable[[int], Optional[float]]) -> Optional[float]:
        """The trigger a wait beginning now gets (rule in the module docstring)."""
        if self.next is not None:
            return self.next
        found = fallback(self.since) if self.since is not None else None
        return found if found is not None else self.previous()


class ExpectedMail(list):
    """What ``Mailbox.expect(...)`` yields: empty inside the block, the messages after it."""

    def __init__(self, criteria: Criteria, count: int, within: float, timeout: float) -> None:
        super().__init__()
        self.criteria, self.count, self.within, self.timeout = criteria, count, within, timeout


class Mailbox:
    """One test's (or one flow run's) view of a MailStore."""

    def __init__(
        self,
        store: MailStore,
        addresses: Optional[AddressBook] = None,
        *,
        default_within: float = 10.0,
        default_timeout: Optional[float] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _positive(default_within):
            raise ValueError(f"default_within must be more than 0 seconds, not {default_within!r}")
        if default_timeout is not None and not _positive(default_timeout):
            raise ValueError(f"default_timeout must be more than 0 seconds (or None), not {default_timeout!r}")
        self.store = store
        self.addresses = addresses or AddressBook()
        self.default_within = default_within
        self.default_timeout = default_timeout
        self.clock = clock
        self.handed_out: list[str] = []
        # address -> (messages expected, seconds allowed): what the ledger reconciles against.
        self.expected: dict[str, tuple[int, float]] = {}
        self.claimed: set[int] = set()
        self.triggers = Triggers()
        self._lock = threading.Lock()
        self._addresses: dict[str, _Address] = {}  # lower-cased address -> its triggers
        self._pending: dict[str, None] = {}  # handed out, not waited on now, next trigger not decided (ordered)
        self._start_seq = store.last_seq
        self._observers: list[Callable[..., None]] = []
        self._closed = False

    # -- addresses and triggers --------------------------------------------------------------

    def address(self, label: str = "user") -> str:
        """A fresh address that nobody else will receive mail at."""
        address = self.addresses.address(label)
        self.handed_out.append(address)
        with self._lock:
            key = address.lower()
            state = self._state(key)
            state.handed_out = True
            if not state.active and state.next is None:
                self._pending[key] = None
        self.store._hold(address)
        return address

    def on_request(self, method: str, url: Any, fields: Optional[Mapping[str, Any]] = None) -> float:
        """An HTTP request starts now (``TriggeringClient`` calls this): the trigger of the next
        wait of every handed-out address it carries that has none yet (and no wait waiting on
        it), and a fallback trigger."""
        at = self.clock()
        with self._lock:
            self.triggers.add(at)
            pending = list(self._pending)
        if pending:
            try:
                carried = carried_addresses(pending, url, fields or {})
            except Exception as exc:  # never fail the product's request over this: the fallback applies
                self.store.record_harness_error(("request scan", type(exc)), exc,
                                                f"looking for addresses in {method} {url}")
                carried = []
            with self._lock:
                for key in carried:
                    if key in self._pending:
                        del self._pending[key]
                        self._addresses[key].next = at
        return at

    def mark(self, address: Optional[str] = None, *, at: Optional[float] = None) -> float:
        """An explicit trigger, for mail caused by something other than an HTTP request.

        ``mark()`` is the trigger of the next wait of every handed-out address that has none yet
        (and no wait waiting on it), and a fallback trigger for later waits; ``mark(address)``
        sets the trigger of that address's next wait, replacing one inferred from a request (a
        wait that has begun keeps its own). A time as the first argument is taken as ``at``.
        """
        if isinstance(address, (int, float)) and not isinstance(address, bool):
            address, at = None, float(address)
        at = self.clock() if at is None else float(at)
        with self._lock:
            if address is None:
                self.triggers.add(at)
                for key in self._pending:
                    self._addresses[key].next = at
                self._pending.clear()
                return at
            key = address.lower()
            self._state(key).next = at
            self._pending.pop(key, None)
        return at

    def trigger_of(self, address: str) -> Optional[float]:
        """The trigger of ``address``'s first expected email (epoch seconds), None if none is known.

        Before any wait on it: the trigger decided so far for that first wait. For every email,
        see ``triggers_of``."""
        with self._lock:
            state = self._addresses.get(address.lower())
            if state is None:
                return None
            return state.waits[0][0] if state.waits else state.next

    def triggers_of(self, address: str) -> list[Optional[float]]:
        """The trigger of each email expected at ``address``, in the order the waits were made: a
        ``count=n`` wait contributes n entries (its one trigger), ``expect_no_mail`` none. An
        expectation in ``expected`` that no wait has begun for (an ``expect`` block still open)
        is given the trigger decided for the next wait, else the last wait's."""
        key = address.lower()
        with self._lock:
            state = self._addresses.get(key)
            out = [trigger for trigger, n in state.waits for _ in range(n)] if state else []
            armed = self.expected.get(key, (0, 0.0))[0]
            if len(out) < armed:
                pad = None if state is None else state.next if state.next is not None else state.previous()
                out += [pad] * (armed - len(out))
            return out

    def wait_timeout(self, within: Optional[float] = None, timeout: Optional[float] = None) -> float:
        """How long a wait with this SLO waits; raises ValueError for an invalid pair."""
        return self._limits(within, timeout)[1]

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
        timeout: Optional[float] = None,
    ) -> Union[Message, list[Message]]:
        """Return the matching message(s) the moment they are captured.

        ``within`` is the SLO (seconds from the trigger), ``timeout`` how long to wait (see the
        module docstring). Raises MailLate when mail came after the SLO but before the timeout,
        MailNotDelivered when it had not come by the timeout (naming what did arrive), and
        HarnessError when the criteria themselves raised.
        """
        if count < 1:
            raise ValueError("count must be at least 1; use expect_no_mail() to expect none")
        within, timeout = self._limits(within, timeout)
        criteria = Criteria(to=to, subject=subject, contains=contains, header=header, sender=sender, match=match)
        started = self.clock()
        key = criteria.recipient
        trigger, resolved = self._begin(key, count, lambda since: self.triggers.latest(since, started))
        try:
            self._expect_count(key, count, within)
            found = self._wait(criteria, count, timeout, self._start_seq)
            return self._verdict(criteria, count, within, timeout, found, started, trigger, resolved,
                                 window_start=started)
        finally:
            self._end(key)

    def expect(
        self,
        to: Optional[str] = None,
        *,
        count: int = 1,
        within: Optional[float] = None,
        timeout: Optional[float] = None,
        subject: Optional[Text] = None,
        contains: Optional[Text] = None,
        header: Union[tuple, dict, None] = None,
        sender: Optional[str] = None,
        match: Optional[Callable[[Message], bool]] = None,
    ) -> "_Expecting":
        """Arm first, trigger inside: ``with mailbox.expect(to=a, count=2, within=5) as sent:``.

        Only mail captured after the block starts counts. On a clean exit, waits for exactly
        ``count`` (MailLate / MailNotDelivered as ``wait_for``), then raises UnexpectedMail if more
        matching mail had arrived by then. ``sent`` holds the messages after the block. An
        exception inside the block propagates and withdraws the expectation.
        """
        if count < 1:
            raise ValueError("count must be at least 1; use expect_no_mail() to expect none")
        within, timeout = self._limits(within, timeout)
        criteria = Criteria(to=to, subject=subject, contains=contains, header=header, sender=sender, match=match)
        return _Expecting(self, criteria, count, within, timeout)

    def expect_no_mail(
        self,
        to: Optional[str] = None,
        *,
        within: float = 1.0,
        subject: Optional[Text] = None,
        contains: Optional[Text] = None,
        header: Union[tuple, dict, None] = None,
        sender: Optional[str] = None,
        match: Optional[Callable[[Message], bool]] = None,
    ) -> None:
        """Assert that no matching mail arrives within ``within`` seconds (fails the moment one does)."""
        if not (isinstance(within, (int, float)) and within >= 0):
            raise ValueError(f"within must be 0 seconds or more (the window to watch), not {within!r}")
        criteria = Criteria(to=to, subject=subject, contains=contains, header=header, sender=sender, match=match)
        if criteria.recipient:
            self.expected.setdefault(criteria.recipient, (0, within))
        found = self._wait(criteria, 1, within, self._start_seq)
        if found:
            msg = found[0]
            now = self.clock()
            trigger = self._known_trigger(msg, criteria, lambda since: self.triggers.latest(since, now))
            if trigger is not None:
                msg.triggered_at = trigger
            error = UnexpectedMail(
                f"expected no mail {criteria.describe()} within {within:g} s, but got {msg.describe()}",
                messages=[msg])
            self._notify("unexpected", msg, criteria, error)
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

    def _limits(self, within: Optional[float], timeout: Optional[float]) -> tuple[float, float]:
        within = self.default_within if within is None else within
        if not _positive(within):
            raise ValueError(f"within must be more than 0 seconds (the SLO), not {within!r}")
        if timeout is None:
            timeout = self.default_timeout if self.default_timeout is not None else max(3 * within, within + 10)
            return within, max(timeout, within)  # a Mailbox-wide default never cuts a wait short of its SLO
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout >= within):
            raise ValueError(f"timeout must be at least within ({within!r} s), not {timeout!r}: the wait has to "
                             "outlast the SLO to tell late mail from lost mail")
        return within, timeout

    def _state(self, key: str) -> _Address:
        state = self._addresses.get(key)
        if state is None:
            state = self._addresses[key] = _Address()
        return state

    def _begin(self, key: Optional[str], count: int, fallback: Callable[[int], Optional[float]]
               ) -> tuple[Optional[float], Optional[dict[str, Optional[float]]]]:
        """A wait begins: fix its trigger (``fallback(since)``: the latest request or mark in the
        address's window, see ``_Address``), so nothing done while it waits moves it. Returns
        (the wait's trigger, None); for a wait without ``to``: (the latest request or mark before
        it began, the trigger each address's next wait would get now)."""
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

    def _end(self, key: Optional[str]) -> None:
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

    def _known_trigger(self, msg: Message, criteria: Criteria,
                       fallback: Callable[[int], Optional[float]]) -> Optional[float]:
        """The trigger of an unexpected message: the one its address's next wait would get now."""
        with self._lock:
            keys = [criteria.recipient] if criteria.recipient else sorted(recipients_of(msg))
            for key in keys:
                state = self._addresses.get(key)
                trigger = state.resolve(fallback) if state is not None else None
                if trigger is not None:
                    return trigger
        return None

    @staticmethod
    def _stamp(msg: Message, criteria: Criteria, trigger: Optional[float],
               resolved: Optional[dict[str, Optional[float]]]) -> None:
        """``msg.triggered_at = the wait's trigger``. Without ``to``: the trigger its first
        recipient with one would have had when the wait began (``resolved``), else the latest
        request or mark before the wait began (a request made while waiting never counts)."""
        if criteria.recipient or resolved is None:
            msg.triggered_at = trigger
            return
        for rcpt in sorted(recipients_of(msg)):
            known = resolved.get(rcpt, trigger)
            if known is not None:
                msg.triggered_at = known
                return
        msg.triggered_at = trigger

    def _expect_count(self, key: Optional[str], count: int, within: float) -> None:
        if key:
            expected, allowed = self.expected.get(key, (0, 0.0))
            self.expected[key] = (expected + count, max(allowed, within))

    def _wait(self, criteria: Criteria, count: int, timeout: float, since_seq: int) -> list[Message]:
        """Offer the waiter what is already here, then let deliveries wake it."""
        store = self.store
        waiter = _Waiter(criteria, count, self.claimed)
        try:
            if not store._arm(waiter, since_seq):
                try:
                    waiter.event.wait(None if math.isinf(timeout) else max(timeout, 0.0))
                finally:
                    store._disarm(waiter)
        finally:
            with store._lock:
                found = list(waiter.found)
                if waiter.error is not None or len(found) < count:  # a failed wait gives back what it took
                    self.claimed.difference_update(m.seq for m in found)
        if waiter.error is not None:
            exc = waiter.error
            raise HarnessError(
                f"the harness could not check {describe(waiter.failed_on)} against {criteria.describe()}: "
                f"{type(exc).__name__}: {exc}. This is a fault of the test's criteria (a match= callable?) "
                "or of mailproof, not a verdict on the product.") from exc
        return found

    def _verdict(self, criteria: Criteria, count: int, within: float, timeout: float, found: list[Message],
                 started: float, trigger: Optional[float], resolved: Optional[dict[str, Optional[float]]],
                 window_start: float):
        """Raise MailNotDelivered or MailLate, or notify "delivered" and return what a wait returns."""
        if len(found) < count:
            error = MailNotDelivered(
                self._explain_missing(criteria, count, found, within, timeout, window_start, trigger),
                found=found, within=within, timeout=timeout)
            self._notify("missing", None, criteria, error)
            raise error
        late: list[tuple[Message, float, bool]] = []
        for msg in found:
            self._stamp(msg, criteria, trigger, resolved)
            if msg.latency is not None:
                if msg.latency > within:
                    late.append((msg, msg.latency, True))
            elif msg.received_at is not None and msg.received_at - started > within:
                # No trigger known: it came at least this long after whatever caused it.
                late.append((msg, msg.received_at - started, False))
        error = None
        if late:
            lines = []
            for msg, seconds, from_trigger in late:
                since = "after the trigger" if from_trigger else (
                    "after the wait began (no trigger was known, so at least that long after its cause)")
                lines.append(f"{criteria.describe()}: arrived {seconds:.3f} s {since}, more than the "
                             f"{within:g} s allowed ({msg.describe()})")
            if len(found) > 1:
                lines.append(f"{len(late)} of the {len(found)} mails were late.")
            error = MailLate("\n".join(lines), messages=found, late=[m for m, _, _ in late],
                             latency=late[0][1], within=within)
        late_seqs = {m.seq for m, _, _ in late}
        for msg in found:
            late_one = msg.seq in late_seqs
            self._notify("late" if late_one else "delivered", msg, criteria, error if late_one else None)
        if error is not None:
            raise error
        return found[0] if count == 1 else found

    def _explain_missing(self, criteria, count, found, within, timeout, window_start, trigger) -> str:
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
        messages = self.messages
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


class _Expecting:
    """The context manager of ``Mailbox.expect``."""

    def __init__(self, mailbox: Mailbox, criteria: Criteria, count: int, within: float, timeout: float) -> None:
        self.mailbox = mailbox
        self.sent = ExpectedMail(criteria, count, within, timeout)
        self._entered = False

    def __enter__(self) -> ExpectedMail:
        if self._entered:
            raise MailproofError("an expectation is armed once: call mailbox.expect(...) again for another")
        self._entered = True
        mb, sent = self.mailbox, self.sent
        key = sent.criteria.recipient
        with mb._lock:
            self._triggers_before = len(mb.triggers)
        self._since_seq = mb.store.last_seq
        self._entered_at = mb.clock()
        self._previous = mb.expected.get(key) if key else None
        mb._expect_count(key, sent.count, sent.within)
        return sent

    def __exit__(self, exc_type, exc, tb) -> bool:
        mb, sent = self.mailbox, self.sent
        key = sent.criteria.recipient
        if exc_type is not None:  # withdrawn: the block failed before it could be the trigger
            if key:
                if self._previous is None:
                    mb.expected.pop(key, None)
                else:
                    mb.expected[key] = self._previous
            return False
        started = mb.clock()
        entered, entered_at = self._triggers_before, self._entered_at

        def fallback(since: int) -> Optional[float]:  # the first inside the block, else the latest before it
            inside = mb.triggers.added_after(max(since, entered))
            return inside[0] if inside else mb.triggers.latest(since, entered_at)

        trigger, resolved = mb._begin(key, sent.count, fallback)
        try:
            self._finish(started, trigger, resolved)
        finally:
            mb._end(key)
        return False

    def _finish(self, started: float, trigger: Optional[float],
                resolved: Optional[dict[str, Optional[float]]]) -> None:
        mb, sent = self.mailbox, self.sent
        criteria, key = sent.criteria, sent.criteria.recipient
        found = mb._wait(criteria, sent.count, sent.timeout, self._since_seq)
        try:
            mb._verdict(criteria, sent.count, sent.within, sent.timeout, found, started, trigger, resolved,
                        window_start=self._entered_at)
        except MailLate:
            sent.extend(found)
            raise
        sent.extend(found)
        with mb.store._lock:
            candidates = [m for m in mb.store.since(self._since_seq, to=key) if m.seq not in mb.claimed]
        extra = []
        probe = _Waiter(criteria, 1, set())
        for msg in candidates:
            try:
                matched = probe.matches(msg)
            except Exception as exc:
                mb.store.record_harness_error(("criteria", type(exc)), exc,
                                              f"checking {describe(msg)} against {criteria.describe()}")
                raise HarnessError(f"the harness could not check {describe(msg)} against {criteria.describe()}: "
                                   f"{type(exc).__name__}: {exc}; not a verdict on the product") from exc
            if matched:
                extra.append(msg)
        if extra:
            lines = [f"expected exactly {sent.count} mail(s) {criteria.describe()}, but {sent.count + len(extra)} "
                     f"had arrived by the time the {sent.count} expected had: {len(extra)} more:"]
            lines += [f"  - {describe(m)} at +{(m.received_at or 0) - self._entered_at:.3f} s"
                      for m in extra[:NEAR_MISSES_SHOWN]]
            if len(extra) > NEAR_MISSES_SHOWN:
                lines.append(f"  ... and {len(extra) - NEAR_MISSES_SHOWN} more")
            error = UnexpectedMail("\n".join(lines), messages=extra)
            for msg in extra:
                mb._notify("unexpected", msg, criteria, error)
            raise error

def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
