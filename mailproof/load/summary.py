"""The console summary a rehearsal prints when it ends: the ledger, the percentiles, the gates."""

from __future__ import annotations

from mailproof.load.results import RehearsalResults


def _seconds(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def render_summary(results: RehearsalResults) -> str:
    lines = ["", "mailproof rehearsal: every email accounted for", ""]
    lines.append(f"{'flow':34} {'expected':>8} {'delivered':>9} {'late':>5} {'lost':>5} {'dup':>4}   "
                 f"{'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, row in results.ledger.flows.items():
        lat = results.latency.get(name)
        p50, p95, p99, top = (_seconds(getattr(lat, key)) if lat else "-" for key in ("p50", "p95", "p99", "max"))
        lines.append(f"{name:34} {row.expected:>8} {row.delivered:>9} {row.late:>5} {row.lost:>5} "
                     f"{row.duplicated:>4}   {p50:>7} {p95:>7} {p99:>7} {top:>7}")
    lines.append(f"unexpected mails: {results.ledger.unexpected}   "
                 f"HTTP: {results.http.requests} requests, {results.http.failures} failed")
    run = results.run
    if run.chaos_profile:
        seed = f" (seed {run.chaos_seed})" if run.chaos_seed is not None else ""
        lines.append(f"chaos profile: {run.chaos_profile}{seed}")
    for url, rule in results.harness.faults:
        lines.append(f"  fault {rule.name or rule.stage}: fired {rule.fired}, acted {rule.acted}")
    stream = results.harness.stream
    if stream is not None:
        lines.append(f"stream: {stream.received} received, {stream.missing} missing, {stream.duplicates} duplicates, "
                     f"{stream.reconnects} reconnects, {stream.restarts} restarts, {stream.evicted} evicted")
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
