"""Does SMTP capture stall behind the sink service's HTTP API?

Starts ``python -m mailproof.capture.service``, retains N messages (1 KB each) and one large
message (many parts), then times an SMTP canary (connect, EHLO, one message, 250, QUIT) idle and
again while threads hammer the API with what costs the most: ``GET /messages`` pages,
``/wait?subject=...&since=0`` (a scan of everything retained, answering 408) and the parsed view
of the large message. Prints the canary's median and worst round trip both ways and the ratio
during/idle (the goal: within 2x).

    .venv/bin/python benchmarks/service_canary.py [--messages 30000] [--parts 10000] [--canaries 30]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"READY http://127\.0\.0\.1:(\d+) smtp=127\.0\.0\.1:(\d+)")


def small_message(i: int) -> bytes:
    head = f"From: app@example.test\r\nTo: u{i}@bench.test\r\nSubject: Filler {i}\r\n\r\n".encode()
    return head + b"x" * (1024 - len(head) - 2) + b"\r\n"


def large_message(parts: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", "big@bench.test", "Many parts"
    msg.set_content("body\n")
    for i in range(parts):
        msg.add_attachment(b"p", maintype="application", subtype="octet-stream", filename=f"p{i}")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def fill(smtp_port: int, count: int, connections: int = 4) -> None:
    def worker(start: int) -> None:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
            for i in range(start, count, connections):
                smtp.sendmail("app@example.test", [f"u{i}@bench.test"], small_message(i))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def canary(smtp_port: int) -> float:
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=120) as smtp:
        smtp.sendmail("app@example.test", ["canary@bench.test"], small_message(-1))
    return time.perf_counter() - started


def canaries(smtp_port: int, n: int) -> list[float]:
    found = []
    for _ in range(n):
        found.append(canary(smtp_port))
        time.sleep(0.02)
    return found


def get(http_port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def load(kind: str, http_port: int, big_seq: int, stop, counter) -> None:
    since = 0
    while not stop.is_set():
        if kind == "pages":
            body = json.loads(get(http_port, f"/messages?since={since}&limit=30000")[1])
            since = body.get("next") or 0
        elif kind == "waits":
            get(http_port, "/wait?subject=no-such-subject&since=0&timeout=0")
        else:
            get(http_port, f"/messages/{big_seq}")
        with counter.get_lock():
            counter.value += 1


def pin(service_pid: int) -> str:
    """With two CPUs or more: the service on CPU 0, this process and the load clients (which
    inherit it) on the others. What is measured is then the service's loop, not a saturated
    machine's scheduler (the service's own parser processes inherit CPU 0, niced)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    os.sched_setaffinity(service_pid, {cpus[0]})
    os.sched_setaffinity(0, set(cpus[1:]))
    return f"service on CPU {cpus[0]}, clients on CPU {','.join(map(str, cpus[1:]))}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--canaries", type=int, default=30)
    parser.add_argument("--load", default="pages,pages,waits,parsed",
                        help="the API load, one client process each: pages, waits, parsed")
    args = parser.parse_args()

    process = subprocess.Popen([sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1",
                                "--smtp-port", "0", "--http-port", "0",
                                "--max-messages", str(args.messages + 10 * args.canaries + 100)],
                               cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        found = READY.search(line)
        if not found:
            print(f"no READY line: {line!r}", file=sys.stderr)
            return 1
        http_port, smtp_port = int(found.group(1)), int(found.group(2))
        pinned = pin(process.pid)
        started = time.perf_counter()
        fill(smtp_port, args.messages)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
            smtp.sendmail("app@example.test", ["big@bench.test"], large_message(args.parts))
        big_seq = json.loads(get(http_port, "/messages?to=big@bench.test")[1])["messages"][0]["seq"]
        print(pinned)
        print(f"retained {args.messages} x 1 KB + one {args.parts}-part message in "
              f"{time.perf_counter() - started:.1f} s")

        idle = canaries(smtp_port, args.canaries)

        # The load runs in other processes: in this one, its JSON decoding would hold this
        # process's GIL and slow the canary's own client side.
        stop = multiprocessing.Event()
        calls = {kind: multiprocessing.Value("i", 0) for kind in ("pages", "waits", "parsed")}
        kinds = [k for k in args.load.split(",") if k]
        workers = [multiprocessing.Process(target=load, args=(kind, http_port, big_seq, stop, calls[kind]),
                                           daemon=True) for kind in kinds]
        for w in workers:
            w.start()
        time.sleep(0.5)  # let the load get going
        during = canaries(smtp_port, args.canaries)
        stop.set()
        for w in workers:
            w.join(timeout=300)
        calls = {kind: value.value for kind, value in calls.items()}

        def show(name: str, values: list[float]) -> str:
            return (f"{name}: median {statistics.median(values) * 1000:.1f} ms, "
                    f"max {max(values) * 1000:.1f} ms")
        print(show("canary idle  ", idle))
        print(show("canary loaded", during))
        print(f"API calls meanwhile: {calls}")
        ratio = statistics.median(during) / statistics.median(idle)
        print(f"ratio loaded/idle (median): {ratio:.2f}x (goal: within 2x); "
              f"worst/idle-median: {max(during) / statistics.median(idle):.2f}x")
        return 0
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
