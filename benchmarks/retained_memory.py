"""Memory per retained message: the sink service's CaptureStore against the raw bytes alone.

Each measurement runs in a fresh child process (pinned to CPU 0 when there are two CPUs), which
retains N messages and reports its RSS growth (``/proc/self/statm``: what the machine pays,
allocator rounding included) and, in a second child, the tracemalloc growth (what Python asked
for). The messages are what one application sends: a different recipient each (AddressBook
addresses), the same sender, HELO and peer host, fresh objects every time as the SMTP sink hands
them over (one connection per message). Variants, measured head to head in the same run:

- ``raw list``: a plain list of the raw ``bytes`` objects, the baseline;
- ``CaptureStore``: ``mailproof.capture.service.store.CaptureStore.add`` (what the service keeps);
- ``MailStore``: the in-process ``mailproof.store.MailStore`` (``Message`` objects, unparsed);
- with ``--base REV``, ``CaptureStore@REV``: the same store as committed at REV (``git archive``
  of its ``mailproof/`` into a temporary directory), the "before" of a change, in the same run.

It prints bytes per retained message, the ratio against the raw list, and against the goal
(issue 12: at most 1.2 x the raw size + 200 B). It checks zero loss (every message retained and
found by seq and by recipient), the full garbage-collection pause with everything retained, and
the time each add takes (the store's ``add`` runs in the sink's DATA handler, before the 250).

``--churn`` also times add with eviction (cap = half the messages: every add past it evicts the
oldest), ``CaptureStore`` against ``CaptureStore@REV`` in alternating child processes, best of
``--rounds``, with every message still found by recipient afterwards; and the slowest single add
(a table or dict resize, or a collection, is in it).

    .venv/bin/python benchmarks/retained_memory.py [--messages 50000] [--sizes 143,4096]
        [--base REV] [--churn] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("raw list", "CaptureStore", "MailStore")
RUN = "k3v9xq"


def goal(size: int) -> float:
    return 1.2 * size + 200


def messages(count: int, size: int):
    """``count`` CapturedMail of exactly ``size`` bytes, built from fresh objects each time."""
    from mailproof.capture.smtp_sink import CapturedMail
    for i in range(1, count + 1):
        to = b"order+%s.%06d@shop.test" % (RUN.encode(), i)
        head = b"From: shop@app.test\r\nTo: %s\r\nSubject: Receipt %d\r\n\r\n" % (to, i)
        data = head + b"x" * (size - len(head) - 2) + b"\r\n"
        assert len(data) == size
        yield CapturedMail(
            seq=i, mail_from=b"shop@app.test".decode(), rcpt_tos=(to.decode(),), data=data,
            received_at=time.time(), peer=(b"127.0.0.1".decode(), 40000 + i % 20000),
            helo=b"app.local".decode(), smtputf8=False, tls=False, auth_user=None,
            mail_options=((b"SIZE=%d" % size).decode(), b"BODY=8BITMIME".decode()))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def churn(count: int, size: int) -> dict:
    """Time add with eviction: cap = count // 2, so the second half of the adds each evict."""
    from mailproof.capture.service.store import CaptureStore
    store = CaptureStore(max_messages=max(1, count // 2))
    batch = list(messages(count, size))  # built before the clock starts
    gc.collect()
    clock = time.perf_counter
    slowest = 0.0
    started = clock()
    for m in batch:
        before = clock()
        store.add(m)
        slowest = max(slowest, clock() - before)
    spent = clock() - started
    first = count - store.max_messages + 1
    ok = (store.evicted == count - store.max_messages and len(store.messages) == store.max_messages
          and all(store.seqs_to(f"order+{RUN}.{i:06d}@shop.test") == [i] for i in range(first, count + 1))
          and store.seqs_to(f"order+{RUN}.{first - 1:06d}@shop.test") == [])
    return {"ok": ok, "add_us": spent / count * 1e6, "slowest_ms": slowest * 1000}


def child(variant: str, count: int, size: int, traced: bool) -> dict:
    from mailproof.capture.service.store import CaptureStore
    from mailproof.message import Message
    from mailproof.store import MailStore

    gc.collect()
    if traced:
        import tracemalloc
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = rss()
    # Made after the baseline: what a store allocates up front for its cap is counted.
    if variant == "raw list":
        kept: list = []
        add = lambda m: kept.append(m.data)  # noqa: E731
    elif variant.startswith("CaptureStore"):
        kept = CaptureStore(max_messages=count)
        add = kept.add
    else:
        kept = MailStore(max_messages=count)
        add = lambda m: kept.deliver(Message.from_captured(m, source="sink"))  # noqa: E731
    spent = 0.0
    clock = time.perf_counter
    for m in messages(count, size):
        started = clock()
        add(m)
        spent += clock() - started
    gc.collect()
    grown = (tracemalloc.get_traced_memory()[0] if traced else rss()) - before
    if traced:
        tracemalloc.stop()
    # Zero loss: every message retained, found by seq and (stores) by its recipient.
    if variant == "raw list":
        ok = len(kept) == count
    elif variant.startswith("CaptureStore"):
        ok = (len(kept.messages) == count and kept.received == count
              and all(kept.get(seq)[0] == seq for seq in range(1, count + 1, 997))
              and kept.seqs_to(f"ORDER+{RUN}.{count:06d}@shop.test") == [count])
    else:
        ok = kept.delivered == count and len(kept._messages) == count
    started = time.perf_counter()
    gc.collect()
    pause = time.perf_counter() - started
    return {"bytes": grown / count, "ok": ok, "gc_ms": pause * 1000, "add_us": spent / count * 1e6}


def measure(variant: str, count: int, size: int, traced: bool, roots: dict, mode: str = "--child") -> dict:
    cmd = [sys.executable, __file__, mode, variant, "--messages", str(count), "--sizes", str(size),
           "--root", roots.get(variant, str(ROOT))]
    if traced:
        cmd.append("--traced")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--sizes", default="143,4096")
    parser.add_argument("--base", help="also measure CaptureStore as committed at this git revision")
    parser.add_argument("--churn", action="store_true", help="time add with eviction against --base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child")
    parser.add_argument("--churn-child")
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--traced", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    sys.path.insert(0, args.root)  # this checkout, or the --base one in a child
    if args.child:
        print(json.dumps(child(args.child, args.messages, sizes[0], args.traced)))
        return 0
    if args.churn_child:
        print(json.dumps(churn(args.messages, sizes[0])))
        return 0
    if args.churn and not args.base:
        parser.error("--churn compares against --base REV (e.g. --base HEAD~1)")
    with tempfile.TemporaryDirectory(prefix="retained-memory-") as tmp:
        roots, variants = {}, list(VARIANTS)
        if args.base:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "mailproof"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            based = f"CaptureStore@{args.base}"
            roots[based] = tmp
            variants.insert(2, based)
        return run(args, sizes, variants, roots)


def run(args, sizes: list, variants: list, roots: dict) -> int:
    print(f"{args.messages} retained messages per variant, one child process each "
          f"(goal: <= 1.2 x raw + 200 B)")
    lost = False
    for size in sizes:
        print(f"\n{size} B messages (goal {goal(size):.0f} B per message)")
        print(f"  {'variant':<22}{'RSS B/msg':>11}{'traced B/msg':>14}{'x raw list':>12}{'x goal':>9}"
              f"{'full GC ms':>12}{'add us':>8}")
        base = None
        for variant in variants:
            held = measure(variant, args.messages, size, False, roots)
            traced = measure(variant, args.messages, size, True, roots)
            lost |= not (held["ok"] and traced["ok"])
            if base is None:
                base = held["bytes"]
            print(f"  {variant:<22}{held['bytes']:>11.0f}{traced['bytes']:>14.0f}{held['bytes'] / base:>12.2f}"
                  f"{held['bytes'] / goal(size):>9.2f}{held['gc_ms']:>12.1f}{held['add_us']:>8.1f}"
                  + ("" if held["ok"] and traced["ok"] else "   LOST MESSAGES"))
        if args.churn:
            lost |= churn_head_to_head(args, size, variants[2], roots)
    if lost:
        print("\nFAILED: a variant did not retain every message")
        return 1
    return 0


def churn_head_to_head(args, size: int, based: str, roots: dict) -> bool:
    """Add with eviction, this checkout against --base, alternating child processes; True if lost."""
    print(f"  add with eviction ({args.messages} adds, cap {args.messages // 2}), best of {args.rounds}, alternating:")
    best: dict = {}
    lost = False
    for _ in range(args.rounds):
        for variant in ("CaptureStore", based):
            got = measure(variant, args.messages, size, False, roots, mode="--churn-child")
            lost |= not got["ok"]
            mine = best.setdefault(variant, {"add_us": float("inf"), "slowest_ms": float("inf")})
            mine["add_us"] = min(mine["add_us"], got["add_us"])
            mine["slowest_ms"] = min(mine["slowest_ms"], got["slowest_ms"])
    for variant in ("CaptureStore", based):
        b = best[variant]
        print(f"    {variant:<26}{b['add_us']:>7.2f} us/add  slowest add {b['slowest_ms']:>6.2f} ms")
    ratio = best["CaptureStore"]["add_us"] / best[based]["add_us"]
    print(f"    ratio {ratio:.2f} x {based}" + ("   LOST MESSAGES" if lost else ""))
    return lost


if __name__ == "__main__":
    sys.exit(main())
