"""A rehearsal's outcome: its state (``mailproof.load.rehearsal``) turned into ``RehearsalResults``.

``Rehearsal.results`` calls ``judged_results`` once the load is over (after ``finish_load`` on a
local run, after ``merge_reports`` on the master): it names the harness's own errors, settles the
emails still owed, fills in the run's facts and applies the SLO gates. ``request_counts`` reads
the HTTP and Locust request totals off Locust's statistics.

The harness never blames the application for its own gaps: when the stream skipped messages, fell
behind, or could not read one, every email still owed is looked up in the sink service's own
records; found, it is delivered (``harness.recovered``); not found while the service itself
dropped messages, it is ``unverified`` (a harness error), not lost. When the sink service
restarted (``harness.stream.restarts``; a ``sink_restart`` harness error), an email owed whose
trigger came before the current service run started is ``unverified`` unless the new run holds it.

No Locust here: ``request_counts`` only reads the environment it is given.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from mailproof.addresses import TOKEN
from mailproof.load.ledger import Arrival
from mailproof.load.rehearsal import CATCH_UP_SECONDS
from mailproof.load.results import (FlowRuns, Harness, HarnessError, RehearsalResults, RequestCounts, RunInfo,
                                    StreamCounters)

if TYPE_CHECKING:
    from mailproof.load.rehearsal import Rehearsal

LOOKUPS = 200  # owed addresses looked up in the sink service's records at most (each scans what it retains)
LOOKUPS_WITHOUT_GAPS = 20  # ... when the harness had no gap: the ones the summary lists


def _streams(rehearsal: "Rehearsal") -> tuple[Optional[StreamCounters], int, int]:
    """(summed stream counters, worst gap, worst lag) over the processes that streamed."""
    if rehearsal.role == "master":
        if not rehearsal.worker_streams:
            return None, 0, max(rehearsal.worker_behind, default=0)
        total = StreamCounters()
        for counters in rehearsal.worker_streams:
            total.add(counters)
        return total, max(c.missing for c in rehearsal.worker_streams), max(rehearsal.worker_behind, default=0)
    stream = rehearsal.stream_counters()
    return stream, stream.missing if stream else 0, rehearsal.behind


def _foreign(rehearsal: "Rehearsal", address: str) -> bool:
    """An address of another run: a worker's that never reported (its run id is unknown here)."""
    found = TOKEN.search(address)
    return bool(found) and found.group(1) not in rehearsal.run_ids


