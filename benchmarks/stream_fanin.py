"""Fan-in: does the sink service's stream work grow with messages, or with workers x messages?

Starts ``python -m mailproof.capture.service`` three times and sends the same N messages (4 KB,
each to an address of one of 4 AddressBook runs, as 4 Locust workers would hand out) while
stream clients read ``/stream``:

- ``1 client``: one unfiltered stream, the baseline (work proportional to messages);
- ``4 clients, every message``: four unfiltered streams (what workers had before fan-in);
- ``4 clients, own run``: four streams with ``run=`` (each worker's own mail only).

For each it prints, per message, the service's CPU time (user + system, from /proc; SMTP capture
included), the bytes streamed and the records the clients had to decode, and the ratios against
the baseline measured in the same run (the goal: 4 filtered clients cost what one client does). With two CPUs or more the service runs on
CPU 0 and this script (SMTP senders, stream readers) on the others.

    .venv/bin/python benchmarks/stream_fanin.py [--messages 4000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"READY http://127\.0\.0\.1:(\d+) smtp=127\.0\.0\.1:(\d+)")
RUNS = ("aaaaa1", "bbbbb2", "ccccc3", "ddddd4")


def message(i: int, size: int = 4096) -> tuple[str, bytes]:
    to = f"order+{RUNS[i % len(RUNS)]}.{i:06d}@bench.test"
    head = f"From: app@example.test\r\nTo: {to}\r\nSubject: Receipt {i}\r\n\r\n".encode()
    return to, head + b"x" * (size - len(head) - 2) + b"\r\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reader(threading.Thread):
    """Reads one /stream until it has accounted for seq ``target`` (a record or a through line)."""

    def __init__(self, port: int, run: str | None) -> None:
        super().__init__(daemon=True)
        query = "since=0&heartbeat=60" + (f"&run={run}" if run else "")
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request("GET", f"/stream?{query}")
        self.response = self.conn.getresponse()
        json.loads(self.response.readline())  # hello: subscribed before any mail is sent
        self.bytes = self.records = 0
        self.last = 0
        self.target = None
        self.done = threading.Event()
        self.advanced = threading.Condition()

    def run(self) -> None:
        while True:
            try:
                line = self.response.readline()
            except (OSError, AttributeError, ValueError):  # closed by the benchmark when done
                return
            if not line:
                return
            self.bytes += len(line)
            event = json.loads(line)
            with self.advanced:
                if "seq" in event:
                    self.records += 1
                    self.last = event["seq"]
                elif "through" in event:
                    self.last = event["through"]
                self.advanced.notify_all()

    def wait_for(self, seq: int, timeout: float = 120) -> None:
        with self.advanced:
            if not self.advanced.wait_for(lambda: self.last >= seq, timeout):
                raise SystemExit(f"a stream reader got to seq {self.last} of {seq} within {timeout} s")


def send_all(smtp_port: int, count: int, connections: int = 4) -> None:
    def worker(start: int) -> None:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
            for i in range(start, count, connections):
                to, raw = message(i)
                smtp.sendmail("app@example.test", [to], raw)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(runs: list[str | None], count: int) -> tuple[float, float, float]:
    """(service CPU seconds, bytes streamed, records the clients decoded) per message, with one
    reader per ``runs``."""
    process = subprocess.Popen([sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1",
                                "--smtp-port", "0", "--http-port", "0", "--max-messages", str(count + 10)],
                               cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
    try:
        found = READY.search(process.stdout.readline())
        if not found:
            raise SystemExit("the sink service printed no READY line")
        http_port, smtp_port = int(found.group(1)), int(found.group(2))
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(process.pid, {cpus[0]})
        readers = [Reader(http_port, run) for run in runs]
        for reader in readers:
            reader.start()
        before = cpu_seconds(process.pid)
        send_all(smtp_port, count)
        for reader in readers:
            reader.wait_for(count)
        spent = cpu_seconds(process.pid) - before
        if sum(r.records for r in readers) < count:
            raise SystemExit(f"the streams carried {sum(r.records for r in readers)} of {count} messages")
        for reader in readers:
            reader.conn.close()
        return spent / count, sum(r.bytes for r in readers) / count, sum(r.records for r in readers) / count
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, set(cpus[1:]))
        print(f"service on CPU {cpus[0]}, senders and readers on CPU {','.join(map(str, cpus[1:]))}")
    modes = [("1 client", [None]), ("4 clients, every message", [None] * 4), ("4 clients, own run", list(RUNS))]
    rows = []
    for name, runs in modes:
        rows.append((name, *measure(runs, args.messages)))
    base_cpu, base_bytes = rows[0][1], rows[0][2]
    print(f"{args.messages} messages of 4 KB to 4 runs' addresses, per message: the service's CPU (SMTP capture "
          "included), the bytes it streamed, the records the clients decoded")
    for name, cpu, streamed, records in rows:
        print(f"  {name:26} {cpu * 1e6:6.0f} us ({cpu / base_cpu:4.2f}x)   "
              f"{streamed:7.0f} B ({streamed / base_bytes:4.2f}x)   {records:4.2f} records")
    print(f"4 filtered clients / 1 client: CPU {rows[2][1] / base_cpu:.2f}x, bytes {rows[2][2] / base_bytes:.2f}x "
          f"(goal: proportional to messages, 1x); 4 unfiltered / 1: CPU {rows[1][1] / base_cpu:.2f}x, "
          f"bytes {rows[1][2] / base_bytes:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
