"""The pytest plugin (mailproof/pytest_plugin.py), run for real in child pytest processes.

Each test writes a small test project with ``pytester`` and runs it in a subprocess (its own
sink, its own event-loop thread, no shared state with this process). Locust's pytest plugin is
disabled explicitly: the repo's ``addopts`` does not apply in pytester's temp directory.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

BASE_ARGS = ("-p", "no:locust", "-p", "no:cacheprovider")

SEND_HELPER = '''
import smtplib
from email.message import EmailMessage


def send(backend, to, subject, body="hello\\n"):
    msg = EmailMessage()
    msg["From"] = "app@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
        client.send_message(msg)
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The child must see only what each test passes: no settings leak in from this run."""
    for name in list(os.environ):
        if name.startswith(("MAILPROOF_", "PYTEST_XDIST_", "ALLURE_")) or name == "PYTEST_ADDOPTS":
            monkeypatch.delenv(name)


def run(pytester: pytest.Pytester, *args: str, timeout: float = 60) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*BASE_ARGS, *args, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mailbox_fixture_sends_and_waits(pytester):
    pytester.makeini("[pytest]\nmailproof_domain = qa.test\nmailproof_within = 0.3\nmailproof_timeout = 0.6\n")
    pytester.makepyfile(test_mail=SEND_HELPER + '''

def test_roundtrip(mailbox, mailproof_backend):
    assert mailproof_backend.smtp_host == "127.0.0.1"
    addr = mailbox.address("signup")
    assert addr.startswith("signup+") and addr.endswith("@qa.test")
    send(mailproof_backend, addr, "Welcome aboard")
    msg = mailbox.wait_for(to=addr, subject="Welcome", within=5)
    assert msg.rcpt_tos == (addr,) and msg.subject == "Welcome aboard"


def test_leaves_mail_behind(mailbox, mailproof_backend):
    send(mailproof_backend, mailbox.address("leftover"), "left over")


def test_next_view_starts_clean(mailbox):
    assert mailbox.messages == []


def test_never_comes(mailbox):
    mailbox.wait_for(to=mailbox.address("ghost"), subject="Never")  # ini: within 0.3 s, timeout 0.6 s
''')
    result = run(pytester, "-rA", "--durations=0", "--durations-min=0")
    result.assert_outcomes(passed=3, failed=1)
    # The ini's timeout reaches the Mailbox: the wait gave up after 0.6 s, not the 10.3 s default.
    result.stdout.fnmatch_lines(["*waited 0.6 s*"])
    result.stdout.fnmatch_lines([
        "*MailNotDelivered: no mail to ghost+*@qa.test subject containing 'Never' within 0.3 s",
        "*no other mail arrived in that window*",
        "FAILED test_mail.py::test_never_comes - *",
    ])


def test_sink_port_option_is_honoured(pytester):
    port = free_port()
    pytester.makepyfile(test_port=SEND_HELPER + f'''

def test_fixed_port(mailproof_backend, mailbox):
    assert mailproof_backend.smtp_port == {port}
    addr = mailbox.address()
    send(mailproof_backend, addr, "on a fixed port")
    assert mailbox.wait_for(to=addr, within=5).subject == "on a fixed port"
''')
    run(pytester, "--sink-port", str(port)).assert_outcomes(passed=1)


def test_sink_port_in_use_is_a_clear_error(pytester):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        pytester.makepyfile(test_busy="def test_x(mailbox):\n    pass\n")
        result = run(pytester, "--sink-port", str(port))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*SinkError: cannot listen for SMTP on 127.0.0.1:{port}*Choose a free port*"])


