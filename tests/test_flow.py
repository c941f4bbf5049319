"""Flows and their triggers: which request an email's latency is measured from.

The rule (``mailproof.mailbox``): every wait on an address has its own trigger: the first request
that carried the address after the previous wait on it returned (for the first wait: after the
address was handed out), else ``mark()``, else the latest request or mark before the wait began
(and after the previous wait returned), else the previous wait's trigger; ``mark(address)`` sets
the next wait's. Once a wait began, nothing done later moves its trigger. Here the application is
a stub client (``StubApp``) and the Mailbox runs on a hand-set clock, so every latency is exact.
"""

from __future__ import annotations

import json
import queue
import threading
from urllib.parse import quote, quote_plus, urlencode

import pytest

from mailproof.errors import MailLate
from mailproof.flow import Flow
from mailproof.http import TriggeringClient, carried_addresses, request_parts
from mailproof.mailbox import Mailbox, MailStore


class Clock:
    """The Mailbox's clock, set by hand: ``clock.now = 100.0``."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Response:
    status_code = 200
    text = "ok"


class StubApp:
    """A requests-like client: records each call; ``then`` (if set) runs as the app's side effect."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.then = None

    def request(self, method, url, **kwargs):
        self.calls.append((method.upper(), url, kwargs))
        if self.then is not None:
            self.then(method.upper(), url, kwargs)
        return Response()

    def get(self, url, params=None, **kwargs):
        return self.request("GET", url, params=params, **kwargs)

    def post(self, url, data=None, json=None, **kwargs):
        return self.request("POST", url, data=data, json=json, **kwargs)

    def put(self, url, data=None, **kwargs):
        return self.request("PUT", url, data=data, **kwargs)


def make_flow(store=None, clock=None):
    clock = clock or Clock()
    mailbox = Mailbox(store if store is not None else MailStore(), clock=clock)
    return Flow(http=StubApp(), mailbox=mailbox), clock


def in_thread(fn, *args, **kwargs) -> "queue.Queue":
    out: "queue.Queue" = queue.Queue()

    def run():
        try:
            out.put(("ok", fn(*args, **kwargs)))
        except BaseException as exc:
            out.put(("error", exc))

    threading.Thread(target=run, daemon=True).start()
    return out


def result_of(out: "queue.Queue", timeout: float = 10):
    kind, value = out.get(timeout=timeout)
    if kind == "error":
        raise value
    return value


# -- the rule --------------------------------------------------------------------------------


def test_a_status_check_between_the_trigger_and_the_wait_does_not_change_the_latency(make_message):
    # The numbers: 0.655 s real, 0.320 s reported when measured from the status check.
    flow, clock = make_flow()
    address = flow.mailbox.address("signup")
    clock.now = 100.0
    flow.http.post("/signup", json={"email": address})
    clock.now = 100.335
    flow.http.get("/status")
    flow.mailbox.store.deliver(make_message(address, received_at=100.655))
    clock.now = 100.7
    msg = flow.mailbox.wait_for(to=address, within=5)
    assert msg.latency == pytest.approx(0.655) and flow.mailbox.trigger_of(address) == 100.0


def test_a_request_made_while_waiting_does_not_change_the_latency(signalling_store, make_message):
    flow, clock = make_flow(signalling_store)
    carried, uncarried = flow.mailbox.address("carried"), flow.mailbox.address("uncarried")
    clock.now = 100.0
    flow.http.post("/signup", json={"email": carried})
    clock.now = 101.0
    flow.http.post("/invite-a-friend")  # carries no address: the latest request before the wait
    clock.now = 101.5
    waits = [in_thread(flow.mailbox.wait_for, to=a, within=5) for a in (carried, uncarried)]
    signalling_store.await_waiters(2)  # both waits began: their triggers are fixed
    clock.now = 102.0
    flow.http.get(f"/users/{quote(carried)}")  # while waiting, carrying the address
    flow.http.get("/users", params={"email": uncarried})  # while waiting: the first request to carry it
    flow.http.get("/status")
    for address in (carried, uncarried):
        signalling_store.deliver(make_message(address, received_at=102.5))
    got = [result_of(w) for w in waits]
    assert [m.latency for m in got] == [2.5, 1.5]
    assert (flow.mailbox.trigger_of(carried), flow.mailbox.trigger_of(uncarried)) == (100.0, 101.0)


def test_the_request_that_carries_the_address_is_the_trigger_even_if_another_came_later(make_message):
    flow, clock = make_flow()
    reader = flow.mailbox.address("reader")
    clock.now = 10.0
    flow.http.post("/newsletter/launch/subscribers", json={"email": reader})
    clock.now = 12.0
    flow.http.post("/newsletter/launch/send", json={"subject": "Launch day"})
    clock.now = 12.5
    flow.http.get("/outbox/wait-idle", params={"timeout": 5})
    flow.mailbox.store.deliver(make_message(reader, received_at=13.0))
    assert flow.mailbox.wait_for(to=reader, within=5).latency == 3.0


