"""IMAP backend latency: from SMTP acceptance by Postfix to the waiting flow resuming.

    .venv/bin/python benchmarks/imap_latency.py                 # IDLE-only vs the final strategy
    .venv/bin/python benchmarks/imap_latency.py --sweep         # plus NOOP cadences 5/10/20/50 ms
    .venv/bin/python benchmarks/imap_latency.py --messages 50   # quicker

What is measured, per message, on one clock (time.time() in this process):

- accepted: the moment smtplib gets Postfix's "250 queued as ID" after DATA. Postfix sends it
  only once the queue file is safely written, so this *is* the acceptance; the reply crosses
  loopback in ~0.1 ms. Postfix's own timestamps (maillog lines, its Received: header) have
  whole-second resolution, useless at this scale, so the log is used only for the next point.
- handed: when Postfix's "ID: to=<..> relay=.. status=sent" line (LMTP 250 from Dovecot)
  reached us through the log pipe: the message is in the maildir from then on.
- resumed: when ``Mailbox.wait_for`` returned in the flow (the flow's thread).

The flow is the realistic one: the app (here smtplib) sends, then the flow calls wait_for, so
the waiter is registered a moment after acceptance and before Dovecot has the message. One
message at a time, so no message waits for another's fetch.

Strategies (each on a fresh private Dovecot + Postfix; LMTP relay instead of Postfix when not
root, where "accepted" then already means "stored"):
- idle: IDLE only. Dovecot reports news 0.5 s after delivery (fixed in its source).
- noopN: IDLE while nobody waits, NOOP every N ms while a waiter is pending.
- final: noop20 plus the delivery nudge (Postfix's status=sent log line wakes the watcher).
Also reported: what the NOOP cadence costs while a waiter is pending and no mail comes
(NOOPs per second, CPU of Dovecot's imap process and of this process).
"""

from __future__ import annotations

import argparse
import os
import re
import smtplib
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailproof.servers.dovecot import live_group_members  # noqa: E402
from mailproof.imap.backend import open_imap_backend  # noqa: E402
from mailproof.mailbox import Mailbox  # noqa: E402

