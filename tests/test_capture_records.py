"""The sink service's retained records, stored by column (mailproof/capture/service/records.py):
every field reads back as it was captured, interning shares equal envelopes and never merges
distinct ones, and the recipient index stays exact as records come and go."""

from __future__ import annotations

import gc
from collections import deque

import pytest

from mailproof.capture.service import records as records_module
from mailproof.capture.service.records import (AT, AUTH_USER, DATA, FROM, HELO, MAIL_OPTIONS, PEER, RCPTS, SEQ,
                                               SMTPUTF8, TLS, Records)
from mailproof.capture.service.store import CaptureStore
from mailproof.capture.smtp_sink import CapturedMail


def captured(seq: int, to=("a@x.test",), **fields) -> CapturedMail:
    base = dict(seq=seq, mail_from="app@shop.test", rcpt_tos=tuple(to), data=b"Subject: %d\r\n\r\nhi\r\n" % seq,
                received_at=1700000000.25 + seq, peer=("127.0.0.1", 40000 + seq), helo="app.local",
                smtputf8=False, tls=False, auth_user=None, mail_options=("SIZE=20", "BODY=8BITMIME"))
    base.update(fields)
    return CapturedMail(**base)


def as_record(m: CapturedMail) -> tuple:
    return (m.seq, m.mail_from, tuple(m.rcpt_tos), m.data, m.received_at, m.peer, m.helo, m.smtputf8, m.tls,
            m.auth_user, tuple(m.mail_options))


@pytest.mark.parametrize("fields", [
    {},
    {"peer": None},
    {"peer": ("::1", 2525, 0, 0)},  # IPv6: kept whole
    {"peer": ("127.0.0.1", 0)},  # port 0: kept whole
    {"peer": ("127.0.0.1", 65535)},
    {"rcpt_tos": ("A@X.test", "b@y.test")},
    {"rcpt_tos": ()},
    {"mail_options": ["SMTPUTF8"]},  # a list reads back as the tuple of its items
    {"smtputf8": True, "tls": True, "auth_user": "app", "helo": None, "mail_from": ""},
])
def test_every_field_reads_back_as_captured(fields):
    recs = Records()
    m = captured(5, **fields)
    recs.append(m)
    assert recs[0] == recs[-1] == as_record(m)
    assert recs[0][DATA] is m.data and recs.seq_at(0) == 5
    assert type(recs[0][AT]) is float and type(recs[0][RCPTS]) is tuple


def test_equal_envelopes_share_one_tuple_and_distinct_ones_stay_distinct():
    recs = Records()
    # Fresh but equal strs, as the sink parses them for each message.
    recs.append(captured(1, mail_from="".join(["app@", "shop.test"]), helo="".join(["app", ".local"])))
    recs.append(captured(2, mail_from="".join(["app@", "shop.test"]), helo="".join(["app", ".local"])))
    assert recs[0][FROM] is recs[1][FROM] and recs[0][HELO] is recs[1][HELO]
    assert recs[0][MAIL_OPTIONS] is recs[1][MAIL_OPTIONS] and recs[0][PEER][0] is recs[1][PEER][0]
    assert recs[0][PEER] == ("127.0.0.1", 40001) and recs[1][PEER] == ("127.0.0.1", 40002)  # ports kept apart
    # True == 1 and "" vs None: equal or falsy, yet distinct values, never merged.
    distinct = [captured(3, tls=1), captured(4, tls=True), captured(5, auth_user=""), captured(6, auth_user=None),
                captured(7, smtputf8=0), captured(8, smtputf8=False), captured(9, helo="APP.local")]
    for m in distinct:
        recs.append(m)
    read = {r[SEQ]: r for r in recs}
    assert type(read[3][TLS]) is int and read[4][TLS] is True
    assert read[5][AUTH_USER] == "" and read[6][AUTH_USER] is None
    assert type(read[7][SMTPUTF8]) is int and read[8][SMTPUTF8] is False
    assert read[9][HELO] == "APP.local" and read[8][HELO] == "app.local"
    assert [read[m.seq] for m in distinct] == [as_record(m) for m in distinct]


