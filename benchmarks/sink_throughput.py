"""Capture throughput of the sink service against Postfix's C smtp-sink and bare aiosmtpd.

Load comes from Postfix's ``smtp-source`` (20 parallel sessions), 4 KB and 100 KB messages
(``--sizes``), once with one message per connection and once with many per connection (``-d``).
Servers, each in its own process:

  (a) ``smtp-sink``: Postfix's C sink, the baseline every ratio is taken against (issue 12's goal:
      the sink service at 0.5 times it or better in every mode and size);
  (b) bare aiosmtpd: an SMTP server whose DATA handler only appends the bytes to a list;
  (b') ``--floor``: a bare asyncio Protocol with fixed replies and no SMTP library (uvloop when
      installed), what a Python server's reads and writes alone cost on this machine;
  (c) the sink service (``python -m mailproof.capture.service``), checked for zero loss via ``/stats``;
  (c') ``--variant 'LABEL=DIR [ARGS]'``: the sink service of another checkout (``git archive`` of an
      older commit into DIR) or with other arguments (``--loop asyncio``), for before/after figures
      measured in the same run;
  (c+) optionally the sink service with one ``/stream`` consumer attached (a RemoteSink in its
      own process, as in a Locust rehearsal): informational, not part of the gate.

The server is pinned to CPU 0 and smtp-source (and the stream consumer) to CPU 1 with ``taskset``
when there are two CPUs. Each server gets ``--repeat`` runs per mode, interleaved across servers
in ABBA order so drift hits them all alike; medians and best runs are printed, with the server
process's CPU time per message, and "x paired", the median over repetitions of the rate ratio
to smtp-sink in runs that were back to back.

On a shared machine single runs swing by +-20 %, so the aiosmtpd gate uses a head-to-head
measurement: bare aiosmtpd and the sink service are loaded at the same time, both pinned to the
same core, and their captures are counted over the same window. The gate: the median
head-to-head ratio of the sink service to bare aiosmtpd is at least 0.90 in both modes, and no
sink service loses a message (checked via /stats). The exit code is 1 otherwise; the smtp-sink
goal is printed (MET / NOT MET).

Setup (Debian; "No configuration" so no Postfix daemon starts)::

    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get -o DPkg::Lock::Timeout=600 install -y postfix

Run: ``.venv/bin/python benchmarks/sink_throughput.py [--repeat 3] [--no-stream]`` (about 3 min);
before/after: ``git archive COMMIT | tar -x -C /tmp/before`` then ``--variant before=/tmp/before``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

BARE_AIOSMTPD = r'''
import asyncio, logging, signal, sys
from aiosmtpd.smtp import SMTP
logging.getLogger("mail.log").setLevel(logging.WARNING)

class Handler:
    def __init__(self):
        self.mails = []
    async def handle_DATA(self, server, session, envelope):
        self.mails.append(envelope.original_content)
        return "250 2.0.0 OK"

async def main():
    handler = Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.aiosmtpd", enable_SMTPUTF8=True, decode_data=False),
        "127.0.0.1", 0)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"COUNT {len(handler.mails)}", flush=True))
    print(f"READY smtp=127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()
    print(f"CAPTURED {len(handler.mails)}", flush=True)

asyncio.run(main())
'''

# The floor for Python on this event loop: no SMTP library, fixed replies, the end of DATA found
# by its last five bytes (smtp-source does not pipeline). Not a capture (it keeps nothing): what
# a Python server's reads and writes cost here, beside aiosmtpd's object model.
PYTHON_FLOOR = r'''
import asyncio, signal
try:
    import uvloop
except ImportError:
    uvloop = None

class Floor(asyncio.Protocol):
    count = 0
    def connection_made(self, transport):
        self.transport, self.data, self.tail = transport, False, b""
        transport.write(b"220 floor.bench ESMTP\r\n")
    def data_received(self, chunk):
        if self.data:
            self.tail = (self.tail + chunk[-5:])[-5:]
            if self.tail == b"\r\n.\r\n":
                self.data, self.tail = False, b""
                Floor.count += 1
                self.transport.write(b"250 2.0.0 OK\r\n")
            return
        verb = chunk[:4].upper()
        if verb == b"DATA":
            self.data, self.tail = True, b"\r\n"
            self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 Bye\r\n")
            self.transport.close()
        else:
            self.transport.write(b"250 OK\r\n")

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", 0)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY smtp=127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()

uvloop.run(main()) if uvloop else asyncio.run(main())
'''

STREAM_CONSUMER = r'''
import sys, threading
from mailproof.capture.remote import RemoteSink
from mailproof.mailbox import MailStore
sink = RemoteSink(sys.argv[1], store=MailStore(max_messages=1000)).start()
print("READY", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
sink.stop()
print(f"STREAMED {sink.received} missing={sink.missing} duplicates={sink.duplicates} "
      f"reconnects={sink.stream_connections - 1}", flush=True)
'''


def find_tool(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/{name}")
                                       if os.access(p, os.X_OK)), None)


def pinning() -> tuple[list[str], list[str]]:
    if shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", str(cpus[1])]
    return [], []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def read_ready(proc: subprocess.Popen, what: str) -> str:
    """The server's READY line (a blocking read: a server that dies closes its stdout)."""
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"{what} did not start: {line!r}\n{proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


