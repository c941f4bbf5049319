"""Message: lazy, never-raising parsing of captured raw bytes (mailproof/message.py)."""

from __future__ import annotations

import datetime
import email
import email.charset
import email.policy
import os
import queue
import smtplib
import pathlib
import random
import re
import sys
from email.message import EmailMessage
from email.message import Message as Compat32Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailproof.capture.smtp_sink import CapturedMail, SmtpSink
from mailproof.criteria import Criteria
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Attachment, Link, Message, Part

CRLF = EmailMessage().policy.clone(linesep="\r\n")

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 2


def wire(msg: EmailMessage) -> bytes:
    """As the sink captures it: CRLF line endings."""
    return msg.as_bytes(policy=CRLF)


def signup_email() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Example App <no-reply@app.test>"
    msg["To"] = "Alice <alice@example.test>, bob@example.test"
    msg["Cc"] = "audit@example.test"
    msg["Subject"] = "Confirm your email"
    msg["Date"] = "Tue, 04 Jun 2024 10:00:00 +0200"
    msg["Message-ID"] = "<abc123@app.test>"
    msg.set_content(
        "Hello Alice,\n"
        "Your code is 482913.\n"
        "Confirm: https://app.test/confirm?token=T1.\n"
        "Help: https://app.test/help, or reply.\n"
    )
    msg.add_alternative(
        "<html><head><title>ignored 999999</title><style>p{}</style></head><body>"
        "<p>Hello Alice,</p>"
        '<p><a href="https://app.test/confirm?token=T1">Confirm   your\n email</a></p>'
        '<p><A HREF="https://app.test/unsubscribe?u=1&amp;l=2">Unsubscribe</A></p>'
        '<p><a href=" https://app.test/privacy ">Privacy <b>policy</b></a></p>'
        "</body></html>",
        subtype="html",
    )
    return wire(msg)


def mixed_with_attachments() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@app.test", "carol@example.test", "Your invoice"
    msg.set_content("Invoice attached.\n")
    msg.add_alternative('<p>Invoice attached. <img src="cid:logo@app.test"></p>', subtype="html")
    msg.get_payload()[1].add_related(PNG, maintype="image", subtype="png", cid="<logo@app.test>",
                                      filename="logo.png", disposition="inline")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice-42.pdf")
    msg.add_attachment("a,b\n1,2\n", subtype="csv", filename="lines.csv")
    return wire(msg)


# -- structure and content -----------------------------------------------------------------


