"""The ledger: an account of every email a rehearsal expected, and of every email that came.

An expectation is what a flow run waited for (or armed with ``expect_no_mail``):
``Mailbox.expected``, lower-cased address -> (emails expected, seconds allowed). An address a run
handed out but never awaited is no expectation. Every captured message is an arrival, per
recipient. At the end, per flow:

    expected    = delivered + lost + unverified
    delivered   emails that arrived for an expectation (a wait returned it, or it came later,
                after the trigger, up to the end of the grace period)
    late        delivered after the seconds their wait allowed (a subset of delivered)
    lost        never arrived, and the harness saw everything the sink captured
    unverified  never seen, while the harness had gaps of its own (harness errors, not losses)
    duplicated  extra copies of an expected email (same Message-ID or Subject at that address)
    unexpected  other extra mail at the flow's addresses: at an address that expected none
                (count 0), one handed out but never awaited, or a different email
    interrupted mail to a run stopped by the end of the run (or the load shape) before it
                awaited it: never lost, never unexpected
    unawaited   mail to a run that failed, caused after its last wait and never awaited

Mail to an address no flow handed out is unexpected for the run as a whole.

Latency. Each expectation keeps the trigger of each of its emails, ``Mailbox.triggers_of(address)``
taken when the run is recorded: one per expected email, in the order the waits were made (the
welcome after the confirmation link is measured from the click, not from the signup). The k-th
email of an address is its k-th delivery: first the emails its waits returned, in order, each
keeping ``Message.latency``, the number the flow saw (received_at - that wait's trigger); then the
other arrivals in arrival order, each measured ``received_at - the trigger of the email it fills``
(an arrival before that trigger is not that email: it is extra). Every delivery is in the latency
percentiles (an email that came after its wait gave up included).

A run that is stopped (killed) in the middle is recorded like any other (``FlowUser`` records
it in ``finally``): what it had armed after a trigger is still awaited through the grace period.

Snapshots merge (distributed runs: one ledger per Locust worker, every worker streams all of
the sink's mail); arrivals are keyed by the sink service's run and seq, so one email seen by
several workers counts once, and two emails a restarted service gave the same seq count twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from mailproof.load.results import (FlowCounts, HttpReply, LedgerCounts, LostEmail, Sample, StrayEmail,
                                    Timeline, decode_record, encode_record)
from mailproof.message import Message

ADDRESSES_KEPT = 50
QUIET = 1.0  # after every expectation is met, seconds without an arrival before the ledger stops listening
STRAYS_KEPT = 200
PASSED, FAILED, INTERRUPTED = "passed", "failed", "interrupted"
OUTCOMES = (PASSED, FAILED, INTERRUPTED)


@dataclass(kw_only=True)
class Claim:
    """An email a wait of the flow returned."""

    key: str
    t: Optional[float]
    latency: Optional[float]  # Message.latency, as the flow saw it
    late: bool  # the wait said so (MailLate)
    subject: str = ""
    message_id: Optional[str] = None


@dataclass(kw_only=True)
class Arrival:
    key: str  # the sink service's seq when known, else the capture time
    t: float
    subject: str = ""
    message_id: Optional[str] = None


@dataclass(kw_only=True)
class Expectation:
    flow: str
    count: int  # emails expected (0: the flow asserted none must come)
    within: float  # seconds allowed from the trigger
    trigger: Optional[float]  # the first email's: Mailbox.trigger_of(address)
    # One per expected email, in order: Mailbox.triggers_of(address). Empty (an Expectation built
    # by hand): every email's trigger is ``trigger``.
    triggers: list[Optional[float]] = field(default_factory=list)
    run: str = PASSED  # the run's outcome: passed, failed, interrupted
    last_trigger: Optional[float] = None  # the run's latest trigger
    claims: list[Claim] = field(default_factory=list)
    reply: Optional[HttpReply] = None  # the app's answer to the first email's triggering request
    replies: list[Optional[HttpReply]] = field(default_factory=list)  # per email, as ``triggers``

    def slots(self) -> list[Optional[float]]:
        """The trigger of each expected email (``count`` of them), in order."""
        n = max(self.count, 0)
        known = list(self.triggers[:n])
        pad = known[-1] if known else self.trigger
        return known + [pad] * (n - len(known))

    def reply_of(self, k: int) -> Optional[HttpReply]:
        """The app's answer to the request that triggered the k-th email."""
        return self.replies[k] if k < len(self.replies) else self.reply

    def known_triggers(self) -> list[float]:
        return [t for t in (self.slots() or [self.trigger]) if t is not None]


