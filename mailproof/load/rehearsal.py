"""One rehearsal's state, an object per Locust environment, and the Locust listeners that drive it.

``install(events)`` registers mailproof's command-line options and lifecycle listeners; it runs
once, when a locustfile imports ``mailproof.load.user`` (``from mailproof.load import FlowUser``).
The init listener creates a ``Rehearsal`` for the environment Locust made and attaches it to it;
users and listeners reach it with ``Rehearsal.of(environment)``. Nothing is process-wide.

A ``Rehearsal`` holds the connection to the sink service, the ledger, the latency histograms and
the flow counters. In distributed mode each worker settles its ledger when the test stops and
sends a ``WorkerReport``; the master merges the reports, applies the SLO gates and writes
results.json (``mailproof.load.results``).

Locust is imported only inside the listeners (they run under Locust): this module, and the merge
it does, can be used and tested without monkey-patching the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from mailproof.addresses import AddressBook
from mailproof.load.gates import DEFAULT_GATES, Gate, GateError
from mailproof.load.latency import LatencyHistograms
from mailproof.load.ledger import Ledger
from mailproof.load.results import (FaultRecord, FlowRuns, Harness, RehearsalResults, RequestCounts, RunInfo,
                                    SinkSnapshot, StreamCounters, WorkerAccount, decode_record, encode_record)
from mailproof.mailbox import Mailbox

log = logging.getLogger("mailproof.load.rehearsal")
FINISH, REPORT = "mailproof_finish", "mailproof_report"
ATTRIBUTE = "mailproof_rehearsal"  # where the rehearsal hangs on its Locust environment
FAILURE_SAMPLE_CHARS = 2000
DEFAULT_RESULTS = "reports/rehearsal/results.json"


@dataclass(frozen=True)
class RehearsalOptions:
    sink_url: str = ""
    token: Optional[str] = None
    domain: str = "mailproof.test"
    grace: float = 10.0
    gates: tuple[Gate, ...] = tuple(Gate.parse(g) for g in DEFAULT_GATES)
    results_path: str = DEFAULT_RESULTS
    chaos_profile: Optional[str] = None
    chaos_seed: Optional[int] = None
    host: Optional[str] = None

    @classmethod
    def from_parsed(cls, parsed: Any, host: Optional[str] = None) -> "RehearsalOptions":
        """From Locust's parsed options (None outside the command line: every default)."""
        get = (lambda name, default: getattr(parsed, name, default)) if parsed is not None else (lambda n, d: d)
        texts = list(DEFAULT_GATES) + list(get("mailproof_gate", []) or [])
        try:
            gates = tuple(Gate.parse(text) for text in texts)
        except GateError as exc:
            raise SystemExit(f"mailproof: --mailproof-gate: {exc}") from None
        return cls(sink_url=get("mailproof_sink_url", "") or os.environ.get("MAILPROOF_SINK_URL", ""),
                   token=os.environ.get("MAILPROOF_SINK_TOKEN") or None,
                   domain=get("mailproof_domain", cls.domain), grace=float(get("mailproof_grace", cls.grace)),
                   gates=gates, results_path=get("mailproof_results", DEFAULT_RESULTS) or DEFAULT_RESULTS,
                   chaos_profile=get("mailproof_chaos", None) or None, chaos_seed=get("mailproof_chaos_seed", None),
                   host=host if host is not None else get("host", None))