def test_the_interning_table_is_bounded_and_starting_over_changes_no_value(monkeypatch):
    monkeypatch.setattr(records_module, "ENVELOPES_INTERNED", 3)
    recs = Records()
    sent = [captured(i, helo=f"h{i % 5}") for i in range(1, 21)]
    for m in sent:
        recs.append(m)
    assert len(recs._interned) <= 3
    assert list(recs) == [as_record(m) for m in sent]


def test_an_unhashable_field_is_kept_unshared():
    recs = Records()
    m = captured(1, peer=["127.0.0.1", 25])  # not a tuple: stored whole
    recs.append(m)
    assert recs[0][PEER] == ["127.0.0.1", 25]


def test_seqs_with_a_gap_and_eviction_past_compaction():
    recs = Records()
    sent = [captured(s) for s in list(range(1, 1500)) + list(range(2000, 3000))]  # a gap after 1499
    for m in sent:
        recs.append(m)
    for m in sent[:2000]:
        assert recs.popleft() == as_record(m)
    assert recs._head < 2000  # compacted on the way
    assert len(recs) == len(sent) - 2000
    assert [recs.seq_at(i) for i in (0, -1)] == [sent[2000].seq, 2999]
    assert list(reversed(recs)) == [as_record(m) for m in reversed(sent[2000:])]
    assert recs.slice(1, 3) == [as_record(m) for m in sent[2001:2003]]
    with pytest.raises(IndexError):
        recs[len(recs)]
    while recs:
        recs.popleft()
    recs.append(captured(7000))  # empty again: dense from here
    assert recs._seqs is None and recs.seq_at(0) == 7000


def test_the_store_finds_records_by_seq_after_a_gap_and_knows_what_it_retains():
    store = CaptureStore(max_messages=3)
    for seq in (1, 2, 5, 6):
        store.add(captured(seq, to=(f"u{seq}@x.test",)))
    assert [r[SEQ] for r in store.messages] == [2, 5, 6] and store.get(5)[SEQ] == 5 and store.get(3) is None
    old = store.get(2)
    assert store.retains(old)
    store.add(captured(7))
    assert not store.retains(old) and store.get(2) is None
    assert [r[SEQ] for r in store.since(2)] == [5, 6, 7] and [r[SEQ] for r in store.after(5, 1)] == [6]


def test_any_recipient_str_round_trips_and_is_found_case_insensitively():
    store = CaptureStore()
    odd = ("Ünïcode@exämple.test", "bad\udcffbyte@x.test", "MiXeD@X.TEST")
    for seq, to in enumerate(odd, 1):
        store.add(captured(seq, to=(to,)))
    assert [r[RCPTS] for r in store.messages] == [(to,) for to in odd]
    assert [store.seqs_to(to.upper()) for to in odd] == [[1], [2], [3]]
    assert store.seqs_to("mixed@x.test") == [3]


def test_one_lower_case_recipient_is_chained_in_the_records_and_any_other_goes_to_the_dict():
    store = CaptureStore(max_messages=3)
    to = "".join(["solo+", "abc123.000001@x.test"])
    store.add(captured(1, to=(to,)))
    assert store.by_rcpt == {} and len(store.messages._table) == 1  # no dict entry, no int
    assert store.messages.seqs_to(to.encode()) == [1] and store.messages._prev[0] == 0
    store.add(captured(2, to=("Solo+ABC123.000001@x.test",)))  # the same recipient, other case: the dict
    assert store.by_rcpt == {to.encode(): 2} and store.seqs_to("SOLO+abc123.000001@X.TEST") == [1, 2]
    store.add(captured(3, to=(to,)))  # chained to seq 1, two records back
    assert store.messages._prev[2] == 2 and store.seqs_to(to) == [1, 2, 3] and store.seqs_to(to, since=1) == [2, 3]
    store.add(captured(4, to=("c@x.test", to)))  # several recipients: the dict (a deque now)
    assert store.by_rcpt[to.encode()] == deque([2, 4]) and store.by_rcpt[b"c@x.test"] == 4
    assert store.seqs_to(to) == [2, 3, 4] and store.seqs_to(to, since=3) == [4]  # seq 1 evicted
    store.add(captured(5, to=("d@x.test",)))  # evicts seq 2
    assert store.seqs_to(to) == [3, 4] and store.by_rcpt[to.encode()] == 4
    store.add(captured(6, to=("e@x.test",)))  # evicts seq 3, the chain's head: the table forgets it
    assert store.messages.seqs_to(to.encode()) == [] and store.seqs_to(to) == [4]
    store.add(captured(7, to=("f@x.test",)))  # evicts seq 4
    assert store.seqs_to(to) == [] and store.by_rcpt == {} and len(store.messages._table) == 3


