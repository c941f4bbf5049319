"""Each provider's error answers and event webhooks, in its own format (every status, every event)."""

from __future__ import annotations

import json

import pytest

from mailproof.mailbox import MailStore
from mailproof.providers import PROVIDERS, Event, ProviderCapture, ProviderFault, ProviderFaultError
from mailproof.providers.webhooks import WebhookError, WebhookTarget


@pytest.fixture(scope="module")
def capture():
    return ProviderCapture(MailStore())  # not started: formats only


def body_of(response) -> dict:
    return json.loads(response.body) if response.content_type == "application/json" else {"text": response.text}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [400, 401, 403, 429, 500, 503])
def test_errors_carry_the_providers_format(capture, provider, status):
    response = capture.providers[provider].error(status, retry_after=7)
    body = body_of(response)
    expected_status = {("ses", 401): 403, ("postmark", 400): 422}.get((provider, status), status)
    assert response.status == expected_status
    if provider == "sendgrid":
        assert body["errors"][0]["message"]
    elif provider == "mailgun":
        assert body.get("message") or body["text"] == "Forbidden"
    elif provider == "ses":
        assert response.headers["x-amzn-ErrorType"].rstrip(":") and body["message"]
    else:
        assert body["ErrorCode"] and body["Message"]
    if status == 429:
        limit_headers = {"sendgrid": "X-RateLimit-Reset", "mailgun": "Retry-After", "ses": "Retry-After",
                         "postmark": "Retry-After"}[provider]
        assert limit_headers in response.headers


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["delivered", "bounce", "complaint", "open", "click"])
def test_every_event_kind_names_the_recipient_in_the_providers_words(capture, provider, kind):
    event = Event(kind=kind, provider=provider, recipient="ann@example.test", message_id="m-1",
                  sender="shop@example.test", subject="s", url="http://127.0.0.1/x" if kind == "click" else None)
    headers, body = capture.providers[provider].webhook(event, WebhookTarget("http://127.0.0.1/", secret="k"))
    payload = json.loads(body)
    if provider == "sendgrid":
        (record,) = payload
        assert record["email"] == "ann@example.test"
        assert record["event"] == {"complaint": "spamreport"}.get(kind, kind)
        assert "X-Twilio-Email-Event-Webhook-Signature" in headers
    elif provider == "mailgun":
        data = payload["event-data"]
        assert data["recipient"] == "ann@example.test" and payload["signature"]["signature"]
        assert data["event"] == {"bounce": "failed", "complaint": "complained", "open": "opened",
                                 "click": "clicked"}.get(kind, kind)
    elif provider == "ses":
        record = json.loads(payload["Message"])
        assert payload["Type"] == "Notification" and payload["Signature"]
        assert record["eventType"] == {"delivered": "Delivery", "bounce": "Bounce", "complaint": "Complaint",
                                       "open": "Open", "click": "Click"}[kind]
        assert record["mail"]["destination"] == ["ann@example.test"]
    else:
        assert payload["RecordType"] == {"delivered": "Delivery", "bounce": "Bounce", "complaint": "SpamComplaint",
                                         "open": "Open", "click": "Click"}[kind]
        assert payload.get("Recipient", payload.get("Email")) == "ann@example.test"


@pytest.mark.parametrize("options, why", [
    ({"provider": "sparkpost", "status": 500}, "unknown provider"),
    ({"status": 200}, "not an error"),
    ({"event": "bounce", "status": 500}, "not both"),
    ({}, "needs status=, event= or delay="),
    ({"status": 500, "to_pattern": "("}, "not a valid regular expression"),
])
def test_unusable_fault_rules_say_why(options, why):
    with pytest.raises(ProviderFaultError, match=why):
        ProviderFault(**options)


def test_webhooks_go_to_loopback_only(capture):
    with pytest.raises(WebhookError, match="not on loopback"):
        capture.webhooks.target("mailgun", "https://hooks.example.com/mailgun")


def test_provider_chaos_fires_on_a_seeded_share_of_requests():
    from mailproof.providers import ProviderFaultPlan
    from mailproof.providers.faults import parse_provider_chaos

    def fired(seed: int) -> list[int]:
        plan = ProviderFaultPlan(seed=seed)
        for rule in parse_provider_chaos("30%:429,10%:delay=0.5"):
            plan.add(rule)
        return [i for i in range(200) if any(r.status == 429 for r in plan.take("ses", [f"u{i}@x.test"]))]

    first = fired(7)
    assert first == fired(7) and first != fired(8)  # the seed decides which requests
    assert 30 <= len(first) <= 90  # about 30 % of 200 (binomial: far inside these bounds for seed 7)


@pytest.mark.parametrize("text", ["5:429", "5%:teapot", "5%", "150%:429"])
def test_bad_provider_chaos_says_how_to_write_it(text):
    from mailproof.providers.faults import parse_provider_chaos

    with pytest.raises(ProviderFaultError):
        parse_provider_chaos(text)
