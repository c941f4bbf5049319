"""An email's structure: the headers every message needs, and what mailbox providers penalise.

- ``Message-ID``: exactly one, ``<left@right>`` (RFC 5322 section 3.6.4).
- ``Date``: exactly one, parseable, with a zone (RFC 5322 section 3.6.1).
- HTML mail has a text/plain alternative (RFC 2046 multipart/alternative; spam filters score
  HTML-only mail, e.g. SpamAssassin's MIME_HTML_ONLY).
- The HTML body is under Gmail's clipping size: Gmail hides everything past 102 KB of HTML
  behind "[Message clipped]" (counted here as 102 x 1024 bytes of the decoded HTML part; a
  warning from 90 % on).
- Every ``<img>`` has an ``alt`` attribute (WCAG 2 1.1.1; ``alt=""`` marks a decorative image).
- No remote image over plain http (Gmail's image proxy and most clients block or flag it).
- Every http(s) link to a host under test is answered (HEAD, then GET on 405) with a status
  under 400. Links elsewhere are listed, never requested. HEAD runs the app's GET handler in
  most frameworks: a link with a side effect (a confirmation) is used by the check.
"""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

from mailproof.checks.config import CheckConfig
from mailproof.checks.http import NotUnderTest, request
from mailproof.checks.result import FAILED, CheckResult, verdict_of

SOURCE = "RFC 5322 (Message-ID, Date), RFC 2046 (alternatives), Gmail's 102 KB clipping, WCAG 2 1.1.1 (alt)"
GMAIL_CLIP_BYTES = 102 * 1024
_MSG_ID = re.compile(r"^\s*<[^<>@\s]+@[^<>@\s]+>\s*$")


def check_structure(msg, config: CheckConfig, *, links: bool = True) -> CheckResult:
    started = time.perf_counter()
    failures: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    ids = msg.header_all("Message-ID")
    if len(ids) != 1:
        failures.append(f"{len(ids)} Message-ID headers (exactly one is needed)")
    elif not _MSG_ID.match(ids[0]):
        failures.append(f"Message-ID {ids[0]!r} is not <left@right> (RFC 5322 section 3.6.4)")
    dates = msg.header_all("Date")
    if len(dates) != 1:
        failures.append(f"{len(dates)} Date headers (exactly one is needed)")
    else:
        try:
            date = parsedate_to_datetime(dates[0])
        except Exception:
            date = None
        if date is None:
            failures.append(f"Date {dates[0]!r} does not parse (RFC 5322 section 3.6.1)")
        elif date.tzinfo is None:
            warnings.append(f"Date {dates[0]!r} has no usable zone (-0000)")
    html = msg.html
    if html is not None:
        if msg.text is None:
            failures.append("HTML without a text/plain alternative")
        size = len(html.encode("utf-8", "surrogatepass"))
        share = f"{size:,} bytes of HTML (Gmail clips at {GMAIL_CLIP_BYTES:,})"
        if size >= GMAIL_CLIP_BYTES:
            failures.append(f"{share}: Gmail will show '[Message clipped]'")
        elif size >= 0.9 * GMAIL_CLIP_BYTES:
            warnings.append(f"{share}: close to clipping")
        else:
            notes.append(share)
        reading = msg._html_reading
        for name, attrs in reading.tags if reading else ():
            if name != "img":
                continue
            src = (attrs.get("src") or "").strip()
            if "alt" not in attrs:
                failures.append(f"<img src={src[:80]!r}> has no alt attribute")
            if src.lower().startswith("http://"):
                failures.append(f"remote image over plain http: {src[:120]}")
            elif src.startswith("//"):
                warnings.append(f"protocol-relative image (http in some clients): {src[:120]}")
    notes.append(f"total size {msg.size:,} bytes")
    if links:
        _check_links(msg, config, failures, notes)
    verdict = verdict_of(failures, warnings)
    summary = failures[0] if verdict == FAILED else warnings[0] if warnings else "headers, parts and links in order"
    return CheckResult("structure", verdict, summary, tuple(failures + warnings + notes), SOURCE,
                       time.perf_counter() - started)


def _check_links(msg, config: CheckConfig, failures: list[str], notes: list[str]) -> None:
    seen = set()
    for link in msg.links:
        url = link.url
        if url in seen:
            continue
        seen.add(url)
        if not url.lower().startswith(("http://", "https://")):
            notes.append(f"link not fetched (not http): {url}")
            continue
        try:
            response = request(config, "HEAD", url)
            if response.status_code == 405:
                response = request(config, "GET", url)
        except NotUnderTest:
            notes.append(f"link not fetched (host not under test): {url}")
            continue
        except Exception as exc:
            failures.append(f"link {url} not answered: {type(exc).__name__}: {exc}")
            continue
        if response.status_code >= 400:
            failures.append(f"link {url} answered {response.status_code}")
        else:
            notes.append(f"link {url} -> {response.status_code}")
