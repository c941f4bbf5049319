"""The rehearsal report (mailproof/report/rehearsal.py) and results.json (mailproof/load/results.py).

The results are assembled the way a rehearsal's master does it: a real Ledger fed with
expectations and arrivals, real HdrHistograms, the real SLO gate evaluation, written and read
back through RehearsalResults. Locust itself is not imported here (it monkey-patches the
process); the browser check is in test_reports_browser.py, a real chaos run in test_rehearsal.py.
"""

from __future__ import annotations

import copy
import html
import json
import re
from html.parser import HTMLParser

import pytest

from mailproof.report import rehearsal as rehearsal_report
from mailproof.load.gates import DEFAULT_GATES, Gate
from mailproof.load.latency import LatencyHistograms
from mailproof.load.ledger import Arrival, Expectation, Ledger
from mailproof.load.results import (FaultRecord, FlowRuns, Harness, RehearsalResults, RequestCounts,
                                    ResultsError, RunInfo, Sample, SinkSnapshot, StreamCounters)
from mailproof.load.summary import render_summary

T0 = 1_800_000_000.0
SINK = "http://127.0.0.1:8025"


def make_results(latencies: dict[str, list[float]], lost: dict[str, int] = {}, late_within: float = 5.0,
                 gates: tuple[str, ...] = (), duplicates: int = 0, unexpected: int = 0,
                 chaos: tuple = (None, None), faults: list = (), stream: StreamCounters | None = None,
                 notes: tuple[str, ...] = ()) -> RehearsalResults:
    """Results as mailproof.load.rehearsal.Rehearsal.results builds them, from a real Ledger and histograms."""
    ledger, histograms = Ledger(), LatencyHistograms()
    n = 0
    for flow, values in latencies.items():
        for i, latency in enumerate(values):
            trigger = T0 + i * 0.5
            address = f"{flow}+{n:06d}@mailproof.test"
            n += 1
            ledger.expectations[address] = Expectation(flow=flow, count=1, within=late_within, trigger=trigger)
            arrivals = [Arrival(key=f"{address}#1", t=trigger + latency, subject=f"{flow} mail")]
            if duplicates and i < duplicates:
                arrivals.append(Arrival(key=f"{address}#2", t=trigger + latency + 0.01, subject=f"{flow} mail"))
            ledger.recover(address, arrivals)
            histograms.record(flow, latency)
    for flow, count in lost.items():
        for j in range(count):
            address = f"{flow}+lost{j:03d}@mailproof.test"
            ledger.expectations[address] = Expectation(flow=flow, count=1, within=late_within, trigger=T0 + j)
    for k in range(unexpected):
        ledger.recover(f"stranger+{k}@mailproof.test", [Arrival(key=f"stray{k}", t=T0 + k, subject="hello")])
    sinks = [SinkSnapshot(url=SINK, fetched_at=T0 + 60, received=n + duplicates + unexpected, retained=n,
                          evicted=0, cleared=0, smtp_connections=n, faults=list(faults))] if faults else []
    results = RehearsalResults(
        run=RunInfo(started_at=T0, finished_at=T0 + 60, host="http://127.0.0.1:8000", mode="local",
                    workers_expected=0, missing_workers=[], grace=10.0, chaos_profile=chaos[0], chaos_seed=chaos[1]),
        ledger=ledger.reconcile(), latency=ledger.latency_histograms().summary(),
        http=RequestCounts(requests=200, failures=1), locust=RequestCounts(requests=300, failures=1),
        flows=FlowRuns(runs={f: len(latencies.get(f, ())) + lost.get(f, 0) for f in sorted({*latencies, *lost})},
                       failures={f: c for f, c in lost.items() if c},
                       failure_samples={f: f"MailNotDelivered: no mail to {f}+lost000@mailproof.test within 5 s"
                                        for f, c in lost.items() if c}),
        timeline=ledger.timeline(),
        harness=Harness(stream=stream, sinks=sinks, notes=list(notes)),
    ).judge([Gate.parse(g) for g in (*DEFAULT_GATES, *gates)])
    return RehearsalResults.from_json(results.to_json())  # exactly what a reader of results.json gets


