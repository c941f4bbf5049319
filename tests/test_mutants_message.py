"""Message behaviour that benchmarks/mutation.py found no test checking."""

from __future__ import annotations

import base64
from types import SimpleNamespace

from mailproof.message import Message

RAW = b"From: app@example.test\r\nTo: a@example.test\r\nSubject: Hi\r\n\r\nHello\r\n"


def captured(**extra):
    return SimpleNamespace(data=RAW, mail_from="app@example.test", rcpt_tos=["a@example.test"], received_at=5.0,
                           seq=3, **extra)


def test_from_captured_reads_what_an_older_capture_lacks_as_unknown():
    msg = Message.from_captured(captured())
    assert (msg.helo, msg.tls, msg.smtputf8, msg.auth_user, msg.eight_bit_mime) == (None, None, None, None, False)
    assert msg.extra == {"peer": None, "mail_options": ()}
    assert (msg.mail_from, msg.rcpt_tos, msg.received_at, msg.seq, msg.source) == (
        "app@example.test", ("a@example.test",), 5.0, 3, "sink")


def test_from_captured_keeps_the_envelope_facts_and_reads_8bitmime_from_the_mail_options():
    msg = Message.from_captured(captured(helo="client.test", tls=True, smtputf8=False, auth_user="u", peer=("127.0.0.1", 1),
                                         mail_options=["SIZE=20", " body=8bitmime "]), source="service")
    assert (msg.helo, msg.tls, msg.smtputf8, msg.auth_user, msg.eight_bit_mime, msg.source) == (
        "client.test", True, False, "u", True, "service")
    assert msg.extra == {"peer": ("127.0.0.1", 1), "mail_options": ("SIZE=20", " body=8bitmime ")}
    assert Message.from_captured(captured(mail_options=["SIZE=20"])).eight_bit_mime is False


def _with_attachment(data: bytes, ctype: str, *, lf: bool = False) -> Message:
    raw = (b"From: app@example.test\r\nTo: a@example.test\r\nSubject: Files\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nSee.\r\n"
           b"--XYZ\r\nContent-Type: " + ctype.encode() + b"\r\nContent-Disposition: attachment; filename=f.bin\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data) + b"\r\n--XYZ--\r\n")
    return Message(raw.replace(b"\r\n", b"\n") if lf else raw, rcpt_tos=["a@example.test"])


def test_an_attachments_text_is_read_in_the_encoding_asked_else_its_charset_else_utf8():
    latin = _with_attachment("café".encode("latin-1"), "text/csv; charset=latin-1").attachment("f.bin")
    assert latin.text() == "café"
    assert latin.text("latin-1") == "café"
    assert latin.text("ascii") == "caf\ufffd"
    plain = _with_attachment("café".encode("utf-8"), "application/octet-stream").attachment("f.bin")
    assert plain.charset is None
    assert plain.text() == "café"


def test_an_attached_mail_keeps_the_line_endings_of_the_message():
    inner = b"Subject: Inner\n\nInner body\n"
    raw = (b"From: app@example.test\nTo: a@example.test\nSubject: Fwd\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/mixed; boundary=XYZ\n\n--XYZ\nContent-Type: text/plain\n\nSee.\n"
           b"--XYZ\nContent-Type: message/rfc822\n\n" + inner + b"--XYZ--\n")
    (attached,) = Message(raw, rcpt_tos=["a@example.test"]).attachments
    assert attached.filename == "attached.eml"
    assert b"\r\n" not in attached.data and attached.data.startswith(b"Subject: Inner\n\nInner body")


def test_an_at_sign_in_a_display_name_or_a_comment_is_no_address():
    raw = (b'From: app@example.test\r\nTo: "support@shop" <help@shop.test>, j@x.test (John@home)\r\n'
           b"Subject: Hi\r\n\r\nHello\r\n")
    msg = Message(raw)
    assert msg.to == ["help@shop.test", "j@x.test"]
    assert msg.recipients == frozenset({"help@shop.test", "j@x.test"})


def test_a_code_of_an_html_only_mail_comes_from_its_visible_text():
    raw = (b"From: app@example.test\r\nTo: a@example.test\r\nSubject: Code\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html\r\n\r\n<p>Your code: <b>ABCD</b></p>\r\n")
    msg = Message(raw, rcpt_tos=["a@example.test"])
    assert msg.text is None
    assert msg.code(r"\b[A-Z]{4}\b") == "ABCD"


def test_describe_names_the_envelope_else_the_to_header_else_a_question_mark():
    two = Message(RAW, rcpt_tos=["a@example.test", "b@example.test"], seq=4)
    assert two.describe() == "mail #4 to a@example.test, b@example.test subject 'Hi'"
    headers_only = Message(b"To: a@example.test, c@example.test\r\nSubject: Hi\r\n\r\nx\r\n", seq=5)
    assert headers_only.describe() == "mail #5 to a@example.test, c@example.test subject 'Hi'"
    assert Message(b"Subject: Hi\r\n\r\nx\r\n", seq=6).describe() == "mail #6 to ? subject 'Hi'"


def test_a_message_built_by_hand_has_no_envelope_and_no_trigger():
    msg = Message(RAW)
    assert (msg.mail_from, msg.rcpt_tos, msg.seq, msg.source, msg.received_at, msg.triggered_at) == (
        "", (), 0, "sink", None, None)


def test_raw_text_is_encoded_back_to_its_bytes_surrogates_included():
    raw = b"Subject: caf\xe9 \xff\r\n\r\nbody\r\n"
    msg = Message(raw.decode("utf-8", "surrogateescape"))
    assert msg.raw == raw
    assert Message("Subject: café\r\n\r\nx\r\n").raw == "Subject: café\r\n\r\nx\r\n".encode("utf-8")
