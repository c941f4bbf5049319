"""The load generator's CPU per flow and per accounted email, against plain Locust users issuing
the same HTTP requests with no mail accounting (issue 12, goal 2: at most 1.5 times).

    flock /tmp/mailproof-bench.lock .venv/bin/python benchmarks/loadgen_cost.py [--rate 20] [--duration 20] [--rounds 2] [--calls]

One sink service and one demo app (loadtests.demo: the app and its validation fake) are started
for the whole run, pinned to CPU 0; then, round after round, one Locust process per variant
(pinned to CPU 1) runs the demo's ``signup_confirms_account`` at the same constant arrival rate
(open model: the same flows start at the same times whatever the variant):

- ``plain``: a plain Locust HttpUser issuing that flow's three requests (POST /signup, GET the
  confirmation link, GET /users/{id}), reading each answer as the flow does; the link's token is
  made up (the plain user never sees the email), so the app answers it 404, marked as expected;
- ``plain-fast``: the same on FastHttpUser;
- ``flow``: mailproof's FlowUser (HttpUser) running the flow itself under a Rehearsal: sink stream,
  MailStore, Mailbox, ledger, Locust MAIL/FLOW events;
- ``fast-flow``: FastFlowUser (FastHttpUser, ``mailproof rehearse --client fast``), the same;
- ``receive`` (only when asked for, ``--variants``): ``plain-fast`` with a Rehearsal beside it
  and its run's addresses, so that every email comes back on the stream into the MailStore and
  the ledger, but no flow waits for it or reads it: the receiving side of the accounting alone.

``--calls`` counts instead every Python and C function call the Locust process makes between
test start and stop (a ``sys.setprofile`` hook), per flow: a deterministic measure of the same
work, for changes too small for CPU time on a busy machine (the counting slows the process, so
the CPU figures of such a run are not the cost; it prints the counts only).

CPU is the Locust process's own (``/proc/self/stat`` utime + stime, all its threads), read when
the test starts and when it stops (for the flow variants, after the ledger settled); the ledger's
reconciliation and results.json afterwards are shown apart ("after"). It is also read when the
first tenth of the flows and when nine tenths have completed: "steady" is the CPU per flow in
between, without what a run costs once (start, the ledger settling). Every flow run must pass
and, for the flow variants, the ledger must show every email delivered and none lost; the script
exits 1 otherwise. Ratios are per flow, against ``plain`` (and ``fast-flow`` against
``plain-fast``) of the same round, then the median over rounds.

When this file is Locust's locustfile (``LOADGEN_VARIANT`` set), it defines that variant's user.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "plain-fast", "flow", "fast-flow")
EXTRA_VARIANTS = ("receive",)  # run only when --variants names them
RECEIVES = ("flow", "fast-flow", "receive")  # the variants with a Rehearsal (sink stream, ledger)
GOAL = 1.5


def _cpu_seconds() -> float:
    """utime + stime of this process (every thread), from /proc/self/stat."""
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the locustfile side ----------------------------------------------------------------------------

if os.environ.get("LOADGEN_VARIANT") and __name__ != "__main__":
    sys.path.insert(0, str(ROOT))
    import secrets
    from urllib.parse import quote

    from locust import FastHttpUser, HttpUser, events

    from mailproof.load.arrivals import ArrivalPlan
    from mailproof.load.shapes import shape_class
    from mailproof.load.shapes_config import ShapeConfig

    VARIANT = os.environ["LOADGEN_VARIANT"]
    CONFIG = ShapeConfig.decode(os.environ["MAILPROOF_SHAPE"])
    BenchShape = shape_class(CONFIG)
    MARKS: dict = {"variant": VARIANT}

    if VARIANT in ("flow", "fast-flow"):
        from loadtests.flows import signup_confirms_account
        from mailproof.load.rehearsal import Rehearsal
        from mailproof.load.user import FastFlowUser, FlowUser

        class BenchFlowUser(FastFlowUser if VARIANT == "fast-flow" else FlowUser):  # type: ignore[misc]
            flows = {signup_confirms_account: 1}

        def _flow_counts(environment) -> dict:
            rehearsal = Rehearsal.of(environment)
            counts = rehearsal.arrival_counts()
            return {"flows": sum(rehearsal.flow_runs.values()), "failed": sum(rehearsal.flow_failures.values())
                    + sum(rehearsal.harness_flow_errors.values()) + sum(rehearsal.flow_interrupted.values()),
                    "offered": counts.total_offered if counts else 0}
    else:
        PLAN = ArrivalPlan(CONFIG.offsets(), max_users=CONFIG.max_users)
        FAILED = [0]

        if VARIANT == "receive":
            from mailproof.load.rehearsal import Rehearsal
            from mailproof.load.user import FlowUser  # noqa: F401  (installs the Rehearsal's listeners)

        def _signup_requests(user) -> None:
            """signup_confirms_account's requests, answers read as the flow reads them."""
            client, host = user.client, user.host.rstrip("/")
            if VARIANT == "receive":  # the run's own address: its email comes back on the stream
                address = Rehearsal.of(user.environment).address_book.address("signup")
            else:
                address = f"plain-{secrets.token_hex(6)}@mailproof.test"
            with client.post("/signup", json={"email": address, "name": "Ada Lovelace"}, name="/signup",
                             catch_response=True) as response:
                ok = response.status_code == 202 and bool(response.text)
                response.success() if ok else response.failure(f"HTTP {response.status_code}")
            link = f"{host}/confirm?token={secrets.token_urlsafe(32)}"  # the plain user never sees the email
            with client.get(link, name="/confirm", catch_response=True) as page:
                ok = ok and page.status_code == 404 and "invalid" in (page.text or "")
                page.success()
            with client.get(f"/users/{quote(address)}", name="/users/{id}", catch_response=True) as answer:
                ok = ok and answer.status_code == 200 and answer.json()["email"] == address
                answer.success()
            if not ok:
                FAILED[0] += 1

        def _signup(user) -> None:
            """One arrival, as FlowUser's tasks take them (mailproof.load.user.tasks_for)."""
            if PLAN.claim() is None:
                return  # the schedule is spent: the user idles in its wait (_idle)
            try:
                _signup_requests(user)
            finally:
                PLAN.completed()
                _completed()

        def _idle(user) -> float:
            """As FlowUser's open-model wait: none, until the schedule is spent."""
            return 3600.0 if PLAN.stopped_at is not None or PLAN.next >= len(PLAN.offsets) else 0.0

        if VARIANT in ("plain-fast", "receive"):
            class PlainFastUser(FastHttpUser):
                wait_time = _idle
                tasks = [_signup]
        else:
            class PlainUser(HttpUser):
                wait_time = _idle
                tasks = [_signup]

        def _flow_counts(environment) -> dict:
            counts = PLAN.counts()
            found = {"flows": counts.total_completed, "failed": FAILED[0], "offered": counts.total_offered}
            if VARIANT == "receive":
                found["received"] = Rehearsal.of(environment).backend.store.delivered
            return found

    TOTAL = len(CONFIG.offsets())
    WARM, END = max(1, TOTAL // 10), TOTAL - TOTAL // 10  # the steady window, in completed flows
    DONE = [0]

    def _completed() -> None:
        DONE[0] += 1
        if DONE[0] == WARM:
            MARKS["cpu_warm"] = _cpu_seconds()
        elif DONE[0] == END:
            MARKS["cpu_end"] = _cpu_seconds()

    @events.request.add_listener
    def _flow_event(request_type, **_kw) -> None:
        if request_type == "FLOW":  # a flow run ended (FlowUser's own event)
            _completed()

    CALLS = [0]

    def _count_call(frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            CALLS[0] += 1

    @events.test_start.add_listener
    def _start(environment, **_kw) -> None:
        MARKS.setdefault("cpu_start", _cpu_seconds())
        if os.environ.get("LOADGEN_CALLS"):  # one OS thread: the users and the stream are greenlets
            sys.setprofile(_count_call)

    @events.test_stop.add_listener  # after mailproof's own (the ledger has settled)
    def _stop(environment, **_kw) -> None:
        sys.setprofile(None)
        MARKS["cpu_stop"] = _cpu_seconds()
        MARKS["calls"] = CALLS[0]
        MARKS.update(_flow_counts(environment))

    @events.quitting.add_listener  # after mailproof's own (results.json is written)
    def _quit(environment, **_kw) -> None:
        MARKS["cpu_quit"] = _cpu_seconds()
        Path(os.environ["LOADGEN_OUT"]).write_text(json.dumps(MARKS))


# -- the orchestrator ---------------------------------------------------------------------------------

def _pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if (os.cpu_count() or 1) >= 2 else command


def _run_variant(variant: str, args, app_url: str, sink_url: str, work: Path, round_no: int) -> dict:
    import subprocess

    from mailproof.load.shapes_config import ShapeConfig

    out = work / f"{variant}-{round_no}.json"
    results = work / f"{variant}-{round_no}-results.json"
    shape = ShapeConfig("constant", args.rate, args.duration, 1, args.users)
    env = {**os.environ, "LOADGEN_VARIANT": variant, "LOADGEN_OUT": str(out), "MAILPROOF_SHAPE": shape.encode(),
           "PYTHONPATH": str(ROOT), "LOADGEN_CALLS": "1" if args.calls else ""}
    command = [sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve()), "--headless", "--host", app_url,
               "--only-summary", "--stop-timeout", "30", "--loglevel", os.environ.get("LOADGEN_LOGLEVEL", "WARNING"), "--exit-code-on-error", "0"]
    if variant in RECEIVES:
        command += ["--mailproof-sink-url", sink_url, "--mailproof-results", str(results), "--mailproof-quiet",
                    "--mailproof-grace", "10"]
    log = work / f"{variant}-{round_no}.log"
    import time
    began = time.monotonic()
    with open(log, "w") as handle:
        code = subprocess.call(_pinned(1, command), env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if not out.exists():
        raise SystemExit(f"loadgen_cost: {variant} wrote no figures (exit {code}); its log: {log}")
    marks = json.loads(out.read_text())
    marks["wall"] = time.monotonic() - began
    marks["load_cpu"] = marks["cpu_stop"] - marks["cpu_start"]
    marks["after_cpu"] = marks["cpu_quit"] - marks["cpu_stop"]
    total = len(shape.offsets())
    marks["steady_flows"] = (total - total // 10) - max(1, total // 10)
    marks["steady_cpu"] = marks.get("cpu_end", marks["cpu_stop"]) - marks.get("cpu_warm", marks["cpu_start"])
    marks["emails"] = marks["flows"]  # plain: one email sent per flow, none accounted
    problems = []
    if marks["failed"] or marks["flows"] != marks["offered"] or not marks["flows"]:
        problems.append(f"{marks['flows']} flows of {marks['offered']} offered, {marks['failed']} not passed")
    if variant in ("flow", "fast-flow"):
        data = json.loads(results.read_text())
        rows = data["ledger"]["flows"].values()
        delivered, lost = sum(r["delivered"] for r in rows), sum(r["lost"] + r["unverified"] for r in rows)
        marks["emails"] = delivered
        if lost or delivered != marks["flows"]:
            problems.append(f"ledger: {delivered} delivered, {lost} lost or unverified, for {marks['flows']} flows")
    if variant == "receive" and marks["received"] != marks["flows"]:
        problems.append(f"{marks['received']} emails received on the stream for {marks['flows']} flows")
    if problems:
        raise SystemExit(f"loadgen_cost: {variant} (round {round_no}): {'; '.join(problems)}; log: {log}")
    return marks


def main(argv: list[str] | None = None) -> int:
    import argparse
    import statistics
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="flows started per second (default 20)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per variant (default 20)")
    parser.add_argument("--users", type=int, default=100, help="the concurrency cap (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every variant, interleaved (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants, in order")
    parser.add_argument("--calls", action="store_true",
                        help="count the Python calls (Python and C functions) per flow instead: deterministic, "
                             "where CPU time is noisy; the counting slows the process, so its CPU figures are not the cost")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if "plain" not in variants or any(v not in VARIANTS + EXTRA_VARIANTS for v in variants):
        parser.error(f"--variants: some of {', '.join(VARIANTS + EXTRA_VARIANTS)}, plain among them (the baseline)")

    sys.path.insert(0, str(ROOT))
    import signal

    from mailproof.servers.app_process import AppProcess

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the app and the sink on the way out

    work = Path(tempfile.mkdtemp(prefix="loadgen-cost-"))
    sink = AppProcess(_pinned(0, [sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1",
                                  "--smtp-port", "0", "--http-port", "0"]),
                      ready_pattern=r"READY (http://\S+) smtp=(\S+)", name="sink service", start_timeout=30).start()
    try:
        line = next(l for l in reversed(sink.output) if l.startswith("READY "))
        smtp_host, smtp_port = line.split("smtp=", 1)[1].split()[0].rsplit(":", 1)
        app = AppProcess(_pinned(0, [sys.executable, "-m", "loadtests.demo", "--workers", "8"]),
                         env={"MAILPROOF_SMTP_HOST": smtp_host.strip("[]"), "MAILPROOF_SMTP_PORT": smtp_port},
                         ready_pattern=r"READY (http://\S+)", name="demo app", start_timeout=30, cwd=str(ROOT)).start()
        try:
            rounds = []
            for round_no in range(1, args.rounds + 1):
                figures = {}
                for variant in variants:
                    figures[variant] = _run_variant(variant, args, app.url, sink.url, work, round_no)
                    m = figures[variant]
                    print(f"round {round_no} {variant:>10}: {m['flows']} flows, {m['emails']} emails; "
                          f"load CPU {m['load_cpu']:.2f} s = {m['load_cpu'] / m['flows'] * 1000:.2f} ms/flow; "
                          f"after the load {m['after_cpu']:.2f} s; {m['wall']:.0f} s in all", flush=True)
                rounds.append(figures)
        finally:
            app.stop()
    finally:
        sink.stop()

    def per_flow(m: dict) -> float:
        return m["load_cpu"] / m["flows"] * 1000

    print(f"\nconstant {args.rate:g} flows/s for {args.duration:g} s, {args.rounds} round(s); "
          "Locust CPU per flow (ms), median over rounds:")
    def steady(m: dict) -> float:
        return m["steady_cpu"] / m["steady_flows"] * 1000

    print(f"{'variant':>10} {'ms/flow':>8} {'ms/email':>9} {'steady ms/flow':>15} {'after ms/flow':>14}")
    for variant in variants:
        flow_ms = statistics.median(per_flow(r[variant]) for r in rounds)
        email_ms = statistics.median(r[variant]["load_cpu"] / r[variant]["emails"] * 1000 for r in rounds)
        steady_ms = statistics.median(steady(r[variant]) for r in rounds)
        after_ms = statistics.median(r[variant]["after_cpu"] / r[variant]["flows"] * 1000 for r in rounds)
        print(f"{variant:>10} {flow_ms:8.2f} {email_ms:9.2f} {steady_ms:15.2f} {after_ms:14.2f}")
    if args.calls:
        print("Python calls per flow (median over rounds), and the flow variants' own part:")
        calls = {v: statistics.median(r[v]["calls"] / r[v]["flows"] for r in rounds) for v in variants}
        for variant in variants:
            print(f"{variant:>10} {calls[variant]:8.0f}")
        for variant, base in (("flow", "plain"), ("fast-flow", "plain-fast"), ("receive", "plain-fast")):
            if variant in variants and base in variants:
                print(f"{variant} - {base}: {calls[variant] - calls[base]:.0f} calls per flow "
                      f"({calls[variant] / calls[base]:.2f} times)")
        return 0
    for variant, base in (("flow", "plain"), ("fast-flow", "plain"), ("fast-flow", "plain-fast"),
                          ("receive", "plain-fast")):
        if variant in variants and base in variants:
            ratio = statistics.median(per_flow(r[variant]) / per_flow(r[base]) for r in rounds)
            ratio_steady = statistics.median(steady(r[variant]) / steady(r[base]) for r in rounds)
            goal = f" (goal <= {GOAL})" if variant != "receive" else ""
            print(f"ratio {variant}/{base}: {ratio:.2f}, steady {ratio_steady:.2f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
