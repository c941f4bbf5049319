"""Load shapes for rehearsals: ``burst``, ``ramp`` and ``constant``, sized by peak users and duration.

- ``burst``: launch day. A quiet baseline, a steep spike to the peak, a plateau, a decay.
- ``ramp``: steps up to the peak in equal stairs, to find where delivery latency breaks.
- ``constant``: the peak number of users from the start (each user paces itself).

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
        options = self.runner.environment.parsed_options
        return ShapeConfig(options.shape, max(options.peak_users, 1), options.duration,
                           getattr(options, "ramp_steps", 4))

    def tick(self) -> Optional[tuple[int, float]]:
        return self.config().tick(self.get_run_time())


def shape_class(config: ShapeConfig) -> type:
    """A concrete LoadTestShape running ``config`` (bind it to a name in the locustfile)."""
    return type("MailproofShape", (RehearsalShape,), {"abstract": False, "config": lambda self: config})


def add_options(parser) -> None:
    """``--shape``, ``--peak-users``, ``--duration``, ``--ramp-steps`` on Locust's command line."""
    group = parser.add_argument_group("rehearsal shape")
    group.add_argument("--shape", choices=KINDS, default="burst",
                       help="load shape: launch-day burst, step ramp, or constant")
    group.add_argument("--peak-users", type=int, default=20, help="users at the peak of the shape")
    group.add_argument("--duration", type=float, default=60.0, help="seconds the shape lasts")
    group.add_argument("--ramp-steps", type=int, default=4, help="stairs of the ramp shape")
