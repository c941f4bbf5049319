"""The rehearsal report (mailproof/rehearsal_report.py) from results made by the real engine parts.

The results are assembled the way a rehearsal's master does it: a real Ledger fed with
expectations and arrivals, real HdrHistograms, the real SLO gate evaluation. Locust itself is
not imported here (it monkey-patches the process); the browser check is in
test_reports_browser.py.
"""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import pytest

from mailproof.report import rehearsal as rehearsal_report
from mailproof.load.gates import DEFAULT_GATES, Gate, evaluate
from mailproof.load.latency import LatencyHistograms
from mailproof.load.ledger import Expectation, Ledger

T0 = 1_800_000_000.0


def make_results(latencies: dict[str, list[float]], lost: dict[str, int] = {}, late_within: float = 5.0,
                 gates: tuple[str, ...] = (), duplicates: int = 0, unexpected: int = 0, **extra) -> dict:
    """Results as mailproof.load.locust_user.collect_results writes them, from real Ledger and histograms."""
    ledger, histograms = Ledger(), LatencyHistograms()
    samples, sends, deliveries = [], {}, {}
    n = 0
    for flow, values in latencies.items():
        for i, latency in enumerate(values):
            trigger = T0 + i * 0.5
            address = f"{flow}+{n:06d}@mailproof.test"
            n += 1
            ledger.expectations[address] = Expectation(flow, 1, late_within, [trigger])
            ledger.arrivals[address].append(trigger + latency)
            if duplicates and i < duplicates:
                ledger.arrivals[address].append(trigger + latency + 0.01)
            histograms.record(flow, latency)
            samples.append([round(trigger + latency, 3), latency, flow])
            sends[int(trigger)] = sends.get(int(trigger), 0) + 1
            deliveries[int(trigger + latency)] = deliveries.get(int(trigger + latency), 0) + 1
    for flow, count in lost.items():
        for j in range(count):
            address = f"{flow}+lost{j:03d}@mailproof.test"
            ledger.expectations[address] = Expectation(flow, 1, late_within, [T0 + j])
    for k in range(unexpected):
        ledger.arrivals[f"stranger+{k}@mailproof.test"].append(T0 + k)
    results = {
        "ledger": ledger.reconcile(),
        "latency": histograms.summary(),
        "http": {"requests": 200, "failures": 1},
        "flows": {"runs": {f: len(latencies.get(f, ())) + lost.get(f, 0) for f in {*latencies, *lost}},
                  "failures": {f: c for f, c in lost.items() if c}, "failure_samples":
                  {f: f"MailNotDelivered: no mail to {f}+lost000@mailproof.test within 5 s" for f, c in lost.items() if c}},
        "timeline": {"sends": sorted(sends.items()), "deliveries": sorted(deliveries.items()), "samples": sorted(samples)},
        "locust": {"requests": 300, "failures": 1},
        "workers": {},
    }
    verdicts = evaluate([Gate.parse(g) for g in (*DEFAULT_GATES, *gates)], results)
    results["gates"] = [v.as_dict() for v in verdicts]
    results["passed"] = all(v.passed for v in verdicts)
    results.update(extra)
    return json.loads(json.dumps(results))  # exactly what a reader of results.json gets


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
            self.flow = a.get("data-flow")
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
    # Failed gates first: the lost receipts and signup's p95 above 100 ms.
    failed = [row for row in cells.gate_rows if "failed" in row]
    assert len(failed) == 2 and cells.gate_rows[:2] == failed
    assert "order_receipt: lost 2 == 0: missed by 2" in page
    assert re.search(r"signup_confirms_account: p95 0\.13\d s &lt; 0\.100 s: missed by", page)

    assert value(cells, "ledger", "order_receipt", "expected") == "6"
    assert value(cells, "ledger", "order_receipt", "delivered") == "4"
    assert value(cells, "ledger", "order_receipt", "late") == "1"
    assert value(cells, "ledger", "order_receipt", "lost") == "2"
    assert value(cells, "ledger", "signup_confirms_account", "delivered") == "100"

    # The percentiles are the histograms' (three significant digits), in ms.
    summary = results["latency"]["signup_confirms_account"]
    for p in ("p50", "p90", "p95", "p99", "max"):
        expected = summary[p] * 1000
        assert value(cells, "latency", "signup_confirms_account", p) == (f"{expected:,.0f}" if expected >= 100 else f"{expected:,.1f}")
    assert value(cells, "latency", "order_receipt", "max") == "6,500"
    assert "First failure of each flow" in page and "MailNotDelivered: no mail to order_receipt+lost000" in page


