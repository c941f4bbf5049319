"""Where a flow reports its steps, HTTP calls and mails. pytest uses Allure; Locust its events."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

from mailproof.criteria import Criteria
from mailproof.message import Message


class Reporter(Protocol):
    def step(self, name: str) -> ContextManager[Any]: ...

    def http(self, method: str, url: str, response: Any, seconds: float) -> None: ...

    def mail(self, event: str, msg: Message, criteria: Criteria) -> None: ...


class NullReporter:
    def step(self, name: str) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        pass

    def mail(self, event: str, msg: Message, criteria: Criteria) -> None:
        pass
