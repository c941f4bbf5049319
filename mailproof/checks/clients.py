"""HTML and CSS features that major email clients do not support: warnings, never failures.

No maintained package ships the caniemail.com data for Python (PyPI has none; npm's
``caniemail`` is a JavaScript linter, which would mean a Node process per email), so this is a
small rule set, each rule named after its caniemail.com feature page and limited to clients
whose lack of support is long-standing and well known: Gmail (web and apps), Outlook for
Windows (the Word rendering engine of Outlook 2007-2021 and 365 for Windows), Apple Mail.
CSS is read with tinycss2 from ``style`` attributes and ``<style>`` blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from mailproof.checks.result import PASSED, WARNING, CheckResult
from mailproof.extras import require

SOURCE = "mailproof's rule set after caniemail.com feature pages (HTML/CSS support by client)"
OUTLOOK = "Outlook for Windows"


@dataclass(frozen=True)
class Rule:
    feature: str  # the caniemail.com feature slug (https://www.caniemail.com/features/<slug>/)
    what: str
    clients: str  # the clients that do not support it
    tags: tuple[str, ...] = ()  # matches an element
    declaration: Optional[Callable[[str, str], bool]] = None  # matches (property, value)
    at_rule: Optional[str] = None  # matches an @-rule in a <style> block


def _prop(name: str, value_has: str = "") -> Callable[[str, str], bool]:
    return lambda prop, value: prop == name and value_has in value


RULES: tuple[Rule, ...] = (
    Rule("html-script", "<script> (no email client runs JavaScript)", "every client", tags=("script",)),
    Rule("html-form", "forms", f"{OUTLOOK}; submission disabled in most webmails",
         tags=("form", "input", "select", "textarea", "button")),
    Rule("html-video", "<video>/<audio>", f"Gmail, {OUTLOOK} (Apple Mail only)", tags=("video", "audio")),
    Rule("html-svg", "inline <svg>", f"Gmail, {OUTLOOK}", tags=("svg",)),
    Rule("html-iframe", "<iframe>/<object>/<embed>", "Gmail, Outlook, Apple Mail", tags=("iframe", "object", "embed")),
    Rule("html-link", "<link> stylesheets (external CSS)", f"Gmail, {OUTLOOK}", tags=("link",)),
    Rule("css-position", "CSS position", f"Gmail, {OUTLOOK}", declaration=_prop("position")),
    Rule("css-display-flex", "display: flex", OUTLOOK, declaration=_prop("display", "flex")),
    Rule("css-display-grid", "display: grid", f"Gmail, {OUTLOOK}", declaration=_prop("display", "grid")),
    Rule("css-background-image", "CSS background images", f"{OUTLOOK} (needs VML)",
         declaration=lambda p, v: p in ("background", "background-image") and "url(" in v),
    Rule("css-variables", "CSS custom properties (var())", f"Gmail, {OUTLOOK}",
         declaration=lambda p, v: p.startswith("--") or "var(" in v),
    Rule("css-max-width", "max-width", OUTLOOK, declaration=_prop("max-width")),
    Rule("css-border-radius", "border-radius (square corners instead)", OUTLOOK,
         declaration=lambda p, v: p.startswith("border") and p.endswith("radius")),
    Rule("css-at-font-face", "@font-face web fonts", f"Gmail, {OUTLOOK}", at_rule="font-face"),
    Rule("css-at-media", "@media queries", OUTLOOK, at_rule="media"),
)


def _declarations(nodes, tinycss2) -> list[tuple[str, str]]:
    found = []
    for node in nodes:
        if node.type == "declaration":
            found.append((node.lower_name, tinycss2.serialize(node.value).strip().lower()))
    return found


def _read_css(reading, tinycss2):
    """(declarations, at-rule names) of the HTML's style attributes and <style> blocks."""
    declarations: list[tuple[str, str]] = []
    at_rules: list[str] = []
    for _, attrs in reading.tags:
        style = attrs.get("style")
        if style:
            declarations += _declarations(tinycss2.parse_blocks_contents(style, skip_whitespace=True,
                                                                          skip_comments=True), tinycss2)

    def walk(rules) -> None:
        for rule in rules:
            if rule.type == "at-rule":
                at_rules.append(rule.lower_at_keyword)
                if rule.content is not None:
                    inner = tinycss2.parse_blocks_contents(rule.content, skip_whitespace=True, skip_comments=True)
                    declarations.extend(_declarations(inner, tinycss2))
                    walk(tinycss2.parse_rule_list(rule.content, skip_whitespace=True, skip_comments=True))
            elif rule.type == "qualified-rule":
                declarations.extend(_declarations(tinycss2.parse_blocks_contents(
                    rule.content, skip_whitespace=True, skip_comments=True), tinycss2))

    for block in reading.styles:
        walk(tinycss2.parse_stylesheet(block, skip_whitespace=True, skip_comments=True))
    return declarations, at_rules


def check_clients(msg, config=None) -> CheckResult:
    started = time.perf_counter()
    reading = msg._html_reading
    if reading is None:
        return CheckResult("clients", PASSED, "no HTML body: plain text renders everywhere", (), SOURCE,
                           time.perf_counter() - started)
    tinycss2 = require("tinycss2", "the email-client support check")
    declarations, at_rules = _read_css(reading, tinycss2)
    tags = {name for name, _ in reading.tags}
    warnings = []
    for rule in RULES:
        hits = []
        if rule.tags:
            hits = sorted(t for t in tags if t in rule.tags)
        elif rule.declaration is not None:
            hits = sorted({f"{p}: {v}" for p, v in declarations if rule.declaration(p, v)})
        elif rule.at_rule is not None:
            hits = [f"@{rule.at_rule}"] if rule.at_rule in at_rules else []
        if hits:
            shown = ", ".join(hits[:3]) + (f" (+{len(hits) - 3} more)" if len(hits) > 3 else "")
            warnings.append(f"{rule.feature}: {rule.what} not supported by {rule.clients}; found {shown}")
    verdict = WARNING if warnings else PASSED
    summary = (f"{len(warnings)} feature(s) some clients do not support" if warnings
               else f"none of the {len(RULES)} unsupported features used")
    return CheckResult("clients", verdict, summary, tuple(warnings), SOURCE, time.perf_counter() - started)
