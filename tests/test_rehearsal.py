"""Rehearsals: `mailproof rehearse` end to end (sink service, the app and Locust as real
subprocesses), and the ledger and the rehearsal state in process.

Locust monkey-patches whatever imports it, so it only ever runs in a child process here
(mailproof.load.rehearsal and mailproof.load.ledger import it nowhere).

The end-to-end tests run two applications: Flask Shop (examples/flask_shop, someone else's app,
started by its own command) through `mailproof rehearse`, and the demo app through its launcher
(`python -m loadtests.rehearse`, what `make rehearsal` runs).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mailproof.load.gates import Gate
from mailproof.load.ledger import FAILED, INTERRUPTED, PASSED, Arrival, Claim, Ledger, arrival_key
from mailproof.load.rehearsal import Rehearsal, RehearsalOptions
from mailproof.load.results import RehearsalResults, RequestCounts, SinkSnapshot
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message
from mailproof.net import free_port
from mailproof.report import rehearsal as rehearsal_report

ROOT = Path(__file__).resolve().parent.parent
FLASK_APP = ROOT / "examples" / "flask_shop" / "app.py"
LOADFLOWS = ROOT / "examples" / "flask_shop" / "loadflows.py"


# -- running rehearsals --------------------------------------------------------------------------------


def mailproof(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "mailproof.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def flask_shop(flows: Path | str, out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`mailproof rehearse` on Flask Shop: the app on a port chosen here, ready when /health answers."""
    port = free_port()
    proc = mailproof("rehearse", "-f", str(flows), "--app", f"{sys.executable} {FLASK_APP}",
                     "--app-env", f"PORT={port}", "--app-ready", f"http://127.0.0.1:{port}/health",
                     "--grace", "5", "--out", str(out), *args, env=env)
    return proc, read_results(proc, out)


