"""Locust glue: run flow functions as Locust tasks and account for every email.

Import this only in a locustfile (importing Locust monkey-patches the process). A locustfile:

    from mailproof.load import FlowUser
    from flows import signup_confirms_account, order_receipt

    class Shopper(FlowUser):
        flows = {signup_confirms_account: 3, order_receipt: 1}

- ``flow.http`` is the Locust user's client, so the app's requests show in Locust's statistics.
- Every awaited email is a Locust request event (``request_type="MAIL"``, response time = delivery
  latency from the trigger, ``Message.latency`` as the Mailbox stamped it); a missing or late
  email is a failure, not a crash.
- Exact latencies go into per-flow HdrHistograms; the ledger counts delivered/late/lost/duplicated.
- The state of the run is the environment's ``Rehearsal`` (mailproof.load.rehearsal), whose
  listeners this import installs; distributed runs merge the workers' reports on the master.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import gevent
from locust import HttpUser, between, events

from mailproof.criteria import Criteria
from mailproof.errors import MailLate, MailNotDelivered, UnexpectedMail
from mailproof.flow import Flow, flow_info, run
from mailproof.load.rehearsal import Rehearsal, install
from mailproof.message import Message

install(events)
_ID_SEGMENT = re.compile(r"(@|%40|\d)")


class LocustReporter:
    """Turns flow outcomes into Locust request events and exact latency samples."""

    def __init__(self, environment: Any, rehearsal: Rehearsal, flow_name: str) -> None:
        self.environment = environment
        self.rehearsal = rehearsal
        self.flow_name = flow_name

    def step(self, name: str):
        return contextlib.nullcontext()

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        pass  # Locust's client already records it

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        name = f"{self.flow_name}: {step or criteria.describe()}"
        if msg is not None and msg.latency is not None and event in ("delivered", "late"):
            self.rehearsal.latency.record(self.flow_name, msg.latency)
        # A missing email has no latency: it shows as a failure with response time 0.
        response_time = (msg.latency or 0.0) * 1000 if msg is not None else 0.0
        self.environment.events.request.fire(
            request_type="MAIL", name=name, response_time=response_time,
            response_length=msg.size if msg is not None else 0, exception=error, context={},
        )


class _NamedClient:
    """Locust's client, naming requests by their path with ids templated (one stats row per route).

    A 4xx answer is a success at the HTTP level here: flows assert on status codes themselves
    (a refused reuse of a reset code is the expected 400); 5xx and connection errors fail.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in ("get", "post", "put", "patch", "delete", "head", "options", "request"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            url = args[1] if name == "request" and len(args) > 1 else (args[0] if args else kwargs.get("url", ""))
            kwargs.setdefault("name", _route(str(url)))
            kwargs["catch_response"] = True
            with attr(*args, **kwargs) as response:
                if response.status_code and response.status_code < 500:
                    response.success()
                else:
                    response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return response

        return call


def _route(url: str) -> str:
    path = urlsplit(url).path or "/"
    return "/".join("{id}" if _ID_SEGMENT.search(seg) else seg for seg in path.split("/"))


class FlowUser(HttpUser):
    """Runs ``flows`` (a {flow_function: weight} mapping) as weighted tasks."""

    abstract = True
    flows: dict[Callable, int] = {}
    wait_time = between(0.5, 1.5)
    within: Optional[float] = None  # default seconds per wait; None keeps each flow's own bounds

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.flows:
            cls.tasks = tasks_for(cls.flows)

    @property
    def rehearsal(self) -> Rehearsal:
        return Rehearsal.of(self.environment)

    def run_flow(self, fn: Callable) -> None:
        info = flow_info(fn)
        rehearsal = self.rehearsal
        mailbox = rehearsal.mailbox(self.within or 10.0)
        flow = Flow(http=_NamedClient(self.client), mailbox=mailbox,
                    reporter=LocustReporter(self.environment, rehearsal, info.name), name=info.name)
        started = time.perf_counter()
        error: Optional[BaseException] = None
        try:
            run(fn, flow)
        except (MailNotDelivered, MailLate, UnexpectedMail) as exc:
            error = exc  # already reported as a MAIL event
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # the flow's own assertion or an app error: a failure, not a crash
            error = exc
            self._fire_flow(info.name, started, exc)
        else:
            self._fire_flow(info.name, started, None)
        finally:
            rehearsal.record_flow_run(info.name, mailbox, error)
            mailbox.close()

    def _fire_flow(self, name: str, started: float, error: Optional[BaseException]) -> None:
        self.environment.events.request.fire(
            request_type="FLOW", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={},
        )


def tasks_for(mix: dict[Callable, int]) -> list[Callable]:
    """Locust's weighted task list (a task repeated weight times) for {flow: weight}."""
    tasks = []
    for fn, weight in mix.items():
        def task(user: FlowUser, fn: Callable = fn) -> None:
            user.run_flow(fn)

        task.__name__ = flow_info(fn).name
        tasks.extend([task] * int(weight))
    return tasks
