"""The sink service's recipient index (records.py's chains over rcpt_table.py, store.py's dict for
the rest) against a plain model, a list of the retained (seq, recipients): a wrong index is mail
reported lost that arrived. Random sequences of add / evict to a cap / clear / lookup, with
mixed-case, non-ASCII and surrogate addresses, several recipients, non-str ones, seq gaps, one
recipient getting most of the mail, compaction, and every key forced into one probe chain."""

from __future__ import annotations

import random
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from mailproof.capture.service import rcpt_table, records
from mailproof.capture.service.records import index_key, index_keys
from mailproof.capture.service.store import CaptureStore
from mailproof.capture.smtp_sink import CapturedMail

PROPERTY = dict(derandomize=True, deadline=None, database=None)  # the same examples on every run

ADDRESSES = ("a@x.test", "A@x.test", "b@x.test", "ü@x.test", "Ü@X.test", "bad\udcffbyte@x.test",
             "BAD\udcffbyte@x.test", "ǅ@x.test", "c@x.test", "d@x.test")
LOOKUPS = ADDRESSES + ("A@X.TEST", "nobody@x.test", "7", "")

# (slot hash, smallest table and largest made up front, evicted slots before compaction): real;
# real in a tiny table (it grows and shrinks); every key one probe chain; every key's home the
# last slot (chains wrap around); a few short clusters.
CONFIGS = {
    "real": (hash, rcpt_table.MIN_SLOTS, records.COMPACT_AFTER),
    "real-small": (hash, 8, 4),
    "one-chain": (lambda key: 0, 2, 2),
    "wrapping": (lambda key: -1, 4, 3),
    "clusters": (lambda key: len(key) % 3, 2, 1),
}


def configured(name: str):
    slot_hash, min_slots, compact_after = CONFIGS[name]
    patches = [mock.patch.object(rcpt_table, "HASH", slot_hash), mock.patch.object(rcpt_table, "MIN_SLOTS", min_slots),
               mock.patch.object(records, "COMPACT_AFTER", compact_after)]
    if name != "real":  # not sized for the cap up front: the table grows and shrinks; positions rebased
        patches += [mock.patch.object(rcpt_table, "PRESIZE_SLOTS", min_slots),
                    mock.patch.object(records, "REBASE_AFTER", 3 * compact_after)]
    for p in patches:
        p.start()
    return patches


def mail(seq: int, rcpts) -> CapturedMail:
    return CapturedMail(seq=seq, mail_from="app@shop.test", rcpt_tos=tuple(rcpts), data=b"Subject: %d\r\n\r\n" % seq,
                        received_at=1700000000.0 + seq, peer=("127.0.0.1", 40000), helo="app.local",
                        smtputf8=False, tls=False, auth_user=None, mail_options=())


def expected(model: list, recipient: str, since: int) -> list[int]:
    key = index_key(recipient)
    return [seq for seq, rcpts in model if seq > since and key in index_keys(rcpts)]


def reference(model: list) -> dict:
    """The model as a plain dict of lists: key -> seqs, oldest first."""
    index: dict = {}
    for seq, rcpts in model:
        for key in index_keys(rcpts):
            index.setdefault(key, []).append(seq)
    return index