_QUEUED = re.compile(r"queued as ([0-9A-F]+)")
_SENT = re.compile(r"postfix/lmtp\[\d+\]: ([0-9A-F]+): to=<[^>]+>.*status=sent")
_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def imap_cpu_seconds(dovecot_pid: int) -> float:
    """CPU time of the Dovecot imap processes (the server side of the watcher's connection)."""
    total = 0.0
    for pid in live_group_members(dovecot_pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        if not comm.startswith(b"imap") or comm.startswith(b"imap-login"):
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def run(label: str, messages: int, **backend_options) -> dict:
    handed: dict[str, float] = {}
    handed_event = threading.Condition()
    with open_imap_backend({}, **backend_options) as backend:
        if backend.postfix is not None:
            def on_line(line: str) -> None:
                found = _SENT.search(line)
                if found:
                    with handed_event:
                        handed[found.group(1)] = time.time()
                        handed_event.notify_all()

            backend.postfix.add_line_listener(on_line)
        mailbox = Mailbox(backend.store, backend.address_book)
        rows = []
        with smtplib.SMTP(backend.smtp_host, backend.smtp_port) as smtp:
            smtp.ehlo("bench.mailproof.test")
            for index in range(messages):
                address = mailbox.address("bench")
                body = (f"From: app@bench.test\r\nTo: {address}\r\nSubject: bench {index}\r\n"
                        f"Message-ID: <bench{index}.{time.time()}@bench.test>\r\n\r\n" + "x" * 2000 + "\r\n")
                smtp.mail("app@bench.test")
                smtp.rcpt(address)
                code, reply = smtp.data(body.encode())
                accepted = time.time()
                if code != 250:
                    raise SystemExit(f"Postfix refused: {code} {reply!r}")
                queue_id = _QUEUED.search(reply.decode()).group(1) if backend.postfix else None
                msg = mailbox.wait_for(address, within=10)
                resumed = time.time()
                rows.append((queue_id, accepted, msg.received_at, resumed))
        # Postfix logs status=sent around the time we resume: collect the last lines.
        if backend.postfix is not None:
            with handed_event:
                handed_event.wait_for(lambda: all(q in handed for q, *_ in rows), timeout=10)
        cost = measure_idle_cost(backend, mailbox) if backend_options.get("strategy") != "idle" else None
        watcher = backend.watcher
        stats = {"noops": watcher.noops, "idles": watcher.idles, "connections": backend.connections_opened}
    latencies = [(resumed - accepted) * 1000 for _, accepted, _, resumed in rows]
    handed_ms = [(handed[q] - accepted) * 1000 for q, accepted, _, _ in rows if q in handed]
    seen_after_handed = [(seen - handed[q]) * 1000 for q, _, seen, _ in rows if q in handed]
    return {"label": label, "latencies": latencies, "handed": handed_ms,
            "seen_after_handed": seen_after_handed, "cost": cost, **stats}


def measure_idle_cost(backend, mailbox, seconds: float = 3.0) -> dict:
    """A waiter pending for ``seconds`` with no mail: what the NOOP cadence costs."""
    watcher = backend.watcher
    noops0, cpu0, own0 = watcher.noops, imap_cpu_seconds(backend.dovecot.pid), time.process_time()
    started = time.time()
    mailbox.expect_no_mail(mailbox.address("quiet"), within=seconds)
    elapsed = time.time() - started
    return {
        "noops_per_s": (watcher.noops - noops0) / elapsed,
        "dovecot_cpu_pct": (imap_cpu_seconds(backend.dovecot.pid) - cpu0) / elapsed * 100,
        "harness_cpu_pct": (time.process_time() - own0) / elapsed * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--sweep", action="store_true", help="also NOOP cadences 5/10/20/50 ms without the nudge")
    args = parser.parse_args()

    plans = [("idle", dict(strategy="idle", nudge=False))]
    if args.sweep:
        for ms in (5, 10, 20, 50):
            plans.append((f"noop{ms}", dict(strategy="hybrid", noop_interval=ms / 1000, nudge=False)))
    plans.append(("final", dict(strategy="hybrid", noop_interval=0.02, nudge=True)))

    relay = "Postfix" if os.geteuid() == 0 else "LMTP relay sink (not root)"
    print(f"{args.messages} messages per strategy, 2 KB each, one at a time, via {relay} -> Dovecot LMTP -> IMAP")
    results = []
    for label, options in plans:
        started = time.time()
        result = run(label, args.messages, **options)
        result["wall"] = time.time() - started
        results.append(result)

    header = (f"{'strategy':<8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'handed p50':>10} {'seen-handed p50':>15} {'NOOP/s idle':>11} {'dovecot CPU':>11} {'harness CPU':>11} {'conns':>5}")
    print(header)
    print("-" * len(header))
    for r in results:
        lat = r["latencies"]
        cost = r["cost"] or {}
        print(f"{r['label']:<8} {percentile(lat, 50):8.1f} {percentile(lat, 90):8.1f} {percentile(lat, 99):8.1f} "
              f"{max(lat):8.1f} {statistics.median(r['handed']) if r['handed'] else float('nan'):10.1f} "
              f"{statistics.median(r['seen_after_handed']) if r['seen_after_handed'] else float('nan'):15.1f} "
              f"{cost.get('noops_per_s', 0):11.1f} {cost.get('dovecot_cpu_pct', 0):10.1f}% "
              f"{cost.get('harness_cpu_pct', 0):10.1f}% {r['connections']:5d}")
    idle, final = results[0], results[-1]
    ratio50 = percentile(idle["latencies"], 50) / percentile(final["latencies"], 50)
    ratio99 = percentile(idle["latencies"], 99) / percentile(final["latencies"], 99)
    print(f"\nIDLE-only / final: p50 {ratio50:.1f}x slower, p99 {ratio99:.1f}x slower")
    print("handed = Postfix logged status=sent (Dovecot's LMTP 250), from acceptance; "
          "seen-handed = watcher saw EXISTS, after that (negative: the NOOP beat the log line)")


if __name__ == "__main__":
    main()