def test_imap_backend_failure_is_a_clear_error(pytester, monkeypatch):
    # An IMAP account where nothing listens (loopback port 1): whatever the backend's state of
    # completion, choosing it must end in a MailproofError that names IMAP, not a raw traceback.
    monkeypatch.setenv("MAILPROOF_IMAP_HOST", "127.0.0.1")
    monkeypatch.setenv("MAILPROOF_IMAP_PORT", "1")
    monkeypatch.setenv("MAILPROOF_IMAP_TLS", "plain")
    monkeypatch.setenv("MAILPROOF_IMAP_USER", "qa")
    monkeypatch.setenv("MAILPROOF_IMAP_PASSWORD", "pw")
    monkeypatch.setenv("MAILPROOF_IMAP_ADDRESS", "qa@example.test")
    pytester.makepyfile(test_imap="def test_x(mailbox):\n    pass\n")
    result = run(pytester, "--mailbox=imap")
    result.assert_outcomes(errors=1)
    errors = [line for line in result.stdout.lines if line.startswith("E ")]
    assert any("MailproofError" in line and "imap" in line.lower() for line in errors), "\n".join(errors)


def test_unknown_backend_is_a_usage_error(pytester):
    pytester.makepyfile(test_any="def test_x():\n    pass\n")
    result = run(pytester, "--mailbox=pigeon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--mailbox*invalid choice*'pigeon'*"])


APP_URL_TEST = '''
def test_url(mailproof_app_url):
    assert mailproof_app_url == "http://127.0.0.1:1"
'''


def test_app_url_missing_is_a_clear_error(pytester):
    pytester.makepyfile(test_url=APP_URL_TEST)
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*MailproofError: no application URL: pass --app-url*"])


def test_app_url_option_is_passed_through(pytester):
    pytester.makepyfile(test_url=APP_URL_TEST)
    run(pytester, "--app-url", "http://127.0.0.1:1").assert_outcomes(passed=1)


FLOW_PROJECT = '''
import http.server
import json
import smtplib
import threading
from email.message import EmailMessage

import pytest

import mailproof


@pytest.fixture(scope="session")
def mailproof_app_url(mailproof_backend):
    """A tiny application under test: POST /signup sends a welcome mail through the sink."""
    smtp = (mailproof_backend.smtp_host, mailproof_backend.smtp_port)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            msg = EmailMessage()
            msg["From"] = "Tiny <app@tiny.test>"
            msg["To"] = body["email"]
            msg["Subject"] = "Welcome to Tiny"
            msg.set_content("Your code is 123456\\nConfirm: https://tiny.test/confirm\\n")
            msg.add_alternative(
                '<p>Your code is <b>123456</b>. <a href="https://tiny.test/confirm">Confirm</a></p>',
                subtype="html")
            with smtplib.SMTP(*smtp, timeout=10) as client:
                client.send_message(msg)
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@mailproof.flow(feature="Accounts", story="Signup confirmation")
def signup(flow, label="signup"):
    """Sign up and confirm by email."""
    addr = flow.mailbox.address(label)
    with flow.step("sign up"):
        response = flow.http.post("/signup", json={"email": addr})
        assert response.status_code == 202
    with flow.step("confirmation email"):
        msg = flow.mailbox.wait_for(to=addr, subject="Welcome", within=5)
    assert msg.code() == "123456"
    return msg


def test_signup(run_flow, flow):
    msg = run_flow(signup, label="tiny")
    assert flow.mails == [msg]
    assert msg.latency is not None and 0 < msg.latency < 5
    assert msg.rcpt_tos[0].startswith("tiny+")
    assert [(s.name, s.ok) for s in flow.steps] == [("sign up", True), ("confirmation email", True)]
    assert flow.name == "signup"


def test_not_a_flow(mailbox):
    pass
'''


def test_flow_marker_selects_flow_tests(pytester):
    pytester.makepyfile(test_flows=FLOW_PROJECT)
    result = run(pytester, "-m", "flow", "-v")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*test_flows.py::test_signup PASSED*"])
    run(pytester, "-m", "not flow").assert_outcomes(passed=1, deselected=1)


def _walk_attachments(node: dict):
    yield from node.get("attachments", [])
    for step in node.get("steps", []):
        yield from _walk_attachments(step)


