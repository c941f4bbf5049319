"""Locust glue: run flow functions as Locust tasks and account for every email.

Import this only in a locustfile (importing Locust monkey-patches the process). A locustfile:

    from mailproof.load.locust_user import FlowUser
    from flows import signup_confirms_account, order_receipt

    class Shopper(FlowUser):
        flows = {signup_confirms_account: 3, order_receipt: 1}

- ``flow.http`` is the Locust user's client, so the app's requests show in Locust's statistics.
- Every awaited email is a Locust request event (``request_type="MAIL"``, response time = delivery
  latency from the trigger); a missing or late email is a failure, not a crash.
- Exact latencies go into per-flow HdrHistograms; the ledger counts delivered/late/lost/duplicated.
- In distributed mode each worker settles its ledger and sends it with its histograms to the
  master when the test stops; the master merges them, applies the SLO gates and sets the exit code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import gevent
from locust import HttpUser, between, events
from locust.runners import MasterRunner, WorkerRunner

from mailproof.addresses import AddressBook
from mailproof.criteria import Criteria
from mailproof.errors import MailLate, MailNotDelivered, UnexpectedMail
from mailproof.flow import Flow, flow_info, run
from mailproof.load.gates import DEFAULT_GATES, Gate, evaluate
from mailproof.load.latency import LatencyHistograms
from mailproof.load.ledger import Ledger
from mailproof.mailbox import Mailbox
from mailproof.message import Message

log = logging.getLogger("mailproof.load.locust_user")
FINISH, REPORT = "mailproof_finish", "mailproof_report"
_ID_SEGMENT = re.compile(r"(@|%40|\d)")


# -- process-wide state ----------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.backend: Any = None
        self.address_book: Optional[AddressBook] = None
        self.ledger = Ledger()
        self.latency = LatencyHistograms()
        self.reports: dict[str, dict] = {}
        self.reports_done = None  # gevent.event.Event on the master
        self.started_at = time.time()
        self.flow_runs: Counter = Counter()
        self.flow_failures: Counter = Counter()
        self.failure_samples: dict[str, str] = {}
        self.worker_accounts: dict[str, dict] = {}  # per-worker ledger counts (distributed runs)

    def connect(self, options: Any) -> None:
        from mailproof.capture.remote import RemoteSink  # gevent-friendly stream client

        url = options.mailproof_sink_url or os.environ.get("MAILPROOF_SINK_URL")
        if not url:
            raise SystemExit("mailproof: no sink service URL. Start one with `python -m mailproof.capture.service` "
                             "and pass --mailproof-sink-url or set MAILPROOF_SINK_URL.")
        token = os.environ.get("MAILPROOF_SINK_TOKEN") or None
        self.backend = RemoteSink(url, token=token).start()
        self.backend.store.add_listener(self.ledger.on_arrival)
        self.address_book = AddressBook(domain=options.mailproof_domain)


STATE = _State()


# -- the user class ----------------------------------------------------------------------------------


class LocustReporter:
    """Turns flow outcomes into Locust request events and exact latency samples."""

    def __init__(self, environment: Any, flow_name: str) -> None:
        self.environment = environment
        self.flow_name = flow_name

    def step(self, name: str):
        import contextlib

        return contextlib.nullcontext()

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        pass  # Locust's client already records it

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        name = f"{self.flow_name}: {step or criteria.describe()}"
        if msg is not None and msg.latency is not None and event in ("delivered", "late"):
            STATE.latency.record(self.flow_name, msg.latency)
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

    def run_flow(self, fn: Callable) -> None:
        info = flow_info(fn)
        mailbox = Mailbox(STATE.backend.store, STATE.address_book, default_within=self.within or 10.0)
        flow = Flow(http=_NamedClient(self.client), mailbox=mailbox,
                    reporter=LocustReporter(self.environment, info.name), name=info.name)
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
            self.environment.events.request.fire(
                request_type="FLOW", name=info.name, response_time=(time.perf_counter() - started) * 1000,
                response_length=0, exception=exc, context={},
            )
        else:
            self.environment.events.request.fire(
                request_type="FLOW", name=info.name, response_time=(time.perf_counter() - started) * 1000,
                response_length=0, exception=None, context={},
            )
        finally:
            STATE.flow_runs[info.name] += 1
            if error is not None:
                STATE.flow_failures[info.name] += 1
                STATE.failure_samples.setdefault(info.name, f"{type(error).__name__}: {error}"[:2000])
            STATE.ledger.record_flow(info.name, mailbox)
            mailbox.close()


def tasks_for(mix: dict[Callable, int]) -> list[Callable]:
    """Locust's weighted task list (a task repeated weight times) for {flow: weight}."""
    tasks = []
    for fn, weight in mix.items():
        def task(user: FlowUser, fn: Callable = fn) -> None:
            user.run_flow(fn)

        task.__name__ = flow_info(fn).name
        tasks.extend([task] * int(weight))
    return tasks


