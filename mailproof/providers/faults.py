"""Provider misbehaviour on purpose: per-test rules the capture checks on every accepted request.

    provider_faults.rule(status=429, to=address, times=2)      # rate-limited twice, then fine
    provider_faults.rule("sendgrid", status=400, message="The from email does not contain a valid address.")
    provider_faults.rule(status=401)                            # the key was revoked
    provider_faults.rule(status=503, times=1)                   # one outage answer
    provider_faults.rule(delay=1.5, to=address)                 # a slow answer (then accepted)
    provider_faults.rule(event="bounce", to=address)            # accepted, then a bounce webhook
    provider_faults.rule(event="complaint", to=address)         # delivered, then a complaint

Each provider writes ``status`` in its own error format (SendGrid's ``errors`` list, Mailgun's
``message``, SES's ``x-amzn-ErrorType``, Postmark's ``ErrorCode``), and a 429 carries its
rate-limit headers. A rule matches a provider (None: any), a recipient (``to=`` exact,
``to_pattern=`` a regex searched in each envelope recipient) and fires ``times`` times (None: for
ever). ``ScopedProviderFaults`` (the ``provider_faults`` fixture) removes a test's rules when it ends.

For load, ``rate=`` makes a rule fire on that share of the requests it matches, drawn from the
plan's seeded random generator; ``parse_provider_chaos("5%:429,1%:503,2%:delay=0.5", seed=7)``
builds such rules from the text ``mailproof rehearse --provider-chaos`` takes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from mailproof.errors import MailproofError
from mailproof.faults.rules import RuleList, recipients_match

PROVIDERS = ("sendgrid", "mailgun", "ses", "postmark")
EVENTS = ("bounce", "complaint")


class ProviderFaultError(MailproofError, ValueError):
    """A provider fault rule that cannot work; the message says why and what to use."""


@dataclass
class ProviderFault:
    provider: Optional[str] = None
    status: Optional[int] = None      # answer this HTTP status in the provider's error format
    message: Optional[str] = None     # the error text (default: the provider's usual one)
    retry_after: int = 1              # with status=429: seconds in the rate-limit headers
    delay: float = 0.0                # seconds before answering (whatever the answer)
    event: Optional[str] = None       # "bounce" or "complaint": accepted, then that webhook
    to: Optional[str] = None
    to_pattern: Optional[str] = None
    times: Optional[int] = None
    rate: Optional[float] = None      # fire on this share of matching requests (None: every one)
    scope: Optional[str] = None
    id: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ProviderFaultError(f"unknown provider {self.provider!r}: use one of {', '.join(PROVIDERS)} or None")
        if self.status is not None and not (400 <= self.status <= 599):
            raise ProviderFaultError(f"status {self.status} is not an error: give 400-599 (or delay=/event= alone)")
        if self.event is not None and self.event not in EVENTS:
            raise ProviderFaultError(f"unknown event {self.event!r}: use one of {', '.join(EVENTS)}")
        if self.event is not None and self.status is not None:
            raise ProviderFaultError("a rule either refuses the request (status=) or accepts it and sends an "
                                     "event (event=), not both")
        if self.status is None and self.event is None and not self.delay:
            raise ProviderFaultError("a provider fault needs status=, event= or delay=")
        if self.rate is not None and not (0.0 < self.rate <= 1.0):
            raise ProviderFaultError(f"rate {self.rate} is a share of requests: give 0 < rate <= 1")
        if self.times is not None and self.times < 1:
            raise ProviderFaultError("times must be at least 1 (None: every request)")
        try:
            self._regex = re.compile(self.to_pattern) if self.to_pattern else None
        except re.error as exc:
            raise ProviderFaultError(f"to_pattern {self.to_pattern!r} is not a valid regular expression: {exc}") from None

    def matches(self, provider: str, recipients: Sequence[str]) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        return recipients_match(self.to, self._regex, recipients)

    def applies_to(self, recipient: str) -> bool:
        """For an event rule: does it concern this one recipient (a rule without one: all)."""
        if self.to is not None and self.to.lower() != recipient.lower():
            return False
        return self._regex is None or bool(self._regex.search(recipient))


class ProviderFaultPlan(RuleList[ProviderFault]):
    """The capture's rules (add/clear/rules: the SMTP fault plan's RuleList); the capture takes
    the ones that fire on each request."""

    def __init__(self, seed: Optional[int] = None) -> None:
        super().__init__()
        self._random = random.Random(seed)  # for rate= rules: the same seed, the same faults

    def rule(self, provider: Optional[str] = None, **options) -> ProviderFault:
        return self.add(ProviderFault(provider=provider, **options))

    def take(self, provider: str, recipients: Sequence[str]) -> list[ProviderFault]:
        """The rules that fire on this request (each counted, and spent when out of ``times``)."""
        if not self._rules:
            return []
        fired = []
        with self._lock:
            for rule in list(self._rules):
                if not rule.matches(provider, recipients):
                    continue
                if rule.rate is not None and self._random.random() >= rule.rate:
                    continue
                rule.fired += 1
                fired.append(rule)
                if rule.times is not None and rule.fired >= rule.times:
                    self._rules.remove(rule)
        return fired


class ScopedProviderFaults:
    """Adds rules under one scope (a test id); ``clear()`` removes exactly those."""

    def __init__(self, plan: ProviderFaultPlan, scope: str, provider: Optional[str] = None) -> None:
        self.plan, self.scope, self.provider = plan, scope, provider

    def rule(self, provider: Optional[str] = None, **options) -> ProviderFault:
        return self.plan.add(ProviderFault(provider=provider, scope=self.scope, **options))

    @property
    def rules(self) -> list[ProviderFault]:
        return [r for r in self.plan.rules if r.scope == self.scope]

    def clear(self) -> int:
        return self.plan.clear(scope=self.scope)


def parse_provider_chaos(text: str, *, scope: str = "chaos") -> list[ProviderFault]:
    """``"5%:429,1%:503,2%:delay=0.5,1%:bounce"``: each item a share of requests and what they get
    (an HTTP status, ``delay=SECONDS``, ``bounce`` or ``complaint``). The plan's seed decides which."""
    rules = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        share, sep, what = item.partition(":")
        try:
            if not sep or not share.endswith("%"):
                raise ValueError
            rate = float(share[:-1]) / 100.0
            if what.startswith("delay="):
                options: dict = {"delay": float(what[6:])}
            elif what in EVENTS:
                options = {"event": what}
            else:
                options = {"status": int(what)}
        except ValueError:
            raise ProviderFaultError(
                f"provider chaos item {item!r}: write PERCENT%:WHAT, WHAT an HTTP status (429, 503), "
                "delay=SECONDS, bounce or complaint, e.g. '5%:429,1%:503,2%:delay=0.5'") from None
        rules.append(ProviderFault(rate=rate, scope=scope, **options))
    return rules
