"""A signup burst through a rate-limited relay: does every confirmation arrive, once, and how fast?

The same scenario as ``flows/test_resilience.py::test_burst_under_throttle`` (the flow function
``flows.resilience.burst_under_throttle``), standalone: the in-process capture sink with a
RateLimit rule at RCPT (``--reply``, 451 by default, past ``--rate`` recipients per second), the
fake validation API, and the demo app as its own process (mailproof.AppProcess). ``--signups``
people sign up at once from ``--threads`` client threads; the flow waits for every confirmation,
checks nobody got two, and returns the numbers printed here.

    .venv/bin/python benchmarks/burst_under_throttle.py --signups 200 --rate 20

For comparison, ``--rate 0`` runs the same burst with no rate limit (the relay at full speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ is not an installed package

from mailproof.faults import FaultPlan  # noqa: E402
from fakes.validation_api import ValidationApi  # noqa: E402
from flows.resilience import burst_under_throttle  # noqa: E402
from mailproof import AddressBook, AppProcess, AppSession, EmbeddedSink, Flow, Mailbox  # noqa: E402


class NoFaults:
    """``--rate 0``: the flow adds its rule here, and nothing enforces it."""

    def rule(self, stage, action, **match):
        return type("Unused", (), {"acted": 0, "fired": 0})()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--signups", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="recipients per second the relay accepts (0: no limit)")
    p.add_argument("--reply", default="451 4.7.0 rate limit exceeded, slow down",
                   help="the reply past the rate (421 also closes the connection)")
    p.add_argument("--threads", type=int, default=16, help="client threads sending the signups")
    p.add_argument("--app-workers", type=int, default=4, help="the demo app's mailer workers")
    p.add_argument("--within", type=float, default=120.0, help="seconds each confirmation may take")
    args = p.parse_args(argv)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO

    plan = FaultPlan()
    with EmbeddedSink(faults=plan) as sink, ValidationApi() as api:
        command = [sys.executable, "-m", "demo_app", "--port", "0", "--smtp-host", sink.smtp_host,
                   "--smtp-port", str(sink.smtp_port), "--validation-url", api.url,
                   "--workers", str(args.app_workers), "--log-level", "WARNING"]
        with AppProcess(command, cwd=str(ROOT), name="demo application") as app:
            http = AppSession(app.url)
            with Mailbox(sink.store, AddressBook(), default_within=args.within) as mailbox:
                flow = Flow(http=http, mailbox=mailbox, name="burst_under_throttle")
                started = time.monotonic()
                numbers = burst_under_throttle(flow, plan if args.rate > 0 else NoFaults(),
                                               signups=args.signups, per_second=args.rate or 1.0,
                                               threads=args.threads, within=args.within, reply=args.reply)
                wall = time.monotonic() - started
            http.close()
    numbers["flow_wall_seconds"] = round(wall, 3)
    if args.rate <= 0:
        numbers["per_second"] = "no limit"
    print(f"# burst_under_throttle on Python {platform.python_version()}, {platform.machine()}; "
          f"demo app: {args.app_workers} mailer workers; {args.threads} client threads")
    print(f"# relay: {'RateLimit %g/s at RCPT, reply %r' % (args.rate, args.reply) if args.rate > 0 else 'no limit'}")
    width = max(map(len, numbers))
    for key, value in numbers.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