# -- command line and lifecycle ------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("mailproof")
    group.add_argument("--mailproof-sink-url", default="", env_var="MAILPROOF_SINK_URL",
                       help="URL of the sink service (python -m mailproof.capture.service)")
    group.add_argument("--mailproof-domain", default="mailproof.test", help="domain of test addresses")
    group.add_argument("--mailproof-grace", type=float, default=10.0,
                       help="seconds to wait for outstanding mail after the load stops before calling it lost")
    group.add_argument("--mailproof-gate", action="append", default=[],
                       help="an SLO gate, e.g. 'signup_confirms_account:p95<5s' (repeatable)")
    group.add_argument("--mailproof-results", default="reports/rehearsal/results.json",
                       help="where the master (or a local run) writes the ledger, percentiles and gates")


@events.init.add_listener
def _on_init(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    STATE.ledger.grace = environment.parsed_options.mailproof_grace if environment.parsed_options else 10.0
    if isinstance(runner, MasterRunner):
        from gevent.event import Event

        STATE.reports_done = Event()
        runner.register_message(REPORT, _on_worker_report)
        return
    STATE.connect(environment.parsed_options)
    if isinstance(runner, WorkerRunner):
        runner.register_message(FINISH, _on_finish_request, concurrent=True)


def _payload() -> dict:
    return {"ledger": STATE.ledger.snapshot(), "latency": STATE.latency.encode(),
            "flow_runs": dict(STATE.flow_runs), "flow_failures": dict(STATE.flow_failures),
            "failure_samples": STATE.failure_samples}


def _on_finish_request(environment: Any, msg: Any, **_kw: Any) -> None:
    """Worker: stop the users gracefully, let late mail land, then report everything once."""
    environment.runner.stop()
    STATE.ledger.settle()
    environment.runner.send_message(REPORT, _payload())


def _on_worker_report(environment: Any, msg: Any, **_kw: Any) -> None:
    STATE.reports[msg.node_id] = msg.data
    expected = {c.id for c in environment.runner.clients.all}
    if expected <= set(STATE.reports):
        STATE.reports_done.set()


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return
    if isinstance(runner, MasterRunner):
        STATE.reports_done.clear()
        runner.send_message(FINISH)
        timeout = (environment.stop_timeout or 0) + STATE.ledger.grace + 30
        if not STATE.reports_done.wait(timeout):
            missing = {c.id for c in runner.clients.all} - set(STATE.reports)
            log.error("mailproof: no ledger from workers %s within %.0f s; results cover the rest",
                      sorted(missing), timeout)
        for worker_id, data in STATE.reports.items():
            STATE.ledger.merge(data["ledger"])
            own = Ledger()
            own.merge(data["ledger"])
            STATE.worker_accounts[worker_id] = own.reconcile()["flows"]
            STATE.latency.merge(data["latency"])
            STATE.flow_runs.update(data["flow_runs"])
            STATE.flow_failures.update(data["flow_failures"])
            for name, sample in data["failure_samples"].items():
                STATE.failure_samples.setdefault(name, sample)
    else:
        STATE.ledger.settle()


@events.quitting.add_listener
def _on_quitting(environment: Any, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        if STATE.backend is not None:
            STATE.backend.stop()
        return
    options = environment.parsed_options
    results = collect_results(environment, options.mailproof_gate if options else [])
    path = Path(options.mailproof_results if options else "reports/rehearsal/results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(render_summary(results), flush=True)
    print(f"mailproof: results written to {path}", flush=True)
    if not results["passed"]:
        environment.process_exit_code = 3
    if STATE.backend is not None:
        STATE.backend.stop()


def collect_results(environment: Any, gate_texts: list[str]) -> dict:
    total = environment.stats.total
    http_requests = sum(e.num_requests for (name, method), e in environment.stats.entries.items()
                        if method not in ("MAIL", "FLOW"))
    http_failures = sum(e.num_failures for (name, method), e in environment.stats.entries.items()
                        if method not in ("MAIL", "FLOW"))
    results = {
        "ledger": STATE.ledger.reconcile(),
        "latency": STATE.latency.summary(),
        "http": {"requests": http_requests, "failures": http_failures},
        "flows": {"runs": dict(STATE.flow_runs), "failures": dict(STATE.flow_failures),
                  "failure_samples": STATE.failure_samples},
        "timeline": timeline(STATE.ledger),
        "locust": {"requests": total.num_requests, "failures": total.num_failures},
        "workers": STATE.worker_accounts,
    }
    gates = [Gate.parse(g) for g in (list(DEFAULT_GATES) + list(gate_texts))]
    verdicts = evaluate(gates, results)
    results["gates"] = [v.as_dict() for v in verdicts]
    results["passed"] = all(v.passed for v in verdicts)
    return results


def timeline(ledger: Ledger) -> dict:
    """Per-second sends (first trigger per address) and deliveries, and (time, latency) samples."""
    sends: Counter = Counter()
    deliveries: Counter = Counter()
    samples = []
    for address, exp in ledger.expectations.items():
        if exp.triggers:
            sends[int(exp.triggers[0])] += exp.count
        for received_at in sorted(ledger.arrivals.get(address, ()))[: max(exp.count, 0)]:
            deliveries[int(received_at)] += 1
            latency = exp.latency(received_at)
            if latency is not None:
                samples.append([round(received_at, 3), round(latency, 4), exp.flow])
    samples.sort()
    return {"sends": sorted(sends.items()), "deliveries": sorted(deliveries.items()), "samples": samples}


def render_summary(results: dict) -> str:
    lines = ["", "mailproof rehearsal: every email accounted for", ""]
    header = f"{'flow':34} {'expected':>8} {'delivered':>9} {'late':>5} {'lost':>5} {'dup':>4}   {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"
    lines.append(header)
    for name, row in results["ledger"]["flows"].items():
        lat = results["latency"].get(name, {})
        fmt = lambda key: f"{lat[key]:.3f}" if key in lat else "-"
        lines.append(f"{name:34} {row['expected']:>8} {row['delivered']:>9} {row['late']:>5} {row['lost']:>5} "
                     f"{row['duplicated']:>4}   {fmt('p50'):>7} {fmt('p95'):>7} {fmt('p99'):>7} {fmt('max'):>7}")
    lines.append(f"unexpected mails: {results['ledger']['unexpected']}   "
                 f"HTTP: {results['http']['requests']} requests, {results['http']['failures']} failed")
    lines.append("")
    for verdict in results["gates"]:
        lines.append(f"  [{'PASS' if verdict['passed'] else 'FAIL'}] {verdict['gate']:32} {verdict['detail']}")
    lines.append("")
    lines.append("RESULT: " + ("PASS" if results["passed"] else "FAIL (see the gates above)"))
    return "\n".join(lines)