def test_multipart_alternative_text_and_html():
    msg = Message(signup_email())
    assert msg.subject == "Confirm your email"
    assert "Your code is 482913." in msg.text
    assert msg.html.startswith("<html>") and "Unsubscribe" in msg.html
    assert msg.html_as_text.startswith("Hello Alice, Confirm your email")
    assert "ignored" not in msg.html_as_text  # <title>/<style> are not visible text
    assert msg.attachments == []
    assert msg.defects == []
    assert msg.to == ["alice@example.test", "bob@example.test"]
    assert msg.cc == ["audit@example.test"]
    assert msg.from_ == "Example App <no-reply@app.test>"
    assert msg.message_id == "<abc123@app.test>"
    assert msg.date == datetime.datetime(2024, 6, 4, 10, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert msg.size == len(signup_email())
    assert msg.body_contains("482913") and msg.body_contains(re.compile(r"code is \d{6}"))
    assert not msg.body_contains("not in there")


def test_text_body_uses_python_newlines():
    # Every captured message has CRLF line endings (that is SMTP); the decoded text body should
    # read like any Python text, so multi-line assertions work. Today the CR is kept.
    msg = Message(wire_text("line one\nline two\n"))
    assert msg.text == "line one\nline two\n"


def wire_text(body: str) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = "crlf"
    msg.set_content(body)
    return wire(msg)


def test_headers_in_order_unfolded_and_repeated():
    raw = (b"Received: by a\r\nReceived: by b\r\nSubject: a very\r\n long\r\n subject\r\n"
           b"X-Tag: one\r\nx-tag: two\r\n\r\nbody\r\n")
    msg = Message(raw)
    assert [name for name, _ in msg.headers] == ["Received", "Received", "Subject", "X-Tag", "x-tag"]
    assert msg.subject == "a very long subject"
    assert msg.header_all("X-TAG") == ["one", "two"]
    assert msg.header("x-tag") == "one"
    assert msg.header("Missing") is None and msg.header("Missing", "dflt") == "dflt"


def test_rfc2047_subject_and_from_decoded():
    raw = (
        b"From: =?iso-8859-1?q?Jos=E9_Garc=EDa?= <jose@example.test>\r\n"
        b"To: =?utf-8?b?w4lsw6huZQ==?= <elene@example.test>\r\n"
        b"Subject: =?utf-8?b?w4l0w6kgw6AgUGFyaXM=?= =?utf-8?q?_=E2=80=94_r=C3=A9sum=C3=A9?=\r\n"
        b"\r\nbody\r\n"
    )
    msg = Message(raw)
    assert msg.subject == "Été à Paris — résumé"
    assert msg.from_ == "José García <jose@example.test>"
    assert msg.to == ["elene@example.test"]
    assert ("To", "Élène <elene@example.test>") in msg.headers


def test_utf8_headers_without_encoding():  # SMTPUTF8 mail carries raw UTF-8 headers
    raw = "From: José <josé@例え.test>\r\nTo: 例え@例え.test\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    msg = Message(raw)
    assert msg.subject == "Grüße"
    assert msg.to == ["例え@例え.test"]
    assert msg.from_ == "José <josé@例え.test>"


def test_attachments_name_type_bytes():
    msg = Message(mixed_with_attachments())
    assert msg.text.splitlines() == ["Invoice attached."]
    assert "cid:logo@app.test" in msg.html
    by_name = {a.filename: a for a in msg.attachments}
    assert set(by_name) == {"logo.png", "invoice-42.pdf", "lines.csv"}
    pdf = msg.attachment("invoice-42.pdf")
    assert pdf == Attachment("invoice-42.pdf", "application/pdf", PDF, None, False)
    assert pdf.size == len(PDF)
    csv = by_name["lines.csv"]
    assert csv.content_type == "text/csv" and csv.text().splitlines() == ["a,b", "1,2"]
    logo = by_name["logo.png"]
    assert logo.content_type == "image/png" and logo.data == PNG
    assert logo.inline is True and logo.content_id == "<logo@app.test>"
    with pytest.raises(LookupError, match=r"no attachment named 'nope.txt'.*invoice-42\.pdf"):
        msg.attachment("nope.txt")


def test_attached_email_is_listed_as_attachment():
    inner = EmailMessage()
    inner["Subject"] = "the forwarded one"
    inner.set_content("inner text\n")
    outer = EmailMessage()
    outer["Subject"] = "Fwd"
    outer.set_content("see the attached message\n")
    outer.add_attachment(inner, filename="fwd.eml")
    msg = Message(wire(outer))
    assert msg.text.splitlines() == ["see the attached message"]
    names = [(a.filename, a.content_type) for a in msg.attachments]
    assert names == [("fwd.eml", "message/rfc822")]
    assert b"the forwarded one" in msg.attachment("fwd.eml").data
    assert Message(msg.attachment("fwd.eml").data).text == "inner text\n"
    assert [p.content_type for p in msg.parts] == ["text/plain", "message/rfc822"]
    assert not msg.body_contains("inner text")  # the attached mail is not this message's text


# -- every part ----------------------------------------------------------------------------
#
# Each message below is made by the email package (or byte for byte as a framework's mailer makes
# it), and what Message reads is checked against the email package's own reading of the bytes.

ICS = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//app.test//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
       "UID:kickoff-1@app.test\r\nDTSTART:20240610T090000Z\r\nSUMMARY:Kick-off café\r\n"
       "ORGANIZER:mailto:boss@app.test\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


def email_leaves(top: EmailMessage) -> list:
    """The leaf parts as the email package walks them (an attached message/* is one leaf)."""
    def leaves(part):
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            for sub in part.iter_parts():
                yield from leaves(sub)
        else:
            yield part
    return list(leaves(top))


def assert_parts_match_email_package(raw: bytes) -> Message:
    msg = Message(raw)
    top = email.message_from_bytes(raw, policy=email.policy.default)
    theirs = email_leaves(top)
    assert len(msg.parts) == len(theirs)
    for index, (part, their) in enumerate(zip(msg.parts, theirs)):
        assert isinstance(part, Part) and part.index == index
        assert part.content_type == their.get_content_type()
        assert part.filename == their.get_filename()
        assert part.charset == their.get_content_charset()
        assert part.disposition == their.get_content_disposition()
        assert part.content_id == (str(their["Content-ID"]) if their["Content-ID"] else None)
        if their.get_content_maintype() == "text":
            assert part.content == their.get_content().replace("\r\n", "\n")
            assert part.data == their.get_payload(decode=True) and part.size == len(part.data)
        elif their.get_content_maintype() == "message":
            assert isinstance(part.content, bytes) and part.content == part.data
        else:
            assert part.content == part.data == their.get_content()
    bodies = [top.get_body(("plain",)), top.get_body(("html",))]
    expected = [p for p in theirs if not any(p is b for b in bodies)]
    assert [(a.filename, a.content_type) for a in msg.attachments] == [
        (p.get_filename() or ("attached.eml" if p.get_content_type() == "message/rfc822" else None),
         p.get_content_type()) for p in expected]
    assert msg.text == (bodies[0].get_content().replace("\r\n", "\n") if bodies[0] else None)
    assert msg.html == (bodies[1].get_content().replace("\r\n", "\n") if bodies[1] else None)
    assert msg.defects == []
    return msg


def test_parts_are_every_leaf_as_the_email_package_reads_them():
    msg = assert_parts_match_email_package(mixed_with_attachments())
    assert [p.content_type for p in msg.parts] == ["text/plain", "text/html", "image/png", "application/pdf", "text/csv"]
    logo = msg.parts[2]
    assert (logo.filename, logo.disposition, logo.content_id, logo.content) == ("logo.png", "inline", "<logo@app.test>", PNG)
    assert msg.parts[0].charset == "utf-8" and msg.parts[0].content == "Invoice attached.\n"
    assert msg.parts[4].content == "a,b\n1,2\n" and msg.parts[4].size == len(b"a,b\r\n1,2\r\n")
    assert_parts_match_email_package(signup_email())


def django_calendar_invite() -> bytes:
    """As Django's EmailMultiAlternatives with attach_alternative(ics, "text/calendar; method=REQUEST")
    makes it: SafeMIMEMultipart("alternative") of SafeMIMEText parts, utf-8 with no body encoding."""
    utf8 = email.charset.Charset("utf-8")
    utf8.body_encoding = None  # Django's utf8_charset: 7bit/8bit, not base64
    msg = MIMEMultipart("alternative")
    msg["Subject"] = "Invitation: Kick-off"
    msg["From"], msg["To"] = "calendar@app.test", "alice@example.test"
    msg.attach(MIMEText("You are invited to the kick-off.\n", "plain", utf8))
    msg.attach(MIMEText(ICS, "calendar; method=REQUEST", utf8))
    return msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))


