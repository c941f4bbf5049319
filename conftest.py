"""Wiring only: start the fakes and the demo application, and point the harness at them.

The demo app stands for someone else's product: it is started as its own process and reached
only over HTTP and SMTP. Pass --app-url to test an application that is already running.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fakes.validation_api import ValidationApi
from mailproof import AppProcess

ROOT = Path(__file__).parent


@pytest.fixture(scope="session")
def validation_api():
    """The fake email-validation API the demo app calls at signup."""
    with ValidationApi() as api:
        yield api


@pytest.fixture
def validation_faults(validation_api):
    """Faults of the validation API for this test only: ``validation_faults.set(rate_limit=5)``.

    Starts healthy and is cleared when the test ends, pass or fail (an outage ends, counters reset).
    ``validation_faults.fired`` says what fired. Each xdist worker has its own validation API.
    """
    validation_api.faults.clear()
    yield validation_api.faults
    validation_api.faults.clear()


DKIM_DOMAIN, DKIM_SELECTOR = "demo-shop.test", "mailproof"  # the demo's default From domain


@pytest.fixture(scope="session")
def dkim_key_file(tmp_path_factory, mailproof_checks) -> Path:
    """A DKIM key pair made for this session: the private key in a file for the demo app, the
    public key in the checks' key table (as DNS would publish it at mailproof._domainkey.demo-shop.test)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "demo-shop.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    mailproof_checks.add_dkim_key(DKIM_DOMAIN, DKIM_SELECTOR, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="session")
def demo_app(mailproof_backend, validation_api, dkim_key_file, mailproof_transport, mailproof_providers):
    """The demo application, sending through the capture backend (one per xdist worker), over
    SMTP or the provider API of ``--transport`` (a provider's event webhooks go back to it),
    signing its SMTP mail with the session's DKIM key."""
    command = [
        sys.executable, "-m", "demo_app", "--port", "0",
        "--smtp-host", mailproof_backend.smtp_host, "--smtp-port", str(mailproof_backend.smtp_port),
        "--validation-url", validation_api.url, "--transport", mailproof_transport.name,
        "--dkim-key", str(dkim_key_file), "--dkim-selector", DKIM_SELECTOR,
    ]
    if mailproof_providers is not None:
        t = mailproof_transport
        command += ["--provider-url", t.url, "--provider-key", t.key, "--provider-region", t.region]
        command += ["--provider-secret", t.secret] if t.secret else []
        command += ["--webhook-key", t.webhook_key] if t.webhook_key else []
    with AppProcess(command, cwd=str(ROOT), name="demo application") as app:
        if mailproof_providers is not None:
            mailproof_providers.send_webhooks_to(mailproof_transport.name, f"{app.url}/webhooks/{mailproof_transport.name}")
        yield app


@pytest.fixture(scope="session")
def mailproof_app_url(mailproof_settings, request) -> str:
    if mailproof_settings.app_url:
        return mailproof_settings.app_url
    return request.getfixturevalue("demo_app").url
