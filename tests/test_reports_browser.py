"""Both reports, rendered in real headless Chromium (Debian package ``chromium``).

- The Allure report is built from a real flow run (flows/test_orders.py against the demo app)
  plus a small project whose shop sends a hostile receipt (a script that would rewrite the page,
  an ``onerror`` handler, a tracking pixel, a remote stylesheet image) and whose welcome mail
  never comes. Opened from disk, the report must show the right totals, the Categories tab must
  file the missing mail, and the email preview must render the receipt with none of its scripts
  run and nothing fetched from anywhere.
- The rehearsal report is built from synthetic results (with a previous run to compare) and
  must show the verdict, gate, ledger and percentile numbers and both plots.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): no port,
no extra package; the client is mailproof.report.chromium's (FrameRecorder: the renderer's client
plus child frames auto-attached and every request recorded). Waits are event-driven (DevTools events, MutationObserver promises), never
sleeps. Screenshots are kept in reports/screenshots/ (git-ignored) to look at.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from mailproof.report import allure_build as report_build, rehearsal as rehearsal_report
from mailproof.report.chromium import ChromiumError, FrameRecorder, find_chromium

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "reports" / "screenshots"


WAIT_FOR = """new Promise((resolve, reject) => {
  const probe = () => { try { return (%s); } catch (e) { return null; } };
  const check = () => { const value = probe(); if (value) { observer.disconnect(); clearTimeout(timer); resolve(value); } };
  const observer = new MutationObserver(check);
  const timer = setTimeout(() => { observer.disconnect(); reject(new Error('timed out waiting for: ' + %s)); }, %d);
  observer.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  check();
})"""


class Page:
    def __init__(self, browser: FrameRecorder) -> None:
        self.browser = browser
        target = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = browser.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for command in ("Page.enable", "Runtime.enable", "Network.enable"):
            browser.call(command, session=self.session)
        browser.call("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
                     session=self.session)

    def goto(self, url: str) -> None:
        reply = self.browser.call("Page.navigate", {"url": url}, session=self.session)
        if "errorText" in reply:
            raise AssertionError(f"cannot open {url}: {reply['errorText']}")
        if reply.get("loaderId"):  # a new document (a change of #fragment only loads nothing)
            self.browser.wait_event("Page.loadEventFired", session=self.session)

    def js(self, expression: str, timeout: float = 30) -> Any:
        reply = self.browser.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                       "returnByValue": True}, session=self.session, timeout=timeout)
        if "exceptionDetails" in reply:
            raise AssertionError(reply["exceptionDetails"].get("exception", {}).get("description")
                                 or reply["exceptionDetails"])
        return reply["result"].get("value")

    def wait_for(self, condition: str, timeout_ms: int = 15000) -> Any:
        """Resolve when the JS ``condition`` is truthy, re-checked on every DOM change."""
        return self.js(WAIT_FOR % (condition, json.dumps(condition), timeout_ms), timeout=timeout_ms / 1000 + 10)

    def text(self) -> str:
        return self.js("document.body.innerText")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.browser.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.browser.call("Page.captureScreenshot", params, session=self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def document_of_frame(browser: FrameRecorder, session: str) -> dict:
    return browser.call("DOM.getDocument", {"depth": -1, "pierce": True}, session=session)["root"]


def texts_and_attributes(node: dict) -> tuple[str, list[tuple[str, str]]]:
    texts, attrs = [], []

    def walk(n: dict) -> None:
        if n.get("nodeType") == 3:
            texts.append(n.get("nodeValue", ""))
        values = n.get("attributes", [])
        attrs.extend(zip(values[::2], values[1::2]))
        for child in n.get("children", []) + ([n["contentDocument"]] if "contentDocument" in n else []):
            walk(child)

    walk(node)
    return " ".join(texts), attrs


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    try:
        return find_chromium("checking the reports in a real browser")
    except ChromiumError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def browser(chromium_binary):
    # Every request of every frame (the preview iframes too) lands in browser.requests.
    instance = FrameRecorder(chromium_binary, ["--window-size=1400,1000"])
    yield instance
    instance.close()


def remote(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "data:", "blob:", "about:", "chrome"))]


# -- the Allure report ---------------------------------------------------------------------------

SOURCE_URL = "https://git.example/shop/blob/main/"  # the shop project's; the real run has none

HOSTILE_CONFTEST = '''
import pytest


@pytest.fixture(scope="session")
def mailproof_app_url():
    return "http://127.0.0.1:9/"  # this shop mails directly; no HTTP call is made
'''

HOSTILE_FLOWS = r'''
import smtplib
from email.message import EmailMessage

from mailproof import flow

RECEIPT = """<!DOCTYPE html><html><head><title>Receipt</title>
<style>.total { color: #0a7d32; font-weight: bold } .hero { background: url(https://cdn.invalid/hero.jpg) }</style>
<link rel="stylesheet" href="https://cdn.invalid/shop.css"></head>
<body><h1 class="hero">Hello Ada</h1>
<p id="marker">STATIC MARKUP RENDERED</p>
<p class="total">Total: 45.00 EUR</p>
<img src="https://tracker.invalid/pixel.gif?u=ada" alt="tracking pixel" width="1" height="1">
<a href="https://shop.invalid/orders/1">View your order</a>
<script>document.title = 'PWNED'; document.getElementById('marker').textContent = 'SCRIPT RAN';</script>
<img src="x" onerror="document.body.setAttribute('data-pwned', 'onerror ran')">
</body></html>"""


def send(backend, to, subject, html):
    msg = EmailMessage()
    msg["From"] = "shop@shop.invalid"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hello Ada\nTotal: 45.00 EUR\nhttps://shop.invalid/orders/1\n")
    msg.add_alternative(html, subtype="html")
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
        client.send_message(msg)


@flow(feature="Orders", story="Receipt with scripts and a tracking pixel", severity="critical")
def hostile_receipt(flow, backend):
    address = flow.mailbox.address("hostile")
    with flow.step("The shop sends a receipt"):
        flow.mark()
        send(backend, address, "Your receipt", RECEIPT)
    with flow.step("Receive the receipt"):
        msg = flow.mailbox.wait_for(to=address, subject="Your receipt", within=5)
        assert "45.00 EUR" in msg.text


@flow(feature="Accounts", story="Welcome email", severity="normal")
def welcome_never_sent(flow):
    address = flow.mailbox.address("welcome")
    flow.mark()
    flow.mailbox.wait_for(to=address, subject="Welcome", within=0.2)
'''

HOSTILE_TESTS = '''
import hostile_flows


def test_hostile_receipt(run_flow, mailproof_backend):
    run_flow(hostile_flows.hostile_receipt, backend=mailproof_backend)


def test_welcome_never_sent(run_flow):
    run_flow(hostile_flows.welcome_never_sent)
'''


def run_pytest(args: list[str], cwd: Path, extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "MAILPROOF_"))
           and k != "PYTEST_ADDOPTS"}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "mailproof.report.allure_hooks",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def allure_report(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("allure")
    results = work / "allure-results"
    real = run_pytest(["flows/test_orders.py", "--alluredir", str(results)], cwd=ROOT)
    assert real.returncode == 0, real.stdout[-3000:] + real.stderr[-2000:]
    project = work / "shop"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")  # the rootdir the flow source is relative to
    (project / "conftest.py").write_text(HOSTILE_CONFTEST)
    (project / "hostile_flows.py").write_text(HOSTILE_FLOWS)
    (project / "test_shop.py").write_text(HOSTILE_TESTS)
    hostile = run_pytest(["-p", "no:locust", "--alluredir", str(results), "test_shop.py"], cwd=project,
                         extra_env={"PYTHONPATH": str(project), "MAILPROOF_SOURCE_URL": SOURCE_URL})
    assert "1 failed, 1 passed" in hostile.stdout, hostile.stdout[-3000:] + hostile.stderr[-2000:]
    return report_build.build(results, work / "report", history=work / "history.jsonl")


def result_id(report: Path, name: str) -> str:
    by_id = json.loads((report.parent / "test-results.json").read_text())["byId"]
    return next(i for i, r in by_id.items() if r["name"] == name)


def test_allure_report_opens_from_disk_with_the_right_totals(allure_report, browser):
    page = Page(browser)
    page.goto(allure_report.as_uri())
    page.wait_for("document.body.innerText.includes('mailproof: email flows') && document.body.innerText.includes('Passed')")
    summary = page.wait_for("""(() => { const t = document.body.innerText;
        return /Total\\s+3\\b/.test(t) && /Passed\\s+2\\b/.test(t) && /Failed\\s+1\\b/.test(t) ? t : null; })()""")
    assert "Orders" in summary and "Accounts" in summary  # the tree is grouped by feature
    page.js("[window, ...document.querySelectorAll('*')].forEach(e => e.scrollTo && e.scrollTo(0, 0))")
    page.screenshot(SCREENSHOTS / "allure-overview.png")
    assert remote(browser.requests) == [], remote(browser.requests)


def open_email_preview(page: Page, browser: FrameRecorder, report: Path, test_name: str) -> tuple[str, list]:
    """Open a test's Attachments tab, expand the email preview; its frame's text and attributes."""
    page.goto(f"{report.as_uri()}#/{result_id(report, test_name)}/attachments")
    header = ("[...document.querySelectorAll('[data-testid=test-result-attachment-header]')]"
              ".find(h => h.textContent.includes('Email preview (offline, no scripts)'))")
    page.wait_for(header)
    page.js(f"{header}.querySelector('button').click()")
    page.wait_for("document.querySelector('[data-testid=html-attachment-preview] iframe')")
    # The preview is a blob: document of another origin: its own target, loaded once resumed.
    attached = browser.wait_event("Target.attachedToTarget", session=page.session,
                                  where=lambda p: p["targetInfo"]["type"] == "iframe")
    frame = attached["params"]["sessionId"]
    browser.wait_event("Page.loadEventFired", session=frame)
    page.js(f"{header}.scrollIntoView()")
    return texts_and_attributes(document_of_frame(browser, frame))


def test_hostile_email_preview_renders_inside_the_report_without_running_anything(allure_report, browser):
    page = Page(browser)
    text, attrs = open_email_preview(page, browser, allure_report, "test_hostile_receipt")
    assert "STATIC MARKUP RENDERED" in text and "Total: 45.00 EUR" in text and "Hello Ada" in text, text
    assert "SCRIPT RAN" not in text and ("data-pwned", "onerror ran") not in attrs
    assert "Offline preview by mailproof" in text and "remote references blocked" in text
    assert page.js("document.title") != "PWNED"
    height = page.js("document.querySelector('[data-testid=html-attachment-preview] iframe').getBoundingClientRect().height")
    assert height >= 480, f"the preview is {height}px tall: QA would see a sliver"
    page.screenshot(SCREENSHOTS / "allure-email-preview.png")
    assert remote(browser.requests) == [], f"the report fetched {remote(browser.requests)}"


def metadata(page: Page) -> dict[str, str]:
    """The Labels section of the open test result: label name -> its values as shown."""
    return page.js("""Object.fromEntries([...document.querySelectorAll('[data-testid=metadata-item]')].map(e => [
        e.querySelector('[data-testid=metadata-item-key]').innerText.trim(),
        e.querySelector('[data-testid=metadata-item-value]').innerText.trim()]))""")


def test_real_order_receipt_preview_and_flow_source(allure_report, browser):
    page = Page(browser)
    text, _ = open_email_preview(page, browser, allure_report, "test_order_receipt")
    assert "Mailproof mug" in text and "Launch-day T-shirt (M)" in text, text
    page.screenshot(SCREENSHOTS / "allure-order-receipt.png")
    page.goto(f"{allure_report.as_uri()}#/{result_id(allure_report, 'test_order_receipt')}")
    # Without mailproof_source_url the flow's source is a label, the same on every machine; no link.
    page.wait_for("document.querySelector('[data-testid=metadata-item]')")
    line = next(i for i, text in enumerate((ROOT / "flows" / "orders.py").read_text().splitlines(), 1)
                if text.startswith("@flow(") and "Order receipt" in text)
    assert metadata(page).get("flow source") == f"flows/orders.py:{line}", metadata(page)
    assert page.js("document.querySelectorAll('[data-testid=test-result-meta-link]').length") == 0
    assert "file://" not in page.text()
    # Set up and Tear down list the real fixtures, each passed: no pytest-internal "<lambda>".
    page.wait_for("document.querySelector('[data-testid=test-result-teardown-dropdown]')")
    fixtures = page.js("""[...document.querySelectorAll(
        '[data-testid=test-result-setup-dropdown], [data-testid=test-result-teardown-dropdown]')]
        .flatMap(d => [...d.parentElement.querySelectorAll('[data-testid=test-result-step-header]')])
        .map(h => [h.querySelector('[data-testid=test-result-step-title]').innerText.trim(),
                   h.querySelector('[data-testid^=tree-leaf-status-]')?.dataset.testid])""")
    names = [name for name, _ in fixtures]
    assert {"demo_app", "mailbox", "mailbox::teardown", "demo_app::teardown"} <= set(names), fixtures
    assert not [f for f in fixtures if "<lambda>" in f[0] or f[1] != "tree-leaf-status-passed"], fixtures
    assert remote(browser.requests) == []

    # With it (the shop project), a link into the repository's browser.
    page.goto(f"{allure_report.as_uri()}#/{result_id(allure_report, 'test_hostile_receipt')}")
    page.wait_for("document.querySelector('[data-testid=test-result-meta-link]')")
    anchor = page.js("""(() => { const l = document.querySelector('[data-testid=test-result-meta-link]');
        const a = l.closest('a') || l.querySelector('a'); return {text: l.innerText.trim(), href: a && a.href}; })()""")
    line = next(i for i, text in enumerate(HOSTILE_FLOWS.splitlines(), 1) if text.startswith("@flow(") and "scripts" in text)
    assert anchor == {"text": f"flow source: hostile_flows.py:{line}", "href": f"{SOURCE_URL}hostile_flows.py#L{line}"}, anchor
    assert remote(browser.requests) == []


def test_categories_tab_files_the_missing_mail(allure_report, browser):
    page = Page(browser)
    page.goto(f"{allure_report.as_uri()}#/categories")
    text = page.wait_for("document.body.innerText.includes('Mail never arrived') && document.body.innerText")
    assert "Content mismatch" not in text  # only categories with failures are listed
    page.js("[...document.querySelectorAll('[data-testid=tree-section]')]"
            ".find(e => e.textContent.includes('Mail never arrived')).click()")
    page.wait_for("document.body.innerText.includes('test_welcome_never_sent')")  # filed under the category
    page.screenshot(SCREENSHOTS / "allure-categories.png")

    page.goto(f"{allure_report.as_uri()}#/{result_id(allure_report, 'test_welcome_never_sent')}")
    text = page.wait_for("document.body.innerText.includes('Category: Mail never arrived') && document.body.innerText")
    assert "mailproof.errors.MailNotDelivered: no mail to welcome+" in text
    page.screenshot(SCREENSHOTS / "allure-failed-test.png")


# -- the rehearsal report --------------------------------------------------------------------------

T0 = 1_800_000_000.0


def synthetic_results(p95_ms: float, lost: int) -> dict:
    """A rehearsal's results built through the schema's own types (what the master writes)."""
    from mailproof.load.gates import Verdict
    from mailproof.load.results import (FaultRecord, FlowCounts, FlowRuns, Harness, LatencySummary,
                                        LedgerCounts, RehearsalResults, RequestCounts, RunInfo, Sample,
                                        SinkSnapshot, Timeline)

    samples = [Sample(t=T0 + i * 0.5, latency=round(0.05 + (i % 7) * 0.01, 4), flow="signup_confirms_account",
                      address=f"signup+{i}@mailproof.test") for i in range(40)]
    samples += [Sample(t=T0 + i * 0.7, latency=round(0.08 + (i % 5) * 0.02, 4), flow="order_receipt",
                       address=f"order+{i}@mailproof.test") for i in range(20)]
    samples.append(Sample(t=T0 + 12.3, latency=2.75, flow="order_receipt", address="order+late@mailproof.test",
                          hops={"app_queue": 2.5, "smtp": 0.2, "sink": 0.05}))
    samples.sort(key=lambda s: s.t)
    results = RehearsalResults(
        run=RunInfo(started_at=T0, finished_at=T0 + 25, host="http://127.0.0.1:8000", mode="local",
                    workers_expected=0, missing_workers=[], grace=10.0, chaos_profile="5%:rcpt:451",
                    chaos_seed=1, peak_users=12),
        ledger=LedgerCounts(flows={
            "signup_confirms_account": FlowCounts(expected=40, delivered=40 - lost, lost=lost),
            "order_receipt": FlowCounts(expected=21, delivered=21, late=1)}, handed_out=61),
        latency={
            "signup_confirms_account": LatencySummary(count=40 - lost, p50=0.08, p90=0.105, p95=p95_ms / 1000,
                                                      p99=0.111, max=0.111, mean=0.0805),
            "order_receipt": LatencySummary(count=21, p50=0.12, p90=0.16, p95=0.161, p99=2.75, max=2.75,
                                            mean=0.25)},
        http=RequestCounts(requests=400, failures=2),
        locust=RequestCounts(requests=461, failures=2),
        flows=FlowRuns(runs={"signup_confirms_account": 40, "order_receipt": 21},
                       failures={"signup_confirms_account": lost}),
        timeline=Timeline(sends=[(int(T0) + s, 3) for s in range(20)],
                          deliveries=[(int(T0) + s, 3) for s in range(20)], samples=samples),
        harness=Harness(sinks=[SinkSnapshot(
            url="http://127.0.0.1:9000", fetched_at=T0 + 25, received=61, retained=61, evicted=0, cleared=0,
            smtp_connections=64, faults=[FaultRecord(id=1, name="chaos", stage="rcpt", scope="chaos", match={},
                                                     action={"chaos": {"p": 0.05, "seed": 1,
                                                                       "action": "451 4.3.0 try later"}},
                                                     fired=64, acted=3)])]),
        gates=[
            Verdict(gate="*:lost==0", subject="signup_confirms_account", actual=float(lost), passed=lost == 0,
                    detail=f"signup_confirms_account: lost {lost} == 0" + (f": missed by {lost}" if lost else "")),
            Verdict(gate="signup_confirms_account:p95<100ms", subject="signup_confirms_account",
                    actual=p95_ms / 1000, passed=p95_ms < 100,
                    detail=f"signup_confirms_account: p95 {p95_ms / 1000:.3f} s < 0.100 s"),
        ],
        passed=lost == 0 and p95_ms < 100,
    )
    return results.to_dict()


def test_rehearsal_report_shows_verdicts_numbers_and_plots(tmp_path, browser):
    folder = tmp_path / "rehearsal"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(synthetic_results(p95_ms=109.0, lost=2)))
    (folder / "previous.json").write_text(json.dumps(synthetic_results(p95_ms=95.0, lost=0)))
    history = ["Timestamp,User Count,Type,Name,Requests/s"]
    history += [f"{int(T0) + s},{min(3 + s, 12)},,Aggregated,1.0" for s in range(20)]
    (folder / "locust_stats_history.csv").write_text("\n".join(history) + "\n")
    out = folder / "report.html"
    assert rehearsal_report.main([str(folder / "results.json"), "--previous", str(folder / "previous.json"),
                                  "-o", str(out)]) == 0

    page = Page(browser)
    page.goto(out.as_uri())
    text = page.text()
    assert page.js("document.getElementById('verdict').textContent") == "FAIL"
    assert "peak 12 users" in text and "compared with the previous run" in text
    failed_first = page.js("[...document.querySelectorAll('#gates tbody tr')].map(r => r.className)")
    assert failed_first == ["gate failed", "gate failed"], failed_first
    cell = lambda section, flow, key: page.js(  # noqa: E731
        f"document.querySelector('#{section} tr[data-flow=\"{flow}\"] td[data-key=\"{key}\"]').innerText")
    assert cell("ledger", "signup_confirms_account", "lost").startswith("2\n+2")
    assert cell("ledger", "signup_confirms_account", "delivered") == "38"
    assert cell("latency", "signup_confirms_account", "p95").startswith("109\n+14 ms")
    assert cell("latency", "order_receipt", "max").startswith("2,750")
    assert "451 4.3.0 try later" in text and "app_queue 2500 ms → smtp 200 ms → sink 50 ms" in text
    for plot in ("latency-plot", "throughput-plot"):
        box = page.js(f"document.querySelector('#{plot} svg').getBoundingClientRect().toJSON()")
        assert box["width"] > 600 and box["height"] > 150, (plot, box)
    assert "users" in page.js("document.querySelector('#throughput-plot svg').textContent")
    assert "gate p95 < 100 ms" in page.js("document.querySelector('#latency-plot svg').textContent")
    page.screenshot(SCREENSHOTS / "rehearsal-report.png", full_page=True)
    assert remote(browser.requests) == []
