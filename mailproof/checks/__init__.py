"""Deliverability checks as assertions: ``msg.checks.dkim()``, ``msg.checks.all()``,
``assert_deliverable(msg)``. One module a check:

- ``dkim``: RFC 6376 signatures verified with dkimpy against the harness's key table (no DNS);
- ``unsubscribe``: RFC 2369 / RFC 8058 headers and the one-click POST to the app under test;
- ``structure``: Message-ID, Date, text alternative, Gmail clipping, alt text, http images, links;
- ``spam``: a real SpamAssassin spamd through aiospamc (``mailproof.servers.spamd``);
- ``clients``: HTML/CSS features major clients lack (warnings).

Configuration (keys, hosts under test, spamd) is ``config``, see ``mailproof.checks.config``.
Heavy libraries (dkimpy, aiospamc, tinycss2) are imported when their check runs: the extra
``mailproof[checks]`` installs them.
"""

from mailproof.checks.config import CheckConfig, config, dkim_txt
from mailproof.checks.result import FAILED, PASSED, SKIPPED, VERDICTS, WARNING, CheckResult
from mailproof.checks.runner import CHECKS, Checks, NotDeliverable, add_observer, assert_deliverable, remove_observer

__all__ = ["CHECKS", "CheckConfig", "CheckResult", "Checks", "FAILED", "NotDeliverable", "PASSED", "SKIPPED",
           "VERDICTS", "WARNING", "add_observer", "assert_deliverable", "config", "dkim_txt", "remove_observer"]
