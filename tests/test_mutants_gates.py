"""SLO gates, exactly: what each gate reads, on which subject, and the words of its verdict and
its errors (what benchmarks/mutation.py found no test checking).

A verdict's detail is what the rehearsal summary prints; a GateError is what a user with a typo
reads, and must name the fix.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mailproof.load.gates import Gate, GateError, evaluate, parse_gates
from mailproof.load.results import (FlowCounts, FlowRuns, Harness, HarnessError, LatencySummary, LedgerCounts,
                                    RequestCounts)


def _latency(value: float) -> LatencySummary:
    return LatencySummary(count=4, p50=value, p90=value, p95=value, p99=value, max=value, mean=value)


def results(*, runs=None, failures=None, interrupted=None, ledger=None, latency=None, unexpected=0,
            requests=0, http_failures=0, errors=0):
    return SimpleNamespace(
        flows=FlowRuns(runs=runs if runs is not None else {"a": 4}, failures=failures or {},
                       interrupted=interrupted or {}),
        ledger=LedgerCounts(flows=ledger if ledger is not None else {"a": FlowCounts(expected=4, delivered=4)},
                            unexpected=unexpected),
        latency=latency if latency is not None else {"a": _latency(0.25)},
        http=RequestCounts(requests=requests, failures=http_failures),
        harness=Harness(errors=[HarnessError(kind="stream_gap", count=errors, detail="")] if errors else []),
    )


def verdicts(text: str, res) -> list[tuple]:
    return [(v.gate, v.subject, v.actual, v.passed, v.detail)
            for v in evaluate([Gate.parse(text)], res) if v.gate == text]


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, flow, metric, op, value", [
    ("lost==0", "*", "lost", "==", 0.0),
    ("flows:lost==0", "*", "lost", "==", 0.0),
    ("*:late<=2", "*", "late", "<=", 2.0),
    ("signup:p95<250ms", "signup", "p95", "<", 0.25),
    ("  signup : p95 < 2.5 s  ", "signup", "p95", "<", 2.5),
    ("unexpected==0", "run", "unexpected", "==", 0.0),
    ("*:unexpected==0", "run", "unexpected", "==", 0.0),
    ("run:unexpected<3", "run", "unexpected", "<", 3.0),
    ("error_rate<=1%", "http", "error_rate", "<=", 0.01),
    ("http:error_rate<.5", "http", "error_rate", "<", 0.5),
    ("errors==0", "harness", "errors", "==", 0.0),
    ("harness:errors>=1", "harness", "errors", ">=", 1.0),
    ("a:failure_rate<=50%", "a", "failure_rate", "<=", 0.5),
    ("a:failures>1", "a", "failures", ">", 1.0),
])
def test_a_gate_reads_as_written(text, flow, metric, op, value):
    gate = Gate.parse(text)
    assert (gate.flow, gate.metric, gate.op, gate.value) == (flow, metric, op, pytest.approx(value))
    assert gate.text == text.strip()


def test_an_unreadable_gate_is_quoted_with_the_grammar_and_an_example():
    with pytest.raises(GateError) as caught:
        Gate.parse("p95 5s")
    assert str(caught.value) == ("cannot read gate 'p95 5s': write it as [FLOW:]METRIC OP VALUE[ms|s|%], "
                                 "e.g. 'signup_confirms_account:p95<5s' or '*:lost==0'")


@pytest.mark.parametrize("text, words", [
    ("p95 5s", ["cannot read gate 'p95 5s'", "[FLOW:]METRIC OP VALUE[ms|s|%]",
                "e.g. 'signup_confirms_account:p95<5s' or '*:lost==0'"]),
    ("bogus<1", ["unknown metric 'bogus' in gate 'bogus<1'; use one of delivered, duplicated, error_rate, errors, expected"]),
    ("lost<5%", ["gate 'lost<5%': '%' is for rates (error_rate, failure_rate), not lost"]),
    ("lost<5s", ["gate 'lost<5s': 's' is for latency (max, mean, p50, p90, p95, p99), not lost"]),
    ("lost<5ms", ["gate 'lost<5ms': 'ms' is for latency (max, mean, p50, p90, p95, p99), not lost"]),
    ("a:unexpected==0", ["gate 'a:unexpected==0': unexpected is counted for the whole run; write 'unexpected==0'"]),
    ("run:error_rate<1%", ["gate 'run:error_rate<1%': error_rate is the HTTP error rate; write 'http:error_rate<=1%'"]),
    ("*:errors==0", ["gate '*:errors==0': errors are the harness's; write 'harness:errors==0'"]),
    ("run:lost==0", ["gate 'run:lost==0': lost is measured per flow; write '*:lost...' or name a flow"]),
    ("http:p95<1s", ["gate 'http:p95<1s': p95 is measured per flow; write '*:p95...' or name a flow"]),
    ("harness:late==0", ["gate 'harness:late==0': late is measured per flow"]),
])
def test_a_bad_gate_says_what_is_wrong_and_how_to_write_it(text, words):
    with pytest.raises(GateError) as caught:
        Gate.parse(text)
    for word in words:
        assert word in str(caught.value)


def test_parse_gates_checks_named_flows_against_the_flows_run():
    gates = parse_gates(["a:lost==0", "*:late==0", "unexpected==0", "http:error_rate<1%", "harness:errors==0"],
                        flows=["a", "b"])
    assert [g.flow for g in gates] == ["a", "*", "run", "http", "harness"]
    assert [g.text for g in parse_gates(["typo:lost==0"])] == ["typo:lost==0"]  # no flows given: not checked
    with pytest.raises(GateError) as caught:
        parse_gates(["a:lost==0", "typo:lost==0"], flows=["b", "a"])
    assert str(caught.value) == "gate 'typo:lost==0' names flow 'typo', which is not among the flows run (a, b)"


# -- evaluating ----------------------------------------------------------------------------------


def test_a_count_gate_on_every_flow_checks_each_flow_that_ran_by_name():
    res = results(runs={"a": 4, "b": 2, "c": 1},
                  ledger={"a": FlowCounts(expected=4, delivered=3, lost=1), "b": FlowCounts(expected=2, delivered=2)},
                  latency={"d": _latency(1.0)})
    assert verdicts("*:lost==0", res) == [
        ("*:lost==0", "a", 1.0, False, "a: lost 1 == 0: missed by 1"),
        ("*:lost==0", "b", 0.0, True, "b: lost 0 == 0"),
        ("*:lost==0", "c", 0.0, True, "c: lost 0 == 0"),  # it ran and expected no email
        ("*:lost==0", "d", None, False, "d: it never ran"),  # measured, yet no run of it ended
    ]


def test_a_latency_gate_reads_seconds_and_names_the_flows_it_could_not_measure():
    res = results(runs={"a": 4, "b": 2, "c": 1, "d": 1},
                  ledger={"a": FlowCounts(expected=4, delivered=4), "b": FlowCounts(expected=2, lost=2),
                          "c": FlowCounts(), "d": FlowCounts(expected=1, delivered=1)},
                  latency={"a": _latency(0.25), "d": _latency(3.5)})
    assert verdicts("*:p95<1s", res) == [
        ("*:p95<1s", "a", 0.25, True, "a: p95 0.250 s < 1.000 s"),
        ("*:p95<1s", "b", None, False, "b: no latency measured: none of its 2 expected emails arrived"),
        ("*:p95<1s", "d", 3.5, False, "d: p95 3.500 s < 1.000 s: missed by 2.500 s"),
    ]  # c expected no email: no subject of a latency gate
    assert verdicts("c:p95<1s", res) == [("c:p95<1s", "c", None, False, "c: no latency measured: it expected no email")]
    assert verdicts("zz:max<1s", res) == [("zz:max<1s", "zz", None, False, "zz: no latency measured: it expected no email")]
    assert verdicts("a:mean>=250ms", res)[0][2:4] == (0.25, True)


def test_a_latency_gate_on_every_flow_takes_flows_measured_or_owed_latency():
    res = results(runs={}, ledger={"owed": FlowCounts(expected=1, lost=1)}, latency={"seen": _latency(0.5)})
    assert [v[1] for v in verdicts("p50<1s", res)] == ["owed", "seen"]


def test_failure_gates_count_runs_that_ended_with_a_verdict():
    res = results(runs={"a": 10, "b": 5, "c": 3}, failures={"a": 3}, interrupted={"a": 4, "c": 3},
                  ledger={}, latency={})
    assert verdicts("*:failure_rate<=0%", res) == [
        ("*:failure_rate<=0%", "a", 0.5, False, "a: failure_rate 50.00 % <= 0.00 % (3 of 6 runs failed): missed by 50.00 %"),
        ("*:failure_rate<=0%", "b", 0.0, True, "b: failure_rate 0.00 % <= 0.00 % (0 of 5 runs failed)"),
        ("*:failure_rate<=0%", "c", 0.0, True, "c: failure_rate 0.00 % <= 0.00 % (0 of 0 runs failed)"),
    ]
    assert verdicts("*:failures<3", res) == [
        ("*:failures<3", "a", 3.0, False, "a: failures 3 < 3: missed by 0"),
        ("*:failures<3", "b", 0.0, True, "b: failures 0 < 3"),
        ("*:failures<3", "c", 0.0, True, "c: failures 0 < 3"),
    ]
    assert verdicts("z:failures==0", res) == [("z:failures==0", "z", None, False, "z: no run of it finished")]
    assert verdicts("z:failure_rate==0", res) == [("z:failure_rate==0", "z", None, False, "z: no run of it finished")]


def test_run_http_and_harness_gates_have_one_subject_each():
    res = results(unexpected=2, requests=200, http_failures=3, errors=4)
    assert verdicts("unexpected==0", res) == [("unexpected==0", "run", 2.0, False, "run: unexpected 2 == 0: missed by 2")]
    assert verdicts("http:error_rate<=1%", res) == [
        ("http:error_rate<=1%", "http", 0.015, False,
         "http: error_rate 1.50 % <= 1.00 % (3 of 200 requests): missed by 0.50 %")]
    assert verdicts("harness:errors<=4", res) == [("harness:errors<=4", "harness", 4.0, True, "harness: errors 4 <= 4")]
    quiet = results(requests=0)
    assert verdicts("http:error_rate<=0%", quiet) == [
        ("http:error_rate<=0%", "http", 0.0, True, "http: error_rate 0.00 % <= 0.00 % (0 of 0 requests)")]


def test_a_run_in_which_no_flow_finished_fails_with_why_and_the_other_gates_still_run():
    res = results(runs={}, ledger={}, latency={})
    found = [(v.gate, v.subject, v.actual, v.passed, v.detail) for v in evaluate([Gate.parse("unexpected==0")], res)]
    assert found == [
        ("flows ran", "run", 0.0, False, "no flow run finished: nothing was checked (was the run too short, or did "
                                         "every user fail to start?)"),
        ("unexpected==0", "run", 0.0, True, "run: unexpected 0 == 0"),
    ]


def test_every_gate_is_evaluated_after_one_that_measured_nothing():
    res = results(runs={"a": 1, "b": 1}, ledger={"a": FlowCounts(expected=1, lost=1), "b": FlowCounts(expected=1, delivered=1)},
                  latency={"b": _latency(0.1)})
    found = [(v.gate, v.subject, v.passed) for v in evaluate(parse_gates(["*:p95<1s", "*:lost==0"]), res)]
    assert found == [("*:p95<1s", "a", False), ("*:p95<1s", "b", True), ("*:lost==0", "a", False), ("*:lost==0", "b", True)]
