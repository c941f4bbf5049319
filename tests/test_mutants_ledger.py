"""The ledger, count by count: what benchmarks/mutation.py found no test checking.

Every count is asserted with two of a kind (two resends, two strays, two unawaited mails...), so
a count that is set instead of added up shows; every category is fed mail that just misses it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mailproof.load.ledger import FAILED, INTERRUPTED, PASSED, Claim, Expectation, HandedOut, Ledger, arrival_key
from mailproof.errors import MailNotDelivered
from mailproof.load.results import HttpReply, ResultsError
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message

T0 = 1_800_000_000.0


def mail(to: str | None, t: float | None, subject: str | None = "Receipt", seq: int | None = None,
         message_id: str | None = None) -> Message:
    head = b""
    if subject is not None:
        head += b"Subject: " + subject.encode() + b"\r\n"
    if message_id is not None:
        head += b"Message-ID: " + message_id.encode() + b"\r\n"
    extra = {"service_seq": seq} if seq is not None else {}
    return Message(head + b"\r\nhi\r\n", rcpt_tos=[to] if to else [], received_at=t, extra=extra)


class Run:
    """One flow run on a real Mailbox, recorded as FlowUser records it."""

    def __init__(self, ledger: Ledger, store: MailStore, flow: str = "order") -> None:
        self.ledger, self.flow = ledger, flow
        self.mailbox = Mailbox(store, default_within=5)
        self.claims: list = []

    def address(self, trigger: float | None = None, expect: int | None = 1, within: float = 5.0,
                label: str | None = None) -> str:
        address = self.mailbox.address(label or self.flow)
        if trigger is not None:
            self.mailbox.mark(address, at=trigger)
        if expect is not None:
            self.mailbox.expected[address.lower()] = (expect, within)
        return address

    def claim(self, address: str, msg: Message, latency: float, late: bool = False) -> None:
        self.claims.append((address, Claim(key=f"s{msg.extra['service_seq']}", t=msg.received_at, latency=latency,
                                           late=late, subject=msg.subject, message_id=msg.message_id)))

    def record(self, outcome: str = PASSED, last_trigger: float | None = None, replies=None) -> None:
        if last_trigger is not None:
            self.mailbox.triggers.add(last_trigger)
        self.ledger.record_flow(self.flow, self.mailbox, outcome=outcome, claims=self.claims, replies=replies)


@pytest.fixture
def ls():
    ledger, store = Ledger(grace=0.2), MailStore()
    store.add_listener(ledger.on_arrival)
    return ledger, store


# -- expectations and arrivals --------------------------------------------------------------------


def test_each_expected_email_has_the_reply_of_its_own_trigger():
    first, second = HttpReply(method="POST", path="/a", status=200, body=""), HttpReply(
        method="POST", path="/b", status=500, body="")
    exp = Expectation(flow="f", count=3, within=5, trigger=T0, replies=[first, second], reply=first)
    assert [exp.reply_of(k) for k in range(3)] == [first, second, first]


def test_known_triggers_of_an_expectation_of_no_mail_is_its_trigger():
    assert Expectation(flow="f", count=0, within=1, trigger=T0).known_triggers() == [T0]
    assert Expectation(flow="f", count=2, within=1, trigger=None).known_triggers() == []
    assert Expectation(flow="f", count=2, within=1, trigger=None, triggers=[T0]).known_triggers() == [T0, T0]


def test_an_arrival_is_keyed_by_the_sink_services_seq_else_by_its_capture_time():
    assert arrival_key(mail("a@x", T0, seq=7)) == "s7"
    assert arrival_key(mail("a@x", T0 + 0.5)) == f"t{T0 + 0.5!r}"
    assert arrival_key(mail("a@x", None)) is None
    assert arrival_key(SimpleNamespace(received_at=T0)) == f"t{T0!r}"  # not a Message: no extra


def test_an_arrival_keeps_its_subject_and_message_id(ls):
    ledger, store = ls
    store.deliver(mail("a@x", T0, subject="Hello", message_id="<m1@app>", seq=1))
    store.deliver(mail("a@x", T0 + 1, subject=None, seq=2))
    first, second = ledger.arrivals["a@x"]
    assert (first.subject, first.message_id, first.key, first.t) == ("Hello", "<m1@app>", "s1", T0)
    assert (second.subject, second.message_id) == ("", None)


def test_mail_the_harness_cannot_place_is_counted_unparsed_one_by_one():
    ledger = Ledger()
    ledger.on_arrival(mail(None, T0, seq=1))  # no recipient
    ledger.on_arrival(mail("a@x", None, seq=2))  # no capture time, though a seq
    ledger.on_arrival(mail("a@x", None))  # neither
    ledger.on_arrival(SimpleNamespace(received_at=T0, recipients=frozenset({"a@x"})))  # no subject to read

    class Unreadable:
        received_at = T0

        @property
        def recipients(self):
            raise ValueError("cannot read")

    ledger.on_arrival(Unreadable())
    assert ledger.unparsed == 5
    assert not any(ledger.arrivals.values())


def test_an_address_is_outstanding_until_its_last_expected_email_comes(ls):
    ledger, store = ls
    run = Run(ledger, store)
    two = run.address(trigger=T0, expect=2)
    one = run.address(trigger=T0, expect=1)
    run.record()
    assert ledger.outstanding == 2
    store.deliver(mail(two, T0 + 1, seq=1))
    assert ledger.outstanding == 2 and ledger.owes(two)
    store.deliver(mail(one, T0 + 1, seq=2))
    assert ledger.outstanding == 1
    store.deliver(mail(two, T0 + 2, seq=3))
    assert ledger.outstanding == 0 and not ledger.owes(two)
    assert ledger.settle(timeout=0.3, quiet=60)  # met: the quiet period is cut by the timeout


def test_settle_without_a_timeout_waits_the_grace_and_says_not_met(ls):
    ledger, store = ls
    run = Run(ledger, store)
    run.address(trigger=T0)
    run.record()
    assert ledger.settle() is False


# -- owed ------------------------------------------------------------------------------------------


def test_owes_and_owed_trigger_and_lost_addresses_follow_the_emails_still_owed(ls):
    ledger, store = ls
    run = Run(ledger, store)
    late_one = run.address(trigger=T0 + 5, expect=1, label="b")
    two = run.address(trigger=T0, expect=2, label="c")
    run.mailbox.mark(two, at=T0)
    done = run.address(trigger=T0 + 1, expect=1, label="a")
    quiet = run.address(trigger=T0, expect=0, label="d")
    run.record()
    ledger.expectations[two.lower()].triggers = [T0, T0 + 3]
    store.deliver(mail(two, T0 + 1, seq=1))
    store.deliver(mail(done, T0 + 2, seq=2))
    assert ledger.owes(two.upper()) and ledger.owes(late_one)
    assert not ledger.owes(done) and not ledger.owes(quiet) and not ledger.owes("stranger@x")
    assert ledger.owed_trigger(two.upper()) == T0 + 3  # the second email's
    assert ledger.owed_trigger(late_one) == T0 + 5
    assert ledger.owed_trigger(done) is None and ledger.owed_trigger(quiet) is None
    assert ledger.owed_trigger("stranger@x") is None
    assert ledger.lost_addresses() == [two.lower(), late_one.lower()]  # by the trigger of what is owed


# -- the reconciliation -----------------------------------------------------------------------------


def test_lost_emails_carry_their_own_reply_and_what_the_sink_said(ls):
    ledger, store = ls
    run = Run(ledger, store)
    address = run.address(trigger=T0, expect=2)
    other = run.address(trigger=T0 + 1, expect=1)
    run.mailbox.triggers.add(T0 + 1)
    ledger_replies = {T0: HttpReply(method="POST", path="/signup", status=502, body="Bad gateway")}
    run.record(replies=ledger_replies)
    counts = ledger.reconcile(sink_notes={other.lower(): "no message to this address (checked)"})
    lost = {(e.address, e.sink, e.reply.status if e.reply else None) for e in counts.lost_emails}
    assert lost == {(address.lower(), "not checked", 502), (other.lower(), "no message to this address (checked)", None)}
    assert len(counts.lost_emails) == 3


def test_counts_add_up_two_of_each(ls):
    ledger, store = ls
    run = Run(ledger, store)
    receipt = run.address(trigger=T0)
    quiet_one, quiet_two = run.address(trigger=T0, expect=0), run.address(trigger=T0, expect=0)
    gap_one, gap_two = run.address(trigger=T0), run.address(trigger=T0)
    store.deliver(mail(receipt, T0 + 0.3, subject="Receipt FS-1", message_id="<r1@app>", seq=1))
    run.record()
    store.deliver(mail(receipt, T0 + 0.5, subject="Receipt FS-1 again", message_id="<r1@app>", seq=2))
    store.deliver(mail(receipt, T0 + 0.6, subject="Receipt FS-1", message_id="<r2@app>", seq=3))
    store.deliver(mail(receipt, T0 + 0.7, subject="News", seq=4))
    store.deliver(mail(receipt, T0 + 0.8, subject="More news", seq=5))
    counts = ledger.reconcile(unverified=[gap_one.lower(), gap_two.lower()])
    row = counts.flows["order"]
    assert (row.negative_checks, row.unverified, row.lost, row.duplicated, row.unexpected) == (2, 2, 0, 2, 2)
    assert counts.duplicated_addresses == {receipt.lower(): 2}
    assert counts.unexpected_addresses == {receipt.lower(): 2}
    assert [(s.flow, s.t, s.subject) for s in counts.unexpected_emails] == [
        ("order", T0 + 0.7, "News"), ("order", T0 + 0.8, "More news")]


def test_strays_of_strangers_handed_out_and_failed_runs_are_counted_one_by_one(ls):
    ledger, store = ls
    passed, failed = Run(ledger, store, "passed_flow"), Run(ledger, store, "failed_flow")
    handed = passed.address(expect=None)
    failed_handed = failed.address(expect=None)
    stopped = Run(ledger, store, "stopped_flow")
    stopped_handed = stopped.address(expect=None)
    passed.record()
    failed.record(FAILED)
    stopped.record(INTERRUPTED)
    for seq, to in enumerate(["w2-1@x", "stranger@x", handed, "w2-2@x", failed_handed, stopped_handed] * 2):
        store.deliver(mail(to, T0 + seq, seq=seq + 10 * (seq >= 6)))
    foreign = lambda address: address.startswith("w2-") or address == handed.lower()  # noqa: E731
    counts = ledger.reconcile(foreign=foreign)
    assert counts.unexpected_addresses == {"stranger@x": 2, handed.lower(): 2}  # handed out here: never foreign
    assert counts.unexpected == 4
    assert counts.flows["passed_flow"].unexpected == 2
    assert counts.flows["failed_flow"].unawaited == 2 and counts.flows["failed_flow"].unexpected == 0
    assert counts.flows["stopped_flow"].interrupted == 2
    assert ledger.count_foreign(foreign) == 4
    assert ledger.count_foreign(lambda address: True) == 6  # strangers only: w2-*, stranger@x


def test_what_an_extra_email_is_depends_on_when_the_run_caused_it(ls):
    ledger, store = ls
    # A failed run whose last trigger is its last wait's: mail after it is a copy or a stray.
    failed = Run(ledger, store, "failed_flow")
    waited = failed.address(trigger=T0 + 2)
    store.deliver(mail(waited, T0 + 2.5, subject="Confirm", seq=1))
    failed.claim(waited, store.since(0)[-1], 0.5)
    failed.record(FAILED, last_trigger=T0 + 2)
    store.deliver(mail(waited, T0 + 3, subject="Confirm", seq=2))
    # A failed run caused more mail exactly at its last trigger, after its last wait's: unawaited.
    later = Run(ledger, store, "later_flow")
    early = later.address(trigger=T0)
    store.deliver(mail(early, T0 + 0.5, subject="First", seq=3))
    later.claim(early, store.since(0)[-1], 0.5)
    later.record(FAILED, last_trigger=T0 + 4)
    store.deliver(mail(early, T0 + 4, subject="Second", seq=4))
    # An interrupted run after its trigger: a resend is a copy, mail it caused later is interrupted.
    stopped = Run(ledger, store, "stopped_flow")
    armed = stopped.address(trigger=T0)
    store.deliver(mail(armed, T0 + 0.5, subject="Hi", seq=5))
    stopped.claim(armed, store.since(0)[-1], 0.5)
    stopped.record(INTERRUPTED, last_trigger=T0 + 6)
    store.deliver(mail(armed, T0 + 1, subject="Hi", seq=6))
    store.deliver(mail(armed, T0 + 7, subject="Bye", seq=7))
    # A passed run with no trigger known: extra mail is a copy, never interrupted.
    untimed = Run(ledger, store, "untimed_flow")
    blind = untimed.address(trigger=None)
    untimed.record()
    store.deliver(mail(blind, T0 + 1, subject="Once", seq=8))
    store.deliver(mail(blind, T0 + 2, subject="Once", seq=9))
    flows = ledger.reconcile().flows
    assert (flows["failed_flow"].duplicated, flows["failed_flow"].unawaited) == (1, 0)
    assert (flows["later_flow"].unawaited, flows["later_flow"].unexpected) == (1, 0)
    assert (flows["stopped_flow"].duplicated, flows["stopped_flow"].interrupted, flows["stopped_flow"].unawaited) == (1, 1, 0)
    assert (flows["untimed_flow"].delivered, flows["untimed_flow"].duplicated, flows["untimed_flow"].interrupted) == (1, 1, 0)


# -- latency and the timeline ----------------------------------------------------------------------


def test_the_timeline_counts_every_send_and_delivery_per_second(ls):
    ledger, store = ls
    quiet = Run(ledger, store, "quiet_flow")
    quiet.address(trigger=T0, expect=0)
    quiet.record()
    run = Run(ledger, store)
    a, b = run.address(trigger=T0), run.address(trigger=T0)
    owed_one, owed_two = run.address(trigger=T0 + 5), run.address(trigger=T0 + 5)
    store.deliver(mail(a, T0 + 3.2, seq=1))
    run.claim(a, store.since(0)[-1], 0.5)  # the flow measured it from a later request of its own
    store.deliver(mail(b, T0 + 3.4, seq=2))
    run.record()
    blind = Run(ledger, store, "blind_flow")
    untimed = blind.address(trigger=None)
    blind.record()
    store.deliver(mail(untimed, T0 + 3.6, seq=3))
    timeline = ledger.timeline()
    assert timeline.sends == [(int(T0), 1), (int(T0) + 2, 1), (int(T0) + 5, 2)]
    assert timeline.deliveries == [(int(T0) + 3, 3)]
    assert [(s.flow, round(s.latency, 3)) for s in timeline.samples] == [("order", 0.5), ("order", 3.4)]
    assert {owed_one.lower(), owed_two.lower()} == set(ledger.lost_addresses())
    summary = ledger.latency_histograms().summary()["order"]
    assert summary.count == 2 and summary.p50 == pytest.approx(0.5, rel=1e-3)


# -- distributed runs --------------------------------------------------------------------------------


def test_a_snapshot_carries_everything_a_master_needs(ls):
    ledger, store = ls
    run = Run(ledger, store)
    awaited = run.address(trigger=T0)
    handed = run.address(expect=None)
    run.record()
    store.deliver(mail(awaited, T0 + 1, seq=1))
    ledger.on_arrival(mail(None, T0, seq=2))
    master = Ledger()
    master.handed["other@x"] = ledger.handed[handed.lower()]
    master.handed[awaited.lower()] = ledger.handed[handed.lower()]  # a worker handed it, another awaited it
    master.merge(ledger.snapshot())
    assert set(master.handed) == {handed.lower(), "other@x"}
    assert (master.handed[handed.lower()].flow, master.handed[handed.lower()].run) == ("order", PASSED)
    assert master.unparsed == 1
    assert [a.key for a in master.arrivals[awaited.lower()]] == ["s1"]
    assert master.reconcile().flows["order"].delivered == 1
    bigger = Ledger()
    bigger.unparsed = 3
    bigger.merge(ledger.snapshot())
    assert bigger.unparsed == 3


def test_a_handed_out_address_a_worker_reports_is_not_the_masters_if_it_expected_mail(ls):
    ledger, store = ls
    run = Run(ledger, store)
    address = run.address(trigger=T0)
    run.record()
    worker = Ledger()
    worker.handed[address.lower()] = HandedOut(flow="order", run=PASSED)
    snap = worker.snapshot()
    ledger.merge(snap)
    assert address.lower() not in ledger.handed


def test_a_bad_snapshot_is_refused_naming_its_source():
    with pytest.raises(ResultsError) as caught:
        Ledger().merge({"expectations": "nonsense"}, source="worker w1")
    assert "worker w1" in str(caught.value)
    with pytest.raises(ResultsError) as caught:
        Ledger().merge({"expectations": "nonsense"})
    assert str(caught.value).startswith("ledger snapshot: ")


def test_an_arrival_seen_twice_counts_once(ls):
    ledger, store = ls
    run = Run(ledger, store)
    address = run.address(trigger=T0, expect=2)
    run.record()
    store.deliver(mail(address, T0 + 1, seq=1))
    snap = ledger.snapshot()
    master = Ledger()
    master.merge(snap)
    master.merge(snap)  # two workers streamed the same email
    assert len(master.arrivals[address.lower()]) == 1
    assert master.reconcile().flows["order"].delivered == 1
    again = master.arrivals[address.lower()][0]
    assert master.recover(address.upper(), [again]) == 0
    assert master.recover(address, [again, type(again)(key="s9", t=T0 + 2)]) == 1
    assert master.reconcile().flows["order"].delivered == 2


def test_lost_emails_are_listed_by_trigger_and_strangers_strays_say_whose_they_are_not(ls):
    ledger, store = ls
    run = Run(ledger, store)
    later = run.address(trigger=T0 + 9, label="a")
    earlier = run.address(trigger=T0 + 1, label="b")
    run.record()
    store.deliver(mail("stranger@x", T0 + 4, subject="Who?", seq=1))
    counts = ledger.reconcile()
    assert [e.address for e in counts.lost_emails] == [earlier.lower(), later.lower()]
    (stray,) = counts.unexpected_emails
    assert (stray.address, stray.flow, stray.t, stray.subject, stray.why) == (
        "stranger@x", None, T0 + 4, "Who?", "no flow handed out this address")


def test_two_emails_measured_from_the_same_second_are_two_sends(ls):
    ledger, store = ls
    run = Run(ledger, store)
    a, b = run.address(trigger=T0), run.address(trigger=T0)
    store.deliver(mail(a, T0 + 1, seq=1))
    store.deliver(mail(b, T0 + 2, seq=2))
    run.record()
    assert ledger.timeline().sends == [(int(T0), 2)]


# -- what the waits returned, at the boundaries -----------------------------------------------------


def test_defaults_and_bad_outcomes():
    assert Ledger().grace == 5.0
    assert Expectation(flow="f", count=0, within=1, trigger=T0).slots() == []
    ledger = Ledger()
    with pytest.raises(ValueError) as caught:
        ledger.record_flow("f", Mailbox(MailStore()), outcome="crashed")
    assert str(caught.value) == "outcome must be one of ('passed', 'failed', 'interrupted'), not 'crashed'"


def test_a_claim_is_late_when_its_wait_said_so_or_its_latency_is_over_the_slo(ls):
    ledger, store = ls
    run = Run(ledger, store)
    said, over, at_slo = (run.address(trigger=T0, within=5.0) for _ in range(3))
    for seq, (address, latency, late) in enumerate([(said, 1.0, True), (over, 5.5, False), (at_slo, 5.0, False)]):
        store.deliver(mail(address, T0 + latency, seq=seq + 1))
        run.claim(address, store.since(0)[-1], latency, late=late)
    run.record()
    by_address = {d.address: d for d in ledger.deliveries()}
    assert {a: d.late for a, d in by_address.items()} == {said.lower(): True, over.lower(): True, at_slo.lower(): False}
    assert {d.trigger for d in by_address.values()} == {T0}
    assert ledger.reconcile().flows["order"].late == 2


def test_an_arrival_at_its_trigger_or_at_the_slo_is_delivered_on_time(ls):
    ledger, store = ls
    run = Run(ledger, store)
    at_trigger, at_slo, over = (run.address(trigger=T0, within=5.0) for _ in range(3))
    run.record()
    store.deliver(mail(at_trigger, T0, seq=1))
    store.deliver(mail(at_slo, T0 + 5.0, seq=2))
    store.deliver(mail(over, T0 + 5.25, seq=3))
    deliveries = {d.address: d for d in ledger.deliveries()}
    assert {a: (d.latency, d.late, d.trigger) for a, d in deliveries.items()} == {
        at_trigger.lower(): (0.0, False, T0), at_slo.lower(): (5.0, False, T0), over.lower(): (5.25, True, T0)}
    assert ledger.reconcile().flows["order"].late == 1


def test_a_resend_of_a_claimed_email_is_a_copy_after_another_email_arrived(ls):
    ledger, store = ls
    run = Run(ledger, store)
    address = run.address(trigger=T0, expect=2)
    store.deliver(mail(address, T0 + 1, subject="First", message_id="<1@app>", seq=1))
    run.claim(address, store.since(0)[-1], 1.0)
    run.record()
    store.deliver(mail(address, T0 + 2, subject="Second", message_id="<2@app>", seq=2))
    store.deliver(mail(address, T0 + 3, subject="First", message_id="<1@app>", seq=3))
    row = ledger.reconcile().flows["order"]
    assert (row.delivered, row.duplicated, row.unexpected) == (2, 1, 0)


def test_each_lost_email_carries_the_reply_to_its_own_trigger(ls):
    ledger, store = ls
    run = Run(ledger, store)
    box = run.mailbox
    address = box.address("two")
    for at in (T0, T0 + 1):
        box.mark(address, at=at)
        with pytest.raises(MailNotDelivered):
            box.wait_for(address, within=0.05, timeout=0.05)
    assert box.triggers_of(address) == [T0, T0 + 1]
    first, second = (HttpReply(method="POST", path=p, status=s, body="") for p, s in (("/a", 200), ("/b", 503)))
    run.record(replies={T0: first, T0 + 1: second})
    assert [(e.trigger, e.reply) for e in ledger.reconcile().lost_emails] == [(T0, first), (T0 + 1, second)]


def test_an_address_awaited_later_is_no_longer_only_handed_out(ls):
    ledger, store = ls
    first = Run(ledger, store, "first")
    address = first.address(expect=None)
    first.record()
    assert address.lower() in ledger.handed
    second = Run(ledger, store, "second")
    second.mailbox.handed_out.append(address)
    second.mailbox.expected[address.lower()] = (1, 5.0)
    second.record()
    assert address.lower() not in ledger.handed
    assert ledger.reconcile().handed_out == 1


def test_an_expectation_met_before_it_is_recorded_is_not_outstanding(ls):
    ledger, store = ls
    run = Run(ledger, store)
    address = run.address(trigger=T0)
    store.deliver(mail(address, T0 + 1, seq=1))
    run.record()
    assert ledger.outstanding == 0


def test_mail_where_a_stopped_run_expected_none_after_its_trigger_is_unexpected(ls):
    ledger, store = ls
    run = Run(ledger, store)
    quiet = run.address(trigger=T0, expect=0)
    run.record(INTERRUPTED)
    store.deliver(mail(quiet, T0 + 1, seq=1))
    row = ledger.reconcile().flows["order"]
    assert (row.unexpected, row.interrupted) == (1, 0)