def test_calendar_invite_as_django_makes_it():
    raw = django_calendar_invite()
    assert b'Content-Type: text/calendar; method="REQUEST"; charset="utf-8"' in raw
    msg = assert_parts_match_email_package(raw)
    assert msg.text == "You are invited to the kick-off.\n"
    [invite] = msg.attachments
    assert (invite.content_type, invite.filename, invite.charset) == ("text/calendar", None, "utf-8")
    assert invite.text() == ICS  # the bytes as sent, CRLF and all
    assert msg.parts[1].param("method") == "REQUEST" and msg.parts[1].content == ICS.replace("\r\n", "\n")
    assert msg.body_contains("SUMMARY:Kick-off café") and msg.body_contains(re.compile(r"METHOD:REQUEST"))


def rails_calendar_invite() -> bytes:
    """As Rails' ActionMailer (the mail gem) sends attachments["invite.ics"] = {mime_type:
    "text/calendar; method=REQUEST", content: ics} beside a text and an HTML body."""
    import base64
    ics64 = base64.encodebytes(ICS.encode()).replace(b"\n", b"\r\n")
    return (
        b"Date: Mon, 03 Jun 2024 09:00:00 +0000\r\nFrom: calendar@app.test\r\nTo: alice@example.test\r\n"
        b"Message-ID: <665d86c8a1b2c_1f2a3b4c5d6e@app.test.mail>\r\nSubject: Invitation: Kick-off\r\n"
        b"Mime-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed;\r\n boundary="--==_mimepart_665d86c8a_1f2a3b4c5d6e";\r\n charset=UTF-8\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n\r\n\r\n"
        b"----==_mimepart_665d86c8a_1f2a3b4c5d6e\r\n"
        b'Content-Type: multipart/alternative;\r\n boundary="--==_mimepart_665d86c8b_2";\r\n charset=UTF-8\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n\r\n\r\n"
        b"----==_mimepart_665d86c8b_2\r\nContent-Type: text/plain;\r\n charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\nYou are invited to the kick-off.\r\n\r\n"
        b"----==_mimepart_665d86c8b_2\r\nContent-Type: text/html;\r\n charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n<p>You are invited to the <b>kick-off</b>.</p>\r\n\r\n"
        b"----==_mimepart_665d86c8b_2--\r\n\r\n"
        b"----==_mimepart_665d86c8a_1f2a3b4c5d6e\r\n"
        b"Content-Type: text/calendar;\r\n charset=UTF-8;\r\n method=REQUEST;\r\n filename=invite.ics\r\n"
        b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n filename=invite.ics\r\n"
        b"Content-ID: <665d86c8c3d4e_1f2a3b4c5d6e@app.test.mail>\r\n\r\n" + ics64 + b"\r\n"
        b"----==_mimepart_665d86c8a_1f2a3b4c5d6e--\r\n"
    )