class Cells(HTMLParser):
    """Collects the text of every <td data-key> per <tr data-flow>, per section id."""

    def __init__(self) -> None:
        super().__init__()
        self.section = ""
        self.flow = None
        self.key = None
        self.cells: dict[tuple[str, str, str], str] = {}
        self.verdict = ""
        self._in_verdict = False
        self.gate_rows: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id", "")
        if tag == "tr":
            self.flow = a.get("data-flow") or a.get("data-row")
            if "gate" in (a.get("class") or "").split():
                self.gate_rows.append(a["class"])
        if tag == "td" and a.get("data-key") and self.flow:
            self.key = a["data-key"]
            self.cells[(self.section, self.flow, self.key)] = ""
        if tag == "span" and "delta" in (a.get("class") or "") and self.key:
            self.cells[(self.section, self.flow, self.key)] += " | "
        if a.get("id") == "verdict":
            self._in_verdict = True

    def handle_endtag(self, tag):
        if tag == "td":
            self.key = None
        if tag == "div":
            self._in_verdict = False

    def handle_data(self, data):
        if self.key and self.flow:
            self.cells[(self.section, self.flow, self.key)] += data
        if self._in_verdict:
            self.verdict += data.strip()


def parse(page: str) -> Cells:
    cells = Cells()
    cells.feed(page)
    return cells


def value(cells: Cells, section: str, flow: str, key: str) -> str:
    """The number in a cell, without the change printed under it."""
    return cells.cells[(section, flow, key)].split(" | ")[0].strip()


def delta(cells: Cells, section: str, flow: str, key: str) -> str:
    """The change printed under a number ("" when there is none)."""
    parts = cells.cells[(section, flow, key)].split(" | ")
    return parts[1].strip() if len(parts) > 1 else ""


def test_report_shows_gate_verdicts_ledger_and_exact_percentiles():
    signup = [0.040 + i * 0.001 for i in range(100)]  # 40 .. 139 ms
    receipts = [0.2, 0.25, 0.3, 6.5]  # one arrives after its 5 s
    results = make_results({"signup_confirms_account": signup, "order_receipt": receipts},
                           lost={"order_receipt": 2}, gates=("signup_confirms_account:p95<100ms",))
    page = rehearsal_report.render(results)
    cells = parse(page)

    assert cells.verdict == "FAIL"
    # Failed gates first: the lost and the late receipt, the failed receipt runs, signup's p95 above 100 ms.
    failed = [row for row in cells.gate_rows if "failed" in row]
    assert len(failed) == 4 and cells.gate_rows[:4] == failed
    assert sorted((g.gate, g.subject) for g in results.gates if not g.passed) == [
        ("*:late==0", "order_receipt"), ("*:lost==0", "order_receipt"),
        ("flows:failure_rate<=0%", "order_receipt"), ("signup_confirms_account:p95<100ms", "signup_confirms_account")]
    assert "order_receipt: lost 2 == 0: missed by 2" in page
    assert re.search(r"signup_confirms_account: p95 0\.13\d s &lt; 0\.100 s: missed by", page)

    assert value(cells, "ledger", "order_receipt", "expected") == "6"
    assert value(cells, "ledger", "order_receipt", "delivered") == "4"
    assert value(cells, "ledger", "order_receipt", "late") == "1"
    assert value(cells, "ledger", "order_receipt", "lost") == "2"
    assert value(cells, "ledger", "signup_confirms_account", "delivered") == "100"

    # The percentiles are the histograms' (three significant digits), in ms.
    summary = results.latency["signup_confirms_account"]
    for p in ("p50", "p90", "p95", "p99", "max"):
        expected = getattr(summary, p) * 1000
        assert value(cells, "latency", "signup_confirms_account", p) == (f"{expected:,.0f}" if expected >= 100 else f"{expected:,.1f}")
    assert value(cells, "latency", "order_receipt", "max") == "6,500"
    assert "First failure of each flow" in page and "MailNotDelivered: no mail to order_receipt+lost000" in page


