"""The console summary a rehearsal prints when it ends: the ledger, the flows, the lost emails, the gates."""

from __future__ import annotations

from datetime import datetime, timezone

from mailproof.load.results import RehearsalResults

LOST_SHOWN = 20
STRAYS_SHOWN = 10
SAMPLE_CHARS = 600


def _seconds(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _when(stamp: object) -> str:
    if not isinstance(stamp, float):
        return "?"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _indent(text: str, chars: int = SAMPLE_CHARS) -> str:
    text = text if len(text) <= chars else text[:chars] + " ..."
    return "\n".join("      " + line for line in text.splitlines()[:12])


def render_summary(results: RehearsalResults) -> str:
    lines = ["", "mailproof rehearsal: every email accounted for", ""]
    run = results.run
    if run.shape:
        rate = f"{run.peak_rate:g} flows/s" if run.peak_rate else "its peak"
        load = f"shape {run.shape} to {rate} over {run.run_time or 0:g} s, at most {run.users} at once; "
    elif run.users is not None or run.run_time is not None:
        load = (f"{run.users if run.users is not None else 1} users"
                + (f" spawned at {run.spawn_rate:g}/s" if run.spawn_rate else "")
                + (f" for {run.run_time:g} s" if run.run_time else "") + "; ")
    else:
        load = ""
    lines.append(f"load: {load}Locust ran at most {run.peak_users} users"
                 + (f" on {run.workers_expected} workers" if run.mode == "distributed" else ""))
    arrivals = run.arrivals
    if arrivals is not None:
        lag99, lag_max = arrivals.lag_percentile(99), arrivals.lag_max
        lines.append(f"arrivals: {arrivals.total_offered} offered, {arrivals.total_started} started, "
                     f"{arrivals.total_completed} completed; start lag p99 {_seconds(lag99)}, max {_seconds(lag_max)}")
        if arrivals.cap_hits or arrivals.not_started:
            lines.append(f"  all {arrivals.max_users} users were busy: {arrivals.cap_hits} arrival(s) started late, "
                         f"{arrivals.not_started} never started; the offered load was not held (raise --max-users)")
    lines.append("")
    lines.append(f"{'flow':34} {'expected':>8} {'delivered':>9} {'late':>5} {'lost':>5} {'dup':>4} {'unexp':>5}"
                 f" {'intr':>5}   {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, row in results.ledger.flows.items():
        lat = results.latency.get(name)
        p50, p95, p99, top = (_seconds(getattr(lat, key)) if lat else "-" for key in ("p50", "p95", "p99", "max"))
        lines.append(f"{name:34} {row.expected:>8} {row.delivered:>9} {row.late:>5} {row.lost:>5} "
                     f"{row.duplicated:>4} {row.unexpected:>5} {row.interrupted:>5}   "
                     f"{p50:>7} {p95:>7} {p99:>7} {top:>7}")
        extra = []
        if row.unverified:
            extra.append(f"{row.unverified} unverified (harness gaps, not counted lost)")
        if row.unawaited:
            extra.append(f"{row.unawaited} mail(s) to failed runs that never awaited them")
        if extra:
            lines.append(f"{'':34} " + "; ".join(extra))
    lines.append(f"unexpected mails: {results.ledger.unexpected}   "
                 f"HTTP: {results.http.requests} requests, {results.http.failures} failed")

    flows = results.flows
    lines.append("")
    lines.append("flow runs:")
    for name, runs in flows.runs.items():
        failed, stopped = flows.failures.get(name, 0), flows.interrupted.get(name, 0)
        text = f"  {name:32} {runs} run(s), {failed} failed"
        if stopped:
            text += f", {stopped} interrupted by the end of the run"
        if flows.harness_errors.get(name):
            text += f", {flows.harness_errors[name]} stopped by a harness error (no verdict)"
        kinds = flows.failure_kinds.get(name)
        if kinds:
            text += " (" + ", ".join(f"{kind} x{count}" for kind, count in kinds.items()) + ")"
        lines.append(text)
        if failed and name in flows.failure_samples:
            lines.append("    first failure:")
            lines.append(_indent(flows.failure_samples[name]))

    lost = results.ledger.lost_emails
    if lost:
        lines.append("")
        lines.append(f"lost emails ({len(lost)}; every one is in results.json and the report):")
        for email in lost[:LOST_SHOWN]:
            reply = email.reply
            answer = (f"the app answered {reply.method} {reply.path} with HTTP {reply.status}"
                      + (f" {reply.body[:80]!r}" if reply.body else "") if reply else "no answer to the triggering "
                      "request is known")
            lines.append(f"  {email.flow}: {email.address}, triggered {_when(email.trigger)} UTC "
                         f"(run {email.run}); {answer}; sink: {email.sink}")
        if len(lost) > LOST_SHOWN:
            lines.append(f"  ... and {len(lost) - LOST_SHOWN} more")
    strays = results.ledger.unexpected_emails
    if strays:
        lines.append("")
        lines.append(f"unexpected emails ({results.ledger.unexpected}):")
        for stray in strays[:STRAYS_SHOWN]:
            lines.append(f"  {stray.address} at {_when(stray.t)} UTC, subject {stray.subject!r}"
                         + (f" (flow {stray.flow})" if stray.flow else "") + f": {stray.why}")
        if results.ledger.unexpected > STRAYS_SHOWN:
            lines.append(f"  ... and {results.ledger.unexpected - STRAYS_SHOWN} more")
    if results.ledger.duplicated_addresses:
        lines.append("")
        lines.append("duplicated (extra copies): " + ", ".join(
            f"{address} x{count}" for address, count in list(results.ledger.duplicated_addresses.items())[:10]))

    lines.append("")
    if run.chaos_profile:
        seed = f" (seed {run.chaos_seed})" if run.chaos_seed is not None else ""
        lines.append(f"chaos profile: {run.chaos_profile}{seed}")
    for url, rule in results.harness.faults:
        lines.append(f"  fault {rule.name or rule.stage}: fired {rule.fired}, acted {rule.acted}")
    stream = results.harness.stream
    if stream is not None:
        lines.append(f"stream: {stream.received} received, {stream.missing} missing, {stream.duplicates} duplicates, "
                     f"{stream.reconnects} reconnects, {stream.restarts} restarts, {stream.evicted} evicted")
    for sink in results.harness.sinks:
        if sink.evicted or sink.over_cap or sink.cleared:
            lines.append(f"sink service {sink.url}: {sink.evicted} evicted, {sink.over_cap} kept past its bound, "
                         f"{sink.cleared} cleared")
    for error in results.harness.errors:
        lines.append(f"HARNESS ERROR ({error.kind}): {error.detail}")
    if run.missing_workers:
        lines.append(f"workers that never reported: {', '.join(run.missing_workers)}")
    for note in results.harness.notes:
        lines.append(f"note: {note}")
    lines.append("")
    for verdict in results.gates:
        lines.append(f"  [{'PASS' if verdict.passed else 'FAIL'}] {verdict.gate:32} {verdict.detail}")
    lines.append("")
    lines.append("RESULT: " + ("PASS" if results.passed else "FAIL (see the gates above)"))
    return "\n".join(lines)
