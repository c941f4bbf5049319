"""Verdicts the harness must get exactly right: which mail a wait takes, where a gate's
boundary lies, what the latency percentiles are, and what a wait or a closed Mailbox gives back.

Each test here pins one behaviour that a plausible slip in the harness would flip silently.
"""

from __future__ import annotations

import math
import random
import re
import time
from email.message import EmailMessage
from types import SimpleNamespace

import pytest

from mailproof.addresses import AddressBook
from mailproof.criteria import Criteria
from mailproof.errors import MailNotDelivered
from mailproof.load.gates import Gate, GateError, evaluate
from mailproof.load.latency import LatencyHistograms
from mailproof.load.results import FlowCounts, FlowRuns, Harness, LatencySummary, LedgerCounts, RequestCounts
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Message

SHORT = dict(within=0.3, timeout=0.3)


# -- 1. every wait criterion decides alone ------------------------------------------------------


def _mail(to: str, *, subject: str = "Your order", body: str = "Order 1234 shipped.\n",
          sender: str = "shop@example.test", headers: dict | None = None, label: str = "") -> Message:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["X-Label"] = label
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    return Message(raw, mail_from=sender, rcpt_tos=[to], received_at=time.time())


def _is_good(msg: Message) -> bool:
    return msg.header("X-Flag") == "good"


# The full set of criteria, and what a message looks like that meets them all.
MATCHING = dict(subject="Your order", body="Order 1234 shipped.\n", sender="shop@example.test",
                headers={"X-Kind": "receipt", "X-Flag": "good"})
WAIT = dict(subject="order", contains="1234", header=("X-Kind", "receipt"), sender="shop@example.test",
            match=_is_good)
# Per criterion: the field of the message to spoil, how, and the word its mismatch starts with.
SPOIL = {
    "subject": (dict(subject="Your invoice"), "subject"),
    "contains": (dict(body="Order 9999 shipped.\n"), "body"),
    "header": (dict(headers={"X-Kind": "newsletter", "X-Flag": "good"}), "header"),
    "sender": (dict(sender="spam@example.test"), "sender"),
    "match": (dict(headers={"X-Kind": "receipt", "X-Flag": "bad"}), "match"),
}


def _near_miss(to: str, criterion: str, label: str) -> Message:
    fields = dict(MATCHING)
    fields.update(SPOIL[criterion][0])
    return _mail(to, label=label, **fields)


@pytest.mark.parametrize("criterion", sorted(SPOIL))
def test_each_criterion_alone_rejects_a_near_miss(criterion):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("alone")
    given = {criterion: WAIT[criterion]}
    # to= is given too, and the near miss meets it: this criterion must decide alone.
    miss = store.deliver(_near_miss(to, criterion, "miss"))
    hit = store.deliver(_mail(to, label="hit", **MATCHING))
    assert Criteria(to=to, **given).mismatches(hit) == []
    why = Criteria(to=to, **given).mismatches(miss)
    assert len(why) == 1 and why[0].startswith(SPOIL[criterion][1]), why
    got = box.wait_for(to, **given, **SHORT)
    assert got is hit, got.describe()
    assert got.header("X-Label") == "hit"
    assert miss.seq not in box.claimed


@pytest.mark.parametrize("criterion", sorted(SPOIL))
def test_each_criterion_rejects_a_near_miss_among_all_the_others(criterion):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("among")
    miss = store.deliver(_near_miss(to, criterion, "miss"))
    hit = store.deliver(_mail(to, label="hit", **MATCHING))
    why = Criteria(to=to, **WAIT).mismatches(miss)
    assert len(why) == 1 and why[0].startswith(SPOIL[criterion][1]), why
    assert Criteria(to=to, **WAIT).mismatches(hit) == []
    assert box.wait_for(to, **WAIT, **SHORT) is hit
    # Without to= too (the wait is offered every message, not only one address's).
    box2 = Mailbox(store)
    to2 = box2.address("among-any")
    store.deliver(_near_miss(to2, criterion, "miss"))
    hit2 = store.deliver(_mail(to2, label="hit", **MATCHING))
    assert box2.wait_for(**WAIT, **SHORT) is hit2