def test_deltas_against_the_previous_run_say_better_or_worse():
    before = make_results({"signup_confirms_account": [0.05] * 50}, lost={"signup_confirms_account": 3})
    after = make_results({"signup_confirms_account": [0.08] * 50})
    cells = parse(rehearsal_report.render(after, previous=before, previous_source="previous.json"))
    now, then = after.latency["signup_confirms_account"].p50, before.latency["signup_confirms_account"].p50
    assert value(cells, "latency", "signup_confirms_account", "p50") == f"{now * 1000:.1f}"
    change = (now - then) * 1000
    assert delta(cells, "latency", "signup_confirms_account", "p50") == f"+{change:.0f} ms (+{(now - then) / then * 100:.0f}%)"
    assert value(cells, "ledger", "signup_confirms_account", "lost") == "0"
    assert delta(cells, "ledger", "signup_confirms_account", "lost") == "-3 (-100%)"
    assert delta(cells, "ledger", "signup_confirms_account", "delivered") == ""  # only counts that can go wrong
    page = rehearsal_report.render(after, previous=before, previous_source="previous.json")
    assert f'<span class="delta worse">+{change:.0f} ms' in page
    assert '<span class="delta better">-3 (-100%)</span>' in page
    assert "was FAIL" in page and "compared with the previous run" in page


def test_slowest_emails_with_hops_and_the_load_shape(tmp_path):
    results = make_results({"order_receipt": [0.1, 0.2, 0.3]})
    results.timeline.samples.append(Sample(t=T0 + 3, latency=4.2, flow="order_receipt",
                                           address="order+000099@mailproof.test",
                                           hops={"app_queue": 4.0, "smtp": 0.15, "sink": 0.05}))
    history = tmp_path / "locust_stats_history.csv"
    history.write_text("Timestamp,User Count,Type,Name,Requests/s\n"
                       f"{int(T0)},2,,Aggregated,1\n{int(T0)},2,GET,/signup,1\n{int(T0) + 1},9,,Aggregated,3\n")
    users = rehearsal_report.load_users(history)
    assert users == [(T0, 2), (T0 + 1, 9)]
    page = rehearsal_report.render(results, users=users)
    assert "peak 9 users" in page
    slowest = page[page.index('id="slowest"'):page.index('id="traffic"')]
    rows = re.findall(r"<tr><td>(\d+)</td>.*?</tr>", slowest, re.S)
    assert rows[:4] == ["1", "2", "3", "4"]
    first = re.search(r"<tr><td>1</td>(.*?)</tr>", slowest, re.S).group(1)
    assert "4,200" in first and "order+000099@mailproof.test" in first and "app_queue 4000 ms → smtp 150 ms → sink 50 ms" in first
    second = re.search(r"<tr><td>2</td>(.*?)</tr>", slowest, re.S).group(1)
    assert "300" in second and "order_receipt+000002@mailproof.test" in second


def test_a_chaos_runs_profile_faults_and_harness_counters_reach_the_report():
    rcpt = FaultRecord(id=1, name="chaos:5%:rcpt:451", stage="rcpt", scope="chaos", match={},
                       action={"chaos": {"p": 0.05, "seed": 7, "action": {"reply": "451 4.3.0 try later"}}},
                       fired=212, acted=11)
    hangup = FaultRecord(id=2, name="chaos:1%:after_data:disconnect", stage="after_data", scope="chaos",
                         match={"to_pattern": "signup"}, action={"chaos": {"p": 0.01, "seed": 8,
                                                                           "action": {"disconnect": True}}},
                         fired=201, acted=3)
    results = make_results({"order_receipt": [0.1, 0.2]}, chaos=("5%:rcpt:451,1%:after_data:disconnect", 7),
                           faults=[rcpt, hangup],
                           stream=StreamCounters(received=203, duplicates=1, missing=2, reconnects=4, restarts=1,
                                                 evicted=5),
                           notes=("worker w2: sink service http://10.0.0.7:8025: counters and faults not read",))
    page = rehearsal_report.render(results)
    cells = parse(page)
    text = html.unescape(page)
    assert "chaos <code>5%:rcpt:451,1%:after_data:disconnect</code> (seed 7)" in text
    assert value(cells, "faults", "chaos:5%:rcpt:451", "fired") == "212"
    assert value(cells, "faults", "chaos:5%:rcpt:451", "acted") == "11"
    assert value(cells, "faults", "chaos:1%:after_data:disconnect", "acted") == "3"
    assert "to_pattern=signup" in text and '"reply": "451 4.3.0 try later"' in text
    assert re.search(r'id="faults-acted">14<', page)  # 11 + 3 injected in all
    for key, expected in {"received": "203", "duplicates": "1", "missing": "2", "reconnects": "4",
                          "restarts": "1", "evicted": "5"}.items():
        assert value(cells, "harness", "stream", key) == expected, key
    assert value(cells, "harness", f"sink {SINK}", "received") == "2"
    assert value(cells, "harness", f"sink {SINK}", "smtp_connections") == "2"
    assert "counters and faults not read" in text


