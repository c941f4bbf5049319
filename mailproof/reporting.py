"""Where a flow reports its steps, HTTP calls and mails. pytest uses Allure; Locust its events."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Protocol

from mailproof.criteria import Criteria
from mailproof.message import Message


class Reporter(Protocol):
    def step(self, name: str) -> ContextManager[Any]: ...

    def http(self, method: str, url: str, response: Any, seconds: float) -> None: ...

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None: ...


class NullReporter:
    def step(self, name: str) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        pass

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        pass
