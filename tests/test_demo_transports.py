"""The demo app's provider transports and webhook checks, against the provider capture."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import requests

from demo_app.transports import Permanent, Transient, http_error
from fakes.validation_api import ValidationApi
from mailproof import AppProcess
from mailproof.providers import PROVIDERS, Event

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("status", "kind"), [(429, Transient), (500, Transient), (503, Transient),
                                              (400, Permanent), (401, Permanent), (403, Permanent),
                                              (422, Permanent)])
def test_http_errors_are_transient_only_for_429_and_5xx(status, kind):
    err = http_error(status, "body")
    assert type(err) is kind and err.code == status


@pytest.fixture(scope="module")
def validation():
    with ValidationApi() as api:
        yield api


@pytest.fixture(scope="module", params=PROVIDERS)
def app(request, capture, validation):
    name = request.param
    keys = capture.keys
    key = {"sendgrid": keys.sendgrid, "mailgun": keys.mailgun, "ses": keys.ses_access_key, "postmark": keys.postmark}
    command = [sys.executable, "-m", "demo_app", "--port", "0", "--validation-url", validation.url,
               "--transport", name, "--provider-url", capture.url, "--provider-key", key[name],
               "--provider-secret", keys.ses_secret_key, "--webhook-key", capture.webhook_key(name) or "-"]
    with AppProcess(command, cwd=str(ROOT), name=f"demo app on {name}") as running:
        capture.send_webhooks_to(name, f"{running.url}/webhooks/{name}")
        running.provider = name
        yield running


def suppressions(app) -> int:
    return requests.get(f"{app.url}/metrics", timeout=10).json()["webhook_suppressions"]


def signed(capture, app, recipient: str) -> tuple[dict, bytes]:
    provider = capture.providers[app.provider]
    event = Event(kind="bounce", provider=app.provider, recipient=recipient, message_id="m-1",
                  sender="shop@example.test", subject="s", bounce_type="Permanent" if app.provider == "ses" else None,
                  reason="550 5.1.1 no such user")
    target = capture.webhooks.targets[app.provider]
    headers, body = provider.webhook(event, target)
    if target.user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{target.user}:{target.password}".encode()).decode()
    return headers, body


def tampered(provider: str, headers: dict, body: bytes) -> tuple[dict, bytes]:
    """The same webhook with its recipient changed after signing (or, Postmark, a wrong password)."""
    if provider == "postmark":
        return {**headers, "Authorization": "Basic " + base64.b64encode(b"hook:guess").decode()}, body
    if provider == "mailgun":  # its HMAC covers timestamp + token only, not the event (docs/traps.md)
        payload = json.loads(body)
        payload["signature"]["signature"] = "0" * 64
        return headers, json.dumps(payload).encode()
    if provider == "ses":
        envelope = json.loads(body)
        envelope["Message"] = envelope["Message"].replace("victim@", "other@")
        return headers, json.dumps(envelope).encode()
    return headers, body.replace(b"victim@", b"other@")


def test_a_webhook_altered_after_signing_changes_nothing(app, capture):
    headers, body = signed(capture, app, "victim@example.test")
    before = suppressions(app)
    headers, body = tampered(app.provider, headers, body)
    answer = requests.post(f"{app.url}/webhooks/{app.provider}", data=body, headers=headers, timeout=10)
    assert answer.status_code in (401, 403), answer.text
    assert suppressions(app) == before


def test_a_genuine_bounce_webhook_suppresses(app, capture):
    headers, body = signed(capture, app, "victim@example.test")
    before = suppressions(app)
    answer = requests.post(f"{app.url}/webhooks/{app.provider}", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert suppressions(app) == before + 1


@pytest.mark.parametrize("app", ["mailgun"], indirect=True)
def test_a_replayed_mailgun_webhook_is_refused(app, capture):
    """Mailgun signs only timestamp + token: a receiver must refuse a token it has seen."""
    headers, body = signed(capture, app, "victim@example.test")
    first = requests.post(f"{app.url}/webhooks/mailgun", data=body, headers=headers, timeout=10)
    again = requests.post(f"{app.url}/webhooks/mailgun", data=body, headers=headers, timeout=10)
    assert (first.status_code, again.status_code) == (200, 403)


@pytest.mark.parametrize("app", ["ses"], indirect=True)
def test_a_certificate_from_elsewhere_is_not_trusted(app, capture):
    headers, body = signed(capture, app, "victim@example.test")
    envelope = json.loads(body)
    envelope["SigningCertURL"] = "http://127.0.0.1:1/evil.pem"
    answer = requests.post(f"{app.url}/webhooks/ses", data=json.dumps(envelope), headers=headers, timeout=10)
    assert answer.status_code == 403


def test_a_wrong_api_key_is_a_bounce_not_a_retry(app, capture):
    """The app's key refused (401, or SES's 403): permanent; recorded once at /bounces."""
    to = f"key-{app.provider}@example.test"
    rule = capture.faults.rule(app.provider, status=401, to=to)
    try:
        assert requests.post(f"{app.url}/orders", json={"email": to, "lines": [
            {"sku": "A", "name": "A", "qty": 1, "unit_price": "1.00"}]}, timeout=10).status_code == 201
        assert requests.get(f"{app.url}/outbox/wait-idle", params={"timeout": 10}, timeout=15).json()["idle"]
        (bounce,) = [b for b in requests.get(f"{app.url}/bounces", timeout=10).json() if b["to"] == to]
        assert bounce["code"] in (401, 403) and rule.fired == 1
    finally:
        capture.faults.clear()


def send_one(cfg) -> None:
    """One message through the demo app's transport for ``cfg`` (the transport closed after)."""
    import asyncio
    from email.message import EmailMessage

    from demo_app import transports

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "shop@example.test", "ann@example.test", "s"
    msg.set_content("t")

    async def send() -> None:
        transport = transports.make(cfg)
        try:
            # The outer bound only keeps a broken client from hanging the test; it is well above
            # the timeouts the tests give (at most 5 s).
            await asyncio.wait_for(transport.send(msg, "shop@example.test", "ann@example.test"), 10)
        finally:
            await transport.close()

    asyncio.run(send())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_unreachable_provider_is_transient_for_every_client(provider):
    """A refused connection must be retried, whatever each client wraps it in."""
    from demo_app import config
    from mailproof.net import free_port

    cfg = config.load(["--transport", provider, "--provider-url", f"http://127.0.0.1:{free_port()}",
                       "--provider-key", "k", "--provider-secret", "s", "--smtp-timeout", "5"], environ={})
    with pytest.raises(Transient) as failed:
        send_one(cfg)
    assert type(failed.value) is Transient and failed.value.code is None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_provider_that_never_answers_times_out_as_transient(provider):
    """Each client is given the app's timeout: a hung provider is retried later, not waited on for ever."""
    import socket

    from demo_app import config

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = config.load(["--transport", provider, "--provider-url", f"http://127.0.0.1:{silent.getsockname()[1]}",
                           "--provider-key", "k", "--provider-secret", "s", "--smtp-timeout", "0.5"], environ={})
        with pytest.raises(Transient) as failed:
            send_one(cfg)
        assert type(failed.value) is Transient