@dataclass(kw_only=True)
class WorkerReport:
    """What a worker sends the master when the test stops (encoded with the results codec)."""

    ledger: Any  # Ledger.snapshot()
    latency: dict[str, str]  # LatencyHistograms.encode()
    flow_runs: dict[str, int]
    flow_failures: dict[str, int]
    failure_samples: dict[str, str]
    stream: Optional[StreamCounters]
    sinks: list[SinkSnapshot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Rehearsal:
    """The state of one rehearsal in one Locust process (local, worker or master)."""

    def __init__(self, options: RehearsalOptions = RehearsalOptions(), *, role: str = "local") -> None:
        if role not in ("local", "worker", "master"):
            raise ValueError(f"role must be local, worker or master, not {role!r}")
        self.options = options
        self.role = role
        self.backend: Any = None  # RemoteSink, on local runs and workers
        self.address_book = AddressBook(domain=options.domain)
        self.ledger = Ledger(grace=options.grace)
        self.latency = LatencyHistograms()
        self.flow_runs: Counter = Counter()
        self.flow_failures: Counter = Counter()
        self.failure_samples: dict[str, str] = {}
        self.started_at: Optional[float] = None
        # Distributed runs, on the master.
        self.reports: dict[str, WorkerReport] = {}
        self.reports_done = threading.Event()  # looked up now: gevent's under Locust
        self.workers: dict[str, WorkerAccount] = {}
        self.workers_expected = 0
        self.missing_workers: list[str] = []
        self.worker_streams: list[StreamCounters] = []
        self.sinks: dict[str, SinkSnapshot] = {}
        self.notes: list[str] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, environment: Any) -> "Rehearsal":
        rehearsal = getattr(environment, ATTRIBUTE, None)
        if rehearsal is None:
            raise RuntimeError("mailproof: this Locust environment has no rehearsal. Its init event never reached "
                               "mailproof's listener: import FlowUser from mailproof.load in the locustfile "
                               "(that installs the listeners) before Locust starts.")
        return rehearsal

    def attach(self, environment: Any) -> "Rehearsal":
        setattr(environment, ATTRIBUTE, self)
        return self

    # -- local runs and workers: the sink and the flows ------------------------------------------

    def connect(self) -> None:
        from mailproof.capture.remote import RemoteSink  # gevent-friendly stream client

        if not self.options.sink_url:
            raise SystemExit("mailproof: no sink service URL. Start one with `python -m mailproof.capture.service` "
                             "and pass --mailproof-sink-url or set MAILPROOF_SINK_URL.")
        self.backend = RemoteSink(self.options.sink_url, token=self.options.token).start()
        self.backend.store.add_listener(self.ledger.on_arrival)

    def mailbox(self, within: float) -> Mailbox:
        if self.backend is None:
            raise RuntimeError("mailproof: the rehearsal is not connected to a sink service (a master runs no users)")
        return Mailbox(self.backend.store, self.address_book, default_within=within)

    def record_flow_run(self, name: str, mailbox: Mailbox, error: Optional[BaseException]) -> None:
        with self._lock:
            self.flow_runs[name] += 1
            if error is not None:
                self.flow_failures[name] += 1
                self.failure_samples.setdefault(name, f"{type(error).__name__}: {error}"[:FAILURE_SAMPLE_CHARS])
        self.ledger.record_flow(name, mailbox)

    def stream_counters(self) -> Optional[StreamCounters]:
        sink = self.backend
        if sink is None:
            return None
        return StreamCounters(received=sink.received, duplicates=sink.duplicates, missing=sink.missing,
                              reconnects=max(sink.stream_connections - 1, 0), restarts=sink.restarts,
                              evicted=sink.store.evicted)

    def snapshot_sink(self) -> None:
        """Read the sink service's counters and fault rules (after the ledger settled)."""
        from mailproof.capture.remote import RemoteSink
        from mailproof.faults.specs import rule_to_spec

        url = self.options.sink_url
        if not url:
            return
        sink = self.backend if self.backend is not None else RemoteSink(url, token=self.options.token)
        try:
            stats = sink.stats()
            specs = [rule_to_spec(rule) for rule in sink.faults.rules]
        except Exception as exc:  # the run's numbers stand without it; say what is missing
            self.notes.append(f"sink service {url}: counters and faults not read: {exc}")
            log.warning("mailproof: cannot read the sink service's counters at %s: %s", url, exc)
            return
        faults = [FaultRecord(id=int(s["id"]), name=s.get("name"), stage=s["stage"], scope=s.get("scope"),
                              match={k: s[k] for k in ("to", "to_pattern", "sender") if s.get(k) is not None},
                              action=s["action"], fired=int(s.get("fired", 0)), acted=int(s.get("acted", 0)))
                  for s in specs]
        self._keep_sink(SinkSnapshot(url=url, fetched_at=time.time(), received=int(stats["received"]),
                                     retained=int(stats["retained"]), evicted=int(stats["evicted"]),
                                     cleared=int(stats["cleared"]),
                                     smtp_connections=int(stats.get("connections", {}).get("total", 0)),
                                     faults=faults))

    def _keep_sink(self, snapshot: SinkSnapshot) -> None:
        """One snapshot per sink service: the latest (its counters only grow)."""
        known = self.sinks.get(snapshot.url)
        if known is None or snapshot.fetched_at >= known.fetched_at:
            self.sinks[snapshot.url] = snapshot

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    # -- distributed runs ------------------------------------------------------------------------

    def report(self) -> dict:
        """A worker's report for the master (JSON-able; Locust sends it with msgpack)."""
        with self._lock:
            report = WorkerReport(ledger=self.ledger.snapshot(), latency=self.latency.encode(),
                                  flow_runs=dict(self.flow_runs), flow_failures=dict(self.flow_failures),
                                  failure_samples=dict(self.failure_samples), stream=self.stream_counters(),
                                  sinks=list(self.sinks.values()), notes=list(self.notes))
        return encode_record(report)

    def add_report(self, worker_id: str, data: Any, expected: set[str]) -> bool:
        """Keep a worker's report; True once every one of ``expected`` has reported."""
        self.reports[worker_id] = decode_record(WorkerReport, data, f"report of worker {worker_id}")
        if expected <= set(self.reports):
            self.reports_done.set()
            return True
        return False

    def merge_reports(self, expected: set[str]) -> None:
        """Fold every report received into this (the master's) ledger, histograms and counters."""
        self.workers_expected = max(self.workers_expected, len(expected))
        self.missing_workers = sorted(set(expected) - set(self.reports) - set(self.workers))
        reports, self.reports = self.reports, {}  # each report is merged once
        for worker_id, report in sorted(reports.items()):
            self.ledger.merge(report.ledger)
            own = Ledger()
            own.merge(report.ledger)
            self.workers[worker_id] = WorkerAccount(flows=own.reconcile().flows, stream=report.stream)
            if report.stream is not None:
                self.worker_streams.append(report.stream)
            self.latency.merge(report.latency)
            self.flow_runs.update(report.flow_runs)
            self.flow_failures.update(report.flow_failures)
            for name, sample in report.failure_samples.items():
                self.failure_samples.setdefault(name, sample)
            for snapshot in report.sinks:
                self._keep_sink(snapshot)
            self.notes.extend(f"worker {worker_id}: {note}" for note in report.notes)

    # -- the results -----------------------------------------------------------------------------

    def results(self, *, http: RequestCounts, locust: RequestCounts,
                finished_at: Optional[float] = None) -> RehearsalResults:
        finished_at = time.time() if finished_at is None else finished_at
        if self.role == "master":
            stream = None
            if self.worker_streams:
                stream = StreamCounters()
                for counters in self.worker_streams:
                    stream.add(counters)
        else:
            stream = self.stream_counters()
        options = self.options
        results = RehearsalResults(
            run=RunInfo(started_at=self.started_at if self.started_at is not None else finished_at,
                        finished_at=finished_at, host=options.host,
                        mode="distributed" if self.role == "master" else "local",
                        workers_expected=self.workers_expected, missing_workers=list(self.missing_workers),
                        grace=options.grace, chaos_profile=options.chaos_profile, chaos_seed=options.chaos_seed),
            ledger=self.ledger.reconcile(), latency=self.latency.summary(), http=http, locust=locust,
            flows=FlowRuns(runs=dict(sorted(self.flow_runs.items())),
                           failures=dict(sorted(self.flow_failures.items())),
                           failure_samples=dict(sorted(self.failure_samples.items()))),
            timeline=self.ledger.timeline(), workers=dict(sorted(self.workers.items())),
            harness=Harness(stream=stream, sinks=[self.sinks[url] for url in sorted(self.sinks)],
                            notes=list(self.notes)),
        )
        return results.judge(list(options.gates))


