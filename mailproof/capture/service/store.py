"""The capture store: retained raw mail in seq order, and the waiters and streams that want it.

It keeps bytes and the envelope, never a parsed message: a ``Message`` is built from a record
when somebody asks (``message_of``), and a ``Criteria`` decides what a waiter takes. Everything
runs on the service's one event loop, so nothing here needs a lock.

The loop also runs SMTP capture, so no request may hold it for long: the store keeps the seqs of
each (lower-cased) envelope recipient (``seqs_to``), so a wait or listing for one recipient never
scans the rest (a message to one lower-case recipient is indexed inside ``Records``, in an array
table and a chain column, some 15 B; any other in ``by_rcpt``, a dict); whatever still walks
retained records yields to the loop every ``SCAN_CHUNK`` records; and a large message is parsed
in a worker thread (``prepared``), never on the loop.

Retention (docs/architecture.md, decision 5): the oldest record is evicted at the cap only once
every stream client has been sent it. A client that names itself (``/stream?client=ID``) keeps a
cursor, the last seq written to it, and the cursor outlives its connection by ``stream_hold``
seconds so a reconnect replays from ``since=`` instead of finding a gap. While a cursor lags, the
store keeps everything past the cap, logs that once and counts each such delivery in ``over_cap``.
A ``/wait`` waiter needs no hold: it is offered each message as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import time
import weakref
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

from mailproof.addresses import TOKEN
from mailproof.capture.service import ServiceError
from mailproof.capture.service.records import (AT, AUTH_USER, DATA, FROM, HELO, MAIL_OPTIONS, PEER, RCPTS,  # noqa: F401
                                               SEQ, SMTPUTF8, TLS, Record, Records, index_key, index_keys)
from mailproof.capture.smtp_sink import CapturedMail
from mailproof.criteria import Criteria, _text_matches
from mailproof.message import Message

log = logging.getLogger("mailproof.sink_service")

DEFAULT_MAX_MESSAGES = 200_000
SCAN_CHUNK = 100  # records handled between two yields to the loop (SMTP capture shares it)
SUBJECT_BATCH = 500  # Subjects parsed per trip to a parser process
INLINE_SUBJECTS = 50  # fewer missing Subjects than this are parsed on the loop (no trip)
PARSER_PROCESSES = 2
PARSER_NICENESS = 10
SLICE_SECONDS = 0.0005  # ... or sooner: a scan holds the loop this long at most between yields
TURN_SECONDS = 0.005  # a heavy request hands the turn on after this long (its slices included)
OFF_LOOP_BYTES = 64 * 1024  # a message at least this big is parsed in a worker thread

# A retained message reads as a plain tuple in CapturedMail's field order (``Record``), stored
# by column in ``Records`` (records.py): a few machine words beside its raw bytes, and nothing
# the garbage collector scans on each full collection (dataclass instances would be).


def message_of(rec: Record) -> Message:
    """The record as a ``Message``: cheap to build, it parses only what is then asked of it."""
    return Message(rec[DATA], mail_from=rec[FROM], rcpt_tos=rec[RCPTS], received_at=rec[AT],
                   seq=rec[SEQ], source="sink-service")


def _touch_head(msg: Message) -> Message:
    msg.recipients, msg.subject  # the header section, parsed (and cached on msg)
    return msg


async def prepared(rec: Record, work=_touch_head):
    """``work(message_of(rec))``: on the loop for a small message, in a worker thread for a large
    one (parsing many megabytes, or 10,000 parts, must not stall SMTP capture)."""
    msg = message_of(rec)
    if len(rec[DATA]) < OFF_LOOP_BYTES:
        return work(msg)
    return await asyncio.get_running_loop().run_in_executor(None, work, msg)


class Slicer:
    """``async with Slicer() as slicer:`` then ``await slicer.tick()`` in a loop over records.

    A tick yields to the event loop every ``SCAN_CHUNK`` records or ``SLICE_SECONDS``,
    whichever comes first. Heavy requests also take turns (one lock per loop, held across the
    yields and handed to the next in line every ``TURN_SECONDS``): with many at once, SMTP
    capture waits behind one slice between its steps, not one slice per request in flight
    (benchmarks/service_canary.py measures it).
    """

    __slots__ = ("count", "since", "turn", "held", "turn_since")
    _turns: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.count = 0
        self.since = self.turn_since = time.perf_counter()
        loop = asyncio.get_running_loop()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = asyncio.Lock()
        self.turn = turn
        self.held = False

    async def _take(self) -> None:
        await self.turn.acquire()
        self.held = True
        self.since = self.turn_since = time.perf_counter()

    def _give(self) -> None:
        if self.held:
            self.held = False
            self.turn.release()

    async def __aenter__(self) -> "Slicer":
        await self._take()
        return self

    async def __aexit__(self, *exc) -> None:
        self._give()

    @contextlib.asynccontextmanager
    async def paused(self):
        """Give the turn up while awaiting work done elsewhere (a parser process)."""
        if not self.held:
            yield
            return
        self._give()
        try:
            yield
        finally:
            await self._take()

    async def tick(self) -> None:
        self.count += 1
        if self.count >= SCAN_CHUNK or (self.count % 8 == 0 and time.perf_counter() - self.since > SLICE_SECONDS):
            self.count = 0
            if self.held and time.perf_counter() - self.turn_since > TURN_SECONDS:
                self._give()  # the next request in line runs its slices now (FIFO)
                await asyncio.sleep(0)
                await self._take()
            else:
                await asyncio.sleep(0)  # SMTP (and light requests) run; other heavy ones wait their turn
            self.since = time.perf_counter()


def _subject(msg: Message) -> str:
    return msg.subject


def subjects_of(datas: list[bytes]) -> list[str]:
    """The decoded Subject of each raw message: run in a parser process (``CaptureStore.off_process``)."""
    return [Message(data).subject for data in datas]


def _lower_priority() -> None:
    try:
        os.nice(PARSER_NICENESS)
    except OSError:  # not permitted here: parse at normal priority
        pass


def _rcpt_keys(rec: Record) -> set:
    return {str(r).lower() for r in rec[RCPTS]}




class Waiter:
    """One ``/wait`` long-poll: what it waits for, how many, after which seq, and its future."""

    __slots__ = ("criteria", "count", "since", "found", "future", "scanning")

    def __init__(self, criteria: Criteria, count: int, since: int) -> None:
        self.criteria = criteria
        self.count = count
        self.since = since
        self.found: list[Message] = []
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.scanning = False  # still reading the retained mail: arrivals are kept, not yet enough

    def offer(self, msg: Message) -> bool:
        """Take ``msg`` if it matches; True once the waiter has all it waits for."""
        if msg.seq <= self.since or self.future.done() or not self.criteria.matches(msg):
            return False
        self.found.append(msg)
        if not self.scanning and len(self.found) >= self.count:
            self.future.set_result(None)
            return True
        return False

    def end_scan(self) -> None:
        """The retained mail is read: the earliest ``count`` matches win, retained or arrived."""
        self.scanning = False
        self.found.sort(key=lambda m: m.seq)
        if len(self.found) >= self.count and not self.future.done():
            self.future.set_result(None)


class Stream:
    """One ``/stream`` subscriber: the arrivals it has not written yet, and how it should end.

    ``run`` (``/stream?run=ID``, a Locust worker's AddressBook run id) filters it: the stream
    carries the mail to that run's addresses, and mail to no harness address at all (strays, which
    every filtered stream gets: the ledgers count them once, by seq), never another run's mail.
    ``pending`` holds ``(first, record)``: ``first`` is the lowest seq the line accounts for, the
    seqs filtered out before it included, so the client tells a filtered seq from a lost one.
    ``considered``: the last seq the stream has seen; ``accounted``: the last seq a queued or
    written line covers (when the stream is idle and ``considered`` is past it, a ``through``
    line covers the rest).
    """

    __slots__ = ("pending", "event", "overflowed", "closing", "drop", "transport", "run", "considered",
                 "accounted")

    def __init__(self, transport, run: Optional[str] = None, since: int = 0) -> None:
        self.pending: list[tuple[int, Record]] = []
        self.event = asyncio.Event()
        self.overflowed = False
        self.closing = False
        self.drop = False
        self.transport = transport
        self.run = run
        self.considered = self.accounted = since

    def wants(self, rec: Record) -> bool:
        if self.run is None:
            return True
        runs = [found.group(1) for found in map(TOKEN.search, (str(r).lower() for r in rec[RCPTS])) if found]
        return not runs or self.run in runs

    def take(self, rec: Record) -> bool:
        """Account for ``rec``; True when it is queued for writing."""
        self.considered = rec[SEQ]
        if not self.wants(rec):
            return False
        self.pending.append((self.accounted + 1, rec))
        self.accounted = rec[SEQ]
        return True


class Cursor:
    """A named stream client's place: the last seq written to it, and while it is disconnected,
    since when (its hold on retention ends ``stream_hold`` seconds later)."""

    __slots__ = ("seq", "connections", "released_at")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.connections = 0
        self.released_at: Optional[float] = None


DEFAULT_STREAM_HOLD = 120.0  # seconds a disconnected stream client's cursor still holds mail


class CaptureStore:
    """Retained raw messages in seq order, plus the long-poll waiters and stream subscribers.

    ``add`` is the sink's ``on_message``: it runs inside the DATA handler, before the 250 reply.
    """

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES,
                 stream_hold: float = DEFAULT_STREAM_HOLD) -> None:
        if max_messages < 1:
            raise ServiceError("--max-messages must be at least 1")
        if stream_hold < 0:
            raise ServiceError("--stream-hold must be 0 or more seconds")
        self.max_messages = max_messages
        self.stream_hold = stream_hold
        self.cursors: dict[str, Cursor] = {}  # named stream clients -> what they were sent
        self.over_cap = 0  # deliveries kept past max_messages: a stream client had not been sent the oldest
        self._over_cap_logged = False
        self.renumbered = 0  # messages that came numbered at or below the last seq (a harness fault)
        self._renumber_logged = False
        self.messages = Records(max_messages)
        self.received = 0
        self.bytes = 0
        self.retained_bytes = 0
        self.evicted = 0
        self.cleared = 0
        self.last_seq = 0
        # The records ``Records`` does not index itself (several recipients, a mixed-case or non-str
        # one: rare in a rehearsal): envelope recipient (``index_key``: lower-cased, UTF-8) -> its
        # retained seq (an int: one message) or seqs (a deque, oldest first: a deque costs some
        # 600 B, too much for every recipient).
        self.by_rcpt: "dict[bytes, int | deque[int]]" = {}
        self.subjects: dict[int, str] = {}  # seq -> decoded Subject, once some request parsed it
        # Evicted seqs as [first, last] runs (a clear starts a new run): how many were evicted
        # after any seq, for a /wait that found nothing.
        self.evicted_runs: list[list[int]] = []
        self.waiters_by_rcpt: dict[str, list[Waiter]] = {}
        self.waiters_any: list[Waiter] = []
        self.waiters_abandoned = 0  # /wait clients that hung up before their answer
        self.streams: set[Stream] = set()
        self._watchers: list[asyncio.Future] = []  # woken when the waiters change
        self._parsers: Optional[ProcessPoolExecutor] = None

    # -- capture (hot path: keep it short) -------------------------------------------------------

    def add(self, msg: CapturedMail) -> None:
        if msg.seq <= self.last_seq:  # two producers numbering apart: kept, numbered after the last
            msg = self._renumbered(msg)
        messages = self.messages
        by_rcpt = self.by_rcpt
        seq = msg.seq
        for key in messages.append(msg):  # none, usually: Records indexed it
            seqs = by_rcpt.get(key)
            if seqs is None:
                by_rcpt[key] = seq  # most recipients get one message: a bare int, not a deque
            elif type(seqs) is int:
                by_rcpt[key] = deque((seqs, seq))
            else:
                seqs.append(seq)
        size = len(msg.data)
        self.received += 1
        self.bytes += size
        self.retained_bytes += size
        self.last_seq = msg.seq
        if len(messages) > self.max_messages:
            self._evict_to_cap()
        if not (self.streams or self.waiters_by_rcpt or self.waiters_any):
            return
        rec = messages[-1]
        if self.streams:
            for stream in self.streams:
                stream.take(rec)
                if len(stream.pending) > self.max_messages:
                    stream.overflowed = True  # a stuck client: drop it, it reconnects with since=
                stream.event.set()  # filtered out too: the client hears "through" (and its cursor moves)
        if self.waiters_by_rcpt or self.waiters_any:
            self._offer(message_of(rec))

    def _renumbered(self, msg: CapturedMail) -> CapturedMail:
        """Seqs only ever grow (streams, cursors and pages count on it), so a message numbered at
        or below the last one is a harness fault: logged once, the message kept under the next seq."""
        if not self._renumber_logged:
            self._renumber_logged = True
            log.error("mailproof harness error: a captured message came numbered %d after seq %d (two capture "
                      "paths numbering apart?); it is kept as %d", msg.seq, self.last_seq, self.last_seq + 1)
        self.renumbered += 1
        return dataclasses.replace(msg, seq=self.last_seq + 1)

    def _evict_to_cap(self, delivery: bool = True) -> None:
        """Evict the oldest records down to the cap, each only once every cursor is past it. Each
        record is evicted once, so this is amortised O(1) per delivery (times the few cursors).
        ``delivery``: called for a new message (counted in ``over_cap`` if it must be kept)."""
        messages = self.messages
        while len(messages) > self.max_messages:
            if not self._sent_to_every_cursor(messages.seq_at(0)):
                self.over_cap += delivery
                if not self._over_cap_logged:
                    self._over_cap_logged = True
                    log.warning("retention limit of %d messages reached, but a stream client has not been sent "
                                "the oldest yet: keeping them past the limit (counted in /stats as 'over_cap')",
                                self.max_messages)
                return
            seq, size, keys = messages.evict()
            self.retained_bytes -= size
            self.evicted += 1
            self._unindex(seq, keys)
            if self.subjects:
                self.subjects.pop(seq, None)
            runs = self.evicted_runs
            if runs and runs[-1][1] == seq - 1:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq])
            if self.evicted == 1:
                log.warning("retention limit of %d messages reached: evicting the oldest (counted in "
                            "/stats as 'evicted'); raise --max-messages to keep more", self.max_messages)

    def _sent_to_every_cursor(self, seq: int) -> bool:
        if not self.cursors:
            return True
        now = time.monotonic()
        for client, cursor in list(self.cursors.items()):
            if cursor.released_at is not None and now - cursor.released_at >= self.stream_hold:
                del self.cursors[client]  # gone for longer than the hold: it holds nothing now
            elif cursor.seq < seq:
                return False
        return True

    # -- named stream clients ----------------------------------------------------------------------

    def attach(self, client: str, since: int) -> Cursor:
        """A named stream client (re)connects asking for mail after ``since``."""
        cursor = self.cursors.get(client)
        if cursor is None:
            cursor = self.cursors[client] = Cursor(since)
        cursor.seq = since
        cursor.connections += 1
        cursor.released_at = None
        return cursor

    def detach(self, cursor: Cursor) -> None:
        """One of the client's connections ended: its hold starts running out."""
        cursor.connections -= 1
        if cursor.connections <= 0:
            cursor.released_at = time.monotonic()

    def sent(self, cursor: Cursor, seq: int) -> None:
        """Records up to ``seq`` were written to the client: they may go now."""
        if seq > cursor.seq:
            cursor.seq = seq
            if len(self.messages) > self.max_messages:
                self._evict_to_cap(delivery=False)

    def release(self, client: str) -> bool:
        """The client is done (``DELETE /streams/ID``): it holds nothing any more."""
        found = self.cursors.pop(client, None) is not None
        if found and len(self.messages) > self.max_messages:
            self._evict_to_cap(delivery=False)
        return found

    def _offer(self, msg: Message) -> None:
        # One Message for every waiter: its headers are parsed once at most.
        for rcpt in msg.recipients:
            waiters = self.waiters_by_rcpt.get(rcpt)
            if waiters:
                waiters[:] = [w for w in waiters if not w.offer(msg)]
                if not waiters:
                    del self.waiters_by_rcpt[rcpt]
        if self.waiters_any:
            self.waiters_any[:] = [w for w in self.waiters_any if not w.offer(msg)]
        if self._watchers:
            self._waiters_changed()

    def _unindex(self, seq: int, keys) -> None:
        by_rcpt = self.by_rcpt
        for key in keys:
            seqs = by_rcpt.get(key)
            if seqs is None:
                continue
            if type(seqs) is int:
                if seqs == seq:
                    del by_rcpt[key]
                continue
            if seqs[0] == seq:  # the evicted one is always the oldest retained
                seqs.popleft()
            else:
                try:
                    seqs.remove(seq)
                except ValueError:
                    pass
            if len(seqs) == 1:
                by_rcpt[key] = seqs[0]
            elif not seqs:
                del by_rcpt[key]

    # -- reading ---------------------------------------------------------------------------------

    # -- parsing off the loop ----------------------------------------------------------------------

    async def off_process(self, fn, *args):
        """``fn(*args)`` in a parser process: parsing in a thread would still hold this process's
        GIL, and with it the loop that captures SMTP. A thread is the fallback if the parser
        process cannot run."""
        loop = asyncio.get_running_loop()
        if self._parsers is None:
            # Niced: parsing for the API is background work, capture on the loop comes first.
            self._parsers = ProcessPoolExecutor(max_workers=PARSER_PROCESSES,
                                                mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_lower_priority)
        try:
            return await loop.run_in_executor(self._parsers, fn, *args)
        except BrokenProcessPool:
            log.warning("a parser process died: parsing in a thread instead")
            self._parsers = None
            return await loop.run_in_executor(None, fn, *args)

    def close(self) -> None:
        parsers, self._parsers = self._parsers, None
        if parsers is not None:
            parsers.shutdown(wait=False, cancel_futures=True)

    async def remember_subjects(self, records: list[Record]) -> None:
        """Parse (once) the Subject of every record in ``records``: in parser processes, in
        batches, when there are many."""
        missing = [rec for rec in records if rec[SEQ] not in self.subjects]
        if len(missing) < INLINE_SUBJECTS:
            for rec in missing:
                await self.subject(rec)
            return
        for start in range(0, len(missing), SUBJECT_BATCH):
            chunk = missing[start:start + SUBJECT_BATCH]
            subjects = await self.off_process(subjects_of, [rec[DATA] for rec in chunk])
            for rec, subject in zip(chunk, subjects):
                if self.retains(rec):
                    self.subjects[rec[SEQ]] = subject

    async def subject(self, rec: Record) -> str:
        """The record's decoded Subject: parsed once (off the loop if large), then remembered."""
        seq = rec[SEQ]
        subject = self.subjects.get(seq)
        if subject is None:
            subject = await prepared(rec, _subject)
            if self.retains(rec):  # not evicted or cleared meanwhile
                self.subjects[seq] = subject
        return subject

    def seqs_to(self, recipient: str, since: int = 0) -> list[int]:
        """Retained seqs > ``since`` of mail to ``recipient`` (envelope, case-insensitive), oldest first."""
        key = index_key(recipient)
        chained = self.messages.seqs_to(key, since)
        seqs = self.by_rcpt.get(key)
        if seqs is None:
            return chained
        if type(seqs) is int:
            found = [seqs] if seqs > since else []
        else:
            found = []
            for seq in reversed(seqs):  # ints only: cheap even for a recipient with many messages
                if seq <= since:
                    break
                found.append(seq)
            found.reverse()
        if chained:  # both indexes hold mail to it (e.g. "A@x" and "a@x"): one record is in only one
            return sorted(chained + found)
        return found

    def after(self, seq: int, limit: int) -> list[Record]:
        """At most ``limit`` retained records with seq > ``seq``, oldest first (a page)."""
        skip = self.messages.count_to(seq)
        return self.messages.slice(skip, skip + limit)

    def count_after(self, seq: int) -> int:
        """How many retained records have seq > ``seq``."""
        return len(self.messages) - self.messages.count_to(seq)

    def evicted_after(self, seq: int) -> int:
        """How many messages with seq > ``seq`` were evicted (not cleared)."""
        return sum(max(0, last - max(first, seq + 1) + 1) for first, last in self.evicted_runs)

    @property
    def first_seq(self) -> int:
        return self.messages.seq_at(0) if self.messages else self.last_seq + 1

    def get(self, seq: int) -> Optional[Record]:
        messages = self.messages
        index = messages.count_to(seq) - 1
        return messages[index] if index >= 0 and messages.seq_at(index) == seq else None

    def retains(self, rec: Record) -> bool:
        """``rec`` (read earlier) is still retained: not evicted or cleared since."""
        found = self.get(rec[SEQ])
        return found is not None and found[DATA] is rec[DATA]

    def since(self, seq: int) -> list[Record]:
        """Retained messages with seq > ``seq``, oldest first."""
        messages = self.messages
        return messages.slice(messages.count_to(seq), len(messages))

    def clear(self) -> int:
        count = len(self.messages)
        for cursor in self.cursors.values():
            cursor.seq = max(cursor.seq, self.last_seq)  # nothing is left to hold
        self.messages.clear()
        self.by_rcpt.clear()
        self.subjects.clear()
        self.retained_bytes = 0
        self.cleared += count
        return count

    # -- waiters ---------------------------------------------------------------------------------

    async def add_waiter(self, waiter: Waiter) -> None:
        """Offer ``waiter`` every arrival (keyed by its recipient) and the retained mail after its
        ``since``. It is registered and the retained candidates are snapshot in one step, so
        nothing slips past; the snapshot is then read yielding to the loop (a recipient's own
        mail only, through ``seqs_to``), and the earliest ``count`` matches win."""
        rcpt = waiter.criteria.recipient
        if rcpt:
            backlog = [rec for rec in map(self.get, self.seqs_to(rcpt, waiter.since)) if rec is not None]
            self.waiters_by_rcpt.setdefault(rcpt, []).append(waiter)
        else:
            backlog = self.since(waiter.since)
            self.waiters_any.append(waiter)
        self._waiters_changed()
        waiter.scanning = True
        try:
            async with Slicer() as slicer:
                await self._scan(waiter, backlog, slicer)
        finally:
            waiter.end_scan()

    async def _scan(self, waiter: Waiter, backlog: list[Record], slicer: Slicer) -> None:
        """Offer ``waiter`` the retained ``backlog`` in seq order, until it has ``count`` of them."""
        taken = 0  # matches among the retained mail (arrivals meanwhile have later seqs)
        wanted = waiter.criteria.subject
        for i, rec in enumerate(backlog):
            if wanted is not None and i % SUBJECT_BATCH == 0:
                async with slicer.paused():
                    await self.remember_subjects(backlog[i:i + SUBJECT_BATCH])
            await slicer.tick()
            if waiter.future.done():
                return
            if wanted is not None and not _text_matches(wanted, await self.subject(rec)):
                continue  # the very test Criteria makes, on the remembered Subject
            before = len(waiter.found)
            waiter.offer(await prepared(rec))
            taken += len(waiter.found) - before
            if taken >= waiter.count:
                return  # in seq order: these are the earliest matches

    def _waiters_changed(self) -> None:
        watchers, self._watchers = self._watchers, []
        for future in watchers:
            if not future.done():
                future.set_result(None)

    async def waiters_settle(self, count: int, timeout: float) -> None:
        """Return once ``waiter_count == count`` (or after ``timeout``): ``/stats?waiters=N``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.waiter_count != count:
            left = deadline - loop.time()
            if left <= 0:
                return
            future = loop.create_future()
            self._watchers.append(future)
            try:
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                return

    def remove_waiter(self, waiter: Waiter) -> None:
        rcpt = waiter.criteria.recipient
        waiters = self.waiters_by_rcpt.get(rcpt) if rcpt else self.waiters_any
        if waiters and waiter in waiters:
            waiters.remove(waiter)
        if rcpt and rcpt in self.waiters_by_rcpt and not self.waiters_by_rcpt[rcpt]:
            del self.waiters_by_rcpt[rcpt]
        self._waiters_changed()

    @property
    def waiters(self) -> list[Waiter]:
        return self.waiters_any + [w for ws in self.waiters_by_rcpt.values() for w in ws]

    @property
    def waiter_count(self) -> int:
        return len(self.waiters_any) + sum(len(w) for w in self.waiters_by_rcpt.values())

    # -- ending clients --------------------------------------------------------------------------

    def drop_streams(self) -> int:
        """End every stream abruptly (no terminating chunk): ``DELETE /streams``."""
        streams = list(self.streams)
        for stream in streams:
            stream.closing = stream.drop = True
            stream.event.set()
        return len(streams)

    def close_clients(self) -> None:
        """The service is stopping: end every stream cleanly and cancel every waiter."""
        for stream in list(self.streams):
            stream.closing = True
            stream.event.set()
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters_changed()
