"""SendGrid through its official client (``sendgrid``), pointed at the provider capture."""

from __future__ import annotations

import base64
import json

import pytest
from python_http_client.exceptions import BadRequestsError, TooManyRequestsError, UnauthorizedError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.eventwebhook import EventWebhook
from sendgrid.helpers.mail import (Attachment, Bcc, Cc, Content, Disposition, FileContent, FileName, FileType,
                                   Header, Mail, Personalization, ReplyTo, To)


def client(capture, key=None) -> SendGridAPIClient:
    return SendGridAPIClient(key or capture.keys.sendgrid, host=capture.url)


def test_mail_with_alternatives_attachment_and_bcc_is_captured_exactly(capture, store):
    mail = Mail(from_email=("shop@example.test", "Demo Shop"), to_emails=To("ann@example.test", "Ann"),
                subject="Your receipt", plain_text_content="Thanks, Ann.", html_content="<p>Thanks, <b>Ann</b>.</p>")
    mail.add_cc(Cc("cc@example.test"))
    mail.add_bcc(Bcc("audit@example.test"))
    mail.reply_to = ReplyTo("help@example.test", "Help")
    mail.add_header(Header("X-Order", "ORD-1"))
    mail.attachment = Attachment(FileContent(base64.b64encode(b"sku,qty\r\nA,1\r\n").decode()),
                                 FileName("receipt.csv"), FileType("text/csv"), Disposition("attachment"))
    response = client(capture).send(mail)
    assert response.status_code == 202
    (msg,) = store.since(0)
    assert msg.source == "sendgrid"
    assert msg.extra["provider"]["message_id"] == response.headers["X-Message-Id"]
    assert msg.mail_from == "shop@example.test"
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test", "cc@example.test"]
    assert msg.header("From") == "Demo Shop <shop@example.test>"
    assert msg.to == ["ann@example.test"] and msg.cc == ["cc@example.test"]
    assert msg.header("Bcc") is None and b"audit@example.test" not in msg.raw
    assert msg.header("Reply-To") == "Help <help@example.test>"
    assert msg.subject == "Your receipt" and msg.header("X-Order") == "ORD-1"
    assert msg.text.strip() == "Thanks, Ann." and msg.html.strip() == "<p>Thanks, <b>Ann</b>.</p>"
    (att,) = msg.attachments
    assert att.filename == "receipt.csv" and att.data == b"sku,qty\r\nA,1\r\n" and att.content_type == "text/csv"
    assert msg.message_id.endswith("@geopod-ismtpd-1.sendgrid.net>")


def test_each_personalization_is_its_own_message_with_template_data_recorded(capture, store):
    capture.providers["sendgrid"].templates["d-welcome"] = {"subject": "Hi {{name}}", "text": "Code {{code}}",
                                                            "html": "<p>Code {{code}}</p>"}
    mail = Mail(from_email="shop@example.test")
    mail.template_id = "d-welcome"
    for name, code in (("ann", "111"), ("bob", "222")):
        p = Personalization()
        p.add_to(To(f"{name}@example.test"))
        p.dynamic_template_data = {"name": name, "code": code}
        mail.add_personalization(p)  # inserts at index 0 (docs/traps.md): bob's goes first
    assert client(capture).send(mail).status_code == 202
    bob, ann = store.since(0)
    assert ann.rcpt_tos == ("ann@example.test",) and bob.rcpt_tos == ("bob@example.test",)
    assert (ann.subject, ann.text.strip(), bob.subject) == ("Hi ann", "Code 111", "Hi bob")
    assert ann.extra["provider"]["template_id"] == "d-welcome"
    assert bob.extra["provider"]["dynamic_template_data"] == {"name": "bob", "code": "222"}


def test_wrong_key_is_refused_with_sendgrids_error_body(capture, store):
    mail = Mail(from_email="shop@example.test", to_emails="ann@example.test", subject="s", plain_text_content="t")
    with pytest.raises(UnauthorizedError) as refused:
        client(capture, key="SG.wrong").send(mail)
    assert json.loads(refused.value.body)["errors"][0]["message"] == (
        "The provided authorization grant is invalid, expired, or revoked")
    assert len(store) == 0


def test_missing_content_is_a_validation_error_naming_the_field(capture, store):
    with pytest.raises(BadRequestsError) as refused:
        client(capture).client.mail.send.post(request_body={
            "personalizations": [{"to": [{"email": "ann@example.test"}]}],
            "from": {"email": "shop@example.test"}, "subject": "s"})
    (error,) = json.loads(refused.value.body)["errors"]
    assert error["field"] == "content" and "content parameter is required" in error["message"]
    assert len(store) == 0


def test_rate_limit_fault_answers_429_with_sendgrids_headers_then_recovers(capture, store):
    capture.faults.rule("sendgrid", status=429, retry_after=3, to="ann@example.test", times=1)
    mail = Mail(from_email="shop@example.test", to_emails="ann@example.test", subject="s", plain_text_content="t")
    with pytest.raises(TooManyRequestsError) as limited:
        client(capture).send(mail)
    headers = limited.value.headers
    assert headers["X-RateLimit-Remaining"] == "0" and int(headers["X-RateLimit-Reset"]) > 0
    assert len(store) == 0
    assert client(capture).send(mail).status_code == 202
    assert len(store) == 1


def test_sandbox_mode_validates_and_sends_nothing(capture, store):
    mail = Mail(from_email="shop@example.test", to_emails="ann@example.test", subject="s", plain_text_content="t")
    from sendgrid.helpers.mail import MailSettings, SandBoxMode

    mail.mail_settings = MailSettings(sandbox_mode=SandBoxMode(True))
    assert client(capture).send(mail).status_code == 200
    assert len(store) == 0


def test_signed_event_webhook_verifies_with_the_official_helper(capture, store, webhook_receiver):
    capture.webhooks.target("sendgrid", webhook_receiver.url)
    mail = Mail(from_email="shop@example.test", to_emails="gone@example.test", subject="s", plain_text_content="t")
    capture.faults.rule("sendgrid", event="bounce", to="gone@example.test")
    message_id = client(capture).send(mail).headers["X-Message-Id"]
    record = capture.webhooks.wait("bounce", "gone@example.test")
    assert record.acknowledged and len(store) == 0  # a bounce never reaches an inbox
    headers, body = webhook_receiver.requests[-1]
    verifier = EventWebhook(capture.providers["sendgrid"].public_key)
    assert verifier.verify_signature(body.decode(), headers["X-Twilio-Email-Event-Webhook-Signature"],
                                     headers["X-Twilio-Email-Event-Webhook-Timestamp"])
    assert not verifier.verify_signature(body.decode() + " ", headers["X-Twilio-Email-Event-Webhook-Signature"],
                                         headers["X-Twilio-Email-Event-Webhook-Timestamp"])
    (event,) = json.loads(body)
    assert (event["event"], event["email"], event["type"]) == ("bounce", "gone@example.test", "bounce")
    assert event["sg_message_id"].startswith(message_id)


def test_delivered_and_open_events_for_a_captured_message(capture, store, webhook_receiver):
    capture.webhooks.target("sendgrid", webhook_receiver.url)
    mail = Mail(from_email="shop@example.test", to_emails="ann@example.test", subject="s", plain_text_content="t")
    client(capture).send(mail)
    assert capture.webhooks.wait("delivered", "ann@example.test").acknowledged
    capture.emit("open", store.since(0)[0])
    assert capture.webhooks.wait("open", "ann@example.test").acknowledged
    assert [json.loads(b)[0]["event"] for _, b in webhook_receiver.requests][-2:] == ["delivered", "open"]
