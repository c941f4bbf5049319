"""One rehearsal's state: a ``Rehearsal`` per Locust environment (local run, worker or master).

The Locust listeners (mailproof.load.listeners) create one for each environment and attach it;
users and listeners reach it with ``Rehearsal.of(environment)``. Nothing is process-wide.

A ``Rehearsal`` holds the connection to the sink service, the ledger (mailproof.load.ledger) and
the flow counters. When the load stops, a local run (or each worker) waits out the grace period
for outstanding mail, lets the event stream catch up with what the sink service captured, and
reads the service's counters (``finish_load``). In distributed mode each worker then sends a
``WorkerReport``; the master merges the reports (``merge_reports``). ``results`` turns the state
into the judged ``RehearsalResults`` (mailproof.load.outcome, mailproof.load.results).

No Locust here: this module, and the merge it does, can be used and tested without
monkey-patching the process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from mailproof.addresses import AddressBook
from mailproof.http import DEFAULT_HTTP_TIMEOUT
from mailproof.load.arrivals import ArrivalCounts, ArrivalPlan
from mailproof.load.gates import DEFAULT_GATES, Gate, GateError
from mailproof.load.ledger import FAILED, INTERRUPTED, PASSED, Arrival, Claim, Ledger
from mailproof.load.results import (FaultRecord, HttpReply, RehearsalResults, RequestCounts, SinkSnapshot,
                                    StreamCounters, WorkerAccount, decode_record, encode_record)
from mailproof.load.shapes_config import ShapeConfig
from mailproof.mailbox import Mailbox

log = logging.getLogger("mailproof.load.rehearsal")
ATTRIBUTE = "mailproof_rehearsal"  # where the rehearsal hangs on its Locust environment
FAILURE_SAMPLE_CHARS = 2000
DEFAULT_RESULTS = "reports/rehearsal/results.json"
CATCH_UP_SECONDS = 10.0  # how long the stream may take to deliver what the sink had captured at the end


@dataclass(frozen=True)
class RehearsalOptions:
    sink_url: str = ""
    token: Optional[str] = None
    domain: str = "mailproof.test"
    within: float = 10.0  # a wait's default SLO (pytest's mailproof_within)
    timeout: Optional[float] = None  # how long a wait waits for late mail (mailproof_timeout; None: wait_for's own)
    http_timeout: float = DEFAULT_HTTP_TIMEOUT  # seconds a flow's request may take (mailproof_http_timeout)
    grace: float = 10.0
    gates: tuple[Gate, ...] = tuple(Gate.parse(g) for g in DEFAULT_GATES)
    results_path: str = DEFAULT_RESULTS
    chaos_profile: Optional[str] = None
    chaos_seed: Optional[int] = None
    host: Optional[str] = None
    quiet: bool = False  # do not print the summary (the `mailproof` command prints it)
    users: Optional[int] = None
    spawn_rate: Optional[float] = None
    run_time: Optional[float] = None
    shape: Optional[str] = None
    shape_config: Optional[str] = None  # ShapeConfig.encode() of the run's shape (MAILPROOF_SHAPE)
    workers: int = 1  # processes sharing the shape's arrivals (MAILPROOF_WORKERS)
    flows_source: Optional[str] = None

    @classmethod
    def from_parsed(cls, parsed: Any, host: Optional[str] = None) -> "RehearsalOptions":
        """From Locust's parsed options (None outside the command line: every default)."""
        get = (lambda name, default: getattr(parsed, name, default)) if parsed is not None else (lambda n, d: d)
        texts = list(DEFAULT_GATES) + list(get("mailproof_gate", []) or [])
        try:
            gates = tuple(Gate.parse(text) for text in texts)
        except GateError as exc:
            raise SystemExit(f"mailproof: --mailproof-gate: {exc}") from None
        shape = os.environ.get("MAILPROOF_SHAPE") or get("shape", None) or None
        if shape and ":" not in shape and get("peak_rate", None) is not None:  # a locustfile's own shape options
            try:
                shape = ShapeConfig.from_options(parsed).encode()
            except ValueError as exc:
                raise SystemExit(f"mailproof: --shape: {exc}") from None
        shape_kind, shape_peak, shape_duration = _shape_facts(shape, get)
        try:
            workers = max(int(os.environ.get("MAILPROOF_WORKERS", "1")), 1)
        except ValueError:
            raise SystemExit("mailproof: MAILPROOF_WORKERS must be the number of Locust workers, "
                             f"not {os.environ['MAILPROOF_WORKERS']!r}") from None
        run_time = get("run_time", None)
        timeout = get("mailproof_timeout", None)
        spawn_rate = get("spawn_rate", None)
        return cls(sink_url=get("mailproof_sink_url", "") or os.environ.get("MAILPROOF_SINK_URL", ""),
                   token=os.environ.get("MAILPROOF_SINK_TOKEN") or None,
                   domain=get("mailproof_domain", cls.domain), grace=float(get("mailproof_grace", cls.grace)),
                   within=float(get("mailproof_within", cls.within)),
                   timeout=None if timeout is None else float(timeout),
                   http_timeout=float(get("mailproof_http_timeout", cls.http_timeout)),
                   gates=gates, results_path=get("mailproof_results", DEFAULT_RESULTS) or DEFAULT_RESULTS,
                   chaos_profile=get("mailproof_chaos", None) or None, chaos_seed=get("mailproof_chaos_seed", None),
                   host=host if host is not None else get("host", None),
                   quiet=bool(get("mailproof_quiet", False)),
                   users=shape_peak if shape_kind else get("num_users", None),
                   spawn_rate=None if shape_kind or spawn_rate is None else float(spawn_rate),
                   run_time=shape_duration if shape_kind else (float(run_time) if run_time else None),
                   shape=shape_kind, shape_config=shape if shape and ":" in shape else None, workers=workers,
                   flows_source=os.environ.get("MAILPROOF_FLOWS") or None)


