"""The capture sink's fast paths (issue 12) change cost, never bytes or behaviour.

- the chunked DATA reader is byte-exact for any body and any chunk boundaries (hypothesis);
- a whole tricky corpus goes through a real sink over a socket byte for byte, pipelined or not;
- the per-connection setup built from cached tables equals aiosmtpd's own __init__;
- the one-write EHLO reply is byte-identical to aiosmtpd's line-by-line one;
- the idle timeout still fires between commands although commands no longer re-arm its timer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import socket
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailproof import errors as smtp_sink_errors
from mailproof.capture import smtp_sink
from mailproof.capture.smtp_sink import SmtpSink
from mailproof.faults import FaultPlan, Reply
from tests.smtp_wire import WireClient, lost_connections  # noqa: F401  (a fixture)


def _stuff(body: bytes) -> bytes:
    """What a client sends for ``body``: SMTP lines end at CRLF only; a leading dot is doubled."""
    return b"\r\n".join((b"." + line if line.startswith(b".") else line) for line in body.split(b"\r\n"))


async def _read(stream: bytes, cuts: list[int], max_line, spool) -> tuple[bytes, bytes]:
    fake = type("Fake", (), {})()
    fake._reader = asyncio.StreamReader(limit=1001)
    task = asyncio.ensure_future(smtp_sink._SinkSMTP._read_data(fake, None, max_line, spool))
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        fake._reader.feed_data(stream[prev:cut])
        prev = cut
        await asyncio.sleep(0)
    content, too_much, too_long = await task
    assert not too_much and not too_long
    return content, bytes(fake._reader._buffer)


# Bytes that matter to the scanner, so that generated bodies hit its corner cases often.
_atoms = st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"a", b"x" * 70])
_bodies = st.lists(st.one_of(_atoms, st.binary(max_size=40)), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, data=st.data(), spool=st.sampled_from([None, 64]))
def test_the_data_reader_is_byte_exact_for_any_body_and_any_chunk_boundaries(body, data, spool):
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # the final dot needs a line of its own
    stream = _stuff(body) + b".\r\nQUIT\r\n"
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=12))
    max_line = data.draw(st.sampled_from([None, len(stream) + 2]))
    content, left = asyncio.run(_read(stream, cuts, max_line, spool))
    assert content == body
    assert left == b"QUIT\r\n"  # the pipelined command after the dot goes back to the reader


CORPUS = [
    b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n.x\r\n",
    b"Subject: end-like\r\n\r\nline\r\n.\r\nnot the end\r\n",  # a lone dot line in the body (stuffed)
    b"Subject: bare\r\n\r\nbare LF\nbare CR\rmixed\n\r.after bare LF\r\n",
    b"Subject: long\r\n\r\n" + b"L" * 200_000 + b"\r\n" + b"." * 5000 + b"\r\n",
    b"Subject: 8bit\r\n\r\n\xff\xfe\x00\x80 caf\xc3\xa9\r\n",
    b"Subject: big\r\n\r\n" + b"".join(b".%06d stuffed line\r\n" % i for i in range(20_000)),
    b"",  # an empty message
]


@pytest.mark.parametrize("split", [1, 7, 4096, 65536])
def test_a_corpus_of_tricky_data_goes_through_a_real_sink_byte_for_byte(split):
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    client = WireClient(sink.port)
    try:
        assert client.reply().startswith(b"220")
        client.sock.sendall(b"EHLO corpus.test\r\n")
        assert client.reply().endswith(b"250 HELP\r\n")
        for i, body in enumerate(CORPUS):
            client.sock.sendall(b"MAIL FROM:<a@corpus.test>\r\nRCPT TO:<b%d@corpus.test>\r\nDATA\r\n" % i)
            assert client.reply().startswith(b"250") and client.reply().startswith(b"250")
            assert client.reply().startswith(b"354")
            wire = _stuff(body) + b".\r\n" if body else b".\r\n"
            for at in range(0, len(wire), split):  # separate writes: boundaries anywhere
                client.sock.sendall(wire[at:at + split])
            assert client.reply().startswith(b"250 2.0.0 OK queued as %d" % (i + 1))
            mail = got.get(timeout=10)
            assert (mail.data, mail.rcpt_tos) == (body, (f"b{i}@corpus.test",))
        client.sock.sendall(b"QUIT\r\n")
        assert client.reply().startswith(b"221")
    finally:
        client.close()
        sink.stop()


@pytest.mark.parametrize("credentials", [None, {"u": "p"}])
def test_the_cached_connection_setup_equals_aiosmtpds_own(credentials, monkeypatch):
    sink = SmtpSink(credentials=credentials, auth_required=bool(credentials))
    loop = asyncio.new_event_loop()
    try:
        sink._loop = loop
        fast = sink._protocol()
        monkeypatch.setattr(smtp_sink, "_FAST_INIT", False)
        slow = sink._protocol()
    finally:
        loop.close()
    assert smtp_sink.aiosmtpd.__version__ == "1.4.6", "the fast __init__ mirrors 1.4.6: check it against the new one"
    skip = {"_closed", "_stream_reader_wr", "_strong_reader", "_drain_waiters"}  # per-object futures and refs
    assert set(vars(fast)) == set(vars(slow))
    for name in set(vars(fast)) - skip:
        a, b = getattr(fast, name), getattr(slow, name)
        if name == "_smtp_methods" or name == "_handle_hooks":
            assert {k: v.__func__ for k, v in a.items()} == {k: v.__func__ for k, v in b.items()}, name
        elif name == "_auth_methods":
            assert [(k, v.method.__func__, v.is_builtin) for k, v in sorted(a.items())] == \
                   [(k, v.method.__func__, v.is_builtin) for k, v in sorted(b.items())]
        elif name == "_authenticator" and a is not None:
            assert a.__func__ is b.__func__
        elif name == "_cb_client_connected" or name == "_client_connected_cb":
            assert a.__func__ is b.__func__
        elif name == "_stream_reader":
            assert type(a) is type(b) and a._limit == b._limit
        elif name == "_auth_callback":
            assert a is b
        elif name not in ("_stream_writer", "_task", "_transport") or (a, b) != (None, None):
            assert a == b, name


def _ehlo_reply(port: int) -> bytes:
    client = WireClient(port)
    try:
        client.reply()
        client.sock.sendall(b"EHLO x.test\r\n")
        return client.reply()
    finally:
        client.close()


def test_the_one_write_ehlo_reply_is_byte_identical_to_aiosmtpds(monkeypatch):
    sink = SmtpSink(credentials={"u": "p"}).start()
    try:
        fast = _ehlo_reply(sink.port)
        # aiosmtpd's own reply: its EHLO with a hook that passes the lines through unchanged
        monkeypatch.setattr(smtp_sink._Handler, "handle_EHLO",
                            lambda self, server, session, envelope, hostname, responses: _same(responses))
        slow = _ehlo_reply(sink.port)
    finally:
        sink.stop()
    assert fast == slow
    assert fast.split(b"\r\n")[:-1] == [b"250-mailproof.sink", b"250-SIZE 67108864", b"250-8BITMIME",
                                        b"250-SMTPUTF8", b"250-AUTH LOGIN PLAIN", b"250 HELP"]


async def _same(responses):
    return responses


def test_a_fault_plan_filled_after_start_still_fires_at_every_stage():
    plan = FaultPlan()
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put, faults=plan).start()
    try:
        client = WireClient(sink.port)
        assert client.reply().startswith(b"220")  # no rules: the fast path
        client.close()
        plan.rule("connect", Reply("421 4.3.2 connect fault"))
        client = WireClient(sink.port)
        assert client.reply().startswith(b"421 4.3.2 connect fault")
        client.close()
        plan.clear()
        plan.rule("rcpt", Reply("450 4.2.0 rcpt fault"))
        client = WireClient(sink.port)
        client.reply()
        client.sock.sendall(b"EHLO x.test\r\nMAIL FROM:<a@x.test>\r\n")
        client.reply(), client.reply()
        client.sock.sendall(b"RCPT TO:<b@x.test>\r\n")
        assert client.reply().startswith(b"450 4.2.0 rcpt fault")
        client.close()
        assert got.empty()
    finally:
        sink.stop()


def test_the_idle_timeout_still_fires_between_commands():
    # Commands no longer re-arm the timer (it re-arms itself from the last byte): silence after
    # a command must still end the session with 421.
    sink = SmtpSink(timeout=0.3).start()
    client = WireClient(sink.port)
    try:
        client.greet()
        started = time.monotonic()
        reply = client.reply()  # the sink's 421, then its close
        assert reply.startswith(b"421 4.4.2") and b"timeout" in reply
        assert time.monotonic() - started >= 0.25
        assert client.reply() == b""
    finally:
        client.close()
        sink.stop()


_addr_chars = st.sampled_from(list("ab.@<>()\" \t=?!#~-_\\[]:,;") + ["\u00e9", "\x0c", "=?utf-8?q?x?="])
_addr_args = st.one_of(
    st.lists(_addr_chars, max_size=30).map("".join),
    st.builds(lambda lp, dom, rest: f"<{lp}@{dom}>{rest}",
              st.from_regex(r"[a-z0-9.!#=?~-]{0,8}", fullmatch=True),
              st.from_regex(r"[a-z0-9.=?-]{0,8}", fullmatch=True),
              st.sampled_from(["", " ", " SIZE=10", "\tBODY=8BITMIME", " (c) SIZE=1", "(c)", "x", "  \x0cA"])),
)


@settings(max_examples=1500, deadline=None)
@given(arg=_addr_args, limit=st.sampled_from([0, 3]))
def test_the_fast_address_parser_answers_like_aiosmtpds(arg, limit):
    proto = _protocol()
    proto.local_part_limit = limit
    assert _outcome(proto._getaddr, arg) == _outcome(lambda a: smtp_sink.SMTP._getaddr(proto, a), arg)


def _protocol():
    """One connection's SMTP protocol object of a fresh sink (made on a loop, as the sink does)."""
    loop = asyncio.new_event_loop()
    try:
        sink = SmtpSink()
        sink._loop = loop
        return sink._protocol()
    finally:
        loop.close()


