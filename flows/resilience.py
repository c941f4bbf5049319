"""Resilience: every email still arrives, once, when the infrastructure fights back.

Each flow receives its fault setup as a parameter: ``faults`` is anything with
``rule(stage, action, **match)`` (the ``sink_faults`` fixture in pytest, the sink's FaultPlan in a
standalone script), ``validation`` the validation API's fault controls (the ``validation_faults``
fixture). Rules name the flow's own addresses, so they touch no other mail.

Helpers that only observe the app (``/metrics``, ``/bounces``) go through the raw HTTP client: a
request through ``flow.http`` is a latency trigger, and a metrics call between a signup and its
email would make the email look faster than it was.

Expected behaviour when the relay takes a message but the app never sees the 250 (a disconnect
after DATA): the app cannot tell "taken" from "lost", so it retries, and the mail arrives twice.
SMTP only offers at-least-once delivery (RFC 5321, section 6.1: a lost reply is a duplicate, never
a loss), and a duplicate is the better failure. What the product must guarantee is that both
copies are the same message (same Message-ID, same link), so a mailbox provider can fold them and
the second click is harmless. The flow asserts exactly that, and the harness reports the duplicate.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from flows import slo
from flows.app import outbox_drained
from mailproof import AppSession, flow
from mailproof.faults import Disconnect, RateLimit, Script

CONFIRM_SUBJECT = "Confirm your Demo Shop account"


# -- observing the app without moving the latency trigger ----------------------------------------


def app_metrics(flow) -> dict:
    response = flow.http.client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.json()


def app_bounces(flow, address: str) -> list[dict]:
    response = flow.http.client.get("/bounces")
    assert response.status_code == 200, response.text
    return [b for b in response.json() if b["to"] == address]


def app_user(flow, address: str) -> dict:
    response = flow.http.client.get(f"/users/{quote(address)}")
    assert response.status_code == 200, response.text
    return response.json()


def grew(before: dict, after: dict) -> dict:
    """The counters that changed, and by how much."""
    return {k: round(after[k] - before[k], 6) for k in before if after.get(k) != before[k]}


def wait_revalidated(flow, timeout: float = 10.0) -> None:
    """Long-poll until the app has a verdict for every signup it accepted without one."""
    response = flow.http.client.get("/validation/wait-settled", params={"timeout": timeout})
    assert response.status_code == 200 and response.json()["settled"], (
        f"signups still await validation after {timeout} s: {response.text}")


class Signups:
    """Concurrent signups from a thread pool: one HTTP session per thread, each request timed.

    Not through ``flow.http``: a requests.Session is not documented as thread-safe, and the flow's
    client reports to Allure and marks latency triggers, which must happen on the flow's thread.
    The flow marks one trigger for the whole burst instead (``flow.mark()``), so the Mailbox's
    latencies run from the burst's start; per-address latencies come from ``started``.
    """

    def __init__(self, flow, threads: int) -> None:
        self.base_url = flow.http.client.base_url
        self.threads = threads
        self.started: dict[str, float] = {}
        self.answers: dict[str, tuple[int, dict]] = {}
        self._local = threading.local()
        self._sessions: list[AppSession] = []
        self._lock = threading.Lock()

    def _session(self) -> AppSession:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = AppSession(self.base_url)
            with self._lock:
                self._sessions.append(session)
        return session

    def _signup(self, address: str) -> None:
        started = time.time()
        response = self._session().post("/signup", json={"email": address})
        body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        with self._lock:
            self.started[address] = started
            self.answers[address] = (response.status_code, body)

    def run(self, addresses: list[str]) -> float:
        """Sign every address up, concurrently; returns the seconds until the last answer."""
        began = time.monotonic()
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="signup") as pool:
                list(pool.map(self._signup, addresses))
        finally:
            for session in self._sessions:
                session.close()
        return time.monotonic() - began

    def refused(self) -> dict[str, tuple[int, dict]]:
        return {a: answer for a, answer in self.answers.items() if answer[0] != 202}


# -- SMTP faults ---------------------------------------------------------------------------------


@flow(feature="Resilience", story="Greylisted confirmation is retried and arrives once, later",
      severity="critical")
def greylisted_confirmation_arrives_once(flow, faults, refusals: int = 2):
    """The relay answers 451 at RCPT twice for the new address: the app backs off, retries, and the
    confirmation arrives exactly once, its latency showing the time spent waiting to retry."""
    address = flow.mailbox.address("greylisted")
    rule = faults.rule("rcpt", Script(["451 4.7.1 greylisted, try again later"] * refusals), to=address)
    with flow.step("The outbox is idle before the signup"):
        outbox_drained(flow)
        before = app_metrics(flow)
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address, "name": "Grace Hopper"})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
    with flow.step(f"The confirmation arrives after {refusals} refusals"):
        msg = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
    with flow.step("It arrived once, and its latency includes the backoffs"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
        changed = grew(before, app_metrics(flow))
        assert (rule.fired, rule.acted) == (refusals + 1, refusals), rule.describe()
        assert changed.get("transient_failures") == refusals, changed
        assert changed.get("send_attempts") == refusals + 1 and changed.get("emails_sent") == 1, changed
        waited = changed.get("retry_wait_seconds", 0.0)
        assert waited > 0, changed
        assert msg.latency >= waited, (
            f"latency {msg.latency:.3f} s is shorter than the {waited:.3f} s the app waited to retry")
    return msg


@flow(feature="Resilience", story="A rejected recipient is bounced, not retried", severity="critical")
def rejected_recipient_is_bounced(flow, faults):
    """The relay answers 550 at RCPT: a permanent failure. The app records the bounce at /bounces,
    does not retry, and no mail arrives."""
    address = flow.mailbox.address("gone")  # not "reject*": the fake validation API refuses those
    rule = faults.rule("rcpt", "550 5.1.1 no such mailbox here", to=address)
    with flow.step("The outbox is idle before the signup"):
        outbox_drained(flow)
        before = app_metrics(flow)
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
    with flow.step("No email arrives"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
    with flow.step("The bounce is recorded, after a single attempt"):
        (bounce,) = app_bounces(flow, address)
        assert bounce["code"] == 550 and "no such mailbox here" in bounce["message"], bounce
        assert bounce["subject"] == CONFIRM_SUBJECT and bounce["at"], bounce
        changed = grew(before, app_metrics(flow))
        outbox = {k: changed.get(k, 0) for k in ("emails_queued", "send_attempts", "emails_sent",
                                                 "transient_failures", "permanent_failures")}
        assert outbox == {"emails_queued": 1, "send_attempts": 1, "emails_sent": 0, "transient_failures": 0,
                          "permanent_failures": 1}, changed
        assert (rule.fired, rule.acted) == (1, 1)
    return bounce


@flow(feature="Resilience", story="A reply lost after DATA makes a duplicate, and it is reported",
      severity="normal")
def lost_reply_after_data_is_reported_as_duplicate(flow, faults):
    """The relay takes the confirmation, then drops the connection before its 250. The app cannot
    know, retries, and the mail arrives twice (expected: SMTP is at-least-once). Both copies must
    be the same message, and only one account confirmation may come of them."""
    address = flow.mailbox.address("lostreply")
    rule = faults.rule("after_data", Script([Disconnect()]), to=address)  # once, then accept
    with flow.step("The outbox is idle before the signup"):
        outbox_drained(flow)
        before = app_metrics(flow)
    with flow.step("Sign up"):
        response = flow.http.post("/signup", json={"email": address})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
    with flow.step("The confirmation arrives twice"):
        first, second = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, count=2,
                                               within=slo.TRANSACTIONAL)
    with flow.step("No third copy, and the app counted one retry"):
        outbox_drained(flow)
        flow.mailbox.expect_no_mail(to=address, within=slo.NO_MAIL_WINDOW)
        copies = flow.mailbox.received(to=address)
        changed = grew(before, app_metrics(flow))
        assert changed.get("send_attempts") == 2 and changed.get("transient_failures") == 1, changed
        assert changed.get("emails_sent") == 1, changed  # the app believes it sent one
        assert (rule.fired, rule.acted) == (2, 1)
    with flow.step(f"Duplicate reported: {len(copies)} copies of {first.message_id}"):
        assert len(copies) == 2, f"expected exactly one duplicate, got {len(copies)} copies"
        assert first.message_id and first.message_id == second.message_id, "a retry must resend the same message"
        link = first.link(text="Confirm my account")
        assert second.link(text="Confirm my account") == link
    with flow.step("Following either copy confirms the account once"):
        assert "Your account is confirmed" in flow.http.get(link).text
        assert "already confirmed" in flow.http.get(second.link(text="Confirm my account")).text
    return {"address": address, "copies": len(copies), "message_id": first.message_id}


@flow(feature="Resilience", story="A signup burst through a rate-limited relay", severity="critical")
def burst_under_throttle(flow, faults, signups: int = 200, per_second: float = 20.0, threads: int = 16,
                         within: float = 60.0, reply: str = "451 4.7.0 rate limit exceeded, slow down"):
    """``signups`` people sign up at once while the relay accepts ``per_second`` recipients per
    second (``reply`` past that). Every confirmation must arrive, exactly once.

    Returns the numbers: total seconds (burst start to the last email), retries, latencies.
    """
    addresses = [flow.mailbox.address("burst") for _ in range(signups)]
    rule = faults.rule("rcpt", RateLimit(per_second, reply=reply), to_pattern=r"^burst\+")
    with flow.step("The outbox is idle before the burst"):
        outbox_drained(flow)
        before = app_metrics(flow)
    burst = Signups(flow, threads)
    with flow.step(f"{signups} signups at once, {threads} in flight"):
        began = flow.mark()  # the trigger for the whole burst
        http_seconds = burst.run(addresses)
        assert not burst.refused(), f"signups refused: {dict(list(burst.refused().items())[:5])}"
    with flow.step("Every confirmation arrives"):
        latencies, last = [], began
        for address in addresses:
            msg = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=within)
            latencies.append(msg.received_at - burst.started[address])
            last = max(last, msg.received_at)
    with flow.step("Exactly once each"):
        outbox_drained(flow, timeout=within)
        twice = {a: n for a in addresses if (n := len(flow.mailbox.received(to=a))) != 1}
        assert not twice, f"addresses that got more than one confirmation: {twice}"
        changed = grew(before, app_metrics(flow))
        assert changed.get("emails_sent") == signups and changed.get("permanent_failures", 0) == 0, changed
    ordered = sorted(latencies)
    return {
        "signups": signups,
        "per_second": per_second,
        "http_seconds": round(http_seconds, 3),
        "total_seconds": round(last - began, 3),
        "throughput_per_second": round(signups / (last - began), 1),
        "send_attempts": changed.get("send_attempts", 0),
        "retries": changed.get("transient_failures", 0),
        "rate_limited": rule.acted,
        "retry_wait_seconds": round(changed.get("retry_wait_seconds", 0.0), 3),
        "latency_p50": round(statistics.median(ordered), 3),
        "latency_p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "latency_max": round(ordered[-1], 3),
    }


# -- validation API faults -----------------------------------------------------------------------


@flow(feature="Resilience", story="Signups ride out a throttling validation API", severity="critical")
def signups_ride_out_validation_throttling(flow, validation, signups: int = 5, throttled_for: float = 1.0):
    """The validation API answers 429 (Retry-After: 1) to everything for a while. The app waits as
    told and retries: every signup still gets a real verdict, and every confirmation arrives
    within the delivery SLO."""
    addresses = [flow.mailbox.address("throttled") for _ in range(signups)]
    with flow.step("The outbox is idle"):
        outbox_drained(flow)
        before = app_metrics(flow)
    validation.set(outage=throttled_for, outage_mode="429", retry_after=1)
    burst = Signups(flow, threads=signups)
    with flow.step(f"{signups} signups while the validation API throttles for {throttled_for:g} s"):
        flow.mark()
        burst.run(addresses)
        assert not burst.refused(), burst.refused()
        degraded = [a for a, (_, body) in burst.answers.items() if body.get("validation") == "pending"]
        assert not degraded, f"signups accepted without a verdict: {degraded}"
    with flow.step("Every confirmation arrives within the SLO"):
        for address in addresses:
            msg = flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
            assert msg.received_at - burst.started[address] <= slo.TRANSACTIONAL
    with flow.step("The throttling really happened, and was retried"):
        assert validation.fired["outage"] >= signups, validation.fired
        changed = grew(before, app_metrics(flow))
        assert changed.get("validation_retries", 0) >= signups, changed
        assert "validation_degraded" not in changed, changed
        assert all(app_user(flow, a)["validation"] == "deliverable" for a in addresses)


@flow(feature="Resilience", story="Signups during a validation outage degrade gracefully", severity="critical")
def signup_during_validation_outage(flow, validation):
    """The validation API is down (connection refused). Signups are accepted as "pending
    validation" and the confirmation goes out at once: the link proves the address. When the API is
    back, the app looks the pending addresses up, and flags one that turns out undeliverable."""
    good = flow.mailbox.address("outage")
    bad = flow.mailbox.address("reject-outage")  # the fake API calls "reject*" addresses undeliverable
    with flow.step("The outbox and the re-validation queue are idle"):
        outbox_drained(flow)
        wait_revalidated(flow)
        before = app_metrics(flow)
    validation.set(outage=60)  # refused until the flow clears it
    with flow.step("Sign up while the validation API is down"):
        response = flow.http.post("/signup", json={"email": good, "name": "Katherine Johnson"})
        assert response.status_code == 202, f"signup refused: {response.status_code} {response.text}"
        assert response.json() == {"status": "pending_confirmation", "validation": "pending"}
    with flow.step("The confirmation still arrives within the SLO"):
        msg = flow.mailbox.wait_for(to=good, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
    with flow.step("Once the breaker is open, signups are answered at once"):
        started = time.monotonic()
        response = flow.http.post("/signup", json={"email": bad})
        assert response.status_code == 202 and response.json()["validation"] == "pending", response.text
        assert time.monotonic() - started < 0.5, "the open circuit should answer at once"
        flow.mailbox.wait_for(to=bad, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
        assert app_user(flow, good)["validation"] == "pending"
    with flow.step("The link proves the first address"):
        assert "Your account is confirmed" in flow.http.get(msg.link(text="Confirm my account")).text
        user = app_user(flow, good)
        assert (user["confirmed"], user["validation"]) == (True, "proven"), user
    with flow.step("The API is back: the pending signup is looked up, and flagged"):
        validation.clear()
        wait_revalidated(flow)
        assert app_user(flow, bad) == {"email": bad, "name": None, "confirmed": False,
                                       "validation": "undeliverable"}
        changed = grew(before, app_metrics(flow))
        assert changed.get("validation_degraded") == 2, changed
        assert changed.get("validation_revalidated") == 1, changed  # the proven one needed no lookup
        assert changed.get("validation_found_undeliverable") == 1, changed
        assert changed.get("validation_circuit_opened", 0) >= 1, changed
    with flow.step("And new signups get a verdict again"):
        address = flow.mailbox.address("afteroutage")
        response = flow.http.post("/signup", json={"email": address})
        assert response.json() == {"status": "pending_confirmation"}, response.text
        flow.mailbox.wait_for(to=address, subject=CONFIRM_SUBJECT, within=slo.TRANSACTIONAL)