def _shape_facts(shape: Optional[str], get: Callable) -> tuple[Optional[str], Optional[int], Optional[float]]:
    """(kind, users (the cap), duration) of the load shape, from MAILPROOF_SHAPE or the shape options."""
    if not shape:
        return None, None, None
    if ":" in shape:  # MAILPROOF_SHAPE, mailproof.load.shapes.ShapeConfig.encode
        config = ShapeConfig.decode(shape)
        return config.kind, config.max_users, config.duration
    users, duration = get("max_users", None), get("duration", None)
    return shape, int(users) if users else None, float(duration) if duration is not None else None


@dataclass(kw_only=True)
class WorkerReport:
    """What a worker sends the master when the test stops (encoded with the results codec)."""

    ledger: Any  # Ledger.snapshot()
    flow_runs: dict[str, int]
    flow_failures: dict[str, int]
    flow_interrupted: dict[str, int]
    failure_samples: dict[str, str]
    failure_kinds: dict[str, dict[str, int]]
    stream: Optional[StreamCounters]
    harness_flow_errors: dict[str, int] = field(default_factory=dict)
    harness_samples: dict[str, str] = field(default_factory=dict)
    check_failures: dict[str, dict[str, int]] = field(default_factory=dict)  # flow -> check -> failed checks
    behind: int = 0  # messages the sink had captured that the stream had not delivered at the end
    run_id: str = ""  # the worker's AddressBook run id (its addresses carry it)
    sinks: list[SinkSnapshot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arrivals: Optional[ArrivalCounts] = None  # under a load shape: the worker's share of its arrivals


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
        self.flow_runs: Counter = Counter()
        self.flow_failures: Counter = Counter()
        self.flow_interrupted: Counter = Counter()
        self.failure_samples: dict[str, str] = {}
        self.failure_kinds: dict[str, Counter] = defaultdict(Counter)
        self.harness_flow_errors: Counter = Counter()
        self.check_failures: dict[str, Counter] = defaultdict(Counter)  # flow -> check -> failed checks
        self.harness_samples: dict[str, str] = {}
        self.started_at: Optional[float] = None
        self.peak_users = 0
        self.behind = 0
        # Distributed runs, on the master.
        self.reports: dict[str, WorkerReport] = {}
        self.reports_done = threading.Event()  # looked up now: gevent's under Locust
        self.workers: dict[str, WorkerAccount] = {}
        self.workers_expected = 0
        self.missing_workers: list[str] = []
        self.worker_streams: list[StreamCounters] = []
        self.worker_behind: list[int] = []
        self.run_ids: set[str] = {self.address_book.run_id}
        self.sinks: dict[str, SinkSnapshot] = {}
        self.sink_started: dict[str, float] = {}  # sink URL -> when its current run started (epoch s)
        self.seen_workers: set[str] = set()  # master: every worker id seen connected during the run
        self.notes: list[str] = []
        self.arrivals: Optional[ArrivalCounts] = None  # master: the workers' arrivals, merged
        self._plan: Optional[ArrivalPlan] = None
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
            raise SystemExit("mailproof: no sink service URL. Start one with `mailproof sink` "
                             "and pass --mailproof-sink-url or set MAILPROOF_SINK_URL.")
        # Fan-in: the service streams this process only its own mail (and strays), so its stream
        # work grows with messages, not with workers times messages.
        self.backend = RemoteSink(self.options.sink_url, token=self.options.token,
                                  run=self.address_book.run_id).start()
        self.backend.store.add_listener(self.ledger.on_arrival)

    def mailbox(self, within: Optional[float] = None) -> Mailbox:
        """A flow run's mailbox: ``within`` (a user class's own), else the run's --within, and the
        run's --timeout, as the pytest plugin's mailbox takes mailproof_within and mailproof_timeout."""
        if self.backend is None:
            raise RuntimeError("mailproof: the rehearsal is not connected to a sink service (a master runs no users)")
        return Mailbox(self.backend.store, self.address_book,
                       default_within=self.options.within if within is None else within,
                       default_timeout=self.options.timeout)

    def record_flow_run(self, name: str, mailbox: Mailbox, error: Optional[BaseException], *,
                        interrupted: bool = False, harness: bool = False,
                        claims: Iterable[tuple[str, Claim]] = (),
                        replies: Optional[dict[float, HttpReply]] = None) -> None:
        """One flow run ended: passed (no error), failed (``error``) or ``interrupted`` (stopped by
        the end of the run or the load shape; never a failure). ``harness``: ``error`` is the
        harness's (a MailproofError): counted as a harness error, not as the flow failing."""
        outcome = INTERRUPTED if interrupted else FAILED if error is not None else PASSED
        with self._lock:
            self.flow_runs[name] += 1
            if interrupted:
                self.flow_interrupted[name] += 1
            elif harness and error is not None:
                self.harness_flow_errors[name] += 1
                self.harness_samples.setdefault(name, f"{type(error).__name__}: {error}"[:FAILURE_SAMPLE_CHARS])
            elif error is not None:
                self.flow_failures[name] += 1
                self.failure_kinds[name][type(error).__name__] += 1
                self.failure_samples.setdefault(name, f"{type(error).__name__}: {error}"[:FAILURE_SAMPLE_CHARS])
        self.ledger.record_flow(name, mailbox, outcome=outcome, claims=claims, replies=replies)

    def arrival_plan(self, worker_index: int = 0) -> Optional[ArrivalPlan]:
        """Under a load shape, this process's share of its arrivals (made at the first call: a
        worker knows its index once the master has acknowledged it); None without a shape."""
        if self.options.shape_config is None:
            return None
        if self._plan is None:
            with self._lock:
                if self._plan is None:
                    config = ShapeConfig.decode(self.options.shape_config)
                    count = self.options.workers if self.role == "worker" else 1
                    users = -(-config.max_users // count)  # Locust spreads the cap over the workers
                    self._plan = ArrivalPlan(config.offsets(), max_users=users, index=worker_index % count,
                                             count=count)
        return self._plan

    def stop_arrivals(self) -> None:
        if self._plan is not None:
            self._plan.stop()

    def arrival_counts(self) -> Optional[ArrivalCounts]:
        """The arrivals offered, started and completed: this process's, or (master) the merged ones."""
        if self._plan is not None:
            return self._plan.counts()
        return self.arrivals

    def record_check(self, flow: str, check: str, failed: bool) -> None:
        """A deliverability check a flow ran (mailproof.checks): failures are counted per flow and check."""
        if failed:
            with self._lock:
                self.check_failures[flow][check] += 1

    def note_users(self, count: Optional[int]) -> None:
        if count is not None:
            self.peak_users = max(self.peak_users, int(count))

    def stream_counters(self) -> Optional[StreamCounters]:
        sink = self.backend
        if sink is None:
            return None
        return StreamCounters(received=sink.received, duplicates=sink.duplicates, missing=sink.missing,
                              reconnects=max(sink.stream_connections - 1, 0), restarts=sink.restarts,
                              evicted=sink.store.evicted)

    def finish_load(self) -> None:
        """The load stopped: wait out the grace period, let the stream catch up, read the sink."""
        self.stop_arrivals()
        self.ledger.settle()
        self.catch_up()
        self.snapshot_sink()

    def catch_up(self, timeout: float = CATCH_UP_SECONDS) -> None:
        """Wait until the stream has delivered what the sink service had captured when asked; what it
        still has not delivered after ``timeout`` is counted in ``behind`` (a harness error)."""
        sink = self.backend
        if sink is None:
            return
        try:
            target = int(sink.health()["last_seq"])
        except Exception as exc:
            self.notes.append(f"sink service {self.options.sink_url}: could not check that the stream caught up: {exc}")
            return
        deadline = time.monotonic() + timeout
        while sink.last_seq < target and time.monotonic() < deadline:
            time.sleep(0.05)  # gevent's sleep under Locust: the stream greenlet runs meanwhile
        self.behind = max(target - sink.last_seq, 0)

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
        if stats.get("uptime") is not None:
            started = time.time() - float(stats["uptime"])
            self.sink_started[url] = max(self.sink_started.get(url, 0.0), started)
        faults = [FaultRecord(id=int(s["id"]), name=s.get("name"), stage=s["stage"], scope=s.get("scope"),
                              match={k: s[k] for k in ("to", "to_pattern", "sender") if s.get(k) is not None},
                              action=s["action"], fired=int(s.get("fired", 0)), acted=int(s.get("acted", 0)))
                  for s in specs]
        self._keep_sink(SinkSnapshot(url=url, fetched_at=time.time(), received=int(stats["received"]),
                                     retained=int(stats["retained"]), evicted=int(stats["evicted"]),
                                     cleared=int(stats["cleared"]), over_cap=int(stats.get("over_cap", 0)),
                                     smtp_connections=int(stats.get("connections", {}).get("total", 0)),
                                     faults=faults))

    def _keep_sink(self, snapshot: SinkSnapshot) -> None:
        """One snapshot per sink service: the latest (its counters only grow)."""
        known = self.sinks.get(snapshot.url)
        if known is None or snapshot.fetched_at >= known.fetched_at:
            self.sinks[snapshot.url] = snapshot

    def lookup(self, address: str) -> Optional[list[Arrival]]:
        """The sink service's own records of mail to ``address`` (None: it could not be asked)."""
        url = self.options.sink_url
        if not url:
            return None
        query = urllib.parse.urlencode({"to": address, "since": 0, "limit": 1000})
        request = urllib.request.Request(f"{url.rstrip('/')}/messages?{query}", headers={"Accept": "application/json"})
        if self.options.token:
            request.add_header("Authorization", f"Bearer {self.options.token}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as answer:
                found = json.loads(answer.read())["messages"]
        except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
            log.warning("mailproof: cannot look up %s at the sink service: %s", address, exc)
            return None
        return [Arrival(key=f"s{m['seq']}", t=float(m["received_at"]), subject=m.get("subject") or "")
                for m in found if m.get("received_at") is not None]

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    # -- distributed runs ------------------------------------------------------------------------

    def report(self) -> dict:
        """A worker's report for the master (JSON-able; Locust sends it with msgpack)."""
        with self._lock:
            report = WorkerReport(ledger=self.ledger.snapshot(), flow_runs=dict(self.flow_runs),
                                  flow_failures=dict(self.flow_failures),
                                  flow_interrupted=dict(self.flow_interrupted),
                                  failure_samples=dict(self.failure_samples),
                                  failure_kinds={k: dict(v) for k, v in self.failure_kinds.items()},
                                  harness_flow_errors=dict(self.harness_flow_errors),
                                  harness_samples=dict(self.harness_samples),
                                  check_failures={k: dict(v) for k, v in self.check_failures.items()},
                                  stream=self.stream_counters(), behind=self.behind,
                                  run_id=self.address_book.run_id, sinks=list(self.sinks.values()),
                                  notes=list(self.notes), arrivals=self.arrival_counts())
        return encode_record(report)

    def add_report(self, worker_id: str, data: Any, expected: set[str]) -> bool:
        """Keep a worker's report; True once every one of ``expected`` has reported."""
        self.reports[worker_id] = decode_record(WorkerReport, data, f"report of worker {worker_id}")
        if expected <= set(self.reports):
            self.reports_done.set()
            return True
        return False

    def merge_reports(self, expected: set[str]) -> None:
        """Fold every report received into this (the master's) ledger and counters."""
        self.workers_expected = max(self.workers_expected, len(expected))
        self.missing_workers = sorted(set(expected) - set(self.reports) - set(self.workers))
        reports, self.reports = self.reports, {}  # each report is merged once
        for worker_id, report in sorted(reports.items()):
            self.ledger.merge(report.ledger, f"ledger of worker {worker_id}")
            own = Ledger()
            own.merge(report.ledger, f"ledger of worker {worker_id}")
            self.workers[worker_id] = WorkerAccount(flows=own.reconcile().flows, stream=report.stream)
            if report.stream is not None:
                self.worker_streams.append(report.stream)
            self.worker_behind.append(report.behind)
            if report.run_id:
                self.run_ids.add(report.run_id)
            self.flow_runs.update(report.flow_runs)
            self.flow_failures.update(report.flow_failures)
            self.flow_interrupted.update(report.flow_interrupted)
            for name, kinds in report.failure_kinds.items():
                self.failure_kinds[name].update(kinds)
            for name, sample in report.failure_samples.items():
                self.failure_samples.setdefault(name, sample)
            self.harness_flow_errors.update(report.harness_flow_errors)
            for name, sample in report.harness_samples.items():
                self.harness_samples.setdefault(name, sample)
            for name, checks in report.check_failures.items():
                self.check_failures[name].update(checks)
            for snapshot in report.sinks:
                self._keep_sink(snapshot)
            self.notes.extend(f"worker {worker_id}: {note}" for note in report.notes)
            if report.arrivals is not None:
                if self.arrivals is None:
                    self.arrivals = ArrivalCounts()
                self.arrivals.merge(report.arrivals)

    # -- the results -----------------------------------------------------------------------------

    def results(self, *, http: RequestCounts, locust: RequestCounts, finished_at: Optional[float] = None,
                lookup: Optional[Callable[[str], Optional[list[Arrival]]]] = None) -> RehearsalResults:
        """The run's results, judged by the gates (mailproof.load.outcome). ``lookup`` (default: ask
        the sink service) finds the service's own records of an address still owed an email."""
        from mailproof.load.outcome import judged_results  # here, not at the top: outcome imports this module

        return judged_results(self, http=http, locust=locust, finished_at=finished_at, lookup=lookup)


# Names defined in listeners and outcome that code imports from here too. Looked up when asked
# for: those modules import this one.
_MOVED = {"install": "listeners", "FINISH": "listeners", "REPORT": "listeners",
          "request_counts": "outcome", "LOOKUPS": "outcome", "LOOKUPS_WITHOUT_GAPS": "outcome"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"mailproof.load.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
