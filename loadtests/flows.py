"""The demo's launch-day mix, as ``mailproof rehearse -f loadtests/flows.py`` runs it.

The demo's own flows (flows/) are written for pytest, where the app is otherwise idle. Two of
them need a load-friendly version here:

- ``password_reset_code_works_once`` refuses a reused code with the expected 400: under load the
  flow must say so (``expect=400``), or Locust counts that answer as an HTTP failure;
- ``newsletter_one_click_unsubscribe`` waits for the app's whole outbox to drain before its
  negative check (``outbox_drained``), which never happens while other users keep sending: here
  the app's own count of queued mail and a short window after the remaining reader's copy do.

Weights (``@flow(weight=N)``): mostly signups, then receipts and resets; newsletters are rare
per user.
"""

from __future__ import annotations

from flows import accounts, newsletter, orders, slo
from mailproof import flow


@flow(feature="Accounts", story="Signup confirmation", severity="critical", weight=6)
def signup_confirms_account(flow) -> None:
    """A new user signs up, receives a confirmation link, and following it confirms the account."""
    accounts.signup_confirms_account(flow)


@flow(feature="Orders", story="Order receipt", severity="critical", weight=3)
def order_receipt(flow) -> None:
    """An order is placed; the receipt lists every line and the total, with a CSV attachment."""
    orders.order_receipt(flow)


@flow(feature="Accounts", story="Password reset code", severity="critical", weight=2)
def password_reset_code_works_once(flow) -> None:
    """A registered user gets a 6-digit reset code; it changes the password once, then never again."""
    address = accounts.signup_confirms_account(flow)
    with flow.step("Ask for a password reset"):
        response = flow.http.post("/password-reset", json={"email": address})
        assert response.status_code == 202, response.text
    with flow.step("Receive the reset code"):
        code = flow.mailbox.wait_for(to=address, subject="password reset code", within=slo.TRANSACTIONAL).code()
        assert len(code) == 6 and code.isdigit()
    change = {"email": address, "code": code, "new_password": "correct horse battery"}
    with flow.step("The code changes the password"):
        response = flow.http.post("/password-reset/confirm", json=change)
        assert response.status_code == 200, response.text
    with flow.step("The same code is refused the second time"):
        response = flow.http.post("/password-reset/confirm", json=change, expect=400)
        assert response.status_code == 400, response.text
        assert "already used" in response.json()["error"]


@flow(feature="Newsletter", story="One-click unsubscribe", severity="normal", weight=1)
def newsletter_one_click_unsubscribe(flow) -> None:
    """Two subscribers get the newsletter with List-Unsubscribe headers; after a one-click
    unsubscribe, the next issue is queued for, and reaches, only the one who stayed."""
    list_id, leaving, staying = newsletter.two_readers_one_unsubscribes(flow)
    with flow.step("The next issue reaches only the remaining reader"):
        response = flow.http.post(f"/newsletter/{list_id}/send", json={"subject": "Day two", "body": "Still live."})
        assert response.status_code == 202 and response.json()["queued"] == 1, response.text
        flow.mailbox.wait_for(to=staying, subject="Day two", within=slo.BULK)
        flow.mailbox.expect_no_mail(to=leaving, within=0.5)

