"""MailStore and Mailbox: push-based waits, claiming, near misses, latency, retention, addresses.

Deliveries go straight into the store (``MailStore.deliver``) except where the real sink is the
point. ``signalling_store`` (tests/conftest.py) is a real MailStore that releases a semaphore
whenever a waiter registers, so a test can deliver exactly when a wait is blocked, with no sleep.
"""

from __future__ import annotations

import queue
import random
import re
import smtplib
import threading
import time

import pytest

from mailproof.addresses import TOKEN, AddressBook, is_handed_out_by
from mailproof.capture.embedded import EmbeddedSink
from mailproof.errors import MailLate, MailNotDelivered, UnexpectedMail
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message

WAKE_BOUND = 0.5  # generous: the wake itself takes well under a millisecond


def in_thread(fn, *args, **kwargs) -> "queue.Queue":
    """Run ``fn`` on a daemon thread; the queue receives ("ok", result) or ("error", exc)."""
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


# -- waking --------------------------------------------------------------------------------


def test_wait_for_wakes_on_delivery_from_another_thread(signalling_store, make_message):
    store = signalling_store
    view = Mailbox(store)
    addr = view.address("wake")
    delivered_at = queue.Queue()

    def deliver_when_blocked():
        store.await_waiters(1)
        msg = make_message(addr, "Wake up")
        delivered_at.put(time.perf_counter())
        store.deliver(msg)
        return msg

    sent = in_thread(deliver_when_blocked)
    got = view.wait_for(to=addr, subject="Wake", within=30)
    resumed = time.perf_counter()
    assert got is result_of(sent)
    assert resumed - delivered_at.get(timeout=1) < WAKE_BOUND  # with within=30, a poll would show
    assert got.seq in view.claimed


def test_end_to_end_wait_with_real_sink_and_smtplib(make_raw):
    with EmbeddedSink() as backend:
        assert backend.smtp_host == "127.0.0.1"
        view = Mailbox(backend.store)
        addr = view.address("e2e")
        go = threading.Event()

        def send():
            if not go.wait(timeout=10):
                raise AssertionError("the test never started waiting")
            with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
                started = time.time()
                client.sendmail("app@example.test", [addr], make_raw(addr, "Welcome aboard", html="<p>hi</p>"))
                return started, time.time()

        sent = in_thread(send)
        view.mark()
        go.set()  # the SMTP exchange takes far longer than registering the wait; either way it must work
        msg = view.wait_for(to=addr, subject="Welcome", within=10)
        started, finished = result_of(sent)
    assert msg.rcpt_tos == (addr,) and msg.mail_from == "app@example.test"
    assert msg.subject == "Welcome aboard" and msg.html.startswith("<p>hi</p>")
    assert started <= msg.received_at <= finished
    assert 0 <= msg.latency < 10


def test_embedded_sink_feeds_the_store_it_is_given():
    store = MailStore()  # empty, hence falsy (MailStore has __len__)
    backend = EmbeddedSink(store=store)
    assert backend.store is store


# -- failures explain themselves -----------------------------------------------------------


def test_timeout_names_criteria_and_lists_near_misses(make_message):
    store = MailStore()
    view = Mailbox(store)
    target, other = view.address("target"), view.address("other")
    view.mark()
    store.deliver(make_message(other, "Confirm your email"))
    store.deliver(make_message(target, "Welcome"))
    started = time.monotonic()
    with pytest.raises(MailNotDelivered) as missing:
        view.wait_for(to=target, subject="Confirm", within=0.2)
    assert time.monotonic() - started >= 0.2
    lines = str(missing.value).splitlines()
    assert lines[0] == f"no mail to {target} subject containing 'Confirm' within 0.2 s"
    assert lines[1] == "2 other mail(s) arrived in that window:"
    # Mail to the same address comes first, each with the reason it did not match.
    assert target in lines[2] and "subject 'Welcome' does not contain 'Confirm'" in lines[2]
    assert re.search(rf"to \['{re.escape(other)}'\] not '{re.escape(target)}'", lines[3])
    assert len(lines) == 4


def test_timeout_with_nothing_arrived_says_so():
    view = Mailbox(MailStore())
    addr = view.address()
    with pytest.raises(MailNotDelivered, match=r"no mail to .* within 0\.05 s\nno other mail arrived"):
        view.wait_for(to=addr, within=0.05)


