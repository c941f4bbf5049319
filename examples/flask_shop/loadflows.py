"""Flask Shop flows for rehearsals: ``mailproof rehearse -f examples/flask_shop/loadflows.py``.

The flows of ``flows/`` are written for pytest, where Flask Shop serves one test at a time. Under
load three things differ, so these are their load-friendly versions:

- The answers a flow expects to be refused (404 for a forged link, 400 for a wrong or reused
  reset code, 401 for a wrong password) say so with ``expect=``; otherwise Locust counts them as
  HTTP failures.
- Passwords are hashed (scrypt) only where the flow is about them: hashing is CPU the load
  would spend on something no email depends on.
- ``shop.outbox_idle`` waits for the app's whole outbox to be idle, which never happens while
  other users keep ordering: a negative check here watches its own address for a short window.
- Links are compared with the app's answer, not with ``flow.http.client.base_url`` (Locust's
  client keeps the host as given, without the trailing slash requests' session adds).

``order_receipt_has_invoice`` runs under load as it is (``__all__`` names the flows of this
module). ``receipt_is_sent_after_the_response`` needs the ``sink_faults`` fixture, so it has no
load version. Run with e.g.::

    mailproof rehearse -f examples/flask_shop/loadflows.py --app "python examples/flask_shop/app.py" \\
        --app-env PORT={port} --app-ready http://127.0.0.1:{port}/health -u 10 -r 5 -t 20s
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mailproof import flow

from .flows import shop
from .flows.orders import order_receipt_has_invoice  # runs under load as it is

__all__ = ["signup_confirms_account", "tampered_confirmation_link_is_refused", "password_reset_code_works_once",
           "order_receipt_has_invoice"]

NO_MAIL_WINDOW = 1.0  # seconds a negative check watches its own address (no outbox_idle under load)


def _path(url: str) -> str:
    return urlsplit(url).path


def _sign_up(flow, label: str, name: str) -> tuple[str, str]:
    """Sign up (no password: hashing one is CPU the load would spend on the harness's behalf) and
    receive the confirmation: (address, confirmation link)."""
    address = flow.mailbox.address(label)
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address, "name": name})
        assert response.status_code == 201, f"signup refused: {response.status_code} {response.text[:300]}"
        assert response.json()["email"] == address, response.json()
    with flow.step("Receive the confirmation email"):
        msg = flow.mailbox.wait_for(to=address, subject=shop.CONFIRM_SUBJECT, within=shop.TRANSACTIONAL)
        assert shop.SENDER in msg.from_, msg.from_
        greeting = f"Hi {name.split()[0]}"
        assert greeting in (msg.text or "") and greeting in (msg.html or ""), "both parts should greet the user"
        link = msg.link(text="Confirm my account")
        assert link in (msg.text or ""), "the text part should carry the same link as the HTML button"
        assert _path(link).startswith("/confirm/"), link
    return address, link


def _confirm(flow, address: str, link: str, name: str) -> None:
    with flow.step("Follow the confirmation link"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "your account is confirmed" in page.text, page.text[:300]
    with flow.step("The welcome email follows the confirmation"):
        welcome = flow.mailbox.wait_for(to=address, subject=shop.WELCOME_SUBJECT, within=shop.TRANSACTIONAL)
        assert welcome.subject == f"{shop.WELCOME_SUBJECT}, {name.split()[0]}", welcome.subject


def log_in(flow, address: str, password: str, expect=None):
    return flow.http.post("/login", json={"email": address, "password": password}, expect=expect)


@flow(feature="Flask Shop accounts", story="Signup confirmation", severity="critical")
def signup_confirms_account(flow) -> None:
    """Sign up, get the confirmation (HTML and text), confirm, and get welcomed exactly once."""
    name = "Ada Lovelace"
    address, link = _sign_up(flow, "signup", name)
    _confirm(flow, address, link, name)
    with flow.step("Following the link again welcomes nobody twice"):
        page = flow.http.get(link)
        assert page.status_code == 200 and "already confirmed" in page.text, page.text[:300]
        flow.mailbox.expect_no_mail(to=address, within=NO_MAIL_WINDOW)


@flow(feature="Flask Shop accounts", story="A tampered confirmation link is refused", severity="critical")
def tampered_confirmation_link_is_refused(flow) -> None:
    """A forged signature on the confirmation link is refused, and nobody is welcomed."""
    address, link = _sign_up(flow, "tamper", "Mallory")
    with flow.step("The same address with a forged signature is refused"):
        signed, signature = link.rsplit(".", 1)
        forged = f"{signed}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
        page = flow.http.get(forged, expect=404)
        assert page.status_code == 404 and "not valid" in page.text, (page.status_code, page.text[:300])
    with flow.step("Nobody is welcomed"):
        flow.mailbox.expect_no_mail(to=address, within=NO_MAIL_WINDOW)


@flow(feature="Flask Shop accounts", story="Password reset code", severity="critical")
def password_reset_code_works_once(flow) -> None:
    """A confirmed user gets a 6-digit code; it changes the password once, then never again."""
    name = "Grace Hopper"
    address, link = _sign_up(flow, "reset", name)
    _confirm(flow, address, link, name)
    with flow.step("Ask for a password reset"):
        response = flow.http.post("/password/forgot", json={"email": address})
        assert response.status_code == 200 and response.json() == {"status": shop.FORGOT_ANSWER}, response.text
    with flow.step("Receive the reset code (sent after the response)"):
        msg = flow.mailbox.wait_for(to=address, subject=shop.RESET_SUBJECT, within=shop.TRANSACTIONAL)
        code = msg.code()
        assert len(code) == 6 and code.isdigit() and code in (msg.html or ""), code
    change = {"email": address, "code": code, "password": "second password"}
    with flow.step("A wrong code is refused"):
        wrong = f"{(int(code) + 1) % 10 ** 6:06d}"
        response = flow.http.post("/password/reset", json={**change, "code": wrong}, expect=400)
        assert response.status_code == 400 and response.json()["error"] == "invalid code", response.text
    with flow.step("The code changes the password"):
        response = flow.http.post("/password/reset", json=change)
        assert response.status_code == 200, response.text
    with flow.step("The same code is refused the second time"):
        response = flow.http.post("/password/reset", json={**change, "password": "third password"}, expect=400)
        assert response.status_code == 400 and "already been used" in response.json()["error"], response.text
    with flow.step("The new password logs in, a wrong one does not"):
        assert log_in(flow, address, "second password").status_code == 200
        assert log_in(flow, address, "third password", expect=401).status_code == 401