def test_flow_reports_to_allure(pytester):
    pytester.makepyfile(test_flows=FLOW_PROJECT)
    results_dir = pytester.path / "allure-results"
    run(pytester, f"--alluredir={results_dir}").assert_outcomes(passed=2)
    results = [json.loads(p.read_text()) for p in results_dir.glob("*-result.json")]
    (signup,) = [r for r in results if r["name"] == "test_signup"]
    assert signup["status"] == "passed"
    labels = {(label["name"], label["value"]) for label in signup["labels"]}
    assert {("feature", "Accounts"), ("story", "Signup confirmation")} <= labels
    attachments = {a["name"]: a for a in _walk_attachments(signup)}
    assert {"HTML body", "Text body", "Headers", "Raw message (.eml)"} <= set(attachments)
    raw = (results_dir / attachments["Raw message (.eml)"]["source"]).read_bytes()
    assert b"Subject: Welcome to Tiny" in raw
    html = (results_dir / attachments["HTML body"]["source"]).read_text()
    assert '<a href="https://tiny.test/confirm">Confirm</a>' in html
    step_names = [s["name"] for s in signup["steps"]]
    assert step_names[:2] == ["sign up", "confirmation email"]


def test_each_xdist_worker_gets_its_own_sink(pytester):
    out = pytester.path / "workers"
    out.mkdir()
    pytester.makepyfile(test_workers=SEND_HELPER + f'''
import os
import pathlib


def test_own_sink(mailproof_backend, mailbox):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    addr = mailbox.address(worker)
    send(mailproof_backend, addr, "from " + worker)
    assert mailbox.wait_for(to=addr, within=5).subject == "from " + worker
    assert [m.rcpt_tos for m in mailbox.messages] == [(addr,)]  # nothing from the other worker
    pathlib.Path({str(out)!r}, worker).write_text(f"{{mailproof_backend.smtp_port}} {{addr}}")
''')
    # --dist each: every worker runs the test, so both workers are certain to start a sink.
    run(pytester, "-n", "2", "--dist", "each").assert_outcomes(passed=2)
    seen = {p.name: p.read_text().split() for p in out.iterdir()}
    assert set(seen) == {"gw0", "gw1"}
    ports = {port for port, _ in seen.values()}
    addresses = {addr for _, addr in seen.values()}
    assert len(ports) == 2, f"both workers used one sink port: {seen}"
    assert len(addresses) == 2


# -- a fixed --sink-port under xdist -------------------------------------------------------------

FIXED_PORT_WORDS = ["under xdist each worker runs its own sink, so a fixed port can be bound only once",
                    "--mailbox=service --sink-url", "drop --sink-port"]


def test_fixed_sink_port_with_two_xdist_workers_is_refused_at_once(pytester):
    port = free_port()
    pytester.makepyfile(test_busy="def test_x(mailbox):\n    pass\n")
    result = run(pytester, "-n", "2", "--sink-port", str(port))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = " ".join(result.stderr.lines)
    assert f"--sink-port {port}" in text and "2 pytest-xdist workers" in text
    for words in FIXED_PORT_WORDS:
        assert words in text, text
    assert "collected" not in result.stdout.str()  # no worker started, nothing ran


