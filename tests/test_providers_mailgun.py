"""Mailgun through its official SDK (``mailgun``: ``Client(auth=("api", key), api_url=...)``)."""

from __future__ import annotations

import hashlib
import hmac
import json
from email.message import EmailMessage

from mailgun.client import Client
from mailgun.config import RetryPolicy


def client(capture, key=None, retries: int = 0) -> Client:
    # The SDK retries 429 and 5xx on its own (3 times by default, docs/traps.md): off unless asked.
    return Client(auth=("api", key or capture.keys.mailgun), api_url=capture.url,
                  retry_policy=RetryPolicy(max_retries=retries, base_delay=0.01))


def test_form_message_with_headers_tags_and_attachments_is_captured_exactly(capture, store):
    data = {"from": "Demo Shop <shop@mg.example.test>", "to": ["Ann <ann@example.test>", "bob@example.test"],
            "cc": "cc@example.test", "bcc": "audit@example.test", "subject": "Your receipt",
            "text": "Thanks.", "html": "<p>Thanks.</p>", "h:X-Order": "ORD-7", "h:Reply-To": "help@example.test",
            "o:tag": ["receipts", "shop"], "v:order": "ORD-7"}
    files = [("attachment", ("receipt.csv", b"sku,qty\r\nA,1\r\n"))]
    response = client(capture).messages.create(data=data, files=files, domain="mg.example.test")
    assert response.status_code == 200
    answer = response.json()
    assert answer["message"] == "Queued. Thank you." and answer["id"].endswith("@mg.example.test>")
    (msg,) = store.since(0)
    assert msg.source == "mailgun" and msg.message_id == answer["id"]
    assert msg.mail_from == "shop@mg.example.test"
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test", "bob@example.test", "cc@example.test"]
    assert msg.to == ["ann@example.test", "bob@example.test"] and msg.cc == ["cc@example.test"]
    assert msg.header("Bcc") is None and b"audit@" not in msg.raw
    assert (msg.subject, msg.header("X-Order"), msg.header("Reply-To")) == ("Your receipt", "ORD-7", "help@example.test")
    assert msg.text.strip() == "Thanks." and msg.html.strip() == "<p>Thanks.</p>"
    (att,) = msg.attachments
    assert (att.filename, att.data, att.content_type) == ("receipt.csv", b"sku,qty\r\nA,1\r\n", "text/csv")
    info = msg.extra["provider"]
    assert info["tags"] == ["receipts", "shop"] and info["user_variables"] == {"order": "ORD-7"}
    assert info["domain"] == "mg.example.test"


def test_mime_message_is_sent_as_is_without_its_bcc_header(capture, store):
    mime = EmailMessage()
    mime["From"] = "shop@mg.example.test"
    mime["To"] = "ann@example.test"
    mime["Bcc"] = "audit@example.test"
    mime["Subject"] = "Raw"
    mime["Message-ID"] = "<raw-1@mg.example.test>"
    mime.set_content("As composed.\n")
    response = client(capture).mimemessage.create(
        data={"to": "ann@example.test,audit@example.test"}, files={"message": mime.as_bytes()}, domain="mg.example.test")
    assert response.status_code == 200
    (msg,) = store.since(0)
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test"]
    assert msg.message_id == "<raw-1@mg.example.test>" and msg.header("Bcc") is None
    assert msg.text == "As composed.\n"


def test_wrong_key_gets_mailguns_bare_forbidden(capture, store):
    response = client(capture, key="key-wrong").messages.create(
        data={"from": "a@mg.example.test", "to": "b@example.test", "subject": "s", "text": "t"}, domain="mg.example.test")
    assert (response.status_code, response.text) == (401, "Forbidden")
    assert len(store) == 0


def test_missing_body_is_refused_with_mailguns_message(capture, store):
    response = client(capture).messages.create(
        data={"from": "a@mg.example.test", "to": "b@example.test", "subject": "s"}, domain="mg.example.test")
    assert response.status_code == 400
    assert response.json() == {"message": "Need at least one of 'text', 'html' or 'template' parameters specified"}