def _outcome(parse, arg):
    try:
        return parse(arg)
    except Exception as exc:  # aiosmtpd's own parser raises IndexError on "<": the same must happen
        return type(exc)


def test_plain_addresses_take_the_fast_path(monkeypatch):
    proto = _protocol()
    monkeypatch.setattr(smtp_sink.SMTP, "_getaddr", lambda self, arg: pytest.fail(f"slow path for {arg!r}"))
    assert proto._getaddr("<bench@mailproof.test> SIZE=4200 BODY=8BITMIME") == \
        ("bench@mailproof.test", "SIZE=4200 BODY=8BITMIME")


def test_the_service_captures_under_uvloop_with_starttls_and_pipelining():
    import smtplib
    import ssl
    import subprocess
    import sys
    import urllib.request

    import uvloop  # noqa: F401  (dev pulls mailproof[speed]; a missing uvloop fails here, by name)

    proc = subprocess.Popen([sys.executable, "-m", "mailproof.capture.service", "--loop", "uvloop",
                             "--tls", "starttls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "READY", proc.stderr.read()
        url, smtp, ca = ready[1], ready[2].split("=", 1)[1], ready[3].split("=", 1)[1]
        host, port = smtp.rsplit(":", 1)
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cafile=ca))
            bodies = [CORPUS[0], CORPUS[1], CORPUS[4]]  # smtplib rewrites bare CR/LF: not those
            for body in bodies:
                assert client.sendmail("a@x.test", ["b@x.test"], body) == {}
        for seq, body in enumerate(bodies, 1):
            with urllib.request.urlopen(f"{url}/messages/{seq}/raw", timeout=10) as response:
                assert response.read() == body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_loop_uvloop_without_uvloop_says_how_to_install_it(monkeypatch):
    from mailproof.capture.service import cli

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert cli.loop_factory("auto") is None and cli.loop_factory("asyncio") is None
    with pytest.raises(smtp_sink_errors.MailproofError, match=r"pip install 'mailproof\[speed\]'"):
        cli.loop_factory("uvloop")


