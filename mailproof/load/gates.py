"""SLO gates: pass/fail verdicts on a rehearsal's results, with how far each one missed.

Grammar, one gate per string: ``[SUBJECT:]METRIC OP VALUE[UNIT]``

- SUBJECT: a flow name, or ``*`` (also written ``flows``) for every flow that ran (the default);
  ``http`` for HTTP-level metrics, ``harness`` for the harness's own errors.
- METRIC, per flow: ``p50 p90 p95 p99 max mean`` (delivery latency, seconds), ``lost late
  duplicated delivered expected unverified`` (ledger counts), ``failures`` (failed runs) and
  ``failure_rate`` (failed runs / runs that ran to their end, interrupted runs left out).
  Whole run: ``unexpected`` (emails nobody expected). ``http:error_rate`` (failed requests / all
  requests), ``harness:errors`` (emails the harness could not account for: stream gaps, unparsed
  messages, ...; never counted as the application's losses).
- OP: ``< <= = == >= >``. UNIT: ``ms``, ``s`` (default for latency) or ``%`` (rates).

Examples: ``signup_confirms_account:p95<5s``, ``*:lost==0``, ``http:error_rate<1%``,
``flows:failure_rate<=0%``.

A gate on every flow checks each flow that ran; a flow that expected no email is not a subject of
a latency gate. A gate naming one flow fails when nothing was measured for it.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

LATENCY = {"p50", "p90", "p95", "p99", "max", "mean"}
COUNTS = {"lost", "late", "duplicated", "delivered", "expected", "unverified"}
RUNS = {"failures", "failure_rate"}
RATES = {"failure_rate", "error_rate"}
_OPS = {"<": operator.lt, "<=": operator.le, "=": operator.eq, "==": operator.eq,
        ">=": operator.ge, ">": operator.gt}
_GATE = re.compile(r"^\s*(?:(?P<flow>[\w*.-]+)\s*:)?\s*(?P<metric>\w+)\s*(?P<op><=|>=|==|<|>|=)\s*"
                   r"(?P<value>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>ms|s|%)?\s*$")
DEFAULT_GATES = ("*:lost==0", "*:late==0", "*:duplicated==0", "unexpected==0", "flows:failure_rate<=0%",
                 "http:error_rate<=1%", "harness:errors==0")
_ALL_METRICS = sorted(LATENCY | COUNTS | RUNS | {"unexpected", "error_rate", "errors"})


class GateError(ValueError):
    pass


@dataclass(frozen=True)
class Gate:
    text: str
    flow: str  # a flow name, "*", "run", "http" or "harness"
    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Gate":
        found = _GATE.match(text)
        if not found:
            raise GateError(f"cannot read gate {text!r}: write it as [FLOW:]METRIC OP VALUE[ms|s|%], "
                            "e.g. 'signup_confirms_account:p95<5s' or '*:lost==0'")
        flow, metric, op, unit = found["flow"] or "*", found["metric"], found["op"], found["unit"]
        value = float(found["value"])
        if flow == "flows":
            flow = "*"
        if metric not in _ALL_METRICS:
            raise GateError(f"unknown metric {metric!r} in gate {text!r}; use one of {', '.join(_ALL_METRICS)}")
        if unit == "%" and metric not in RATES:
            raise GateError(f"gate {text!r}: '%' is for rates ({', '.join(sorted(RATES))}), not {metric}")
        if unit in ("ms", "s") and metric not in LATENCY:
            raise GateError(f"gate {text!r}: {unit!r} is for latency ({', '.join(sorted(LATENCY))}), not {metric}")
        if metric == "unexpected":
            if found["flow"] not in (None, "*", "run"):
                raise GateError(f"gate {text!r}: unexpected is counted for the whole run; write 'unexpected==0'")
            flow = "run"
        elif metric == "error_rate":
            if found["flow"] not in (None, "http"):
                raise GateError(f"gate {text!r}: error_rate is the HTTP error rate; write 'http:error_rate<=1%'")
            flow = "http"
        elif metric == "errors":
            if found["flow"] not in (None, "harness"):
                raise GateError(f"gate {text!r}: errors are the harness's; write 'harness:errors==0'")
            flow = "harness"
        elif flow in ("run", "http", "harness"):
            raise GateError(f"gate {text!r}: {metric} is measured per flow; write '*:{metric}...' or name a flow")
        if metric in RATES:
            value = value / 100 if unit == "%" else value
        elif metric in LATENCY:
            value = value / 1000 if unit == "ms" else value
        return cls(text.strip(), flow, metric, op, value)


def parse_gates(texts: Iterable[str], flows: Optional[Iterable[str]] = None) -> list[Gate]:
    """Parse every gate; with ``flows``, a gate naming a flow that is not one of them is an error."""
    gates = [Gate.parse(text) for text in texts]
    if flows is not None:
        known = set(flows)
        for gate in gates:
            if gate.flow not in ("*", "run", "http", "harness") and gate.flow not in known:
                raise GateError(f"gate {gate.text!r} names flow {gate.flow!r}, which is not among the flows "
                                f"run ({', '.join(sorted(known))})")
    return gates


@dataclass(frozen=True)
class Verdict:
    gate: str
    subject: str  # the flow (or run/http/harness) it was checked on
    actual: Optional[float]
    passed: bool
    detail: str


def _fmt(metric: str, value: float) -> str:
    if metric in LATENCY:
        return f"{value:.3f} s"
    if metric in RATES:
        return f"{value * 100:.2f} %"
    return f"{value:g}"


def _flow_value(gate: Gate, name: str, results: Any) -> tuple[Optional[float], str]:
    """The measured value for one flow, or None with why nothing was measured."""
    if gate.metric in LATENCY:
        row = results.latency.get(name)
        if row is None:
            counts = results.ledger.flows.get(name)
            if counts is not None and counts.expected:
                return None, f"no latency measured: none of its {counts.expected} expected emails arrived"
            return None, "no latency measured: it expected no email"
        return float(getattr(row, gate.metric)), ""
    if gate.metric == "failure_rate":
        if not results.flows.runs.get(name):
            return None, "no run of it finished"
        return results.flows.failure_rate(name), ""
    if gate.metric == "failures":
        if not results.flows.runs.get(name):
            return None, "no run of it finished"
        return float(results.flows.failures.get(name, 0)), ""
    row = results.ledger.flows.get(name)
    if row is None:
        if results.flows.runs.get(name):
            return 0.0, ""  # it ran and expected no email
        return None, "it never ran"
    return float(getattr(row, gate.metric)), ""


def _subjects(gate: Gate, results: Any) -> list[str]:
    if gate.flow != "*":
        return [gate.flow]
    ran = set(results.flows.runs) | set(results.ledger.flows) | set(results.latency)
    if gate.metric in LATENCY:
        return sorted(name for name in ran if name in results.latency
                      or (name in results.ledger.flows and results.ledger.flows[name].expected))
    return sorted(ran)


def evaluate(gates: list[Gate], results: Any) -> list[Verdict]:
    """``results``: a ``mailproof.load.results.RehearsalResults`` (its ``ledger``, ``latency``,
    ``flows``, ``http`` and ``harness`` are read).

    A run in which no flow run finished fails: nothing was checked, and a verdict of PASS would
    vouch for nothing.
    """
    verdicts = []
    if not results.flows.runs:
        verdicts.append(Verdict("flows ran", "run", 0.0, False,
                                "no flow run finished: nothing was checked (was the run too short, or did "
                                "every user fail to start?)"))
    ledger, http = results.ledger, results.http
    for gate in gates:
        if gate.flow == "run":
            targets = [("run", float(ledger.unexpected), "")]
        elif gate.flow == "http":
            targets = [("http", http.failures / http.requests if http.requests else 0.0, "")]
        elif gate.flow == "harness":
            targets = [("harness", float(results.harness.error_count), "")]
        else:
            targets = [(name, *_flow_value(gate, name, results)) for name in _subjects(gate, results)]
        for subject, actual, why in targets:
            if actual is None:
                verdicts.append(Verdict(gate.text, subject, None, False, f"{subject}: {why}"))
                continue
            passed = _OPS[gate.op](actual, gate.value)
            detail = f"{subject}: {gate.metric} {_fmt(gate.metric, actual)} {gate.op} {_fmt(gate.metric, gate.value)}"
            if gate.metric == "failure_rate":
                finished = results.flows.finished(subject)
                detail += f" ({results.flows.failures.get(subject, 0)} of {finished} runs failed)"
            if gate.metric == "error_rate":
                detail += f" ({http.failures} of {http.requests} requests)"
            if not passed:
                detail += f": missed by {_fmt(gate.metric, abs(actual - gate.value))}"
            verdicts.append(Verdict(gate.text, subject, actual, passed, detail))
    return verdicts
