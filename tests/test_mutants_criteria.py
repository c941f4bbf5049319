"""What a wait says it waited for (``Criteria.describe``, in every MailNotDelivered and near miss),
word for word: what benchmarks/mutation.py found no test checking."""

from __future__ import annotations

import re
from functools import partial

from mailproof.criteria import Criteria


def _receipt(msg) -> bool:
    return True


def test_describe_names_every_criterion_in_order():
    criteria = Criteria(to="a@x.test", sender="shop@x.test", subject="Receipt", contains=re.compile(r"\d{4}"),
                        header={"X-Kind": "receipt", "X-Id": re.compile("^7")}, match=_receipt)
    assert criteria.describe() == ("to a@x.test from shop@x.test subject containing 'Receipt' body containing /\\d{4}/ "
                                   "header X-Kind containing 'receipt' header X-Id containing /^7/ match=_receipt")


def test_describe_of_a_header_pair_and_of_a_callable_without_a_name():
    criteria = Criteria(header=("X-Kind", "receipt"), contains="code", match=partial(_receipt))
    assert criteria.describe() == "body containing 'code' header X-Kind containing 'receipt' match=callable"


def test_describe_of_no_criterion_is_any_mail():
    assert Criteria().describe() == "any mail"


def _msg():
    from mailproof.message import Message

    raw = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: Hi\r\nX-Kind: news\r\n\r\nHello\r\n"
    return Message(raw, mail_from="a@x.test", rcpt_tos=["b@x.test"])


def test_mismatches_say_why_word_for_word():
    def picky(msg) -> bool:
        return False

    def broken(msg) -> bool:
        raise KeyError("X-Flag")

    msg = _msg()
    assert Criteria(contains="code", header=("X-Kind", re.compile("^receipt")), match=picky).mismatches(msg) == [
        "body does not contain 'code'",
        "header X-Kind ['news'] does not contain /^receipt/",
        "match=picky returned False",
    ]
    assert Criteria(match=broken).mismatches(msg) == ["match raised KeyError: 'X-Flag'"]
    assert Criteria(match=partial(picky)).mismatches(msg) == ["match=callable returned False"]
    assert Criteria(sender="A@X.test", to="B@x.TEST").mismatches(msg) == []
