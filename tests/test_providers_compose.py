"""The MIME the provider capture writes, and the Bcc it takes out of raw messages."""

from __future__ import annotations

from mailproof.message import Message
from mailproof.providers import Attachment, Outgoing, compose
from mailproof.providers.compose import render, strip_bcc


def test_text_html_and_attachment_are_mixed_around_an_alternative():
    out = Outgoing(provider="x", sender="Shöp <shop@example.test>", to=["Ann <ann@example.test>"],
                   bcc=["audit@example.test"], subject="Grüße", text="plain", html="<p>html</p>",
                   headers=[("X-Tag", "t"), ("To", "evil@example.test")],
                   attachments=[Attachment("a.bin", b"\x00\x01", "application/octet-stream")])
    msg = Message(compose(out, "id-1", domain="provider.test"), rcpt_tos=out.recipients)
    assert msg.parsed.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.parsed.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/octet-stream"]
    assert msg.subject == "Grüße" and msg.header("X-Tag") == "t"
    assert msg.to == ["ann@example.test"]  # a custom header cannot override To
    assert msg.message_id == "<id-1@provider.test>" and msg.header("Date")
    assert msg.header("Bcc") is None and out.recipients == ["ann@example.test", "audit@example.test"]
    assert msg.attachments[0].data == b"\x00\x01"


def test_html_only_is_a_single_part_and_a_custom_message_id_wins():
    out = Outgoing(provider="x", sender="shop@example.test", to=["ann@example.test"], subject="s",
                   html="<p>only</p>", headers=[("Message-ID", "<own@app.test>")])
    msg = Message(compose(out, "id-2", domain="provider.test"))
    assert msg.parsed.get_content_type() == "text/html" and msg.message_id == "<own@app.test>"


def test_strip_bcc_removes_a_folded_bcc_header_and_leaves_the_body_alone():
    raw = (b"From: a@example.test\r\nBcc: one@example.test,\r\n two@example.test\r\nTo: b@example.test\r\n"
           b"Subject: s\r\n\r\nBcc: this line is body\r\n")
    assert strip_bcc(raw) == (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: s\r\n\r\n"
                              b"Bcc: this line is body\r\n")


def test_render_substitutes_plain_triple_and_dotted_names():
    assert render("Hi {{name}}, {{{html}}} {{ user.city }}{{missing}}!",
                  {"name": "Ann", "html": "<b>", "user": {"city": "Oslo"}}) == "Hi Ann, <b> Oslo!"
