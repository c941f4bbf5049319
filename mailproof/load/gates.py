"""SLO gates: pass/fail verdicts on a rehearsal's results, with how far each one missed.

Grammar, one gate per string: ``[FLOW:]METRIC OP VALUE[UNIT]``

- FLOW: a flow name, or ``*`` for every flow (the default); ``http`` for HTTP-level metrics.
- METRIC: ``p50 p90 p95 p99 max mean`` (delivery latency, seconds), ``lost late duplicated
  delivered expected`` (ledger counts), ``unexpected`` (whole run), ``error_rate`` (http only,
  failed requests / all requests).
- OP: ``< <= = == >= >``. UNIT: ``ms``, ``s`` (default for latency) or ``%`` (for error_rate).

Examples: ``signup_confirms_account:p95<5s``, ``*:lost==0``, ``http:error_rate<1%``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

LATENCY = {"p50", "p90", "p95", "p99", "max", "mean"}
COUNTS = {"lost", "late", "duplicated", "delivered", "expected"}
_OPS = {"<": operator.lt, "<=": operator.le, "=": operator.eq, "==": operator.eq,
        ">=": operator.ge, ">": operator.gt}
_GATE = re.compile(r"^\s*(?:(?P<flow>[\w*.-]+)\s*:)?\s*(?P<metric>\w+)\s*(?P<op><=|>=|==|<|>|=)\s*"
                   r"(?P<value>[0-9.]+)\s*(?P<unit>ms|s|%)?\s*$")
DEFAULT_GATES = ("*:lost==0", "*:duplicated==0", "unexpected==0", "http:error_rate<=1%")


class GateError(ValueError):
    pass


@dataclass(frozen=True)
class Gate:
    text: str
    flow: str
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
        if metric == "unexpected":
            flow = "run"
        elif metric == "error_rate":
            flow = "http"
            value = value / 100 if unit == "%" else value
        elif metric in LATENCY:
            value = value / 1000 if unit == "ms" else value
        elif metric not in COUNTS:
            raise GateError(f"unknown metric {metric!r} in gate {text!r}; use one of "
                            f"{', '.join(sorted(LATENCY | COUNTS | {'unexpected', 'error_rate'}))}")
        return cls(text.strip(), flow, metric, op, value)


@dataclass(frozen=True)
class Verdict:
    gate: str
    subject: str  # the flow (or run/http) it was checked on
    actual: Optional[float]
    passed: bool
    detail: str


def _fmt(metric: str, value: float) -> str:
    if metric in LATENCY:
        return f"{value:.3f} s"
    if metric == "error_rate":
        return f"{value * 100:.2f} %"
    return f"{value:g}"


def evaluate(gates: list[Gate], results: Any) -> list[Verdict]:
    """``results``: a ``mailproof.load.results.RehearsalResults`` (only its ``ledger``, ``latency``
    and ``http`` are read)."""
    verdicts = []
    ledger, latency, http = results.ledger, results.latency, results.http
    flows = sorted(set(ledger.flows) | set(latency))
    for gate in gates:
        if gate.flow == "run":
            targets = [("run", float(ledger.unexpected))]
        elif gate.flow == "http":
            targets = [("http", http.failures / http.requests if http.requests else 0.0)]
        else:
            names = flows if gate.flow == "*" else [gate.flow]
            targets = []
            for name in names:
                row = latency.get(name) if gate.metric in LATENCY else ledger.flows.get(name)
                targets.append((name, float(getattr(row, gate.metric)) if row is not None else None))
        for subject, actual in targets:
            if actual is None:
                verdicts.append(Verdict(gate.text, subject, None, False,
                                        f"{subject}: no {gate.metric} measured (did the flow run?)"))
                continue
            passed = _OPS[gate.op](actual, gate.value)
            detail = f"{subject}: {gate.metric} {_fmt(gate.metric, actual)} {gate.op} {_fmt(gate.metric, gate.value)}"
            if not passed:
                detail += f": missed by {_fmt(gate.metric, abs(actual - gate.value))}"
            verdicts.append(Verdict(gate.text, subject, actual, passed, detail))
    return verdicts
