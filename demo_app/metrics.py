"""Process-wide counters served at GET /metrics (one event loop, so plain ints are safe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Metrics:
    emails_queued: int = 0
    emails_sent: int = 0
    send_attempts: int = 0
    transient_failures: int = 0
    permanent_failures: int = 0
    validation_calls: int = 0
    validation_retries: int = 0

    def snapshot(self, **extra: int) -> dict[str, int]:
        return {**asdict(self), **extra}
