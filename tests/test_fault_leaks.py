"""No fault outlives its test: proven with real pytest runs (pytester), in sequence and under xdist.

The inner suite alternates "fault" turns, each adding an ALL-traffic rule through ``sink_faults``
(no recipient, so a leaked rule would hit every later message), with "clean" turns that add
nothing and must send and receive mail normally. One fault turn fails on purpose after adding its
rule: teardown must remove it all the same. Every turn writes ``<worker> <kind>`` to a log so the
outer test can check that clean turns really ran after fault turns on the same sink.

The same is done for the validation API's faults (``validation_faults``, from the root
conftest.py): an outage, a 5xx burst, and a failing test, each followed by a clean turn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from collections import defaultdict

import pytest

INNER = textwrap.dedent('''
    import smtplib
    from email.message import EmailMessage

    import pytest

    from mailproof.faults import Chaos, Disconnect, Stall

    LOG = {log!r}

    # Each fault is for ALL traffic; left behind, it would break the next clean turn.
    FAULTS = {{
        "rcpt550": ("rcpt", "550 5.7.1 all traffic refused"),
        "connect": ("connect", Disconnect()),
        "mailchaos": ("mail", Chaos(1.0, "451 4.3.0 chaos for everyone", seed=1)),
        "stall": ("ehlo", Stall(0.2)),
        "fails": ("data", "554 5.6.0 refused"),
    }}
    TURNS = [turn for name in FAULTS for turn in ("fault-" + name, "clean-after-" + name)]


    def note(config, kind):
        worker = getattr(config, "workerinput", {{}}).get("workerid", "main")
        with open(LOG, "a") as log:
            log.write(worker + " " + kind + "\\n")


    def send(backend, to):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "leak@check.test", to, "leak check"
        msg.set_content("hi")
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=2) as conn:
            conn.send_message(msg)


    @pytest.mark.parametrize("turn", TURNS)
    def test_turn(turn, sink_faults, mailbox, mailproof_backend, pytestconfig):
        to = mailbox.address("leak")
        if turn.startswith("fault-"):
            name = turn[len("fault-"):]
            stage, action = FAULTS[name]
            rule = sink_faults.rule(stage, action)
            with pytest.raises((smtplib.SMTPException, OSError)):
                send(mailproof_backend, to)
            assert rule.acted == 1, "the fault must really act inside its own test"
            note(pytestconfig, "fault")
            if name == "fails":
                raise AssertionError("failing on purpose with a rule still in place")
        else:
            assert mailproof_backend.faults.rules == [], "a rule leaked from an earlier test"
            send(mailproof_backend, to)
            assert mailbox.wait_for(to=to, within=5).subject == "leak check"
            note(pytestconfig, "clean")
''')

VALIDATION_INNER = textwrap.dedent('''
    import pytest
    import requests

    TURNS = ["fault-outage", "clean", "fault-errors", "clean", "fault-fails", "clean"]


    def verify(api):
        return requests.get(api.url + "/v2/verify", params={"email": "a@example.com"}, timeout=2)


    @pytest.mark.parametrize("turn", TURNS)
    def test_turn(turn, validation_api, validation_faults):
        if turn == "fault-outage":
            validation_faults.set(outage=60)  # refused connections for a minute, unless cleared
            with pytest.raises(requests.ConnectionError):
                verify(validation_api)
        elif turn.startswith("fault-"):
            validation_faults.set(errors=100, latency=0.05)
            assert verify(validation_api).status_code == 503
            if turn == "fault-fails":
                raise AssertionError("failing on purpose with faults still set")
        else:
            assert validation_faults.settings is None and validation_faults.fired["requests"] == 0
            assert verify(validation_api).json()["result"] == "deliverable"
''')

TURNS = 10  # five fault turns, five clean turns, per file


@pytest.fixture(autouse=True)
def outside_xdist(monkeypatch):
    """When this file itself runs under xdist, the inner runs must not inherit the worker's identity."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def write_suite(pytester: pytest.Pytester, files: int) -> str:
    log = str(pytester.path / "turns.log")
    for i in range(files):
        pytester.makepyfile(**{f"test_inner_{i}": INNER.format(log=log)})
    return log


def clean_after_fault_per_worker(log: str) -> dict[str, int]:
    """Per worker, how many clean turns ran after at least one fault turn on that worker's sink."""
    seen_fault: dict[str, bool] = defaultdict(bool)
    proven: dict[str, int] = defaultdict(int)
    with open(log) as lines:
        for line in lines:
            worker, kind = line.split()
            if kind == "fault":
                seen_fault[worker] = True
            elif seen_fault[worker]:
                proven[worker] += 1
    return dict(proven)


def test_no_sink_or_validation_fault_leaks_into_the_next_test_in_sequence(pytester, monkeypatch):
    log = write_suite(pytester, files=1)
    # The root conftest.py is what defines validation_faults: run the inner suites with it.
    project = Path(__file__).resolve().parents[1]
    pytester.makeconftest((project / "conftest.py").read_text())
    pytester.makepyfile(test_inner_validation=VALIDATION_INNER)
    # fakes/ and demo_app/ run from the repository (they are not in the wheel).
    monkeypatch.setenv("PYTHONPATH", str(project))
    result = pytester.runpytest_subprocess("-p", "no:locust", "-q")
    result.assert_outcomes(passed=(TURNS - 1) + 5, failed=2)
    result.stdout.fnmatch_lines(["*failing on purpose with a rule still in place*",
                                 "*failing on purpose with faults still set*"])
    assert clean_after_fault_per_worker(log) == {"main": TURNS // 2}


def test_no_rule_leaks_under_xdist(pytester):
    # Two files, one per worker (loadfile): each worker runs its own fault/clean sequence on its own
    # sink while the other does the same, in parallel.
    log = write_suite(pytester, files=2)
    result = pytester.runpytest_subprocess("-p", "no:locust", "-n", "2", "--dist", "loadfile", "-q")
    result.assert_outcomes(passed=2 * (TURNS - 1), failed=2)
    proven = clean_after_fault_per_worker(log)
    assert sorted(proven) == ["gw0", "gw1"] and all(n == TURNS // 2 for n in proven.values()), proven
