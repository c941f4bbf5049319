"""The checks that talk to the application, against the real demo app: only its host is
requested, a broken link and a refused one-click POST fail with what the app answered."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone

import pytest

from mailproof import Message
from mailproof.checks import FAILED, CheckConfig, Checks


@pytest.fixture
def config(demo_app) -> CheckConfig:
    cfg = CheckConfig(http_timeout=5)
    cfg.add_app_url(demo_app.url)
    return cfg


def email(html: str, headers: dict | None = None) -> Message:
    msg = EmailMessage()
    msg["From"] = "Demo Shop <no-reply@demo-shop.test>"
    msg["To"] = "qa@mailproof.test"
    msg["Subject"] = "Links"
    msg["Date"] = format_datetime(datetime.now(timezone.utc))
    msg["Message-ID"] = make_msgid(domain="demo-shop.test")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("See the links.\n")
    msg.add_alternative(html, subtype="html")
    return Message(msg.as_bytes())


def test_links_to_the_app_are_requested_and_a_broken_one_fails(config, demo_app):
    msg = email(f'<a href="{demo_app.url}/">home</a> <a href="{demo_app.url}/no-such-page">gone</a> '
                '<a href="https://elsewhere.test/promo">promo</a>')
    result = Checks(msg, config).structure()
    assert result.verdict == FAILED
    assert result.summary == f"link {demo_app.url}/no-such-page answered 404"
    assert f"link {demo_app.url}/ -> 200" in result.details
    assert "link not fetched (host not under test): https://elsewhere.test/promo" in result.details


def test_a_refused_one_click_post_fails_with_the_apps_answer(config, demo_app):
    headers = {"List-Unsubscribe": f"<{demo_app.url}/unsubscribe?token=forged>",
               "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    result = Checks(email("<p>news</p>", headers), config).unsubscribe()
    assert result.verdict == FAILED
    found = "\n".join(result.details)
    assert f"one-click POST {demo_app.url}/unsubscribe?token=forged answered 404, not 2xx" in found
    assert "no HTTPS URI (RFC 8058 requires one); accepted because" in found  # http, but the host is under test


def test_post_false_sends_nothing_and_the_host_under_test_decides(config, demo_app):
    headers = {"List-Unsubscribe": f"<{demo_app.url}/unsubscribe?token=forged>",
               "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    msg = email("<p>news</p>", headers)
    result = Checks(msg, config).unsubscribe(post=False)
    assert not any("one-click POST" in d for d in result.details)
    # The same http URI on a host that is not under test is a failure, and is not requested.
    result = Checks(msg, CheckConfig()).unsubscribe()
    assert result.verdict == FAILED and "no HTTPS URI in List-Unsubscribe" in "\n".join(result.details)
    assert f"listed, not requested: {demo_app.url}/unsubscribe?token=forged" in result.details
