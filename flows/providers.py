"""Provider transports: the app's send path through a provider's HTTP API, and what comes back.

These flows run on ``--transport sendgrid|mailgun|ses|postmark`` (the ``provider_faults`` fixture
deselects them on smtp). ``faults`` has ``rule(provider=None, **options)``
(``mailproof.providers.faults``); ``providers`` is the running ``ProviderCapture``, whose
``webhooks.wait`` returns once the app has answered a webhook: no sleeping before checking what
the app did with it.
"""

from __future__ import annotations

from flows import slo
from flows.app import outbox_drained
from flows.resilience import CONFIRM_SUBJECT, app_bounces, app_metrics, app_user, grew
from mailproof import flow


@flow(feature="Providers", story="A bounce webhook suppresses the address", severity="critical")
def bounced_address_is_suppressed(flow, faults, providers):
    """The provider accepts the confirmation, then reports a hard bounce in its signed webhook.
    The app marks the address undeliverable and sends it nothing more: a later password reset
    is recorded as a bounce without a send attempt, and no mail arrives."""
    address = flow.mailbox.address("bounces")
    faults.rule(event="bounce", to=address)
    with flow.step("Sign up: the provider accepts the confirmation"):
        response = flow.http.post("/signup", json={"email": address})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
        outbox_drained(flow)
    with flow.step("The signed bounce webhook is accepted by the app"):
        record = providers.webhooks.wait("bounce", address, timeout=slo.TRANSACTIONAL)
        assert record.acknowledged, f"the app answered the bounce webhook with {record.status}: {record.body!r}"
        assert app_user(flow, address).get("suppressed"), app_user(flow, address)
    with flow.step("Nothing more is sent to the bounced address"):
        before = app_metrics(flow)
        assert flow.http.client.post("/password-reset", json={"email": address}).status_code == 202
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
        (bounce,) = app_bounces(flow, address)
        assert bounce["message"].startswith("suppressed:"), bounce
        assert grew(before, app_metrics(flow)).get("emails_sent", 0) == 0


@flow(feature="Providers", story="A rate-limited provider: the mail arrives once, later", severity="critical")
def rate_limited_confirmation_arrives_once(flow, faults, transport: str, refusals: int = 2):
    """The provider answers 429 (with its rate-limit headers) twice; the app retries and the
    confirmation arrives exactly once, through the provider's API."""
    address = flow.mailbox.address("throttled")
    rule = faults.rule(status=429, to=address, times=refusals)
    with flow.step("Sign up"):
        before = app_metrics(flow)
        assert flow.http.post("/signup", json={"email": address}).status_code == 202
    with flow.step("The confirmation arrives once, sent through the provider"):
        msg = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
        assert msg.source == transport, f"captured from {msg.source}, not {transport}"
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
        changed = grew(before, app_metrics(flow))
        assert rule.fired == refusals and changed.get("transient_failures") == refusals, changed
    return msg


@flow(feature="Providers", story="A provider's validation error is a bounce, not a retry", severity="normal")
def rejected_by_provider_is_bounced(flow, faults):
    """The provider refuses the request with a validation error (its own error body): permanent,
    recorded at /bounces after one attempt, and no mail arrives."""
    address = flow.mailbox.address("invalid")
    faults.rule(status=400, message="The to address is not valid", to=address)
    with flow.step("Sign up"):
        assert flow.http.post("/signup", json={"email": address}).status_code == 202
        outbox_drained(flow)
    with flow.step("No mail, one bounce with the provider's message"):
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
        (bounce,) = app_bounces(flow, address)
        assert "The to address is not valid" in bounce["message"] and bounce["code"] in (400, 422), bounce


@flow(feature="Providers", story="A slow provider API: the wait includes it", severity="normal")
def slow_provider_counts_in_latency(flow, faults, delay: float = 0.5):
    """The provider takes ``delay`` seconds to answer; the confirmation still arrives once, and
    its latency (trigger to acceptance by the provider) is at least the delay."""
    address = flow.mailbox.address("slow")
    rule = faults.rule(delay=delay, to=address)
    with flow.step("Sign up"):
        assert flow.http.post("/signup", json={"email": address}).status_code == 202
    with flow.step(f"The confirmation arrives, {delay} s later at least"):
        msg = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
        assert msg.latency >= delay, f"latency {msg.latency:.3f} s is below the provider's {delay} s delay"
        assert rule.fired == 1
    return msg
