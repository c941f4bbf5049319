"""The deliverability flows check the app's own DKIM signature: its SMTP path only (through a
provider's API the provider signs), so they are deselected on provider transports."""

import pytest

from flows import deliverability

pytestmark = pytest.mark.smtp_transport


def test_signup_confirmation_is_deliverable(run_flow):
    run_flow(deliverability.signup_confirmation_is_deliverable)


def test_receipt_is_deliverable(run_flow):
    results = run_flow(deliverability.receipt_is_deliverable)
    assert [r.name for r in results] == ["dkim", "unsubscribe", "structure", "spam", "clients"]


def test_newsletter_is_deliverable_and_one_click_unsubscribes(run_flow):
    run_flow(deliverability.newsletter_is_deliverable)
