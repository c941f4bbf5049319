"""The demo app as a real subprocess, against a real aiosmtpd sink and the fake validation API.

Every wait is push-based: the sink's DATA handler puts each message into a per-recipient queue.Queue
(the test blocks in queue.get), the app's READY line is read once, and "nothing more will arrive"
is proven with the app's /outbox/wait-idle long-poll, never with sleeps.
"""

from __future__ import annotations

import asyncio
import csv
import email
import email.policy
import io
import itertools
import queue
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
import requests
from aiohttp import web
from aiosmtpd.smtp import SMTP

from fakes.validation_api import ValidationApi

ROOT = Path(__file__).resolve().parents[1]
KEY = "demo-key"
RUN = secrets.token_hex(3)
_seq = itertools.count(1)


def addr(label: str, domain: str = "example.com") -> str:
    """One unique address per expectation: isolates tests from each other's mail."""
    return f"{label}+{RUN}.{next(_seq):04d}@{domain}"


# --- the capture sink ---------------------------------------------------------------------------

class Sink:
    """aiosmtpd on its own event-loop thread, with scripted replies per recipient and stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue] = defaultdict(queue.Queue)
        self._script: dict[tuple[str, str], list[str]] = {}
        self.data_attempts: dict[str, int] = defaultdict(int)
        self.received = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtp-sink", daemon=True)

    def start(self) -> "Sink":
        self._thread.start()
        handler = self

        def factory() -> SMTP:
            return SMTP(handler, hostname="sink.test", decode_data=False, enable_SMTPUTF8=True)

        # Not Controller(port=0): it cannot wake a server on port 0 (aiosmtpd #276, #388).
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(factory, "127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def script(self, rcpt: str, stage: str, *replies: str) -> None:
        """Reply with each of `replies` in turn at `stage` (RCPT or DATA), then accept."""
        with self._lock:
            self._script[(rcpt, stage)] = list(replies)

    def _scripted(self, rcpt: str, stage: str) -> str | None:
        with self._lock:
            replies = self._script.get((rcpt, stage))
            return replies.pop(0) if replies else None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self._scripted(address, "RCPT")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self.data_attempts[rcpt] += 1
        for rcpt in envelope.rcpt_tos:
            reply = self._scripted(rcpt, "DATA")
            if reply:
                return reply
        with self._lock:
            self.received += 1
            for rcpt in envelope.rcpt_tos:
                self._queues[rcpt].put(envelope.original_content)
        return "250 OK"

    def get_raw(self, rcpt: str, timeout: float = 5) -> bytes:
        with self._lock:
            q = self._queues[rcpt]
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no mail to {rcpt} within {timeout} s") from None

    def get(self, rcpt: str, timeout: float = 5) -> EmailMessage:
        return email.message_from_bytes(self.get_raw(rcpt, timeout), policy=email.policy.default)

    def pending(self, rcpt: str) -> int:
        with self._lock:
            return self._queues[rcpt].qsize()


# --- the app under test, as a subprocess ------------------------------------------------------------

class App:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "demo_app", "--port", "0", *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        # One bounded wait for the READY line; EOF (a crash) ends it too.
        ready = select.select([self.proc.stdout], [], [], 15)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self._log.close()
            raise RuntimeError(f"demo_app did not start: {line!r}; log:\n{log.read_text()}")
        self.url = line.split()[1]
        self.http = requests.Session()

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=15, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.url + path, timeout=15, **kw)

    def metrics(self) -> dict:
        return self.get("/metrics").json()

    def wait_idle(self) -> None:
        body = self.get("/outbox/wait-idle", params={"timeout": 10}).json()
        assert body["idle"], f"outbox still busy: {body}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api():
    with ValidationApi(api_key=KEY) as a:
        yield a


@pytest.fixture(scope="module")
def start_app(sink, api, tmp_path_factory):
    apps = []

    def start(*extra: str, validation_url: str | None = None) -> App:
        log = tmp_path_factory.mktemp("app") / "demo_app.log"
        app = App(["--smtp-host", "127.0.0.1", "--smtp-port", str(sink.port),
                   "--validation-url", validation_url or api.url, "--validation-key", KEY, *extra], log)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture(scope="module")
def app(start_app):
    return start_app()


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


# --- signup and confirmation ----------------------------------------------------------------------

def test_signup_sends_multipart_confirmation_and_link_confirms(app, sink):
    to = addr("signup")
    resp = app.post("/signup", json={"email": to, "name": "Ada & Bob"})
    assert (resp.status_code, resp.json()) == (202, {"status": "pending_confirmation"})

    msg = sink.get(to)
    assert msg["Subject"] == "Confirm your Demo Shop account"
    assert msg["To"].addresses[0].addr_spec == to
    assert msg["From"].addresses[0].addr_spec == "no-reply@demo-shop.test"
    assert msg["Message-ID"].endswith("@demo-shop.test>") and msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    link = re.search(r"(http://\S+/confirm\?token=[\w-]+)", text).group(1)
    assert link.startswith(app.url + "/confirm?token=")  # public URL defaults to the listening URL
    assert f'<a href="{link}"' in html and "Confirm my account</a>" in html
    assert "Hi Ada & Bob," in text and "Hi Ada &amp; Bob," in html  # HTML is autoescaped, text is not

    assert app.get(f"/users/{to}").json() == {"email": to, "name": "Ada & Bob", "confirmed": False,
                                              "validation": "deliverable"}
    page = requests.get(link, timeout=5)
    assert page.status_code == 200 and "Your account is confirmed" in page.text and to in page.text
    assert app.get(f"/users/{to}").json()["confirmed"] is True
    again = requests.get(link, timeout=5)
    assert again.status_code == 200 and "already confirmed" in again.text

    bogus = app.get("/confirm", params={"token": "nope"})
    assert bogus.status_code == 404 and "This confirmation link is invalid or has expired" in bogus.text
    assert app.post("/signup", json={"email": to}).status_code == 409


def test_signup_with_unicode_local_part_goes_out_over_smtputf8(app, sink):
    to = addr("jörg")
    assert app.post("/signup", json={"email": to}).status_code == 202
    raw = sink.get_raw(to)
    # RFC 6532: raw UTF-8 in the header. message_from_bytes would give surrogates here, so parse text.
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == to
    assert "Confirm my account" in msg.get_body(("html",)).get_content()


@pytest.mark.parametrize("bad", ["plainaddress", "two@@example.com", "a b@example.com", "x@nodot",
                                 "<x@example.com>", "Name <x@example.com>", "x.@example.com",
                                 "x@example.com\r\nBcc: victim@example.com", "", 42])
def test_malformed_address_is_400_and_sends_nothing(app, sink, bad):
    app.wait_idle()
    before, received = app.metrics(), sink.received
    resp = app.post("/signup", json={"email": bad})
    assert resp.status_code == 400
    assert resp.json()["error"].startswith("invalid email address: ")
    app.wait_idle()
    after = app.metrics()
    assert after["emails_queued"] == before["emails_queued"]
    assert after["validation_calls"] == before["validation_calls"]  # rejected before the paid API call
    assert sink.received == received


@pytest.mark.parametrize("label, domain, reason", [("reject", "example.com", "rejected_email"),
                                                    ("x", "invalid.test", "invalid_domain")])
def test_undeliverable_per_validation_is_422_and_sends_nothing(app, sink, label, domain, reason):
    to = addr(label, domain)  # made here, not at collection: xdist workers must collect the same ids
    before = app.metrics()
    resp = app.post("/signup", json={"email": to})
    assert resp.status_code == 422
    assert resp.json() == {"error": f"email address rejected by validation: {reason}"}
    assert app.get(f"/users/{to}").status_code == 404
    app.wait_idle()
    assert delta(before, app.metrics()) == {"validation_calls": 1}
    assert sink.pending(to) == 0


# --- password reset -------------------------------------------------------------------------------

def test_password_reset_code_works_once(app, sink):
    to = addr("reset")
    assert app.post("/signup", json={"email": to}).status_code == 202
    sink.get(to)  # the confirmation

    nobody = addr("nobody")
    for who in (to, nobody):  # same answer whether or not the account exists
        resp = app.post("/password-reset", json={"email": who})
        assert (resp.status_code, resp.json()) == (202, {"status": "sent_if_registered"})
    msg = sink.get(to)
    assert msg["Subject"] == "Your Demo Shop password reset code"
    code = re.search(r"Your code is (\d{6})\b", msg.get_body(("plain",)).get_content()).group(1)
    assert code in msg.get_body(("html",)).get_content()

    def confirm(code: str, password: str = "correct horse") -> requests.Response:
        return app.post("/password-reset/confirm", json={"email": to, "code": code, "new_password": password})

    short = confirm(code, "short")
    assert short.status_code == 400 and "at least 8" in short.json()["error"]
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    assert confirm(wrong).json() == {"error": "invalid or already used code"}
    ok = confirm(code)  # neither the short password nor one wrong guess burned the code
    assert (ok.status_code, ok.json()) == (200, {"status": "password_changed"})
    reused = confirm(code)
    assert (reused.status_code, reused.json()) == (400, {"error": "invalid or already used code"})
    app.wait_idle()
    assert sink.pending(nobody) == 0 and sink.pending(to) == 0


# --- orders ---------------------------------------------------------------------------------------

def test_order_receipt_lists_lines_and_attaches_csv(app, sink):
    to = addr("order")
    lines = [{"sku": "MUG-1", "name": "Mug <blue>", "qty": 1, "unit_price": "19.99"},
             {"sku": "PEN-3", "name": "Pen", "qty": 3, "unit_price": 0.1}]  # a JSON float stays exact
    resp = app.post("/orders", json={"email": to, "lines": lines})
    assert resp.status_code == 201
    body = resp.json()
    order_id = body["order_id"]
    assert re.fullmatch(r"ORD-\d{6}", order_id) and body["total"] == "20.29"

    msg = sink.get(to)
    assert msg["Subject"] == f"Your Demo Shop receipt {order_id}"
    assert msg.get_content_type() == "multipart/mixed"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "Mug <blue>  x1  @ 19.99" in text and "Pen  x3  @ 0.10  = 0.30" in text and "Total: 20.29" in text
    assert "Mug &lt;blue&gt;" in html and "20.29" in html
    (att,) = list(msg.iter_attachments())
    assert att.get_content_type() == "text/csv"
    assert att.get_filename() == f"receipt-{order_id}.csv"
    rows = list(csv.reader(io.StringIO(att.get_content())))
    assert rows == [["sku", "name", "qty", "unit_price", "line_total"],
                    ["MUG-1", "Mug <blue>", "1", "19.99", "19.99"],
                    ["PEN-3", "Pen", "3", "0.10", "0.30"]]


@pytest.mark.parametrize("lines", [[], "x", [{"sku": "A", "name": "A", "qty": 0, "unit_price": "1"}],
                                   [{"sku": "A", "name": "A", "qty": "2", "unit_price": "1"}],
                                   [{"sku": "A", "name": "A", "qty": True, "unit_price": "1"}],
                                   [{"sku": "A", "name": "A", "qty": 1, "unit_price": "abc"}],
                                   [{"sku": "A", "name": "A", "qty": 1, "unit_price": "1.234"}],
                                   [{"sku": "A", "name": "A", "qty": 1, "unit_price": "-1"}],
                                   [{"sku": "A", "name": "A", "qty": 1, "unit_price": "NaN"}],
                                   [{"name": "A", "qty": 1, "unit_price": "1"}]])
def test_order_with_bad_lines_is_400_and_sends_nothing(app, lines):
    before = app.metrics()["emails_queued"]
    resp = app.post("/orders", json={"email": addr("order"), "lines": lines})
    assert resp.status_code == 400 and resp.json()["error"]
    assert app.metrics()["emails_queued"] == before


# --- newsletter and RFC 8058 one-click unsubscribe ------------------------------------------------

def test_newsletter_headers_and_one_click_unsubscribe(app, sink):
    stays, leaves = addr("news"), addr("news")
    for who in (stays, leaves):
        assert app.post("/newsletter/weekly/subscribers", json={"email": who}).status_code == 201
    assert app.post("/newsletter/weekly/subscribers", json={"email": stays}).status_code == 200
    assert set(app.get("/newsletter/weekly/subscribers").json()) >= {stays, leaves}

    resp = app.post("/newsletter/weekly/send", json={"subject": "Spring sale", "body": "Hello.\n\nAll 10% off."})
    assert resp.status_code == 202 and resp.json()["queued"] >= 2
    msg = sink.get(leaves)
    sink.get(stays)
    assert msg["Subject"] == "Spring sale"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "bulk"
    assert msg["List-Id"] == "Demo Shop weekly <weekly.lists.demo-shop.test>"
    https, mailto = re.fullmatch(r"<([^>]+)>, <([^>]+)>", str(msg["List-Unsubscribe"])).groups()
    token = https.split("token=")[1]
    assert https == f"{app.url}/unsubscribe?token={token}"
    assert mailto == f"mailto:unsubscribe@demo-shop.test?subject={token}"
    assert https in msg.get_body(("plain",)).get_content()  # a visible link too
    assert f'<a href="{https}">Unsubscribe</a>' in msg.get_body(("html",)).get_content()

    form = requests.get(https, timeout=5)
    assert form.status_code == 200 and 'method="post"' in form.text
    assert leaves in app.get("/newsletter/weekly/subscribers").json()  # GET alone must not unsubscribe

    bad = requests.post(https, data={"something": "else"}, timeout=5)
    assert bad.status_code == 400
    done = requests.post(https, data={"List-Unsubscribe": "One-Click"}, timeout=5)  # what a mailbox provider sends
    assert done.status_code == 200 and "unsubscribed" in done.text
    assert leaves not in app.get("/newsletter/weekly/subscribers").json()

    app.post("/newsletter/weekly/send", json={"subject": "Second", "body": "Again"})
    assert sink.get(stays)["Subject"] == "Second"
    app.wait_idle()
    assert sink.pending(leaves) == 0


def test_list_unsubscribe_with_long_url_is_not_rfc2047_encoded_on_the_wire():
    # In-process: the email package would encode a URL longer than a line, breaking the header.
    from aiosmtplib.email import flatten_message
    from demo_app.emails import Composer, make_env
    from email.headerregistry import Address

    long_url = "https://shop.staging.example.com/" + "a" * 80
    composer = Composer(make_env(), Address("Demo Shop", "no-reply", "demo-shop.test"), long_url)
    raw = flatten_message(composer.newsletter("x@example.com", "weekly", "T" * 32, "Hi", "Body"))
    header = re.search(rb"^List-Unsubscribe: .*?(?=\r\n\S)", raw, re.M | re.S).group(0)
    assert b"=?" not in header and f"<{long_url}/unsubscribe?token={'T' * 32}>".encode() in header
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["List-Unsubscribe"]).startswith(f"<{long_url}/unsubscribe?token=")


# --- delivery failures --------------------------------------------------------------------------

def test_451_then_accept_is_retried_and_delivered_once(app, sink):
    to = addr("greylisted")
    sink.script(to, "DATA", "451 4.7.1 greylisted, try again later")
    app.wait_idle()
    before = app.metrics()
    assert app.post("/signup", json={"email": to}).status_code == 202
    assert sink.get(to)["Subject"] == "Confirm your Demo Shop account"
    app.wait_idle()
    assert sink.pending(to) == 0 and sink.data_attempts[to] == 2
    changed = delta(before, app.metrics())
    assert 0 < changed.pop("retry_wait_seconds") <= 0.2  # full jitter: uniform in [0, base] for the first retry
    assert changed == {"emails_queued": 1, "emails_sent": 1, "send_attempts": 2, "transient_failures": 1,
                       "validation_calls": 1}


def test_one_log_line_per_attempt_with_its_outcome(app, sink):
    to = addr("logged")
    sink.script(to, "RCPT", "451 4.7.1 greylisted")
    assert app.post("/signup", json={"email": to}).status_code == 202
    sink.get(to)
    app.wait_idle()  # the outbox is idle only after the last attempt was logged
    lines = [line for line in app.log_path.read_text().splitlines() if f"send to={to} " in line]
    assert len(lines) == 2, lines
    assert re.search(r"attempt=1 outcome=retry code=451 elapsed_ms=[\d.]+ retry_in_ms=\d+ error='.*greylisted", lines[0])
    assert re.search(r"attempt=2 outcome=sent code=250 elapsed_ms=[\d.]+ retry_in_ms=- error=''", lines[1])


def test_transient_failures_are_retried_until_the_message_is_too_old(start_app, sink):
    app = start_app("--retry-for", "0.3")
    to = addr("throttled-forever")
    sink.script(to, "RCPT", *["451 4.7.0 rate limit exceeded"] * 100)
    assert app.post("/signup", json={"email": to}).status_code == 202
    app.wait_idle()
    (bounce,) = [b for b in app.get("/bounces").json() if b["to"] == to]
    attempts = int(re.search(r"gave up after (\d+) attempts", bounce["message"]).group(1))
    assert attempts >= 2 and bounce["code"] == 451
    m = app.metrics()
    assert (m["transient_failures"], m["permanent_failures"], m["send_attempts"]) == (attempts - 1, 1, attempts)
    assert sink.pending(to) == 0


def test_relay_level_refusals_are_transient_but_recipient_5xx_is_permanent():
    import aiosmtplib

    from demo_app.mailer import Permanent, Transient, classify

    cases = {
        aiosmtplib.SMTPConnectResponseError(554, "no SMTP service here"): (Transient, 554),
        aiosmtplib.SMTPHeloError(550, "go away"): (Transient, 550),
        aiosmtplib.SMTPServerDisconnected("gone after DATA"): (Transient, None),
        aiosmtplib.SMTPReadTimeoutError("timed out"): (Transient, None),
        aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(421, "closing", "a@x.test")]): (Transient, 421),
        aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no user", "a@x.test")]): (Permanent, 550),
        aiosmtplib.SMTPDataError(554, "spam"): (Permanent, 554),
        aiosmtplib.SMTPNotSupported("no SMTPUTF8"): (Permanent, None),
    }
    for exc, (kind, code) in cases.items():
        err = classify(exc)
        assert type(err) is kind and err.code == code, (exc, err)


def test_550_is_permanent_and_recorded_as_bounce(app, sink):
    to = addr("gone")
    sink.script(to, "RCPT", "550 5.1.1 no such mailbox")
    app.wait_idle()
    before = app.metrics()
    assert app.post("/orders", json={"email": to, "lines": [
        {"sku": "A", "name": "A", "qty": 1, "unit_price": "1.00"}]}).status_code == 201
    app.wait_idle()
    assert delta(before, app.metrics()) == {"emails_queued": 1, "send_attempts": 1, "permanent_failures": 1}
    (bounce,) = [b for b in app.get("/bounces").json() if b["to"] == to]
    assert bounce["code"] == 550 and "no such mailbox" in bounce["message"]
    assert bounce["subject"].startswith("Your Demo Shop receipt ORD-") and bounce["at"]
    assert sink.pending(to) == 0


# --- the validation API's failure modes -----------------------------------------------------------

@pytest.fixture(scope="module")
def flaky_pair(start_app):
    """One app against its own validation API, whose faults each test sets."""
    with ValidationApi(api_key=KEY) as api:
        yield start_app(validation_url=api.url), api


@pytest.fixture
def flaky(flaky_pair):
    app, api = flaky_pair
    api.faults.clear()
    api.reset_stats()
    yield flaky_pair
    api.faults.clear()


def test_validation_retry_after_is_a_floor(flaky):
    app, api = flaky
    api.faults.set(errors=1, error_status=429, retry_after=1)
    before = app.metrics()
    started = time.monotonic()
    resp = app.post("/signup", json={"email": addr("waited")})
    took = time.monotonic() - started
    assert resp.json() == {"status": "pending_confirmation"}  # a real verdict, after waiting as told
    assert 1.0 <= took < 3.0, took
    assert api.stats["by_status"] == {429: 1, 200: 1}
    changed = delta(before, app.metrics())
    assert (changed["validation_calls"], changed["validation_retries"]) == (2, 1)


def test_validation_5xx_burst_and_garbled_bodies_are_retried(flaky, sink):
    app, api = flaky
    api.faults.set(errors=2, malformed=1)
    before = app.metrics()
    to = addr("flaky")
    assert app.post("/signup", json={"email": to}).json() == {"status": "pending_confirmation"}
    sink.get(to)
    changed = delta(before, app.metrics())
    assert (changed["validation_calls"], changed["validation_retries"]) == (4, 3)
    assert "validation_degraded" not in changed and "validation_circuit_opened" not in changed
    assert api.faults.fired["errors"] == 2 and api.faults.fired["malformed"] == 1
    assert app.get(f"/users/{to}").json()["validation"] == "deliverable"


def test_validation_calls_go_through_a_semaphore(start_app, sink):
    in_flight, peak = 0, 0

    async def slow(request, handler):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.1)  # the fake provider takes its time
            return await handler(request)
        finally:
            in_flight -= 1

    with ValidationApi(api_key=KEY, faults=slow) as api:
        app = start_app("--validation-concurrency", "2", validation_url=api.url)
        addresses = [addr("sem") for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda to: requests.post(app.url + "/signup", json={"email": to},
                                                           timeout=15).status_code, addresses))
        assert codes == [202] * 6
        assert peak == 2
        assert api.stats["requests"] == 6 and app.metrics()["validation_degraded"] == 0
        for to in addresses:
            sink.get(to)


def test_circuit_breaker_answers_at_once_while_the_api_is_down(start_app, sink):
    with ValidationApi(api_key=KEY) as api:
        app = start_app("--validation-breaker-failures", "2", "--validation-cooldown", "30", validation_url=api.url)
        api.faults.set(outage=60)
        first, second = addr("breaker"), addr("breaker")
        assert app.post("/signup", json={"email": first}).json()["validation"] == "pending"
        calls = app.metrics()["validation_calls"]
        started = time.monotonic()
        assert app.post("/signup", json={"email": second}).json()["validation"] == "pending"
        assert time.monotonic() - started < 0.5
        m = app.metrics()
        assert m["validation_calls"] == calls == 2 and m["validation_circuit_opened"] == 1
        sink.get(first)
        sink.get(second)


def test_validation_429_is_retried_honouring_retry_after(start_app, sink):
    seen = []

    async def throttle_first(request, handler):
        seen.append(request.query.get("email"))
        if len(seen) == 1:
            return web.json_response({"message": "rate limited"}, status=429, headers={"Retry-After": "0"})
        return await handler(request)

    with ValidationApi(api_key=KEY, faults=throttle_first) as flaky:
        app = start_app(validation_url=flaky.url)
        to = addr("throttled")
        assert app.post("/signup", json={"email": to}).status_code == 202
        sink.get(to)
        m = app.metrics()
        assert (m["validation_calls"], m["validation_retries"]) == (2, 1)
        assert flaky.stats["by_status"] == {429: 1, 200: 1}


def test_validation_unreachable_degrades_to_pending_and_confirms_anyway(start_app, sink):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    app = start_app("--validation-budget", "0.6", validation_url=dead)
    to = addr("later")
    resp = app.post("/signup", json={"email": to})
    assert (resp.status_code, resp.json()) == (202, {"status": "pending_confirmation", "validation": "pending"})
    assert app.get(f"/users/{to}").json() == {"email": to, "name": None, "confirmed": False, "validation": "pending"}
    assert sink.get(to)["Subject"] == "Confirm your Demo Shop account"
    m = app.metrics()
    assert m["validation_retries"] >= 1 and m["validation_degraded"] == 1 and m["validation_pending"] == 1
    assert app.post("/signup", json={"email": to}).status_code == 409  # pending is registered all the same
    settled = app.get("/validation/wait-settled", params={"timeout": 0.2}).json()
    assert settled == {"settled": False, "pending": 1}  # the API never comes back here


# --- lifecycle ------------------------------------------------------------------------------------

def test_sigterm_drains_outbox_and_exits_0(start_app, sink):
    app = start_app("--workers", "1", "--public-url", "https://shop.example.com/")
    to = addr("drain")
    sink.script(to, "DATA", "451 4.3.0 busy")  # forces a retry that must still complete on shutdown
    assert app.post("/signup", json={"email": to}).status_code == 202
    assert app.stop() == 0
    msg = sink.get(to)
    assert "https://shop.example.com/confirm?token=" in msg.get_body(("plain",)).get_content()


# --- in-process units: configuration and address parsing -------------------------------------------

def test_config_flags_win_over_env_which_win_over_defaults():
    from demo_app import config

    env = {"DEMO_WORKERS": "3", "DEMO_SMTP_PORT": "2526", "DEMO_FROM": "Shop <hello@shop.example>",
           "DEMO_PUBLIC_URL": "https://shop.example/", "DEMO_SMTP_STARTTLS": "true"}
    cfg = config.load(["--smtp-port", "2600"], environ=env)
    assert (cfg.workers, cfg.smtp_port, cfg.smtp_starttls) == (3, 2600, True)
    assert cfg.public_url == "https://shop.example" and cfg.mail_domain == "shop.example"
    defaults = config.load([], environ={})
    assert (defaults.host, defaults.port, defaults.workers, defaults.smtp_starttls) == ("127.0.0.1", 0, 4, False)
    assert str(defaults.from_address) == "Demo Shop <no-reply@demo-shop.test>"


@pytest.mark.parametrize("raw, expected", [("a@example.com", "a@example.com"),
                                           ("First.Last+tag@Example.COM", "First.Last+tag@example.com"),
                                           ("jörg@example.com", "jörg@example.com"),
                                           ("x@müller.de", "x@müller.de")])
def test_address_parser_accepts_and_normalises(raw, expected):
    from demo_app.addresses import parse

    assert parse(raw) == expected


@pytest.mark.parametrize("raw", ['"quoted"@example.com', "a..b@example.com", ".a@example.com", "a@example",
                                 "a@-x.com", "a@x_y.com", "a(comment)@example.com", "a@example.com.",
                                 "a\u200b@example.com", "x" * 65 + "@example.com", None])
def test_address_parser_rejects(raw):
    from demo_app.addresses import InvalidAddress, parse

    with pytest.raises(InvalidAddress):
        parse(raw)
