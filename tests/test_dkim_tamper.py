"""A body changed after signing fails the DKIM check, and the check says why.

The demo app signs its receipt; a sink fault (``Tamper``, stage data) rewrites a word of the
body before the sink stores it, as a rewriting relay would. The headers are untouched, so the
failure must be the body hash, named as such.
"""

from __future__ import annotations

import pytest

from flows import slo
from flows.orders import DEFAULT_LINES
from mailproof import flow
from mailproof.checks import FAILED, PASSED, NotDeliverable, assert_deliverable
from mailproof.faults import FaultError, Tamper, rule_from_spec, rule_to_spec


@flow(feature="Deliverability", story="A body changed after signing fails DKIM", severity="critical")
def tampered_receipt_fails_dkim(flow, faults):
    address = flow.mailbox.address("tamper")
    rule = faults.rule("data", Tamper("Thank you for your order", "Thank you for your 0rder"), to=address)
    with flow.step("Place an order"):
        response = flow.http.post("/orders", json={"email": address, "lines": list(DEFAULT_LINES)})
        assert response.status_code == 201, response.text
    with flow.step("The receipt arrives, its body changed on the way"):
        msg = flow.mailbox.wait_for(to=address, subject=response.json()["order_id"], within=slo.TRANSACTIONAL)
        assert "Thank you for your 0rder" in msg.text and (rule.fired, rule.acted) == (1, 1)
    with flow.step("DKIM fails on the body hash"):
        result = msg.checks.dkim()
        assert result.verdict == FAILED, result.describe()
        assert "body hash mismatch: the body was changed after signing" in result.summary, result.summary
        assert "d=demo-shop.test, s=mailproof" in result.summary
    with flow.step("The assertion lists it"):
        with pytest.raises(NotDeliverable) as caught:
            assert_deliverable(msg, only=["dkim", "structure"])
        assert "1 of 2 deliverability checks failed" in str(caught.value)
        assert "dkim: FAILED: signature 1 (d=demo-shop.test, s=mailproof): body hash mismatch" in str(caught.value)
    return msg


def test_a_body_tampered_after_signing_fails_dkim_with_its_reason(run_flow, sink_faults):
    run_flow(tampered_receipt_fails_dkim, faults=sink_faults)


def test_the_untampered_receipt_passes_dkim(run_flow):
    """The same receipt without the fault: the failure above is the tampering's, not the signer's."""
    @flow(feature="Deliverability", story="The receipt's DKIM signature verifies")
    def untampered(flow):
        address = flow.mailbox.address("untampered")
        response = flow.http.post("/orders", json={"email": address, "lines": list(DEFAULT_LINES)})
        msg = flow.mailbox.wait_for(to=address, subject=response.json()["order_id"], within=slo.TRANSACTIONAL)
        assert msg.checks.dkim().verdict == PASSED

    run_flow(untampered)


def test_tamper_is_a_data_stage_fault_with_a_json_form():
    with pytest.raises(FaultError, match="'data' stage only"):
        rule_from_spec({"stage": "rcpt", "action": {"tamper": {"find": "a", "replace": "b"}}})
    rule = rule_from_spec({"stage": "data", "action": {"tamper": {"find": "a", "replace": "b", "count": 2}}})
    assert rule.action == Tamper("a", "b", 2)
    assert rule_to_spec(rule)["action"] == {"tamper": {"find": "a", "replace": "b", "count": 2}}
    with pytest.raises(FaultError, match="non-empty"):
        Tamper("", "b")
