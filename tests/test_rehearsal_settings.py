"""``mailproof rehearse`` takes the settings pytest takes from the ini (``mailproof_domain``,
``mailproof_within``, ``mailproof_timeout``, ``mailproof_http_timeout``) as ``--domain``,
``--within``, ``--timeout`` and ``--http-timeout``, so that a flow's verdict under load is the
one it gets under pytest with the same values. Before, a rehearsal always handed out
``@mailproof.test`` addresses (an app that refuses special-use domains refused every signup), gave
every wait 10 s, and let a request take 60 s (fast client) or forever (requests client).

Each test rehearses a small app of its own (it sends its email to the sink after a set delay, and
answers /slow after another) for 2 s at 5 flows/s.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_rehearsal import own_app, said  # noqa: E402

APP = textwrap.dedent(r'''
    import json, os, smtplib, threading, time
    from email.message import EmailMessage
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    MAIL_DELAY, SLOW = 0.4, 0.8  # seconds

    def send(address):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", address, "Welcome"
        msg.set_content("hello")
        with smtplib.SMTP(os.environ["MAILPROOF_SMTP_HOST"], int(os.environ["MAILPROOF_SMTP_PORT"])) as smtp:
            smtp.send_message(msg)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/slow":
                time.sleep(SLOW)  # the app's slowness, not a wait of the test's
            self.answer(200, {})

        def do_POST(self):
            address = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["email"]
            if not address.endswith("@example.com"):  # like email-validator: no special-use domains (.test)
                return self.answer(400, {"error": f"undeliverable address {address}"})
            threading.Timer(MAIL_DELAY, send, args=(address,)).start()
            self.answer(202, {})

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
''')

FLOWS = textwrap.dedent('''
    from mailproof import flow

    @flow
    def signup_gets_its_welcome(flow):
        address = flow.mailbox.address("signup")
        reply = flow.http.post("/signup", json={"email": address}, expect=400)
        assert reply.status_code == 202, reply.text
        flow.mailbox.wait_for(to=address, subject="Welcome")  # the run's --within and --timeout

    @flow
    def a_slow_page_answers(flow):
        assert flow.http.get("/slow").status_code == 200
''')


def rehearse(tmp_path: Path, flow: str, *args: str) -> tuple[object, dict]:
    return own_app(APP, FLOWS, tmp_path / "run", "--flow-mix", f"{flow}=1", "--grace", "3", *args)


@pytest.mark.parametrize("args, refused", [((), 10), (("--domain", "example.com"), 0)])
def test_a_rehearsal_hands_out_addresses_at_the_domain_the_app_accepts(tmp_path, args, refused):
    proc, results = rehearse(tmp_path, "signup_gets_its_welcome", *args)
    flows = results["flows"]
    assert flows["runs"].get("signup_gets_its_welcome") == 10, said(proc)
    assert flows["failures"].get("signup_gets_its_welcome", 0) == refused, flows["failure_samples"]
    if not refused:
        row = results["ledger"]["flows"]["signup_gets_its_welcome"]
        assert (row["delivered"], row["late"], row["lost"]) == (10, 0, 0), row
        assert proc.returncode == 0, said(proc)


def test_within_is_every_waits_default_slo(tmp_path):
    """The app sends 0.4 s after the signup: late against --within 0.2, where the default 10 s
    (the test above) found none late; and with --timeout 3 each wait still gets its email."""
    proc, results = rehearse(tmp_path, "signup_gets_its_welcome", "--domain", "example.com",
                             "--within", "0.2", "--timeout", "3")
    row = results["ledger"]["flows"]["signup_gets_its_welcome"]
    assert (row["delivered"], row["late"], row["lost"]) == (10, 10, 0), (row, said(proc))
    assert results["flows"]["failure_kinds"]["signup_gets_its_welcome"] == {"MailLate": 10}


@pytest.mark.parametrize("client", ["fast", "requests"])
def test_http_timeout_bounds_each_request_on_both_clients(tmp_path, client):
    """/slow takes 0.8 s: it fails every run under --http-timeout 0.3 and passes under the default."""
    proc, results = rehearse(tmp_path, "a_slow_page_answers", "--client", client, "--http-timeout", "0.3")
    assert results["flows"]["runs"].get("a_slow_page_answers") == 10, said(proc)
    assert results["flows"]["failures"].get("a_slow_page_answers") == 10, results["flows"]["failure_samples"]
    proc, results = rehearse(tmp_path / "default", "a_slow_page_answers", "--client", client)
    assert results["flows"]["failures"] == {}, results["flows"]["failure_samples"]