def test_deltas_against_the_previous_run_say_better_or_worse():
    before = make_results({"signup_confirms_account": [0.05] * 50}, lost={"signup_confirms_account": 3})
    after = make_results({"signup_confirms_account": [0.08] * 50})
    cells = parse(rehearsal_report.render(after, previous=before, previous_source="previous.json"))
    now, then = after["latency"]["signup_confirms_account"]["p50"], before["latency"]["signup_confirms_account"]["p50"]
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


def test_faults_slowest_emails_with_hops_and_the_load_shape(tmp_path):
    results = make_results({"order_receipt": [0.1, 0.2, 0.3]},
                           faults={"profile": "5%:rcpt:451", "seed": 7, "injected": {"rcpt 451": 12}})
    results["timeline"]["samples"].append([T0 + 3, 4.2, "order_receipt", "order+000099@mailproof.test",
                                           {"app_queue": 4.0, "smtp": 0.15, "sink": 0.05}])
    history = tmp_path / "locust_stats_history.csv"
    history.write_text("Timestamp,User Count,Type,Name,Requests/s\n"
                       f"{int(T0)},2,,Aggregated,1\n{int(T0)},2,GET,/signup,1\n{int(T0) + 1},9,,Aggregated,3\n")
    users = rehearsal_report.load_users(history)
    assert users == [(T0, 2), (T0 + 1, 9)]
    page = rehearsal_report.render(results, users=users)
    assert "peak 9 users" in page
    assert "<td class=\"text\">profile</td><td class=\"text\">5%:rcpt:451</td>" in page
    assert '{"rcpt 451": 12}' in html.unescape(page)
    slowest = page[page.index('id="slowest"'):page.index('id="traffic"')]
    rows = re.findall(r"<tr><td>(\d+)</td>.*?</tr>", slowest, re.S)
    assert rows[:4] == ["1", "2", "3", "4"]
    first = re.search(r"<tr><td>1</td>(.*?)</tr>", slowest, re.S).group(1)
    assert "4,200" in first and "order+000099@mailproof.test" in first and "app_queue 4000 ms → smtp 150 ms → sink 50 ms" in first


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

    results.write_text(json.dumps(run1))
    assert rehearsal_report.main([str(results), "--keep-previous", "-o", str(out)]) == 0
    assert "no previous run to compare with" in out.read_text()
    assert not (tmp_path / "previous.json").exists()

    results.write_text(json.dumps(run2))  # a new rehearsal overwrote results.json
    for _ in range(2):  # rebuilding the same run's report keeps the same comparison
        assert rehearsal_report.main([str(results), "--keep-previous", "-o", str(out)]) == 0
        assert json.loads((tmp_path / "previous.json").read_text()) == run1
        page = out.read_text()
        assert "compared with the previous run" in page and re.search(r"\+100 ms \(\+\d+%\)", page)
    assert "rehearsal report (PASS)" in capsys.readouterr().out


def test_default_output_and_locust_history_sit_beside_the_results(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(make_results({"order_receipt": [0.1, 0.2]})))
    (tmp_path / "locust_stats_history.csv").write_text(
        f"Timestamp,User Count,Type,Name\n{int(T0)},5,,Aggregated\n")
    assert rehearsal_report.main([str(results)]) == 0
    assert "peak 5 users" in (tmp_path / "report.html").read_text()


def test_unreadable_results_stop_with_a_clear_message(tmp_path):
    bogus = tmp_path / "results.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(SystemExit, match="has no 'ledger'"):
        rehearsal_report.main([str(bogus)])