def test_a_run_without_chaos_says_so():
    page = rehearsal_report.render(make_results({"order_receipt": [0.1]}))
    assert "no chaos" in page and "the sink service held no fault rule" in page
    assert "No process of this run reported its stream counters" in page


def test_page_is_self_contained_with_two_inline_plots():
    results = make_results({"signup_confirms_account": [0.05, 0.06, 0.07], "order_receipt": [0.1, 9.0]})
    page = rehearsal_report.render(results, users=[(T0, 1), (T0 + 2, 4)])
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<img" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something"
    assert "default-src 'none'" in page
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == 2
    latency_svg, throughput_svg = svgs
    assert "seconds into the run" in latency_svg and "log scale" in latency_svg  # 9 s vs 60 ms: log axis
    assert "signup_confirms_account (3)" in latency_svg and "order_receipt (2)" in latency_svg
    assert "users (load shape, right axis)" in throughput_svg and "emails delivered / s" in throughput_svg
    ids = re.findall(r'\bid="([^"]+)"', "".join(svgs))
    assert len(ids) == len(set(ids)), "two plots share an element id"


def test_a_run_where_nothing_was_delivered_still_renders():
    results = make_results({}, lost={"signup_confirms_account": 4})
    page = rehearsal_report.render(results)
    assert "No email was delivered in this run" in page
    assert parse(page).verdict == "FAIL"
    assert value(parse(page), "ledger", "signup_confirms_account", "lost") == "4"


def test_keep_previous_compares_with_the_run_before_and_is_idempotent(tmp_path, capsys):
    results = tmp_path / "results.json"
    out = tmp_path / "report.html"
    run1 = make_results({"order_receipt": [0.1] * 10})
    run2 = make_results({"order_receipt": [0.2] * 10})

    run1.write(results)
    assert rehearsal_report.main([str(results), "--keep-previous", "-o", str(out)]) == 0
    assert "no previous run to compare with" in out.read_text()
    assert not (tmp_path / "previous.json").exists()

    run2.write(results)  # a new rehearsal overwrote results.json
    for _ in range(2):  # rebuilding the same run's report keeps the same comparison
        assert rehearsal_report.main([str(results), "--keep-previous", "-o", str(out)]) == 0
        assert RehearsalResults.read(tmp_path / "previous.json") == run1
        page = out.read_text()
        assert "compared with the previous run" in page and re.search(r"\+100 ms \(\+\d+%\)", page)
    assert "rehearsal report (PASS)" in capsys.readouterr().out


def test_default_output_and_locust_history_sit_beside_the_results(tmp_path):
    results = tmp_path / "results.json"
    make_results({"order_receipt": [0.1, 0.2]}).write(results)
    (tmp_path / "locust_stats_history.csv").write_text(
        f"Timestamp,User Count,Type,Name\n{int(T0)},5,,Aggregated\n")
    assert rehearsal_report.main([str(results)]) == 0
    assert "peak 5 users" in (tmp_path / "report.html").read_text()


def test_unreadable_results_stop_with_a_clear_message(tmp_path):
    bogus = tmp_path / "results.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(SystemExit, match=re.escape(f"{bogus}: schema: no 'schema' field")):
        rehearsal_report.main([str(bogus)])


# -- results.json: the schema ----------------------------------------------------------------------

