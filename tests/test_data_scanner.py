"""DataScanner reads DATA the same way whatever the chunks: content, size limit and line limit.

Every body is checked against what it must give (the body itself; refused past ``limit`` bytes as
sent or past a ``max_line`` line), for the whole stream in one chunk (the scanner's shortcut),
and split anywhere, with and without a pipelined command after the final dot.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailproof.capture.data_scanner import DataScanner


def _stuff(body: bytes) -> bytes:
    """What a client sends for ``body``: SMTP lines end at CRLF only; a leading dot is doubled."""
    return b"\r\n".join((b"." + line if line.startswith(b".") else line) for line in body.split(b"\r\n"))


def _scan(stream: bytes, cuts: list[int], limit, max_line, spool) -> tuple[tuple, bytes]:
    scanner = DataScanner(limit, max_line, spool)
    try:
        prev = 0
        for cut in sorted(set(cuts)) + [len(stream)]:
            rest = scanner.feed(stream[prev:cut])
            prev = cut
            if rest is not None:
                return scanner.result(), rest + stream[prev:]
        raise AssertionError("the scanner never saw the final dot")
    finally:
        scanner.close()


_atoms = st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"a", b"x" * 70])
_bodies = st.lists(st.one_of(_atoms, st.binary(max_size=40)), max_size=30).map(b"".join)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, data=st.data())
def test_any_body_split_anywhere_reads_as_in_one_chunk_and_as_it_must(body, data):
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # the final dot needs a line of its own
    sent = _stuff(body)
    after = data.draw(st.sampled_from([b"", b"QUIT\r\n"]))
    stream = sent + b".\r\n" + after
    size = len(sent)  # aiosmtpd's measure: the message as sent, stuffed dots included
    # a line without its LF, and without the CR before it if there is one (a bare LF ends a line too)
    longest = max((len(line) - line.endswith(b"\r") for line in sent.split(b"\n")[:-1]), default=0)
    limit = data.draw(st.sampled_from([None, 0, max(size - 1, 1), size, size + 1]))
    max_line = data.draw(st.sampled_from([None, max(longest - 1, 1), max(longest, 1), longest + 1]))  # the dot line is 1
    spool = data.draw(st.sampled_from([None, 16]))
    too_much = bool(limit) and size > limit
    too_long = max_line is not None and longest > max_line
    expected = (None if too_much or too_long else body, too_much, too_long)

    whole, left = _scan(stream, [], limit, max_line, spool)
    assert (whole, left) == (expected, after)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=10)) if len(stream) > 1 else []
    assert _scan(stream, cuts, limit, max_line, spool) == (expected, after)
