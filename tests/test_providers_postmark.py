"""Postmark through its documented HTTP API (it has no official Python client; postmarker is a
community library), sent with requests as the documentation shows."""

from __future__ import annotations

import base64
import json

import requests


def post(capture, path, body, token=None):
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if token is not False:
        headers["X-Postmark-Server-Token"] = token or capture.keys.postmark
    return requests.post(capture.url + path, data=json.dumps(body), headers=headers, timeout=10)


def email(to, **extra):
    return {"From": "Demo Shop <shop@example.test>", "To": to, "Subject": "Hello", "TextBody": "Hi.", **extra}


def test_email_with_html_headers_attachment_and_bcc_is_captured_exactly(capture, store):
    answer = post(capture, "/email", email(
        "Ann <ann@example.test>", Cc="cc@example.test", Bcc="audit@example.test", HtmlBody="<p>Hi.</p>",
        ReplyTo="help@example.test", Tag="receipt", Metadata={"order": "ORD-3"},
        Headers=[{"Name": "X-Order", "Value": "ORD-3"}],
        Attachments=[{"Name": "receipt.csv", "Content": base64.b64encode(b"sku\r\nA\r\n").decode(),
                      "ContentType": "text/csv"}], MessageStream="outbound"))
    assert answer.status_code == 200
    result = answer.json()
    assert (result["ErrorCode"], result["Message"], result["To"]) == (0, "OK", "Ann <ann@example.test>")
    (msg,) = store.since(0)
    assert msg.source == "postmark" and msg.extra["provider"]["message_id"] == result["MessageID"]
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test", "cc@example.test"]
    assert msg.header("Bcc") is None and b"audit@" not in msg.raw
    assert (msg.subject, msg.header("X-Order"), msg.header("Reply-To")) == ("Hello", "ORD-3", "help@example.test")
    assert msg.text.strip() == "Hi." and msg.html.strip() == "<p>Hi.</p>"
    (att,) = msg.attachments
    assert (att.filename, att.data) == ("receipt.csv", b"sku\r\nA\r\n")
    assert msg.extra["provider"]["tag"] == "receipt" and msg.extra["provider"]["metadata"] == {"order": "ORD-3"}


def test_batch_answers_one_result_per_message(capture, store):
    answer = post(capture, "/email/batch", [email("ann@example.test"), email("bob@example.test"),
                                            {"From": "shop@example.test", "To": "c@example.test", "Subject": "x"}])
    assert answer.status_code == 200
    first, second, third = answer.json()
    assert first["ErrorCode"] == second["ErrorCode"] == 0 and first["MessageID"] != second["MessageID"]
    assert third["ErrorCode"] == 300 and "TextBody or HtmlBody" in third["Message"]
    assert sorted(r for m in store.since(0) for r in m.rcpt_tos) == ["ann@example.test", "bob@example.test"]


def test_missing_and_wrong_tokens_are_refused_with_error_code_10(capture, store):
    missing = post(capture, "/email", email("ann@example.test"), token=False)
    wrong = post(capture, "/email", email("ann@example.test"), token="not-a-token")
    assert (missing.status_code, missing.json()["ErrorCode"]) == (401, 10)
    assert "X-Postmark-Server-Token" in missing.json()["Message"]
    assert (wrong.status_code, wrong.json()["ErrorCode"]) == (401, 10)
    assert len(store) == 0


def test_inactive_recipient_fault_is_a_422_with_error_code_406(capture, store):
    capture.faults.rule("postmark", status=406, to="ann@example.test")
    answer = post(capture, "/email", email("ann@example.test"))
    assert (answer.status_code, answer.json()["ErrorCode"]) == (422, 406)
    assert len(store) == 0


def test_bounce_test_addresses_bounce_with_their_type(capture, store, webhook_receiver):
    capture.webhooks.target("postmark", webhook_receiver.url, user="hook", password="s3cret")
    post(capture, "/email", email("HardBounce@bounce-testing.postmarkapp.com"))
    post(capture, "/email", email("SpamComplaint@bounce-testing.postmarkapp.com"))
    assert capture.webhooks.wait("bounce", "HardBounce@bounce-testing.postmarkapp.com").acknowledged
    assert capture.webhooks.wait("complaint", "SpamComplaint@bounce-testing.postmarkapp.com").acknowledged
    records = {json.loads(b)["RecordType"]: (h, json.loads(b)) for h, b in webhook_receiver.requests}
    headers, bounce = records["Bounce"]
    assert (bounce["Type"], bounce["TypeCode"], bounce["Inactive"]) == ("HardBounce", 1, True)
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"hook:s3cret").decode()
    assert records["SpamComplaint"][1]["Type"] == "SpamComplaint"
    # the hard bounce never reached an inbox; the complaint's message did
    assert [m.rcpt_tos for m in store.since(0)] == [("SpamComplaint@bounce-testing.postmarkapp.com",)]


def test_a_header_value_with_a_line_break_is_refused_not_injected(capture, store):
    answer = post(capture, "/email", email("ann@example.test", Headers=[
        {"Name": "X-Note", "Value": "a\r\nBcc: victim@example.test"}]))
    assert answer.status_code == 422 and answer.json()["ErrorCode"] == 300
    assert len(store) == 0


def test_with_template_renders_a_registered_template(capture, store):
    capture.providers["postmark"].templates["welcome"] = {
        "Subject": "Welcome {{name}}", "TextBody": "Code {{code}}", "HtmlBody": "<p>{{code}}</p>"}
    answer = post(capture, "/email/withTemplate", {"From": "shop@example.test", "To": "ann@example.test",
                                                   "TemplateAlias": "welcome",
                                                   "TemplateModel": {"name": "Ann", "code": "5"}})
    assert answer.status_code == 200 and answer.json()["ErrorCode"] == 0
    (msg,) = store.since(0)
    assert (msg.subject, msg.text.strip(), msg.html.strip()) == ("Welcome Ann", "Code 5", "<p>5</p>")
    assert msg.extra["provider"]["template"] == "welcome"
    missing = post(capture, "/email/withTemplate", {"From": "shop@example.test", "To": "ann@example.test",
                                                    "TemplateAlias": "nope", "TemplateModel": {}})
    assert (missing.status_code, missing.json()["ErrorCode"]) == (422, 1101)