@dataclass(kw_only=True)
class HandedOut:
    """An address a run handed out and never awaited."""

    flow: str
    run: str


@dataclass(kw_only=True)
class LedgerSnapshot:
    expectations: dict[str, Expectation] = field(default_factory=dict)
    handed: dict[str, HandedOut] = field(default_factory=dict)
    arrivals: dict[str, list[Arrival]] = field(default_factory=dict)
    unparsed: int = 0


@dataclass
class Delivery:
    flow: str
    address: str
    t: Optional[float]
    latency: Optional[float]
    late: bool
    trigger: Optional[float] = None  # the trigger of the expected email it is


def arrival_key(msg: Message) -> Optional[str]:
    """One email's identity across workers: the sink service's seq, qualified by the service run
    (a restarted service numbers its mail from 1 again: seq 7 before and after is two emails)."""
    extra = (msg.extra or {}) if hasattr(msg, "extra") else {}
    seq = extra.get("service_seq")
    if seq is not None:
        instance = extra.get("service_instance")
        return f"s{instance}:{seq}" if instance else f"s{seq}"
    return None if msg.received_at is None else f"t{msg.received_at!r}"


def triggers_of(mailbox: Any, address: str) -> list[Optional[float]]:
    """``Mailbox.triggers_of(address)``: the trigger of each email expected at that address, in order."""
    return list(mailbox.triggers_of(address))


@dataclass
class _Account:
    """One address worked out: what it delivered, lost, and what was extra (and why)."""

    deliveries: list[Delivery] = field(default_factory=list)
    owed: list[int] = field(default_factory=list)  # which expected emails (their index) never came
    extras: list[tuple[Arrival, str]] = field(default_factory=list)  # (arrival, category)

    @property
    def outstanding(self) -> int:
        return len(self.owed)


