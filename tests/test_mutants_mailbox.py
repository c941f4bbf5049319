"""Mailbox behaviour that benchmarks/mutation.py found no test checking: ``expect`` and
``expect_no_mail`` criteria each deciding alone, what observers are told, which trigger an
unexpected or untargeted mail is measured from, and the harness-error texts."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.message import EmailMessage

import pytest

from mailproof.addresses import AddressBook
from mailproof.errors import HarnessError, MailLate, MailNotDelivered, MailproofError, UnexpectedMail
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message
from mailproof.store import describe

SHORT = dict(within=0.3, timeout=0.3)


def _mail(to: str | list[str], *, subject: str = "Your order", body: str = "Order 1234 shipped.\n",
          sender: str = "shop@example.test", headers: dict | None = None,
          received_at: float | None = None) -> Message:
    rcpts = [to] if isinstance(to, str) else to
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = subject
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    return Message(raw, mail_from=sender, rcpt_tos=rcpts, received_at=time.time() if received_at is None else received_at)


def _is_good(msg: Message) -> bool:
    return msg.header("X-Flag") == "good"


MATCHING = dict(subject="Your order", body="Order 1234 shipped.\n", sender="shop@example.test",
                headers={"X-Kind": "receipt", "X-Flag": "good"})
CRITERIA = dict(subject="order", contains="1234", header=("X-Kind", "receipt"), sender="shop@example.test",
                match=_is_good)
SPOIL = {
    "subject": dict(subject="Your invoice"),
    "contains": dict(body="Order 9999 shipped.\n"),
    "header": dict(headers={"X-Kind": "newsletter", "X-Flag": "good"}),
    "sender": dict(sender="other@example.test"),
    "match": dict(headers={"X-Kind": "receipt", "X-Flag": "bad"}),
}


@pytest.mark.parametrize("criterion", sorted(SPOIL))
def test_expect_rejects_mail_that_misses_one_criterion(criterion):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("expect")
    with pytest.raises(MailNotDelivered):
        with box.expect(to, **CRITERIA, **SHORT):
            store.deliver(_mail(to, **{**MATCHING, **SPOIL[criterion]}))
    with box.expect(to, **CRITERIA, **SHORT) as sent:
        hit = store.deliver(_mail(to, **MATCHING))
    assert sent == [hit]


@pytest.mark.parametrize("criterion", sorted(SPOIL))
def test_expect_no_mail_ignores_mail_that_misses_one_criterion(criterion):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("none")
    store.deliver(_mail(to, **{**MATCHING, **SPOIL[criterion]}))
    box.expect_no_mail(to, within=0.2, **CRITERIA)
    store.deliver(_mail(to, **MATCHING))
    with pytest.raises(UnexpectedMail):
        box.expect_no_mail(to, within=0.2, **CRITERIA)


def test_count_below_one_is_refused_naming_the_alternative():
    box = Mailbox(MailStore())
    for call in (lambda: box.wait_for("a@x", count=0), lambda: box.expect("a@x", count=0)):
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == "count must be at least 1; use expect_no_mail() to expect none"


def test_expect_no_mail_defaults_to_one_second_and_accepts_a_zero_window():
    box = Mailbox(MailStore())
    quick = box.address("zero")
    box.expect_no_mail(quick, within=0)
    assert box.expected[quick.lower()] == (0, 0)
    default = box.address("default")
    box.expect_no_mail(default)
    assert box.expected[default.lower()] == (0, 1.0)
    with pytest.raises(ValueError, match="within must be 0 seconds or more"):
        box.expect_no_mail(default, within=-1)


def test_an_expected_count_keeps_the_slo_asked_even_below_a_second():
    store = MailStore()
    box = Mailbox(store)
    to = box.address("slo")
    store.deliver(_mail(to))
    box.wait_for(to, within=0.3, timeout=0.3)
    assert box.expected[to.lower()] == (1, 0.3)


def test_mark_takes_a_bare_time_as_the_time_of_a_general_mark():
    box = Mailbox(MailStore())
    assert box.mark(1_800_000_000.5) == 1_800_000_000.5
    assert list(box.triggers) == [1_800_000_000.5]
    assert box.mark(1_800_000_001) == 1_800_000_001.0


def test_received_filters_by_address_and_criteria():
    store = MailStore()
    box = Mailbox(store)
    a, b = box.address("a"), box.address("b")
    hit = store.deliver(_mail(a, subject="Receipt"))
    store.deliver(_mail(a, subject="News"))
    other = store.deliver(_mail(b, subject="Receipt"))
    assert box.received(a, subject="Receipt") == [hit]
    assert box.received(subject="Receipt") == [hit, other]


def test_an_untargeted_wait_measures_each_mail_from_its_own_addresses_trigger():
    store = MailStore()
    box = Mailbox(store)
    a = box.address("a")
    box.mark(a, at=100.0)
    box.mark(at=150.0)  # a general mark later: not a's trigger, which was set for it
    got = store.deliver(_mail(a, subject="Hello", received_at=160.0))
    assert box.wait_for(subject="Hello", within=100) is got
    assert got.latency == 60.0
    b = box.address("b")
    box.mark(b, at=200.0)
    with box.expect(subject="Again", within=100) as sent:
        store.deliver(_mail(b, subject="Again", received_at=230.0))
    assert sent[0].latency == 30.0


def test_an_expect_block_without_any_trigger_measures_from_the_block():
    store = MailStore()
    box = Mailbox(store)
    to = box.address("blind")
    with box.expect(to, within=5) as sent:
        store.deliver(_mail(to))
    assert sent[0].latency is None  # no request, no mark: no latency, and not late either


def test_an_expect_block_falls_back_on_the_mark_before_it_and_counts_each_email():
    store = MailStore()
    box = Mailbox(store)
    box.mark(at=1000.0)
    to = box.address("two")
    with box.expect(to, count=2, within=100) as sent:
        store.deliver(_mail(to, received_at=1010.0))
        store.deliver(_mail(to, received_at=1020.0))
    assert [m.latency for m in sent] == [10.0, 20.0]
    assert box.triggers_of(to) == [1000.0, 1000.0]
    box.mark(to, at=2000.0)  # the block has ended: the next wait has a trigger of its own
    store.deliver(_mail(to, received_at=2005.0))
    assert box.wait_for(to, within=100).latency == 5.0


def test_an_unexpected_mail_is_measured_from_the_trigger_of_the_address_asked_about():
    store = MailStore()
    box = Mailbox(store)
    a, b = sorted([box.address("x"), box.address("y")])
    box.mark(a, at=100.0)
    box.mark(b, at=120.0)
    store.deliver(_mail([a, b], received_at=130.0))
    with pytest.raises(UnexpectedMail) as caught:
        box.expect_no_mail(b, within=0.1)
    assert caught.value.messages[0].triggered_at == 120.0
    c = box.address("z")
    box.mark(c, at=140.0)
    store.deliver(_mail(c, subject="Stray", received_at=150.0))
    with pytest.raises(UnexpectedMail) as caught:
        box.expect_no_mail(subject="Stray", within=0.1)
    assert caught.value.messages[0].triggered_at == 140.0


def test_observers_hear_missing_and_unexpected_with_the_criteria_and_the_error():
    store = MailStore()
    box = Mailbox(store)
    heard = []
    box.observe(lambda *event: heard.append(event))
    to = box.address("obs")
    with pytest.raises(MailNotDelivered) as missing:
        box.wait_for(to, subject="Nothing", **SHORT)
    stray = store.deliver(_mail(to, subject="Stray"))
    with pytest.raises(UnexpectedMail) as unexpected:
        box.expect_no_mail(to, subject="Stray", within=0.1)
    with pytest.raises(UnexpectedMail) as extra:
        with box.expect(to, subject="Twice", **SHORT):
            store.deliver(_mail(to, subject="Twice"))
            second = store.deliver(_mail(to, subject="Twice"))
    (e1, m1, c1, x1), (e2, m2, c2, x2), delivered, (e4, m4, c4, x4) = heard
    assert (e1, m1, c1.subject, x1) == ("missing", None, "Nothing", missing.value)
    assert (e2, m2, c2.subject, x2) == ("unexpected", stray, "Stray", unexpected.value)
    assert delivered[0] == "delivered"
    assert (e4, m4, c4.subject, x4) == ("unexpected", second, "Twice", extra.value)


def test_an_expectation_is_armed_once():
    box = Mailbox(MailStore())
    expecting = box.expect("a@x", **SHORT)
    expecting.__enter__()
    with pytest.raises(MailproofError) as caught:
        expecting.__enter__()
    assert str(caught.value) == "an expectation is armed once: call mailbox.expect(...) again for another"


def test_closing_twice_releases_once():
    store = MailStore(max_messages=2)
    book = AddressBook()
    box = Mailbox(store, book)
    kept = box.address("kept")
    store._hold(kept)  # a second holder of the address (as the plugin's per-test view and a flow's)
    store.deliver(_mail(kept, subject="keep me"))
    box.close()
    box.close()
    other = Mailbox(store, book)
    for i in range(3):
        store.deliver(_mail(other.address(f"n{i}")))
    assert [m.subject for m in store.since(0, to=kept)] == ["keep me"]  # still live: not evicted


def test_a_request_that_cannot_be_scanned_is_a_harness_error_and_the_fallback_applies():
    class Unreadable(Mapping):
        def __getitem__(self, key):
            raise KeyError(key)

        def __iter__(self):
            raise RuntimeError("body not readable")

        def __len__(self):
            return 1

        def items(self):
            raise RuntimeError("body not readable")

    store = MailStore()
    box = Mailbox(store, clock=lambda: 500.0)
    to = box.address("scan")
    assert box.on_request("POST", "http://app.test/signup", {"json": Unreadable()}) == 500.0
    assert store.harness_errors == 1
    assert list(store.harness_error_samples) == [
        "looking for addresses in POST http://app.test/signup: RuntimeError: body not readable"]
    assert box.on_request("GET", f"http://app.test/confirm?email={to}") == 500.0
    assert box.trigger_of(to) == 500.0


def test_a_request_carrying_the_address_in_its_url_is_its_trigger():
    now = [10.0]
    box = Mailbox(MailStore(), clock=lambda: now[0])
    a, b = box.address("a"), box.address("b")
    box.on_request("GET", f"http://app.test/reset?email={a}")
    now[0] = 20.0
    box.on_request("GET", f"http://app.test/reset?email={b}")
    assert (box.trigger_of(a), box.trigger_of(b)) == (10.0, 20.0)


def test_criteria_that_raise_on_an_extra_mail_are_a_harness_error_naming_the_mail():
    def picky(msg: Message) -> bool:
        if msg.subject == "boom":
            raise ZeroDivisionError("division by zero")
        return True

    store = MailStore()
    box = Mailbox(store)
    to = box.address("picky")
    with pytest.raises(HarnessError) as caught:
        with box.expect(to, match=picky, **SHORT):
            store.deliver(_mail(to, subject="fine"))
            bad = store.deliver(_mail(to, subject="boom"))
    wanted = f"match={picky.__name__}"
    assert str(caught.value) == (f"the harness could not check {describe(bad)} against to {to} {wanted}: "
                                 "ZeroDivisionError: division by zero; not a verdict on the product")
    assert store.harness_errors == 1
    assert list(store.harness_error_samples) == [
        f"checking {describe(bad)} against to {to} {wanted}: ZeroDivisionError: division by zero"]
    assert re.search(r"mail #\d+ to", describe(bad))


def test_harness_errors_are_logged_once_per_kind_of_exception(caplog):
    class Raising(Mapping):
        def __init__(self, exc):
            self.exc = exc

        def __getitem__(self, key):
            raise KeyError(key)

        def __iter__(self):
            raise self.exc

        def __len__(self):
            return 1

        def items(self):
            raise self.exc

    store = MailStore()
    box = Mailbox(store)
    box.address("scan")
    with caplog.at_level("ERROR", logger="mailproof"):
        for exc in (RuntimeError("one"), RuntimeError("two"), ValueError("three")):
            box.on_request("POST", "http://app.test/x", {"json": Raising(exc)})
    assert store.harness_errors == 3
    logged = [r.getMessage() for r in caplog.records if "harness error" in r.getMessage()]
    assert len(logged) == 2 and "RuntimeError: one" in logged[0] and "ValueError: three" in logged[1]


def test_an_unexpected_mail_without_a_trigger_of_its_own_is_measured_from_the_last_mark_before_the_check():
    store = MailStore()
    box = Mailbox(store)
    box.mark(at=100.0)
    box.mark(at=time.time() + 1000)  # timed after the check began: not what caused the mail
    to = box.address("late")
    store.deliver(_mail(to, received_at=130.0))
    with pytest.raises(UnexpectedMail) as caught:
        box.expect_no_mail(to, within=0.1)
    assert caught.value.messages[0].triggered_at == 100.0


def test_after_an_expect_block_a_request_carrying_the_address_is_its_next_trigger():
    store = MailStore()
    now = [1000.0]
    box = Mailbox(store, clock=lambda: now[0])
    to = box.address("again")
    with box.expect(to, within=100):
        box.on_request("POST", f"http://app.test/signup?email={to}")
        store.deliver(_mail(to, received_at=1001.0))
    now[0] = 2000.0
    box.on_request("POST", f"http://app.test/resend?email={to}")
    now[0] = 2500.0
    box.on_request("GET", "http://app.test/other")
    store.deliver(_mail(to, received_at=2600.0))
    assert box.wait_for(to, within=1000).latency == 600.0


def test_criteria_errors_on_extra_mail_are_logged_once_per_kind_of_exception(caplog):
    errors = iter([RuntimeError("one"), RuntimeError("two"), ValueError("three")])

    def picky(msg: Message) -> bool:
        if msg.subject == "boom":
            raise next(errors)
        return True

    store = MailStore()
    box = Mailbox(store)
    with caplog.at_level("ERROR", logger="mailproof"):
        for _ in range(3):
            to = box.address("picky")
            with pytest.raises(HarnessError):
                with box.expect(to, match=picky, **SHORT):
                    store.deliver(_mail(to, subject="fine"))
                    store.deliver(_mail(to, subject="boom"))
    assert store.harness_errors == 3
    logged = [r.getMessage() for r in caplog.records if "harness error" in r.getMessage()]
    assert len(logged) == 2 and "RuntimeError: one" in logged[0] and "ValueError: three" in logged[1]


def test_an_address_is_labelled_user_by_default():
    assert Mailbox(MailStore()).address().startswith("user+")


def test_a_timeout_shorter_than_the_slo_is_refused_saying_why():
    with pytest.raises(ValueError) as caught:
        Mailbox(MailStore()).wait_for("a@x", within=5, timeout=1)
    assert str(caught.value) == ("timeout must be at least within (5 s), not 1: the wait has to outlast the SLO to "
                                 "tell late mail from lost mail")


def test_a_wait_without_a_timeout_blocks_until_the_mail_comes(signalling_store):
    import math
    import threading

    box = Mailbox(signalling_store)
    to = box.address("forever")
    sender = threading.Thread(target=lambda: (signalling_store.await_waiters(1), signalling_store.deliver(_mail(to))))
    sender.start()
    got = box.wait_for(to, within=60, timeout=math.inf)
    sender.join()
    assert got.rcpt_tos == (to,)


def test_criteria_that_raise_fail_the_wait_as_a_harness_error_not_a_verdict():
    def broken(msg):
        raise KeyError("X-Flag")

    store = MailStore()
    box = Mailbox(store)
    to = box.address("broken")
    msg = store.deliver(_mail(to))
    with pytest.raises(HarnessError) as caught:
        box.wait_for(to, match=broken, **SHORT)
    assert str(caught.value) == (
        f"the harness could not check {describe(msg)} against to {to} match=broken: KeyError: 'X-Flag'. This is a "
        "fault of the test's criteria (a match= callable?) or of mailproof, not a verdict on the product.")


def test_mail_exactly_at_the_slo_is_on_time_and_later_mail_is_late_with_one_line_each():
    store = MailStore()
    box = Mailbox(store)
    heard = []
    box.observe(lambda *event: heard.append(event))
    to = box.address("slo")
    box.mark(to, at=100.0)
    on_time = store.deliver(_mail(to, received_at=105.0))
    assert box.wait_for(to, within=5) is on_time  # latency 5.0 == within: not late
    box.mark(to, at=200.0)
    store.deliver(_mail(to, subject="A", received_at=203.0))
    late = store.deliver(_mail(to, subject="B", received_at=206.0))
    with pytest.raises(MailLate) as caught:
        box.wait_for(to, within=5, count=2)
    assert str(caught.value) == (f"to {to}: arrived 6.000 s after the trigger, more than the 5 s allowed "
                                 f"({late.describe()})\n1 of the 2 mails were late.")
    assert caught.value.late == [late]
    assert [(e, m.subject, x) for e, m, _, x in heard[1:]] == [("delivered", "A", None), ("late", "B", caught.value)]
    box.mark(to, at=300.0)
    single = store.deliver(_mail(to, subject="C", received_at=310.0))
    with pytest.raises(MailLate) as caught:
        box.wait_for(to, within=5)
    assert str(caught.value) == (f"to {to}: arrived 10.000 s after the trigger, more than the 5 s allowed "
                                 f"({single.describe()})")


def test_without_a_trigger_mail_at_the_slo_after_the_wait_began_is_on_time():
    store = MailStore()
    box = Mailbox(store, clock=lambda: 100.0)
    to = box.address("blind")
    store.deliver(_mail(to, received_at=105.0))
    assert box.wait_for(to, within=5).latency is None
    store.deliver(_mail(to, received_at=105.5))
    with pytest.raises(MailLate, match="after the wait began"):
        box.wait_for(to, within=5)


def test_a_mailboxs_default_slo_is_ten_seconds_and_its_wait_thirty():
    box = Mailbox(MailStore())
    assert box.default_within == 10.0
    assert box.wait_timeout() == 30.0