def check(store: CaptureStore, model: list) -> None:
    seqs = [seq for seq, _ in model]
    assert [store.messages.seq_at(i) for i in range(len(store.messages))] == seqs
    sinces = {0, -1, *seqs[:1], *seqs[len(seqs) // 2:len(seqs) // 2 + 1], *seqs[-1:]}
    for recipient in LOOKUPS:
        for since in sinces:
            assert store.seqs_to(recipient, since) == expected(model, recipient, since), (recipient, since)
    # Nothing left behind: the table holds one slot per distinct key of the records it indexes,
    # the dict no key without a retained seq.
    chained = {rcpts[0].encode("utf-8", "surrogatepass") for _, rcpts in model
               if len(rcpts) == 1 and type(rcpts[0]) is str and rcpts[0].lower() == rcpts[0]}
    assert len(store.messages._table) == len(chained)
    assert all(store.by_rcpt.values())


recipients = st.one_of(
    st.tuples(st.sampled_from(ADDRESSES)),  # one recipient: the usual case
    st.tuples(st.sampled_from(ADDRESSES[:3])),  # ... and often the same few
    st.lists(st.sampled_from(ADDRESSES), min_size=0, max_size=3).map(tuple),  # none, several, repeated
    st.just((7,)),  # not a str: indexed as str(7)
)
steps = st.lists(st.one_of(
    st.tuples(st.just("add"), recipients, st.integers(1, 3)),  # a seq gap of 0 to 2
    st.tuples(st.just("evict"), st.integers(1, 8)),
    st.tuples(st.just("clear")),
), max_size=60)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@settings(max_examples=150, **PROPERTY)
@given(cap=st.integers(1, 12), steps=steps)
def test_the_index_answers_as_a_plain_list_of_the_retained_mail(config, cap, steps):
    patches = configured(config)
    try:
        store, model, seq = CaptureStore(max_messages=cap), [], 0
        for step in steps:
            if step[0] == "add":
                seq += step[2]
                store.add(mail(seq, step[1]))
                model.append((seq, step[1]))
                del model[:max(0, len(model) - cap)]
            elif step[0] == "evict":  # a lower cap for a moment: eviction of several at once
                store.max_messages = step[1]
                store._evict_to_cap(delivery=False)
                store.max_messages = cap
                del model[:max(0, len(model) - step[1])]
            else:
                store.clear()
                model.clear()
            check(store, model)
    finally:
        for p in patches:
            p.stop()


@pytest.mark.parametrize("config", ["real-small", "one-chain", "clusters"])
def test_thousands_of_recipients_grow_and_shrink_the_table_and_stay_exact(config):
    patches = configured(config)
    try:
        rng = random.Random(12)  # fixed: the same sequence every run
        cap = 600 if config == "real-small" else 120
        store, model = CaptureStore(max_messages=cap), []
        pool = [f"user{i}@x.test" for i in range(cap * 2)] + ["Hot@x.test", "hot@x.test"]
        for seq in range(1, cap * 8):
            rcpts = (rng.choice(pool),) if rng.random() < 0.9 else (rng.choice(pool), rng.choice(pool))
            store.add(mail(seq, rcpts))
            model.append((seq, rcpts))
            del model[:max(0, len(model) - cap)]
            if seq % 97 == 0:
                index = reference(model)
                assert [store.seqs_to(r) for r in pool] == [index.get(index_key(r), []) for r in pool]
        assert store.evicted > records.REBASE_AFTER > store.messages._dropped  # positions were rebased
        grown = len(store.messages._table.slots)
        assert grown >= 2 * len(store.messages._table) and grown > rcpt_table.MIN_SLOTS  # at most half full
        store.max_messages = 3  # most of it evicted: the table shrinks with it
        store._evict_to_cap(delivery=False)
        del model[:-3]
        check(store, model)
        index = reference(model)
        assert [store.seqs_to(r) for r in pool] == [index.get(index_key(r), []) for r in pool]
        assert len(store.messages._table.slots) < grown
    finally:
        for p in patches:
            p.stop()


def test_a_recipient_with_most_of_the_mail_reads_back_whole_across_compaction():
    store = CaptureStore(max_messages=5000)
    for seq in range(1, 12001):
        store.add(mail(seq, ("hot@x.test",) if seq % 10 else (f"u{seq}@x.test",)))
    hot = [seq for seq in range(7001, 12001) if seq % 10]
    assert store.messages._dropped > 0  # compacted on the way: positions stayed valid
    assert store.seqs_to("HOT@x.test") == hot and store.seqs_to("hot@x.test", since=11990) == hot[-9:]
    assert store.seqs_to("u12000@x.test") == [12000] and store.seqs_to("u7000@x.test") == []


def test_the_table_is_sized_for_the_cap_up_front_and_never_shrinks_below_it():
    store = CaptureStore()  # the default cap, 200,000: no resize in the DATA handler before it
    assert len(store.messages._table.slots) == 1 << 19
    store = CaptureStore(max_messages=3000)
    assert len(store.messages._table.slots) == 8192  # at most half full at the cap
    for seq in range(1, 3001):
        store.add(mail(seq, (f"u{seq}@x.test",)))
    assert len(store.messages._table.slots) == 8192
    store.max_messages = 1
    store._evict_to_cap(delivery=False)
    assert len(store.messages._table.slots) == 8192 and store.seqs_to("u3000@x.test") == [3000]
    big = CaptureStore(max_messages=10_000_000)  # capped up front (2 MB); past that it grows as needed
    assert len(big.messages._table.slots) == rcpt_table.PRESIZE_SLOTS
