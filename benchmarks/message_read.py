"""What a flow's reading of its email costs: ``Message`` against the email package's own reading.

The emails are the demo shop's (demo_app.emails.Composer): a signup confirmation
(multipart/alternative) and a receipt with a CSV attachment (multipart/mixed), each with its own
boundary and addresses, as an application sends them. Each is read the way the demo's flows read
it: the Subject (what a wait matches on), the From, the text, the confirmation link by its anchor
text or the attachment. Variants, in child processes pinned to CPU 0, alternating round after
round:

- ``email package``: ``email.message_from_bytes(raw, policy=policy.default)``, ``get_body`` and
  ``get_content``, the standard library's modern API, the baseline (it reads no links: that part
  is ``Message``'s alone, so the ratio is on the harder side);
- ``Message``: mailproof.message.Message of this checkout;
- with ``--base REV``, ``Message@REV``: the same as committed at REV (``git archive``).

It prints microseconds per email (best round) and Python function calls per email (cProfile),
and each against the email package.

    .venv/bin/python benchmarks/message_read.py [--emails 2000] [--rounds 5] [--base REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "email package"


def emails(count: int) -> list[bytes]:
    """``count`` demo emails, confirmations and receipts alternating, each with its own boundary."""
    import secrets
    from decimal import Decimal
    from email import policy
    from email.headerregistry import Address

    import demo_app.emails as shop
    from demo_app.store import Order, OrderLine

    composer = shop.Composer(shop.make_env(), Address("Demo Shop", "no-reply", "demo-shop.test"),
                             "http://127.0.0.1:8080")
    out = []
    for i in range(count):
        to = f"signup-{i}.k3v9xq@mailproof.test"
        if i % 2:
            order = Order(order_id=f"A-{i}", email=to, lines=[OrderLine("T-1", "Tea", 2, Decimal("4.50")),
                                                                 OrderLine("M-2", "Mug", 1, Decimal("12.00"))])
            msg = composer.receipt(to, "Ada Lovelace", order)
        else:
            msg = composer.confirmation(to, "Ada Lovelace", secrets.token_urlsafe(32))
        out.append(msg.as_bytes(policy=policy.SMTP))
    return out


def read_with_message(raw: bytes) -> None:
    from mailproof.message import Message

    msg = Message(raw, mail_from="no-reply@demo-shop.test", rcpt_tos=["signup@mailproof.test"], seq=1)
    assert msg.subject and "no-reply@demo-shop.test" in msg.from_
    assert "Ada" in (msg.text or "")
    if msg.attachments:
        assert msg.attachments[0].filename.endswith(".csv")
    else:
        assert msg.link(text="Confirm my account") in msg.text


def read_with_email_package(raw: bytes) -> None:
    import email
    from email import policy

    msg = email.message_from_bytes(raw, policy=policy.default)
    assert str(msg["Subject"]) and "no-reply@demo-shop.test" in str(msg["From"])
    assert "Ada" in msg.get_body(("plain",)).get_content()
    assert msg.get_body(("html",)).get_content()
    attachments = list(msg.iter_attachments())
    if attachments:
        assert attachments[0].get_filename().endswith(".csv")


def child(variant: str, count: int) -> dict:
    """Runs in the child: time reading ``count`` emails, then count the calls of reading 200."""
    import cProfile
    import pstats
    import time

    raws = emails(count)
    read = read_with_email_package if variant == BASELINE else read_with_message
    read(raws[0])  # imports and first-use caches out of the timing
    started = time.perf_counter()
    for raw in raws:
        read(raw)
    seconds = time.perf_counter() - started
    sample = raws[:200]
    profile = cProfile.Profile()
    profile.enable()
    for raw in sample:
        read(raw)
    profile.disable()
    calls = sum(entry[1] for entry in pstats.Stats(profile).stats.values())
    return {"us": seconds / count * 1e6, "calls": calls / len(sample)}


def _pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *command] if (os.cpu_count() or 1) >= 2 else command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=2000, help="emails read per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the variants (default 5)")
    parser.add_argument("--base", help="also measure Message as committed at this git revision")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, args.child[1])  # this checkout's mailproof, or the --base one
        sys.path.insert(1, str(ROOT))  # the demo app, to compose the emails
        print(json.dumps(child(args.child[0], args.emails)))
        return 0

    roots = {BASELINE: str(ROOT), "Message": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="message-read-") as tmp:
        if args.base:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "mailproof"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            roots[f"Message@{args.base}"] = tmp
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for variant, root in roots.items():
                out = subprocess.run(_pinned([sys.executable, __file__, "--emails", str(args.emails),
                                              "--child", variant, root]),
                                     check=True, capture_output=True, text=True).stdout
                figures = json.loads(out.strip().splitlines()[-1])
                if variant not in best or figures["us"] < best[variant]["us"]:
                    best[variant] = figures
    base = best[BASELINE]
    print(f"{args.emails} demo emails read as the flows read them, best of {args.rounds} rounds")
    print(f"  {'variant':<24}{'us/email':>10}{'x email pkg':>13}{'calls/email':>13}{'x email pkg':>13}")
    for variant, figures in best.items():
        print(f"  {variant:<24}{figures['us']:>10.0f}{figures['us'] / base['us']:>13.2f}"
              f"{figures['calls']:>13.0f}{figures['calls'] / base['calls']:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
