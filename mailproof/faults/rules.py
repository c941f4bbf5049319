"""The rule list both fault plans keep (SMTP stages in plan.py, provider answers in
mailproof.providers.faults): numbered rules, added and cleared from the tests' threads while the
capture reads them, and a test's own rules removed by scope."""

from __future__ import annotations

import itertools
import re
import threading
from typing import Generic, Optional, Protocol, Sequence, TypeVar


class _Rule(Protocol):
    id: int
    scope: Optional[str]


R = TypeVar("R", bound=_Rule)


class RuleList(Generic[R]):
    """Thread-safe: tests add rules from their thread, the capture reads them."""

    def __init__(self) -> None:
        self._rules: list[R] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, rule: R) -> R:
        with self._lock:
            rule.id = next(self._ids)
            self._rules.append(rule)
        return rule

    def clear(self, scope: Optional[str] = None) -> int:
        """Remove every rule (or those of one scope); returns how many were removed."""
        with self._lock:
            keep = [r for r in self._rules if scope is not None and r.scope != scope]
            removed = len(self._rules) - len(keep)
            self._rules = keep
        return removed

    @property
    def rules(self) -> list[R]:
        with self._lock:
            return list(self._rules)


def recipients_match(to: Optional[str], to_regex: Optional[re.Pattern], recipients: Sequence[str]) -> bool:
    """A rule's recipient condition: ``to`` among them (case-insensitive), ``to_regex`` found in
    one of them; an absent condition holds."""
    if to is not None and to.lower() not in {r.lower() for r in recipients}:
        return False
    return to_regex is None or any(to_regex.search(r) for r in recipients)