# The command loop, MAIL, RCPT and DATA answer the common case themselves (issue 12); every other case must get
# aiosmtpd's own reply. The script hits each check those commands make, in order.
_SCRIPT = [
    b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA", b"EHLO x.test",
    b"RCPT TO:<c@d.test>", b"DATA", b"MAIL FROM:<a@b.test> SMTPUTF8 SIZE=999999999999",  # 552, but SMTPUTF8 noted
    b"MAIL FROM:<a@b.test>", b"MAIL FROM:<n@b.test>",
    b"RCPT TO:<c@d.test>", b"RCPT TO: <e@d.test>", b"rcpt to:<f@d.test>  ", b"RCPT TO:<g@d.test> NOTIFY=NEVER",
    b"RCPT TO:", b"RCPT", b"RCPT TO:<bad", b"RCPT TO:<h@d.test> (comment)", b"RCPT TO:<=?utf-8?q?x?=@d.test>",
    b"RCPT TO:<\"q q\"@d.test>", b"RCPT TO:<" + b"l" * 70 + b"@d.test>", b"RCPT FROM:<c@d.test>", b"DATA x",
    b"DATA", b"Subject: one", b"", b"body", b".",
    b"MAIL from:<x@y.test> SIZE=100 BODY=8BITMIME", b"RCPT TO:<z@y.test>", b"RSET", b"RCPT TO:<z@y.test>",
    b"MAIL FROM:<>", b"MAIL FROM:<a@b.test>x", b"MAIL FROM:a@b.test", b"MAIL FROM: <a@b.test>", b"MAIL TO:<a@b.test>",
    b"MAIL", b"MAIL FROM:<", b"RSET", b"MAIL FROM:<u@b.test> SMTPUTF8", b"RCPT TO:<v@b.test>", b"DATA", b"two", b".",
    b"HELP MAIL", b"HELP RCPT", b"HELP DATA",
    # the command loop's own checks
    b"", b"NOOP", b"noop  x ", b"X" * 600, b"MAIL FROM:<" + b"m" * 600 + b"@b.test>", b"\xff\xfe", b"BOGUS x",
    b"MAIL FROM:<caf\xc3\xa9@b.test>", b"RCPT TO:<a\xff@b.test>", b"RSET", b"VRFY <a@b.test>", b"QUIT",
]


