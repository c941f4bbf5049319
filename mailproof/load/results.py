"""results.json: a rehearsal's results as typed records, written and read through the same types.

    results = RehearsalResults.read("reports/rehearsal/results.json")   # or from_json / from_dict
    results.write(path)                                                # or to_json / to_dict

The Locust master (or a local run) builds one ``RehearsalResults`` and writes it; the rehearsal
report reads it back through ``RehearsalResults.read`` and nothing else. Every field is always
written, and a reader refuses a file that lacks one, has one it does not know, holds a value of
the wrong type, or carries another ``schema_version``: a ``ResultsError`` names the file and the
field (``results.json: ledger.flows["order_receipt"].lost: expected an integer, got '2'``).

The schema, field by field with types and units, is in docs/results.md. Change a field here, bump
``SCHEMA_VERSION`` and update that page together.

No Locust import here: the report and the tests read results without monkey-patching anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mailproof.load.arrivals import ArrivalCounts
from mailproof.load.gates import Verdict

SCHEMA = "mailproof.rehearsal-results"
SCHEMA_VERSION = 3


class ResultsError(ValueError):
    """A results file (or dict) that is not a rehearsal results of this schema version."""

    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}")
        self.source, self.where, self.problem = source, where, problem


# -- the records -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FlowCounts:
    """The ledger's account of one flow's emails (expected = delivered + lost + unverified)."""

    expected: int = 0  # emails the flow's waits expected after a trigger
    delivered: int = 0
    late: int = 0  # delivered after the seconds allowed (a subset of delivered)
    lost: int = 0  # never arrived, and the harness saw everything the sink captured
    unverified: int = 0  # never seen by the harness, which had gaps: a harness error, not a loss
    duplicated: int = 0  # extra copies of an expected email
    unexpected: int = 0  # other mail at the flow's addresses (also in LedgerCounts.unexpected)
    interrupted: int = 0  # mail of runs stopped by the end of the run before they awaited it
    unawaited: int = 0  # mail of failed runs, caused after the run's last wait, never awaited
    negative_checks: int = 0


@dataclass(kw_only=True)
class HttpReply:
    """The application's answer to the request that triggered an email."""

    method: str
    path: str  # the request's route (ids templated), as in Locust's statistics
    status: int  # 0: no HTTP answer (connection error)
    body: str  # the first 300 characters of the answer


@dataclass(kw_only=True)
class LostEmail:
    """One expected email that never arrived, with what is known of it."""

    flow: str
    address: str
    trigger: Optional[float]  # epoch seconds of the request it was expected from
    within: float  # seconds its wait allowed
    run: str  # the flow run's outcome: "passed", "failed" or "interrupted" (stopped by the end of the run)
    reply: Optional[HttpReply]  # the app's answer to the triggering request, when it came
    sink: str  # what the sink service knows of it, e.g. "no message to this address (checked)"


@dataclass(kw_only=True)
class StrayEmail:
    """An email the ledger did not expect: to an address nobody handed out, or beyond what it expected."""

    address: str
    flow: Optional[str]  # the flow whose address it was; null for an address no flow handed out
    t: float  # capture time, epoch seconds
    subject: str
    why: str


@dataclass(kw_only=True)
class LedgerCounts:
    flows: dict[str, FlowCounts] = field(default_factory=dict)
    unexpected: int = 0  # every unexpected email of the run (flows' own and strangers')
    unexpected_addresses: dict[str, int] = field(default_factory=dict)  # the first 50, sorted
    duplicated_addresses: dict[str, int] = field(default_factory=dict)  # the first 50, sorted: extra copies
    lost_emails: list[LostEmail] = field(default_factory=list)  # every lost email, by trigger time
    unexpected_emails: list[StrayEmail] = field(default_factory=list)  # the first 200, by capture time
    handed_out: int = 0


@dataclass(kw_only=True)
class LatencySummary:
    """Delivery latency of one flow's emails from the merged HdrHistograms; seconds."""

    count: int
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float


