"""The demo locustfile's load shape, sized from Locust's command line (--shape, --peak-rate,
--duration, --ramp-steps, --max-users). The shapes themselves are mailproof's (mailproof.load.shapes)."""

from __future__ import annotations

from mailproof.load.shapes import BURST, RehearsalShape as _Shape, add_options

__all__ = ["BURST", "RehearsalShape", "add_options"]


class RehearsalShape(_Shape):
    """burst, ramp or constant, from the parsed --shape/--peak-rate/--duration options."""
