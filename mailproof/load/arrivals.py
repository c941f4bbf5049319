"""Open-model arrivals: this process's share of a shape's schedule, handed to users as they come free.

A free user ``claim``s the next arrival and sleeps until it is due, then runs a flow; so each
arrival starts on time as long as some user is free when it is due. When every user is busy,
the arrival is claimed after it was due: it starts late, and counts as a **cap hit** (raise
``--max-users``). The counts are per second of the shape (offered, started, completed), so the
rehearsal report can plot them and the summary can say when the offered load was not held.

In a distributed run, worker ``i`` of ``n`` takes arrivals ``i, i + n, i + 2n, ...``: the
workers together offer the whole schedule.

No Locust here: ``sleep`` is ``time.sleep``, which Locust's gevent makes cooperative.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

CLAIMED_LATE = 0.001  # seconds: an arrival claimed later than this after it was due found every user busy


@dataclass(kw_only=True)
class ArrivalCounts:
    """Per second of the shape (index = second): arrivals offered, flows started and completed."""

    offered: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    cap_hits: int = 0  # arrivals that found every user busy: they started late
    not_started: int = 0  # arrivals due before the load stopped that no user was ever free to start
    max_users: int = 0  # the concurrency cap (per process, summed over workers)
    lag_ms: dict[str, int] = field(default_factory=dict)  # start lag in whole ms -> arrivals (for percentiles)

    @property
    def total_offered(self) -> int:
        return sum(self.offered)

    @property
    def total_started(self) -> int:
        return sum(self.started)

    @property
    def total_completed(self) -> int:
        return sum(self.completed)

    def lag_percentile(self, p: float) -> Optional[float]:
        """The start lag (seconds) at percentile ``p`` (nearest rank), None without starts."""
        items = sorted((int(ms), n) for ms, n in self.lag_ms.items())
        total = sum(n for _, n in items)
        if not total:
            return None
        rank, seen = max(1, -(-total * p // 100)), 0
        for ms, n in items:
            seen += n
            if seen >= rank:
                return ms / 1000
        return items[-1][0] / 1000

    @property
    def lag_max(self) -> Optional[float]:
        return max((int(ms) for ms in self.lag_ms), default=None) / 1000 if self.lag_ms else None

    def merge(self, other: "ArrivalCounts") -> None:
        for name in ("offered", "started", "completed"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n
        self.cap_hits += other.cap_hits
        self.not_started += other.not_started
        self.max_users += other.max_users
        lag = Counter({k: v for k, v in self.lag_ms.items()})
        lag.update(other.lag_ms)
        self.lag_ms = dict(lag)


class ArrivalPlan:
    """The arrivals of one process, in order; ``claim`` blocks until the next one is due."""

    def __init__(self, offsets: list[float], *, max_users: int, index: int = 0, count: int = 1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"worker index {index} of {count}: the index must be in 0..count-1")
        self.offsets = sorted(offsets)[index::count]
        self.max_users = max_users
        self.clock, self.sleep = clock, sleep
        self.t0: Optional[float] = None
        self.stopped_at: Optional[float] = None
        self.next = 0
        self._lock = threading.Lock()
        self._started: Counter = Counter()
        self._completed: Counter = Counter()
        self._lag_ms: Counter = Counter()
        self.cap_hits = 0

    def claim(self) -> Optional[float]:
        """Take the next arrival, sleep until it is due and return the seconds it started late
        (0.0 when on time); None once the schedule is spent. The schedule starts at the first claim."""
        with self._lock:
            now = self.clock()
            if self.t0 is None:
                self.t0 = now
            if self.next >= len(self.offsets) or self.stopped_at is not None:
                return None
            due = self.t0 + self.offsets[self.next]
            self.next += 1
            if now - due > CLAIMED_LATE:
                self.cap_hits += 1  # nobody was free when it was due
        if due > now:
            self.sleep(due - now)
        if self.stopped_at is not None and self.stopped_at < due:
            return None  # the load stopped before it was due: never offered, never started
        started = self.clock()
        lag = max(0.0, started - due)
        with self._lock:
            self._started[self._second(started)] += 1
            self._lag_ms[str(int(lag * 1000))] += 1
        return lag

    def completed(self) -> None:
        """The flow of a claimed arrival ended (passed, failed or interrupted)."""
        with self._lock:
            self._completed[self._second(self.clock())] += 1

    def stop(self) -> None:
        """The load stopped: arrivals due later were never offered; earlier ones never claimed
        found no free user (``not_started``)."""
        with self._lock:
            if self.stopped_at is None:
                self.stopped_at = self.clock()

    def _offered(self) -> list[float]:
        if self.t0 is None:
            return []
        if self.stopped_at is None:
            return self.offsets
        return [t for t in self.offsets if self.t0 + t <= self.stopped_at]

    def _second(self, at: float) -> int:
        return max(0, int(at - (self.t0 or at)))

    def counts(self) -> ArrivalCounts:
        with self._lock:
            due = self._offered()
            offered = Counter(int(t) for t in due)
            seconds = 1 + max([*offered, *self._started, *self._completed], default=-1)

            def series(counter: Counter) -> list[int]:
                return [counter.get(i, 0) for i in range(seconds)]

            return ArrivalCounts(offered=series(offered), started=series(self._started),
                                 completed=series(self._completed), cap_hits=self.cap_hits,
                                 not_started=max(0, len(due) - self.next),
                                 max_users=self.max_users, lag_ms=dict(self._lag_ms))