def test_to_alone_rejects_mail_to_another_address():
    store = MailStore()
    box = Mailbox(store)
    to, other = box.address("mine"), box.address("theirs")
    miss = store.deliver(_mail(other, label="miss", **MATCHING))
    hit = store.deliver(_mail(to, label="hit", **MATCHING))
    why = Criteria(to=to, **WAIT).mismatches(miss)
    assert len(why) == 1 and why[0].startswith("to"), why
    assert Criteria(to=to, **WAIT).mismatches(hit) == []
    assert box.wait_for(to, **SHORT) is hit
    # The only mail to `to` is claimed now: a further wait there must not fall back on `other`'s.
    with pytest.raises(MailNotDelivered):
        box.wait_for(to, **SHORT)


def test_to_is_exact_not_a_substring():
    store = MailStore()
    box = Mailbox(store)
    to = box.address("exact")
    longer = "x" + to
    miss = store.deliver(_mail(longer, label="miss", **MATCHING))
    why = Criteria(to=to).mismatches(miss)
    assert len(why) == 1 and why[0].startswith("to"), why
    with pytest.raises(MailNotDelivered):
        box.wait_for(to, **SHORT)


def test_all_criteria_at_once_reject_every_near_miss():
    store = MailStore()
    box = Mailbox(store)
    to, other = box.address("all"), box.address("other")
    misses = [store.deliver(_near_miss(to, c, f"miss-{c}")) for c in sorted(SPOIL)]
    misses.append(store.deliver(_mail(other, label="miss-to", **MATCHING)))
    hit = store.deliver(_mail(to, label="hit", **MATCHING))
    criteria = Criteria(to=to, **WAIT)
    for criterion, miss in zip(sorted(SPOIL) + ["to"], misses):
        why = criteria.mismatches(miss)
        word = SPOIL[criterion][1] if criterion in SPOIL else "to"
        assert len(why) == 1 and why[0].startswith(word), (criterion, why)
        assert not criteria.matches(miss)
    assert criteria.matches(hit)
    assert box.wait_for(to, **WAIT, **SHORT) is hit
    with pytest.raises(MailNotDelivered):
        box.wait_for(to, **WAIT, **SHORT)


def test_pattern_criteria_decide_alone():
    store = MailStore()
    box = Mailbox(store)
    to = box.address("pattern")
    store.deliver(_mail(to, label="miss", subject="Your invoice", body="Order 99 shipped.\n",
                        headers={"X-Kind": "news"}))
    hit = store.deliver(_mail(to, label="hit", **MATCHING))
    got = box.wait_for(to, subject=re.compile(r"^Your order$"), contains=re.compile(r"Order \d{4}"),
                       header={"X-Kind": re.compile("^receipt$")}, **SHORT)
    assert got is hit


# -- 2. gate boundaries -----------------------------------------------------------------------------


def _results(p95: float = 0.05, requests: int = 100, failures: int = 0, lost: int = 0):
    latency = LatencySummary(count=10, p50=p95, p90=p95, p95=p95, p99=p95, max=p95, mean=p95)
    return SimpleNamespace(
        flows=FlowRuns(runs={"f": 10}),
        ledger=LedgerCounts(flows={"f": FlowCounts(expected=10, delivered=10 - lost, lost=lost)}),
        latency={"f": latency},
        http=RequestCounts(requests=requests, failures=failures),
        harness=Harness(),
    )


def _passed(text: str, results) -> bool:
    verdicts = [v for v in evaluate([Gate.parse(text)], results) if v.gate == text]
    assert len(verdicts) == 1, verdicts
    return verdicts[0].passed