class Server:
    name = ""

    def __init__(self, server_pin: list[str]) -> None:
        self.pin = server_pin
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def before_run(self) -> None:
        pass

    def count(self) -> int:
        """Messages captured so far (for the head-to-head windows)."""
        raise NotImplementedError

    def after_run(self, sent: int) -> str:
        return ""


class PostfixSmtpSink(Server):
    name = "postfix smtp-sink (C)"

    def __init__(self, server_pin, tool: str) -> None:
        super().__init__(server_pin)
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(self.pin + [tool, *user, "-h", "smtp-sink.bench", f"{HOST}:{self.port}", "1024"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # smtp-sink announces nothing: this is the one readiness probe (a bounded connect retry).
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"smtp-sink did not start: {self.proc.stderr.read()}")
                time.sleep(0.02)


class BareAiosmtpd(Server):
    name = "bare aiosmtpd"

    def __init__(self, server_pin) -> None:
        super().__init__(server_pin)
        self.proc = subprocess.Popen(self.pin + [sys.executable, "-c", BARE_AIOSMTPD],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.port = int(read_ready(self.proc, self.name).rsplit(":", 1)[1])

    def count(self) -> int:
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        if not line.startswith("COUNT "):
            raise SystemExit(f"bare aiosmtpd did not report its count: {line!r}")
        return int(line.split()[1])


class PythonFloor(Server):
    name = "python floor (no SMTP library)"

    def __init__(self, server_pin) -> None:
        super().__init__(server_pin)
        self.proc = subprocess.Popen(self.pin + [sys.executable, "-c", PYTHON_FLOOR],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.port = int(read_ready(self.proc, self.name).rsplit(":", 1)[1])


class SinkServiceServer(Server):
    name = "sink service"

    def __init__(self, server_pin, client_pin, *, stream: bool = False, max_messages: int = 2_000,
                 extra: tuple[str, ...] = (), root: Path = ROOT, label: str = "") -> None:
        super().__init__(server_pin)
        if label:
            self.name = label
        self.proc = subprocess.Popen(
            self.pin + [sys.executable, "-m", "mailproof.capture.service", "--host", HOST, "--smtp-port", "0",
                        "--http-port", "0", "--max-messages", str(max_messages), *extra],
            cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = read_ready(self.proc, self.name)
        self.url = ready.split()[1]
        self.port = int(ready.rsplit(":", 1)[1])
        self.consumer: Optional[subprocess.Popen] = None
        if stream:
            self.name = "sink service + 1 /stream client"
            self.consumer = subprocess.Popen(client_pin + [sys.executable, "-c", STREAM_CONSUMER, self.url],
                                             cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
            read_ready(self.consumer, "stream consumer")
        self.before = self.stats()["received"]
        self.lost = 0
        self.total_sent = 0

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as response:
            return json.load(response)

    def before_run(self) -> None:
        self.before = self.stats()["received"]

    def count(self) -> int:
        return self.stats()["received"]

    def after_run(self, sent: int) -> str:
        stats = self.stats()
        got = stats["received"] - self.before
        self.total_sent += sent
        self.lost += max(0, sent - got)
        return f"captured {got}/{sent}" + ("" if got == sent else f"  LOST {sent - got}")

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stdin.close()
            out = self.consumer.stdout.read().strip()
            self.consumer.wait(timeout=30)
            self.consumer_report = out
        super().stop()


def run_load(tool: str, client_pin: list[str], server: Server, *, messages: int, sessions: int, size: int,
             reuse: bool) -> tuple[float, float]:
    """Send ``messages`` with smtp-source; returns (msg/s, server CPU µs per message)."""
    command = client_pin + [tool, "-s", str(sessions), "-l", str(size), "-m", str(messages),
                            "-f", "bench@mailproof.test", "-t", "sink@mailproof.test", "-M", "bench.mailproof.test"]
    if reuse:
        command.append("-d")
    command.append(f"{HOST}:{server.port}")
    cpu_before = cpu_seconds(server.proc.pid)
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"smtp-source failed ({done.returncode}) against {server.name}: {done.stderr.strip()}")
    return messages / elapsed, cpu / messages * 1e6


def head_to_head(tool: str, client_pin: list[str], servers: list[Server], *, sessions: int, size: int,
                 reuse: bool, window: float, warm: float = 1.0) -> list[float]:
    """Load every server at once (all pinned to the same CPU) and count captures in one window.

    The servers share one core, so whatever else the machine does hits them at the same
    moments, and the ratio of their rates is the ratio of their efficiency.
    """
    flags = ["-d"] if reuse else []
    loads = [subprocess.Popen(client_pin + [tool, "-s", str(sessions), "-l", str(size), "-m", "100000000",
                                            *flags, "-f", "bench@mailproof.test", "-t", "sink@mailproof.test",
                                            "-M", "bench.mailproof.test", f"{HOST}:{server.port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for server in servers]
    try:
        time.sleep(warm)  # a measurement window, not a wait for mail
        start = [server.count() for server in servers]
        started = time.perf_counter()
        time.sleep(window)
        end = [server.count() for server in servers]
        elapsed = time.perf_counter() - started
    finally:
        for load in loads:
            load.terminate()
            load.wait()
    return [(e - s) / elapsed for s, e in zip(start, end)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", "-m", type=int, default=3000, help="messages per run at 4 KB, 3 times as many on reused connections (default 3000)")
    parser.add_argument("--large-messages", type=int, default=1000,
                        help="messages per run for sizes above 16 KB (default 1000)")
    parser.add_argument("--sessions", "-s", type=int, default=20)
    parser.add_argument("--sizes", default="4096,102400",
                        help="message body bytes, comma-separated (default 4096,102400)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="runs per server and mode (default 7); ratios are medians of paired runs, "
                             "robust to other load on the machine")
    parser.add_argument("--no-stream", action="store_true", help="skip the sink service + /stream client row")
    parser.add_argument("--no-bare", action="store_true", help="skip bare aiosmtpd (and the head-to-head)")
    parser.add_argument("--h2h-rounds", type=int, default=5,
                        help="head-to-head rounds against bare aiosmtpd per mode at the first size (default 5; 0 skips)")
    parser.add_argument("--h2h-window", type=float, default=6.0, help="seconds counted per head-to-head round")
    parser.add_argument("--no-postfix-sink", action="store_true", help="skip Postfix's smtp-sink")
    parser.add_argument("--floor", action="store_true",
                        help="also serve the Python floor: a bare asyncio Protocol (uvloop when installed) "
                             "with fixed replies and no SMTP library, what reads and writes alone cost")
    parser.add_argument("--service-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the sink service (repeatable), e.g. --service-arg=--smtp-processes=2")
    parser.add_argument("--variant", action="append", default=[], metavar="'LABEL=DIR [ARG...]'",
                        help="also measure the sink service of another checkout (e.g. a `git archive` of an "
                             "older commit in DIR) with these service arguments; repeatable: before/after "
                             "figures from one run")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    source = find_tool("smtp-source")
    sink_tool = find_tool("smtp-sink")
    if source is None or (sink_tool is None and not args.no_postfix_sink):
        print("smtp-source/smtp-sink not found. Install Postfix without starting it:\n"
              '  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections\n'
              "  apt-get -o DPkg::Lock::Timeout=600 install -y postfix", file=sys.stderr)
        return 2
    server_pin, client_pin = pinning()
    print(f"smtp-source: {args.sessions} sessions, sizes {sizes} B, {args.messages} messages per run "
          f"({args.large_messages} above 16 KB), {args.repeat} runs each; server pinned "
          f"{' '.join(server_pin) or '(no taskset)'}, load {' '.join(client_pin) or '(no taskset)'}", flush=True)

    def count_for(size: int, reuse: bool) -> int:  # reused runs are 3 times as fast: 3 times as many
        return (args.messages if size <= 16384 else args.large_messages) * (3 if reuse else 1)

    servers: list[Server] = []
    postfix = bare = streamed = None
    try:
        if not args.no_postfix_sink:
            postfix = PostfixSmtpSink(server_pin, sink_tool)
            servers.append(postfix)
        if not args.no_bare:
            bare = BareAiosmtpd(server_pin)
            servers.append(bare)
        if args.floor:
            servers.append(PythonFloor(server_pin))
        for variant in args.variant:
            label, _, rest = variant.partition("=")
            words = shlex.split(rest)
            servers.append(SinkServiceServer(server_pin, client_pin, extra=words[1:], root=Path(words[0]),
                                             label=label))
        service = SinkServiceServer(server_pin, client_pin, extra=args.service_arg)
        servers.append(service)
        if not args.no_stream:
            streamed = SinkServiceServer(server_pin, client_pin, stream=True, extra=args.service_arg)
            servers.append(streamed)
        modes = [(f"{size // 1024} KB, " + ("reused (-d)" if reuse else "1/connection"), size, reuse)
                 for size in sizes for reuse in (False, True)]
        rates: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for server in servers:  # warm-up: imports, first connections, allocator
            for _, size, reuse in modes:
                server.before_run()
                run_load(source, client_pin, server, messages=200, sessions=args.sessions, size=size, reuse=reuse)
                server.after_run(200)
        for rep in range(args.repeat):
            for mode, size, reuse in modes:
                # ABBA order: whatever disturbs the machine early or late hits every server alike.
                for server in (servers if rep % 2 == 0 else list(reversed(servers))):
                    count = count_for(size, reuse)
                    server.before_run()
                    rate, cpu_us = run_load(source, client_pin, server, messages=count,
                                            sessions=args.sessions, size=size, reuse=reuse)
                    note = server.after_run(count)
                    rates.setdefault((mode, server.name), []).append(rate)
                    cpus.setdefault((mode, server.name), []).append(cpu_us)
                    print(f"  run {rep + 1} {mode:22} {server.name:34} {rate:8.0f} msg/s  "
                          f"{cpu_us:6.0f} us CPU/msg  {note}", flush=True)
        h2h: dict[str, list[float]] = {}
        if bare is not None and args.h2h_rounds > 0:
            contenders = [bare, service]  # two contenders: each gets half the core, the least noise
            for mode, size, reuse in modes:
                if size != sizes[0]:
                    continue
                for round_ in range(args.h2h_rounds):
                    got = head_to_head(source, client_pin, contenders, sessions=args.sessions, size=size,
                                       reuse=reuse, window=args.h2h_window)
                    h2h.setdefault(mode, []).append(got[1] / got[0])
                    print(f"  head-to-head {round_ + 1} {mode:22} " + ", ".join(
                        f"{s.name} {r:.0f} msg/s" for s, r in zip(contenders, got)), flush=True)
    finally:
        for server in servers:
            server.stop()

    base = postfix or bare or service
    print()
    print("msg/s: median and best of the runs. CPU: the server process's CPU time per message (median;")
    print("with several capture processes, theirs summed). x paired: the median over repetitions of")
    print(f"(server rate / {base.name} rate in the same repetition): adjacent runs, so drift cancels.")
    print(f"{'mode':22} {'server':34} {'median':>7} {'best':>7} {'CPU us':>7}  {'x paired (min..max)':>20}")
    ok = True
    goal_met = True
    for mode, _, _ in modes:
        base_rates = rates[(mode, base.name)]
        for server in servers:
            runs = rates[(mode, server.name)]
            med, best = statistics.median(runs), max(runs)
            cpu_us = statistics.median(cpus[(mode, server.name)])
            paired = [r / b for r, b in zip(runs, base_rates)]
            print(f"{mode:22} {server.name:34} {med:7.0f} {best:7.0f} {cpu_us:7.0f}  "
                  f"{statistics.median(paired):7.2f}x ({min(paired):.2f}..{max(paired):.2f})")
            if server is service and postfix is not None and statistics.median(paired) < 0.5:
                goal_met = False
        if mode in h2h:
            ratio = statistics.median(h2h[mode])
            print(f"  head-to-head on one core ({mode}): sink service / bare aiosmtpd = {ratio:.2f}x "
                  f"(median of {', '.join(f'{r:.2f}' for r in h2h[mode])})")
            if ratio < 0.9:
                ok = False
                print(f"  GATE FAILED ({mode}): the sink service runs at {ratio:.2f}x bare aiosmtpd, below 0.90")
    for server in servers:
        if not isinstance(server, SinkServiceServer):
            continue
        print(f"{server.name}: sent {server.total_sent}, lost {server.lost}"
              + (f"; consumer: {server.consumer_report}" if server.consumer is not None else ""))
        if server.lost:
            ok = False
    if postfix is not None:
        print("GOAL (issue 12): sink service >= 0.5x Postfix smtp-sink in every mode and size:",
              "MET" if goal_met else "NOT MET")
    print("GATE: zero loss" + (", sink service >= 0.90x bare aiosmtpd (head-to-head)" if h2h else "") + ":",
          "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
