"""The parser's boundary matching (message_parts._BoundaryMatcher, CPython 3.13's way on 3.11 and
3.12) builds exactly the tree the stock parser builds, on well-formed, mutated and noisy mail."""

from __future__ import annotations

import re
from email.feedparser import FeedParser
from email.policy import compat32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailproof import message_parts
from tests.test_message_hostile import CORPUS_FILES, MAIL_TOKENS, PROPERTY, mutated, well_formed


class _StockParser(message_parts._FeedParser):
    """Ours with the stdlib's own ``_parsegen`` (its per-boundary regex before 3.13)."""

    _parsegen = FeedParser._parsegen


def _tree(entity, depth: int = 0) -> tuple:
    """Everything the parse decided: headers, payloads, preamble, epilogue, defects, nesting."""
    payload = entity._payload
    if isinstance(payload, list):
        payload = tuple(_tree(p, depth + 1) for p in payload)
    return (tuple(entity._headers), payload, entity.preamble, entity.epilogue,
            tuple(type(d).__name__ for d in entity.defects), getattr(entity, "too_deep", False))


def _both(raw: bytes) -> tuple[tuple, tuple]:
    text = raw.decode("ascii", "surrogateescape")
    ours, stock = message_parts._FeedParser(message_parts.Entity, policy=compat32), \
        _StockParser(message_parts.Entity, policy=compat32)
    for parser in (ours, stock):
        parser.feed(text)
    return _tree(ours.close()), _tree(stock.close())


def test_no_regex_is_compiled_per_boundary(monkeypatch):
    compiled = []
    real = re.compile
    monkeypatch.setattr(re, "compile", lambda *a, **k: compiled.append(a[0]) or real(*a, **k))
    raw = b"Content-Type: multipart/mixed; boundary=\"=_x(1)+\"\r\n\r\n--=_x(1)+\r\n\r\nhi\r\n--=_x(1)+--\r\n"
    root = message_parts.parse(raw)
    assert [p.get_payload() for p in root.get_payload()] == ["hi"]
    assert compiled == []


BOUNDARIES = ["b", "=_(x)+?*", "a.b|c", "\\", "$^", "[]{}", "  spaced ", "--", "b--"]
LINE_ENDS = ["\r\n", "\n", "\r", ""]
AFTER = ["", "--", " \t", "-- ", "x", "--x", "\t--"]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_boundary_lines_read_as_the_stock_parser_reads_them(boundary):
    for end in LINE_ENDS:
        for after in AFTER:
            raw = (f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\npreamble\r\n'
                   f"--{boundary}\r\nContent-Type: text/plain\r\n\r\none\r\n"
                   f"--{boundary}{after}{end}two\r\n--{boundary}--{end}epilogue").encode()
            ours, stock = _both(raw)
            assert ours == stock, (boundary, end, after)


def test_every_corpus_message_reads_as_the_stock_parser_reads_it():
    for path in CORPUS_FILES:
        ours, stock = _both(path.read_bytes())
        assert ours == stock, path.name


@settings(max_examples=300, **PROPERTY)
@given(st.one_of(well_formed(), mutated(),
                 st.lists(st.sampled_from(MAIL_TOKENS) | st.binary(max_size=6), max_size=120).map(b"".join)))
def test_any_mail_reads_as_the_stock_parser_reads_it(raw):
    ours, stock = _both(raw)
    assert ours == stock