def judged_results(rehearsal: "Rehearsal", *, http: RequestCounts, locust: RequestCounts,
                   finished_at: Optional[float] = None,
                   lookup: Optional[Callable[[str], Optional[list[Arrival]]]] = None) -> RehearsalResults:
    """The run's results, judged by the gates. ``lookup`` (default: ask the sink service) finds
    the service's own records of an address still owed an email."""
    finished_at = time.time() if finished_at is None else finished_at
    stream, gap, behind = _streams(rehearsal)
    errors: list[HarnessError] = []
    if gap:
        errors.append(HarnessError(kind="stream_gap", count=gap, detail=(
            f"the event stream skipped {gap} message(s) the sink service no longer held when asked: the "
            "harness never saw them (raise the service's --max-messages)")))
    if behind:
        errors.append(HarnessError(kind="stream_behind", count=behind, detail=(
            f"{behind} message(s) the sink service had captured never reached the harness's stream within "
            f"{CATCH_UP_SECONDS:g} s of the end")))
    if rehearsal.ledger.unparsed:
        errors.append(HarnessError(kind="unparsed", count=rehearsal.ledger.unparsed, detail=(
            f"{rehearsal.ledger.unparsed} captured message(s) had no capture time or no recipient the ledger "
            "could read")))
    if rehearsal.harness_flow_errors:
        count = sum(rehearsal.harness_flow_errors.values())
        first = next(iter(sorted(rehearsal.harness_samples.items())), ("", ""))
        errors.append(HarnessError(kind="flow_harness_error", count=count, detail=(
            f"{count} flow run(s) stopped on an error of the harness or of the flow's own criteria, not a verdict "
            f"on the app (they are left out of the failure rate): {first[0]}: {first[1][:300]}")))
    foreign = (lambda address: _foreign(rehearsal, address)) if rehearsal.missing_workers else None
    if foreign is not None:
        strays = rehearsal.ledger.count_foreign(foreign)
        errors.append(HarnessError(kind="unreported_worker", count=len(rehearsal.missing_workers), detail=(
            f"worker(s) {', '.join(rehearsal.missing_workers)} never sent their ledger: their flows are not in "
            f"these numbers, and {strays} email(s) to addresses of theirs are left out")))
    restarts = stream.restarts if stream is not None else 0
    # When the sink service restarted, its records begin again: what the old run captured and
    # never streamed is gone. An email triggered before the current run started cannot be told
    # lost from caught in the gap; one triggered after it was sent to a service that was up.
    restarted_at = max(rehearsal.sink_started.values()) if restarts and rehearsal.sink_started else None
    if restarts:
        since = (f" (the current one started at {time.strftime('%H:%M:%S', time.gmtime(restarted_at))} UTC)"
                 if restarted_at is not None else "")
        errors.append(HarnessError(kind="sink_restart", count=restarts, detail=(
            f"the sink service restarted during the run{since}, seen {restarts} time(s) by the harness's "
            "stream(s): mail it captured before the restart and never streamed is gone; emails triggered "
            "before the restart that never came are unverified, not lost")))
    gaps = bool(gap or behind or rehearsal.ledger.unparsed or restarts)

    def before_restart(address: str) -> bool:
        if not restarts:
            return False
        trigger = rehearsal.ledger.owed_trigger(address)
        return restarted_at is None or trigger is None or trigger < restarted_at

    # Emails still owed: ask the sink service's own records before calling any of them lost.
    lookup = lookup if lookup is not None else (rehearsal.lookup if rehearsal.options.sink_url else None)
    sink_complete = all(s.evicted == 0 and s.cleared == 0 for s in rehearsal.sinks.values())
    owed = rehearsal.ledger.lost_addresses()
    unverified: set[str] = set()
    sink_notes: dict[str, str] = {}
    recovered = 0
    limit = LOOKUPS if gaps else LOOKUPS_WITHOUT_GAPS
    for index, address in enumerate(owed):
        found = lookup(address) if lookup is not None and index < limit else None
        if found is None:
            if gaps:
                unverified.add(address)
                sink_notes[address] = "not looked up at the sink service, while the harness had gaps"
            else:
                sink_notes[address] = ("the harness saw every message the sink service captured (no stream "
                                       "gap); not looked up one by one")
            continue
        recovered += rehearsal.ledger.recover(address, found)
        if not rehearsal.ledger.owes(address):
            continue
        if before_restart(address):
            unverified.add(address)
            sink_notes[address] = ("triggered before the sink service restarted, and not in the records of its "
                                   "new run: cannot tell an app loss from mail lost with the old run")
        elif found:
            subjects = ", ".join(sorted({a.subject for a in found}))[:200]
            sink_notes[address] = f"the sink service holds {len(found)} other message(s) to it: {subjects}"
        elif gaps and not sink_complete:
            unverified.add(address)
            sink_notes[address] = ("not at the sink service, which dropped messages (evicted or cleared): "
                                   "cannot tell an app loss from a harness gap")
        else:
            sink_notes[address] = "the sink service captured no message to this address (checked)"
    if recovered:
        rehearsal.notes.append(f"{recovered} expected email(s) the stream had not delivered were found in the sink "
                               "service's records and counted as delivered")
    ledger = rehearsal.ledger.reconcile(unverified=unverified, sink_notes=sink_notes, foreign=foreign)
    unverified_count = sum(row.unverified for row in ledger.flows.values())
    if unverified_count:
        errors.append(HarnessError(kind="unverified", count=unverified_count, detail=(
            f"{unverified_count} expected email(s) never reached the harness, which had gaps of its own: "
            "they may have been sent; not counted as lost")))

    options = rehearsal.options
    results = RehearsalResults(
        run=RunInfo(started_at=rehearsal.started_at if rehearsal.started_at is not None else finished_at,
                    finished_at=finished_at, host=options.host,
                    mode="distributed" if rehearsal.role == "master" else "local",
                    workers_expected=rehearsal.workers_expected, missing_workers=list(rehearsal.missing_workers),
                    grace=options.grace, chaos_profile=options.chaos_profile, chaos_seed=options.chaos_seed,
                    users=options.users, spawn_rate=options.spawn_rate, run_time=options.run_time,
                    shape=options.shape, peak_users=rehearsal.peak_users, flows_source=options.flows_source,
                    peak_rate=_peak_rate(options), arrivals=rehearsal.arrival_counts()),
        ledger=ledger, latency=rehearsal.ledger.latency_histograms().summary(), http=http, locust=locust,
        flows=FlowRuns(runs=dict(sorted(rehearsal.flow_runs.items())),
                       failures=dict(sorted(rehearsal.flow_failures.items())),
                       interrupted=dict(sorted(rehearsal.flow_interrupted.items())),
                       harness_errors=dict(sorted(rehearsal.harness_flow_errors.items())),
                       failure_samples=dict(sorted(rehearsal.failure_samples.items())),
                       failure_kinds={k: dict(sorted(v.items())) for k, v in sorted(rehearsal.failure_kinds.items())},
                       check_failures={k: dict(sorted(v.items())) for k, v in sorted(rehearsal.check_failures.items())
                                       if v}),
        timeline=rehearsal.ledger.timeline(), workers=dict(sorted(rehearsal.workers.items())),
        harness=Harness(stream=stream, sinks=[rehearsal.sinks[url] for url in sorted(rehearsal.sinks)],
                        notes=list(rehearsal.notes), errors=errors, recovered=recovered),
    )
    return results.judge(list(options.gates))


def _peak_rate(options: Any) -> Optional[float]:
    if not options.shape_config:
        return None
    from mailproof.load.shapes_config import ShapeConfig

    return ShapeConfig.decode(options.shape_config).peak_rate


def request_counts(environment: Any) -> dict[str, RequestCounts]:
    """HTTP requests (Locust's rows other than MAIL, FLOW and CHECK events) and all of Locust's requests."""
    entries = environment.stats.entries.items()
    events = ("MAIL", "FLOW", "CHECK")
    http = RequestCounts(requests=sum(e.num_requests for (_, method), e in entries if method not in events),
                         failures=sum(e.num_failures for (_, method), e in entries if method not in events))
    total = environment.stats.total
    return {"http": http, "locust": RequestCounts(requests=total.num_requests, failures=total.num_failures)}
