"""What a wait expects of a message, and why a message did not meet it (for near-miss reports)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Pattern, Union

from mailproof.message import Message

Text = Union[str, Pattern[str]]


def _text_matches(expected: Text, actual: str) -> bool:
    if isinstance(expected, re.Pattern):
        return expected.search(actual) is not None
    return expected in actual


def _show(expected: Text) -> str:
    return f"/{expected.pattern}/" if isinstance(expected, re.Pattern) else repr(expected)


@dataclass(frozen=True)
class Criteria:
    """All given fields must hold. Strings match as substrings, compiled patterns by search.

    ``to`` is an exact recipient (envelope first, then To/Cc headers, case-insensitive).
    ``header`` is ``(name, value)`` or a dict of them.
    """

    to: Optional[str] = None
    subject: Optional[Text] = None
    contains: Optional[Text] = None
    header: Union[tuple[str, Text], dict, None] = None
    sender: Optional[str] = None
    match: Optional[Callable[[Message], bool]] = None

    @property
    def recipient(self) -> Optional[str]:
        return self.to.lower() if self.to else None

    def mismatches(self, msg: Message) -> list[str]:
        """Why ``msg`` does not match; empty when it does."""
        return list(self._mismatches(msg))

    def matches(self, msg: Message) -> bool:
        # Stops at the first failed check: the recipient is checked before anything that parses.
        return next(self._mismatches(msg), None) is None

    def _mismatches(self, msg: Message):
        if self.to and self.recipient not in recipients_of(msg):
            yield f"to {sorted(recipients_of(msg))} not {self.to!r}"
        if self.sender and self.sender.lower() != (msg.mail_from or "").lower():
            yield f"sender {msg.mail_from!r} not {self.sender!r}"
        if self.subject is not None and not _text_matches(self.subject, msg.subject):
            yield f"subject {msg.subject!r} does not contain {_show(self.subject)}"
        if self.contains is not None and not msg.body_contains(self.contains):
            yield f"body does not contain {_show(self.contains)}"
        for name, value in self._headers():
            values = msg.header_all(name)
            if not any(_text_matches(value, v) for v in values):
                yield f"header {name} {values!r} does not contain {_show(value)}"
        if self.match is not None:
            try:
                ok = bool(self.match(msg))
            except Exception as exc:
                yield f"match raised {type(exc).__name__}: {exc}"
            else:
                if not ok:
                    yield f"match={getattr(self.match, '__name__', 'callable')} returned False"

    def describe(self) -> str:
        parts = []
        if self.to:
            parts.append(f"to {self.to}")
        if self.sender:
            parts.append(f"from {self.sender}")
        if self.subject is not None:
            parts.append(f"subject containing {_show(self.subject)}")
        if self.contains is not None:
            parts.append(f"body containing {_show(self.contains)}")
        for name, value in self._headers():
            parts.append(f"header {name} containing {_show(value)}")
        if self.match is not None:
            parts.append(f"match={getattr(self.match, '__name__', 'callable')}")
        return " ".join(parts) or "any mail"

    def _headers(self):
        if self.header is None:
            return []
        if isinstance(self.header, dict):
            return list(self.header.items())
        return [self.header]


def recipients_of(msg: Message) -> frozenset[str]:
    return msg.recipients
