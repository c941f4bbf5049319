"""What a check says: a verdict and the details that explain it."""

from __future__ import annotations

from dataclasses import dataclass, field

PASSED, FAILED, WARNING, SKIPPED = "passed", "failed", "warning", "skipped"
VERDICTS = (PASSED, FAILED, WARNING, SKIPPED)


@dataclass(frozen=True)
class CheckResult:
    """One check of one email.

    ``verdict``: passed, failed, warning (worth a look, not a failure) or skipped (the check does
    not apply, e.g. unsubscribe headers on a transactional email). ``summary`` is one line;
    ``details`` one finding a line (failures first); ``source`` is where the rule comes from (an
    RFC, a library, a data set); ``seconds`` what the check took.
    """

    name: str
    verdict: str
    summary: str
    details: tuple[str, ...] = ()
    source: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict, compare=False)  # machine-readable extras (score, rules)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}: use one of {', '.join(VERDICTS)}")

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED

    def describe(self) -> str:
        """The result as text: a title line, then the details indented."""
        lines = [f"{self.name}: {self.verdict.upper()}: {self.summary}"]
        lines.extend(f"    {line}" for line in self.details)
        if self.source:
            lines.append(f"    (source: {self.source})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def verdict_of(failures: list[str], warnings: list[str]) -> str:
    return FAILED if failures else WARNING if warnings else PASSED