@pytest.mark.parametrize("text, at_threshold, below, above", [
    ("f:p95<100ms", False, True, False),
    ("f:p95<=100ms", True, True, False),
    ("f:p95<0.1s", False, True, False),
    ("f:p95<=0.1", True, True, False),
    ("f:p95==100ms", True, False, False),
    ("f:p95=100ms", True, False, False),
    ("f:p95>=100ms", True, False, True),
    ("f:p95>100ms", False, False, True),
])
def test_latency_gate_boundary(text, at_threshold, below, above):
    assert _passed(text, _results(p95=0.1)) is at_threshold
    assert _passed(text, _results(p95=0.0999)) is below
    assert _passed(text, _results(p95=0.1001)) is above


def test_latency_gate_units():
    assert Gate.parse("p95<100ms").value == pytest.approx(0.1)
    assert Gate.parse("p95<2s").value == 2.0
    assert Gate.parse("p95<2").value == 2.0
    assert _passed("*:p95<100ms", _results(p95=0.1)) is False
    assert _passed("*:p95<=100ms", _results(p95=0.1)) is True
    assert _passed("p95<100ms", _results(p95=0.05)) is True
    assert _passed("p95<100ms", _results(p95=5.0)) is False  # 100 ms is not 100 s


@pytest.mark.parametrize("text, at_threshold, below, above", [
    ("http:error_rate<=1%", True, True, False),
    ("http:error_rate<1%", False, True, False),
    ("error_rate<=0.01", True, True, False),
    ("http:error_rate>1%", False, False, True),
])
def test_error_rate_gate_boundary(text, at_threshold, below, above):
    assert Gate.parse("http:error_rate<=1%").value == pytest.approx(0.01)
    assert _passed(text, _results(requests=100, failures=1)) is at_threshold   # exactly 0.01
    assert _passed(text, _results(requests=1000, failures=9)) is below
    assert _passed(text, _results(requests=1000, failures=11)) is above


def test_count_gate_boundary():
    assert _passed("*:lost==0", _results(lost=0)) is True
    assert _passed("*:lost==0", _results(lost=1)) is False
    assert _passed("*:lost<1", _results(lost=1)) is False
    assert _passed("*:lost<=1", _results(lost=1)) is True


@pytest.mark.parametrize("text", ["p95<<5s", "p95 < fast", "p95<5 minutes", "lost", "==0", "p95 5s", "p95<5s extra"])
def test_malformed_gate_raises_naming_it(text):
    with pytest.raises(GateError) as caught:
        Gate.parse(text)
    assert repr(text) in str(caught.value) or text in str(caught.value)


def test_gate_with_wrong_unit_or_metric_raises_naming_it():
    for text in ("lost<5ms", "p95<5%", "bogus<1", "f:error_rate<1%"):
        with pytest.raises(GateError) as caught:
            Gate.parse(text)
        assert text in str(caught.value)


# -- 3. percentiles against brute force -------------------------------------------------------------


def _nearest_rank(sorted_values: list[float], p: float) -> float:
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _close(actual: float, expected: float) -> bool:
    # 3 significant digits (0.1 %), plus the 1 microsecond the histogram records in.
    return abs(actual - expected) <= expected * 1e-3 + 2e-6


def _latencies(seed: int, n: int = 1000) -> list[float]:
    # Seeded random values on a 1 %-spaced grid (1 ms .. ~150 s): neighbours differ by far more than
    # the histogram's precision, so an answer one rank off cannot pass for the right one.
    rng = random.Random(seed)
    return [0.001 * 1.01 ** k for k in rng.sample(range(1200), n)]


@pytest.mark.parametrize("seed", [1, 7, 2024])
def test_percentiles_match_brute_force(seed):
    values = _latencies(seed)
    hist = LatencyHistograms()
    for v in values:
        hist.record("flow", v)
    ordered = sorted(values)
    row = hist.summary()["flow"]
    assert row.count == len(values)
    for p in (50, 90, 95, 99):
        expected = _nearest_rank(ordered, p)
        actual = getattr(row, f"p{p}")
        assert _close(actual, expected), (p, actual, expected)
    assert _close(row.max, ordered[-1]), (row.max, ordered[-1])
    mean = sum(values) / len(values)
    assert abs(row.mean - mean) <= mean * 1e-3 + 2e-6, (row.mean, mean)