def test_calendar_invite_as_rails_makes_it():
    msg = assert_parts_match_email_package(rails_calendar_invite())
    assert msg.html == "<p>You are invited to the <b>kick-off</b>.</p>\n"
    invite = msg.attachment("invite.ics")
    assert invite.content_type == "text/calendar" and invite.data == ICS.encode()
    assert invite.content_id == "<665d86c8c3d4e_1f2a3b4c5d6e@app.test.mail>" and not invite.inline
    assert msg.parts[2].param("METHOD") == "REQUEST" and msg.parts[2].charset == "utf-8"
    assert msg.body_contains("Kick-off café")


def test_csv_without_filename_and_a_second_text_plain_are_attachments():
    msg = EmailMessage()
    msg["Subject"] = "Your export"
    msg.set_content("The export is attached.\n")
    msg.make_mixed()
    csv = EmailMessage()
    csv.set_content("id,total\n1,42.00\n", subtype="csv")  # no filename, no disposition
    note = EmailMessage()
    note.set_content("Second text part: unsubscribe code 771122\n")
    msg.attach(csv)
    msg.attach(note)
    parsed = assert_parts_match_email_package(wire(msg))
    assert parsed.text == "The export is attached.\n"
    assert [(a.content_type, a.filename) for a in parsed.attachments] == [("text/csv", None), ("text/plain", None)]
    assert parsed.attachments[0].text().splitlines() == ["id,total", "1,42.00"]
    assert parsed.body_contains("1,42.00") and parsed.body_contains("unsubscribe code 771122")
    assert Criteria(contains="771122").matches(parsed)
    with pytest.raises(LookupError):  # code() reads the chosen bodies (and subject) only
        parsed.code()


