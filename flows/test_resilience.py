from flows import resilience

# 30 signups through a relay that takes 5 recipients a second (451 past that): about 6 s. The limit
# sits far below what the app offers even on a loaded machine (the demo peaks at 100 to 130 sends a
# second inside pytest; 200 signups took 7.5 s, about 26 a second, with both cores busy): at 50/s
# the throttle sometimes never bit and the test failed for the machine's speed, not the app's.
# benchmarks/burst_under_throttle.py runs the same flow at larger sizes and prints the numbers.
BURST_SIGNUPS, BURST_RATE = 30, 5.0


def test_greylisted_confirmation_arrives_once_later(run_flow, sink_faults):
    run_flow(resilience.greylisted_confirmation_arrives_once, faults=sink_faults, refusals=2)


def test_rejected_recipient_is_bounced_and_no_mail_arrives(run_flow, sink_faults):
    run_flow(resilience.rejected_recipient_is_bounced, faults=sink_faults)


def test_lost_reply_after_data_is_reported_as_one_duplicate(run_flow, sink_faults):
    report = run_flow(resilience.lost_reply_after_data_is_reported_as_duplicate, faults=sink_faults)
    assert report["copies"] == 2


def test_burst_under_throttle_every_mail_arrives_exactly_once(run_flow, sink_faults):
    numbers = run_flow(resilience.burst_under_throttle, faults=sink_faults, signups=BURST_SIGNUPS,
                       per_second=BURST_RATE, within=30.0)
    assert numbers["rate_limited"] > 0 and numbers["retries"] == numbers["rate_limited"], numbers
    assert numbers["send_attempts"] == BURST_SIGNUPS + numbers["retries"], numbers
    # The relay's limit holds: N mails at R per second need at least N/R - 1 s after the first.
    assert numbers["total_seconds"] >= BURST_SIGNUPS / BURST_RATE - 1, numbers


def test_signups_ride_out_validation_throttling(run_flow, validation_faults):
    run_flow(resilience.signups_ride_out_validation_throttling, validation=validation_faults)


def test_signup_during_validation_outage_degrades_as_documented(run_flow, validation_faults):
    run_flow(resilience.signup_during_validation_outage, validation=validation_faults)
