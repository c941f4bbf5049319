"""Message behaviour that benchmarks/mutation.py found no test checking."""

from __future__ import annotations

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