# A complete file as docs/results.md describes it, written by hand (not by the code under test).
HAND_WRITTEN = {
    "schema": "mailproof.rehearsal-results", "schema_version": 3,
    "run": {"started_at": 1800000000.0, "finished_at": 1800000075.5, "host": "http://127.0.0.1:8000",
            "mode": "distributed", "workers_expected": 2, "missing_workers": ["w2"], "grace": 10.0,
            "chaos_profile": "5%:rcpt:451", "chaos_seed": 7, "users": 10, "spawn_rate": 5.0, "run_time": 60.0,
            "shape": "constant", "peak_users": 10, "flows_source": "examples/flask_shop/loadflows.py",
            "peak_rate": 2.0, "arrivals": {"offered": [2, 2], "started": [2, 1], "completed": [0, 2], "cap_hits": 1,
                                           "not_started": 1, "max_users": 10, "lag_ms": {"0": 2, "350": 1}}},
    "ledger": {"flows": {"order_receipt": {"expected": 3, "delivered": 2, "late": 1, "lost": 1, "unverified": 0,
                                           "duplicated": 0, "unexpected": 0, "interrupted": 1, "unawaited": 0,
                                           "negative_checks": 0}},
               "unexpected": 1, "unexpected_addresses": {"stranger@mailproof.test": 1},
               "duplicated_addresses": {},
               "lost_emails": [{"flow": "order_receipt", "address": "order+3@mailproof.test", "trigger": 1800000001.5,
                                "within": 5.0, "run": "failed",
                                "reply": {"method": "POST", "path": "/orders", "status": 202,
                                          "body": "{\"order_id\": \"FS-00003\"}"},
                                "sink": "the sink service captured no message to this address (checked)"}],
               "unexpected_emails": [{"address": "stranger@mailproof.test", "flow": None, "t": 1800000003.0,
                                      "subject": "Hello", "why": "no flow handed out this address"}],
               "handed_out": 3},
    "latency": {"order_receipt": {"count": 2, "p50": 0.25, "p90": 6.5, "p95": 6.5, "p99": 6.5, "max": 6.5,
                                  "mean": 3.375}},
    "http": {"requests": 10, "failures": 0},
    "locust": {"requests": 15, "failures": 2},
    "flows": {"runs": {"order_receipt": 4}, "failures": {"order_receipt": 1}, "interrupted": {"order_receipt": 1},
              "failure_samples": {"order_receipt": "MailNotDelivered: no mail"},
              "failure_kinds": {"order_receipt": {"MailNotDelivered": 1}}, "harness_errors": {},
              "check_failures": {}},
    "timeline": {"sends": [[1800000000, 3]], "deliveries": [[1800000000, 1], [1800000006, 1]],
                 "samples": [{"t": 1800000000.25, "latency": 0.25, "flow": "order_receipt",
                              "address": "order+1@mailproof.test", "hops": None},
                             {"t": 1800000006.5, "latency": 6.5, "flow": "order_receipt",
                              "address": "order+2@mailproof.test", "hops": {"smtp": 0.5}}]},
    "workers": {"w1": {"flows": {"order_receipt": {"expected": 3, "delivered": 2, "late": 1, "lost": 1,
                                                   "unverified": 0, "duplicated": 0, "unexpected": 0,
                                                   "interrupted": 1, "unawaited": 0, "negative_checks": 0}},
                       "stream": {"received": 3, "duplicates": 0, "missing": 1, "reconnects": 2, "restarts": 0,
                                  "evicted": 0}}},
    "harness": {"stream": {"received": 3, "duplicates": 0, "missing": 1, "reconnects": 2, "restarts": 0, "evicted": 0},
                "sinks": [{"url": "http://127.0.0.1:8025", "fetched_at": 1800000075.0, "received": 4, "retained": 4,
                           "evicted": 0, "cleared": 0, "smtp_connections": 5, "over_cap": 0,
                           "faults": [{"id": 1, "name": "chaos:5%:rcpt:451", "stage": "rcpt", "scope": "chaos",
                                       "match": {}, "action": {"chaos": {"p": 0.05, "seed": 7,
                                                                         "action": {"reply": "451 4.3.0 later"}}},
                                       "fired": 5, "acted": 1}]}],
                "notes": ["worker w2 never reported"],
                "errors": [{"kind": "stream_gap", "count": 1, "detail": "the event stream skipped 1 message(s)"}],
                "recovered": 0},
    "gates": [{"gate": "*:lost==0", "subject": "order_receipt", "actual": 1.0, "passed": False,
               "detail": "order_receipt: lost 1 == 0: missed by 1"}],
    "passed": False,
}