def own_app(app_text: str, flows_text: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`mailproof rehearse` on a one-file app of a test's own (it listens on $PORT; ready when
    /health answers) at 5 flows/s for 2 s; ``args`` add to or override the command line."""
    out.mkdir(parents=True, exist_ok=True)
    app, flows = out / "own_app.py", out / "own_flows.py"
    app.write_text(app_text)
    flows.write_text(flows_text)
    port = free_port()
    proc = mailproof("rehearse", "-f", str(flows), "--app", f"{sys.executable} {app}", "--app-env", f"PORT={port}",
                     "--app-ready", f"http://127.0.0.1:{port}/health", "--shape", "constant", "--peak-rate", "5",
                     "--duration", "2", "--out", str(out), *args)
    return proc, read_results(proc, out)


def demo(out: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """The demo's launcher (loadtests/rehearse.py: `mailproof rehearse` with the demo app and its fakes)."""
    proc = subprocess.run([sys.executable, "-m", "loadtests.rehearse", "--grace", "5", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, read_results(proc, out)


def read_results(proc: subprocess.CompletedProcess, out: Path) -> dict:
    results_file = out / "results.json"
    assert results_file.exists(), f"no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    RehearsalResults.read(results_file)  # the file the run wrote reads through the schema
    return json.loads(results_file.read_text())


def said(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"


def assert_reconciles(results: dict) -> None:
    flows = results["ledger"]["flows"]
    assert flows, "no flow expected any mail"
    for name, row in flows.items():
        assert row["expected"] == row["delivered"] + row["lost"] + row["unverified"], (name, row)
        assert row["late"] <= row["delivered"], (name, row)
    assert sum(row["expected"] for row in flows.values()) > 0


def total(results: dict, key: str) -> int:
    return sum(row[key] for row in results["ledger"]["flows"].values())


def history_users(out: Path) -> list[int]:
    with open(out / "locust_stats_history.csv", newline="") as handle:
        return [int(float(row["User Count"])) for row in csv.DictReader(handle) if row["Name"] == "Aggregated"]


# -- Flask Shop through `mailproof rehearse` -----------------------------------------------------------


def test_flask_shop_rehearsal_runs_exactly_the_users_asked_and_accounts_for_every_email(tmp_path):
    out = tmp_path / "run"
    proc, results = flask_shop(LOADFLOWS, out, "-u", "10", "-r", "5", "-t", "20s")
    assert proc.returncode == 0, said(proc)
    assert "RESULT: PASS" in proc.stdout
    assert_reconciles(results)
    assert total(results, "lost") == total(results, "duplicated") == results["ledger"]["unexpected"] == 0
    assert results["ledger"]["lost_emails"] == [] and results["harness"]["errors"] == []
    # Locust ran exactly -u users: its runner's count, and its own stats history, say 10 at most and at the end.
    run = results["run"]
    assert (run["users"], run["spawn_rate"], run["run_time"], run["shape"]) == (10, 5.0, 20.0, None)
    assert run["peak_users"] == 10
    users = history_users(out)
    assert max(users) == 10 and users.count(10) >= 10, users  # 10 users for (most of) the 20 s
    # Every flow ran and none failed; the answers the flows expect to be refused (404, 400, 401) are
    # not HTTP failures, because the flows said so with expect=.
    assert set(results["flows"]["runs"]) == {"signup_confirms_account", "tampered_confirmation_link_is_refused",
                                             "password_reset_code_works_once", "order_receipt_has_invoice"}
    assert results["flows"]["failures"] == {}
    assert results["http"]["failures"] == 0
    with open(out / "locust_stats.csv", newline="") as handle:
        stats = list(csv.DictReader(handle))
    refused = {row["Name"]: int(row["Request Count"]) for row in stats if row["Type"] in ("GET", "POST")}
    assert refused["/password/reset"] > 0 and refused["/login"] > 0  # where the expected 400 and 401 come from
    # One MAIL row per flow step, never one per address.
    mail_rows = [row["Name"] for row in stats if row["Type"] == "MAIL"]
    assert mail_rows and all("@" not in name and re.fullmatch(r"[a-z_]+: .+", name) for name in mail_rows), mail_rows
    assert "signup_confirms_account: The welcome email follows the confirmation" in mail_rows
    # Exact percentiles for each flow that waited for mail, in order; the report and Locust's files exist.
    for name, lat in results["latency"].items():
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (name, lat)
    for name in ("locust.html", "locust_stats.csv", "report.html", "locust.log"):
        assert (out / name).exists(), name
    assert "Locust ran at most 10 users" in proc.stdout


HEALTH_APP = textwrap.dedent(r'''
    import os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            status = 200 if self.path == "/health" else 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
''')


def test_locusts_csv_files_count_every_run_up_to_the_end(tmp_path):
    """Locust writes its CSVs on a timer and not when it quits (locust#1806): the run's last
    second was missing from them. With the timer held off (its first tick, at the start, is
    its last), the files still count every request, flow run and failure of the run."""
    flows = textwrap.dedent('''
        import sys

        from mailproof import flow

        if "locust.stats" in sys.modules:  # under Locust (the launcher imports this file too, without it)
            sys.modules["locust.stats"].CSV_STATS_INTERVAL_SEC = 3600  # Locust's writer: one tick, before any request

        @flow
        def finds_a_missing_page(flow):
            flow.http.get("/health")
            page = flow.http.get("/missing")  # 404, not expected: an HTTP failure
            assert page.status_code == 200, "the page is missing"  # and a failed run
    ''')
    out = tmp_path / "run"
    proc, results = own_app(HEALTH_APP, flows, out)
    assert proc.returncode == 3, said(proc)
    assert results["flows"]["runs"] == results["flows"]["failures"] == {"finds_a_missing_page": 10}
    assert (results["http"]["requests"], results["http"]["failures"]) == (20, 10)
    with open(out / "locust_stats.csv", newline="") as handle:
        rows = {(row["Type"], row["Name"]): (int(row["Request Count"]), int(row["Failure Count"]))
                for row in csv.DictReader(handle)}
    assert rows[("FLOW", "finds_a_missing_page")] == (10, 10)
    assert rows[("GET", "/health")] == (10, 0) and rows[("GET", "/missing")] == (10, 10)
    assert rows[("", "Aggregated")] == (30, 20)
    with open(out / "locust_failures.csv", newline="") as handle:
        failures = {(row["Method"], row["Name"]): int(row["Occurrences"]) for row in csv.DictReader(handle)}
    assert failures == {("GET", "/missing"): 10, ("FLOW", "finds_a_missing_page"): 10}
    assert not list(out.glob("*.tmp"))


def test_flows_whose_requests_all_get_404_fail_the_run_with_their_failures_and_lose_nothing(tmp_path):
    flows = tmp_path / "wrong_routes.py"
    flows.write_text(textwrap.dedent('''
        from mailproof import flow

        @flow
        def signup_on_a_route_that_does_not_exist(flow):
            address = flow.mailbox.address("nobody")
            response = flow.http.post("/no-such-signup", json={"email": address})
            assert response.status_code == 201, f"signup refused: HTTP {response.status_code}"
            flow.mailbox.wait_for(to=address, subject="Confirm", within=5)
    '''))
    proc, results = flask_shop(flows, tmp_path / "run", "-u", "3", "-r", "3", "-t", "3s")
    assert proc.returncode == 3, said(proc)
    name = "signup_on_a_route_that_does_not_exist"
    # Runs cut by the end of the run count as runs but are interrupted, not failed: every other run failed.
    runs = results["flows"]["runs"][name] - results["flows"]["interrupted"].get(name, 0)
    assert runs > 0 and results["flows"]["failures"][name] == runs
    assert results["flows"]["failure_kinds"] == {name: {"AssertionError": runs}}
    assert results["ledger"]["lost_emails"] == [] and total_or_zero(results, "lost") == 0
    assert results["ledger"]["unexpected"] == 0
    assert results["http"]["failures"] == results["http"]["requests"] > 0  # every 404 is an HTTP failure
    failed = {(g["gate"], g["subject"]) for g in results["gates"] if not g["passed"]}
    assert failed == {("flows:failure_rate<=0%", "signup_on_a_route_that_does_not_exist"),
                      ("http:error_rate<=1%", "http")}
    assert "AssertionError: signup refused: HTTP 404" in proc.stdout  # the flow failures, with a sample
    assert re.search(r"signup_on_a_route_that_does_not_exist +\d+ run\(s\), \d+ failed"
                     r"(, \d+ interrupted by the end of the run)? \(AssertionError x\d+\)", proc.stdout), proc.stdout


def test_failed_deliverability_checks_of_a_real_rehearsal_are_counted_per_flow(tmp_path):
    """Flask Shop does not sign its mail: every dkim check of the run fails, every clients check
    runs; the failed checks are counted per flow and check (results.json, Locust's CHECK rows),
    and the runs themselves pass (the flow does not assert on the checks)."""
    flows = tmp_path / "checked.py"
    flows.write_text(textwrap.dedent('''
        from mailproof import flow

        @flow
        def checked_signup(flow):
            address = flow.mailbox.address("checked")
            assert flow.http.post("/signup", json={"email": address, "name": "Ada"}).status_code == 201
            msg = flow.mailbox.wait_for(to=address, subject="Confirm your Flask Shop account", within=5)
            msg.checks.dkim()
            msg.checks.clients()
    '''))
    proc, results = flask_shop(flows, tmp_path / "run", "-u", "2", "-r", "2", "-t", "4s")
    name = "checked_signup"
    finished = results["flows"]["runs"][name] - results["flows"]["interrupted"].get(name, 0)
    assert finished > 0 and results["flows"]["failures"].get(name, 0) == 0, said(proc)
    dkim_failures = results["flows"]["check_failures"][name]["dkim"]
    assert finished <= dkim_failures <= results["flows"]["runs"][name], results["flows"]
    assert set(results["flows"]["check_failures"][name]) == {"dkim"}  # clients warns at most, never fails
    assert results["http"]["failures"] == 0  # CHECK events are not HTTP requests
    with open(tmp_path / "run" / "locust_stats.csv", newline="") as handle:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(handle)}
    assert int(rows[("CHECK", f"{name}: dkim")]["Failure Count"]) == dkim_failures
    assert int(rows[("CHECK", f"{name}: clients")]["Failure Count"]) == 0


def total_or_zero(results: dict, key: str) -> int:
    return sum(row[key] for row in results["ledger"]["flows"].values()) if results["ledger"]["flows"] else 0


def test_resent_and_stray_mail_in_a_real_rehearsal_are_duplicated_and_unexpected(tmp_path):
    """after_data disconnect: the sink keeps the message and hangs up; Flask Shop's outbox retries
    (3 attempts), so every receipt comes 3 times: 1 delivered and 2 duplicated. A flow that sends
    straight to the sink, to an address nobody handed out, makes unexpected mail."""
    smtp_port = free_port()
    flows = tmp_path / "dupflows.py"
    flows.write_text(textwrap.dedent('''
        import os
        import smtplib

        from mailproof import flow
        from examples.flask_shop.flows.orders import order_receipt_has_invoice

        __all__ = ["order_then_stray"]

        @flow
        def order_then_stray(flow):
            """An order (its receipt comes 3 times), then, not the app: one message straight to
            the sink, to a stranger. One flow, so every run does both (a weighted mix of two flows
            could, by chance, never pick the stray one in a short run)."""
            order_receipt_has_invoice(flow)
            with smtplib.SMTP("127.0.0.1", int(os.environ["STRAY_SMTP_PORT"]), timeout=10) as smtp:
                try:
                    smtp.sendmail("someone@elsewhere.test", ["stranger@nobody.test"],
                                  b"Subject: not for you\\r\\n\\r\\nhello\\r\\n")
                except smtplib.SMTPServerDisconnected:
                    pass  # the chaos profile hangs up after DATA: the message is captured all the same
    '''))
    proc, results = flask_shop(flows, tmp_path / "run", "-u", "3", "-r", "3", "-t", "4s",
                               "--smtp-port", str(smtp_port), "--chaos", "100%:after_data:disconnect",
                               env={"STRAY_SMTP_PORT": str(smtp_port)})
    assert proc.returncode == 3, said(proc)
    row = results["ledger"]["flows"]["order_then_stray"]
    context = (row, results["flows"], results["ledger"]["lost_emails"], said(proc))
    assert row["delivered"] == row["expected"] > 0 and row["lost"] == 0 and row["unexpected"] == 0, context
    assert row["duplicated"] == 2 * row["delivered"], context  # two resends of each receipt
    assert set(results["ledger"]["duplicated_addresses"].values()) == {2}
    # Each run that finished sent one stray (a failed or interrupted run may have stopped before it).
    flows_ = results["flows"]
    strays = (flows_["runs"]["order_then_stray"] - flows_["failures"].get("order_then_stray", 0)
              - flows_["interrupted"].get("order_then_stray", 0))
    sent = results["ledger"]["unexpected"]
    assert strays <= sent <= results["flows"]["runs"]["order_then_stray"] and sent > 0, (
        results["ledger"]["unexpected_emails"], context)
    assert results["ledger"]["unexpected_addresses"] == {"stranger@nobody.test": sent}
    assert {s["why"] for s in results["ledger"]["unexpected_emails"]} == {"no flow handed out this address"}
    failed = {(g["gate"], g["subject"]) for g in results["gates"] if not g["passed"]}
    assert failed == {("*:duplicated==0", "order_then_stray"), ("unexpected==0", "run")}, failed
    assert "stranger@nobody.test" in proc.stdout and "duplicated (extra copies)" in proc.stdout


# -- the demo, through its launcher (what `make rehearsal` runs) ---------------------------------------


def test_ten_short_demo_rehearsals_find_no_false_lost_mail(tmp_path):
    """Short runs end with many flows in flight: every other one stops them at once (--stop-timeout 0),
    so runs are cut before, during and after their triggers. None may count a lost email."""
    interrupted = 0
    for i in range(10):
        stop = ["--stop-timeout", "0"] if i % 2 else []
        proc, results = demo(tmp_path / f"run{i}", "-u", "10", "-r", "10", "-t", "3s", *stop)
        assert proc.returncode in (0, 3), said(proc)
        assert total_or_zero(results, "lost") == 0, (i, results["ledger"]["lost_emails"][:5], said(proc))
        assert total_or_zero(results, "unverified") == 0 and results["harness"]["errors"] == [], (i, said(proc))
        assert results["ledger"]["unexpected"] == 0, (i, results["ledger"]["unexpected_emails"][:5])
        interrupted += sum(results["flows"]["interrupted"].values())
    assert interrupted > 0, "no run was cut short: the test did not exercise what it is about"


def test_an_impossible_gate_fails_the_demo_run_and_says_by_how_much(tmp_path):
    proc, results = demo(tmp_path / "run", "--duration", "6", "--peak-rate", "4", "--max-users", "8",
                         "--gate", "signup_confirms_account:p50<1ms", "--flow-mix", "signup_confirms_account=1")
    assert proc.returncode == 3, said(proc)
    assert results["passed"] is False
    failed = [g for g in results["gates"] if not g["passed"]]
    assert "signup_confirms_account:p50<1ms" in [g["gate"] for g in failed]
    assert all("missed by" in g["detail"] for g in failed)
    assert "[FAIL] signup_confirms_account:p50<1ms" in proc.stdout
    assert_reconciles(results)
    assert results["run"]["shape"] == "burst" and results["run"]["users"] == 8
    assert results["run"]["peak_rate"] == 4.0


def test_a_shape_holds_its_offered_rate_on_a_slow_app_and_reports_a_cap_too_small(tmp_path):
    """Open model: the sink delays every DATA by 2 s, so each signup flow takes over 2 s. A shape
    of 4 flows/s still starts 4 every second (a closed model's 4 users would start 2). With a cap
    of 3 users the load cannot be held, and the run says so instead of quietly offering less."""
    common = ("--shape", "constant", "--peak-rate", "4", "--duration", "6", "--chaos", "100%:data:delay=2",
              "--flow-mix", "signup_confirms_account=1")
    proc, results = demo(tmp_path / "held", *common, "--max-users", "20")
    assert proc.returncode == 0, said(proc)
    arrivals = results["run"]["arrivals"]
    assert arrivals["offered"][:6] == [4] * 6, arrivals
    assert arrivals["started"][:6] == [4] * 6, arrivals  # every second, slow flows or not
    assert (arrivals["cap_hits"], arrivals["not_started"]) == (0, 0)
    assert sum(arrivals["completed"]) == 24 and results["flows"]["runs"]["signup_confirms_account"] == 24
    assert "arrivals: 24 offered, 24 started, 24 completed" in proc.stdout
    row = results["ledger"]["flows"]["signup_confirms_account"]
    assert (row["expected"], row["delivered"], row["lost"]) == (24, 24, 0)

    proc, results = demo(tmp_path / "capped", *common, "--max-users", "3")
    arrivals = results["run"]["arrivals"]
    assert sum(arrivals["offered"]) == 24 and sum(arrivals["started"]) < 24, arrivals
    assert arrivals["cap_hits"] + arrivals["not_started"] >= 24 - 3 * 3, arrivals  # 3 users, flows > 2 s
    assert "all 3 users were busy" in proc.stdout and "raise --max-users" in proc.stdout
    assert_reconciles(results)
    assert total(results, "lost") == 0


def test_distributed_demo_run_merges_the_workers_ledgers(tmp_path):
    proc, results = demo(tmp_path / "run", "-u", "6", "-r", "6", "-t", "5s", "--workers", "2")
    assert proc.returncode in (0, 3), said(proc)
    workers = results["workers"]
    assert len(workers) == 2, workers
    merged = results["ledger"]["flows"]
    for name, row in merged.items():
        for key in ("expected", "delivered", "lost", "duplicated", "late", "interrupted"):
            assert row[key] == sum(w["flows"].get(name, {}).get(key, 0) for w in workers.values()), (name, key)
    assert_reconciles(results)
    assert total(results, "lost") == 0
    assert results["ledger"]["unexpected"] == 0  # each worker's mail is not "unexpected" to the master
    assert results["run"]["mode"] == "distributed" and results["run"]["missing_workers"] == []
    assert results["run"]["peak_users"] == 6
    # Fan-in: the sink streams each worker its own mail only (the demo sends no strays), so the
    # workers' streams together carried each captured message once, and each worker some of them.
    (sink,) = results["harness"]["sinks"]
    assert all(0 < w["stream"]["received"] < sink["received"] for w in workers.values()), (workers, sink)
    assert results["harness"]["stream"]["received"] == sink["received"]
    assert all(w["stream"]["missing"] == 0 for w in workers.values())


def test_a_chaos_run_records_its_profile_and_faults_and_the_report_shows_them(tmp_path):
    proc, results = demo(tmp_path / "run", "--duration", "8", "--peak-rate", "4", "--chaos", "30%:rcpt:451",
                         "--chaos-seed", "11", "--flow-mix", "signup_confirms_account=1")
    assert proc.returncode in (0, 3), said(proc)
    assert results["run"]["chaos_profile"] == "30%:rcpt:451" and results["run"]["chaos_seed"] == 11
    (sink,) = results["harness"]["sinks"]
    (rule,) = sink["faults"]
    assert rule["name"] == "chaos:30%:rcpt:451" and rule["stage"] == "rcpt"
    assert rule["action"]["chaos"]["seed"] == 11  # the profile's first item gets the seed itself
    assert rule["acted"] > 0  # 30 % of some dozens of recipients were deferred
    # Every RCPT the rule let through became one captured message (one recipient per signup mail),
    # and every captured message is in the ledger, in one category or another.
    row = results["ledger"]["flows"]["signup_confirms_account"]
    assert rule["fired"] - rule["acted"] == sink["received"]
    assert sink["received"] == (row["delivered"] + row["duplicated"] + row["interrupted"] + row["unawaited"]
                                + results["ledger"]["unexpected"])
    assert results["harness"]["stream"]["received"] == sink["received"]
    assert "chaos profile: 30%:rcpt:451 (seed 11)" in proc.stdout

    out = tmp_path / "report.html"
    assert rehearsal_report.main([str(tmp_path / "run" / "results.json"), "-o", str(out)]) == 0
    page = out.read_text()
    faults = page[page.index('<section id="faults">'):page.index('<section id="harness">')]
    assert "chaos <code>30%:rcpt:451</code> (seed 11)" in page
    assert f'<td data-key="fired">{rule["fired"]}</td><td data-key="acted">{rule["acted"]}</td>' in faults
    assert f'id="faults-acted">{rule["acted"]}<' in page


# -- the ledger, in process ------------------------------------------------------------------------------

T0 = 1_800_000_000.0
RAW = b"Subject: %s\r\nMessage-ID: <%s@app.test>\r\n\r\nhi\r\n"


def mail(to: str, t: float, subject: str = "Your receipt", seq: int | None = None, message_id: str | None = None) -> Message:
    seq = seq if seq is not None else int((t - T0) * 1000) + hash(to) % 1000
    raw = RAW % (subject.encode(), (message_id or f"m{seq}").encode())
    return Message(raw, rcpt_tos=[to], received_at=t, extra={"service_seq": seq})


class Run:
    """One flow run against a real Mailbox, recorded the way FlowUser records it."""

    def __init__(self, ledger: Ledger, store: MailStore, flow: str = "order") -> None:
        self.ledger, self.store, self.flow = ledger, store, flow
        self.mailbox = Mailbox(store, default_within=5)
        self.claims: list = []

    def address(self, trigger: float | None = None, expect: int | None = 1, within: float = 5.0) -> str:
        address = self.mailbox.address(self.flow)
        if trigger is not None:
            self.mailbox.mark(address, at=trigger)
        if expect is not None:  # what a wait arms (Mailbox.expected), without blocking this test
            self.mailbox.expected[address.lower()] = (expect, within)
        return address

    def claim(self, address: str, msg: Message, latency: float, late: bool = False) -> None:
        self.claims.append((address, Claim(key=f"s{msg.extra['service_seq']}", t=msg.received_at, latency=latency,
                                           late=late, subject=msg.subject or "", message_id=msg.message_id)))

    def record(self, outcome: str = PASSED, last_trigger: float | None = None) -> None:
        if last_trigger is not None:
            self.mailbox.triggers.add(last_trigger)
        self.ledger.record_flow(self.flow, self.mailbox, outcome=outcome, claims=self.claims)


@pytest.fixture
def ledger_and_store():
    ledger, store = Ledger(grace=0.2), MailStore()
    store.add_listener(ledger.on_arrival)
    return ledger, store


def test_only_awaited_addresses_are_expected_and_unawaited_mail_is_unexpected(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    awaited = run.address(trigger=T0)
    handed_only = run.address(trigger=T0, expect=None)  # handed out, never awaited
    store.deliver(mail(awaited, T0 + 0.5))
    run.claim(awaited, store.since(0)[-1], 0.5)
    run.record()
    counts = ledger.reconcile()
    assert (counts.flows["order"].expected, counts.flows["order"].delivered, counts.flows["order"].lost) == (1, 1, 0)
    assert counts.handed_out == 2
    store.deliver(mail(handed_only, T0 + 1, subject="Surprise"))
    counts = ledger.reconcile()
    assert counts.flows["order"].lost == 0 and counts.unexpected == 1
    assert counts.unexpected_addresses == {handed_only.lower(): 1}
    (stray,) = counts.unexpected_emails
    assert (stray.flow, stray.subject, stray.why) == ("order", "Surprise",
                                                      "handed out by the flow, which never awaited mail there")


def test_a_run_stopped_before_its_trigger_is_interrupted_never_lost_nor_unexpected(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    untriggered = run.address(trigger=None, expect=1)  # armed, but the run was stopped before any trigger
    never_armed = run.address(trigger=None, expect=None)
    run.record(INTERRUPTED)
    assert ledger.settle(timeout=0.1)  # nothing owed
    store.deliver(mail(never_armed, T0 + 1))  # its request got through before the stop
    store.deliver(mail(untriggered, T0 + 1))
    counts = ledger.reconcile()
    row = counts.flows["order"]
    assert (row.expected, row.lost, row.interrupted) == (0, 0, 2)
    assert counts.unexpected == 0 and counts.lost_emails == []


def test_a_run_stopped_after_its_trigger_is_awaited_through_the_grace_period(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    comes = run.address(trigger=T0)
    never = run.address(trigger=T0 + 0.1)
    run.record(INTERRUPTED)
    assert ledger.outstanding == 2
    threading.Timer(0.05, lambda: store.deliver(mail(comes, T0 + 7.0))).start()
    started = time.monotonic()
    assert ledger.settle(timeout=1.0) is False  # one never came: the whole grace was waited
    assert time.monotonic() - started >= 0.9
    counts = ledger.reconcile()
    row = counts.flows["order"]
    assert (row.expected, row.delivered, row.late, row.lost) == (2, 1, 1, 1)  # 7 s after its trigger: late
    (lost,) = counts.lost_emails
    assert (lost.address, lost.trigger, lost.run) == (never.lower(), T0 + 0.1, "interrupted")
    assert ledger.latencies(comes) == [pytest.approx(7.0)]  # received_at - trigger_of(address)


def test_extra_copies_are_duplicated_other_extra_mail_and_mail_where_none_was_expected_unexpected(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    receipt = run.address(trigger=T0)
    quiet = run.address(trigger=T0, expect=0)  # expect_no_mail
    first = mail(receipt, T0 + 0.3, subject="Receipt FS-1", seq=1)
    store.deliver(first)
    run.claim(receipt, store.since(0)[-1], 0.3)
    run.record()
    store.deliver(mail(receipt, T0 + 0.5, subject="Receipt FS-1", seq=2))  # the app resent it
    store.deliver(mail(receipt, T0 + 0.6, subject="Something else", seq=3))  # another email, unasked
    store.deliver(mail(quiet, T0 + 0.7, subject="Receipt FS-2", seq=4))
    counts = ledger.reconcile()
    row = counts.flows["order"]
    assert (row.expected, row.delivered, row.duplicated, row.unexpected, row.negative_checks) == (1, 1, 1, 2, 1)
    assert counts.duplicated_addresses == {receipt.lower(): 1}
    assert counts.unexpected == 2 and counts.unexpected_addresses == {receipt.lower(): 1, quiet.lower(): 1}
    whys = {s.address: s.why for s in counts.unexpected_emails}
    assert whys[quiet.lower()] == "the address expected no mail"
    assert whys[receipt.lower()] == "an email beyond the 1 expected, and no copy of one"


def test_a_restarted_services_seqs_are_new_emails_not_copies(ledger_and_store):
    """A restarted sink service numbers its mail from 1 again: seq 1 of each run is its own email,
    never dropped as one already seen (that read as a lost second email)."""
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    address = run.address(trigger=T0, expect=2)
    before, after = (Message(RAW % (b"Issue %d" % n, b"m%d" % n), rcpt_tos=[address], received_at=T0 + n,
                             extra={"service_seq": 1, "service_instance": instance})
                     for n, instance in ((1, "run-a"), (2, "run-b")))
    store.deliver(before)
    store.deliver(after)
    assert arrival_key(before) != arrival_key(after)
    run.record()
    counts = ledger.reconcile()
    row = counts.flows["order"]
    assert (row.expected, row.delivered, row.lost, row.duplicated) == (2, 2, 0, 0)


def test_a_failed_runs_mail_after_its_last_wait_is_unawaited_and_mail_after_its_gave_up_wait_delivered(
        ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    address = run.address(trigger=T0, expect=1)
    store.deliver(mail(address, T0 + 0.2, subject="Confirm", seq=1))
    run.claim(address, store.since(0)[-1], 0.2)
    slow = run.address(trigger=T0 + 1, expect=1)  # its wait gave up: the run failed on MailNotDelivered
    run.record(FAILED, last_trigger=T0 + 2)  # then a request that causes mail no wait was armed for
    store.deliver(mail(address, T0 + 2.5, subject="Welcome", seq=2))
    store.deliver(mail(slow, T0 + 12, subject="Receipt", seq=3))
    counts = ledger.reconcile()
    row = counts.flows["order"]
    assert (row.expected, row.delivered, row.late, row.lost, row.unawaited, row.unexpected) == (2, 2, 1, 0, 1, 0)
    assert counts.unexpected == 0


def test_every_delivery_is_in_the_latency_percentiles_and_the_timeline(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    fast, slow = run.address(trigger=T0), run.address(trigger=T0 + 1)
    store.deliver(mail(fast, T0 + 0.25, seq=1))
    run.claim(fast, store.since(0)[-1], 0.25)
    run.record(FAILED)
    store.deliver(mail(slow, T0 + 9, seq=2))  # after its wait gave up
    summary = ledger.latency_histograms().summary()["order"]
    assert summary.count == 2 and summary.max == pytest.approx(8.0, rel=1e-3)
    timeline = ledger.timeline()
    assert timeline.sends == [(int(T0), 1), (int(T0) + 1, 1)]
    assert [round(s.latency, 3) for s in timeline.samples] == [0.25, 8.0]


def test_settle_listens_for_stragglers_once_everything_expected_has_come(ledger_and_store):
    ledger, store = ledger_and_store
    run = Run(ledger, store)
    address = run.address(trigger=T0)
    store.deliver(mail(address, T0 + 0.1, subject="Receipt", seq=1))
    run.record()
    threading.Timer(0.3, lambda: store.deliver(mail(address, T0 + 0.4, subject="Receipt", seq=2))).start()
    assert ledger.settle(timeout=3, quiet=0.6)
    assert ledger.reconcile().flows["order"].duplicated == 1  # the resend 0.3 s later was still counted


# -- the rehearsal state: harness gaps, workers ------------------------------------------------------------


class StubStream:
    """Only the counters of a RemoteSink (mailproof.capture.remote), as a worker would read them."""

    def __init__(self, received: int = 0, missing: int = 0, connections: int = 1) -> None:
        self.received, self.duplicates, self.missing = received, 0, missing
        self.stream_connections, self.restarts, self.last_seq = connections, 0, received
        self.store = MailStore()

    def stop(self) -> None:
        pass


def rehearsal_run(rehearsal: Rehearsal, store: MailStore, flow: str, trigger: float, arrives: float | None) -> str:
    """One flow run: hand out an address, trigger, (maybe) get the mail, record the run."""
    mailbox = Mailbox(store, rehearsal.address_book, default_within=5)
    address = mailbox.address(flow)
    mailbox.mark(address, at=trigger)
    claims, error = [], None
    if arrives is not None:
        store.deliver(Message(b"Subject: hi\r\n\r\nhi\r\n", rcpt_tos=[address], received_at=arrives,
                              extra={"service_seq": int(arrives * 1000)}))
        msg = mailbox.wait_for(to=address, within=5)
        claims.append((address.lower(), Claim(key=f"s{msg.extra['service_seq']}", t=msg.received_at,
                                              latency=msg.latency, late=False, subject="hi")))
    else:
        mailbox.expected[address.lower()] = (1, 5.0)
        error = AssertionError("no mail")
    rehearsal.record_flow_run(flow, mailbox, error, claims=claims)
    mailbox.close()
    return address


def counts(**kw) -> dict:
    return {"http": RequestCounts(requests=kw.get("requests", 4)), "locust": RequestCounts(requests=6)}


def test_a_lost_email_is_checked_at_the_sink_and_with_harness_gaps_never_blamed_on_the_app():
    store = MailStore()
    local = Rehearsal(RehearsalOptions(grace=0.1))
    store.add_listener(local.ledger.on_arrival)
    found = rehearsal_run(local, store, "signup", T0, None)  # the stream missed it; the sink has it
    unknown = rehearsal_run(local, store, "signup", T0 + 1, None)  # the sink lost records: cannot tell
    local.backend = StubStream(received=0, missing=3)
    local.sinks = {"s": SinkSnapshot(url="s", fetched_at=T0, received=4, retained=1, evicted=3, cleared=0,
                                     smtp_connections=4)}
    sink_records = {found.lower(): [Arrival(key="s77", t=T0 + 0.5, subject="Confirm")]}
    results = local.results(**counts(), lookup=lambda a: sink_records.get(a, []))
    row = results.ledger.flows["signup"]
    assert (row.expected, row.delivered, row.lost, row.unverified) == (2, 1, 0, 1)
    assert results.harness.recovered == 1 and results.ledger.lost_emails == []
    assert {e.kind for e in results.harness.errors} == {"stream_gap", "unverified"}
    failed = {(g.gate, g.subject) for g in results.gates if not g.passed}
    assert ("harness:errors==0", "harness") in failed and not any(g == "*:lost==0" for g, _ in failed)


def test_without_gaps_a_lost_email_is_lost_with_what_the_sink_and_the_app_said():
    store = MailStore()
    local = Rehearsal(RehearsalOptions(grace=0.1))
    store.add_listener(local.ledger.on_arrival)
    address = rehearsal_run(local, store, "signup", T0, None)
    local.backend = StubStream(received=0)
    results = local.results(**counts(), lookup=lambda a: [])
    (lost,) = results.ledger.lost_emails
    assert (lost.flow, lost.address, lost.trigger, lost.run) == ("signup", address.lower(), T0, "failed")
    assert lost.sink == "the sink service captured no message to this address (checked)"
    assert results.harness.errors == []
    assert [(g.gate, g.subject) for g in results.gates if not g.passed] == [
        ("*:lost==0", "signup"), ("flows:failure_rate<=0%", "signup")]


def test_a_run_in_which_no_flow_finished_does_not_pass():
    results = Rehearsal(RehearsalOptions()).results(**counts(requests=0))
    assert results.passed is False
    assert [(g.gate, g.passed) for g in results.gates][0] == ("flows ran", False)


def test_the_master_merges_worker_reports_into_one_result():
    store = MailStore()  # one sink: both workers see every message
    w1, w2 = (Rehearsal(RehearsalOptions(grace=0.1), role="worker") for _ in range(2))
    for worker in (w1, w2):
        store.add_listener(worker.ledger.on_arrival)
    rehearsal_run(w1, store, "signup", T0, T0 + 0.5)
    rehearsal_run(w1, store, "signup", T0 + 1, None)  # lost
    rehearsal_run(w2, store, "signup", T0 + 2, T0 + 2.25)
    rehearsal_run(w2, store, "receipt", T0 + 3, T0 + 4.0)
    w3_address = w1.address_book.address("x").replace(w1.address_book.run_id, "zzzzzz")
    store.deliver(Message(b"Subject: w3\r\n\r\n", rcpt_tos=[w3_address], received_at=T0 + 5,
                          extra={"service_seq": 999}))  # mail of worker w3, which never reports
    for worker, flow_name, check, failed in ((w1, "signup", "dkim", True), (w2, "signup", "dkim", True),
                                             (w2, "receipt", "spam", True), (w2, "receipt", "clients", False)):
        worker.record_check(flow_name, check, failed)
    w1.backend, w2.backend = StubStream(4, missing=0, connections=1), StubStream(4, missing=0, connections=3)
    old = SinkSnapshot(url="http://sink", fetched_at=T0 + 10, received=4, retained=4, evicted=0, cleared=0,
                       smtp_connections=3)
    new = SinkSnapshot(url="http://sink", fetched_at=T0 + 11, received=4, retained=4, evicted=0, cleared=0,
                       smtp_connections=4)
    w1.sinks, w2.sinks = {old.url: old}, {new.url: new}

    master = Rehearsal(RehearsalOptions(gates=(Gate.parse("*:lost==0"),), chaos_profile="5%:rcpt:451",
                                        chaos_seed=3), role="master")
    expected = {"w1", "w2", "w3"}
    # The reports travel as JSON-able data (Locust sends them with msgpack).
    assert master.add_report("w2", json.loads(json.dumps(w2.report())), expected) is False
    assert master.add_report("w1", json.loads(json.dumps(w1.report())), expected) is False  # w3 never reports
    master.merge_reports(expected)
    master.started_at = T0
    results = master.results(http=RequestCounts(requests=8, failures=0), locust=RequestCounts(requests=12, failures=1),
                             finished_at=T0 + 12, lookup=lambda a: [])

    signup, receipt = results.ledger.flows["signup"], results.ledger.flows["receipt"]
    assert (signup.expected, signup.delivered, signup.lost) == (3, 2, 1)
    assert (receipt.expected, receipt.delivered, receipt.late) == (1, 1, 0)
    # w2's mail is not unexpected because w1 saw it too; w3's is left out and said so, not unexpected.
    assert results.ledger.unexpected == 0
    assert [(e.kind, e.count) for e in results.harness.errors] == [("unreported_worker", 1)]
    assert results.workers["w1"].flows["signup"].lost == 1 and "receipt" not in results.workers["w1"].flows
    assert results.workers["w2"].flows["receipt"].delivered == 1
    assert results.latency["signup"].count == 2 and results.latency["receipt"].max == pytest.approx(1.0, rel=1e-3)
    assert results.flows.runs == {"receipt": 1, "signup": 3} and results.flows.failures == {"signup": 1}
    assert results.flows.failure_samples == {"signup": "AssertionError: no mail"}
    assert results.flows.check_failures == {"receipt": {"spam": 1}, "signup": {"dkim": 2}}
    assert results.run.mode == "distributed" and results.run.missing_workers == ["w3"]
    assert results.run.workers_expected == 3
    assert (results.run.chaos_profile, results.run.chaos_seed) == ("5%:rcpt:451", 3)
    assert (results.harness.stream.received, results.harness.stream.missing, results.harness.stream.reconnects) \
        == (8, 0, 2)
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
