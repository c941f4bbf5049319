"""The sink service with --providers: provider API mail reaches RemoteSink streams like SMTP mail
(what a rehearsal with ``mailproof rehearse --transport X`` relies on)."""

from __future__ import annotations

import smtplib
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
import requests
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Mail

from mailproof.addresses import AddressBook
from mailproof.capture.remote import RemoteSink
from mailproof.mailbox import Mailbox
from mailproof.providers.server import KEYS_ENV, Keys
from mailproof.servers.app_process import AppProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def providers_service():
    """A sink service with --providers and the launcher's keys: (process, keys, providers URL, SMTP host, port)."""
    keys = Keys.random()
    process = AppProcess([sys.executable, "-m", "mailproof.capture.service", "--providers"], cwd=str(ROOT),
                         env={KEYS_ENV: keys.to_json()}, ready_pattern=r"READY (http://\S+) smtp=(\S+) providers=(\S+)",
                         name="sink service with providers")
    with process:
        line = next(l for l in reversed(process.output) if l.startswith("READY "))
        providers_url = line.split("providers=")[1].split()[0]
        smtp_host, smtp_port = line.split("smtp=")[1].split()[0].rsplit(":", 1)
        yield process, keys, providers_url, smtp_host.strip("[]"), int(smtp_port)


def test_provider_mail_reaches_the_service_stream_with_the_launchers_keys(providers_service):
    service, keys, providers_url, _, _ = providers_service
    assert requests.get(f"{service.url}/health", timeout=10).json()["providers"]["url"] == providers_url
    with RemoteSink(service.url) as sink, Mailbox(sink.store, AddressBook(domain="mailproof.test")) as mailbox:
        to = mailbox.address("provider")
        mail = Mail(from_email="shop@example.test", to_emails=to, subject="Through the API",
                    plain_text_content="Streamed.")
        assert SendGridAPIClient(keys.sendgrid, host=providers_url).send(mail).status_code == 202
        msg = mailbox.wait_for(to=to, subject="Through the API", within=5)
        assert msg.text.strip() == "Streamed." and msg.mail_from == "shop@example.test"
        bad = requests.post(f"{providers_url}/v3/mail/send", json={}, headers={"Authorization": "Bearer SG.x"},
                            timeout=10)
        assert bad.status_code == 401  # the keys are the launcher's, not random ones
        accepted = requests.get(f"{service.url}/health", timeout=10).json()["providers"]["accepted"]
        assert accepted == {"sendgrid": 1, "mailgun": 0, "ses": 0, "postmark": 0}


def test_smtp_and_provider_mail_in_one_service_are_numbered_once_and_all_streamed(providers_service):
    """An application that sends some mail over SMTP and some through a provider's API (one sink
    service, --providers): every message gets its own seq, and every one reaches the stream."""
    service, keys, providers_url, smtp_host, smtp_port = providers_service
    with RemoteSink(service.url) as sink, Mailbox(sink.store, AddressBook(domain="mailproof.test")) as mailbox:
        by_smtp, by_api, by_smtp_again = (mailbox.address(label) for label in ("smtp", "api", "again"))

        def over_smtp(to: str, subject: str) -> None:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "alerts@example.test", to, subject
            msg.set_content("Over SMTP.")
            with smtplib.SMTP(smtp_host, smtp_port, timeout=10) as client:
                client.send_message(msg)

        over_smtp(by_smtp, "First, over SMTP")
        first = mailbox.wait_for(to=by_smtp, subject="First, over SMTP", within=5)
        mail = Mail(from_email="shop@example.test", to_emails=by_api, subject="Then through the API",
                    plain_text_content="Streamed.")
        assert SendGridAPIClient(keys.sendgrid, host=providers_url).send(mail).status_code == 202
        second = mailbox.wait_for(to=by_api, subject="Then through the API", within=5)
        over_smtp(by_smtp_again, "Again over SMTP")
        third = mailbox.wait_for(to=by_smtp_again, subject="Again over SMTP", within=5)
        seqs = [m.extra["service_seq"] for m in (first, second, third)]
        assert seqs == sorted(set(seqs)), seqs  # distinct and in capture order
        assert sink.duplicates == 0 and sink.missing == 0
        listed = requests.get(f"{service.url}/messages", timeout=10).json()
        assert sorted(m["seq"] for m in listed["messages"]) == seqs
