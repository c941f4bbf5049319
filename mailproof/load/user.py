"""Locust glue: run flow functions as Locust tasks and account for every email.

Import this only in a locustfile (importing Locust monkey-patches the process). A locustfile:

    from mailproof.load import FlowUser
    from flows import signup_confirms_account, order_receipt

    class Shopper(FlowUser):
        flows = {signup_confirms_account: 3, order_receipt: 1}

(``mailproof rehearse -f FLOWS`` writes none: it runs ``mailproof/load/locustfile.py``.)

- ``flow.http`` is the Locust user's client, so the app's requests show in Locust's statistics,
  one row per route (ids templated). An answer of 400 or above is a failure there unless the flow
  says it expects it: ``flow.http.post("/reset", json=..., expect=400)`` (or ``expect=(400, 422)``).
- Each flow run starts on a fresh session, as each pytest test gets a new ``AppSession``: the
  cookies an earlier run of the same Locust user collected (a login, a cart) are dropped, and on
  the requests client so are the session headers, auth and params a run set; open connections
  stay (keep-alive carries no application state). Without this a flow would run logged in as an
  earlier run's user, and its verdict would not be the one it gets under pytest.
- Every awaited email is a Locust request event (``request_type="MAIL"``, name
  ``"<flow>: <step>"``, response time = delivery latency from the trigger, ``Message.latency``);
  a missing or late email is a failure, not a crash.
- Each deliverability check a flow runs (``msg.checks``, mailproof.checks) is a ``CHECK`` event
  named ``"<flow>: <check>"``, a failure when the check failed: Locust's statistics count the
  check failures per flow and check.
- Each flow run is a ``FLOW`` event; a run stopped by the end of the run (or the load shape) is
  interrupted, neither passed nor failed. The ledger (mailproof.load.ledger) gets every run: what
  it expected of which address, the emails its waits returned and the app's answers to the
  requests that triggered them.
- The state of the run is the environment's ``Rehearsal`` (mailproof.load.rehearsal); this
  import installs its Locust listeners (mailproof.load.listeners); distributed runs merge the
  workers' reports on the master.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Optional, Union

import gevent
import requests
from locust import FastHttpUser, HttpUser, between, events

from mailproof import checks as _checks
from mailproof.criteria import Criteria
from mailproof.errors import MailLate, MailNotDelivered, MailproofError, UnexpectedMail
from mailproof.flow import Flow, flow_info, run
from mailproof.load.fasthttp import RequestsLikeClient
from mailproof.load.ledger import Claim, arrival_key
from mailproof.load.listeners import install
from mailproof.load.rehearsal import Rehearsal
from mailproof.load.results import HttpReply
from mailproof.load.routes import header_encoding, route
from mailproof.mailbox import Mailbox
from mailproof.message import Message

install(events)
REPLY_BODY_CHARS = 300
IDLE_SECONDS = 3600.0  # a user's wait once the shape's schedule is spent (ended by the end of the run)
DEFAULT_STEP = "mail"  # the MAIL row of a wait outside any flow.step


class LocustReporter:
    """Turns flow outcomes into Locust request events; keeps what the ledger needs of the run."""

    def __init__(self, environment: Any, rehearsal: Rehearsal, flow_name: str,
                 mailbox: Optional[Mailbox] = None) -> None:
        self.environment = environment
        self.rehearsal = rehearsal
        self.flow_name = flow_name
        self.mailbox = mailbox
        self.claims: list[tuple[str, Claim]] = []  # (address, the email a wait returned)
        self.replies: dict[float, HttpReply] = {}  # trigger time -> the app's answer to that request

    def step(self, name: str):
        return contextlib.nullcontext()

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        """After each triggering request (Locust's client already recorded it): keep its answer
        under the trigger it marked, the run's latest (flows run their requests one by one)."""
        if self.mailbox is None or not len(self.mailbox.triggers):
            return
        trigger = self.mailbox.triggers.times[-1]
        status = getattr(response, "status_code", 0) or 0
        try:
            body = _reply_body(response)
        except Exception:  # undecodable body: the status is what matters
            body = ""
        self.replies[trigger] = HttpReply(method=method, path=route(url), status=int(status), body=body)

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        name = f"{self.flow_name}: {step or DEFAULT_STEP}"  # one row per step, never per address
        if msg is not None and event in ("delivered", "late") and criteria.recipient:
            key = arrival_key(msg) or f"m{msg.seq}"
            self.claims.append((criteria.recipient, Claim(key=key, t=msg.received_at, latency=msg.latency,
                                                           late=event == "late", subject=_safe_subject(msg),
                                                           message_id=_safe_message_id(msg))))
        # A missing email has no latency: it shows as a failure with response time 0.
        response_time = (msg.latency or 0.0) * 1000 if msg is not None else 0.0
        self.environment.events.request.fire(
            request_type="MAIL", name=name, response_time=response_time,
            response_length=msg.size if msg is not None else 0, exception=error, context={},
        )


def _reply_body(response: Any) -> str:
    """The first REPLY_BODY_CHARS characters of the answer, as ``response.text`` would give them,
    decoding only the bytes they can take (4 per character at most) rather than the whole body,
    for every triggering request. Without a charset the headers name, ``text``'s own detection."""
    content = getattr(response, "content", None)
    if isinstance(content, bytes):
        headers = response.headers or {}
        encoding = getattr(response, "encoding", None) or header_encoding(headers.get("content-type"))
        if encoding:
            try:
                return content[: REPLY_BODY_CHARS * 4].decode(encoding, "replace")[:REPLY_BODY_CHARS]
            except LookupError:  # a charset Python does not know: as text does
                pass
    return (getattr(response, "text", "") or "")[:REPLY_BODY_CHARS]


def _safe_subject(msg: Message) -> str:
    try:
        return msg.subject or ""
    except Exception:
        return ""


def _safe_message_id(msg: Message) -> Optional[str]:
    try:
        return msg.message_id
    except Exception:
        return None


Expect = Union[int, Iterable[int], None]


def _expected_statuses(expect: Expect) -> frozenset[int]:
    if expect is None:
        return frozenset()
    if isinstance(expect, bool) or not isinstance(expect, (int, tuple, list, set, frozenset, range)):
        raise TypeError(f"expect= takes an HTTP status or several (expect=400, expect=(400, 422)), not {expect!r}")
    statuses = frozenset([expect]) if isinstance(expect, int) else frozenset(expect)
    if not all(isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in statuses):
        raise TypeError(f"expect= takes HTTP statuses (100..599), not {expect!r}")
    return statuses


class _NamedClient:
    """Locust's client, naming requests by their path with ids templated (one stats row per route).

    An answer of 400 or above (or no answer) is a failure in Locust's statistics, unless the flow
    lists its status in ``expect=``: ``flow.http.post(url, json=..., expect=(400, 422))``. The flow
    still checks the answer itself.
    """

    def __init__(self, client: Any, timeout: Optional[float] = None) -> None:
        self._client = client
        self._timeout = timeout  # a default timeout= per request (the requests client; the fast one has its own)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in ("get", "post", "put", "patch", "delete", "head", "options", "request"):
            return attr

        def call(*args: Any, expect: Expect = None, **kwargs: Any) -> Any:
            allowed = _expected_statuses(expect)
            url = args[1] if name == "request" and len(args) > 1 else (args[0] if args else kwargs.get("url", ""))
            kwargs.setdefault("name", route(str(url)))
            kwargs["catch_response"] = True
            if self._timeout is not None:
                kwargs.setdefault("timeout", self._timeout)
            with attr(*args, **kwargs) as response:
                status = response.status_code or 0
                if status in allowed or 0 < status < 400:
                    response.success()
                elif status:
                    response.failure(f"HTTP {status}: {(response.text or '')[:200]}")
                else:
                    response.failure(f"no HTTP answer: {getattr(response, 'error', None) or 'connection failed'}")
            # Reported: from here the answer reads as requests' own (``ok``, ``raise_for_status``), as
            # under pytest; Locust's would still follow the success()/failure() above.
            if isinstance(response, requests.Response) and getattr(response, "_manual_result", None) is not None:
                response._manual_result = None
            return response

        return call


class _FlowRunner:
    """What FlowUser and FastFlowUser share: ``flows`` (a {flow_function: weight} mapping) run as
    weighted tasks, each run accounted for. ``flow_client()`` is what ``flow.http`` wraps."""

    flows: dict[Callable, int] = {}
    wait_time = between(0.5, 1.5)
    within: Optional[float] = None  # a wait's default SLO in seconds; None: the run's --within (10 s unless given)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.flows:
            cls.tasks = tasks_for(cls.flows)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)  # type: ignore[call-arg]
        self._http = _NamedClient(self.flow_client(), self.request_timeout())  # one per user: flows reuse it
        if self.rehearsal.options.shape_config:
            self.wait_time = self._open_model_wait

    @property
    def rehearsal(self) -> Rehearsal:
        return Rehearsal.of(self.environment)

    def _open_model_wait(self) -> float:
        """The open model: the shape's arrivals pace the flows, not the user (no wait between
        tasks). Once the schedule is spent the user idles in Locust's own wait, which the end of
        the run stops at once (an idle wait inside a task would hold the end for --stop-timeout)."""
        plan = self.arrival_plan()
        spent = plan is not None and (plan.stopped_at is not None or plan.next >= len(plan.offsets))
        return IDLE_SECONDS if spent else 0

    def arrival_plan(self):
        """This process's share of the load shape's arrivals; None without a shape (closed model)."""
        return self.rehearsal.arrival_plan(max(getattr(self.environment.runner, "worker_index", 0), 0))

    def request_timeout(self) -> Optional[float]:
        """The timeout= each request gets unless the flow gives one; None when the client has its own."""
        return None

    def fresh_session(self) -> None:
        """Drop what earlier flow runs left in the client's session (see the module docstring)."""
        raise NotImplementedError

    def run_flow(self, fn: Callable) -> None:
        info = flow_info(fn)
        self.fresh_session()
        rehearsal = self.rehearsal
        mailbox = rehearsal.mailbox(self.within)  # None: the run's --within
        reporter = LocustReporter(self.environment, rehearsal, info.name, mailbox)
        flow = Flow(http=self._http, mailbox=mailbox, reporter=reporter, name=info.name)
        started = time.perf_counter()
        error: Optional[BaseException] = None
        interrupted = harness = False

        def check_event(result: Any, msg: Any) -> None:
            self.environment.events.request.fire(
                request_type="CHECK", name=f"{info.name}: {result.name}", response_time=result.seconds * 1000,
                response_length=0, exception=AssertionError(result.summary) if result.failed else None, context={})
            rehearsal.record_check(info.name, result.name, result.failed)

        _checks.add_observer(check_event)  # per greenlet: Locust's gevent patches threading.local
        try:
            run(fn, flow)
        except (MailNotDelivered, MailLate, UnexpectedMail) as exc:
            error = exc  # already reported as a MAIL event
            self._fire_flow(info.name, started, exc)
        except MailproofError as exc:  # the harness (or the flow's own criteria) broke: no verdict on the app
            error, harness = exc, True
            self._fire_flow(info.name, started, exc)
        except gevent.GreenletExit:
            interrupted = True  # stopped by the end of the run (or the shape): neither passed nor failed
            raise
        except Exception as exc:  # the flow's own assertion or an app error: a failure, not a crash
            error = exc
            self._fire_flow(info.name, started, exc)
        else:
            self._fire_flow(info.name, started, None)
        finally:
            _checks.remove_observer(check_event)
            rehearsal.record_flow_run(info.name, mailbox, error, interrupted=interrupted, harness=harness,
                                      claims=reporter.claims, replies=reporter.replies)
            mailbox.close()

    def _fire_flow(self, name: str, started: float, error: Optional[BaseException]) -> None:
        self.environment.events.request.fire(
            request_type="FLOW", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={},
        )


