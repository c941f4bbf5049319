"""Spam score from a real SpamAssassin: the email goes to spamd (REPORT) through aiospamc.

spamd is the harness's own (``mailproof.servers.spamd``: offline, local rules only, started once
per pytest session on first use) or any spamd at ``CheckConfig.spamd``. The verdict compares
spamd's score with ``threshold`` (default ``CheckConfig.spam_threshold``, 5.0 as SpamAssassin's
``required_score``); the details list every rule that hit, with its points. A warning from half
the threshold on: such mail is one rule away from spam elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Optional

from mailproof.checks.config import CheckConfig
from mailproof.checks.result import FAILED, PASSED, WARNING, CheckResult
from mailproof.errors import MailproofError
from mailproof.extras import require

SOURCE = "SpamAssassin spamd (Debian package spamd, local rules only) through aiospamc"
_RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z][A-Z0-9_]+)\s+(.*)$")


class SpamdUnavailable(MailproofError):
    """No spamd to ask: none configured, or it does not answer."""


def parse_report(body: str) -> list[tuple[float, str, str]]:
    """(points, rule, description) of each rule in a spamd REPORT body."""
    rules: list[tuple[float, str, str]] = []
    table = False
    for line in body.splitlines():
        if line.startswith("----"):
            table = True
            continue
        if not table:
            continue
        found = _RULE.match(line)
        if found:
            rules.append((float(found.group(1)), found.group(2), found.group(3).strip()))
        elif line.startswith(" ") and line.strip() and rules:  # a wrapped description
            points, rule, text = rules[-1]
            rules[-1] = (points, rule, f"{text} {line.strip()}")
    return rules


def _run(coro):
    """Run ``coro`` to completion from sync code, also when an event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="mailproof-spamc")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_spam(msg, config: CheckConfig, *, threshold: Optional[float] = None) -> CheckResult:
    aiospamc = require("aiospamc", "the spam check")
    started = time.perf_counter()
    threshold = config.spam_threshold if threshold is None else float(threshold)
    address = config.spamd_address()
    if address is None:
        raise SpamdUnavailable(
            "the spam check needs a spamd: under pytest the mailproof plugin starts one (needs the "
            "Debian package spamd: apt-get install spamassassin spamd); elsewhere set "
            "mailproof.checks.config.spamd = (host, port) or start mailproof.servers.spamd.Spamd")
    host, port = address
    try:
        response = _run(aiospamc.report(msg.raw, host=host, port=port,
                                        timeout=aiospamc.Timeout(total=60, connection=5)))
    except Exception as exc:
        raise SpamdUnavailable(f"spamd at {host}:{port} did not answer: {type(exc).__name__}: {exc}") from exc
    spam = response.headers["Spam"]
    score = float(spam.score)
    rules = parse_report(response.body.decode("utf-8", "replace"))
    hits = sorted(rules, key=lambda r: -r[0])
    details = tuple(f"{points:+.1f} {rule}: {text}" for points, rule, text in hits)
    summary = f"score {score:.1f} (threshold {threshold:g}; spamd's required {float(spam.threshold):g})"
    if score >= threshold:
        verdict = FAILED
        summary = f"spam: {summary}"
    elif score >= threshold / 2:
        verdict = WARNING
    else:
        verdict = PASSED
    return CheckResult("spam", verdict, summary, details, SOURCE, time.perf_counter() - started,
                       data={"score": score, "threshold": threshold, "rules": [r[1] for r in hits]})