def test_a_hand_written_file_reads_into_the_types_and_writes_back_unchanged(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(HAND_WRITTEN))
    results = RehearsalResults.read(path)
    assert results.run.chaos_profile == "5%:rcpt:451" and results.run.chaos_seed == 7
    assert results.run.missing_workers == ["w2"]
    assert results.ledger.flows["order_receipt"].lost == 1
    assert results.ledger.lost_emails[0].reply.status == 202 and results.ledger.unexpected_emails[0].flow is None
    assert results.flows.failure_rate("order_receipt") == 1 / 3  # the interrupted run is left out
    assert results.harness.error_count == 1
    assert results.latency["order_receipt"].p50 == 0.25
    assert results.timeline.sends == [(1800000000, 3)]
    assert results.timeline.samples[1].hops == {"smtp": 0.5}
    assert results.workers["w1"].stream.reconnects == 2
    assert results.harness.sinks[0].faults[0].acted == 1
    assert results.gates[0].passed is False and results.gates[0].actual == 1.0
    assert results.to_dict() == HAND_WRITTEN  # every field written, none added, none renamed

    again = tmp_path / "again.json"
    results.write(again)
    assert RehearsalResults.read(again) == results
    assert json.loads(again.read_text()) == HAND_WRITTEN


def test_an_open_model_run_plots_offered_started_and_completed_and_flags_the_cap(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(HAND_WRITTEN))
    results = RehearsalResults.read(path)
    assert results.run.arrivals.lag_percentile(99) == 0.35 and results.run.arrivals.total_offered == 4
    page = rehearsal_report.render(results)
    section = page[page.index('<section id="arrivals">'):]
    section = section[:section.index("</section>")]
    assert "4 offered, 3 started, 2 completed" in section
    assert '<span data-key="cap_hits">1</span>' in section and '<span data-key="not_started">1</span>' in section
    assert 'class="bad"' in section  # the cap was hit: the offered load was not held
    (svg,) = re.findall(r"<svg\b.*?</svg>", section, re.S)
    assert "offered / s (the shape)" in svg and "flows started / s" in svg and "flows completed / s" in svg
    ids = re.findall(r'\bid="([^"]+)"', "".join(re.findall(r"<svg\b.*?</svg>", page, re.S)))
    assert len(ids) == len(set(ids)), "two plots share an element id"
    summary = render_summary(results)
    assert "arrivals: 4 offered, 3 started, 2 completed; start lag p99 0.350" in summary
    assert "all 10 users were busy: 1 arrival(s) started late, 1 never started" in summary
    results.run.arrivals = None  # a closed-model run has no such section
    assert '<section id="arrivals">' not in rehearsal_report.render(results)


def test_round_trip_of_built_results_keeps_every_value(tmp_path):
    built = make_results({"signup_confirms_account": [0.05, 0.07, 6.0]}, lost={"order_receipt": 1},
                         chaos=("1%:after_data:disconnect", None), stream=StreamCounters(received=3, missing=1),
                         faults=[FaultRecord(id=3, name=None, stage="rcpt", scope=None, match={"to": "a@b"},
                                             action={"reply": "450 busy"}, fired=9, acted=2)])
    path = built.write(tmp_path / "results.json")
    back = RehearsalResults.read(path)
    assert back == built
    assert back.ledger.flows["signup_confirms_account"].late == 1  # 6 s > the 5 s allowed
    assert back.ledger.flows["order_receipt"].lost == 1
    assert back.run.chaos_seed is None and back.harness.sinks[0].faults[0].match == {"to": "a@b"}
    assert [(g.gate, g.subject) for g in back.gates if not g.passed] == [
        ("*:lost==0", "order_receipt"), ("*:late==0", "signup_confirms_account"),
        ("flows:failure_rate<=0%", "order_receipt")]


def _broken(edit) -> dict:
    data = copy.deepcopy(HAND_WRITTEN)
    edit(data)
    return data


