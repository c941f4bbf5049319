"""The rehearsal end to end: sink service, demo app and Locust as real subprocesses; and the
rehearsal state (mailproof.load.rehearsal.Rehearsal) merging worker reports, in process.

Locust monkey-patches whatever imports it, so it only ever runs in a child process here
(mailproof.load.rehearsal imports it only inside its listeners).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailproof.load.gates import Gate
from mailproof.load.rehearsal import Rehearsal, RehearsalOptions
from mailproof.load.results import RehearsalResults, RequestCounts, SinkSnapshot
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message
from mailproof.report import rehearsal as rehearsal_report

ROOT = Path(__file__).resolve().parent.parent


def rehearse(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "rehearsal"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.rehearse", "--duration", "8", "--peak-users", "4",
         "--grace", "5", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    results_file = out / "results.json"
    assert results_file.exists(), f"no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    RehearsalResults.read(results_file)  # the file the run wrote reads through the schema
    return proc, json.loads(results_file.read_text())


def assert_reconciles(results: dict) -> None:
    flows = results["ledger"]["flows"]
    assert flows, "no flow ran"
    for name, row in flows.items():
        assert row["expected"] == row["delivered"] + row["lost"], (name, row)
        assert row["late"] <= row["delivered"], (name, row)
    assert sum(row["expected"] for row in flows.values()) > 0


def test_short_rehearsal_passes_and_every_email_is_accounted_for(tmp_path):
    proc, results = rehearse(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["passed"] is True
    assert_reconciles(results)
    assert all(row["lost"] == 0 and row["duplicated"] == 0 for row in results["ledger"]["flows"].values())
    # Exact percentiles exist for each flow that waited for mail, in order.
    for name, lat in results["latency"].items():
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (name, lat)
    assert "RESULT: PASS" in proc.stdout
    assert (tmp_path / "rehearsal" / "locust_stats.csv").exists()
    assert (tmp_path / "rehearsal" / "locust.html").exists()


def test_an_impossible_gate_fails_the_run_and_says_by_how_much(tmp_path):
    proc, results = rehearse(tmp_path, "--gate", "signup_confirms_account:p50<1ms",
                             "--flow-mix", "signup_confirms_account=1")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["passed"] is False
    failed = [g for g in results["gates"] if not g["passed"]]
    assert [g["gate"] for g in failed] == ["signup_confirms_account:p50<1ms"]
    assert "missed by" in failed[0]["detail"]
    assert "[FAIL] signup_confirms_account:p50<1ms" in proc.stdout
    assert_reconciles(results)


def test_distributed_run_merges_the_workers_ledgers(tmp_path):
    proc, results = rehearse(tmp_path, "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = results["workers"]
    assert len(workers) == 2, workers
    merged = results["ledger"]["flows"]
    for name, row in merged.items():
        for key in ("expected", "delivered", "lost", "duplicated", "late"):
            assert row[key] == sum(w["flows"].get(name, {}).get(key, 0) for w in workers.values()), (name, key)
    assert_reconciles(results)
    assert results["ledger"]["unexpected"] == 0  # each worker's mail is not "unexpected" to the master
    assert results["run"]["mode"] == "distributed" and results["run"]["missing_workers"] == []
    # One sink streams every message to both workers: each worker's stream saw all the sink captured.
    (sink,) = results["harness"]["sinks"]
    assert all(w["stream"]["received"] == sink["received"] for w in workers.values()), (workers, sink)
    assert results["harness"]["stream"]["received"] == 2 * sink["received"]


def test_a_chaos_run_records_its_profile_and_faults_and_the_report_shows_them(tmp_path):
    proc, results = rehearse(tmp_path, "--chaos", "30%:rcpt:451", "--chaos-seed", "11",
                             "--flow-mix", "signup_confirms_account=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["run"]["chaos_profile"] == "30%:rcpt:451" and results["run"]["chaos_seed"] == 11
    (sink,) = results["harness"]["sinks"]
    (rule,) = sink["faults"]
    assert rule["name"] == "chaos:30%:rcpt:451" and rule["stage"] == "rcpt"
    assert rule["action"]["chaos"]["seed"] == 11  # the profile's first item gets the seed itself
    assert rule["acted"] > 0  # 30 % of some dozens of recipients were deferred
    # Every RCPT the rule let through became one captured message (one recipient per signup mail),
    # and every captured message came through the stream into the ledger.
    row = results["ledger"]["flows"]["signup_confirms_account"]
    assert rule["fired"] - rule["acted"] == sink["received"]
    assert sink["received"] == row["delivered"] + row["duplicated"] + results["ledger"]["unexpected"]
    assert results["harness"]["stream"]["received"] == sink["received"]
    assert "chaos profile: 30%:rcpt:451 (seed 11)" in proc.stdout

    out = tmp_path / "report.html"
    assert rehearsal_report.main([str(tmp_path / "rehearsal" / "results.json"), "-o", str(out)]) == 0
    page = out.read_text()
    faults = page[page.index('<section id="faults">'):page.index('<section id="harness">')]
    assert "chaos <code>30%:rcpt:451</code> (seed 11)" in page
    assert f'<td data-key="fired">{rule["fired"]}</td><td data-key="acted">{rule["acted"]}</td>' in faults
    assert f'id="faults-acted">{rule["acted"]}<' in page


# -- the rehearsal state, in process ------------------------------------------------------------------


class StubStream:
    """Only the counters of a RemoteSink (mailproof.capture.remote), as a worker would read them."""

    def __init__(self, received: int, missing: int, connections: int) -> None:
        self.received, self.duplicates, self.missing = received, 0, missing
        self.stream_connections, self.restarts = connections, 0
        self.store = MailStore()

    def stop(self) -> None:
        pass


def run_flow(worker: Rehearsal, store: MailStore, flow: str, trigger: float, arrives: float | None) -> str:
    """One flow run on a worker: hand out an address, mark, (maybe) get the mail, record the run."""
    mailbox = Mailbox(store, worker.address_book, default_within=5)
    address = mailbox.address(flow)
    mailbox.mark(at=trigger)
    error = None
    if arrives is not None:
        store.deliver(Message(b"Subject: hi\r\n\r\nhi\r\n", rcpt_tos=[address], received_at=arrives))
        msg = mailbox.wait_for(to=address, within=5)
        worker.latency.record(flow, msg.latency)
    else:
        error = AssertionError("no mail")
    worker.record_flow_run(flow, mailbox, error)
    mailbox.close()
    return address


def test_the_master_merges_worker_reports_into_one_result():
    t0 = 1_800_000_000.0
    store = MailStore()  # one sink: both workers see every message
    w1, w2 = (Rehearsal(RehearsalOptions(grace=0.1), role="worker") for _ in range(2))
    for worker in (w1, w2):
        store.add_listener(worker.ledger.on_arrival)
    run_flow(w1, store, "signup", t0, t0 + 0.5)
    run_flow(w1, store, "signup", t0 + 1, None)  # lost
    run_flow(w2, store, "signup", t0 + 2, t0 + 2.25)
    run_flow(w2, store, "receipt", t0 + 3, t0 + 4.0)
    w1.backend, w2.backend = StubStream(3, missing=0, connections=1), StubStream(3, missing=1, connections=3)
    old = SinkSnapshot(url="http://sink", fetched_at=t0 + 10, received=3, retained=3, evicted=0, cleared=0,
                       smtp_connections=3)
    new = SinkSnapshot(url="http://sink", fetched_at=t0 + 11, received=3, retained=3, evicted=0, cleared=0,
                       smtp_connections=4)
    w1.sinks, w2.sinks = {old.url: old}, {new.url: new}

    master = Rehearsal(RehearsalOptions(gates=(Gate.parse("*:lost==0"),), chaos_profile="5%:rcpt:451",
                                        chaos_seed=3), role="master")
    expected = {"w1", "w2", "w3"}
    # The reports travel as JSON-able data (Locust sends them with msgpack).
    assert master.add_report("w2", json.loads(json.dumps(w2.report())), expected) is False
    assert master.add_report("w1", json.loads(json.dumps(w1.report())), expected) is False  # w3 never reports
    master.merge_reports(expected)
    master.started_at = t0
    results = master.results(http=RequestCounts(requests=8, failures=0), locust=RequestCounts(requests=12, failures=1),
                             finished_at=t0 + 12)

    signup, receipt = results.ledger.flows["signup"], results.ledger.flows["receipt"]
    assert (signup.expected, signup.delivered, signup.lost) == (3, 2, 1)
    assert (receipt.expected, receipt.delivered, receipt.late) == (1, 1, 0)
    assert results.ledger.unexpected == 0  # w2's mail is not unexpected because w1 saw it too
    assert results.workers["w1"].flows["signup"].lost == 1 and "receipt" not in results.workers["w1"].flows
    assert results.workers["w2"].flows["receipt"].delivered == 1
    assert results.latency["signup"].count == 2 and results.latency["receipt"].max == pytest.approx(1.0, rel=1e-3)
    assert results.flows.runs == {"receipt": 1, "signup": 3} and results.flows.failures == {"signup": 1}
    assert results.flows.failure_samples == {"signup": "AssertionError: no mail"}
    assert results.run.mode == "distributed" and results.run.missing_workers == ["w3"]
    assert results.run.workers_expected == 3
    assert (results.run.chaos_profile, results.run.chaos_seed) == ("5%:rcpt:451", 3)
    assert (results.harness.stream.received, results.harness.stream.missing, results.harness.stream.reconnects) \
        == (6, 1, 2)
    assert [s.smtp_connections for s in results.harness.sinks] == [4]  # the latest snapshot of the one sink
    assert [(g.subject, g.passed) for g in results.gates] == [("receipt", True), ("signup", False)]
    assert results.passed is False
    assert RehearsalResults.from_json(results.to_json()) == results


def test_each_environment_has_its_own_rehearsal():
    class Environment:
        pass

    first, second = Environment(), Environment()
    with pytest.raises(RuntimeError, match="this Locust environment has no rehearsal"):
        Rehearsal.of(first)
    a, b = Rehearsal().attach(first), Rehearsal().attach(second)
    a.flow_runs["signup"] += 1
    assert Rehearsal.of(first) is a and Rehearsal.of(second) is b and b.flow_runs == {}
