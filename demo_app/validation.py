"""Client for the third-party email-validation API (Kickbox-like: GET /v2/verify?email=).

How it behaves when the provider misbehaves:

- at most ``concurrency`` lookups are in flight (a semaphore, held per HTTP attempt, never across a
  backoff sleep): a signup burst must not flood the provider into rate-limiting us harder;
- 429 and 5xx answers, timeouts, refused or dropped connections and garbled bodies are retried
  with capped exponential backoff and full jitter; a ``Retry-After`` is honoured (plus a little
  jitter, so a throttled burst does not come back in lockstep) but capped, so a huge value cannot
  stall signups;
- one lookup never takes longer than ``budget`` seconds, waiting for the semaphore included: the
  caller then gets ``ValidationUnavailable`` and applies its degradation policy (see
  ``web.on_validation_unavailable``);
- a circuit breaker: after ``failures_to_open`` failed attempts in a row (not counting 429: a
  throttling provider is alive), lookups fail at once for ``cooldown`` seconds instead of each
  signup spending its whole budget on a dead service; after that, calls go through again and the
  first success closes the circuit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiohttp

from .backoff import full_jitter, retry_after
from .metrics import Metrics

log = logging.getLogger("demo_app.validation")

BACKOFF_BASE = 0.2
BACKOFF_CAP = 2.0
ATTEMPT_TIMEOUT = 3.0  # per HTTP attempt; the overall budget bounds the whole lookup


@dataclass(frozen=True)
class Verdict:
    result: str  # deliverable | undeliverable | risky | unknown
    reason: str
    disposable: bool = False

    @property
    def undeliverable(self) -> bool:
        return self.result == "undeliverable"


class ValidationUnavailable(Exception):
    """No usable verdict within the budget (down, overloaded, misconfigured, or garbled)."""


class _Retry(Exception):
    def __init__(self, why: str, delay: float | None = None, *, alive: bool = False) -> None:
        super().__init__(why)
        self.delay = delay  # from Retry-After, when the server said
        self.alive = alive  # the server answered sensibly (429): not a failure for the breaker


class CircuitBreaker:
    """Counts failed attempts in a row; past the threshold, open for ``cooldown`` seconds."""

    def __init__(self, failures_to_open: int, cooldown: float, metrics: Metrics,
                 clock=time.monotonic) -> None:
        self.failures_to_open, self.cooldown, self.metrics, self.clock = failures_to_open, cooldown, metrics, clock
        self.failures = 0
        self.open_until = 0.0

    def open_for(self) -> float:
        """Seconds until calls may go through again (0: closed or half-open)."""
        return max(self.open_until - self.clock(), 0.0)

    def success(self) -> None:
        if self.failures >= self.failures_to_open:
            log.info("validation circuit closed: the API answers again")
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.failures_to_open and not self.open_for():
            # Opens on reaching the threshold, and again on each failed probe after a cooldown.
            self.open_until = self.clock() + self.cooldown
            self.metrics.validation_circuit_opened += 1
            log.warning("validation circuit open for %.1f s after %d failed attempts in a row",
                        self.cooldown, self.failures)


class ValidationClient:
    def __init__(self, base_url: str, api_key: str | None, metrics: Metrics,
                 concurrency: int = 8, budget: float = 3.0, failures_to_open: int = 5,
                 cooldown: float = 1.0) -> None:
        self.base_url, self.api_key, self.metrics, self.budget = base_url, api_key, metrics, budget
        self._limit = asyncio.Semaphore(concurrency)  # don't flood the provider during a burst
        self.breaker = CircuitBreaker(failures_to_open, cooldown, metrics)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def verify(self, email: str) -> Verdict:
        deadline = time.monotonic() + self.budget
        attempt = 0
        while True:
            if self.breaker.open_for():
                raise ValidationUnavailable(f"circuit open for {self.breaker.open_for():.1f} s")
            attempt += 1
            # The semaphore is held per attempt, not across backoff sleeps, and waiting for it
            # counts against the budget: in a burst, a signup must not queue here forever.
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._limit.acquire()  # cancellation-safe: a granted permit is handed back
            except TimeoutError:
                raise ValidationUnavailable("too many lookups in flight") from None
            try:
                verdict = await self._attempt(email, min(ATTEMPT_TIMEOUT, max(deadline - time.monotonic(), 0.05)))
                self.breaker.success()
                return verdict
            except _Retry as exc:
                if exc.alive:
                    self.breaker.success()  # throttled, but the provider is up
                else:
                    self.breaker.failure()
                    if self.breaker.open_for():
                        log.warning("validation gave up email=%s attempts=%d last=%s (circuit open)",
                                    email, attempt, exc)
                        raise ValidationUnavailable(f"circuit opened: {exc}") from None
                jitter = full_jitter(attempt, BACKOFF_BASE, BACKOFF_CAP)
                # Retry-After is a floor; the jitter on top keeps a throttled burst from returning in lockstep.
                delay = exc.delay + random.uniform(0.0, min(jitter, BACKOFF_BASE * 2)) if exc.delay is not None else jitter
                delay = min(delay, BACKOFF_CAP * 2)  # a huge Retry-After must not stall signups
                if time.monotonic() + delay >= deadline:
                    log.warning("validation gave up email=%s attempts=%d last=%s", email, attempt, exc)
                    raise ValidationUnavailable(str(exc)) from None
                self.metrics.validation_retries += 1
                log.info("validation retry email=%s attempt=%d why=%s delay=%.2f", email, attempt, exc, delay)
            except ValidationUnavailable:
                self.breaker.success()  # it answered (400/401/403): up, but no use retrying
                raise
            finally:
                self._limit.release()
            await asyncio.sleep(delay)

    async def _attempt(self, email: str, timeout: float) -> Verdict:
        assert self._session is not None, "start() first"
        self.metrics.validation_calls += 1
        try:
            async with self._session.get(
                f"{self.base_url}/v2/verify", params={"email": email},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise _Retry(f"HTTP {resp.status}", retry_after(resp.headers.get("Retry-After")),
                                 alive=resp.status == 429)
                if resp.status != 200:
                    # 400/401/403: retrying will not help; the caller's policy decides what to do.
                    log.error("validation refused the lookup: HTTP %s (API key or request wrong?)", resp.status)
                    raise ValidationUnavailable(f"HTTP {resp.status}")
                try:
                    body = await resp.json(content_type=None)
                    return Verdict(str(body["result"]), str(body.get("reason", "")), bool(body.get("disposable")))
                except (ValueError, KeyError, TypeError) as exc:
                    raise _Retry(f"malformed body: {exc!r}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
