"""The highest constant arrival rate the demo's rehearsal sustains, and where the CPU went
(issue 12, goal 6).

    flock /tmp/mailproof-bench.lock .venv/bin/python benchmarks/rehearsal_rate.py [--rates 40,60,80,100] [--duration 20]
        [--variant 'before=/tmp/before -u {rate} -r {rate} -t {duration}s']

Each rate of the ladder runs ``python -m loadtests.rehearse --shape constant --peak-rate R
--duration D`` (what ``make rehearsal`` runs: the launch-day mix of loadtests/flows.py against the
demo app, its fakes and a sink service, one Locust process) and reads its results.json. A rate is
**sustained** when the run lost no email and left none unverified, no flow run failed, every
flow's delivery p99 is under ``--p99`` (1 s), and the offered load was held: under a shape no
arrival hit the concurrency cap or never started; under Locust's own -u/-r/-t (an older checkout's
closed model) at least 95 % of ``rate x duration`` flows started. A variant's ladder stops at its
first rate not sustained; then ``--refine`` bisection runs between its highest sustained rate and
the next (multiples of ``--resolution``) narrow the limit down.

``--variant 'LABEL=DIR [ARGS]'`` runs another checkout (``git archive COMMIT | tar -x -C DIR``)
beside this one, rate by rate, in alternating order so that drift hits both alike; ARGS replace
the load arguments, with ``{rate}`` and ``{duration}`` filled in (for a checkout before the open
model: ``-u {rate} -r {rate} -t {duration}s``, one flow a second per user). The ratio printed is
each variant's highest sustained rate against the first one's (the baseline: the first
``--variant``, else this checkout alone, 1.00x).

Where the CPU went: every process the rehearsal starts is sampled from /proc (utime + stime,
every ``--sample`` seconds) and counted by role: ``locust`` (the load generator), ``app`` (the
demo app and its fakes), ``sink`` (the sink service), ``launcher`` (``mailproof rehearse`` itself).
The printed ratio ``locust/app`` is the load generator's CPU per flow against the application's
in the same run: well below 1 when the app, not the harness, is the limit. CPU is the whole
run's, start-up and the grace period included; a process's last fraction of a sample period
before it exits is not counted (the load has stopped by then).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOAD = "--shape constant --peak-rate {rate} --duration {duration}"
ROLES = ("locust", "app", "sink", "launcher")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def role_of(cmdline: str) -> str:
    """Which part of the rehearsal a process is, from its command line."""
    if "-m locust" in cmdline or "/locust " in cmdline:
        return "locust"
    if "mailproof.capture.service" in cmdline:
        return "sink"
    if "loadtests.rehearse" in cmdline:
        return "launcher"
    return "app"  # loadtests.demo, demo_app, fakes.*, and the shell that starts them


class CpuSampler(threading.Thread):
    """CPU seconds of every descendant of ``root`` (pid), by role, from /proc."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.seconds: dict[int, float] = {}  # pid -> latest utime + stime seen
        self.roles: dict[int, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self.done.wait(self.interval):  # a sample period, or the run's end
                return

    def sample(self) -> None:
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        for pid, seconds in times.items():
            ancestor = pid
            while ancestor not in (0, 1, self.root):
                ancestor = parents.get(ancestor, 0)
            if ancestor != self.root:
                continue
            if pid not in self.roles:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        self.roles[pid] = role_of(cmdline.read().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue
            self.seconds[pid] = max(seconds, self.seconds.get(pid, 0.0))

    def by_role(self) -> dict[str, float]:
        totals = dict.fromkeys(ROLES, 0.0)
        for pid, seconds in self.seconds.items():
            totals[self.roles[pid]] += seconds
        return totals


@dataclass
class Outcome:
    """One rehearsal at one rate, read from its results.json."""

    rate: float
    started: int = 0
    delivered: int = 0
    lost: int = 0
    unverified: int = 0
    failed: int = 0
    worst_p99: Optional[float] = None
    cap_hits: int = 0
    not_started: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    error: str = ""
    why_not: list[str] = field(default_factory=list)

    @property
    def sustained(self) -> bool:
        return not self.error and not self.why_not


def judge(data: dict, rate: float, duration: float, p99_limit: float) -> Outcome:
    """A rehearsal's results.json against the goal: 0 lost, p99 under the limit, the load held."""
    outcome = Outcome(rate)
    rows = data["ledger"]["flows"].values()
    outcome.delivered = sum(row["delivered"] for row in rows)
    outcome.lost = sum(row["lost"] for row in rows)
    outcome.unverified = sum(row.get("unverified", 0) for row in rows)
    outcome.failed = sum(data["flows"]["failures"].values())
    p99s = [summary["p99"] for summary in data["latency"].values()]
    outcome.worst_p99 = max(p99s) if p99s else None
    arrivals = data["run"].get("arrivals")
    runs = sum(data["flows"]["runs"].values())
    if arrivals is not None:
        outcome.started = sum(arrivals["started"])
        outcome.cap_hits, outcome.not_started = arrivals["cap_hits"], arrivals["not_started"]
        if outcome.cap_hits or outcome.not_started:
            outcome.why_not.append(f"load not held ({outcome.cap_hits} late at the cap, {outcome.not_started} never started)")
    else:  # a closed model: how many flows Locust's users managed to start
        outcome.started = runs
        if runs < 0.95 * rate * duration:
            outcome.why_not.append(f"load not held ({runs} flows of {rate * duration:.0f})")
    if outcome.lost or outcome.unverified:
        outcome.why_not.append(f"{outcome.lost} lost, {outcome.unverified} unverified")
    if outcome.failed:
        outcome.why_not.append(f"{outcome.failed} flow runs failed")
    if not outcome.delivered:
        outcome.why_not.append("no email delivered")
    elif outcome.worst_p99 is not None and outcome.worst_p99 >= p99_limit:
        outcome.why_not.append(f"p99 {outcome.worst_p99:.2f} s")
    return outcome


@dataclass
class Variant:
    label: str
    root: Path
    load: str  # the load arguments, with {rate} and {duration}
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: bool = False

    def best(self) -> Optional[Outcome]:
        held = [o for o in self.outcomes if o.sustained]
        return max(held, key=lambda o: o.rate) if held else None

    def bracket(self) -> Optional[tuple[float, float]]:
        """The highest sustained rate and the lowest rate above it that was not, if both exist."""
        best = self.best()
        above = [o.rate for o in self.outcomes if not o.sustained and best is not None and o.rate > best.rate]
        return (best.rate, min(above)) if above else None


def midpoint(low: float, high: float, resolution: float) -> Optional[float]:
    """The rate halfway between ``low`` (sustained) and ``high`` (not), in whole multiples of
    ``resolution``; None when no such rate lies strictly between them."""
    mid = round((low + high) / 2 / resolution) * resolution
    return mid if low < mid < high else None


def run_once(variant: Variant, rate: float, args, work: Path) -> Outcome:
    out = work / f"{variant.label}-{rate:g}".replace("/", "_")
    load = shlex.split(variant.load.format(rate=f"{rate:g}", duration=f"{args.duration:g}"))
    command = [sys.executable, "-m", "loadtests.rehearse", "--out", str(out), *load]
    env = {**os.environ, "PYTHONPATH": str(variant.root)}
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=variant.root, env=env, stdout=handle, stderr=subprocess.STDOUT)
        sampler = CpuSampler(child.pid, args.sample)
        sampler.start()
        code = child.wait()
        sampler.done.set()
        sampler.join()
    results = out / "results.json"
    if code not in (0, 3) or not results.exists():  # 3: gates failed, which judge() reads itself
        outcome = Outcome(rate, error=f"exit {code}, no results.json; log: {log}")
    else:
        outcome = judge(json.loads(results.read_text()), rate, args.duration, args.p99)
    outcome.cpu = sampler.by_role()
    return outcome


def _describe(outcome: Outcome) -> str:
    if outcome.error:
        return f"ERROR {outcome.error}"
    cpu = outcome.cpu
    flows = max(outcome.started, 1)
    p99 = "-" if outcome.worst_p99 is None else f"{outcome.worst_p99:.2f} s"
    verdict = "sustained" if outcome.sustained else "NOT: " + "; ".join(outcome.why_not)
    return (f"{outcome.started} flows, {outcome.delivered} emails, {outcome.lost} lost, worst p99 {p99}; "
            f"CPU s locust {cpu['locust']:.1f}, app {cpu['app']:.1f}, sink {cpu['sink']:.1f}, "
            f"launcher {cpu['launcher']:.1f} ({1000 * cpu['locust'] / flows:.2f} / {1000 * cpu['app'] / flows:.2f} / "
            f"{1000 * cpu['sink'] / flows:.2f} ms per flow); {verdict}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="40,60,80,100", help="the ladder of flows/s, ascending (default 40,60,80,100)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run (default 20)")
    parser.add_argument("--p99", type=float, default=1.0, help="the delivery p99 a sustained rate stays under (default 1 s)")
    parser.add_argument("--sample", type=float, default=0.25, help="seconds between CPU samples (default 0.25)")
    parser.add_argument("--variant", action="append", default=[], metavar="'LABEL=DIR [ARGS]'",
                        help="another checkout, run beside this one; ARGS: its load arguments ({rate}, {duration})")
    parser.add_argument("--refine", type=int, default=1,
                        help="bisection runs after the ladder, between the highest sustained rate and the next (default 1)")
    parser.add_argument("--resolution", type=float, default=5.0, help="the rates bisection tries are multiples of this (default 5)")
    parser.add_argument("--no-current", action="store_true", help="run only the --variant checkouts")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        parser.error(f"--rates: numbers separated by commas, e.g. 40,60,80 (got {args.rates!r})")
    if not rates or rates != sorted(rates) or rates[0] <= 0:
        parser.error(f"--rates: positive and ascending (got {args.rates!r})")

    variants = []
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        words = shlex.split(rest)
        if not label or not words or not (Path(words[0]) / "loadtests" / "rehearse.py").is_file():
            parser.error(f"--variant {spec!r}: LABEL=DIR [ARGS], DIR a checkout with loadtests/rehearse.py")
        variants.append(Variant(label, Path(words[0]).resolve(), shlex.join(words[1:]) or DEFAULT_LOAD))
    if not args.no_current:
        variants.append(Variant("this checkout", ROOT, DEFAULT_LOAD))
    if not variants:
        parser.error("--no-current needs a --variant")

    work = Path(tempfile.mkdtemp(prefix="rehearsal-rate-"))
    print(f"constant arrivals for {args.duration:g} s a run; sustained: 0 lost, 0 failed, delivery p99 < "
          f"{args.p99:g} s, the load held; results and logs in {work}", flush=True)
    for step, rate in enumerate(rates):
        running = [v for v in variants if not v.stopped]
        if not running:
            break
        for variant in running if step % 2 == 0 else reversed(running):  # alternating: drift hits all alike
            outcome = run_once(variant, rate, args, work)
            variant.outcomes.append(outcome)
            variant.stopped = not outcome.sustained
            print(f"{rate:6g}/s  {variant.label:<16} {_describe(outcome)}", flush=True)

    for _ in range(args.refine):  # bisect between each variant's highest sustained rate and the next
        pending = [(v, midpoint(*v.bracket(), args.resolution)) for v in variants if v.bracket()]
        pending = [(v, rate) for v, rate in pending if rate is not None]
        if not pending:
            break
        for variant, rate in pending:
            outcome = run_once(variant, rate, args, work)
            variant.outcomes.append(outcome)
            print(f"{rate:6g}/s  {variant.label:<16} {_describe(outcome)}", flush=True)

    print("\nhighest sustained rate, and where the CPU went at it (CPU ms per flow):")
    print(f"{'variant':<16} {'flows/s':>8} {'x base':>7} {'locust':>7} {'app':>7} {'sink':>7} {'locust/app':>11}")
    base = variants[0].best()
    for variant in variants:
        best = variant.best()
        if best is None:
            print(f"{variant.label:<16} {'none':>8}   (lowest rate not sustained: {_describe(variant.outcomes[0])})")
            continue
        flows = max(best.started, 1)
        ms = {role: 1000 * best.cpu[role] / flows for role in ROLES}
        ratio = f"{best.rate / base.rate:.2f}x" if base is not None else "-"
        print(f"{variant.label:<16} {best.rate:8g} {ratio:>7} {ms['locust']:7.2f} {ms['app']:7.2f} {ms['sink']:7.2f} "
              f"{ms['locust'] / ms['app'] if ms['app'] else float('inf'):11.2f}")
    if any(v.outcomes and v.outcomes[-1].rate == rates[-1] and v.outcomes[-1].sustained for v in variants):
        print(f"(sustained at the ladder's top, {rates[-1]:g}/s: the limit is above it; extend --rates)")
    return 0 if all(v.best() is not None for v in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
