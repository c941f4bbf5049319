"""Plain header values are read without the header registry (message_text._plain_value), and
always as the registry reads them."""

from __future__ import annotations

import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailproof import message_text
from mailproof.message import Message
from tests.test_message_hostile import PROPERTY

REGISTRY = email.policy.default


def registry_reading(name: str, value: str) -> str:
    return str(REGISTRY.header_fetch_parse(name, value))


@pytest.mark.parametrize("name, value, read", [
    ("From", "Demo Shop <no-reply@demo-shop.test>", "Demo Shop <no-reply@demo-shop.test>"),
    ("From", "<no-reply@demo-shop.test>", "no-reply@demo-shop.test"),
    ("To", "signup-3.k3v9xq@mailproof.test", "signup-3.k3v9xq@mailproof.test"),
    ("Reply-To", "Ada Lovelace <ada+shop@x-y.test>", "Ada Lovelace <ada+shop@x-y.test>"),
    ("Sender", "bounce@app.test", "bounce@app.test"),
    ("Subject", "Confirm your Demo Shop account", "Confirm your Demo Shop account"),
    ("Subject", "  two\tspaces  ", "  two\tspaces  "),
    ("X-Campaign", "launch-2026 (A/B)", "launch-2026 (A/B)"),
    ("Message-ID", "<170000.1.2@demo-shop.test>", "<170000.1.2@demo-shop.test>"),
])
def test_plain_values_skip_the_registry_and_read_as_it_does(name, value, read):
    assert message_text._plain_value(name, value) == read == registry_reading(name, value)


@pytest.mark.parametrize("name, value", [
    ("From", "Mr. X <x@y.test>"),              # the registry quotes it: "Mr. X" <x@y.test>
    ("From", "Ada  Lovelace <a@b.test>"),      # the registry folds the spaces
    ("From", "a@b.test, c@d.test"),            # a list
    ("From", "=?utf-8?q?Caf=C3=A9?= <a@b.test>"),
    ("From", "a..b@c.test"),
    ("Subject", "=?utf-8?b?w6k=?="),
    ("Subject", "caf\u00e9"),
    ("Subject", "line\r\n folded"),
    ("Date", "Tue, 1 Dec 2026 10:00:00 +0000"),  # dates are normalised by the registry
    ("Content-Type", "text/plain"),
    ("Message-ID", "<a b@c>"),
])
def test_other_values_go_to_the_registry(name, value):
    assert message_text._plain_value(name, value) is None


WORD = st.text("AZaz09._+-", min_size=1, max_size=6)
PIECE = st.sampled_from([" ", "  ", "\t", ".", ",", ";", ":", '"', "(", ")", "<", ">", "@", "[", "]", "\\",
                         "=?", "?=", "-", "_", "+", "\u00e9", "\r\n ", "!", "~"]) | WORD
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", WORD, WORD)
VALUE = st.one_of(
    st.lists(PIECE, max_size=12).map("".join),
    st.builds(lambda name, addr: f"{name} <{addr}>", st.lists(PIECE, max_size=5).map("".join), ADDRESS),
    st.builds(lambda addr: f"<{addr}>", ADDRESS),
    ADDRESS,
    st.text(max_size=30),
)
NAMES = ["Subject", "From", "To", "Cc", "Reply-To", "Sender", "Resent-From", "Message-ID", "X-Anything",
         "Comments", "Keywords"]


@settings(max_examples=2000, **PROPERTY)
@given(st.sampled_from(NAMES), VALUE)
def test_a_plain_reading_is_always_the_registry_reading(name, value):
    plain = message_text._plain_value(name, value)
    if plain is not None:
        assert plain == registry_reading(name, value)


def test_a_message_reads_its_headers_the_same_either_way(monkeypatch):
    raw = (b"From: Demo Shop <no-reply@demo-shop.test>\r\nTo: <ada@x.test>\r\nSubject: Hi there\r\n"
           b"Message-ID: <1.2@demo-shop.test>\r\nX-Tag: a (b) c\r\n\r\nbody\r\n")
    fast = Message(raw).headers
    monkeypatch.setattr(message_text, "_plain_value", lambda name, value: None)
    assert Message(raw).headers == fast
