"""Launch-day rehearsal: start the sink service, the fakes and the demo app, then run Locust.

    python -m loadtests.rehearse --duration 60 --peak-users 20            # one process
    python -m loadtests.rehearse --workers 2                               # master + 2 workers, loopback
    python -m loadtests.rehearse --chaos "5%:rcpt:451,1%:after_data:disconnect"

Exits with Locust's exit code: 0 when every SLO gate passed, 3 when a gate failed (the summary
names it and by how much), 1/2 for Locust errors. Results land in reports/rehearsal/: results.json
(schema: docs/results.md, with the chaos profile and the faults the sink injected), Locust's CSVs
and HTML.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mailproof.capture.remote import RemoteSink
from mailproof.net import free_port
from mailproof.servers.app_process import AppProcess

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.rehearse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--peak-users", type=int, default=20, help="users at the peak (default 20)")
    parser.add_argument("--shape", choices=("burst", "ramp", "constant"), default="burst")
    parser.add_argument("--flow-mix", default="", help="e.g. 'signup_confirms_account=3,order_receipt=1'")
    parser.add_argument("--gate", action="append", default=[], help="extra SLO gate (repeatable)")
    parser.add_argument("--chaos", default="", help="sink fault profile, e.g. '5%%:rcpt:451,1%%:after_data:disconnect'")
    parser.add_argument("--chaos-seed", type=int, default=None, help="seed for the chaos profile")
    parser.add_argument("--workers", type=int, default=0, help="Locust workers (0: one local process)")
    parser.add_argument("--app-workers", type=int, default=8, help="the demo app's SMTP worker pool")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds for late mail after the load stops")
    parser.add_argument("--out", default=str(ROOT / "reports" / "rehearsal"), help="results folder")
    return parser.parse_args(argv)


def locust_command(args: argparse.Namespace, app_url: str, sink_url: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "--host", app_url, "--only-summary",
        "--stop-timeout", "30",  # the shape ends the run; in-flight flows then finish
        "--shape", args.shape, "--peak-users", str(args.peak_users), "--duration", str(args.duration),
        "--mailproof-sink-url", sink_url, "--mailproof-grace", str(args.grace),
        "--mailproof-results", str(out / "results.json"),
        "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
        "--exit-code-on-error", "0",  # the SLO gates decide (http:error_rate among them)
        "--loglevel", "WARNING",
        *(["--flow-mix", args.flow_mix] if args.flow_mix else []),
        # Recorded in results.json (run.chaos_profile / chaos_seed); the sink service injects them.
        *(["--mailproof-chaos", args.chaos] if args.chaos else []),
        *(["--mailproof-chaos-seed", str(args.chaos_seed)] if args.chaos and args.chaos_seed is not None else []),
        *[item for gate in args.gate for item in ("--mailproof-gate", gate)],
    ]


def run_locust(args: argparse.Namespace, app_url: str, sink_url: str, out: Path) -> int:
    command = locust_command(args, app_url, sink_url, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.workers <= 0:
        return subprocess.call(command, cwd=ROOT, env=env)
    port = free_port()
    master = subprocess.Popen(command + ["--master", "--master-bind-host", "127.0.0.1",
                                         "--master-bind-port", str(port), "--expect-workers", str(args.workers)],
                              cwd=ROOT, env=env)
    # Workers take the flow options from the master; they need only the locustfile and the sink.
    worker_command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
                      "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
                      "--mailproof-sink-url", sink_url, "--mailproof-grace", str(args.grace),
                      "--loglevel", "WARNING"]
    workers = [subprocess.Popen(worker_command, cwd=ROOT, env=env) for _ in range(args.workers)]
    code = master.wait()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    with RemoteSink.launch(chaos=args.chaos or None, chaos_seed=args.chaos_seed) as sink, \
            AppProcess([python, "-m", "fakes.validation_api", "--port", "0"], cwd=str(ROOT),
                       name="validation API") as validation, \
            AppProcess([python, "-m", "demo_app", "--port", "0", "--smtp-host", sink.smtp_host,
                        "--smtp-port", str(sink.smtp_port), "--validation-url", validation.url,
                        "--workers", str(args.app_workers)], cwd=str(ROOT), name="demo application") as app:
        print(f"rehearsal: app {app.url}, sink {sink.url} (smtp {sink.smtp_host}:{sink.smtp_port}), "
              f"{args.shape} to {args.peak_users} users for {args.duration:g} s"
              + (f", {args.workers} workers" if args.workers else "")
              + (f", chaos {args.chaos!r}" if args.chaos else ""), flush=True)
        code = run_locust(args, app.url, sink.url, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
