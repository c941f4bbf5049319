"""Deliverability: every kind of email the shop sends passes the checks (mailproof.checks).

DKIM against the session's key (the demo app signs with it), structure and links, a real
SpamAssassin score, client support (warnings allowed), and for the newsletter the RFC 8058
one-click unsubscribe, POSTed to the app. The checks run after the flow has used the email's
links: a link check requests every link to the app (HEAD), which would use a confirmation first.
"""

from __future__ import annotations

from decimal import Decimal

from flows import slo
from flows.orders import DEFAULT_LINES
from mailproof import flow
from mailproof.checks import assert_deliverable


def _deliverable(flow, msg) -> list:
    with flow.step(f"Deliverability checks of {msg.subject!r}"):
        results = assert_deliverable(msg)
        verdicts = {r.name: r.verdict for r in results}
        assert verdicts["dkim"] == "passed", results  # signed, and nothing changed on the way
        assert verdicts["spam"] == "passed", results
        return results


@flow(feature="Deliverability", story="The signup confirmation is deliverable", severity="critical")
def signup_confirmation_is_deliverable(flow) -> list:
    address = flow.mailbox.address("deliver")
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address, "name": "Grace Hopper"})
        assert response.status_code == 202, response.text
    with flow.step("Receive the confirmation and confirm"):
        msg = flow.mailbox.wait_for(to=address, subject="Confirm your Demo Shop account", within=slo.TRANSACTIONAL)
        assert "Your account is confirmed" in flow.http.get(msg.link(text="Confirm my account")).text
    return _deliverable(flow, msg)


@flow(feature="Deliverability", story="The order receipt is deliverable", severity="critical")
def receipt_is_deliverable(flow) -> list:
    address = flow.mailbox.address("deliver-order")
    with flow.step("Place an order"):
        response = flow.http.post("/orders", json={"email": address, "lines": list(DEFAULT_LINES)})
        assert response.status_code == 201, response.text
        order = response.json()
    with flow.step("Receive the receipt"):
        msg = flow.mailbox.wait_for(to=address, subject=order["order_id"], within=slo.TRANSACTIONAL)
        assert str(Decimal(order["total"])) in msg.text
    return _deliverable(flow, msg)


@flow(feature="Deliverability", story="The newsletter is deliverable, one-click unsubscribe works",
      severity="critical")
def newsletter_is_deliverable(flow, list_id: str = "deliverability") -> list:
    address = flow.mailbox.address("deliver-news")
    with flow.step("Subscribe and send an issue"):
        assert flow.http.post(f"/newsletter/{list_id}/subscribers", json={"email": address}).status_code == 201
        response = flow.http.post(f"/newsletter/{list_id}/send", json={"subject": "Deliverable news",
                                                                      "body": "All good here."})
        assert response.status_code == 202, response.text
    with flow.step("Receive the issue"):
        msg = flow.mailbox.wait_for(to=address, subject="Deliverable news", within=slo.BULK)
    results = _deliverable(flow, msg)
    unsubscribe = next(r for r in results if r.name == "unsubscribe")
    with flow.step("The check's one-click POST unsubscribed the reader"):
        assert any("one-click POST" in d and "-> 200" in d for d in unsubscribe.details), unsubscribe
        subscribers = flow.http.get(f"/newsletter/{list_id}/subscribers").json()
        assert address not in str(subscribers), subscribers
    return results