def _run_script(credentials) -> tuple[list[bytes], list]:
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put, credentials=credentials, auth_required=bool(credentials)).start()
    client = WireClient(sink.port)
    replies = [client.reply()]
    in_data = False
    script = list(_SCRIPT)
    if credentials:  # RCPT and DATA refused before AUTH (530), then the same as without
        script.insert(script.index(b"MAIL FROM:<a@b.test>", 1), b"AUTH PLAIN AHUAcA==")  # u / p
    try:
        for line in script:
            client.sock.sendall(line + b"\r\n")
            if in_data and line != b".":
                continue
            reply = client.reply()
            replies.append(reply)
            in_data = reply.startswith(b"354")
    finally:
        client.close()
        sink.stop()
    mails = []
    while not got.empty():
        m = got.get()
        mails.append((m.mail_from, m.rcpt_tos, m.mail_options, m.smtputf8, m.data))
    return replies, mails


@pytest.mark.parametrize("credentials", [None, {"u": "p"}])
def test_mail_rcpt_and_data_answer_like_aiosmtpds_own(credentials, monkeypatch):
    calls = []  # aiosmtpd's own MAIL/RCPT, reached only for what the fast path passes on
    for name in ("smtp_MAIL", "smtp_RCPT"):
        own = getattr(smtp_sink.SMTP, name)
        monkeypatch.setattr(smtp_sink.SMTP, name, lambda self, arg, own=own: calls.append(arg) or own(self, arg))
    fast = _run_script(credentials)
    monkeypatch.undo()
    if credentials is None:
        # Before EHLO (and RCPT before MAIL) aiosmtpd answers; after it, the fast path.
        assert calls.count("FROM:<a@b.test>") == 1 and calls.count("TO:<c@d.test>") == 2
        assert "to:<f@d.test>" not in calls and "TO:<g@d.test> NOTIFY=NEVER" in calls
    monkeypatch.setattr(smtp_sink._ClassTables, "_cache", {})  # the method tables are cached per class
    for name in ("smtp_MAIL", "smtp_RCPT", "push"):
        monkeypatch.setattr(smtp_sink._SinkSMTP, name, getattr(smtp_sink.SMTP, name))
    monkeypatch.setattr(smtp_sink._SinkSMTP, "_command_loop", smtp_sink.SMTP._handle_client)
    slow = _run_script(credentials)
    assert fast == slow
    if credentials:
        assert fast[0].count(b"530 5.7.0 Authentication required\r\n") == 3
    # the script delivers two messages, one with each kind of MAIL
    assert [m[:4] for m in fast[1]] == [("a@b.test", ("c@d.test", "e@d.test", "f@d.test", "bad", "h@d.test",
                                                            "x@d.test", '"q q"@d.test', "l" * 70 + "@d.test"),
                                          (), False), ("u@b.test", ("v@b.test",), ("SMTPUTF8",), True)]


