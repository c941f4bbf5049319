"""Background re-validation of addresses accepted while the validation API gave no verdict.

Signups during a validation outage are accepted and marked ``pending`` (see
``web.on_validation_unavailable`` for why). This worker looks each of them up once the API answers
again, oldest first, one at a time (it shares the client's concurrency limit and circuit breaker
with live signups, and must not hog either):

- a user who already followed the confirmation link needs no lookup: the click proved the address
  (``validation = "proven"``), and a paid API call is saved;
- otherwise the verdict is recorded (``deliverable``, ``risky``, ``unknown``, or ``undeliverable``).
  An undeliverable, unconfirmed account is only flagged (and counted, and logged): the confirmation
  already sent will bounce or go unread, and the flag is what an operator or a clean-up job acts
  on. Its confirmation link still works: if the verdict was wrong, the click proves it.

While the API is still down, the worker waits for the breaker's cooldown (or, when the breaker is
closed, a capped and jittered backoff) and tries again, for as long as it takes: nothing here gives
up on a pending user.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict

from .backoff import full_jitter
from .metrics import Metrics
from .store import Store
from .validation import ValidationClient, ValidationUnavailable

log = logging.getLogger("demo_app.revalidation")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 5.0


class Revalidator:
    def __init__(self, client: ValidationClient, store: Store, metrics: Metrics) -> None:
        self.client, self.store, self.metrics = client, store, metrics
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._task: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, email: str) -> None:
        self._pending[email] = None
        self._settled.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revalidator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_settled(self, timeout: float) -> bool:
        """True once no user awaits a verdict; False on timeout."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            failures = 0
            while self._pending:
                email = next(iter(self._pending))
                try:
                    outcome = await self._revalidate(email)
                except ValidationUnavailable as exc:
                    failures += 1
                    # An open breaker already paces the probing: try again as it half-opens (a little
                    # jitter). Otherwise (e.g. the budget ran out), back off on our own.
                    open_for = self.client.breaker.open_for()
                    delay = open_for + random.uniform(0.0, 0.1) if open_for else \
                        full_jitter(failures, BACKOFF_BASE, BACKOFF_CAP)
                    log.info("revalidation deferred email=%s pending=%d why=%s retry_in=%.2f",
                             email, len(self._pending), exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except Exception:  # a bug must not stop the worker; the user stays pending
                    log.exception("revalidation crashed on %s", email)
                    await asyncio.sleep(BACKOFF_CAP)
                    continue
                failures = 0
                self._pending.pop(email, None)
                log.info("revalidated email=%s outcome=%s pending=%d", email, outcome, len(self._pending))
            self._settled.set()

    async def _revalidate(self, email: str) -> str:
        user = self.store.users.get(email)
        if user is None or user.validation != "pending":
            return "skipped"  # gone, or settled some other way meanwhile
        if user.confirmed:
            user.validation = "proven"
            return "proven"
        verdict = await self.client.verify(email)
        user = self.store.users.get(email)
        if user is None:
            return "skipped"
        if user.confirmed:  # confirmed while we asked: the click wins over any verdict
            user.validation = "proven"
            return "proven"
        user.validation = verdict.result
        self.metrics.validation_revalidated += 1
        if verdict.undeliverable:
            self.metrics.validation_found_undeliverable += 1
            log.warning("signup accepted during the validation outage is undeliverable email=%s reason=%s",
                        email, verdict.reason)
        return verdict.result
