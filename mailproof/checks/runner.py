"""``msg.checks``: run the checks of one email, report each result, assert on them."""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional

from mailproof.checks.config import CheckConfig, config as default_config
from mailproof.checks.result import FAILED, WARNING, CheckResult

CHECKS = ("dkim", "unsubscribe", "structure", "spam", "clients")

# Who hears every result (the pytest plugin's Allure reporter: one step per check), per thread:
# a check reports to the test that runs it, in that test's thread.
_local = threading.local()


def add_observer(observer: Callable[[CheckResult, object], None]) -> None:
    _observers().append(observer)


def remove_observer(observer: Callable[[CheckResult, object], None]) -> None:
    try:
        _observers().remove(observer)
    except ValueError:
        pass


def _observers() -> list:
    if not hasattr(_local, "observers"):
        _local.observers = []
    return _local.observers


class Checks:
    """The deliverability checks of one ``Message`` (``msg.checks``). Each returns a
    ``CheckResult`` and never raises on a bad email (only when a check cannot run: no spamd)."""

    def __init__(self, msg, config: Optional[CheckConfig] = None) -> None:
        self.msg = msg
        self.config = config or default_config

    def _report(self, result: CheckResult) -> CheckResult:
        for observer in list(_observers()):
            observer(result, self.msg)
        return result

    def dkim(self) -> CheckResult:
        from mailproof.checks.dkim import check_dkim

        return self._report(check_dkim(self.msg, self.config))

    def unsubscribe(self, *, post: bool = True) -> CheckResult:
        from mailproof.checks.unsubscribe import check_unsubscribe

        return self._report(check_unsubscribe(self.msg, self.config, post=post))

    def structure(self, *, links: bool = True) -> CheckResult:
        from mailproof.checks.structure import check_structure

        return self._report(check_structure(self.msg, self.config, links=links))

    def spam(self, *, threshold: Optional[float] = None) -> CheckResult:
        from mailproof.checks.spam import check_spam

        return self._report(check_spam(self.msg, self.config, threshold=threshold))

    def clients(self) -> CheckResult:
        from mailproof.checks.clients import check_clients

        return self._report(check_clients(self.msg, self.config))

    def all(self, *, only: Iterable[str] = CHECKS, skip: Iterable[str] = (), **options) -> list[CheckResult]:
        """Every check (or those of ``only``, less ``skip``), in the order of ``CHECKS``.

        ``options`` go to the checks that take them: ``post`` (unsubscribe), ``links``
        (structure), ``threshold`` (spam)."""
        wanted = [name for name in CHECKS if name in set(only) and name not in set(skip)]
        unknown = (set(only) | set(skip)) - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}: use {', '.join(CHECKS)}")
        takes = {"unsubscribe": ("post",), "structure": ("links",), "spam": ("threshold",)}
        stray = set(options) - {o for names in takes.values() for o in names}
        if stray:
            raise TypeError(f"unknown check options {sorted(stray)}: post, links, threshold")
        results = []
        for name in wanted:
            kwargs = {k: v for k, v in options.items() if k in takes.get(name, ())}
            results.append(getattr(self, name)(**kwargs))
        return results


class NotDeliverable(AssertionError):
    """An email failed deliverability checks; the message lists every failing check."""

    def __init__(self, message: str, results: list[CheckResult]) -> None:
        super().__init__(message)
        self.results = results


def assert_deliverable(msg, *, only: Iterable[str] = CHECKS, skip: Iterable[str] = (),
                       warnings_fail: bool = False, config: Optional[CheckConfig] = None,
                       **options) -> list[CheckResult]:
    """Run the checks and fail with every failing one listed, its details included.

    ``warnings_fail``: a warning fails too. Returns the results when nothing failed."""
    results = Checks(msg, config).all(only=only, skip=skip, **options)
    bad = [r for r in results if r.verdict == FAILED or (warnings_fail and r.verdict == WARNING)]
    if bad:
        describe = getattr(msg, "describe", lambda: repr(msg))
        listing = "\n".join(r.describe() for r in bad)
        raise NotDeliverable(f"{len(bad)} of {len(results)} deliverability checks failed for "
                             f"{describe()}:\n{listing}", results)
    return results
