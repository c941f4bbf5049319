"""Load shapes as numbers: how many flows start each second (no Locust import; see mailproof.load.shapes).

A shape is an open model: it sets the **arrival rate** (flows started per second) over the run,
and flows start on that schedule whatever the application's response times. A slow application
does not lower the load it is offered (no coordinated omission); users are only a concurrency
cap (``max_users``), and an arrival that finds every user busy starts late and is counted.

- ``burst``: launch day. A quiet baseline (10 % of the peak rate), a steep climb to the peak, a
  plateau, a decay.
- ``ramp``: steps up to the peak rate in equal stairs, to find where delivery latency breaks.
- ``constant``: the peak rate from the start.

``ShapeConfig(kind, peak_rate, duration, ramp_steps, max_users)``: ``rate(t)`` is the arrival
rate at ``t`` seconds, ``offsets()`` the arrival times, ``tick(t)`` what Locust runs (all
``max_users`` users, idle until an arrival is theirs). ``encode``/``decode`` carry it to
Locust's processes (``MAILPROOF_SHAPE``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

KINDS = ("burst", "ramp", "constant")
# (progress through the run, fraction of the peak rate), linear in between.
BURST = ((0.0, 0.1), (0.15, 0.1), (0.25, 1.0), (0.70, 1.0), (0.90, 0.3), (1.0, 0.1))
FLOW_SECONDS = 10.0  # the default cap allows flows this long at the peak rate (one email, a 5 s SLO, twice)
MIN_USERS = 10
STEP = 0.01  # seconds: the integration step of offsets()


def default_max_users(peak_rate: float) -> int:
    return max(MIN_USERS, math.ceil(peak_rate * FLOW_SECONDS))


@dataclass(frozen=True)
class ShapeConfig:
    kind: str
    peak_rate: float  # flows started per second at the peak
    duration: float  # seconds
    ramp_steps: int = 4
    max_users: int = 0  # the concurrency cap; 0: default_max_users(peak_rate)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shape must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not (self.peak_rate > 0 and math.isfinite(self.peak_rate)) or not (self.duration > 0) or self.ramp_steps < 1:
            raise ValueError("a shape needs a positive peak rate (flows per second), a positive duration "
                             "and at least 1 ramp step")
        if self.max_users < 0:
            raise ValueError("--max-users must be at least 1 (or 0 for the default)")
        if self.max_users == 0:
            object.__setattr__(self, "max_users", default_max_users(self.peak_rate))

    @classmethod
    def from_options(cls, options) -> "ShapeConfig":
        """The shape Locust's parsed ``--shape/--peak-rate/--duration/--ramp-steps/--max-users`` give."""
        return cls(options.shape, float(options.peak_rate), float(options.duration),
                   int(getattr(options, "ramp_steps", 4)), int(getattr(options, "max_users", 0) or 0))

    def encode(self) -> str:
        return f"{self.kind}:{self.peak_rate:g}:{self.duration:g}:{self.ramp_steps}:{self.max_users}"

    @classmethod
    def decode(cls, text: str) -> "ShapeConfig":
        kind, rate, duration, steps, users = text.split(":")
        return cls(kind, float(rate), float(duration), int(steps), int(users))

    def rate(self, elapsed: float) -> float:
        """Arrivals per second at ``elapsed`` seconds (0 outside the run)."""
        if not 0 <= elapsed < self.duration:
            return 0.0
        progress, peak = elapsed / self.duration, self.peak_rate
        if self.kind == "constant":
            return peak
        if self.kind == "ramp":
            return peak * min(int(progress * self.ramp_steps) + 1, self.ramp_steps) / self.ramp_steps
        for (p0, f0), (p1, f1) in zip(BURST, BURST[1:]):
            if progress < p1:
                return peak * (f0 + (f1 - f0) * (progress - p0) / (p1 - p0))
        return peak * BURST[-1][1]

    def offsets(self) -> list[float]:
        """The arrival times, seconds from the start: arrival k where the expected count reaches
        k + 1/2 (a constant rate r gives (k + 1/2) / r: evenly spaced, round(r * duration) of them)."""
        found: list[float] = []
        count, t, due = 0.0, 0.0, 0.5
        while t < self.duration:
            dt = min(STEP, self.duration - t)
            r = self.rate(t + dt / 2)  # midpoint rule: exact for the piecewise-linear shapes here
            after = count + r * dt
            while after >= due:
                found.append(t + (due - count) / r)
                due += 1.0
            count, t = after, t + dt
        return found

    def tick(self, elapsed: float) -> Optional[tuple[int, float]]:
        """(users, spawn rate) for Locust at ``elapsed`` seconds; None once the run is over. Every
        user is started at once: they are the cap, idle until an arrival is theirs."""
        if elapsed >= self.duration:
            return None
        return self.max_users, float(self.max_users)
