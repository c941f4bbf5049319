"""How long after capture does a waiting ``Mailbox.wait_for`` resume?

Measures, per message, the time from the sink accepting DATA (``received_at``, stamped in
handle_DATA before the 250 reply) to the waiting thread running again, with the real
EmbeddedSink and a real SMTP client (smtplib on one kept connection, in a sender thread). One
waiter at a time, each on a fresh address of a fresh Mailbox view (one per test, as in pytest);
the sender sends only once the wait is registered, so every sample is a true wake-up.

As a baseline in the same run, interleaved message by message, the same is measured for a bare
``threading.Event`` set from the sink's on_message callback: what any push design costs at the
least (thread hand-off and GIL). The ratio shows what the harness adds on top.

    .venv/bin/python benchmarks/wake_latency.py --count 1000
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import queue
import smtplib
import sys
import threading
import time
from typing import Optional

from mailproof.capture.smtp_sink import CapturedMail, SmtpSink
from mailproof.capture.embedded import EmbeddedSink
from mailproof.mailbox import Mailbox, MailStore

RAW = (
    b"From: app@example.test\r\nTo: someone@mailproof.test\r\nSubject: wake\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + b"Your code is 123456.\r\n" * 10
)


class SignallingStore(MailStore):
    """A MailStore that tells the sender when a waiter has registered (so it sends after)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiter_added = threading.Semaphore(0)

    def __bool__(self) -> bool:
        # EmbeddedSink does ``store or MailStore()``, and an empty store is falsy (it has
        # __len__): without this it would silently feed a different store.
        return True

    def _add_waiter(self, waiter) -> None:
        super()._add_waiter(waiter)
        self.waiter_added.release()


class Sender(threading.Thread):
    """Sends each queued job on its sink's kept connection."""

    def __init__(self, ports: dict[str, int], store: SignallingStore) -> None:
        super().__init__(name="sender", daemon=True)
        self.clients = {name: smtplib.SMTP("127.0.0.1", port, timeout=30) for name, port in ports.items()}
        self.store = store
        self.jobs: "queue.Queue[Optional[tuple[str, str]]]" = queue.Queue()
        self.failure: Optional[BaseException] = None

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                which, rcpt = job
                if which == "harness" and not self.store.waiter_added.acquire(timeout=30):
                    raise RuntimeError("the harness waiter never registered")
                self.clients[which].sendmail("app@example.test", [rcpt], RAW)
        except BaseException as exc:
            self.failure = exc
        finally:
            for client in self.clients.values():
                try:
                    client.quit()
                except Exception:
                    client.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(samples: list[float]) -> dict[str, float]:
    values = sorted(s * 1e6 for s in samples)
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": values[-1]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="messages measured per kind (default 1000)")
    parser.add_argument("--warmup", type=int, default=50, help="messages sent first and not measured")
    parser.add_argument("--within", type=float, default=10.0, help="wait bound per message, seconds")
    args = parser.parse_args(argv)
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    store = SignallingStore()
    backend = EmbeddedSink(store=store).start()
    assert backend.store is store
    bare_event = threading.Event()
    bare_box: list[CapturedMail] = []

    def on_bare(captured: CapturedMail) -> None:
        bare_box.append(captured)
        bare_event.set()

    bare = SmtpSink(on_message=on_bare).start()
    sender = Sender({"harness": backend.smtp_port, "bare": bare.port}, store)
    sender.start()

    harness: list[float] = []
    baseline: list[float] = []
    try:
        for i in range(args.warmup + args.count):
            # The harness: a fresh view and address, exactly one waiter.
            with Mailbox(store, default_within=args.within) as view:
                addr = view.address("wake")
                sender.jobs.put(("harness", addr))
                msg = view.wait_for(to=addr)
                resumed = time.time()
            if i >= args.warmup:
                harness.append(resumed - msg.received_at)

            # The baseline: a bare Event set by the sink's callback.
            bare_event.clear()
            bare_box.clear()
            sender.jobs.put(("bare", f"bare{i}@mailproof.test"))
            if not bare_event.wait(args.within):
                raise RuntimeError(f"baseline message {i} not captured within {args.within} s")
            resumed = time.time()
            if i >= args.warmup:
                baseline.append(resumed - bare_box[0].received_at)
            if sender.failure is not None:
                raise sender.failure
    finally:
        sender.jobs.put(None)
        sender.join(timeout=10)
        backend.stop()
        bare.stop()

    ours, base = summary(harness), summary(baseline)
    print(f"wake_latency: {args.count} messages each (+{args.warmup} warm-up), "
          f"Python {platform.python_version()}, {platform.machine()}")
    print("delay from capture (handle_DATA) to the waiting thread resuming, microseconds")
    print(f"{'':28}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>10}")
    print(f"{'Mailbox.wait_for':28}" + "".join(f"{ours[k]:>9.0f}" for k in ("p50", "p90", "p99")) + f"{ours['max']:>10.0f}")
    print(f"{'bare threading.Event':28}" + "".join(f"{base[k]:>9.0f}" for k in ("p50", "p90", "p99")) + f"{base['max']:>10.0f}")
    print(f"{'ratio (harness / bare)':28}" + "".join(f"{ours[k] / base[k]:>9.2f}" for k in ("p50", "p90", "p99"))
          + f"{ours['max'] / base['max']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
