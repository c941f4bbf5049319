"""Wiring only: start Flask Shop as its own process, sending to the harness's capture sink.

This is all a project needs to put its own application under mailproof: point the app's SMTP
settings at ``mailproof_backend`` and override the ``mailproof_app_url`` fixture to start it.
Pass --app-url to test a Flask Shop that is already running instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mailproof import AppProcess, MailproofError
from mailproof.net import free_port

APP = Path(__file__).parent / "app.py"
START_ATTEMPTS = 3  # free_port() can lose its port to another process before the app binds it


@pytest.fixture(scope="session")
def flask_shop(mailproof_backend):
    """The Flask Shop app, one per test session (one per xdist worker, beside its own sink)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        app = AppProcess(
            [sys.executable, str(APP)],
            env={
                "MAILPROOF_SMTP_HOST": mailproof_backend.smtp_host,
                "MAILPROOF_SMTP_PORT": str(mailproof_backend.smtp_port),
                "HOST": "127.0.0.1",
                "PORT": str(free_port()),
            },
            # Werkzeug's own startup line: " * Running on http://127.0.0.1:PORT" (the app logs to stdout).
            ready_pattern=r"Running on (http://\S+)",
            name="Flask Shop application",
        )
        try:
            app.start()
        except MailproofError as exc:
            if "Address already in use" in str(exc) and attempt < START_ATTEMPTS:
                continue
            raise
        break
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def mailproof_app_url(mailproof_settings, request) -> str:
    if mailproof_settings.app_url:
        return mailproof_settings.app_url
    return request.getfixturevalue("flask_shop").url
