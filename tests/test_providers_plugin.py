"""The plugin's --transport: provider capture into the mailbox, fault tests chosen per transport."""

from __future__ import annotations

import os

import pytest

BASE_ARGS = ("-p", "no:cacheprovider", "-p", "no:locust", "-q")

PROJECT = '''
import json, pytest, requests

def test_sent_through_postmark_lands_in_the_mailbox(mailbox, mailproof_transport, mailproof_providers):
    assert mailproof_transport.name == "postmark" and mailproof_transport.url == mailproof_providers.url
    to = mailbox.address("pm")
    answer = requests.post(mailproof_transport.url + "/email", timeout=10, data=json.dumps(
        {"From": "shop@example.test", "To": to, "Subject": "Via API", "TextBody": "hi"}),
        headers={"X-Postmark-Server-Token": mailproof_transport.key, "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    msg = mailbox.wait_for(to=to, subject="Via API", within=5)
    assert msg.source == "postmark"

def test_provider_fault(mailbox, mailproof_transport, provider_faults):
    to = mailbox.address("limited")
    provider_faults.rule(status=429, to=to)
    answer = requests.post(mailproof_transport.url + "/email", timeout=10, data=json.dumps(
        {"From": "shop@example.test", "To": to, "Subject": "x", "TextBody": "hi"}),
        headers={"X-Postmark-Server-Token": mailproof_transport.key})
    assert answer.status_code == 429 and answer.json()["ErrorCode"] == 429

def test_smtp_fault(sink_faults):
    sink_faults.rule("rcpt", "451 later")

@pytest.mark.smtp_transport
def test_the_apps_own_dkim_signature():
    pass
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("MAILPROOF_", "PYTEST_XDIST_", "ALLURE_")) or name == "PYTEST_ADDOPTS":
            monkeypatch.delenv(name)


def test_provider_transport_captures_into_the_mailbox_and_deselects_smtp_faults(pytester):
    pytester.makepyfile(test_flows=PROJECT)
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--transport", "postmark", timeout=60)
    result.assert_outcomes(passed=2, deselected=2)  # the SMTP fault and the app's own signature
    result.stdout.fnmatch_lines(["*2 test(s) marked sink_faults or smtp_transport deselected*--transport postmark*"])


def test_smtp_transport_deselects_provider_faults(pytester):
    pytester.makepyfile(test_flows=PROJECT)
    result = pytester.runpytest_subprocess(*BASE_ARGS, "-k", "fault or signature", timeout=60)
    result.assert_outcomes(passed=2, deselected=2)  # the smtp_transport test runs on smtp
    result.stdout.fnmatch_lines(["*marked provider_faults deselected*provider transport*"])


def test_a_provider_transport_needs_the_in_process_sink(pytester):
    pytester.makepyfile(test_any="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--transport", "ses", "--mailbox", "service",
                                           "--sink-url", "http://127.0.0.1:1", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--transport ses*--mailbox=sink*"])
