"""The Mailbox: the one API flows use to expect mail, whatever captured it.

A ``Mailbox`` is a view on a ``MailStore`` (``mailproof.store``) for one test or one flow run: it
hands out addresses, knows each address's trigger, only sees mail captured after it was opened,
and never returns the same message twice (each wait claims what it returns).

**The SLO and the timeout are two numbers.** ``wait_for(within=SLO, timeout=...)`` waits up to
the timeout (default: the Mailbox's ``default_timeout``, else ``max(3 * within, within + 10)``).
Mail later than the SLO but before the timeout raises ``MailLate`` (the message claimed, on the
exception); none by the timeout raises ``MailNotDelivered``.

**One trigger per expected email.** Every wait on an address gets its own trigger, the
request or mark its mail's latency is measured from: the rule is in ``mailproof.triggers``
(the ``TriggerBook`` each Mailbox owns), the text of a failed wait in ``mailproof.near_misses``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Optional, Union

from mailproof.addresses import AddressBook
from mailproof.criteria import Criteria, Text, recipients_of
from mailproof.errors import HarnessError, MailLate, MailNotDelivered, MailproofError, UnexpectedMail
from mailproof.http import carried_addresses
from mailproof.message import Message
from mailproof.near_misses import NEAR_MISSES_SHOWN, explain_extra, explain_missing  # noqa: F401 (re-export)
from mailproof.store import MailStore, _Waiter, describe
from mailproof.triggers import TriggerBook, Triggers, stamp

__all__ = ["Mailbox", "MailStore", "Triggers", "ExpectedMail"]


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
        self._triggers = TriggerBook()
        self._start_seq = store.last_seq
        self._observers: list[Callable[..., None]] = []
        self._closed = False

    # -- addresses and triggers --------------------------------------------------------------

    def address(self, label: str = "user") -> str:
        """A fresh address that nobody else will receive mail at."""
        address = self.addresses.address(label)
        self.handed_out.append(address)
        self._triggers.hand_out(address)
        self.store._hold(address)
        return address

    def on_request(self, method: str, url: Any, fields: Optional[Mapping[str, Any]] = None) -> float:
        """An HTTP request starts now (``TriggeringClient`` calls this): the trigger of the next
        wait of every handed-out address it carries that has none yet (and no wait waiting on
        it), and a fallback trigger."""
        at = self.clock()
        pending = self._triggers.request(at)
        if pending:
            try:
                carried = carried_addresses(pending, url, fields or {})
            except Exception as exc:  # never fail the product's request over this: the fallback applies
                self.store.record_harness_error(("request scan", type(exc)), exc,
                                                f"looking for addresses in {method} {url}")
                carried = []
            self._triggers.carried(carried, at)
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
        self._triggers.mark(address, at)
        return at

    def trigger_of(self, address: str) -> Optional[float]:
        """The trigger of ``address``'s first expected email (epoch seconds), None if none is known.

        Before any wait on it: the trigger decided so far for that first wait. For every email,
        see ``triggers_of``."""
        return self._triggers.first(address)

    def triggers_of(self, address: str) -> list[Optional[float]]:
        """The trigger of each email expected at ``address``, in the order the waits were made: a
        ``count=n`` wait contributes n entries (its one trigger), ``expect_no_mail`` none. An
        expectation in ``expected`` that no wait has begun for (an ``expect`` block still open)
        is given the trigger decided for the next wait, else the last wait's."""
        return self._triggers.each(address, self.expected)

    @property
    def triggers(self) -> Triggers:
        """Every request start and mark so far, sorted (what a wait with no trigger of its own falls back on)."""
        return self._triggers.triggers

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
        trigger, resolved = self._triggers.begin(key, count, self._triggers.latest_before(started))
        try:
            self._expect_count(key, count, within)
            found = self._wait(criteria, count, timeout, self._start_seq)
            return self._verdict(criteria, count, within, timeout, found, started, trigger, resolved,
                                 window_start=started)
        finally:
            self._triggers.end(key)

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
            keys = [criteria.recipient] if criteria.recipient else sorted(recipients_of(msg))
            trigger = self._triggers.unexpected(keys, self._triggers.latest_before(self.clock()))
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
                explain_missing(criteria, count, found, within, timeout, window_start, trigger, self.messages),
                found=found, within=within, timeout=timeout)
            self._notify("missing", None, criteria, error)
            raise error
        late: list[tuple[Message, float, bool]] = []
        for msg in found:
            stamp(msg, criteria.recipient, trigger, resolved)
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
        self._triggers_before = mb._triggers.added()
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
        fallback = mb._triggers.inside_else_before(self._triggers_before, self._entered_at)
        trigger, resolved = mb._triggers.begin(key, sent.count, fallback)
        try:
            self._finish(started, trigger, resolved)
        finally:
            mb._triggers.end(key)
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
            error = UnexpectedMail(explain_extra(criteria, sent.count, extra, self._entered_at), messages=extra)
            for msg in extra:
                mb._notify("unexpected", msg, criteria, error)
            raise error

def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
