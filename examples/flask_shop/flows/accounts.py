"""Flask Shop account emails: signup confirmation, welcome, password reset."""

from __future__ import annotations

from mailproof import flow

from . import shop


def log_in(flow, address: str, password: str):
    return flow.http.post("/login", json={"email": address, "password": password})


@flow(feature="Flask Shop accounts", story="Signup confirmation", severity="critical")
def signup_confirms_account(flow, name: str = "Ada Lovelace", password: str = "analytical engine",
                            as_form: bool = False) -> str:
    """A new user signs up, gets a confirmation link (HTML and text), follows it, and is welcomed once."""
    address = flow.mailbox.address("signup")
    with flow.step("Sign up" + (" with the HTML form" if as_form else " through the JSON API")):
        fields = {"email": address, "name": name, "password": password}
        response = flow.http.post("/signup", data=fields) if as_form else flow.http.post("/signup", json=fields)
        assert response.status_code == 201, f"signup refused: {response.status_code} {response.text}"
        if as_form:
            assert "Check your inbox" in response.text, response.text[:300]
        else:
            assert response.json()["email"] == address, response.json()
    with flow.step("Receive the confirmation email"):
        msg = flow.mailbox.wait_for(to=address, subject=shop.CONFIRM_SUBJECT, within=shop.TRANSACTIONAL)
        assert shop.SENDER in msg.from_, msg.from_
        assert msg.text and msg.html, "the confirmation should have both a text and an HTML part"
        greeting = f"Hi {name.split()[0]}"
        assert greeting in msg.text and greeting in msg.html, "both parts should greet the user by name"
        link = msg.link(text="Confirm my account")
        assert link in msg.text, "the text part should carry the same link as the HTML button"
        assert link.startswith(flow.http.client.base_url + "confirm/"), link
    with flow.step("Logging in before confirming is refused"):
        response = log_in(flow, address, password)
        assert response.status_code == 403, f"expected 403, got {response.status_code} {response.text}"
    with flow.step("Follow the confirmation link"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "your account is confirmed" in page.text, page.text[:300]
    with flow.step("The welcome email follows the confirmation"):
        welcome = flow.mailbox.wait_for(to=address, subject=shop.WELCOME_SUBJECT, within=shop.TRANSACTIONAL)
        assert f"{shop.WELCOME_SUBJECT}, {name.split()[0]}" == welcome.subject, welcome.subject
        assert welcome.link(text="Start shopping") == flow.http.client.base_url
    with flow.step("Logging in works now"):
        response = log_in(flow, address, password)
        assert response.status_code == 200 and response.json()["name"] == name, response.text
    with flow.step("Following the link again welcomes nobody twice"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "already confirmed" in page.text, page.text[:300]
        shop.outbox_idle(flow)
        flow.mailbox.expect_no_mail(to=address, within=shop.NO_MAIL_WINDOW)
    return address


@flow(feature="Flask Shop accounts", story="A tampered confirmation link is refused", severity="critical")
def tampered_confirmation_link_is_refused(flow) -> None:
    """Changing one character of the signed token makes the link invalid: the account stays unconfirmed."""
    address = flow.mailbox.address("tamper")
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address, "name": "Mallory", "password": "not so secret"})
        assert response.status_code == 201, response.text
    with flow.step("Receive the confirmation email"):
        link = flow.mailbox.wait_for(to=address, subject=shop.CONFIRM_SUBJECT,
                                     within=shop.TRANSACTIONAL).link(text="Confirm my account")
    with flow.step("The same address with a forged signature is refused"):
        # The token is payload.timestamp.signature: keep this user's payload, change the
        # signature's first character (six data bits; its last one partly holds padding bits).
        signed, signature = link.rsplit(".", 1)
        forged = f"{signed}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
        page = flow.http.get(forged)
        assert page.status_code == 404 and "not valid" in page.text, (page.status_code, page.text[:300])
    with flow.step("The account is still unconfirmed, and nobody is welcomed"):
        response = log_in(flow, address, "not so secret")
        assert response.status_code == 403, f"expected 403, got {response.status_code} {response.text}"
        shop.outbox_idle(flow)
        flow.mailbox.expect_no_mail(to=address, within=shop.NO_MAIL_WINDOW)


@flow(feature="Flask Shop accounts", story="Password reset code", severity="critical")
def password_reset_code_works_once(flow) -> None:
    """A registered user gets a 6-digit code and a link; the code changes the password once, then never again."""
    address = signup_confirms_account(flow, password="first password")
    with flow.step("Ask for a password reset"):
        response = flow.http.post("/password/forgot", json={"email": address})
        assert response.status_code == 200, response.text
        assert response.json() == {"status": shop.FORGOT_ANSWER}, response.json()
    with flow.step("Receive the reset code (sent after the response)"):
        msg = flow.mailbox.wait_for(to=address, subject=shop.RESET_SUBJECT, within=shop.TRANSACTIONAL)
        code = msg.code()
        assert len(code) == 6 and code.isdigit(), code
        assert code in msg.html, "the HTML part should show the same code"
        link = msg.link(text="Choose a new password")
    with flow.step("The link opens the reset form for this address"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "Choose a new password" in page.text, page.text[:300]
        assert f'value="{address}"' in page.text, "the form should carry the address the code was sent to"
    change = {"email": address, "code": code, "password": "second password"}
    with flow.step("A wrong code is refused"):
        wrong = f"{(int(code) + 1) % 10 ** 6:06d}"
        response = flow.http.post("/password/reset", json={**change, "code": wrong})
        assert response.status_code == 400 and response.json()["error"] == "invalid code", response.text
    with flow.step("The code changes the password"):
        response = flow.http.post("/password/reset", json=change)
        assert response.status_code == 200, response.text
    with flow.step("The same code is refused the second time"):
        response = flow.http.post("/password/reset", json={**change, "password": "third password"})
        assert response.status_code == 400, response.text
        assert "already been used" in response.json()["error"], response.json()
    with flow.step("Only the new password logs in"):
        assert log_in(flow, address, "second password").status_code == 200
        assert log_in(flow, address, "first password").status_code == 401
        assert log_in(flow, address, "third password").status_code == 401


@flow(feature="Flask Shop accounts", story="Password reset for an unknown address", severity="normal")
def password_reset_unknown_address_sends_nothing(flow) -> None:
    """No account, no email, and the same answer as for a real account (no account enumeration)."""
    address = flow.mailbox.address("nobody")
    with flow.step("Ask for a reset for an address with no account"):
        response = flow.http.post("/password/forgot", json={"email": address})
        assert response.status_code == 200, response.text
        assert response.json() == {"status": shop.FORGOT_ANSWER}, response.json()
    with flow.step("No email is sent"):
        shop.outbox_idle(flow)
        flow.mailbox.expect_no_mail(to=address, within=shop.NO_MAIL_WINDOW)
