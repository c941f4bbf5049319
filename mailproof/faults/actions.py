"""Fault actions: what the capture sink does instead of its normal reply at one SMTP stage.

An action's ``act(ctx)`` returns a reply string, or None to let the stage proceed; it may delay
or hang up. Rules that say where and to whom an action applies are in ``mailproof.faults.plan``.

Stages, in SMTP order: ``connect`` (before the greeting), ``ehlo``, ``mail``, ``rcpt``, ``data``
(after the message is read, before it is captured), ``after_data`` (captured, before the reply:
a disconnect here is the ambiguous case where the client cannot know the mail was taken).
Recipients are known from ``rcpt`` on; rules that name a recipient never fire earlier.

``Tamper`` (stage ``data`` only) changes the message's body before the sink stores it, as a
relay or a virus scanner that rewrites mail would: a DKIM signature made before must then fail.

Counters: ``fired`` counts the events a rule matched (its action was asked), ``acted`` those
where it changed the outcome: a reply, a hang-up, or a stall (counted when the stall starts, so a
test that saw its client time out can read it at once). A Delay that then proceeds only fires.

Known gap: the ``ehlo`` stage sees EHLO only. smtplib and aiosmtplib answer a refused EHLO with
HELO, which the sink (``mailproof/capture/smtp_sink.py``) does not route through the plan, so they then send
normally (``tests/test_smtp_faults.py`` keeps a strict xfail for it).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import numbers
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

STAGES = ("connect", "ehlo", "mail", "rcpt", "data", "after_data")
_REPLY = re.compile(r"^[245]\d\d[ -]")


class FaultError(ValueError):
    """A rule is malformed; the message says what to fix."""


def _check_reply(reply: str) -> str:
    if not isinstance(reply, str):
        raise FaultError(f"an SMTP reply must be a string, not {reply!r}")
    lines = reply.replace("\r\n", "\n").rstrip("\n").split("\n")
    if not all(_REPLY.match(line + " ") for line in lines):
        raise FaultError(f"not an SMTP reply: {reply!r}; use e.g. '451 4.3.0 try again later'")
    code = lines[0][:3]
    if any(line[:3] != code for line in lines):
        raise FaultError(f"every line of a multi-line reply needs the same code: {reply!r}")
    # aiosmtpd sends a reply string as is: build the multi-line form (code-text, code text).
    return "\r\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line[4:]}" for i, line in enumerate(lines))


# -- actions -------------------------------------------------------------------------------------
# An action's ``act`` returns a reply string, or None to let the stage proceed normally. It may
# also delay, or close the connection.


@dataclass
class Reply:
    """Answer with this SMTP reply (any 4xx/5xx, multi-line with '\\n')."""

    reply: str

    def __post_init__(self) -> None:
        self.reply = _check_reply(self.reply)

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        if self.reply.startswith("421"):
            ctx.close_after_reply = True  # 421 means the server is closing the channel
        return self.reply


def _check_seconds(what: str, seconds: Any) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not seconds >= 0 \
            or math.isinf(seconds):
        raise FaultError(f"{what} needs a finite, non-negative number of seconds, not {seconds!r}")


@dataclass
class Delay:
    """A slow server: wait, then proceed (or answer ``then``: an action or a reply string)."""

    seconds: float
    then: Optional["Action"] = None

    def __post_init__(self) -> None:
        _check_seconds("Delay", self.seconds)
        # A reply string is shorthand here too (it used to fail only when the rule fired).
        self.then = as_action(self.then) if self.then is not None else None

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        await asyncio.sleep(self.seconds)
        return await self.then.act(ctx) if self.then else None


@dataclass
class Disconnect:
    """Hang up without a reply."""

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        ctx.hang_up()
        await asyncio.Future()  # cancelled by aiosmtpd when the connection is lost
        return None  # pragma: no cover


@dataclass
class Stall:
    """Say nothing until the client gives up (or ``seconds`` pass, then hang up)."""

    seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if self.seconds is not None:
            _check_seconds("Stall", self.seconds)

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        # Withholding the reply changes the outcome whether or not the client gives up first:
        # count it now (a client timeout cancels this coroutine before any hang-up of ours).
        ctx.mark_acted()
        if self.seconds is None:
            await asyncio.Future()
        await asyncio.sleep(self.seconds)
        ctx.hang_up()
        await asyncio.Future()
        return None


@dataclass
class Accept:
    """Proceed normally (a step in a Sequence)."""

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        return None


@dataclass
class Script:
    """Deterministic script: one action per matching event, then ``after`` forever.

    ``Script(["451 4.3.0 try later"] * 2)`` is "451 twice, then accept".
    """

    steps: list
    after: Optional["Action"] = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Sequence):
            raise FaultError(f"a Script takes a list of steps, not {self.steps!r}")
        self.steps = [as_action(s) for s in self.steps]
        self.after = as_action(self.after) if self.after is not None else None
        self._next = 0
        self._lock = threading.Lock()

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        with self._lock:
            index, self._next = self._next, self._next + 1
        if index < len(self.steps):
            return await self.steps[index].act(ctx)
        return await self.after.act(ctx) if self.after else None


@dataclass
class Chaos:
    """With probability ``p`` (seeded, so a rehearsal is repeatable), do ``action``."""

    p: float
    action: "Action"
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not 0 <= self.p <= 1:
            raise FaultError(f"chaos probability must be between 0 and 1, not {self.p}")
        self.action = as_action(self.action)
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        with self._lock:
            hit = self._random.random() < self.p
        return await self.action.act(ctx) if hit else None


@dataclass
class RateLimit:
    """At most ``per_second`` matching events in any one-second window; past that, ``reply``.

    Only the events let through count against the window (like a relay that counts what it
    accepted). A rate under one per second allows one event per ``1 / per_second`` seconds; a
    fractional rate above one is rounded down (2.5/s allows 2 in any second).
    """

    per_second: float
    reply: str = "451 4.7.0 rate limit exceeded, slow down"
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)  # tests may drive time

    def __post_init__(self) -> None:
        if isinstance(self.per_second, bool) or not isinstance(self.per_second, numbers.Real) \
                or not self.per_second > 0 or math.isinf(self.per_second):
            raise FaultError("rate limit must be a positive number of messages per second")
        self._reply = Reply(self.reply)
        self._span = max(1.0, 1.0 / self.per_second)  # the sliding window, in seconds
        self._capacity = max(1, math.floor(self.per_second * self._span + 1e-9))
        self._window: deque[float] = deque()
        self._lock = threading.Lock()

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        now = self.clock()
        with self._lock:
            while self._window and now - self._window[0] >= self._span:
                self._window.popleft()
            if len(self._window) >= self._capacity:
                limited = True
            else:
                self._window.append(now)
                limited = False
        return await self._reply.act(ctx) if limited else None


@dataclass
class Tamper:
    """Change the body after the client signed it: the first ``count`` occurrences of ``find``
    in the body (past the header section) become ``replace``; then proceed. Only at the
    ``data`` stage, where the message is read and not yet stored. Acts only when ``find`` is
    there (``acted`` says whether the body was changed)."""

    find: str
    replace: str
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.find, str) or not self.find or not isinstance(self.replace, str):
            raise FaultError(f"Tamper needs a non-empty text to find and a replacement, not {self.find!r}, "
                             f"{self.replace!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise FaultError(f"Tamper's count must be a positive integer, not {self.count!r}")

    async def act(self, ctx: "ActionContext") -> Optional[str]:
        envelope = ctx.envelope
        if ctx.stage != "data" or envelope is None:
            raise FaultError(f"Tamper acts on the message at the 'data' stage, not at {ctx.stage!r}")
        content = envelope.original_content or b""
        end = content.find(b"\r\n\r\n")
        end = len(content) if end < 0 else end + 4
        head, body = content[:end], content[end:]
        find = self.find.encode("utf-8")
        if find in body:
            changed = head + body.replace(find, self.replace.encode("utf-8"), self.count)
            envelope.original_content = envelope.content = changed
            ctx.mark_acted()
        return None


Action = Union[Reply, Delay, Disconnect, Stall, Accept, Script, Chaos, RateLimit, Tamper]


def as_action(value: Any) -> "Action":
    """A reply string or None (accept) is shorthand for Reply(...) / Accept()."""
    if value is None:
        return Accept()
    if isinstance(value, str):
        return Reply(value)
    if hasattr(value, "act"):
        return value
    raise FaultError(f"not a fault action: {value!r}")


@dataclass
class ActionContext:
    server: Any
    stage: str
    envelope: Any = None  # the SMTP envelope (aiosmtpd's), for actions that read or change the message
    close_after_reply: bool = False

    acted: bool = False
    on_act: Optional[Callable[[], None]] = None  # counts the rule as acted, once
    _counted: bool = False

    def mark_acted(self) -> None:
        """The action changed the outcome: count it now, not when the connection ends.

        A stall or a hang-up ends in cancellation only once the client notices; counting at that
        point would let a test read ``acted`` before the sink caught up.
        """
        self.acted = True
        if not self._counted:
            self._counted = True
            if self.on_act is not None:
                self.on_act()

    def hang_up(self) -> None:
        self.mark_acted()
        transport = getattr(self.server, "transport", None)
        if transport is not None:
            transport.close()