def test_percentiles_survive_merging_across_workers():
    values = _latencies(99)
    ordered = sorted(values)
    master, workers = LatencyHistograms(), [LatencyHistograms() for _ in range(3)]
    for i, v in enumerate(values):
        workers[i % 3].record("flow", v)
    for w in workers:
        master.merge(w.encode())
    row = master.summary()["flow"]
    assert row.count == len(values)
    for p in (50, 90, 95, 99):
        assert _close(getattr(row, f"p{p}"), _nearest_rank(ordered, p)), p
    assert _close(row.max, ordered[-1])


def test_percentiles_are_per_flow_and_of_small_sets():
    hist = LatencyHistograms()
    for v in (0.2, 0.4, 0.6, 0.8, 1.0):
        hist.record("a", v)
    hist.record("b", 3.0)
    summary = hist.summary()
    assert set(summary) == {"a", "b"}
    ordered = [0.2, 0.4, 0.6, 0.8, 1.0]
    for p in (50, 90, 95, 99):
        assert _close(getattr(summary["a"], f"p{p}"), _nearest_rank(ordered, p)), p
    assert _close(summary["a"].max, 1.0)
    b = summary["b"]
    for name in ("p50", "p90", "p95", "p99", "max", "mean"):
        assert _close(getattr(b, name), 3.0), name


# -- 4. a timed-out partial wait gives its claim back -----------------------------------------------


def test_partial_wait_gives_back_its_claim(make_message):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("partial")
    only = store.deliver(make_message(to, "Only one"))
    with pytest.raises(MailNotDelivered):
        box.wait_for(to, count=2, **SHORT)
    assert only.seq not in box.claimed
    assert box.wait_for(to, count=1, **SHORT) is only
    assert only.seq in box.claimed


def test_partial_wait_without_address_gives_back_its_claim(make_message):
    store = MailStore()
    box = Mailbox(store)
    to = box.address("partial-any")
    only = store.deliver(make_message(to, "Only one"))
    with pytest.raises(MailNotDelivered):
        box.wait_for(subject="Only", count=2, **SHORT)
    assert box.wait_for(subject="Only", **SHORT) is only


# -- 5. a closed Mailbox releases its addresses ------------------------------------------------------


@pytest.mark.parametrize("use_with", [False, True])
def test_closed_mailbox_mail_is_evicted_first(make_message, use_with):
    store = MailStore(max_messages=5)
    book = AddressBook()
    first = Mailbox(store, book)
    old = first.address("first")
    old_mail = [store.deliver(make_message(old, f"old {i}")) for i in range(5)]
    if use_with:
        with first:
            pass
    else:
        first.close()
    assert len(store) == 5
    second = Mailbox(store, book)
    new_mail = []
    for i in range(5):
        address = second.address(f"second{i}")
        assert address != old
        new_mail.append(store.deliver(make_message(address, f"new {i}")))
    assert len(store) == 5
    assert store.evicted == 5
    assert store.since(0, to=old) == []
    kept = store.since(0)
    assert [m.seq for m in kept] == [m.seq for m in new_mail]
    assert not {m.seq for m in kept} & {m.seq for m in old_mail}
    assert second.wait_for(new_mail[0].rcpt_tos[0], **SHORT) is new_mail[0]


def test_open_mailbox_mail_is_kept_over_the_cap(make_message):
    # The counterpart: while the first box is open its mail is not evicted (so the test above
    # shows the release, not an eviction that happens regardless).
    store = MailStore(max_messages=5)
    book = AddressBook()
    first = Mailbox(store, book)
    old = first.address("first")
    for i in range(5):
        store.deliver(make_message(old, f"old {i}"))
    second = Mailbox(store, book)
    for i in range(5):
        store.deliver(make_message(second.address(f"second{i}"), f"new {i}"))
    assert len(store.since(0, to=old)) == 5
    assert len(store) == 10