def test_server_error_fault_then_a_slow_success(capture, store):
    capture.faults.rule("mailgun", status=503, times=1)
    data = {"from": "a@mg.example.test", "to": "b@example.test", "subject": "s", "text": "t"}
    assert client(capture).messages.create(data=data, domain="mg.example.test").status_code == 503
    assert len(store) == 0
    capture.faults.rule("mailgun", delay=0.2, times=1)
    assert client(capture).messages.create(data=data, domain="mg.example.test").status_code == 200
    assert len(store) == 1


def test_the_sdk_retries_a_rate_limit_by_itself(capture, store):
    rule = capture.faults.rule("mailgun", status=429, retry_after=0, times=1)
    data = {"from": "a@mg.example.test", "to": "b@example.test", "subject": "s", "text": "t"}
    assert client(capture, retries=1).messages.create(data=data, domain="mg.example.test").status_code == 200
    assert rule.fired == 1 and len(store) == 1  # refused once, then sent once


def test_complaint_webhook_is_hmac_signed_with_the_signing_key(capture, store, webhook_receiver):
    capture.webhooks.target("mailgun", webhook_receiver.url, secret="whsec-mailgun")
    capture.faults.rule("mailgun", event="complaint", to="angry@example.test")
    data = {"from": "a@mg.example.test", "to": "angry@example.test", "subject": "s", "text": "t", "v:user": "42"}
    client(capture).messages.create(data=data, domain="mg.example.test")
    assert capture.webhooks.wait("complaint", "angry@example.test").acknowledged
    assert len(store) == 1  # a complaint comes from a reader who got it
    payloads = [json.loads(body) for _, body in webhook_receiver.requests]
    assert [p["event-data"]["event"] for p in payloads] == ["delivered", "complained"]
    sig = payloads[-1]["signature"]
    expected = hmac.new(b"whsec-mailgun", (sig["timestamp"] + sig["token"]).encode(), hashlib.sha256).hexdigest()
    assert sig["signature"] == expected
    assert payloads[-1]["event-data"]["user-variables"] == {"user": "42"}


def test_stored_template_is_rendered_with_its_variables(capture, store):
    capture.providers["mailgun"].templates["welcome"] = {"subject": "Hi {{name}}", "text": "Code {{code}}",
                                                         "html": "<p>{{code}}</p>"}
    data = {"from": "a@mg.example.test", "to": "ann@example.test", "template": "welcome",
            "t:variables": json.dumps({"name": "Ann", "code": "9"})}
    assert client(capture).messages.create(data=data, domain="mg.example.test").status_code == 200
    (msg,) = store.since(0)
    assert (msg.subject, msg.text.strip(), msg.html.strip()) == ("Hi Ann", "Code 9", "<p>9</p>")
    assert msg.extra["provider"]["template"] == "welcome"
    assert msg.extra["provider"]["template_variables"] == {"name": "Ann", "code": "9"}


def test_recipient_variables_send_one_message_per_recipient(capture, store):
    data = {"from": "a@mg.example.test", "to": ["ann@example.test", "Bob <bob@example.test>"],
            "subject": "Hi %recipient.name%", "text": "Your id is %recipient.id%.",
            "recipient-variables": json.dumps({"ann@example.test": {"name": "Ann", "id": 1},
                                               "bob@example.test": {"name": "Bob", "id": 2}})}
    assert client(capture).messages.create(data=data, domain="mg.example.test").status_code == 200
    ann, bob = store.since(0)
    assert (ann.rcpt_tos, ann.to, ann.subject, ann.text.strip()) == (
        ("ann@example.test",), ["ann@example.test"], "Hi Ann", "Your id is 1.")
    assert (bob.rcpt_tos, bob.to, bob.subject) == (("bob@example.test",), ["bob@example.test"], "Hi Bob")
