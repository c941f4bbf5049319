"""Amazon SES v2 through boto3 (``boto3.client("sesv2", endpoint_url=capture.url, ...)``)."""

from __future__ import annotations

import base64
import json
from email.message import EmailMessage

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError


def ses(capture, secret=None, key_id=None):
    # botocore retries throttling and 5xx by itself (docs/traps.md): one attempt, so a test sees each answer.
    return boto3.client("sesv2", endpoint_url=capture.url, region_name="eu-west-1",
                        aws_access_key_id=key_id or capture.keys.ses_access_key,
                        aws_secret_access_key=secret or capture.keys.ses_secret_key,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def simple(to, **extra):
    return dict(FromEmailAddress="Demo Shop <shop@example.test>", Destination={"ToAddresses": to},
                Content={"Simple": {"Subject": {"Data": "Hello"}, "Body": {"Text": {"Data": "Hi."}}}}, **extra)


def test_simple_content_with_headers_attachment_and_bcc_is_captured_exactly(capture, store):
    answer = ses(capture).send_email(
        FromEmailAddress="Demo Shop <shop@example.test>",
        Destination={"ToAddresses": ["ann@example.test"], "CcAddresses": ["cc@example.test"],
                     "BccAddresses": ["audit@example.test"]},
        ReplyToAddresses=["help@example.test"],
        Content={"Simple": {"Subject": {"Data": "Your receipt", "Charset": "UTF-8"},
                            "Body": {"Text": {"Data": "Thanks."}, "Html": {"Data": "<p>Thanks.</p>"}},
                            "Headers": [{"Name": "X-Order", "Value": "ORD-9"}],
                            "Attachments": [{"FileName": "receipt.csv", "RawContent": b"sku,qty\r\nA,1\r\n",
                                             "ContentType": "text/csv"}]}},
        EmailTags=[{"Name": "flow", "Value": "receipt"}], ConfigurationSetName="shop")
    (msg,) = store.since(0)
    assert msg.source == "ses" and msg.extra["provider"]["message_id"] == answer["MessageId"]
    assert msg.message_id == f"<{answer['MessageId']}@email.amazonses.com>"
    assert msg.mail_from == "shop@example.test"
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test", "cc@example.test"]
    assert msg.header("Bcc") is None and b"audit@" not in msg.raw
    assert (msg.subject, msg.header("X-Order"), msg.header("Reply-To")) == ("Your receipt", "ORD-9", "help@example.test")
    assert msg.text.strip() == "Thanks." and msg.html.strip() == "<p>Thanks.</p>"
    (att,) = msg.attachments
    assert (att.filename, att.data, att.content_type) == ("receipt.csv", b"sku,qty\r\nA,1\r\n", "text/csv")
    assert msg.extra["provider"]["tags"] == {"flow": "receipt"}
    assert msg.extra["provider"]["configuration_set"] == "shop"


def test_raw_content_is_sent_as_composed_with_recipients_from_its_headers(capture, store):
    mime = EmailMessage()
    mime["From"] = "shop@example.test"
    mime["To"] = "ann@example.test"
    mime["Bcc"] = "audit@example.test"
    mime["Subject"] = "Raw"
    mime["Message-ID"] = "<raw-ses@example.test>"
    mime.set_content("Composed by the app.\n")
    ses(capture).send_email(Content={"Raw": {"Data": mime.as_bytes()}})
    (msg,) = store.since(0)
    assert sorted(msg.rcpt_tos) == ["ann@example.test", "audit@example.test"]
    assert msg.message_id == "<raw-ses@example.test>" and msg.header("Bcc") is None
    assert msg.text == "Composed by the app.\n"


def test_template_content_from_a_stored_template(capture, store):
    client = ses(capture)
    client.create_email_template(TemplateName="welcome", TemplateContent={
        "Subject": "Welcome {{name}}", "Text": "Your code is {{code}}.", "Html": "<p>{{code}}</p>"})
    client.send_email(FromEmailAddress="shop@example.test", Destination={"ToAddresses": ["ann@example.test"]},
                      Content={"Template": {"TemplateName": "welcome",
                                            "TemplateData": json.dumps({"name": "Ann", "code": "4711"})}})
    (msg,) = store.since(0)
    assert (msg.subject, msg.text.strip(), msg.html.strip()) == ("Welcome Ann", "Your code is 4711.", "<p>4711</p>")
    assert msg.extra["provider"]["template"] == "welcome"
    with pytest.raises(ClientError) as missing:
        client.send_email(FromEmailAddress="shop@example.test", Destination={"ToAddresses": ["ann@example.test"]},
                          Content={"Template": {"TemplateName": "nope", "TemplateData": "{}"}})
    assert missing.value.response["Error"]["Code"] == "NotFoundException"


def test_a_wrong_secret_fails_the_signature_check(capture, store):
    with pytest.raises(ClientError) as refused:
        ses(capture, secret="not-the-secret").send_email(**simple(["ann@example.test"]))
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as unknown:
        ses(capture, key_id="AKIAUNKNOWN000000000").send_email(**simple(["ann@example.test"]))
    assert unknown.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert len(store) == 0


def test_throttling_fault_is_a_too_many_requests_exception(capture, store):
    capture.faults.rule("ses", status=429, times=1)
    with pytest.raises(ClientError) as limited:
        ses(capture).send_email(**simple(["ann@example.test"]))
    assert limited.value.response["Error"]["Code"] == "TooManyRequestsException"
    assert limited.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert len(store) == 0


def test_mailbox_simulator_addresses_behave_as_documented(capture, store, webhook_receiver):
    capture.webhooks.target("ses", webhook_receiver.url)
    client = ses(capture)
    for local in ("success", "bounce", "complaint", "suppressionlist"):
        client.send_email(**simple([f"{local}+t1@simulator.amazonses.com"]))
    delivered = sorted(r for m in store.since(0) for r in m.rcpt_tos)
    assert delivered == ["complaint+t1@simulator.amazonses.com", "success+t1@simulator.amazonses.com"]
    for kind, local in (("delivered", "success"), ("bounce", "bounce"), ("complaint", "complaint"),
                        ("bounce", "suppressionlist")):
        assert capture.webhooks.wait(kind, f"{local}+t1@simulator.amazonses.com").acknowledged


def test_events_come_in_a_signed_sns_envelope(capture, store, webhook_receiver):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    import urllib.request

    capture.webhooks.target("ses", webhook_receiver.url)
    ses(capture).send_email(**simple(["bounce@simulator.amazonses.com"]))
    capture.webhooks.wait("bounce", "bounce@simulator.amazonses.com")
    headers, body = webhook_receiver.requests[-1]
    assert headers["x-amz-sns-message-type"] == "Notification"
    envelope = json.loads(body)
    with urllib.request.urlopen(envelope["SigningCertURL"]) as answer:  # served by the capture, on loopback
        cert = x509.load_pem_x509_certificate(answer.read())
    signed = "".join(f"{k}\n{envelope[k]}\n" for k in ("Message", "MessageId", "Timestamp", "TopicArn", "Type"))
    cert.public_key().verify(base64.b64decode(envelope["Signature"]), signed.encode(), padding.PKCS1v15(),
                             hashes.SHA256())
    event = json.loads(envelope["Message"])
    assert event["eventType"] == "Bounce" and event["bounce"]["bounceType"] == "Permanent"
    assert event["bounce"]["bouncedRecipients"][0]["emailAddress"] == "bounce@simulator.amazonses.com"