@dataclass(kw_only=True)
class RequestCounts:
    requests: int = 0
    failures: int = 0

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(kw_only=True)
class FlowRuns:
    runs: dict[str, int] = field(default_factory=dict)  # runs that ended, interrupted ones included
    failures: dict[str, int] = field(default_factory=dict)
    interrupted: dict[str, int] = field(default_factory=dict)  # stopped by the end of the run (or the shape)
    failure_samples: dict[str, str] = field(default_factory=dict)  # first failure per flow
    failure_kinds: dict[str, dict[str, int]] = field(default_factory=dict)  # flow -> exception type -> runs
    harness_errors: dict[str, int] = field(default_factory=dict)  # runs stopped by a MailproofError (the harness's)
    check_failures: dict[str, dict[str, int]] = field(default_factory=dict)  # flow -> check -> failed checks

    def finished(self, flow: str) -> int:
        """Runs that ran to their end with a verdict on the app (not interrupted, no harness error)."""
        return self.runs.get(flow, 0) - self.interrupted.get(flow, 0) - self.harness_errors.get(flow, 0)

    def failure_rate(self, flow: str) -> float:
        """Failed runs / runs that ran to their end with a verdict (interrupted runs are neither)."""
        finished = self.finished(flow)
        return self.failures.get(flow, 0) / finished if finished > 0 else 0.0


@dataclass(kw_only=True)
class Sample:
    """One delivered email: when it was captured, its latency from the trigger, whose it was."""

    t: float  # capture time, epoch seconds
    latency: float  # seconds
    flow: str
    address: str
    hops: Optional[dict[str, float]] = None  # seconds per hop, when the capture path reports them


@dataclass(kw_only=True)
class Timeline:
    sends: list[tuple[int, int]] = field(default_factory=list)  # (epoch second, emails triggered)
    deliveries: list[tuple[int, int]] = field(default_factory=list)  # (epoch second, emails delivered)
    samples: list[Sample] = field(default_factory=list)  # sorted by t


@dataclass(kw_only=True)
class StreamCounters:
    """What the harness saw of the sink service's event stream (summed over processes)."""

    received: int = 0  # messages the stream delivered into the harness's store
    duplicates: int = 0  # stream lines already seen (skipped)
    missing: int = 0  # messages the service no longer retained when the stream asked (gaps)
    reconnects: int = 0  # times the stream had to reconnect
    restarts: int = 0  # times the stream found a restarted service
    evicted: int = 0  # messages evicted from the harness's own store (no live address expected them)

    def add(self, other: "StreamCounters") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(kw_only=True)
class FaultRecord:
    """A fault rule the sink service held at the end of the run, with its counters."""

    id: int
    name: Optional[str]
    stage: str  # SMTP stage: connect, ehlo, mail, rcpt, data, after_data
    scope: Optional[str]
    match: dict[str, str]  # to / to_pattern / sender, when the rule is limited to them
    action: Any  # the action as JSON (mailproof.faults.specs)
    fired: int  # times the rule matched and its action was asked
    acted: int  # times it changed the outcome (a reply or a hang-up)


@dataclass(kw_only=True)
class SinkSnapshot:
    """The sink service's own counters (``GET /stats``) and fault rules, read at the end."""

    url: str
    fetched_at: float  # epoch seconds
    received: int  # messages captured since the service started
    retained: int
    evicted: int
    cleared: int
    smtp_connections: int
    over_cap: int = 0  # deliveries kept past its cap: a stream client had not been sent the oldest yet
    faults: list[FaultRecord] = field(default_factory=list)


@dataclass(kw_only=True)
class WorkerAccount:
    """One Locust worker's own ledger (distributed runs)."""

    flows: dict[str, FlowCounts] = field(default_factory=dict)
    stream: Optional[StreamCounters] = None


@dataclass(kw_only=True)
class HarnessError:
    """Something the harness itself missed: the verdict cannot vouch for the emails it concerns."""

    kind: str  # stream_gap, stream_behind, unparsed, unverified, unreported_worker, sink_restart, flow_harness_error
    count: int
    detail: str


@dataclass(kw_only=True)
class Harness:
    stream: Optional[StreamCounters] = None  # None: no process of the run reported a stream
    sinks: list[SinkSnapshot] = field(default_factory=list)  # one per sink service URL
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why
    errors: list[HarnessError] = field(default_factory=list)  # the harness's own gaps (gated: harness:errors)
    recovered: int = 0  # expected emails the stream missed and the sink service still held (counted delivered)

    @property
    def error_count(self) -> int:
        return sum(e.count for e in self.errors)

    @property
    def faults(self) -> list[tuple[str, FaultRecord]]:
        return [(sink.url, rule) for sink in self.sinks for rule in sink.faults]