_PIPELINED = (b"EHLO p.test\r\nMAIL FROM:<a@p.test>\r\nRCPT TO:<b@p.test>\r\nRCPT TO:<c@p.test> X=1\r\n"
              b"NOOP\r\nDATA\r\nSubject: p\r\n\r\n..dot\r\n.\r\nMAIL FROM:<d@p.test>\r\n"
              b"RCPT TO:<e@p.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
_NO_REPLY = {6, 7, 8, 13}  # the lines of _PIPELINED inside DATA, which get no reply of their own


def test_pipelined_commands_split_at_every_byte_boundary_get_the_same_replies_and_mail():
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    try:
        outcomes = set()
        for cut in range(0, len(_PIPELINED)):  # 0: all in one write
            client = WireClient(sink.port)
            try:
                client.reply()
                client.sock.sendall(_PIPELINED[:cut])
                # The replies to the first part's whole commands come back before the rest is sent,
                # so the server has read the first part alone.
                first = [client.reply() for i in range(_PIPELINED[:cut].count(b"\r\n")) if i not in _NO_REPLY]
                client.sock.sendall(_PIPELINED[cut:])
                rest = [client.reply() for _ in range(12 - len(first))]
                replies = re.sub(rb"queued as \d+", b"queued as N", b"".join(first + rest))
            finally:
                client.close()
            mails = (got.get(timeout=10), got.get(timeout=10))
            outcomes.add((replies, tuple((m.mail_from, m.rcpt_tos, m.data) for m in mails)))
        assert got.empty()
    finally:
        sink.stop()
    assert len(outcomes) == 1
    replies, mails = outcomes.pop()
    assert mails == (("a@p.test", ("b@p.test",), b"Subject: p\r\n\r\n.dot\r\n"), ("d@p.test", ("e@p.test",), b"x\r\n"))
    assert [r[:3] for r in replies.split(b"\r\n")[5:-1]] == [b"250", b"250", b"250", b"555", b"250", b"354", b"250",
                                                               b"250", b"250", b"354", b"250", b"221"]


# -- answering from the received bytes (data_received) -------------------------------------------
# While the command loop has nothing buffered, a connection answers MAIL, RCPT and DATA (its
# message included) itself. The script and the byte-boundary tests above run through it; these
# cover what only it can meet: fault rules arriving mid-command, a client that reads no replies.

def test_plain_commands_are_answered_without_waking_the_command_loop(monkeypatch):
    lines_read = []  # the command loop reads a line only for what it answers itself
    readuntil = asyncio.StreamReader.readuntil

    async def note_read(self, *args):
        line = await readuntil(self, *args)
        lines_read.append(line)
        return line

    monkeypatch.setattr(asyncio.StreamReader, "readuntil", note_read)
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    client = WireClient(sink.port)
    try:
        client.envelope()
        client.sock.sendall(b"Subject: s\r\n\r\n..x\r\n.\r\n")
        assert client.reply() == b"250 2.0.0 OK queued as 1\r\n"
        for line, code in ((b"RSET", b"250"), (b"NOOP", b"250"), (b"HELO y.test", b"250"), (b"EHLO y.test", b"250"),
                           (b"MAIL FROM:<a@x.test> SIZE=10 BODY=8BITMIME", b"250"), (b"RCPT TO:<q@x.test>", b"250"),
                           (b"QUIT", b"221")):
            client.sock.sendall(line + b"\r\n")
            assert client.reply().startswith(code), line
        assert client.reply() == b""  # closed after QUIT
        assert got.get(timeout=10).data == b"Subject: s\r\n\r\n.x\r\n"
        client.close()
        client = WireClient(sink.port)  # what the loop still answers: AUTH, STARTTLS, unknown commands, ...
        client.reply()
        client.sock.sendall(b"VRFY <a@x.test>\r\n")
        assert client.reply().startswith(b"252")
    finally:
        client.close()
        sink.stop()
    assert lines_read == [b"VRFY <a@x.test>\r\n"]


def test_an_after_data_rule_installed_by_on_message_applies_to_that_very_message():
    plan = FaultPlan()
    got: "queue.Queue" = queue.Queue()

    def on_message(mail) -> None:
        got.put(mail)
        if mail.seq == 1:
            plan.rule("after_data", Reply("451 4.3.0 after the first"))

    sink = SmtpSink(on_message=on_message, faults=plan).start()
    client = WireClient(sink.port)
    try:
        client.envelope()
        client.sock.sendall(b"Subject: one\r\n\r\n.\r\n")
        assert client.reply() == b"451 4.3.0 after the first\r\n"  # captured, then the rule's reply
        assert got.get(timeout=10).data == b"Subject: one\r\n\r\n"
        plan.clear()
        for line in (b"MAIL FROM:<a@x.test>", b"RCPT TO:<c@x.test>", b"DATA"):
            client.sock.sendall(line + b"\r\n")
            assert client.reply()[:1] in (b"2", b"3")
        client.sock.sendall(b"Subject: two\r\n\r\n.\r\n")
        assert client.reply() == b"250 2.0.0 OK queued as 2\r\n"
        assert got.get(timeout=10).rcpt_tos == ("c@x.test",)
    finally:
        client.close()
        sink.stop()


def test_a_data_rule_installed_while_the_message_is_being_sent_refuses_it():
    plan = FaultPlan()
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put, faults=plan).start()
    client = WireClient(sink.port)
    try:
        client.envelope()  # answered from the received bytes: no rule yet
        client.sock.sendall(b"Subject: half\r\n\r\n")
        plan.rule("data", Reply("554 5.7.1 refused mid-data"))
        client.sock.sendall(b"the rest\r\n.\r\n")
        assert client.reply() == b"554 5.7.1 refused mid-data\r\n"
        client.sock.sendall(b"NOOP\r\n")
        assert client.reply().startswith(b"250")
        assert got.empty() and sink.captured_count == 0
    finally:
        client.close()
        sink.stop()


