"""Fault rules and the plans that hold them: one protocol, whatever injects the faults.

``Faults`` is what a test or a flow talks to: ``rule``/``add``/``remove``/``clear``/``rules``.
Three things implement it:

- ``FaultPlan``: the rules live here and the in-process sink asks them at every SMTP stage;
- ``mailproof.capture.RemoteFaults``: the same calls over the sink service's HTTP API;
- ``NoFaults``: a backend that no capture sink stands in front of (IMAP behind Postfix, a
  staging inbox): every ``add`` fails with a message that says why and what to do.

``ScopedFaults`` wraps any of them so that a test's rules are removed when the test ends.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

from mailproof.faults.actions import STAGES, ActionContext, FaultError, Tamper, as_action
from mailproof.faults.rules import RuleList, recipients_match


@dataclass
class FaultRule:
    stage: str
    action: Any
    to: Optional[str] = None  # exact recipient, case-insensitive
    to_pattern: Optional[str] = None  # regex searched in each recipient
    sender: Optional[str] = None  # exact envelope sender
    name: str = ""
    scope: Optional[str] = None  # who added it (e.g. a test id), for scoped removal
    id: int = 0
    fired: int = 0  # times the rule matched and its action was asked
    acted: int = 0  # times it changed the outcome (a reply or a hang-up)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise FaultError(f"unknown SMTP stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if (self.to or self.to_pattern) and self.stage in ("connect", "ehlo", "mail"):
            raise FaultError(
                f"a rule for a recipient cannot act at {self.stage!r}: the recipient is only known "
                "from RCPT on; use stage 'rcpt', 'data' or 'after_data', or drop the recipient"
            )
        if self.sender and self.stage in ("connect", "ehlo"):
            raise FaultError(f"the sender is only known from MAIL on, not at {self.stage!r}")
        self.action = as_action(self.action)
        if isinstance(self.action, Tamper) and self.stage != "data":
            raise FaultError(f"Tamper changes the message, which exists at the 'data' stage only, not at {self.stage!r}")
        try:
            self._to_regex = re.compile(self.to_pattern) if self.to_pattern else None
        except re.error as exc:
            raise FaultError(f"to_pattern {self.to_pattern!r} is not a valid regular expression: {exc}") from None

    def matches(self, sender: Optional[str], recipients: Sequence[str]) -> bool:
        if self.sender is not None and (sender or "").lower() != self.sender.lower():
            return False
        return recipients_match(self.to, self._to_regex, recipients)

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "stage": self.stage, "to": self.to,
                "to_pattern": self.to_pattern, "sender": self.sender, "scope": self.scope,
                "action": repr(self.action), "fired": self.fired, "acted": self.acted}


@runtime_checkable
class Faults(Protocol):
    """Where fault rules go. ``rules`` reads them back with their live ``fired``/``acted``."""

    def add(self, rule: FaultRule) -> FaultRule: ...

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule: ...

    def remove(self, rule: Union[FaultRule, int]) -> Optional[FaultRule]: ...

    def clear(self, scope: Optional[str] = None) -> int: ...

    @property
    def rules(self) -> list[FaultRule]: ...


class FaultPlan(RuleList[FaultRule]):
    """The sink's fault rules (add/clear/rules: RuleList); the sink asks them at every SMTP stage."""

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule:
        return self.add(FaultRule(stage=stage, action=action, **match))

    def remove(self, rule: Union[FaultRule, int]) -> Optional[FaultRule]:
        """Remove one rule; returns it, or None when no such rule was there."""
        rule_id = rule if isinstance(rule, int) else rule.id
        with self._lock:
            found = next((r for r in self._rules if r.id == rule_id), None)
            self._rules = [r for r in self._rules if r.id != rule_id]
        return found

    def _count_acted(self, rule: FaultRule) -> None:
        with self._lock:
            rule.acted += 1

    async def apply(self, stage: str, server: Any, session: Any, envelope: Any, **details: Any) -> Optional[str]:
        if not self._rules:  # the common case under load: one attribute read, no lock
            return None
        sender = details.get("address") if stage == "mail" else getattr(envelope, "mail_from", None)
        recipients = [details["address"]] if stage == "rcpt" else list(getattr(envelope, "rcpt_tos", []) or [])
        for rule in self.rules:
            if rule.stage != stage or not rule.matches(sender, recipients):
                continue
            with self._lock:
                rule.fired += 1
            ctx = ActionContext(server=server, stage=stage, envelope=envelope,
                                on_act=lambda rule=rule: self._count_acted(rule))
            reply = None
            try:
                reply = await rule.action.act(ctx)
            finally:  # a hang-up ends in cancellation: count it all the same
                if reply is not None or ctx.acted:  # ``acted`` may be set directly by custom actions
                    ctx.mark_acted()
            if reply is not None:
                if ctx.close_after_reply:
                    # The reply is written before this callback runs; then the channel closes.
                    asyncio.get_running_loop().call_soon(ctx.hang_up)
                return reply
        return None


class ScopedFaults:
    """Adds rules to any ``Faults`` under one scope; ``clear()`` removes exactly those."""

    def __init__(self, plan: Faults, scope: str) -> None:
        self.plan = plan
        self.scope = scope

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule:
        return self.plan.add(FaultRule(stage=stage, action=action, scope=self.scope, **match))

    @property
    def rules(self) -> list[FaultRule]:
        return [r for r in self.plan.rules if r.scope == self.scope]

    def clear(self) -> int:
        return self.plan.clear(scope=self.scope)


class NoFaults:
    """The ``Faults`` of a backend whose mail no capture sink sees: adding a rule is an error.

    A rule that silently never fires would let a resilience test pass without its fault.
    """

    def __init__(self, where: str) -> None:
        self.where = where

    def add(self, rule: FaultRule) -> FaultRule:
        raise FaultError(
            f"SMTP faults cannot be injected here: {self.where}, so no capture sink sees the "
            "application's SMTP session. Run this test on --mailbox=sink (or service), or mark it "
            "@pytest.mark.sink_faults so that backends which cannot inject faults deselect it.")

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule:
        return self.add(FaultRule(stage=stage, action=action, **match))

    def remove(self, rule: Union[FaultRule, int]) -> Optional[FaultRule]:
        return None

    def clear(self, scope: Optional[str] = None) -> int:
        return 0

    @property
    def rules(self) -> list[FaultRule]:
        return []
