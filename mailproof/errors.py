"""Failures a flow can raise.

Verdicts on the product are assertion errors, so pytest reports them as test failures:
``MailNotDelivered``, ``MailLate``, ``UnexpectedMail``. Faults of the harness itself (a
misconfiguration, a test's ``match=`` callable that raises, a bug in mailproof) are
``MailproofError``, deliberately not assertion errors: they must never read as the product failing.
"""

from __future__ import annotations

from typing import Optional, Sequence


class MailproofError(Exception):
    """The harness itself is misconfigured or broken (not a product failure)."""


class HarnessError(MailproofError):
    """The harness could not judge: something raised while checking mail (the test's own
    criteria, such as a ``match=`` callable, or mailproof). Says nothing about the product."""


class MailNotDelivered(AssertionError):
    """An expected email did not arrive by the wait's timeout.

    ``found``: the matching messages that did arrive (fewer than expected); ``within``: the SLO;
    ``timeout``: how long the wait waited (seconds).
    """

    def __init__(self, text: str = "", *, found: Sequence = (), within: Optional[float] = None,
                 timeout: Optional[float] = None) -> None:
        super().__init__(text)
        self.found = list(found)
        self.within = within
        self.timeout = timeout


class MailLate(AssertionError):
    """An expected email arrived, but later than its SLO (and before the wait's timeout).

    The wait claimed what it got: ``messages`` holds everything it would have returned (in
    arrival order), ``message`` the first late one, ``latency`` its seconds from the trigger
    (None when no trigger was known: then it came more than ``within`` after the wait began),
    ``late`` every late one.
    """

    def __init__(self, text: str = "", *, messages: Sequence = (), late: Sequence = (),
                 latency: Optional[float] = None, within: Optional[float] = None) -> None:
        super().__init__(text)
        self.messages = list(messages)
        self.late = list(late)
        self.message = self.late[0] if self.late else (self.messages[0] if self.messages else None)
        self.latency = latency
        self.within = within


class UnexpectedMail(AssertionError):
    """An email arrived where none (or no more) was expected. ``messages``: the unexpected ones."""

    def __init__(self, text: str = "", *, messages: Sequence = ()) -> None:
        super().__init__(text)
        self.messages = list(messages)
        self.message = self.messages[0] if self.messages else None
