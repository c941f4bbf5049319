"""Deliverability checks on messages built here: each verdict, and the reason a check gives.

DKIM runs dkimpy for real against keys made here (no DNS); structure, unsubscribe and clients
read real MIME. The spam check against a real spamd is in tests/test_spamd.py; the checks on
the demo app's mail in flows/test_deliverability.py.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailproof import Message
from mailproof.checks import (FAILED, PASSED, SKIPPED, WARNING, CheckConfig, Checks, NotDeliverable,
                              assert_deliverable)

DOMAIN, SELECTOR = "shop.test", "s1"


@pytest.fixture(scope="module")
def keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def build(html: str | None = "<p>Hello <a href='https://elsewhere.test/x'>there</a></p>", *, text=True,
          headers: dict | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Shop <no-reply@{DOMAIN}>"
    msg["To"] = "qa@mailproof.test"
    msg["Subject"] = "Your receipt"
    msg["Date"] = format_datetime(datetime.now(timezone.utc))
    msg["Message-ID"] = make_msgid(domain=DOMAIN)
    for name, value in (headers or {}).items():
        msg[name] = value
    if text:
        msg.set_content("Hello there.\n")
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def sign(raw: bytes, private: bytes, headers=None) -> bytes:
    return dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), private, canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=headers) + raw


@pytest.fixture
def config(keys) -> CheckConfig:
    cfg = CheckConfig()
    cfg.add_dkim_key(DOMAIN, SELECTOR, keys[1])
    return cfg


def check(raw: bytes, config: CheckConfig) -> Checks:
    return Checks(Message(raw), config)


# -- DKIM -------------------------------------------------------------------------------------------


def test_dkim_passes_a_signed_message(keys, config):
    result = check(sign(build(), keys[0]), config).dkim()
    assert result.verdict == PASSED, result.describe()
    assert "valid over h=" in result.details[0] and "from" in result.details[0]


def test_dkim_names_a_body_changed_after_signing(keys, config):
    signed = sign(build(), keys[0])
    tampered = signed.replace(b"Hello there.", b"Hello world.")
    assert tampered != signed
    result = check(tampered, config).dkim()
    assert result.verdict == FAILED
    assert "body hash mismatch: the body was changed after signing" in result.summary


def test_dkim_names_a_signed_header_changed_after_signing(keys, config):
    tampered = sign(build(), keys[0]).replace(b"Subject: Your receipt", b"Subject: Your refund")
    result = check(tampered, config).dkim()
    assert result.verdict == FAILED
    assert "signature/header mismatch" in result.summary and "subject" in result.summary


def test_dkim_names_a_missing_key(keys):
    result = check(sign(build(), keys[0]), CheckConfig()).dkim()
    assert result.verdict == FAILED
    assert f"missing key: no public key for {SELECTOR}._domainkey.{DOMAIN}" in result.summary
    assert "add_dkim_key" in result.summary


def test_dkim_with_another_key_fails(keys):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cfg = CheckConfig()
    cfg.add_dkim_key(DOMAIN, SELECTOR, other)
    result = check(sign(build(), keys[0]), cfg).dkim()
    assert result.verdict == FAILED and "signature/header mismatch" in result.summary


def test_dkim_fails_an_unsigned_message(config):
    result = check(build(), config).dkim()
    assert result.verdict == FAILED and "not signed" in result.summary


# -- structure --------------------------------------------------------------------------------------


def test_structure_passes_a_well_formed_message(config):
    result = check(build(), config).structure()
    assert result.verdict == PASSED, result.describe()
    assert "link not fetched (host not under test): https://elsewhere.test/x" in result.details


def test_structure_lists_every_problem(config):
    html = ("<p>Hi</p><img src='http://tracker.test/p.gif'>" + "<p>padding</p>" * 9000)
    raw = build(html, text=False)
    raw = raw.replace(b"Message-ID: <", b"Message-ID: no-angle-")
    result = check(raw, config).structure()
    assert result.verdict == FAILED
    found = "\n".join(result.details)
    for needle in ("is not <left@right>", "HTML without a text/plain alternative", "Gmail will show",
                   "has no alt attribute", "remote image over plain http: http://tracker.test/p.gif"):
        assert needle in found, found


# -- unsubscribe ------------------------------------------------------------------------------------


def test_unsubscribe_is_skipped_on_transactional_mail(config):
    assert check(build(), config).unsubscribe().verdict == SKIPPED


def test_unsubscribe_needs_one_click_and_dkim_coverage(keys, config):
    raw = build(headers={"List-Unsubscribe": "<https://elsewhere.test/u?t=1>", "List-Id": "news <n.shop.test>"})
    result = check(raw, config).unsubscribe()
    assert result.verdict == FAILED
    found = "\n".join(result.details)
    assert "no List-Unsubscribe-Post: List-Unsubscribe=One-Click" in found
    assert "no DKIM signature covers" in found
    assert "listed, not requested: https://elsewhere.test/u?t=1" in found  # never fetched


def test_unsubscribe_passes_signed_one_click_headers_without_posting_elsewhere(keys, config):
    unsigned = build(headers={"List-Unsubscribe": "<https://elsewhere.test/u?t=1>, <mailto:u@shop.test>",
                              "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    # dkimpy's default header list (DKIM.SHOULD) leaves List-Unsubscribe-Post out: caught.
    result = check(sign(unsigned, keys[0]), config).unsubscribe()
    assert result.verdict == FAILED
    assert "the DKIM signature does not cover ['list-unsubscribe-post']" in result.summary
    headers = [b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe", b"list-unsubscribe-post"]
    result = check(sign(unsigned, keys[0], headers), config).unsubscribe()
    assert result.verdict == PASSED, result.describe()
    assert "listed, not requested: https://elsewhere.test/u?t=1" in result.details


# -- clients ----------------------------------------------------------------------------------------


def test_clients_warns_about_unsupported_features(config):
    html = ("<style>@media (max-width: 600px) { p { display: grid } }</style>"
            "<div style='position: absolute; border-radius: 4px'>x</div><svg></svg>")
    result = check(build(html), config).clients()
    assert result.verdict == WARNING
    found = "\n".join(result.details)
    for feature in ("css-at-media", "css-display-grid", "css-position", "css-border-radius", "html-svg"):
        assert feature in found, found
    assert "css-display-flex" not in found


def test_clients_passes_plain_html(config):
    assert check(build("<p>Plain <b>table</b> layout</p>"), config).clients().verdict == PASSED


# -- the assertion ----------------------------------------------------------------------------------


def test_assert_deliverable_lists_every_failing_check(config):
    raw = build("<img src='http://tracker.test/p.gif'>")
    with pytest.raises(NotDeliverable) as caught:
        assert_deliverable(Message(raw), skip=["spam"], config=config)
    text = str(caught.value)
    assert "2 of 4 deliverability checks failed" in text
    assert "dkim: FAILED" in text and "structure: FAILED" in text and "remote image over plain http" in text
    assert {r.name for r in caught.value.results} == {"dkim", "unsubscribe", "structure", "clients"}


def test_message_checks_is_lazy_and_uses_the_shared_config():
    from mailproof.checks import config as shared

    msg = Message(build())
    assert msg.checks.config is shared and msg.checks is msg.checks


def test_unknown_check_names_are_refused(config):
    with pytest.raises(ValueError, match="unknown checks"):
        check(build(), config).all(only=["dkmi"])


def test_checks_never_raise_on_the_hostile_corpora_and_fetch_nothing(monkeypatch):
    """Every message of tests/mime_corpus and every page of tests/hostile_html gets a verdict; with no
    host under test not one request is sent (requests' Session.request would record it)."""
    from pathlib import Path

    import requests

    sent = []
    monkeypatch.setattr(requests.Session, "request", lambda self, *a, **k: sent.append(a) or None)
    here = Path(__file__).parent
    messages = [p.read_bytes() for p in sorted((here / "mime_corpus").glob("*.eml"))]
    for page in sorted((here / "hostile_html").glob("*.html")):
        messages.append(build(page.read_text(encoding="utf-8", errors="replace")))
    assert len(messages) > 100
    cfg = CheckConfig()
    for raw in messages:
        results = Checks(Message(raw), cfg).all(skip=["spam"])
        assert [r.name for r in results] == ["dkim", "unsubscribe", "structure", "clients"]
    assert sent == []
