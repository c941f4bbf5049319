"""The ledger: an account of every email a rehearsal expected, and of every email that came.

Every address a flow hands out is an expectation (how many messages, within how many seconds of
the trigger). Every captured message is an arrival. At the end, per flow:

    expected   = delivered + lost            (always reconciles)
    late       = delivered after the allowed seconds (a subset of delivered)
    duplicated = arrivals beyond what an address expected
    unexpected = arrivals at addresses nobody handed out (per run, not per flow)

Addresses are unique per expectation, so the ledger needs no message content: only recipients
and arrival times. Snapshots merge (distributed runs: one ledger per Locust worker).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from mailproof.mailbox import Mailbox
from mailproof.message import Message


@dataclass
class Expectation:
    flow: str
    count: int  # messages expected (0: the flow asserted none must come)
    within: float  # seconds allowed from the trigger
    triggers: list[float] = field(default_factory=list)

    def latency(self, received_at: float) -> Optional[float]:
        before = [t for t in self.triggers if t <= received_at]
        return received_at - before[-1] if before else None


@dataclass
class FlowAccount:
    expected: int = 0
    delivered: int = 0
    late: int = 0
    lost: int = 0
    duplicated: int = 0
    negative_checks: int = 0  # addresses that expected no mail

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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
        triggers = list(mailbox._triggers)
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

    def reconcile(self) -> dict:
        with self._lock:
            flows: dict[str, FlowAccount] = defaultdict(FlowAccount)
            latencies: dict[str, list[float]] = defaultdict(list)
            for address, exp in self.expectations.items():
                account = flows[exp.flow]
                times = sorted(self.arrivals.get(address, ()))
                if exp.count == 0:
                    account.negative_checks += 1
                account.expected += exp.count
                delivered = times[: exp.count]
                account.delivered += len(delivered)
                account.lost += exp.count - len(delivered)
                account.duplicated += max(0, len(times) - exp.count)
                for received_at in delivered:
                    latency = exp.latency(received_at)
                    if latency is not None:
                        latencies[exp.flow].append(latency)
                        if latency > exp.within:
                            account.late += 1
            unexpected = {a: len(t) for a, t in self.arrivals.items() if a not in self.expectations}
            return {
                "flows": {name: account.as_dict() for name, account in sorted(flows.items())},
                "unexpected": sum(unexpected.values()),
                "unexpected_addresses": dict(sorted(unexpected.items())[:50]),
                "handed_out": len(self.expectations),
            }

    # -- distributed runs --------------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-able copy; arrivals are included for every address so the master can tell
        foreign (another worker's) mail from unexpected mail."""
        with self._lock:
            return {
                "expectations": {a: [e.flow, e.count, e.within, e.triggers] for a, e in self.expectations.items()},
                "arrivals": {a: list(t) for a, t in self.arrivals.items()},
            }

    def merge(self, snapshot: dict) -> None:
        """Add a worker's snapshot. Arrivals seen by several workers (one sink per machine,
        every worker streams all of it) are counted once, keyed by their arrival time."""
        with self._lock:
            for address, (flow, count, within, triggers) in snapshot["expectations"].items():
                self.expectations[address] = Expectation(flow, count, within, list(triggers))
            for address, times in snapshot["arrivals"].items():
                known = set(self.arrivals.get(address, ()))
                self.arrivals[address].extend(t for t in times if t not in known)
