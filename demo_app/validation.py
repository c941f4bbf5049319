"""Client for the third-party email-validation API (Kickbox-like: GET /v2/verify?email=)."""

from __future__ import annotations

import asyncio
import logging
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
    def __init__(self, why: str, delay: float | None = None) -> None:
        super().__init__(why)
        self.delay = delay  # from Retry-After, when the server said


class ValidationClient:
    def __init__(self, base_url: str, api_key: str | None, metrics: Metrics,
                 concurrency: int = 8, budget: float = 10.0) -> None:
        self.base_url, self.api_key, self.metrics, self.budget = base_url, api_key, metrics, budget
        self._limit = asyncio.Semaphore(concurrency)  # don't flood the provider during a burst
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
            attempt += 1
            # The semaphore is held per attempt, not across backoff sleeps, and waiting for it
            # counts against the budget: in a burst, a signup must not queue here forever.
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._limit.acquire()  # cancellation-safe: a granted permit is handed back
            except TimeoutError:
                raise ValidationUnavailable("too many lookups in flight") from None
            try:
                return await self._attempt(email, min(ATTEMPT_TIMEOUT, max(deadline - time.monotonic(), 0.05)))
            except _Retry as exc:
                delay = exc.delay if exc.delay is not None else full_jitter(attempt, BACKOFF_BASE, BACKOFF_CAP)
                delay = min(delay, BACKOFF_CAP * 2)  # a huge Retry-After must not stall signups
                if time.monotonic() + delay >= deadline:
                    log.warning("validation gave up email=%s attempts=%d last=%s", email, attempt, exc)
                    raise ValidationUnavailable(str(exc)) from None
                self.metrics.validation_retries += 1
                log.info("validation retry email=%s attempt=%d why=%s delay=%.2f", email, attempt, exc, delay)
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
                    raise _Retry(f"HTTP {resp.status}", retry_after(resp.headers.get("Retry-After")))
                if resp.status != 200:
                    # 400/401/403: retrying will not help; the caller's policy decides what to do.
                    raise ValidationUnavailable(f"HTTP {resp.status}")
                try:
                    body = await resp.json(content_type=None)
                    return Verdict(str(body["result"]), str(body.get("reason", "")), bool(body.get("disposable")))
                except (ValueError, KeyError, TypeError) as exc:
                    raise _Retry(f"malformed body: {exc!r}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