def test_retained_records_leave_nothing_tracked_for_the_collector_but_the_columns():
    recs = Records()
    for i in range(1, 50):
        recs.append(captured(i))
    gc.collect()
    assert not any(gc.is_tracked(env) for env in recs._envs)
    assert not any(gc.is_tracked(r) for r in recs._rcpts)


def test_evict_names_the_oldest_records_seq_size_and_the_keys_its_caller_must_forget():
    recs = Records()
    for seq, to in enumerate((("Ab@X.test",), ("Ü@x.test",), ("a@x.test", "B@x.test")), 1):
        recs.append(captured(seq, to=to, data=b"x" * seq))
    recs.append(captured(4, to=("ü@x.test",), data=b"x" * 4))
    assert recs.evict() == (1, 1, (b"ab@x.test",))  # mixed case: the caller's dict holds it
    assert recs.evict() == (2, 2, ("ü@x.test".encode(),))
    assert recs.evict() == (3, 3, {b"a@x.test", b"b@x.test"})
    assert len(recs._table) == 1 and recs.seqs_to("ü@x.test".encode()) == [4]
    assert recs.evict() == (4, 4, ())  # lower case: indexed in the records themselves, forgotten there
    assert len(recs) == 0 and len(recs._table) == 0 and recs.seqs_to("ü@x.test".encode()) == []


# -- reading by seq when seqs have gaps (a message that failed to store leaves one) -----------------


@pytest.mark.parametrize("after", [0, 1, 2, 5, 9, 10, 11, 12])
def test_pages_and_counts_by_seq_with_gaps(after):
    store = CaptureStore(max_messages=10)
    kept = (1, 10, 11)
    for seq in kept:
        store.add(captured(seq))
    expected = [s for s in kept if s > after]
    assert [m[SEQ] for m in store.since(after)] == expected
    assert [m[SEQ] for m in store.after(after, 10)] == expected
    assert [m[SEQ] for m in store.after(after, 1)] == expected[:1]
    assert store.count_after(after) == len(expected)
    assert (store.get(after) is not None) == (after in kept)


def test_pages_by_seq_with_gaps_after_eviction():
    store = CaptureStore(max_messages=3)
    for seq in (1, 4, 5, 9, 12, 13):
        store.add(captured(seq))
    assert [m[SEQ] for m in store.since(0)] == [9, 12, 13]
    assert [m[SEQ] for m in store.since(10)] == [12, 13]
    assert store.count_after(4) == 3 and store.count_after(12) == 1
    assert store.get(5) is None and store.get(12)[SEQ] == 12


def test_a_message_numbered_at_or_below_the_last_is_kept_under_the_next_seq(caplog):
    store = CaptureStore(max_messages=10)
    store.add(captured(1, to=("a@x.test",)))
    store.add(captured(1, to=("b@x.test",)))  # a second capture path counting from 1 on its own
    store.add(captured(2, to=("c@x.test",)))
    assert [(m[SEQ], m[RCPTS]) for m in store.since(0)] == [(1, ("a@x.test",)), (2, ("b@x.test",)),
                                                            (3, ("c@x.test",))]
    assert store.seqs_to("b@x.test") == [2] and store.seqs_to("c@x.test") == [3]
    assert store.renumbered == 2
    assert "capture paths numbering apart" in caplog.text