class Ledger:
    """Thread-safe; feed it ``record_flow`` after each flow run and ``on_arrival`` per message."""

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self._lock = threading.Condition()
        self.expectations: dict[str, Expectation] = {}
        self.handed: dict[str, HandedOut] = {}
        self.arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self.unparsed = 0  # messages without a capture time or a recipient: a harness error
        self._keys: dict[str, set[str]] = defaultdict(set)
        self._outstanding: set[str] = set()
        self._last_arrival = time.monotonic()

    # -- feeding -----------------------------------------------------------------------------

    def on_arrival(self, msg: Message) -> None:
        try:
            recipients = msg.recipients
            key = arrival_key(msg)
            subject = msg.subject or "" if recipients else ""
            message_id = msg.message_id if recipients else None
        except Exception:  # a message the harness cannot read must not end the stream
            recipients, key = frozenset(), None
        with self._lock:
            self._last_arrival = time.monotonic()
            self._lock.notify_all()
            if msg.received_at is None or key is None or not recipients:
                self.unparsed += 1
                return
            arrival = Arrival(key=key, t=float(msg.received_at), subject=str(subject or ""),
                              message_id=message_id)
            for rcpt in recipients:
                self._add(rcpt, arrival)
                if rcpt in self._outstanding and self._satisfied(rcpt):
                    self._outstanding.discard(rcpt)
            if not self._outstanding:
                self._lock.notify_all()

    def _add(self, address: str, arrival: Arrival) -> bool:
        if arrival.key in self._keys[address]:
            return False
        self._keys[address].add(arrival.key)
        self.arrivals[address].append(arrival)
        return True

    def record_flow(self, flow_name: str, mailbox: Any, *, outcome: str = PASSED,
                    claims: Iterable[tuple[str, Claim]] = (),
                    replies: Optional[dict[float, HttpReply]] = None) -> None:
        """Take a finished (or stopped) flow run: what it expected of which address, from which trigger.

        ``claims``: (address, Claim) for each email a wait returned; ``replies``: the app's
        answers by trigger time (the request each trigger marked).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        replies = replies or {}
        times = list(mailbox.triggers)
        last = max(times) if times else None
        by_address: dict[str, list[Claim]] = defaultdict(list)
        for address, claim in claims:
            by_address[address.lower()].append(claim)
        expected = dict(mailbox.expected)
        triggers = {key: (mailbox.trigger_of(key), triggers_of(mailbox, key)) for key in expected}

        def reply(trigger: Optional[float]) -> Optional[HttpReply]:
            return replies.get(trigger) if trigger is not None else None

        with self._lock:
            for key, (count, within) in expected.items():
                trigger, each = triggers[key]
                exp = Expectation(flow=flow_name, count=int(count), within=float(within), trigger=trigger,
                                  triggers=each, run=outcome, last_trigger=last, claims=by_address.get(key, []),
                                  reply=reply(trigger), replies=[reply(t) for t in each])
                self.expectations[key] = exp
                self.handed.pop(key, None)
                if self._awaited(exp) and not self._satisfied(key):
                    self._outstanding.add(key)
            for address in mailbox.handed_out:
                key = address.lower()
                if key not in expected:
                    self.handed[key] = HandedOut(flow=flow_name, run=outcome)

    @staticmethod
    def _awaited(exp: Expectation) -> bool:
        """Whether the expectation's emails are owed: armed after a trigger (or by a run that finished)."""
        return exp.count > 0 and (exp.run != INTERRUPTED or bool(exp.known_triggers()))

    def settle(self, timeout: Optional[float] = None, quiet: float = QUIET) -> bool:
        """Wait (woken by arrivals) until every expectation is met, then until no mail has come for
        ``quiet`` seconds (an app's retries and strays still in flight are counted too); at most
        ``timeout`` (``grace``) seconds in all. True when every expectation was met."""
        timeout = self.grace if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            met = self._lock.wait_for(lambda: not self._outstanding, timeout=timeout)
            while met:
                left = deadline - time.monotonic()
                silent = time.monotonic() - self._last_arrival
                if left <= 0 or silent >= quiet:
                    break
                self._lock.wait(min(left, quiet - silent))
            return met

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._outstanding)

    def _satisfied(self, address: str) -> bool:
        exp = self.expectations.get(address)
        if exp is None or not self._awaited(exp):
            return True
        return self._account(address, exp).outstanding == 0

    # -- working out one address --------------------------------------------------------------

    def _account(self, address: str, exp: Expectation) -> _Account:
        """The k-th expected email is the k-th delivery: the emails the waits returned first (each
        with the latency its wait measured), then the other arrivals in arrival order, each from
        the trigger of the email it fills (an arrival before that trigger is extra)."""
        account = _Account()
        slots = exp.slots()
        claimed = {c.key for c in exp.claims}
        claims = exp.claims[: len(slots)]
        for k, claim in enumerate(claims):
            late = claim.late or (claim.latency is not None and claim.latency > exp.within)
            account.deliveries.append(Delivery(exp.flow, address, claim.t, claim.latency, late, slots[k]))
        copies = {c.message_id for c in exp.claims if c.message_id} | {c.subject for c in exp.claims if c.subject}
        awaited = self._awaited(exp)
        k = len(claims)
        for arrival in sorted(self.arrivals.get(address, ()), key=lambda a: (a.t, a.key)):
            if arrival.key in claimed:
                continue
            owed = awaited and k < len(slots)
            trigger = slots[k] if owed else None
            if owed and (trigger is None or arrival.t >= trigger):
                latency = arrival.t - trigger if trigger is not None else None
                account.deliveries.append(Delivery(exp.flow, address, arrival.t, latency,
                                                   latency is not None and latency > exp.within, trigger))
                k += 1
                copies |= {x for x in (arrival.message_id, arrival.subject) if x}
                continue
            account.extras.append((arrival, self._extra_kind(exp, arrival, copies)))
        account.owed = list(range(k, len(slots))) if awaited else []
        return account

    @staticmethod
    def _extra_kind(exp: Expectation, arrival: Arrival, copies: set) -> str:
        known = exp.known_triggers()
        if exp.run == INTERRUPTED and not known:
            return "interrupted"  # stopped before its trigger: whatever came is the run's unfinished business
        latest = max(known) if known else None  # of the emails it expected
        caused_later = (exp.last_trigger is not None and arrival.t >= exp.last_trigger
                        and (latest is None or exp.last_trigger > latest))
        if exp.run != PASSED and caused_later:
            return "interrupted" if exp.run == INTERRUPTED else "unawaited"
        if exp.count and ((arrival.message_id and arrival.message_id in copies)
                          or (arrival.subject and arrival.subject in copies)):
            return "duplicated"
        return "unexpected"

    # -- results -----------------------------------------------------------------------------

    def recover(self, address: str, arrivals: Iterable[Arrival]) -> int:
        """Add arrivals found elsewhere (the sink service's own records); how many were new."""
        with self._lock:
            return sum(1 for arrival in arrivals if self._add(address.lower(), arrival))

    def owes(self, address: str) -> bool:
        """Whether ``address`` is still owed an email."""
        with self._lock:
            exp = self.expectations.get(address.lower())
            return exp is not None and self._awaited(exp) and self._account(address.lower(), exp).outstanding > 0

    def owed_trigger(self, address: str) -> Optional[float]:
        """The trigger of the first email ``address`` is still owed (None: owed nothing, or unknown)."""
        with self._lock:
            key = address.lower()
            exp = self.expectations.get(key)
            if exp is None or not self._awaited(exp):
                return None
            owed = self._account(key, exp).owed
            return exp.slots()[owed[0]] if owed else None

    def lost_addresses(self) -> list[str]:
        """Addresses still owed an email, by trigger time."""
        with self._lock:
            owed = []
            for a, exp in self.expectations.items():
                account = self._account(a, exp) if self._awaited(exp) else None
                if account is not None and account.owed:
                    owed.append((exp.slots()[account.owed[0]] or 0.0, a))
        return [a for _, a in sorted(owed)]

    def reconcile(self, *, unverified: Iterable[str] = (), sink_notes: Optional[dict[str, str]] = None,
                  foreign: Optional[Callable[[str], bool]] = None) -> LedgerCounts:
        """The account of the run. ``unverified``: owed addresses the harness cannot vouch for
        (its own gaps): their missing emails are ``unverified``, not ``lost``. ``sink_notes``:
        what the sink service said of an owed address. ``foreign(address)``: True for an address
        of a Locust worker whose ledger never reached the master (its mail is left out, not
        called unexpected; see ``count_foreign``)."""
        unverified = set(unverified)
        sink_notes = sink_notes or {}
        with self._lock:
            flows: dict[str, FlowCounts] = defaultdict(FlowCounts)
            lost: list[LostEmail] = []
            strays: list[StrayEmail] = []
            duplicated: Counter = Counter()
            unexpected: Counter = Counter()
            for address, exp in self.expectations.items():
                row = flows[exp.flow]
                account = self._account(address, exp)
                if exp.count == 0:
                    row.negative_checks += 1
                if self._awaited(exp):
                    row.expected += exp.count
                    row.delivered += len(account.deliveries)
                    row.late += sum(1 for d in account.deliveries if d.late)
                    if address in unverified:
                        row.unverified += account.outstanding
                    else:
                        row.lost += account.outstanding
                        slots = exp.slots()
                        for k in account.owed:
                            lost.append(LostEmail(flow=exp.flow, address=address, trigger=slots[k],
                                                  within=exp.within, run=exp.run, reply=exp.reply_of(k),
                                                  sink=sink_notes.get(address, "not checked")))
                for arrival, kind in account.extras:
                    setattr(row, kind, getattr(row, kind) + 1)
                    if kind == "duplicated":
                        duplicated[address] += 1
                    elif kind == "unexpected":
                        unexpected[address] += 1
                        why = ("the address expected no mail" if not exp.count else
                               f"an email beyond the {exp.count} expected, and no copy of one")
                        strays.append(StrayEmail(address=address, flow=exp.flow, t=arrival.t,
                                                 subject=arrival.subject, why=why))
            for address, arrivals in self.arrivals.items():
                if address in self.expectations:
                    continue
                owner = self.handed.get(address)
                if owner is None and foreign is not None and foreign(address):
                    continue
                for arrival in arrivals:
                    if owner is not None and owner.run != PASSED:
                        row = flows[owner.flow]
                        if owner.run == INTERRUPTED:
                            row.interrupted += 1
                        else:
                            row.unawaited += 1
                        continue
                    unexpected[address] += 1
                    if owner is not None:
                        flows[owner.flow].unexpected += 1
                    strays.append(StrayEmail(
                        address=address, flow=owner.flow if owner else None, t=arrival.t, subject=arrival.subject,
                        why="handed out by the flow, which never awaited mail there" if owner
                        else "no flow handed out this address"))
            lost.sort(key=lambda e: (e.trigger or 0.0, e.address))
            strays.sort(key=lambda s: (s.t, s.address))
            return LedgerCounts(
                flows=dict(sorted(flows.items())),
                unexpected=sum(unexpected.values()),
                unexpected_addresses=dict(sorted(unexpected.items())[:ADDRESSES_KEPT]),
                duplicated_addresses=dict(sorted(duplicated.items())[:ADDRESSES_KEPT]),
                lost_emails=lost,
                unexpected_emails=strays[:STRAYS_KEPT],
                handed_out=len(self.expectations) + len(self.handed),
            )

    def count_foreign(self, foreign: Callable[[str], bool]) -> int:
        """Emails to addresses nobody in this ledger handed out for which ``foreign`` is True."""
        with self._lock:
            return sum(len(arrivals) for address, arrivals in self.arrivals.items()
                       if address not in self.expectations and address not in self.handed and foreign(address))

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return [d for a, exp in self.expectations.items() if self._awaited(exp)
                    for d in self._account(a, exp).deliveries]

    def latencies(self, address: str) -> list[float]:
        """Latency of each delivery to ``address``, in order (seconds)."""
        with self._lock:
            key = address.lower()
            exp = self.expectations.get(key)
            if exp is None:
                return []
            return [d.latency for d in self._account(key, exp).deliveries if d.latency is not None]

    def latency_histograms(self):
        """Every delivery's latency, per flow, in HdrHistograms (mailproof.load.latency)."""
        from mailproof.load.latency import LatencyHistograms

        histograms = LatencyHistograms()
        for delivery in self.deliveries():
            if delivery.latency is not None:
                histograms.record(delivery.flow, max(delivery.latency, 0.0))
        return histograms

    def timeline(self) -> Timeline:
        """Per-second sends (each email's trigger) and deliveries, and one sample per delivery."""
        sends: Counter = Counter()
        deliveries: Counter = Counter()
        samples: list[Sample] = []
        with self._lock:
            for address, exp in self.expectations.items():
                if not self._awaited(exp):
                    continue
                account = self._account(address, exp)
                for d in account.deliveries:
                    trigger = (d.t - d.latency) if d.t is not None and d.latency is not None else d.trigger
                    if trigger is not None:
                        sends[int(trigger)] += 1
                    if d.t is not None:
                        deliveries[int(d.t)] += 1
                    if d.t is not None and d.latency is not None:
                        samples.append(Sample(t=d.t, latency=d.latency, flow=exp.flow, address=address))
                slots = exp.slots()
                for k in account.owed:
                    if slots[k] is not None:
                        sends[int(slots[k])] += 1
        samples.sort(key=lambda s: (s.t, s.address))
        return Timeline(sends=sorted(sends.items()), deliveries=sorted(deliveries.items()), samples=samples)

    # -- distributed runs --------------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-able copy; arrivals are included for every address so the master can tell
        another worker's mail from unexpected mail."""
        with self._lock:
            return encode_record(LedgerSnapshot(expectations=dict(self.expectations), handed=dict(self.handed),
                                                arrivals={a: list(t) for a, t in self.arrivals.items()},
                                                unparsed=self.unparsed))

    def merge(self, snapshot: Any, source: str = "ledger snapshot") -> None:
        """Add a worker's snapshot. Arrivals seen by several workers (every worker streams the
        whole sink) are counted once, by their key; so are unparsed messages (the largest count)."""
        data = decode_record(LedgerSnapshot, snapshot, source)
        with self._lock:
            self.expectations.update(data.expectations)
            for address, owner in data.handed.items():
                if address not in self.expectations:
                    self.handed[address] = owner
            for address in data.expectations:
                self.handed.pop(address, None)
            for address, arrivals in data.arrivals.items():
                for arrival in arrivals:
                    self._add(address, arrival)
            self.unparsed = max(self.unparsed, data.unparsed)