# -- Locust: options and lifecycle -------------------------------------------------------------------

_installed: set[int] = set()


def install(events: Any) -> None:
    """Register mailproof's options and listeners on Locust's ``events`` (once per events object)."""
    if id(events) in _installed:
        return
    _installed.add(id(events))
    events.init_command_line_parser.add_listener(_options)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)
    events.test_stop.add_listener(_on_test_stop)
    events.quitting.add_listener(_on_quitting)


def _options(parser: Any) -> None:
    group = parser.add_argument_group("mailproof")
    group.add_argument("--mailproof-sink-url", default="", env_var="MAILPROOF_SINK_URL",
                       help="URL of the sink service (python -m mailproof.capture.service)")
    group.add_argument("--mailproof-domain", default="mailproof.test", help="domain of test addresses")
    group.add_argument("--mailproof-grace", type=float, default=10.0,
                       help="seconds to wait for outstanding mail after the load stops before calling it lost")
    group.add_argument("--mailproof-gate", action="append", default=[],
                       help="an SLO gate, e.g. 'signup_confirms_account:p95<5s' (repeatable)")
    group.add_argument("--mailproof-results", default=DEFAULT_RESULTS,
                       help="where the master (or a local run) writes results.json (docs/results.md)")
    group.add_argument("--mailproof-chaos", default="",
                       help="the fault profile the sink service was started with (recorded in the results)")
    group.add_argument("--mailproof-chaos-seed", type=int, default=None, help="its seed (recorded in the results)")


