"""Account emails: signup confirmation and password reset."""

from __future__ import annotations

from urllib.parse import quote

from flows import slo
from flows.app import outbox_drained
from mailproof import flow


@flow(feature="Accounts", story="Signup confirmation", severity="critical")
def signup_confirms_account(flow, name: str = "Ada Lovelace") -> str:
    """A new user signs up, receives a confirmation link, and following it confirms the account."""
    address = flow.mailbox.address("signup")
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address, "name": name})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
    with flow.step("Receive the confirmation email"):
        msg = flow.mailbox.wait_for(to=address, subject="Confirm your Demo Shop account",
                                    within=slo.TRANSACTIONAL)
        assert "no-reply@demo-shop.test" in msg.from_
        assert name.split()[0] in (msg.text or ""), "the greeting should use the user's name"
        link = msg.link(text="Confirm my account")
        assert link in (msg.text or ""), "the text part should carry the same link"
    with flow.step("Follow the confirmation link"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "Your account is confirmed" in page.text, page.text[:300]
    with flow.step("The account is confirmed"):
        user = flow.http.get(f"/users/{quote(address)}").json()
        assert user["confirmed"] is True, user
    return address


@flow(feature="Accounts", story="Signup rejects a malformed address", severity="normal")
def signup_rejects_malformed_address(flow, bad_address: str = "ada.lovelace@@example") -> None:
    """A malformed address is refused with a clear message and no email is sent."""
    with flow.step(f"Sign up with {bad_address!r}"):
        response = flow.http.post("/signup", json={"email": bad_address})
        assert response.status_code == 400, f"expected 400, got {response.status_code} {response.text}"
        assert "invalid email address" in response.json()["error"]
    with flow.step("No email is sent"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(within=slo.NO_MAIL_WINDOW)


@flow(feature="Accounts", story="Signup rejects an undeliverable address", severity="normal")
def signup_rejects_undeliverable_address(flow) -> None:
    """The validation API calls the domain undeliverable: the app refuses and sends nothing."""
    address = flow.mailbox.address("signup").split("@")[0] + "@invalid.test"
    with flow.step("Sign up with an address on a dead domain"):
        response = flow.http.post("/signup", json={"email": address})
        assert response.status_code == 422, f"expected 422, got {response.status_code} {response.text}"
        assert "rejected by validation" in response.json()["error"]
    with flow.step("No email is sent"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)


@flow(feature="Accounts", story="Password reset code", severity="critical")
def password_reset_code_works_once(flow) -> None:
    """A registered user gets a 6-digit reset code; it changes the password once, then never again."""
    address = signup_confirms_account(flow)
    with flow.step("Ask for a password reset"):
        response = flow.http.post("/password-reset", json={"email": address})
        assert response.status_code == 202, response.text
    with flow.step("Receive the reset code"):
        msg = flow.mailbox.wait_for(to=address, subject="password reset code", within=slo.TRANSACTIONAL)
        code = msg.code()
        assert len(code) == 6 and code.isdigit()
    with flow.step("The code changes the password"):
        change = {"email": address, "code": code, "new_password": "correct horse battery"}
        response = flow.http.post("/password-reset/confirm", json=change)
        assert response.status_code == 200, response.text
    with flow.step("The same code is refused the second time"):
        response = flow.http.post("/password-reset/confirm", json=change)
        assert response.status_code == 400, response.text
        assert "already used" in response.json()["error"]


@flow(feature="Accounts", story="Password reset for an unknown address", severity="normal")
def password_reset_unknown_address_sends_nothing(flow) -> None:
    """No account, no email: and the answer is the same as for a real account (no enumeration)."""
    address = flow.mailbox.address("nobody")
    with flow.step("Ask for a reset for an address with no account"):
        response = flow.http.post("/password-reset", json={"email": address})
        assert response.status_code == 202, response.text
    with flow.step("No email is sent"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