def bounce() -> bytes:
    """A delivery status notification (RFC 3464) as the email package makes one."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["Subject"], report["From"] = "Undelivered Mail Returned to Sender", "MAILER-DAEMON@mx.example.test"
    report.attach(MIMEText("Your message could not be delivered to one or more recipients.\n"))
    per_message, per_recipient = Compat32Message(), Compat32Message()
    per_message["Reporting-MTA"] = "dns; mx.example.test"
    per_recipient["Final-Recipient"] = "rfc822; nobody@example.test"
    per_recipient["Action"], per_recipient["Status"] = "failed", "5.1.1"
    per_recipient["Diagnostic-Code"] = "smtp; 550 5.1.1 <nobody@example.test>: user unknown"
    status = MIMEBase("message", "delivery-status")
    status.set_payload([per_message, per_recipient])
    report.attach(status)
    original = EmailMessage()
    original["Subject"], original["To"] = "Welcome", "nobody@example.test"
    original.set_content("Welcome aboard, your code is 246810.\n")
    report.attach(MIMEMessage(original))
    return report.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))


def test_bounce_delivery_status_is_an_attachment_and_searched():
    msg = assert_parts_match_email_package(bounce())
    assert [(a.content_type, a.filename) for a in msg.attachments] == [
        ("message/delivery-status", None), ("message/rfc822", "attached.eml")]
    blocks = msg.attachments[0].data.decode().split("\r\n\r\n")
    assert blocks == ["Reporting-MTA: dns; mx.example.test",
                      "Final-Recipient: rfc822; nobody@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
                      "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.test>: user unknown\r\n"]
    assert msg.body_contains("550 5.1.1") and msg.body_contains("could not be delivered")
    # The returned mail is one attachment, as it was sent; its text is not this message's body.
    returned = Message(msg.attachment("attached.eml").data)
    assert returned.subject == "Welcome" and returned.code() == "246810"
    assert not msg.body_contains("Welcome aboard")


def test_a_single_part_attachment_is_an_attachment_not_the_body():
    msg = EmailMessage()
    msg["Subject"] = "report"
    msg.set_content("col\n1\n", disposition="attachment", filename="report.txt")
    parsed = assert_parts_match_email_package(wire(msg))
    assert parsed.text is None and parsed.attachment("report.txt").text() == "col\r\n1\r\n"
    assert parsed.body_contains("col\n1")  # still a text part


# -- envelope facts ------------------------------------------------------------------------


def test_envelope_facts_are_unknown_unless_given():
    msg = Message(signup_email())
    assert (msg.tls, msg.smtputf8, msg.eight_bit_mime, msg.helo, msg.auth_user) == (None,) * 5
    given = Message(signup_email(), tls=True, smtputf8=False, eight_bit_mime=True, helo="app.test", auth_user="app")
    assert (given.tls, given.smtputf8, given.eight_bit_mime, given.helo, given.auth_user) == (
        True, False, True, "app.test", "app")


def test_from_captured_keeps_every_session_fact():
    captured = CapturedMail(seq=7, mail_from="app@app.test", rcpt_tos=("alice@example.test",), data=signup_email(),
                            received_at=123.5, peer=("127.0.0.1", 40000), helo="app.test", smtputf8=True,
                            tls=True, auth_user="app", mail_options=("SIZE=1104", "body=8bitmime", "SMTPUTF8"))
    msg = Message.from_captured(captured)
    assert (msg.seq, msg.mail_from, msg.rcpt_tos, msg.received_at, msg.source) == (
        7, "app@app.test", ("alice@example.test",), 123.5, "sink")
    assert (msg.tls, msg.smtputf8, msg.eight_bit_mime, msg.helo, msg.auth_user) == (True, True, True, "app.test", "app")
    assert msg.extra == {"peer": ("127.0.0.1", 40000), "mail_options": ("SIZE=1104", "body=8bitmime", "SMTPUTF8")}
    assert msg.raw == captured.data and msg.subject == "Confirm your email"
    plain = Message.from_captured(CapturedMail(1, "a@b.test", ("c@d.test",), b"Subject: x\r\n\r\n", 1.0),
                                  source="sink-service")
    assert (plain.tls, plain.smtputf8, plain.eight_bit_mime, plain.helo, plain.source) == (
        False, False, False, None, "sink-service")


def test_from_captured_of_a_real_smtp_session():
    got: "queue.Queue[CapturedMail]" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    try:
        with smtplib.SMTP("127.0.0.1", sink.port, local_hostname="client.app.test", timeout=10) as client:
            client.sendmail("app@app.test", ["caf\u00e9@example.test"], signup_email(),
                            mail_options=["BODY=8BITMIME", "SMTPUTF8"])
        msg = Message.from_captured(got.get(timeout=10))
    finally:
        sink.stop()
    assert msg.helo == "client.app.test" and msg.smtputf8 is True and msg.eight_bit_mime is True
    assert msg.tls is False and msg.auth_user is None
    assert msg.rcpt_tos == ("caf\u00e9@example.test",) and msg.text.startswith("Hello Alice,")


# -- links and codes -----------------------------------------------------------------------


def test_links_from_html_with_anchor_text_and_from_text():
    msg = Message(signup_email())
    assert msg.links == [
        Link("https://app.test/confirm?token=T1", "Confirm your email", "html"),
        Link("https://app.test/unsubscribe?u=1&l=2", "Unsubscribe", "html"),
        Link("https://app.test/privacy", "Privacy policy", "html"),
        # The text body repeats the confirm URL (deduplicated) and adds the help URL; trailing
        # punctuation is not part of a URL.
        Link("https://app.test/help", "", "text"),
    ]


def test_link_lookup():
    msg = Message(signup_email())
    assert msg.link(text="confirm your") == "https://app.test/confirm?token=T1"
    assert msg.link(text="UNSUBSCRIBE") == "https://app.test/unsubscribe?u=1&l=2"
    assert msg.link(contains="/help") == "https://app.test/help"
    assert msg.link(text="privacy", contains="app.test") == "https://app.test/privacy"
    assert msg.link() == "https://app.test/confirm?token=T1"
    with pytest.raises(LookupError) as missing:
        msg.link(text="Reset password")
    assert "Reset password" in str(missing.value) and "https://app.test/help" in str(missing.value)
    with pytest.raises(LookupError):
        msg.link(text="privacy", contains="other.test")


def test_text_only_links():
    msg = Message(wire_text("Go to https://x.test/a?b=c; then (https://x.test/d) and <https://x.test/e>.\n"))
    assert [l.url for l in msg.links] == ["https://x.test/a?b=c", "https://x.test/d", "https://x.test/e"]
    assert {l.source for l in msg.links} == {"text"}


def test_code_default_six_digits():
    assert Message(signup_email()).code() == "482913"
    msg = Message(wire_text("Order 1234567, ref A123456, 12345, code-654321, and then 314159!\n"))
    assert msg.code() == "314159"


def test_code_from_html_visible_text_only():
    msg = EmailMessage()
    msg["Subject"] = "Sign in"
    msg.set_content("Open the HTML version.\n")
    msg.add_alternative('<a href="https://x.test/?id=111111">go</a><p>Code: <b>222222</b></p>', subtype="html")
    assert Message(wire(msg)).code() == "222222"


def test_code_from_subject_last():
    assert Message(b"Subject: 777777 is your code\r\n\r\nno digits here\r\n").code() == "777777"


def test_code_custom_pattern_with_and_without_group():
    msg = Message(wire_text("Your code: AB12CD34. Reference ABC-1234.\n"))
    assert msg.code(r"code:\s*([A-Z0-9]{8})") == "AB12CD34"
    assert msg.code(r"[A-Z]{3}-\d{4}") == "ABC-1234"
    assert msg.code(re.compile(r"(?:ref|Reference) ([A-Z]+)")) == "ABC"


def test_code_absent_raises_lookup_error():
    msg = Message(wire_text("Welcome! No code here, only 12345 and 1234567.\n"))
    with pytest.raises(LookupError, match=r"no code matching .*\\d\{6\}.*subject 'crlf'"):
        msg.code()
    with pytest.raises(LookupError, match="XYZ"):
        msg.code(r"XYZ-(\d+)")


# -- laziness ------------------------------------------------------------------------------


def test_construction_and_routing_do_not_parse():
    raw = signup_email()
    msg = Message(raw, mail_from="no-reply@app.test", rcpt_tos=["alice@example.test"], received_at=100.0)
    assert "parsed" not in msg.__dict__
    assert msg.size == len(raw) and msg.raw == raw and msg.rcpt_tos == ("alice@example.test",)
    assert msg.latency is None
    # Routing a delivery to a waiter keyed by the envelope recipient does not parse either.
    store = MailStore()
    view = Mailbox(store)
    store.deliver(msg)
    assert view.wait_for(to="alice@example.test", within=1) is msg
    assert "parsed" not in msg.__dict__ and "headers" not in msg.__dict__
    # Headers need the header section only, and only the headers asked for are decoded; the body
    # is parsed when something asks for it.
    assert msg.subject == "Confirm your email" and msg.to == ["alice@example.test", "bob@example.test"]
    assert "_head" in msg.__dict__ and "parsed" not in msg.__dict__ and "headers" not in msg.__dict__
    assert sorted(msg._header_items[i][0] for i in msg._decoded) == ["Subject", "To"]
    assert msg.text.startswith("Hello Alice,")
    assert "parsed" in msg.__dict__


def test_parsing_is_cached():
    msg = Message(signup_email())
    assert msg.parsed is msg.parsed
    assert msg.links is msg.links


def test_str_input_is_accepted():
    msg = Message("Subject: from a str\r\n\r\nbody\r\n")
    assert isinstance(msg.raw, bytes) and msg.subject == "from a str"


# -- malformed input never raises ----------------------------------------------------------


def touch_everything(msg: Message) -> None:
    """Read every public attribute and call every lookup; only LookupError may come out."""
    assert isinstance(msg.subject, str)
    assert isinstance(msg.from_, str)
    assert isinstance(msg.to, list) and all(isinstance(a, str) for a in msg.to)
    assert isinstance(msg.cc, list) and all(isinstance(a, str) for a in msg.cc)
    assert isinstance(msg.headers, list) and all(isinstance(n, str) and isinstance(v, str) for n, v in msg.headers)
    assert msg.text is None or isinstance(msg.text, str)
    assert msg.html is None or isinstance(msg.html, str)
    assert isinstance(msg.html_as_text, str)
    assert all(isinstance(a, Attachment) and isinstance(a.data, bytes) for a in msg.attachments)
    assert all(isinstance(l, Link) for l in msg.links)
    assert isinstance(msg.defects, list) and all(isinstance(d, str) for d in msg.defects)
    assert all(isinstance(p, Part) and isinstance(p.content, (str, bytes)) and p.size == len(p.data) for p in msg.parts)
    assert all(isinstance(v, str) for v in msg.header_all("Content-Type") + msg.header_all("To"))
    assert isinstance(msg.recipients, frozenset) and msg.latency is None
    assert msg.date is None or isinstance(msg.date, datetime.datetime)
    assert msg.message_id is None or isinstance(msg.message_id, str)
    assert msg.size == len(msg.raw)
    assert isinstance(msg.describe(), str) and isinstance(repr(msg), str)
    assert isinstance(msg.body_contains("x"), bool)
    assert isinstance(Criteria(to="x@y.test", subject="s", contains="c", header=("X", "y")).mismatches(msg), list)
    for lookup in (msg.code, lambda: msg.link(text="x"), lambda: msg.attachment("x")):
        try:
            assert isinstance(lookup(), (str, Attachment))
        except LookupError:
            pass


def _nested_multipart(depth: int) -> bytes:
    parts = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    return parts + b"Content-Type: text/plain\r\n\r\ndeep\r\n"


MALFORMED = {
    "broken-boundary": b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=\"XYZ\"\r\n\r\n"
                       b"--ABC\r\nContent-Type: text/plain\r\n\r\nhello\r\n--ABC\r\n",
    "unterminated-boundary": b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
                             b"Content-Type: text/html\r\n\r\n<a href='https://x.test/'>x",
    "multipart-without-boundary": b"Content-Type: multipart/alternative\r\n\r\nbody\r\n",
    "bad-base64-body": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@=\r\n",
    "bad-base64-attachment": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                             b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\n"
                             b"Content-Transfer-Encoding: base64\r\n\r\n%%%%\r\n--b--\r\n",
    "bad-quoted-printable": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=\r\n",
    "unknown-transfer-encoding": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-weird\r\n\r\nhello\r\n",
    "unknown-charset": b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
                       b"Content-Transfer-Encoding: 8bit\r\n\r\nh\xe9llo \xff 123456\r\n",
    "unknown-charset-html": b"Content-Type: text/html; charset=\"bogus\"\r\n\r\n<a href='http://x.test/\xe9'>\xe9</a>\r\n",
    "utf16-odd-bytes": b"Content-Type: text/plain; charset=utf-16\r\n\r\n\xff",
    "invalid-utf8-body": b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\x28 \xff\r\n",
    "garbage": random.Random(7).randbytes(3000),
    "garbage-crlf": b"\r\n".join(random.Random(8).randbytes(60) for _ in range(50)),
    "empty": b"",
    "only-nul": b"\x00\x00\x00",
    "nul-and-8bit-headers": b"Subject: hi\x00there \xff\xfe\r\nFrom: \xe9t\xe9 <a@b.test>\r\nTo: \x00@\x00\r\n\r\nbody\r\n",
    "bad-rfc2047": b"Subject: =?utf-8?b?!!!?= =?x-unknown?q?abc?= =?utf-8?q?=ZZ?=\r\n"
                   b"From: =?bogus?b?QQ==?= <a@b.test>\r\n\r\nx",
    "bad-date": b"Date: Mon, 99 Foo 2024 99:99:99 +9999\r\n\r\nx",
    "empty-date": b"Date: \r\n\r\nx",
    "bad-addresses": b"To: <<<@@>>>, \"unterminated\r\nCc: ,,,@,\r\nFrom: <\r\n\r\nx",
    "bad-params": b"Content-Type: text/plain; charset*=utf-8''%FF%FE; name*0*=bad''%ZZ\r\n"
                  b"Content-Disposition: attachment; filename*=x''%E9\r\n\r\nx",
    "bad-content-type": b"Content-Type: ///;;;===\r\n\r\nx",
    "headers-without-body": b"Subject: x\r\nFrom: y",
    "first-line-not-a-header": b"This is not a header\r\nSubject: x\r\n\r\nbody",
    "bare-cr": b"Subject: a\rb\r\n\r\nbody\rmore",
    "bare-lf": b"Subject: lf only\nContent-Type: text/plain\n\nbody\n",
    "huge-header": b"Subject: " + b"a" * 200_000 + b"\r\n\r\nx",
    "whitespace-folded-header": b"Subject:\r\n \r\n \r\n\r\nx",
    "broken-html": b"Content-Type: text/html\r\n\r\n<a href=\"http://x.test/a<b\">unterminated <a href=x><<<>>></script><!--",
    "rfc822-garbage": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
                      b"\xff\xfe garbage\r\n--b--\r\n",
    "nested-200": _nested_multipart(200),
    # A MIME bomb of 1,500 nested parts (about 90 KB): deeper than the interpreter's recursion.
    "nested-1500": _nested_multipart(1500),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_never_raises(raw):
    touch_everything(Message(raw, rcpt_tos=["x@y.test"]))


def test_malformed_content_is_still_readable():
    msg = Message(MALFORMED["unknown-charset"])
    assert msg.text.startswith("h\ufffdllo") and msg.code() == "123456"
    assert Message(MALFORMED["broken-boundary"]).defects  # defects are reported, not raised
    assert Message(MALFORMED["nul-and-8bit-headers"]).subject.startswith("hi")
    assert Message(MALFORMED["bare-lf"]).text == "body\n"
    assert Message(MALFORMED["bad-date"]).date is None


# -- the CPython email test corpus ---------------------------------------------------------
#
# The standard library's own test messages (odd but real-world shapes) live in the "test"
# package, which some Python builds leave out. A missing corpus FAILS here, so it cannot
# silently stop being tested; point MAILPROOF_EMAIL_CORPUS at a copy to use another one.

CORPUS_DEFAULT = pathlib.Path(email.__file__).parent.parent / "test" / "test_email" / "data"
CORPUS = pathlib.Path(os.environ.get("MAILPROOF_EMAIL_CORPUS") or CORPUS_DEFAULT)
CORPUS_FILES = sorted(CORPUS.glob("msg_*.txt")) if CORPUS.is_dir() else []
MISSING_CORPUS = (
    f"the CPython email test corpus was not found: looked for msg_*.txt in {CORPUS}. "
    f"Install the Python test package (Debian/Ubuntu: apt-get install "
    f"libpython{sys.version_info.major}.{sys.version_info.minor}-testsuite; pyenv and python.org "
    f"builds include it), or set MAILPROOF_EMAIL_CORPUS to a directory holding the msg_*.txt files "
    f"from CPython's Lib/test/test_email/data."
)


def test_email_corpus_is_present():
    # CPython 3.11 ships 48 of them; fewer means a partial or wrong directory.
    assert len(CORPUS_FILES) >= 40, MISSING_CORPUS + f" (found {len(CORPUS_FILES)})"


@pytest.mark.parametrize("path", CORPUS_FILES or [pytest.param(None, id="corpus-missing")],
                         ids=lambda p: p.name if p else "corpus-missing")
def test_email_corpus_never_raises(path):
    assert path is not None, MISSING_CORPUS
    touch_everything(Message(path.read_bytes()))


# -- headers without the body --------------------------------------------------------------


def _header_shapes(count: int) -> list[bytes]:
    """Seeded random header sections: CR, LF and CRLF mixed, folds, non-header lines, 8-bit bytes."""
    pieces = [b"Subject: a", b"\r", b"\n", b"\r\n", b" folded", b"X-A: b", b"not a header", b"\t cont",
              b"From x", b":", b"\xff", b"To: a@b.test", b"=?utf-8?q?=C3=A9?="]
    rng = random.Random(11)
    return [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(count)]


HEADER_CASES = ([signup_email(), mixed_with_attachments()] + list(MALFORMED.values())
                + [p.read_bytes() for p in CORPUS_FILES] + _header_shapes(2000))


def test_headers_parsed_alone_are_the_headers_of_a_full_parse():
    for raw in HEADER_CASES:
        alone = Message(raw)
        headers = alone.headers
        assert "parsed" not in alone.__dict__, raw[:80]
        full = Message(raw)
        full.parsed  # parse everything first: the headers then come from that parse
        assert headers == full.headers, raw[:200]
        assert (alone.subject, alone.to, alone.cc) == (full.subject, full.to, full.cc)
    assert len(HEADER_CASES) > 2000 + len(MALFORMED)  # the corpus is in (test_email_corpus_is_present)


def test_a_full_parse_already_made_serves_the_headers():
    msg = Message(signup_email())
    assert msg.text and msg._head is msg.parsed
