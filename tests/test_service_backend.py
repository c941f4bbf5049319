"""``--mailbox=service``: every xdist worker reads one running sink service, so all share its SMTP port.

A real service process (``RemoteSink.launch``, i.e. ``python -m mailproof.capture.service``) and
real inner pytest runs (``pytester``, in subprocesses, with ``-n 2`` where workers matter).
"""

from __future__ import annotations

import os
import secrets

import pytest

from mailproof.capture.remote import RemoteSink

BASE_ARGS = ("-p", "no:locust", "-p", "no:cacheprovider")
TOKEN = "service-backend-t0ken"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The child must see only what each test passes: no settings leak in from this run."""
    for name in list(os.environ):
        if name.startswith(("MAILPROOF_", "PYTEST_XDIST_", "ALLURE_")) or name == "PYTEST_ADDOPTS":
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def service():
    """One sink service for the module, with a token (the inner runs take it from the environment)."""
    launched = RemoteSink.launch(token=TOKEN)
    yield launched
    process = launched.process
    launched.stop()
    assert process.stop() == 0


def run(pytester: pytest.Pytester, *args: str, timeout: float = 90) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*BASE_ARGS, *args, timeout=timeout)


SHARED_SUITE = '''
import json
import os
import smtplib
import time
import urllib.parse
import urllib.request
from email.message import EmailMessage

import pytest

from mailproof.pytest_plugin import SharedSinkWarning

SERVICE_SMTP_PORT = {smtp_port}
TAG = {tag!r}


def send(backend, to, subject):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, subject
    msg.set_content("hello\\n")
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
        client.send_message(msg)


def captured_by_the_service(backend, subject):
    """Block until the service itself has captured mail with this subject; its seq there."""
    query = urllib.parse.urlencode({{"subject": subject, "timeout": 30}})
    request = urllib.request.Request(f"{{backend.url}}/wait?{{query}}",
                                     headers={{"Authorization": "Bearer " + os.environ["MAILPROOF_SINK_TOKEN"]}})
    with urllib.request.urlopen(request, timeout=40) as response:
        return json.load(response)["messages"][0]["seq"]


def test_workers_share_the_service_port(mailproof_backend, mailbox):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    other = {{"gw0": "gw1", "gw1": "gw0"}}[worker]
    assert mailproof_backend.name == "sink-service"
    assert (mailproof_backend.smtp_host, mailproof_backend.smtp_port) == ("127.0.0.1", SERVICE_SMTP_PORT)
    addr = mailbox.address(worker)
    send(mailproof_backend, addr, f"{{TAG}} first from {{worker}}")
    # Once the other worker's first mail is in, its stream runs as well as this one: from now on
    # each worker's stream brings the other worker's mail too.
    captured_by_the_service(mailproof_backend, f"{{TAG}} first from {{other}}")
    send(mailproof_backend, addr, f"{{TAG}} second from {{worker}}")
    seq = captured_by_the_service(mailproof_backend, f"{{TAG}} second from {{other}}")
    deadline = time.monotonic() + 10
    while mailproof_backend.last_seq < seq:
        assert time.monotonic() < deadline, "this worker's stream never brought the other worker's mail"
        time.sleep(0.01)
    mine = mailbox.wait_for(to=addr, count=2, within=10)
    assert [m.subject for m in mine] == [f"{{TAG}} first from {{worker}}", f"{{TAG}} second from {{worker}}"]
    assert all(m.source == "sink-service" for m in mine)
    # The other worker's mail was set aside: nothing of it in this worker's mailbox or store.
    assert [m.rcpt_tos for m in mailbox.messages] == [(addr,), (addr,)]
    assert mailproof_backend.set_aside >= 1
    assert mailbox.received(subject=f"from {{other}}") == []


def test_fault_is_scoped_to_this_test_and_run(mailproof_backend, mailbox, sink_faults, request):
    addr = mailbox.address("refused")
    rule = sink_faults.rule("rcpt", "451 4.3.0 try again later", to=addr)
    assert rule.scope == f"{{request.node.nodeid}} [run {{mailbox.addresses.run_id}}]"
    # The other worker runs this very test at about the same time: its rule has its own scope.
    assert [r.id for r in sink_faults.rules] == [rule.id]
    assert rule.id in [r.id for r in mailproof_backend.faults.rules]  # the rule lives on the service
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(mailproof_backend, addr, f"{{TAG}} refused")
    assert refused.value.recipients[addr][0] == 451
    mailbox.expect_no_mail(to=addr, within=0.2)
    ok = mailbox.address("accepted")  # the rule is for its recipient only
    send(mailproof_backend, ok, f"{{TAG}} accepted")
    assert mailbox.wait_for(to=ok, within=10).subject == f"{{TAG}} accepted"


def test_a_rule_for_everybody_warns(sink_faults):
    with pytest.warns(SharedSinkWarning, match="other xdist workers"):
        sink_faults.rule("mail", "550 5.7.1 no", sender="nobody-sends-this@qa.test")
'''


def test_xdist_workers_share_one_service_port(pytester, monkeypatch, service):
    tag = f"shared-{secrets.token_hex(4)}"
    monkeypatch.setenv("MAILPROOF_SINK_TOKEN", TOKEN)
    pytester.makepyfile(test_shared=SHARED_SUITE.format(smtp_port=service.smtp_port, tag=tag))
    before = service.stats()["received"]
    # --dist each: both workers run every test, so both send to the one port at about the same time.
    result = run(pytester, "-n", "2", "--dist", "each", "--mailbox=service", "--sink-url", service.url)
    result.assert_outcomes(passed=6)  # sink_faults tests run here: faults reach the app's SMTP session
    assert "deselected" not in result.stdout.str()
    assert service.faults.rules == []  # every test's rules were removed at its end
    assert service.stats()["received"] - before == 6  # three per worker; the refused ones never got in


def test_sink_url_from_the_ini_file(pytester, monkeypatch, service):
    monkeypatch.setenv("MAILPROOF_SINK_TOKEN", TOKEN)
    pytester.makeini(f"[pytest]\nmailproof_backend = service\nmailproof_sink_url = {service.url}\n")
    pytester.makepyfile(test_ini=f'''
import smtplib


def test_roundtrip(mailproof_backend, mailbox):
    assert mailproof_backend.smtp_port == {service.smtp_port}
    addr = mailbox.address()
    with smtplib.SMTP(mailproof_backend.smtp_host, mailproof_backend.smtp_port, timeout=10) as client:
        client.sendmail("app@example.test", [addr], b"Subject: via the ini\\r\\n\\r\\nhi\\r\\n")
    assert mailbox.wait_for(to=addr, within=10).subject == "via the ini"
''')
    run(pytester).assert_outcomes(passed=1)


def test_service_without_a_url_fails_at_once(pytester):
    pytester.makepyfile(test_any="def test_x(mailbox):\n    pass\n")
    result = run(pytester, "--mailbox=service")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = " ".join(result.stderr.lines)
    for words in ("--sink-url", "mailproof sink", "python -m mailproof.capture.service", "MAILPROOF_SINK_URL"):
        assert words in text, text
    assert "collected" not in result.stdout.str()


def test_wrong_token_and_unreachable_service_are_clear_errors(pytester, monkeypatch, service):
    pytester.makepyfile(test_any="def test_x(mailbox):\n    pass\n")
    monkeypatch.setenv("MAILPROOF_SINK_TOKEN", "not-the-token")
    result = run(pytester, "--mailbox=service", "--sink-url", service.url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*MailproofError: --mailbox=service: cannot use the sink service at {service.url}*"
                                 "401*MAILPROOF_SINK_TOKEN*"])
    result = run(pytester, "--mailbox=service", "--sink-url", "http://127.0.0.1:1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*MailproofError: --mailbox=service: cannot use the sink service at "
                                 "http://127.0.0.1:1*Is it running*"])


def test_tls_settings_are_checked_against_the_service(pytester, monkeypatch, service):
    monkeypatch.setenv("MAILPROOF_SINK_TOKEN", TOKEN)
    pytester.makeini("[pytest]\nmailproof_sink_tls = starttls\n")
    pytester.makepyfile(test_any="def test_x(mailbox):\n    pass\n")
    result = run(pytester, "--mailbox=service", "--sink-url", service.url)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*mailproof_sink_tls asks for starttls, but the service runs with TLS off: "
                                 "start it with --tls starttls*"])


def test_a_tls_and_auth_service_gives_its_ca_file_to_the_tests(pytester, monkeypatch):
    with RemoteSink.launch(tls="starttls-required", auth="app:s3cret") as secure:
        pytester.makeini("[pytest]\nmailproof_sink_tls = starttls-required\n")
        pytester.makepyfile(test_secure='''
import smtplib
import ssl


def test_secure(mailproof_backend, mailbox):
    assert mailproof_backend.auth_required
    addr = mailbox.address()
    with smtplib.SMTP(mailproof_backend.smtp_host, mailproof_backend.smtp_port, timeout=10) as client:
        client.starttls(context=ssl.create_default_context(cafile=mailproof_backend.tls_ca_file))
        client.login("app", "s3cret")
        client.sendmail("app@example.test", [addr], b"Subject: secure\\r\\n\\r\\nhi\\r\\n")
    msg = mailbox.wait_for(to=addr, within=10)
    assert (msg.tls, msg.auth_user) == (True, "app")
''')
        monkeypatch.setenv("MAILPROOF_SINK_AUTH", "app:s3cret")  # checked: the service must require AUTH
        run(pytester, "--mailbox=service", "--sink-url", secure.url).assert_outcomes(passed=1)
