"""benchmarks/rehearsal_rate.py's verdict: a rate counts as sustained only when nothing was lost,
unverified or failed, p99 stayed under the limit and the offered load was held."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "rehearsal_rate.py"
_spec = importlib.util.spec_from_file_location("rehearsal_rate", _PATH)
rehearsal_rate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rehearsal_rate  # its dataclasses look their module up there
_spec.loader.exec_module(rehearsal_rate)


def _results(**overrides) -> dict:
    """A results.json's fields the verdict reads: an open-model run of 40 flows/s for 20 s, clean."""
    data = {
        "ledger": {"flows": {"signup": {"delivered": 600, "lost": 0, "unverified": 0},
                             "receipt": {"delivered": 200, "lost": 0, "unverified": 0}}},
        "flows": {"runs": {"signup": 600, "receipt": 200}, "failures": {"signup": 0, "receipt": 0}},
        "latency": {"signup": {"p99": 0.30}, "receipt": {"p99": 0.45}},
        "run": {"arrivals": {"started": [40] * 20, "cap_hits": 0, "not_started": 0}},
    }
    for path, value in overrides.items():
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return data


def test_a_clean_run_is_sustained():
    outcome = rehearsal_rate.judge(_results(), rate=40, duration=20, p99_limit=1.0)
    assert outcome.sustained, outcome.why_not
    assert (outcome.started, outcome.delivered, outcome.worst_p99) == (800, 800, 0.45)


@pytest.mark.parametrize("path, value, reason", [
    ("ledger.flows.receipt.lost", 1, "1 lost"),
    ("ledger.flows.signup.unverified", 2, "2 unverified"),
    ("flows.failures.signup", 3, "3 flow runs failed"),
    ("latency.receipt.p99", 1.0, "p99 1.00 s"),  # the limit itself is not under it
    ("run.arrivals.cap_hits", 5, "5 late at the cap"),
    ("run.arrivals.not_started", 7, "7 never started"),
])
def test_each_shortfall_alone_makes_it_not_sustained(path, value, reason):
    outcome = rehearsal_rate.judge(_results(**{path: value}), rate=40, duration=20, p99_limit=1.0)
    assert not outcome.sustained
    assert any(reason in why for why in outcome.why_not), outcome.why_not


def test_no_email_delivered_is_not_sustained_even_with_no_latency_to_judge():
    data = _results()
    for row in data["ledger"]["flows"].values():
        row["delivered"] = 0
    data["latency"] = {}
    outcome = rehearsal_rate.judge(data, rate=40, duration=20, p99_limit=1.0)
    assert not outcome.sustained and outcome.worst_p99 is None


def test_a_closed_model_run_is_held_only_when_95_percent_of_its_flows_started():
    closed = copy.deepcopy(_results())
    closed["run"] = {"arrivals": None}  # Locust's -u/-r/-t: no arrival schedule in the results
    closed["flows"]["runs"] = {"signup": 760}  # 95 % of 40/s x 20 s
    assert rehearsal_rate.judge(closed, rate=40, duration=20, p99_limit=1.0).sustained
    closed["flows"]["runs"] = {"signup": 759}
    outcome = rehearsal_rate.judge(closed, rate=40, duration=20, p99_limit=1.0)
    assert not outcome.sustained and "759 flows of 800" in outcome.why_not[0]


@pytest.mark.parametrize("cmdline, role", [
    ("/x/.venv/bin/python -m locust -f /x/mailproof/load/locustfile.py --headless", "locust"),
    ("/x/.venv/bin/python -m mailproof.capture.service --host 127.0.0.1", "sink"),
    ("/x/.venv/bin/python -m loadtests.rehearse --out /tmp/r", "launcher"),
    ("/x/.venv/bin/python -m demo_app --port 0", "app"),
    ("/bin/sh -c cd /x && exec python -m loadtests.demo --workers 8", "app"),
])
def test_processes_are_counted_by_role(cmdline, role):
    assert rehearsal_rate.role_of(cmdline) == role


@pytest.mark.parametrize("low, high, resolution, expected", [
    (80, 100, 5, 90),
    (80, 90, 5, 85),
    (80, 85, 5, None),  # nothing strictly between: the limit is known to the resolution
    (40, 60, 1, 50),
])
def test_bisection_tries_a_rate_strictly_between(low, high, resolution, expected):
    assert rehearsal_rate.midpoint(low, high, resolution) == expected


def test_the_best_rate_is_the_highest_sustained_and_the_bracket_the_next_failure_above_it():
    variant = rehearsal_rate.Variant("v", Path("."), rehearsal_rate.DEFAULT_LOAD)
    clean, failing = _results(), _results(**{"latency.receipt.p99": 1.5})
    for rate, data in ((40, clean), (80, clean), (100, failing), (90, clean), (120, failing)):
        variant.outcomes.append(rehearsal_rate.judge(data, rate=rate, duration=20, p99_limit=1.0))
    assert variant.best().rate == 90
    assert variant.bracket() == (90, 100)
    variant.outcomes.append(rehearsal_rate.judge(failing, rate=30, duration=20, p99_limit=1.0))
    assert variant.bracket() == (90, 100), "a failure below the best is noise, not the limit"
