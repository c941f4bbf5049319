"""Exact delivery-latency percentiles per flow, mergeable across Locust workers.

Locust rounds response times to about two significant digits; an HdrHistogram keeps three
(0.1 % error) over 1 µs .. 1 h in a fixed few kB, and encodes to a string the master can add up.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from hdrh.histogram import HdrHistogram

from mailproof.load.results import LatencySummary

LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3
PERCENTILES = (50, 90, 95, 99)


def _new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


class LatencyHistograms:
    """One histogram per flow name. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_flow: dict[str, HdrHistogram] = defaultdict(_new)

    def record(self, flow: str, seconds: float) -> None:
        micros = min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US)
        with self._lock:
            self._by_flow[flow].record_value(micros)

    def encode(self) -> dict[str, str]:
        with self._lock:
            return {flow: h.encode().decode("ascii") for flow, h in self._by_flow.items()}

    def merge(self, encoded: dict[str, str]) -> None:
        with self._lock:
            for flow, data in encoded.items():
                self._by_flow[flow].add(HdrHistogram.decode(data.encode("ascii")))

    def summary(self) -> dict[str, LatencySummary]:
        """Seconds: count, p50, p90, p95, p99, max, mean per flow (flows with no sample left out)."""
        with self._lock:
            out = {}
            for flow, h in sorted(self._by_flow.items()):
                if not h.get_total_count():
                    continue
                out[flow] = LatencySummary(
                    count=h.get_total_count(),
                    **{f"p{p}": h.get_value_at_percentile(p) / 1e6 for p in PERCENTILES},
                    max=h.get_max_value() / 1e6, mean=h.get_mean_value() / 1e6,
                )
            return out