def test_fixed_sink_port_seen_from_inside_a_worker_is_refused(pytester, monkeypatch):
    # What a worker sees (xdist sets these in every worker), from the ini file this time.
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    pytester.makeini(f"[pytest]\nmailproof_sink_port = {free_port()}\n")
    pytester.makepyfile(test_busy="def test_x(mailbox):\n    pass\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = " ".join(result.stderr.lines)
    assert "3 pytest-xdist workers" in text and all(words in text for words in FIXED_PORT_WORDS), text


def test_fixed_sink_port_with_one_xdist_worker_is_fine(pytester):
    port = free_port()
    pytester.makepyfile(test_port=SEND_HELPER + f'''

def test_fixed_port(mailproof_backend, mailbox):
    assert mailproof_backend.smtp_port == {port}
    addr = mailbox.address()
    send(mailproof_backend, addr, "one worker")
    assert mailbox.wait_for(to=addr, within=5).subject == "one worker"
''')
    run(pytester, "-n", "1", "--sink-port", str(port)).assert_outcomes(passed=1)


# -- STARTTLS and AUTH on the plugin's sink --------------------------------------------------------

TLS_PROJECT = '''
import os
import smtplib
import ssl
import subprocess
import sys
from email.message import EmailMessage

import pytest


def raw(to, subject):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, subject
    msg.set_content("hello\\n")
    return msg.as_bytes()


def test_starttls_and_auth(mailproof_backend, mailbox):
    ca_file = mailproof_backend.tls_ca_file
    assert ca_file and os.path.exists(ca_file)
    addr = mailbox.address("secure")
    with smtplib.SMTP(mailproof_backend.smtp_host, mailproof_backend.smtp_port, timeout=10) as client:
        client.starttls(context=ssl.create_default_context(cafile=ca_file))
        client.login("app", "s3cret")
        client.sendmail("app@example.test", [addr], raw(addr, "secure"))
    msg = mailbox.wait_for(to=addr, within=5)
    assert (msg.tls, msg.auth_user) == (True, "app")


def test_refused_in_the_clear_and_without_auth(mailproof_backend, mailbox):
    with smtplib.SMTP(mailproof_backend.smtp_host, mailproof_backend.smtp_port, timeout=10) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.test", ["x@qa.test"], raw("x@qa.test", "clear"))
        assert refused.value.smtp_code == 530
        client.starttls(context=ssl.create_default_context(cafile=mailproof_backend.tls_ca_file))
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.test", ["x@qa.test"], raw("x@qa.test", "no auth"))
        assert refused.value.smtp_code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("app", "wrong")
        assert failed.value.smtp_code == 535
    mailbox.expect_no_mail(within=0.2)


APP = """
import smtplib, sys
from email.message import EmailMessage
host, port, to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
msg = EmailMessage()
msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, "from an app trusting SSL_CERT_FILE"
msg.set_content("hi")
with smtplib.SMTP(host, port, timeout=10) as client:
    client.starttls()  # the default context: it trusts what SSL_CERT_FILE names
    client.login("app", "s3cret")
    client.send_message(msg)
"""


def test_an_app_started_with_ssl_cert_file_trusts_the_sink(mailproof_backend, mailbox):
    addr = mailbox.address("app")
    env = {**os.environ, "SSL_CERT_FILE": mailproof_backend.tls_ca_file}
    subprocess.run([sys.executable, "-c", APP, mailproof_backend.smtp_host, str(mailproof_backend.smtp_port),
                    addr], env=env, check=True, timeout=30)
    assert mailbox.wait_for(to=addr, within=5).tls is True
'''


def test_sink_tls_and_auth_settings(pytester, monkeypatch):
    monkeypatch.setenv("MAILPROOF_SINK_AUTH", "app:s3cret")  # the password stays out of the ini file
    pytester.makeini("[pytest]\nmailproof_sink_tls = starttls-required\n")
    pytester.makepyfile(test_tls=TLS_PROJECT)
    run(pytester).assert_outcomes(passed=3)


def test_sink_tls_and_auth_options_on_the_command_line(pytester):
    pytester.makepyfile(test_tls=TLS_PROJECT)
    run(pytester, "--sink-tls", "starttls-required", "--sink-auth", "app:s3cret",
        "-k", "starttls_and_auth").assert_outcomes(passed=1, deselected=2)


@pytest.mark.parametrize("ini, said", [
    ("mailproof_sink_tls = ssl", "mailproof_sink_tls must be one of off, starttls, starttls-required"),
    ("mailproof_sink_auth = hunter2", "mailproof_sink_auth must be USER:PASSWORD"),
])
def test_bad_tls_and_auth_settings_are_usage_errors(pytester, ini, said):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_any="def test_x(mailbox):\n    pass\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = " ".join(result.stderr.lines)
    assert said in text and "hunter2" not in text


def test_sink_tls_without_trustme_says_pip_install_trustme(pytester):
    pytester.makeconftest("import sys\nsys.modules['trustme'] = None  # as if not installed\n")
    pytester.makeini("[pytest]\nmailproof_sink_tls = starttls\n")
    pytester.makepyfile(test_any="def test_x(mailbox):\n    pass\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*trustme*pip install*mailproof?tls?*"])
