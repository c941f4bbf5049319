"""The flows' HTTP session against an application that is not there, or never answers.

A black-holed app must cost the flow HTTP timeout, not requests' default of forever, and both
failures must say which setting gave the URL or the timeout, so the reader fixes the setting
instead of suspecting the product.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests

from mailproof.errors import MailproofError
from mailproof.http import AppSession, AppTimeout, AppUnreachable
from mailproof.net import free_port
from mailproof.report.allure_hooks import APPLICATION_ERROR, classify


@pytest.fixture
def black_hole():
    """A listening socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_an_app_that_never_answers_costs_the_timeout_and_names_the_setting(black_hole):
    session = AppSession(black_hole, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(AppTimeout) as failed:
        session.post("/signup", json={"email": "a@example.test"})
    assert time.monotonic() - started < 5
    text = str(failed.value)
    assert "POST " + black_hole + "/signup" in text and "0.3 s" in text
    assert "mailproof_http_timeout" in text and "--app-url" in text
    # Still what requests raises, for flows that catch it; QA's report files it under the application.
    assert isinstance(failed.value, requests.Timeout) and not isinstance(failed.value, MailproofError)
    assert classify(failed.value) == APPLICATION_ERROR


def test_a_per_call_timeout_wins(black_hole):
    with pytest.raises(AppTimeout, match="within 0.2 s"):
        AppSession(black_hole, timeout=30).get("/status", timeout=0.2)


def test_an_app_that_is_not_running_is_named_with_its_setting():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AppUnreachable) as failed:
        AppSession(url, url_setting="MAILPROOF_APP_URL").get("/health")
    text = str(failed.value)
    assert url in text and "MAILPROOF_APP_URL" in text and "refused" in text.lower()
    assert isinstance(failed.value, requests.ConnectionError)


def test_expect_is_accepted_and_stripped_in_pytest(black_hole):
    # expect= is for Locust's statistics; the plain session must not pass it on to requests.
    with pytest.raises(AppTimeout):
        AppSession(black_hole, timeout=0.2).post("/password/reset", json={}, expect=(400, 422))
