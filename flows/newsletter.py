"""Newsletter: bulk mail with RFC 8058 one-click unsubscribe."""

from __future__ import annotations

import re
import secrets

from flows import slo
from flows.app import outbox_drained
from mailproof import flow

_ANGLE_URLS = re.compile(r"<([^>]+)>")


def two_readers_one_unsubscribes(flow) -> tuple[str, str, str]:
    """Subscribe two readers, send the first issue with one-click unsubscribe headers, and let
    the first reader unsubscribe (RFC 8058 POST). Returns (list_id, leaving, staying); the load
    version of the flow (loadtests/flows.py) shares it and differs only in its negative check."""
    list_id = f"launch-{secrets.token_hex(4)}"
    leaving, staying = flow.mailbox.address("leaving"), flow.mailbox.address("staying")
    with flow.step("Subscribe two readers"):
        for address in (leaving, staying):
            response = flow.http.post(f"/newsletter/{list_id}/subscribers", json={"email": address})
            assert response.status_code == 201, response.text
    with flow.step("Send the first issue"):
        response = flow.http.post(f"/newsletter/{list_id}/send",
                                  json={"subject": "Launch day is here", "body": "We are live."})
        assert response.status_code == 202 and response.json()["queued"] == 2, response.text
    with flow.step("Both receive it, with one-click unsubscribe headers"):
        first = flow.mailbox.wait_for(to=leaving, subject="Launch day is here", within=slo.BULK)
        flow.mailbox.wait_for(to=staying, subject="Launch day is here", within=slo.BULK)
        assert first.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        targets = _ANGLE_URLS.findall(first.header("List-Unsubscribe") or "")
        https = [t for t in targets if t.startswith("http")]
        assert https and any(t.startswith("mailto:") for t in targets), targets
    with flow.step("One-click unsubscribe (RFC 8058 POST)"):
        response = flow.http.post(https[0], data={"List-Unsubscribe": "One-Click"})
        assert response.status_code == 200, response.text
    return list_id, leaving, staying


@flow(feature="Newsletter", story="One-click unsubscribe", severity="normal")
def newsletter_one_click_unsubscribe(flow) -> None:
    """Two subscribers get the newsletter with List-Unsubscribe headers; after a one-click
    unsubscribe, the next issue reaches only the one who stayed."""
    list_id, leaving, staying = two_readers_one_unsubscribes(flow)
    with flow.step("The next issue reaches only the remaining reader"):
        response = flow.http.post(f"/newsletter/{list_id}/send",
                                  json={"subject": "Day two", "body": "Still live."})
        assert response.status_code == 202 and response.json()["queued"] == 1, response.text
        flow.mailbox.wait_for(to=staying, subject="Day two", within=slo.BULK)
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=leaving, within=slo.NO_MAIL_WINDOW)
