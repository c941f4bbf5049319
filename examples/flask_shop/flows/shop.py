"""What the flows know about Flask Shop besides its emails: delivery SLOs and its outbox endpoint."""

from __future__ import annotations

# Seconds from the triggering request to the email being accepted by the relay.
TRANSACTIONAL = 5.0  # confirmation (sent inside the request), welcome, reset code
RECEIPT = 5.0  # the receipt is rendered (PDF, CSV) and sent by the background worker
# A negative check first waits for the app's outbox to be idle (outbox_idle), so this window only
# has to catch a straggler, not a slow send.
NO_MAIL_WINDOW = 0.3

SENDER = "no-reply@flask-shop.test"
CONFIRM_SUBJECT = "Confirm your Flask Shop account"
WELCOME_SUBJECT = "Welcome to Flask Shop"
RESET_SUBJECT = "Your Flask Shop password reset code"
# The answer to a reset request, the same whether the address has an account or not.
FORGOT_ANSWER = "If an account exists for that address, we have sent a password reset code."


def outbox_idle(flow, timeout: float = 10.0) -> None:
    """Return once the app has nothing queued or being sent.

    The sink stores a message before it answers 250, so afterwards every email the app sent is
    already in the mailbox. Through the raw client (``flow.http.client``): this request observes
    the app and must not become the latency trigger of the next email.
    """
    response = flow.http.client.get("/outbox/wait-idle", params={"timeout": timeout})
    assert response.status_code == 200 and response.json()["idle"], (
        f"Flask Shop's outbox was still busy after {timeout} s: {response.text}")