def test_without_a_carrying_request_the_trigger_is_the_latest_request_before_the_wait(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address()
    for clock.now, path in ((1.0, "/a"), (2.0, "/b")):
        flow.http.post(path)
    clock.now = 3.0
    flow.mailbox.store.deliver(make_message(address, received_at=4.0))
    assert flow.mailbox.wait_for(to=address, within=5).latency == 2.0


def test_two_addresses_in_one_flow_each_get_their_own_trigger(make_message):
    flow, clock = make_flow()
    ada, grace = flow.mailbox.address("ada"), flow.mailbox.address("grace")
    clock.now = 10.0
    flow.http.post("/signup", json={"email": ada})
    clock.now = 11.0
    flow.http.post("/signup", json={"email": grace})
    store = flow.mailbox.store
    store.deliver(make_message(ada, received_at=12.0))
    store.deliver(make_message(grace, received_at=12.5))
    assert flow.mailbox.wait_for(to=ada, within=5).latency == 2.0  # not 1.0, from grace's signup
    assert flow.mailbox.wait_for(to=grace, within=5).latency == 1.5


def test_a_late_mail_is_late_even_when_requests_came_after_its_trigger(make_message):
    # Under "latest request before capture" this mail read 0.9 s and passed a 2 s SLO.
    flow, clock = make_flow()
    address = flow.mailbox.address()
    clock.now = 50.0
    flow.http.post("/signup", json={"email": address})
    clock.now = 52.1
    flow.http.get("/status")
    flow.mailbox.store.deliver(make_message(address, received_at=53.0))
    with pytest.raises(MailLate, match=r"arrived 3\.000 s after the trigger, more than the 2 s allowed") as late:
        flow.mailbox.wait_for(to=address, within=2)
    assert flow.mails == [late.value.message]  # the flow records late mail too


# -- one trigger per expected email: the second email to an address --------------------------------


def test_the_welcome_after_the_confirmation_link_is_measured_from_the_click_not_the_signup(make_message):
    # The case: measured from the signup POST, this on-time welcome read 1.3 s and was late.
    flow, clock = make_flow()
    address = flow.mailbox.address("signup")
    store = flow.mailbox.store
    clock.now = 100.0
    flow.http.post("/signup", json={"email": address})
    store.deliver(make_message(address, "Confirm your account", received_at=100.5))
    clock.now = 100.6
    confirmation = flow.mailbox.wait_for(to=address, subject="Confirm", within=1)
    clock.now = 101.0
    flow.http.get("/confirm/8f2c1e.Zm9vYmFy")  # the link: it does not carry the address
    store.deliver(make_message(address, "Welcome aboard", received_at=101.3))
    clock.now = 101.4
    welcome = flow.mailbox.wait_for(to=address, subject="Welcome", within=1)
    assert (confirmation.latency, welcome.latency) == (pytest.approx(0.5), pytest.approx(0.3))
    assert welcome.triggered_at == 101.0 and confirmation.triggered_at == 100.0
    assert flow.mailbox.triggers_of(address) == [100.0, 101.0]
    assert flow.mailbox.trigger_of(address) == 100.0  # the first expected email's, as before
    assert flow.mails == [confirmation, welcome]


def test_a_reset_code_is_measured_from_the_request_that_asked_for_it(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("reset")
    store = flow.mailbox.store
    clock.now = 10.0
    flow.http.post("/signup", json={"email": address})
    store.deliver(make_message(address, "Confirm your account", received_at=10.5))
    clock.now = 10.6
    flow.mailbox.wait_for(to=address, subject="Confirm", within=5)
    clock.now = 15.0
    flow.http.post("/login", json={"user": "someone else"})  # carries nothing: not the trigger
    clock.now = 20.0
    flow.http.post("/password/forgot", json={"email": address})  # carries it: the trigger
    clock.now = 20.5
    flow.http.get("/status")  # a later request moves nothing
    store.deliver(make_message(address, "Your password reset code", received_at=21.0))
    clock.now = 21.5
    reset = flow.mailbox.wait_for(to=address, subject="reset code", within=2)  # 11 s from the signup
    assert reset.latency == 1.0 and flow.mailbox.triggers_of(address) == [10.0, 20.0]


def test_a_count_2_wait_is_two_emails_from_one_trigger_and_the_next_order_has_its_own(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("order")
    store = flow.mailbox.store
    clock.now = 5.0
    flow.http.post("/orders", json={"email": address, "items": 2})  # one receipt per item
    for at in (5.25, 5.5):
        store.deliver(make_message(address, "Your receipt", received_at=at))
    clock.now = 6.0
    first = flow.mailbox.wait_for(to=address, subject="receipt", count=2, within=1)
    clock.now = 8.0
    flow.http.post("/orders", json={"email": address, "items": 1})
    store.deliver(make_message(address, "Your receipt", received_at=8.75))
    clock.now = 9.0
    second = flow.mailbox.wait_for(to=address, subject="receipt", within=1)  # 3.75 s from the first order
    assert [m.latency for m in first] == [0.25, 0.5] and second.latency == 0.75
    assert flow.mailbox.triggers_of(address) == [5.0, 5.0, 8.0]


def test_mark_of_the_address_before_a_second_wait_is_that_wait_s_trigger(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("digest")
    store = flow.mailbox.store
    clock.now = 10.0
    flow.http.post("/newsletter/subscribers", json={"email": address})
    store.deliver(make_message(address, "Welcome to the newsletter", received_at=10.5))
    clock.now = 11.0
    flow.mailbox.wait_for(to=address, subject="Welcome", within=5)
    clock.now = 30.0
    assert flow.mark(address) == 30.0  # e.g. the flow runs the app's digest job itself
    clock.now = 31.0
    flow.http.get("/status")  # neither this later request...
    flow.http.post("/digest/preview", json={"to": address})  # ...nor one carrying it moves the mark
    store.deliver(make_message(address, "Your weekly digest", received_at=31.5))
    clock.now = 32.0
    digest = flow.mailbox.wait_for(to=address, subject="digest", within=2)  # 21 s from the subscription
    assert digest.latency == 1.5 and flow.mailbox.triggers_of(address) == [10.0, 30.0]


def test_two_emails_for_one_request_are_both_measured_from_that_request(make_message):
    # Confirming sends a welcome and a coupon: nothing happens between the two waits, so the
    # second is measured from the same request as the first, not from the signup nor its wait.
    flow, clock = make_flow()
    address = flow.mailbox.address("coupon")
    store = flow.mailbox.store
    clock.now = 40.0
    flow.http.post("/signup", json={"email": address})
    store.deliver(make_message(address, "Confirm your account", received_at=40.5))
    clock.now = 41.0
    flow.mailbox.wait_for(to=address, subject="Confirm", within=5)
    clock.now = 50.0
    flow.http.get("/confirm/opaque-token")
    store.deliver(make_message(address, "Welcome aboard", received_at=50.25))
    store.deliver(make_message(address, "Your 10% coupon", received_at=50.75))
    clock.now = 51.0
    welcome = flow.mailbox.wait_for(to=address, subject="Welcome", within=1)
    clock.now = 51.5
    coupon = flow.mailbox.wait_for(to=address, subject="coupon", within=1)  # 10.75 s from the signup
    assert (welcome.latency, coupon.latency) == (0.25, 0.75)
    assert flow.mailbox.triggers_of(address) == [40.0, 50.0, 50.0]


def test_the_second_expect_block_measures_from_the_first_request_inside_it(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("order")
    store = flow.mailbox.store
    clock.now = 20.0
    flow.http.post("/cart", json={"email": address})
    store.deliver(make_message(address, "Your cart is saved", received_at=20.5))
    clock.now = 21.0
    flow.mailbox.wait_for(to=address, subject="cart", within=5)
    clock.now = 25.0
    with flow.mailbox.expect(to=address, subject="receipt", within=1) as sent:
        clock.now = 26.0
        flow.http.post("/checkout")  # does not carry the address: the first request inside the block
        clock.now = 26.5
        flow.http.get("/orders/1")
        store.deliver(make_message(address, "Your receipt", received_at=26.75))
    assert sent[0].latency == 0.75 and flow.mailbox.triggers_of(address) == [20.0, 26.0]


# -- mark() ----------------------------------------------------------------------------------


def test_mark_is_the_trigger_of_mail_not_caused_by_http_and_applies_to_addresses_without_one(make_message):
    flow, clock = make_flow()
    by_request, by_mark = flow.mailbox.address("request"), flow.mailbox.address("cron")
    clock.now = 40.0
    flow.http.post("/signup", json={"email": by_request})
    clock.now = 50.0
    assert flow.mark() == 50.0  # e.g. the flow runs the app's nightly job itself
    clock.now = 51.0
    flow.http.get("/status")
    flow.mark()  # a later mark moves nothing
    store = flow.mailbox.store
    store.deliver(make_message(by_mark, received_at=52.0))
    store.deliver(make_message(by_request, received_at=52.0))
    assert flow.mailbox.wait_for(to=by_mark, within=5).latency == 2.0
    assert flow.mailbox.wait_for(to=by_request, within=15).latency == 12.0  # its request, not the mark


def test_mark_of_one_address_leaves_the_others_to_their_requests(make_message):
    flow, clock = make_flow()
    digest, signup = flow.mailbox.address("digest"), flow.mailbox.address("signup")
    clock.now = 5.0
    flow.mark(digest)
    clock.now = 7.0
    flow.http.post("/signup", json={"email": signup})
    flow.http.post("/digest/run", json={"to": digest})  # digest is already triggered
    assert (flow.mailbox.trigger_of(digest), flow.mailbox.trigger_of(signup)) == (5.0, 7.0)


# -- finding the address in a request ---------------------------------------------------------


CARRIERS = {
    "json body": lambda http, a: http.post("/signup", json={"user": {"emails": ["x@y.test", a]}}),
    "json body, upper case": lambda http, a: http.post("/signup", json={"email": a.upper()}),
    "form dict": lambda http, a: http.post("/signup", data={"email": a}),
    "form string": lambda http, a: http.post("/signup", data=urlencode({"email": a})),
    "form positional": lambda http, a: http.post("/signup", {"email": a}),
    "bytes body": lambda http, a: http.post("/signup", data=json.dumps({"email": a}).encode()),
    "path, quoted": lambda http, a: http.get(f"/users/{quote(a)}"),
    "path, raw": lambda http, a: http.get(f"/users/{a}"),
    "query string, quote_plus": lambda http, a: http.get(f"/users?email={quote_plus(a)}"),
    "query string, quoted twice": lambda http, a: http.get(f"/r?next={quote(f'/users?email={quote(a)}', safe='')}"),
    "query string, + read as a space": lambda http, a: http.get("/users?email=" + a.replace("+", " ")),
    "params dict": lambda http, a: http.get("/users", params={"email": a}),
    "params pairs": lambda http, a: http.get("/users", params=[("page", "1"), ("email", a)]),
    "params positional": lambda http, a: http.get("/users", {"email": a}),
    "request()": lambda http, a: http.request("PUT", "/users", json={"email": a}),
}


@pytest.mark.parametrize("send", CARRIERS.values(), ids=CARRIERS.keys())
def test_the_address_is_found_wherever_the_request_carries_it(send, make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("found")
    clock.now = 5.0
    send(flow.http, address)
    clock.now = 6.0
    flow.http.get("/status")
    assert flow.mailbox.trigger_of(address) == 5.0


def test_a_request_for_another_address_is_not_this_address_s_trigger():
    flow, clock = make_flow()
    mine, other = flow.mailbox.address("mine"), flow.mailbox.address("other")
    clock.now = 5.0
    flow.http.post("/signup", json={"email": other})
    assert flow.mailbox.trigger_of(mine) is None and flow.mailbox.trigger_of(other) == 5.0
    assert carried_addresses([mine.lower()], f"/users/{quote(other)}", {}) == []


def test_a_request_body_that_is_a_file_or_a_stream_is_never_read():
    consumed = []

    def stream():
        consumed.append(True)
        yield b"email=a@b.test"

    assert carried_addresses(["a@b.test"], "/upload", {"data": stream()}) == []
    assert consumed == []


def test_triggering_client_passes_method_url_and_fields_then_reports():
    starts, dones = [], []
    app = StubApp()
    http = TriggeringClient(app, lambda *a: starts.append(a), lambda *a: dones.append(a[:3]))
    assert isinstance(http.get("/a", {"q": "1"}), Response)
    http.post("/b", {"form": "1"}, {"json": 2}, timeout=3)
    http.request("DELETE", "/c", params={"x": "y"})
    assert starts == [("GET", "/a", {"params": {"q": "1"}}),
                      ("POST", "/b", {"timeout": 3, "data": {"form": "1"}, "json": {"json": 2}}),
                      ("DELETE", "/c", {"params": {"x": "y"}})]
    assert [d[:2] for d in dones] == [("GET", "/a"), ("POST", "/b"), ("DELETE", "/c")]
    assert http.client is app and http.calls is app.calls  # other attributes pass through
    assert request_parts("request", ("get", "/d", {"p": 1}), {}) == ("GET", "/d", {"params": {"p": 1}})


# -- expect() in a flow -------------------------------------------------------------------------


def test_expect_in_a_flow_the_trigger_inside_the_block(make_message):
    flow, clock = make_flow()
    address = flow.mailbox.address("order")
    store = flow.mailbox.store
    flow.http.client.then = lambda method, url, kwargs: (
        store.deliver(make_message(address, "Your receipt", received_at=clock.now + 0.4))
        if url == "/orders" else None)
    clock.now = 20.0
    with flow.mailbox.expect(to=address, within=5, subject="receipt") as sent:
        clock.now = 21.0
        flow.http.post("/orders", json={"email": address})
        clock.now = 21.2
        flow.http.get("/orders/1")  # a status check inside the block changes nothing
    assert len(sent) == 1 and sent[0].latency == pytest.approx(0.4)
    assert flow.mails == list(sent)
