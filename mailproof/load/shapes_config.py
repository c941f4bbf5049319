"""Load shapes as numbers: which users at which second (no Locust import; see mailproof.load.shapes).

``ShapeConfig(kind, peak_users, duration, ramp_steps).tick(elapsed)`` is (users, spawn rate), or
None once the shape is over. ``encode``/``decode`` carry it to Locust's processes
(``MAILPROOF_SHAPE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KINDS = ("burst", "ramp", "constant")
# Fractions of the run: (until, users as a fraction of the peak, spawn rate as a fraction of the peak per s).
BURST = ((0.15, 0.1, 0.5), (0.25, 1.0, 5.0), (0.70, 1.0, 1.0), (0.90, 0.3, 1.0), (1.0, 0.1, 1.0))


@dataclass(frozen=True)
class ShapeConfig:
    kind: str
    peak_users: int
    duration: float
    ramp_steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shape must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.peak_users < 1 or self.duration <= 0 or self.ramp_steps < 1:
            raise ValueError("a shape needs at least 1 peak user, a positive duration and at least 1 ramp step")

    def encode(self) -> str:
        return f"{self.kind}:{self.peak_users}:{self.duration:g}:{self.ramp_steps}"

    @classmethod
    def decode(cls, text: str) -> "ShapeConfig":
        kind, peak, duration, steps = text.split(":")
        return cls(kind, int(peak), float(duration), int(steps))

    def tick(self, elapsed: float) -> Optional[tuple[int, float]]:
        """(users, spawn rate) at ``elapsed`` seconds; None once the run is over."""
        if elapsed >= self.duration:
            return None
        progress, peak = elapsed / self.duration, self.peak_users
        if self.kind == "constant":
            return peak, float(peak)
        if self.kind == "ramp":
            step = min(int(progress * self.ramp_steps) + 1, self.ramp_steps)
            return max(1, round(peak * step / self.ramp_steps)), float(peak)
        for until, users, rate in BURST:
            if progress < until:
                return max(1, round(peak * users)), max(1.0, peak * rate)
        return None
