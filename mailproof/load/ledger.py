"""The ledger: an account of every email a rehearsal expected, and of every email that came.

Every address a flow hands out is an expectation (how many messages, within how many seconds of
the trigger). Every captured message is an arrival. At the end, per flow:

    expected   = delivered + lost            (always reconciles)
    late       = delivered after the allowed seconds (a subset of delivered)
    duplicated = arrivals beyond what an address expected
    unexpected = arrivals at addresses nobody handed out (per run, not per flow)

Addresses are unique per expectation, so the ledger needs no message content: only recipients
and arrival times. Snapshots merge (distributed runs: one ledger per Locust worker).

Latency is not computed here: each expectation keeps its flow run's ``Triggers`` (the Mailbox's),
and an arrival's latency is ``Triggers.latency``, the very number the Mailbox stamped on the
message when a wait returned it (``Message.latency``). Arrivals no wait returned (mail that came
after its flow gave up) are measured with the same object.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from mailproof.load.results import FlowCounts, LedgerCounts, Sample, Timeline
from mailproof.mailbox import Mailbox, Triggers
from mailproof.message import Message

UNEXPECTED_ADDRESSES_KEPT = 50


@dataclass
class Expectation:
    flow: str
    count: int  # messages expected (0: the flow asserted none must come)
    within: float  # seconds allowed from the trigger
    triggers: Triggers = field(default_factory=Triggers)

    def __post_init__(self) -> None:
        if not isinstance(self.triggers, Triggers):
            self.triggers = Triggers(self.triggers)

    def latency(self, received_at: float) -> Optional[float]:
        return self.triggers.latency(received_at)


class Ledger:
    """Thread-safe; feed it ``record_flow`` after each flow run and ``on_arrival`` per message."""

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self._lock = threading.Condition()
        self.expectations: dict[str, Expectation] = {}
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self._outstanding: set[str] = set()

    # -- feeding -----------------------------------------------------------------------------

    def on_arrival(self, msg: Message) -> None:
        if msg.received_at is None:
            return
        with self._lock:
            for rcpt in msg.recipients:
                self.arrivals[rcpt].append(msg.received_at)
                if rcpt in self._outstanding and self._satisfied(rcpt):
                    self._outstanding.discard(rcpt)
            if not self._outstanding:
                self._lock.notify_all()

    def record_flow(self, flow_name: str, mailbox: Mailbox) -> None:
        """Take a finished flow run's addresses and what it expected of them."""
        triggers = Triggers(mailbox.triggers)  # a copy: the flow run is over
        with self._lock:
            for address in mailbox.handed_out:
                key = address.lower()
                count, within = mailbox.expected.get(key, (1, mailbox.default_within))
                self.expectations[key] = Expectation(flow_name, count, within, triggers)
                if not self._satisfied(key):
                    self._outstanding.add(key)

    def settle(self, timeout: Optional[float] = None) -> bool:
        """Wait (woken by arrivals) until every expectation is met, at most ``grace`` seconds."""
        timeout = self.grace if timeout is None else timeout
        with self._lock:
            return self._lock.wait_for(lambda: not self._outstanding, timeout=timeout)

    def _satisfied(self, address: str) -> bool:
        expectation = self.expectations.get(address)
        return expectation is None or len(self.arrivals.get(address, ())) >= expectation.count

    # -- results -----------------------------------------------------------------------------

    def _delivered(self, exp: Expectation, address: str) -> list[float]:
        """Arrival times that count as the expected deliveries (the first ``count``), in order."""
        return sorted(self.arrivals.get(address, ()))[: max(exp.count, 0)]

    def reconcile(self) -> LedgerCounts:
        with self._lock:
            flows: dict[str, FlowCounts] = defaultdict(FlowCounts)
            for address, exp in self.expectations.items():
                account = flows[exp.flow]
                arrived = len(self.arrivals.get(address, ()))
                if exp.count == 0:
                    account.negative_checks += 1
                account.expected += exp.count
                delivered = self._delivered(exp, address)
                account.delivered += len(delivered)
                account.lost += exp.count - len(delivered)
                account.duplicated += max(0, arrived - exp.count)
                for received_at in delivered:
                    latency = exp.latency(received_at)
                    if latency is not None and latency > exp.within:
                        account.late += 1
            unexpected = {a: len(t) for a, t in self.arrivals.items() if a not in self.expectations}
            return LedgerCounts(
                flows=dict(sorted(flows.items())),
                unexpected=sum(unexpected.values()),
                unexpected_addresses=dict(sorted(unexpected.items())[:UNEXPECTED_ADDRESSES_KEPT]),
                handed_out=len(self.expectations),
            )

    def latencies(self, address: str) -> list[float]:
        """Latency of each expected delivery to ``address``, in arrival order (seconds)."""
        with self._lock:
            exp = self.expectations.get(address.lower())
            if exp is None:
                return []
            return [lat for t in self._delivered(exp, address.lower())
                    if (lat := exp.latency(t)) is not None]

    def timeline(self) -> Timeline:
        """Per-second sends (first trigger per address) and deliveries, and one sample per delivery."""
        sends: Counter = Counter()
        deliveries: Counter = Counter()
        samples: list[Sample] = []
        with self._lock:
            for address, exp in self.expectations.items():
                if exp.triggers and exp.count:
                    sends[int(exp.triggers.times[0])] += exp.count
                for received_at in self._delivered(exp, address):
                    deliveries[int(received_at)] += 1
                    latency = exp.latency(received_at)
                    if latency is not None:
                        samples.append(Sample(t=received_at, latency=latency, flow=exp.flow, address=address))
        samples.sort(key=lambda s: (s.t, s.address))
        return Timeline(sends=sorted(sends.items()), deliveries=sorted(deliveries.items()), samples=samples)

    # -- distributed runs --------------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-able copy; arrivals are included for every address so the master can tell
        foreign (another worker's) mail from unexpected mail."""
        with self._lock:
            return {
                "expectations": {a: [e.flow, e.count, e.within, e.triggers.times]
                                 for a, e in self.expectations.items()},
                "arrivals": {a: list(t) for a, t in self.arrivals.items()},
            }

    def merge(self, snapshot: dict) -> None:
        """Add a worker's snapshot. Arrivals seen by several workers (one sink per machine,
        every worker streams all of it) are counted once, keyed by their arrival time."""
        with self._lock:
            for address, (flow, count, within, triggers) in snapshot["expectations"].items():
                self.expectations[address] = Expectation(flow, count, within, Triggers(triggers))
            for address, times in snapshot["arrivals"].items():
                known = set(self.arrivals.get(address, ()))
                self.arrivals[address].extend(t for t in times if t not in known)
