"""Helpers specific to the demo application's API."""

from __future__ import annotations


def outbox_drained(flow, timeout: float = 5.0) -> None:
    """Return once the app has sent or bounced every email it accepted.

    The sink stores a message before it replies 250, so after this every email the app sent is
    already in the mailbox: a negative check needs no long waiting window.
    """
    response = flow.http.get("/outbox/wait-idle", params={"timeout": timeout})
    assert response.status_code == 200 and response.json()["idle"], (
        f"the app's outbox did not drain within {timeout} s: {response.text}")