def _role(runner: Any) -> str:
    from locust.runners import MasterRunner, WorkerRunner

    return "master" if isinstance(runner, MasterRunner) else "worker" if isinstance(runner, WorkerRunner) else "local"


def _expected_workers(runner: Any) -> set[str]:
    return {client.id for client in runner.clients.all}


def _on_init(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    role = _role(runner)
    rehearsal = Rehearsal(RehearsalOptions.from_parsed(environment.parsed_options, host=environment.host),
                          role=role).attach(environment)
    if role == "master":
        runner.register_message(REPORT, _on_worker_report)
        return
    rehearsal.connect()
    if role == "worker":
        runner.register_message(FINISH, _on_finish_request, concurrent=True)


def _on_test_start(environment: Any, **_kw: Any) -> None:
    rehearsal = Rehearsal.of(environment)
    if rehearsal.started_at is None:
        rehearsal.started_at = time.time()


def _on_finish_request(environment: Any, msg: Any, **_kw: Any) -> None:
    """Worker: stop the users gracefully, let late mail land, then report everything once."""
    rehearsal = Rehearsal.of(environment)
    environment.runner.stop()
    rehearsal.ledger.settle()
    rehearsal.snapshot_sink()
    environment.runner.send_message(REPORT, rehearsal.report())


def _on_worker_report(environment: Any, msg: Any, **_kw: Any) -> None:
    Rehearsal.of(environment).add_report(msg.node_id, msg.data, _expected_workers(environment.runner))


def _on_test_stop(environment: Any, **_kw: Any) -> None:
    rehearsal = Rehearsal.of(environment)
    if rehearsal.role == "worker":
        return
    if rehearsal.role == "local":
        rehearsal.ledger.settle()
        rehearsal.snapshot_sink()
        return
    runner = environment.runner
    expected = _expected_workers(runner)
    rehearsal.reports_done.clear()
    runner.send_message(FINISH)
    timeout = (environment.stop_timeout or 0) + rehearsal.options.grace + 30
    if not rehearsal.reports_done.wait(timeout):
        log.error("mailproof: no ledger from workers %s within %.0f s; results cover the rest",
                  sorted(expected - set(rehearsal.reports)), timeout)
    rehearsal.merge_reports(expected)
    rehearsal.snapshot_sink()  # the master's own view, when it knows the sink (newer than the workers')


def _on_quitting(environment: Any, **_kw: Any) -> None:
    from mailproof.load.summary import render_summary

    rehearsal = Rehearsal.of(environment)
    if rehearsal.role == "worker":
        rehearsal.stop()
        return
    results = rehearsal.results(**request_counts(environment))
    path = results.write(rehearsal.options.results_path)
    print(render_summary(results), flush=True)
    print(f"mailproof: results written to {path}", flush=True)
    if not results.passed:
        environment.process_exit_code = 3
    rehearsal.stop()


def request_counts(environment: Any) -> dict[str, RequestCounts]:
    """HTTP requests (Locust's rows other than MAIL and FLOW events) and all of Locust's requests."""
    entries = environment.stats.entries.items()
    http = RequestCounts(requests=sum(e.num_requests for (_, method), e in entries if method not in ("MAIL", "FLOW")),
                         failures=sum(e.num_failures for (_, method), e in entries if method not in ("MAIL", "FLOW")))
    total = environment.stats.total
    return {"http": http, "locust": RequestCounts(requests=total.num_requests, failures=total.num_failures)}
