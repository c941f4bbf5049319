"""The Locust event wiring of a rehearsal: the only code here that touches Locust's events.

``install(events)`` registers mailproof's command-line options and lifecycle listeners; it runs
once, when a locustfile imports ``mailproof.load.user`` (``from mailproof.load import FlowUser``).
The init listener creates a ``Rehearsal`` (mailproof.load.rehearsal) for the environment Locust
made and attaches it to it; users and listeners reach it with ``Rehearsal.of(environment)``.
Nothing is process-wide but the record of which events objects are wired.

When the test stops, a local run finishes its load; on a distributed run the master asks every
worker to finish (``FINISH``), each one sends back its report (``REPORT``) and the master merges
them. On quitting, the master (or the local run) writes results.json, prints the summary and
brings Locust's CSV files up to the end of the run (mailproof.load.locust_csv).

Locust is imported only inside the listeners (they run under Locust): importing this module
monkey-patches nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mailproof.load.gates import DEFAULT_GATES
from mailproof.load.locust_csv import write_final_csv
from mailproof.load.outcome import request_counts
from mailproof.load.rehearsal import CATCH_UP_SECONDS, DEFAULT_RESULTS, Rehearsal, RehearsalOptions

log = logging.getLogger("mailproof.load.rehearsal")  # the rehearsal's one logger: its name is in Locust's log
FINISH, REPORT = "mailproof_finish", "mailproof_report"  # the master's and the workers' Locust messages

_installed: set[int] = set()


def install(events: Any) -> None:
    """Register mailproof's options and listeners on Locust's ``events`` (once per events object)."""
    if id(events) in _installed:
        return
    _installed.add(id(events))
    events.init_command_line_parser.add_listener(_options)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)
    events.test_stopping.add_listener(_on_test_stopping)
    events.test_stop.add_listener(_on_test_stop)
    events.quitting.add_listener(_on_quitting)


def _options(parser: Any) -> None:
    group = parser.add_argument_group("mailproof")
    group.add_argument("--mailproof-sink-url", default="", env_var="MAILPROOF_SINK_URL",
                       help="URL of the sink service (mailproof sink)")
    group.add_argument("--mailproof-domain", default=RehearsalOptions.domain, help="domain of test addresses")
    group.add_argument("--mailproof-within", type=float, default=RehearsalOptions.within,
                       help="a wait's default SLO in seconds from its trigger (pytest's mailproof_within)")
    group.add_argument("--mailproof-timeout", type=float, default=None,
                       help="seconds a wait waits for late mail (pytest's mailproof_timeout; default: wait_for's own)")
    group.add_argument("--mailproof-http-timeout", type=float, default=RehearsalOptions.http_timeout,
                       help="seconds a flow's request to the app may take (pytest's mailproof_http_timeout)")
    group.add_argument("--mailproof-grace", type=float, default=10.0,
                       help="seconds to wait for outstanding mail after the load stops before calling it lost")
    group.add_argument("--mailproof-gate", action="append", default=[],
                       help="an SLO gate, e.g. 'signup_confirms_account:p95<5s' (repeatable; added to the defaults "
                            + ", ".join(DEFAULT_GATES).replace("%", "%%") + ")")
    group.add_argument("--mailproof-results", default=DEFAULT_RESULTS,
                       help="where the master (or a local run) writes results.json (docs/results.md)")
    group.add_argument("--mailproof-chaos", default="",
                       help="the fault profile the sink service was started with (recorded in the results)")
    group.add_argument("--mailproof-chaos-seed", type=int, default=None, help="its seed (recorded in the results)")
    group.add_argument("--mailproof-quiet", action="store_true", default=False,
                       help="do not print the summary at the end (the mailproof command prints it)")


def _role(runner: Any) -> str:
    from locust.runners import MasterRunner, WorkerRunner

    return "master" if isinstance(runner, MasterRunner) else "worker" if isinstance(runner, WorkerRunner) else "local"


def _expected_workers(runner: Any) -> set[str]:
    """Every worker the master knows, the ones gone missing (no heartbeat) included."""
    return {client.id for client in runner.clients.all}


def _live_workers(runner: Any) -> set[str]:
    """The workers that can still report: not gone missing (a killed worker never will)."""
    return {client.id for client in runner.clients.all if getattr(client, "state", "") != "missing"}


def _on_init(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    role = _role(runner)
    rehearsal = Rehearsal(RehearsalOptions.from_parsed(environment.parsed_options, host=environment.host),
                          role=role).attach(environment)
    # spawning_complete names no environment: this one's listener is bound to its rehearsal.
    environment.events.spawning_complete.add_listener(lambda user_count, **_kw: rehearsal.note_users(user_count))
    if role == "master":
        runner.register_message(REPORT, _on_worker_report)
        return
    rehearsal.connect()
    if role == "worker":
        runner.register_message(FINISH, _on_finish_request, concurrent=True)


def _on_test_start(environment: Any, **_kw: Any) -> None:
    rehearsal = Rehearsal.of(environment)
    if rehearsal.started_at is None:
        rehearsal.started_at = time.time()


def _on_test_stopping(environment: Any, **_kw: Any) -> None:
    rehearsal = Rehearsal.of(environment)
    rehearsal.stop_arrivals()  # what was due and never started is counted from here
    if environment.runner is not None:
        rehearsal.note_users(environment.runner.user_count)
        if rehearsal.role == "master":
            rehearsal.seen_workers |= _expected_workers(environment.runner)


def _on_finish_request(environment: Any, msg: Any, **_kw: Any) -> None:
    """Worker: stop the users gracefully, let late mail land, then report everything once."""
    rehearsal = Rehearsal.of(environment)
    environment.runner.stop()
    rehearsal.finish_load()
    environment.runner.send_message(REPORT, rehearsal.report())


def _on_worker_report(environment: Any, msg: Any, **_kw: Any) -> None:
    Rehearsal.of(environment).add_report(msg.node_id, msg.data, _live_workers(environment.runner))


def _on_test_stop(environment: Any, **_kw: Any) -> None:
    rehearsal = Rehearsal.of(environment)
    if rehearsal.role == "worker":
        return
    if rehearsal.role == "local":
        rehearsal.finish_load()
        return
    runner = environment.runner
    rehearsal.seen_workers |= _expected_workers(runner)
    rehearsal.reports_done.clear()
    runner.send_message(FINISH)
    timeout = (environment.stop_timeout or 0) + rehearsal.options.grace + CATCH_UP_SECONDS + 30
    deadline = time.monotonic() + timeout
    # Wait for the live workers only: one that went missing (killed, no heartbeat) never reports,
    # and is named in missing_workers (a harness error) instead of holding up the results.
    while not rehearsal.reports_done.wait(1.0):
        rehearsal.seen_workers |= _expected_workers(runner)
        if _live_workers(runner) <= set(rehearsal.reports):
            break
        if time.monotonic() >= deadline:
            log.error("mailproof: no ledger from workers %s within %.0f s; results cover the rest",
                      sorted(rehearsal.seen_workers - set(rehearsal.reports)), timeout)
            break
    rehearsal.merge_reports(rehearsal.seen_workers | _expected_workers(runner))
    rehearsal.snapshot_sink()  # the master's own view, when it knows the sink (newer than the workers')


def _on_quitting(environment: Any, **_kw: Any) -> None:
    from mailproof.load.summary import render_summary

    rehearsal = Rehearsal.of(environment)
    if rehearsal.role == "worker":
        rehearsal.stop()
        return
    results = rehearsal.results(**request_counts(environment))
    path = results.write(rehearsal.options.results_path)
    if not rehearsal.options.quiet:
        print(render_summary(results), flush=True)
        print(f"mailproof: results written to {path}", flush=True)
    write_final_csv(environment)
    if not results.passed:
        environment.process_exit_code = 3
    rehearsal.stop()