def test_near_misses_are_capped(make_message):
    store = MailStore()
    view = Mailbox(store)
    view.mark()
    for i in range(15):
        store.deliver(make_message(f"x{i}@example.test", "noise"))
    with pytest.raises(MailNotDelivered) as missing:
        view.wait_for(to=view.address(), within=0.01)
    text = str(missing.value)
    assert "15 other mail(s)" in text and text.count("\n  - ") == 10 and "... and 5 more" in text


def test_partial_count_timeout(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    store.deliver(make_message(addr, "one"))
    with pytest.raises(MailNotDelivered, match=rf"only 1 of 2 mails to {re.escape(addr)} within 0\.05 s"):
        view.wait_for(to=addr, count=2, within=0.05)


def test_count_must_be_positive():
    with pytest.raises(ValueError, match="expect_no_mail"):
        Mailbox(MailStore()).wait_for(count=0)


# -- count, claiming, views ----------------------------------------------------------------


def test_count_returns_list_in_arrival_order(signalling_store, make_message):
    store = signalling_store
    view = Mailbox(store)
    addr = view.address()
    store.deliver(make_message(addr, "first"))

    def deliver_rest():
        store.await_waiters(1)  # the wait took "first" and is now blocked for two more
        for subject in ("second", "third"):
            store.deliver(make_message(addr, subject))

    in_thread(deliver_rest)
    got = view.wait_for(to=addr, count=3, within=10)
    assert isinstance(got, list)
    assert [m.subject for m in got] == ["first", "second", "third"]
    assert [m.seq for m in got] == sorted(m.seq for m in got)


def test_fifty_concurrent_waiters_each_get_their_own(signalling_store, make_message):
    store = signalling_store
    view = Mailbox(store)
    addrs = [view.address(f"w{i}") for i in range(50)]
    results = [in_thread(view.wait_for, to=a, within=20) for a in addrs]
    store.await_waiters(50)
    order = list(range(50))
    random.Random(3).shuffle(order)
    for i in order:
        store.deliver(make_message(addrs[i], f"for {i}"))
    got = [result_of(r, timeout=20) for r in results]
    for i, msg in enumerate(got):
        assert msg.rcpt_tos == (addrs[i],) and msg.subject == f"for {i}"
    assert len({m.seq for m in got}) == 50


def test_same_message_is_not_returned_twice(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    view.mark()
    first = store.deliver(make_message(addr, "Confirm"))
    assert view.wait_for(to=addr, within=1) is first
    with pytest.raises(MailNotDelivered, match="already claimed by an earlier wait"):
        view.wait_for(to=addr, within=0.05)
    second = store.deliver(make_message(addr, "Confirm again"))
    assert view.wait_for(to=addr, within=1) is second
    # received() lists what arrived whether claimed or not; it does not claim.
    assert view.received(to=addr) == [first, second]


def test_concurrent_waits_on_one_mailbox_never_share_a_message(signalling_store, make_message):
    # Two waits on one view for the same address, both blocked; two mails arrive. Each wait
    # must claim a different mail.
    store = signalling_store
    view = Mailbox(store)
    addr = view.address()
    waits = [in_thread(view.wait_for, to=addr, within=3) for _ in range(2)]
    store.await_waiters(2)
    store.deliver(make_message(addr, "one"))
    store.deliver(make_message(addr, "two"))
    outcomes = [w.get(timeout=10) for w in waits]
    got = [value for kind, value in outcomes if kind == "ok"]
    assert len(got) == 2, f"a wait failed: {outcomes}"
    assert sorted(m.subject for m in got) == ["one", "two"], "both waits returned the same message"


def test_two_mailboxes_may_each_see_the_same_message(make_message):
    store = MailStore()
    a, b = Mailbox(store), Mailbox(store)
    msg = store.deliver(make_message("shared@example.test"))
    assert a.wait_for(to="shared@example.test", within=1) is msg
    assert b.wait_for(to="shared@example.test", within=1) is msg


def test_view_opened_later_does_not_see_earlier_mail(make_message):
    store = MailStore()
    early = Mailbox(store)
    addr = early.address()
    old = store.deliver(make_message(addr, "old"))
    late = Mailbox(store)
    assert late.messages == [] and late.received(to=addr) == []
    with pytest.raises(MailNotDelivered):
        late.wait_for(to=addr, within=0.05)
    assert early.wait_for(to=addr, within=1) is old
    new = store.deliver(make_message(addr, "new"))
    assert late.wait_for(to=addr, within=1) is new
    assert late.messages == [new]


def test_wait_matches_envelope_recipient_case_insensitively(make_message):
    store = MailStore()
    view = Mailbox(store)
    msg = store.deliver(make_message("Mixed.Case@Example.TEST"))
    assert view.wait_for(to="mixed.case@example.test", within=1) is msg


def test_header_recipients_used_when_no_envelope(make_raw):
    store = MailStore()
    view = Mailbox(store)
    msg = store.deliver(Message(make_raw("inbox@example.test", "via IMAP"), received_at=time.time()))
    assert view.wait_for(to="inbox@example.test", within=1) is msg


# -- expect_no_mail ------------------------------------------------------------------------


def test_expect_no_mail_passes_when_nothing_matching_comes(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    store.deliver(make_message("someone-else@example.test"))
    started = time.monotonic()
    assert view.expect_no_mail(to=addr, within=0.2) is None
    assert time.monotonic() - started >= 0.2


def test_expect_no_mail_fails_the_moment_one_arrives(signalling_store, make_message):
    store = signalling_store
    view = Mailbox(store)
    addr = view.address("nope")
    within = 10.0

    def deliver_when_blocked():
        store.await_waiters(1)
        store.deliver(make_message(addr, "Should not be sent"))

    in_thread(deliver_when_blocked)
    started = time.monotonic()
    with pytest.raises(UnexpectedMail) as unexpected:
        view.expect_no_mail(to=addr, within=within)
    elapsed = time.monotonic() - started
    assert elapsed < WAKE_BOUND < within
    assert f"expected no mail to {addr} within 10 s" in str(unexpected.value)
    assert "subject 'Should not be sent'" in str(unexpected.value)


def test_expect_no_mail_sees_mail_already_captured(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    store.deliver(make_message(addr, "early"))
    with pytest.raises(UnexpectedMail, match="early"):
        view.expect_no_mail(to=addr, within=5)


# -- latency -------------------------------------------------------------------------------


def test_mail_late_when_latency_from_mark_exceeds_within(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    view.mark(at=time.time() - 5)
    store.deliver(make_message(addr, "Slow"))
    with pytest.raises(MailLate) as late:
        view.wait_for(to=addr, within=1)
    assert re.match(rf"to {re.escape(addr)}: arrived 5\.\d{{3}} s after the trigger, more than the 1 s allowed",
                    str(late.value))
    assert "subject 'Slow'" in str(late.value)


def test_latency_is_measured_from_the_latest_mark_before_capture(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    received = 1_000_000.0
    for at in (received + 50, received - 10, received - 3, received - 7):  # any order
        view.mark(at=at)
    store.deliver(make_message(addr, received_at=received))
    msg = view.wait_for(to=addr, within=5)
    assert msg.triggered_at == received - 3
    assert msg.latency == pytest.approx(3.0)
    assert view.trigger_for(received - 8) == received - 10
    assert view.trigger_for(received - 11) is None


def test_the_wait_and_the_rehearsal_ledger_give_the_same_latency_for_the_same_message(make_message):
    from mailproof.load.ledger import Ledger

    store, ledger = MailStore(), Ledger()
    store.add_listener(ledger.on_arrival)
    view = Mailbox(store, default_within=5)
    waited, after_flow = view.address("waited"), view.address("late")
    t0 = 1_700_000_000.0
    for at in (t0 + 0.25, t0, t0 + 2.0):  # marks in any order: HTTP requests of the flow
        view.mark(at=at)
    store.deliver(make_message(waited, received_at=t0 + 1.5))  # 1.25 s after the mark at +0.25
    store.deliver(make_message(waited, received_at=t0 + 2.75))  # 0.75 s after the mark at +2.0
    first, second = view.wait_for(to=waited, count=2, within=5)
    assert (first.latency, second.latency) == (1.25, 0.75)  # exact in binary floating point
    ledger.record_flow("flow", view)
    view.close()
    # Mail the flow never waited for (it came after the run ended) is measured the same way.
    store.deliver(make_message(after_flow, received_at=t0 + 9.5))

    assert ledger.latencies(waited) == [first.latency, second.latency]
    assert ledger.latencies(after_flow) == [7.5]
    samples = {(s.address, s.latency) for s in ledger.timeline().samples}
    assert samples == {(waited, 1.25), (waited, 0.75), (after_flow, 7.5)}
    assert ledger.reconcile().flows["flow"].late == 1  # 7.5 s > the 5 s allowed; the others are in time


def test_no_mark_means_no_latency_and_never_late(make_message):
    store = MailStore()
    view = Mailbox(store)
    addr = view.address()
    store.deliver(make_message(addr, received_at=time.time() - 100))
    msg = view.wait_for(to=addr, within=0.5)
    assert msg.latency is None


# -- retention -----------------------------------------------------------------------------


def test_eviction_spares_live_addresses_and_is_counted(make_message):
    store = MailStore(max_messages=5)
    view = Mailbox(store)
    live = view.address("live")
    kept = store.deliver(make_message(live, "keep me"))
    for i in range(10):
        store.deliver(make_message(f"stranger{i}@example.test"))
    assert store.evicted == 6 and store.delivered == 11
    assert len(store) == 5
    assert kept in store.since(0)
    assert view.wait_for(to=live, within=1) is kept
    # Once the view closes its addresses are no longer live: the oldest mail goes first.
    view.close()
    store.deliver(make_message("stranger10@example.test"))
    assert kept not in store.since(0)
    assert store.evicted == 7 and len(store) == 5


def test_eviction_never_drops_when_everything_is_live(make_message):
    store = MailStore(max_messages=2)
    view = Mailbox(store)
    msgs = [store.deliver(make_message(view.address(), f"m{i}")) for i in range(4)]
    assert store.evicted == 0 and store.since(0) == msgs


def test_store_returns_to_its_bound_once_addresses_are_released(make_message):
    store = MailStore(max_messages=2)
    view = Mailbox(store)
    for i in range(4):
        store.deliver(make_message(view.address(), f"m{i}"))
    view.close()
    for i in range(3):
        store.deliver(make_message(f"later{i}@example.test"))
    assert len(store) <= store.max_messages, f"{len(store)} messages kept, bound is {store.max_messages}"


# -- addresses -----------------------------------------------------------------------------


def test_addresses_unique_fixed_width_and_prefix_free():
    book = AddressBook(domain="mailproof.test")
    addrs = [book.address("signup") for _ in range(2000)]
    assert len(set(addrs)) == 2000
    assert len({len(a) for a in addrs}) == 1
    ordered = sorted(addrs)
    # If a were a prefix of b, every string sorted between them would share that prefix, so
    # checking neighbours covers all pairs.
    assert not [(a, b) for a, b in zip(ordered, ordered[1:]) if b.startswith(a)]
    assert all(re.fullmatch(rf"signup\+{book.run_id}\.\d{{6}}@mailproof\.test", a) for a in addrs)
    assert all(is_handed_out_by(a, book.run_id) for a in addrs)
    assert not is_handed_out_by(addrs[0], "zzzzzz")


def test_addresses_with_mixed_labels_are_prefix_and_substring_free():
    book = AddressBook()
    labels = ["a", "ab", "b", "user", "Sign Up!", "x" * 20]
    addrs = [book.address(labels[i % len(labels)]) for i in range(600)]
    ordered = sorted(addrs)
    assert not [(a, b) for a, b in zip(ordered, ordered[1:]) if b.startswith(a)]
    assert not [(a, b) for a in addrs[:100] for b in addrs if a != b and a in b]
    assert "sign-up+" + book.run_id in addrs[4]


def test_mailbox_addresses_use_the_label(make_message):
    view = Mailbox(MailStore())
    addr = view.address("Reset Password")
    assert addr.startswith("reset-password+") and view.handed_out == [addr]


def test_addresses_from_many_threads_are_unique():
    book = AddressBook()
    out: "queue.Queue[list[str]]" = queue.Queue()
    threads = [threading.Thread(target=lambda: out.put([book.address() for _ in range(250)])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    addrs = [a for _ in threads for a in out.get(timeout=1)]
    assert len(addrs) == len(set(addrs)) == 2000


def test_address_books_in_different_processes_differ_and_plus_addressing():
    one, two = AddressBook(), AddressBook()
    assert one.run_id != two.run_id and len(one.run_id) == 6
    shared = AddressBook(domain="Example.COM", local="qa")
    addr = shared.address("reset")
    assert re.fullmatch(rf"qa\+reset\.{shared.run_id}\.000001@example\.com", addr)
    assert TOKEN.search(addr).group(1) == shared.run_id
    with pytest.raises(ValueError, match="invalid mail domain"):
        AddressBook(domain="a@b")