@pytest.mark.parametrize("edit, where, problem", [
    (lambda d: d.update(schema_version=1), "schema_version", "version 1, but this mailproof reads version 3 only"),
    (lambda d: d.pop("schema_version"), "schema_version", "missing"),
    (lambda d: d.update(schema="something-else"), "schema", "schema 'something-else'"),
    (lambda d: d["ledger"]["flows"]["order_receipt"].update(lost="1"),
     'ledger.flows["order_receipt"].lost', "expected an integer, got a string '1'"),
    (lambda d: d["latency"]["order_receipt"].pop("p95"), 'latency["order_receipt"].p95', "missing"),
    (lambda d: d["run"].update(chaos="5%:rcpt:451"), "run.chaos", "unknown field"),
    (lambda d: d["timeline"]["samples"][1].update(latency=None), "timeline.samples[1].latency",
     "expected a number, got null"),
    (lambda d: d["timeline"].update(sends=[[1800000000]]), "timeline.sends[0]", "expected an array of 2"),
    (lambda d: d["harness"]["sinks"][0]["faults"][0].update(acted=1.5),
     "harness.sinks[0].faults[0].acted", "expected an integer, got a number 1.5"),
    (lambda d: d.update(passed="no"), "passed", "expected true or false"),
    (lambda d: d.update(gates={}), "gates", "expected an array, got an object"),
])
def test_a_malformed_file_names_the_file_and_the_field(tmp_path, edit, where, problem):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(edit)))
    with pytest.raises(ResultsError) as error:
        RehearsalResults.read(path)
    assert str(error.value).startswith(f"{path}: {where}: "), str(error.value)
    assert problem in str(error.value)
    with pytest.raises(SystemExit, match=re.escape(f"rehearsal report: {path}: {where}: ")):
        rehearsal_report.main([str(path)])


def test_a_file_that_is_not_json_or_not_there_names_the_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"schema": "mailproof.rehearsal-results", "schema_version": 1, "passed": NaN}')
    with pytest.raises(ResultsError, match=re.escape(f"{path}: (file): not JSON: NaN")):
        RehearsalResults.read(path)
    with pytest.raises(ResultsError, match=re.escape(f"{tmp_path / 'nope.json'}: (file): cannot read it")):
        RehearsalResults.read(tmp_path / "nope.json")
    with pytest.raises(ResultsError, match=r"results: \(top level\): expected a JSON object, got an array"):
        RehearsalResults.from_json("[]")


def test_a_kept_previous_run_of_another_schema_is_not_compared_with(tmp_path, capsys):
    results, out = tmp_path / "results.json", tmp_path / "report.html"
    (tmp_path / "reported.json").write_text('{"ledger": {}, "latency": {}, "gates": []}')  # before the schema
    make_results({"order_receipt": [0.1]}).write(results)
    assert rehearsal_report.main([str(results), "--keep-previous", "-o", str(out)]) == 0
    assert "no previous run to compare with" in out.read_text()
    assert f"not comparing with the previous run: {tmp_path / 'previous.json'}: schema: no 'schema' field" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit, match="schema: no 'schema' field"):  # asked for explicitly, it must read
        rehearsal_report.main([str(results), "--previous", str(tmp_path / "previous.json"), "-o", str(out)])


def test_docs_describe_every_field_of_the_schema():
    import dataclasses
    from pathlib import Path

    from mailproof.load import results as schema

    doc = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    records = [schema.RehearsalResults, schema.RunInfo, schema.LedgerCounts, schema.FlowCounts,
               schema.LostEmail, schema.HttpReply, schema.StrayEmail,
               schema.LatencySummary, schema.RequestCounts, schema.FlowRuns, schema.Timeline, schema.Sample,
               schema.WorkerAccount, schema.Harness, schema.HarnessError, schema.StreamCounters, schema.SinkSnapshot,
               schema.FaultRecord, schema.Verdict]
    undocumented = [f"{cls.__name__}.{f.name}" for cls in records for f in dataclasses.fields(cls)
                    if f"`{f.name}`" not in doc]
    assert undocumented == []
    assert f"`schema_version` is `{schema.SCHEMA_VERSION}`" in doc


def test_failed_deliverability_checks_are_counted_per_flow_and_survive_results_json(tmp_path):
    results = make_results({"order_receipt": [0.1, 0.2], "signup_confirms_account": [0.1]})
    results.flows.check_failures = {"order_receipt": {"dkim": 2, "spam": 1}}
    back = RehearsalResults.read(results.write(tmp_path / "results.json"))
    assert back.flows.check_failures == {"order_receipt": {"dkim": 2, "spam": 1}}
    cells = parse(rehearsal_report.render(back))
    assert value(cells, "ledger", "order_receipt", "check_failures") == "3 (dkim ×2, spam ×1)"
    assert value(cells, "ledger", "signup_confirms_account", "check_failures") == "0"