def test_a_client_cut_off_mid_message_leaves_nothing_and_the_next_one_is_captured(lost_connections):
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    try:
        client = WireClient(sink.port)
        client.envelope(b"cut@x.test")
        client.sock.sendall(b"Subject: cut\r\n\r\nhalf a mess")
        client.close()
        proto = lost_connections.get(timeout=10)
        # its DATA deadline (600 s by default) would otherwise keep the connection alive
        assert proto._scanner is None and proto._data_deadline is None
        client = WireClient(sink.port)
        client.envelope(b"whole@x.test")
        client.sock.sendall(b"Subject: whole\r\n\r\n.\r\n")
        assert client.reply() == b"250 2.0.0 OK queued as 1\r\n"
        client.close()
        mail = got.get(timeout=10)
        assert (mail.seq, mail.rcpt_tos, sink.captured_count) == (1, ("whole@x.test",), 1)
    finally:
        sink.stop()


def test_a_client_that_reads_no_replies_still_gets_every_reply_in_order(monkeypatch):
    # Replies pile up until the transport pauses writing; the connection must then stop answering
    # from the received bytes and let the command loop wait for the drain, as aiosmtpd's push does.
    paused = []
    made = smtp_sink._SinkSMTP.connection_made

    def small_send_buffer(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=4096)
        made(self, transport)

    def pause_writing(self) -> None:
        paused.append(True)
        asyncio.StreamReaderProtocol.pause_writing(self)

    buffered = []  # the transport's write buffer after each reply
    write_reply = smtp_sink._SinkSMTP._write_reply

    def note_buffer(self, status) -> bool:
        drain = write_reply(self, status)
        buffered.append(self.transport.get_write_buffer_size())
        return drain

    monkeypatch.setattr(smtp_sink._SinkSMTP, "connection_made", small_send_buffer)
    monkeypatch.setattr(smtp_sink._SinkSMTP, "pause_writing", pause_writing)
    monkeypatch.setattr(smtp_sink._SinkSMTP, "_write_reply", note_buffer)
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    count = 500
    session = b"EHLO x.test\r\n" + b"".join(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<r%d@x.test>\r\nDATA\r\nn %d\r\n.\r\n" % (i, i)
                                             for i in range(count)) + b"QUIT\r\n"
    client = WireClient(sink.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        client.sock.sendall(session)  # the sink reads it all while its replies wait in the transport
        replies = client.file.read()  # to the close after QUIT
    finally:
        client.close()
        sink.stop()
    assert paused, "the transport never paused writing: the test did not reach its case"
    assert max(buffered) < 4096 + 100  # no reply written past the high-water mark but the one that hit it
    lines = replies.split(b"\r\n")
    assert lines[-2:] == [b"221 Bye", b""]
    expected = [b"250 2.1.0 OK", b"250 2.1.5 OK", b"354 End data with <CR><LF>.<CR><LF>"]
    for i in range(count):
        assert lines[-2 - 4 * (count - i):-2 - 4 * (count - i) + 4] == expected + [b"250 2.0.0 OK queued as %d" % (i + 1)]
    mails = [got.get(timeout=10) for _ in range(count)]
    assert [(m.rcpt_tos, m.data) for m in mails] == [((f"r{i}@x.test",), b"n %d\r\n" % i) for i in range(count)]


def test_a_command_that_waits_is_finished_by_the_command_loop_in_order(monkeypatch):
    # A command method that waits (a slow hook, a drain) cannot finish inside data_received:
    # the command loop awaits the rest, and the commands after it wait their turn.
    async def waiting_noop(self, arg) -> None:
        await asyncio.sleep(0)  # a bare yield ...
        answer = self.loop.create_future()  # ... then a future resolved two loop turns later
        self.loop.call_soon(self.loop.call_soon, answer.set_result, f"250 waited for {arg}")
        await self.push(await answer)

    monkeypatch.setattr(smtp_sink._ClassTables, "_cache", {})  # the method tables are cached per class
    monkeypatch.setattr(smtp_sink._SinkSMTP, "smtp_NOOP", waiting_noop)
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    client = WireClient(sink.port)
    try:
        client.greet()
        client.sock.sendall(b"NOOP one\r\nNOOP two\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        assert [client.reply() for _ in range(5)] == [
            b"250 waited for one\r\n", b"250 waited for two\r\n", b"250 2.1.0 OK\r\n", b"250 2.1.5 OK\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        client.sock.sendall(b"x\r\n.\r\nNOOP three\r\n")
        assert [client.reply() for _ in range(2)] == [b"250 2.0.0 OK queued as 1\r\n", b"250 waited for three\r\n"]
        assert got.get(timeout=10).data == b"x\r\n"
    finally:
        client.close()
        sink.stop()


def test_nothing_after_quit_is_answered(caplog):
    got: "queue.Queue" = queue.Queue()
    sink = SmtpSink(on_message=got.put).start()
    client = WireClient(sink.port)
    try:
        client.greet()
        with caplog.at_level(logging.ERROR):
            client.sock.sendall(b"QUIT\r\nNOOP\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\nx\r\n.\r\n")
            assert client.file.read() == b"221 Bye\r\n"  # then the close
            sink.stop()  # the loop's own errors (a failed data_received) are logged by then
    finally:
        client.close()
        sink.stop()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert got.empty() and sink.captured_count == 0