@dataclass(kw_only=True)
class RunInfo:
    started_at: float  # epoch seconds, when the load started
    finished_at: float  # epoch seconds, when the results were collected
    host: Optional[str]  # the application under load
    mode: str  # "local" or "distributed"
    workers_expected: int  # workers connected at the end (0 for a local run)
    missing_workers: list[str]  # workers whose report never came
    grace: float  # seconds allowed for late mail after the load stopped
    chaos_profile: Optional[str]  # the sink fault profile the run was started with
    chaos_seed: Optional[int]
    users: Optional[int] = None  # users asked for (-u, or the shape's peak); null when unknown
    spawn_rate: Optional[float] = None  # -r
    run_time: Optional[float] = None  # -t, or the shape's duration, seconds
    shape: Optional[str] = None  # burst, ramp or constant; null without a shape (-u/-r/-t)
    peak_users: int = 0  # the most users Locust ran at once
    flows_source: Optional[str] = None  # FLOWS (-f) of `mailproof rehearse`; null from a hand-written locustfile
    peak_rate: Optional[float] = None  # the shape's flows started per second at its peak; null without a shape
    # Under a shape (open model): arrivals offered, flows started and completed per second, cap hits.
    arrivals: Optional[ArrivalCounts] = None


@dataclass(kw_only=True)
class RehearsalResults:
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    run: RunInfo
    ledger: LedgerCounts
    latency: dict[str, LatencySummary]
    http: RequestCounts
    locust: RequestCounts
    flows: FlowRuns
    timeline: Timeline
    workers: dict[str, WorkerAccount] = field(default_factory=dict)
    harness: Harness = field(default_factory=Harness)
    gates: list[Verdict] = field(default_factory=list)
    passed: bool = False

    def judge(self, gates: list) -> "RehearsalResults":
        """Evaluate ``gates`` (mailproof.load.gates.Gate) on these numbers; set gates and passed."""
        from mailproof.load.gates import evaluate

        self.gates = evaluate(gates, self)
        self.passed = all(v.passed for v in self.gates)
        return self

    # -- reading and writing ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "results") -> "RehearsalResults":
        if not isinstance(data, dict):
            raise ResultsError(source, "(top level)", f"expected a JSON object, got {_kind(data)}")
        if data.get("schema") != SCHEMA:
            got = "no 'schema' field" if "schema" not in data else f"schema {data['schema']!r}"
            raise ResultsError(source, "schema", f"{got}: not a mailproof rehearsal results file of "
                                                 f"schema {SCHEMA!r} (written before the schema existed?)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultsError(source, "schema_version",
                               f"{'missing' if version is None else f'version {version!r}'}, but this mailproof "
                               f"reads version {SCHEMA_VERSION} only (see docs/results.md)")
        return _decode(cls, data, "", source)

    @classmethod
    def from_json(cls, text: str, source: str = "results") -> "RehearsalResults":
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise ResultsError(source, "(file)", f"not JSON: {exc}") from None
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: Union[str, Path]) -> "RehearsalResults":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsError(str(path), "(file)", f"cannot read it: {exc}") from None
        return cls.from_json(text, str(path))


# -- the codec: dataclasses <-> JSON, by their type hints --------------------------------------------


def encode_record(record: Any) -> Any:
    """A record (any dataclass of this schema, or one built the same way) as JSON-able data."""
    return _encode(record)


def decode_record(cls: type, data: Any, source: str) -> Any:
    """The record ``cls`` from JSON-able data, every field checked; ResultsError names the field."""
    return _decode(cls, data, "", source)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _decode(tp: Any, value: Any, where: str, source: str) -> Any:
    def fail(problem: str) -> ResultsError:
        return ResultsError(source, where or "(top level)", problem)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"expected an object ({tp.__name__}), got {_kind(value)}")
        hints = _hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ResultsError(source, _at(where, unknown[0]),
                               f"unknown field (a {tp.__name__} has {', '.join(names)})")
        kwargs = {}
        for name in names:
            if name not in value:
                raise ResultsError(source, _at(where, name), f"missing (every {tp.__name__} field is required)")
            kwargs[name] = _decode(hints[name], value[name], _at(where, name), source)
        return tp(**kwargs)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"expected an array, got {_kind(value)}")
        return [_decode(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise fail(f"expected an array of {len(args)}, got {_kind(value)}")
        return tuple(_decode(a, v, f"{where}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"expected an object, got {_kind(value)}")
        return {k: _decode(args[1], v, f"{where}[{json.dumps(k)}]", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"expected a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"results codec: no rule for type {tp!r} at {where}")  # a bug in this module
