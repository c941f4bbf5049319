"""Provider transports (run with --transport sendgrid|mailgun|ses|postmark; deselected on smtp)."""

from flows import providers


def test_bounce_webhook_suppresses_the_address(run_flow, provider_faults, mailproof_providers):
    run_flow(providers.bounced_address_is_suppressed, faults=provider_faults, providers=mailproof_providers)


def test_rate_limited_confirmation_arrives_once(run_flow, provider_faults, mailproof_transport):
    run_flow(providers.rate_limited_confirmation_arrives_once, faults=provider_faults,
             transport=mailproof_transport.name)


def test_provider_validation_error_is_a_bounce(run_flow, provider_faults):
    run_flow(providers.rejected_by_provider_is_bounced, faults=provider_faults)


def test_slow_provider_counts_in_latency(run_flow, provider_faults):
    run_flow(providers.slow_provider_counts_in_latency, faults=provider_faults)
