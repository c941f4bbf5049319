"""Do hostile messages cost Message time in proportion to their size?

For each hostile input of tests/test_message_hostile.py (HTML that made html.parser quadratic, a
Content-Type with thousands of parameters, thousands of MIME parts, one header among very costly
others), builds it at size N and 2N, reads every accessor (tests.test_message_hostile.every_accessor)
and prints the time at 2N over the time at N: about 2 is linear, about 4 quadratic. The
baseline, measured in the same run, is a plain text message of the same sizes. The tests
assert what is read (caps, defects, the code found); this script measures how long it takes,
so no test depends on the machine's speed.

    .venv/bin/python benchmarks/hostile_inputs.py [--size 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailproof.message import Message  # noqa: E402
from tests.test_message_hostile import HOSTILE_HTML, every_accessor, many_parts  # noqa: E402


def plain(size: int) -> bytes:
    return b"Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + b"code 246801 " * (size // 12)


def html(piece: str) -> Callable[[int], bytes]:
    def build(size: int) -> bytes:
        body = "<p>code 246801</p>" + piece * (size // len(piece))
        return b"Subject: html\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body.encode()
    return build


def parameters(size: int) -> bytes:
    count = size // 30
    params = b"".join(b";\r\n name*%d*=utf-8''v%d" % (i, i) for i in range(count))
    return b"Subject: params\r\nContent-Type: text/plain; charset=utf-8" + params + b"\r\n\r\nbody 123456\r\n"


def parts(size: int) -> bytes:
    return many_parts(max(2, size // 100))


def costly_headers(size: int) -> bytes:
    count = size // 30
    return (b"Content-Type: text/plain" + b"".join(b"; p%d=v%d" % (i, i) for i in range(count)) + b"\r\n"
            b"To: " + b"=?utf-8?q?a?= " * count + b"\r\nSubject: cheap\r\n\r\nbody\r\n")


def seconds(build: Callable[[int], bytes], size: int, repeat: int) -> float:
    raw = build(size)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        every_accessor(Message(raw))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=200_000, help="bytes of the smaller input (default 200,000)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = {"plain text (baseline)": plain, **{f"html: {name}": html(p) for name, p in HOSTILE_HTML.items()},
             "Content-Type parameters": parameters, "MIME parts (capped at 1000)": parts,
             "costly To/Content-Type, Subject read": costly_headers}
    n = args.size
    print(f"every accessor of each input at {n:,} and {2 * n:,} bytes; 2N/N about 2 is linear, about 4 quadratic")
    worst = 0.0
    for name, build in cases.items():
        small, large = seconds(build, n, args.repeat), seconds(build, 2 * n, args.repeat)
        ratio = large / small if small else float("inf")
        if not name.startswith("plain") and small >= 0.005:  # below 5 ms the ratio is mostly noise
            worst = max(worst, ratio)
        print(f"  {name:40} {small * 1000:8.1f} ms -> {large * 1000:8.1f} ms   2N/N {ratio:4.2f}")
    print(f"worst 2N/N ratio of the inputs taking 5 ms or more: {worst:.2f} (linear: about 2, like the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
