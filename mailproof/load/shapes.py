"""Load shapes for rehearsals: ``burst``, ``ramp`` and ``constant``, sized by a peak arrival rate
(flows started per second) and a duration: an open model (mailproof.load.shapes_config).

- ``burst``: launch day. A quiet baseline, a steep climb to the peak rate, a plateau, a decay.
- ``ramp``: steps up to the peak rate in equal stairs, to find where delivery latency breaks.
- ``constant``: the peak rate from the start.

Locust runs ``max_users`` users throughout (the concurrency cap); each waits for its next
arrival (mailproof.load.arrivals) instead of pacing itself.

``RehearsalShape`` is abstract (Locust ignores it where it is imported); a locustfile makes a
concrete one with ``shape_class(config)`` or by subclassing it and overriding ``config()``. The
``mailproof rehearse --shape`` command passes the shape to its locustfile as ``MAILPROOF_SHAPE``
(``ShapeConfig.encode``). Without a shape, Locust's own ``-u/-r/-t`` drive the run.
"""

from __future__ import annotations

from typing import Optional

from locust import LoadTestShape

from mailproof.load.shapes_config import BURST, KINDS, ShapeConfig

__all__ = ["BURST", "KINDS", "RehearsalShape", "ShapeConfig", "add_options", "shape_class"]

class RehearsalShape(LoadTestShape):
    """One class for all shapes; ``config()`` says which (abstract: subclass it or use shape_class)."""

    abstract = True

    def config(self) -> ShapeConfig:
        return ShapeConfig.from_options(self.runner.environment.parsed_options)

    def tick(self) -> Optional[tuple[int, float]]:
        return self.config().tick(self.get_run_time())


def shape_class(config: ShapeConfig) -> type:
    """A concrete LoadTestShape running ``config`` (bind it to a name in the locustfile)."""
    return type("MailproofShape", (RehearsalShape,), {"abstract": False, "config": lambda self: config})


def add_options(parser) -> None:
    """``--shape``, ``--peak-rate``, ``--duration``, ``--ramp-steps``, ``--max-users`` on Locust's command line."""
    group = parser.add_argument_group("rehearsal shape")
    group.add_argument("--shape", choices=KINDS, default="burst",
                       help="load shape (flows started per second over time): launch-day burst, step ramp, or constant")
    group.add_argument("--peak-rate", type=float, default=5.0, help="flows started per second at the peak")
    group.add_argument("--max-users", type=int, default=0,
                       help="concurrency cap (default: 10 s of flows at the peak rate, at least 10)")
    group.add_argument("--duration", type=float, default=60.0, help="seconds the shape lasts")
    group.add_argument("--ramp-steps", type=int, default=4, help="stairs of the ramp shape")
