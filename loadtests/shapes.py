"""Load shapes for rehearsals, sized from the command line (--peak-users, --duration).

- ``burst``: launch day. A quiet baseline, a steep spike to the peak, a plateau, a decay.
- ``ramp``: steps up to the peak in equal stairs, to find where delivery latency breaks.
- ``constant``: the peak number of users from the start (each user paces itself, see locustfile).
"""

from __future__ import annotations

from typing import Optional

from locust import LoadTestShape

# Fractions of the run: (until, users as a fraction of the peak, spawn rate as a fraction of the peak per s).
BURST = ((0.15, 0.1, 0.5), (0.25, 1.0, 5.0), (0.70, 1.0, 1.0), (0.90, 0.3, 1.0), (1.0, 0.1, 1.0))


class RehearsalShape(LoadTestShape):
    """One class for all shapes, picked with --shape, so the locustfile keeps a single shape."""

    def tick(self) -> Optional[tuple[int, float]]:
        options = self.runner.environment.parsed_options
        duration, peak, kind = options.duration, max(options.peak_users, 1), options.shape
        elapsed = self.get_run_time()
        if elapsed >= duration:
            return None
        progress = elapsed / duration
        if kind == "constant":
            return peak, float(peak)
        if kind == "ramp":
            steps = max(options.ramp_steps, 1)
            step = min(int(progress * steps) + 1, steps)
            return max(1, round(peak * step / steps)), float(peak)
        for until, users, rate in BURST:
            if progress < until:
                return max(1, round(peak * users)), max(1.0, peak * rate)
        return None


def add_options(parser) -> None:
    group = parser.add_argument_group("rehearsal shape")
    group.add_argument("--shape", choices=("burst", "ramp", "constant"), default="burst",
                       help="load shape: launch-day burst, step ramp, or constant")
    group.add_argument("--peak-users", type=int, default=20, help="users at the peak of the shape")
    group.add_argument("--duration", type=float, default=60.0, help="seconds the shape lasts")
    group.add_argument("--ramp-steps", type=int, default=4, help="stairs of the ramp shape")