class FlowUser(_FlowRunner, HttpUser):
    """Runs ``flows`` on Locust's requests-based HttpUser (``mailproof rehearse --client requests``)."""

    abstract = True

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        client = self.client
        self._session_start = (client.headers.copy(), client.auth, dict(client.params or {}))

    def flow_client(self) -> Any:
        return self.client

    def request_timeout(self) -> Optional[float]:
        return self.rehearsal.options.http_timeout  # as AppSession's under pytest (mailproof_http_timeout)

    def fresh_session(self) -> None:
        client = self.client
        client.cookies.clear()
        headers, client.auth, params = self._session_start
        client.headers, client.params = headers.copy(), dict(params)


class FastFlowUser(_FlowRunner, FastHttpUser):
    """Runs ``flows`` on Locust's FastHttpUser (geventhttpclient; ``--client fast``): ``flow.http``
    offers the requests-like subset flows use (mailproof.load.fasthttp), so a flow runs unchanged."""

    abstract = True

    def __init__(self, environment: Any) -> None:
        # FastHttpSession takes its timeouts when it is made; the run's --http-timeout, unless the
        # user class set its own (the fast client's only way: it refuses timeout= per request).
        timeout = Rehearsal.of(environment).options.http_timeout
        for name in ("network_timeout", "connection_timeout"):
            if getattr(type(self), name) == getattr(FastHttpUser, name):
                setattr(self, name, timeout)
        super().__init__(environment)

    def flow_client(self) -> Any:
        return RequestsLikeClient(self.client)

    def fresh_session(self) -> None:
        self.client.cookiejar.clear()  # what the app set; RequestsLikeClient changes nothing else on the session


CLIENTS = {"fast": FastFlowUser, "requests": FlowUser}  # mailproof rehearse --client


def tasks_for(mix: dict[Callable, int]) -> list[Callable]:
    """Locust's weighted task list (a task repeated weight times) for {flow: weight}. Under a load
    shape each run first waits for its arrival (mailproof.load.arrivals): the shape, not the
    users' pace, sets when flows start."""
    tasks = []
    for fn, weight in mix.items():
        def task(user: FlowUser, fn: Callable = fn) -> None:
            plan = user.arrival_plan()
            if plan is None:
                user.run_flow(fn)
                return
            if plan.claim() is None:
                return  # the schedule is spent: the user idles in its wait (_open_model_wait)
            try:
                user.run_flow(fn)
            finally:
                plan.completed()

        task.__name__ = flow_info(fn).name
        tasks.extend([task] * int(weight))
    return tasks
