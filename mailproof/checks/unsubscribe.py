"""Bulk mail's unsubscribe headers: RFC 2369 List-Unsubscribe and RFC 8058 one-click.

- ``List-Unsubscribe`` holds ``<URI>`` items (RFC 2369); RFC 8058 needs one HTTPS URI, a
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` header, and both headers covered by a
  DKIM signature (its ``h=``).
- The one-click POST (``List-Unsubscribe=One-Click``, form-encoded, no cookies) is sent to the
  application when the URI's host is under test, and must be answered 2xx. A URI elsewhere is
  listed, never requested.
- A plain-http URI is a failure, except on a host under test (a local test app has no TLS):
  then a warning says so.
- An email with no sign of being bulk mail (no List-Unsubscribe, List-Id or Precedence: bulk/list)
  is skipped.
"""

from __future__ import annotations

import re
import time

from mailproof.checks.config import CheckConfig
from mailproof.checks.http import NotUnderTest, request
from mailproof.checks.result import FAILED, SKIPPED, CheckResult, verdict_of

SOURCE = "RFC 2369 (List-Unsubscribe), RFC 8058 (one-click unsubscribe)"
ONE_CLICK = "List-Unsubscribe=One-Click"
_ITEM = re.compile(r"<([^>]*)>")


def check_unsubscribe(msg, config: CheckConfig, *, post: bool = True) -> CheckResult:
    started = time.perf_counter()
    header = msg.header("List-Unsubscribe")
    precedence = (msg.header("Precedence") or "").strip().lower()
    if header is None and msg.header("List-Id") is None and precedence not in ("bulk", "list"):
        return CheckResult("unsubscribe", SKIPPED, "not bulk mail (no List-Unsubscribe, List-Id or Precedence)",
                           (), SOURCE, time.perf_counter() - started)
    failures: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    if header is None:
        failures.append("no List-Unsubscribe header on bulk mail (it has List-Id or Precedence: bulk)")
        uris = []
    else:
        uris = [u.strip() for u in _ITEM.findall(header)]
        if not uris:
            failures.append(f"List-Unsubscribe holds no <URI> item: {header!r}")
    https = [u for u in uris if u.lower().startswith("https://")]
    http = [u for u in uris if u.lower().startswith("http://")]
    if uris and not any(u.lower().startswith("mailto:") for u in uris):
        notes.append("no mailto: URI (optional; older clients use it)")
    targets = https or [u for u in http if config.under_test(u)]
    if not https:
        if targets:
            warnings.append(f"no HTTPS URI (RFC 8058 requires one); accepted because {targets[0]} is under test")
        elif uris:
            failures.append(f"no HTTPS URI in List-Unsubscribe (RFC 8058 requires one): {uris}")
    post_header = msg.header("List-Unsubscribe-Post")
    if post_header is None:
        failures.append(f"no List-Unsubscribe-Post: {ONE_CLICK} header (RFC 8058 one-click)")
    elif post_header.strip() != ONE_CLICK:
        failures.append(f"List-Unsubscribe-Post is {post_header!r}, not {ONE_CLICK!r}")
    signed = _dkim_signed_headers(msg)
    if signed is None:
        failures.append("no DKIM signature covers List-Unsubscribe and List-Unsubscribe-Post (RFC 8058 section 4)")
    else:
        missing = [h for h in ("list-unsubscribe", "list-unsubscribe-post") if h not in signed]
        if missing:
            failures.append(f"the DKIM signature does not cover {missing} (h= lists {sorted(signed)})")
    posted = None
    if post and targets and post_header is not None and config.under_test(targets[0]):
        url = posted = targets[0]
        try:
            response = request(config, "POST", url, data={"List-Unsubscribe": "One-Click"})
        except NotUnderTest:  # a redirect off the hosts under test
            notes.append(f"one-click POST redirected off the hosts under test: not followed ({url})")
        except Exception as exc:  # connection refused, timeout: the button would not work
            failures.append(f"one-click POST to {url} failed: {type(exc).__name__}: {exc}")
        else:
            if 200 <= response.status_code < 300:
                notes.append(f"one-click POST {url} -> {response.status_code}")
            else:
                failures.append(f"one-click POST {url} answered {response.status_code}, not 2xx: "
                                f"{response.text[:200]!r}")
    for uri in uris:
        if uri != posted:
            notes.append(f"listed, not requested: {uri}")
    verdict = verdict_of(failures, warnings)
    summary = (failures[0] if verdict == FAILED else warnings[0] if warnings
               else "List-Unsubscribe, one-click POST answered")
    return CheckResult("unsubscribe", verdict, summary, tuple(failures + warnings + notes), SOURCE,
                       time.perf_counter() - started)


def _dkim_signed_headers(msg):
    """The header names the DKIM signatures' h= tags cover (lower-cased), or None if unsigned."""
    found = None
    for value in msg.header_all("DKIM-Signature"):
        match = re.search(r"(?:^|;)\s*h\s*=([^;]*)", value)
        if match:
            found = (found or set()) | {h.strip().lower() for h in match.group(1).split(":") if h.strip()}
    return found
