"""The flow runtime: what a flow function receives, identical under pytest and Locust.

A flow is a plain synchronous function ``def signup(flow): ...`` (Locust is gevent-based and
cannot drive asyncio per user, while sync code runs in both worlds).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from mailproof.criteria import Criteria
from mailproof.http import TriggeringClient
from mailproof.mailbox import Mailbox
from mailproof.message import Message
from mailproof.reporting import NullReporter, Reporter


@dataclass(frozen=True)
class FlowInfo:
    """Metadata of a flow function, for reports (Allure labels) and load mixes."""

    name: str
    feature: str
    story: str
    severity: str = "normal"
    description: str = ""
    weight: int = 1  # how often mailproof rehearse picks this flow, relative to the others


def flow(fn: Optional[Callable] = None, *, feature: Optional[str] = None, story: Optional[str] = None,
         severity: str = "normal", weight: int = 1) -> Callable:
    """Mark a function as a flow: ``@flow(feature="Accounts", story="Signup confirmation", weight=3)``.

    ``weight`` is the flow's share of a rehearsal's tasks (``mailproof rehearse``); pytest ignores it.
    """

    def decorate(func: Callable) -> Callable:
        func.__mailproof_flow__ = FlowInfo(  # type: ignore[attr-defined]
            name=func.__name__,
            feature=feature or func.__module__.rsplit(".", 1)[-1].replace("_", " ").capitalize(),
            story=story or func.__name__.replace("_", " "),
            severity=severity,
            description=(func.__doc__ or "").strip(),
            weight=weight,
        )
        return func

    return decorate(fn) if fn is not None else decorate


def flow_info(fn: Callable) -> FlowInfo:
    info = getattr(fn, "__mailproof_flow__", None)
    return info if info is not None else flow(fn).__mailproof_flow__  # type: ignore[attr-defined]


@dataclass
class StepRecord:
    name: str
    seconds: float
    ok: bool


@dataclass
class Flow:
    """What a flow function works with.

    ``http``: a requests-compatible client bound to the application; a request is the trigger
    of the handed-out addresses it carries (``Mailbox.on_request``). ``mailbox``: the Mailbox to
    hand out addresses and wait for mail. ``step(name)``: a timed, reported step. ``mails``:
    every message this run waited for (or got late), in order.
    """

    http: Any
    mailbox: Mailbox
    reporter: Reporter = field(default_factory=NullReporter)
    name: str = "flow"
    steps: list[StepRecord] = field(default_factory=list)
    mails: list[Message] = field(default_factory=list)
    current_step: str = ""

    def __post_init__(self) -> None:
        self.http = TriggeringClient(self.http, self.mailbox.on_request, self.reporter.http)
        self.mailbox.observe(self._on_mail)

    def mark(self, address: Optional[str] = None) -> float:
        """An explicit trigger, for mail caused by something other than an HTTP request: of every
        handed-out address with no trigger yet, or of ``address`` alone (``Mailbox.mark``)."""
        return self.mailbox.mark(address)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        ok = False
        outer, self.current_step = self.current_step, name
        try:
            with self.reporter.step(name):
                yield
            ok = True
        finally:
            self.current_step = outer
            self.steps.append(StepRecord(name, time.perf_counter() - started, ok))

    def _on_mail(self, event: str, msg: Optional[Message], criteria: Criteria,
                 error: Optional[Exception]) -> None:
        if msg is not None and event in ("delivered", "late"):
            self.mails.append(msg)
        self.reporter.mail(event, msg, criteria, error, self.current_step)


def run(fn: Callable[..., Any], flow_obj: Flow, **params: Any) -> Any:
    """Run one flow function; extra keyword arguments go to the function."""
    flow_obj.name = flow_info(fn).name
    return fn(flow_obj, **params)
