"""Process-wide counters served at GET /metrics (one event loop, so plain numbers are safe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Metrics:
    emails_queued: int = 0
    emails_sent: int = 0
    send_attempts: int = 0
    transient_failures: int = 0
    permanent_failures: int = 0
    retry_wait_seconds: float = 0.0  # sum of the backoffs scheduled before SMTP retries
    validation_calls: int = 0
    validation_retries: int = 0
    validation_circuit_opened: int = 0  # times the breaker opened (the API looked down)
    validation_degraded: int = 0  # signups accepted without a verdict (the API gave none in time)
    validation_revalidated: int = 0  # pending signups looked up later, once the API answered
    validation_found_undeliverable: int = 0  # ... and found undeliverable
    webhook_suppressions: int = 0  # bounce/complaint events from a provider's webhook

    def snapshot(self, **extra: int) -> dict[str, float]:
        return {**asdict(self), **extra}
