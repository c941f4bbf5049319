"""The rehearsal report: one self-contained HTML page from a rehearsal's results.json.

The results are read only through ``mailproof.load.results.RehearsalResults`` (docs/results.md):
a file of another schema version, or a malformed one, stops with an error naming the file and
the field.

    python -m mailproof.report.rehearsal reports/rehearsal/results.json -o reports/rehearsal/report.html
    python -m mailproof.report.rehearsal RESULTS.json --previous PREV.json -o OUT.html
    python -m mailproof.report.rehearsal RESULTS.json --keep-previous -o OUT.html

It shows the verdict of every SLO gate; per flow the emails expected, delivered, late, lost and
duplicated; the exact latency percentiles (p50/p90/p95/p99/max, from the merged HdrHistograms);
delivery latency over time and sends vs deliveries per second with the load shape (users, read
from Locust's ``locust_stats_history.csv`` beside the results) overlaid; the run (local or
distributed, workers, chaos profile and seed); the faults the sink service held, with how often
each fired and acted; the harness's own counters (stream gaps, reconnects, service restarts,
evictions) and the sink service's; and the slowest emails (with hop timings when present).

Compared with a previous run (``--previous``), every number shows its change. ``--keep-previous``
does the bookkeeping across runs in the results' folder: the results a report was last built
from are kept as ``reported.json``; when a new run has replaced results.json, that copy becomes
``previous.json`` and the report compares against it. Rebuilding the same run's report is
idempotent (it keeps comparing against the same previous run). A kept previous run of another
schema version is not compared with (a warning says why); an explicit ``--previous`` must read.

Plots are matplotlib figures inlined as SVG: the page loads nothing and runs no script.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import jinja2

from mailproof.load.gates import LATENCY, Gate, GateError
from mailproof.load.results import RehearsalResults, ResultsError

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "rehearsal.html.j2"
PERCENTILES = ("p50", "p90", "p95", "p99", "max")
COUNTS = ("expected", "delivered", "late", "lost", "unverified", "duplicated", "unexpected", "interrupted")
BAD_COUNTS = ("late", "lost", "unverified", "duplicated", "unexpected")  # more is worse; interrupted is not
LOST_SHOWN = 500  # lost emails listed in the page (all of them are in results.json)
SLOWEST = 10
STREAM_COUNTERS = (("received", "messages the stream delivered"), ("missing", "missing (no longer retained: gaps)"),
                   ("duplicates", "duplicate stream lines (skipped)"), ("reconnects", "stream reconnects"),
                   ("restarts", "sink service restarts seen"), ("evicted", "evicted from the harness's store"))
# Colours for flows, stable across both plots (matplotlib's tab10).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


# -- inputs ----------------------------------------------------------------------------------------


def load_results(path: Path) -> RehearsalResults:
    """The results at ``path``, read through the schema (mailproof.load.results)."""
    try:
        return RehearsalResults.read(path)
    except ResultsError as exc:
        raise SystemExit(f"rehearsal report: {exc}") from None


def load_users(history_csv: Optional[Path]) -> list[tuple[float, int]]:
    """(timestamp, users) per second from Locust's stats history (its Aggregated rows)."""
    if history_csv is None or not Path(history_csv).is_file():
        return []
    users = []
    with open(history_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("Name") not in ("Aggregated", None):
                continue
            try:
                users.append((float(row["Timestamp"]), int(float(row["User Count"]))))
            except (KeyError, TypeError, ValueError):
                continue
    return sorted(users)


# -- numbers ---------------------------------------------------------------------------------------


def _delta(current: Optional[float], previous: Optional[float], *, higher_is_worse: bool = True,
           scale: float = 1.0, unit: str = "", digits: int = 0) -> Optional[dict]:
    """A change to show next to a number: text, and whether it got better or worse."""
    if current is None or previous is None:
        return None
    change = (current - previous) * scale
    if abs(change) < 0.5 * 10 ** -digits:
        return None  # unchanged: nothing to point out
    worse = change > 0 if higher_is_worse else change < 0
    text = f"{change:+.{digits}f}{unit}"
    if previous:
        text += f" ({(current - previous) / abs(previous) * 100:+.0f}%)"
    return {"text": text, "kind": "worse" if worse else "better"}


def _fmt_hops(hops: Optional[dict]) -> str:
    if not hops:
        return ""
    return " → ".join(f"{name} {value * 1000:.0f} ms" for name, value in hops.items())


def _gate_threshold(text: str) -> Optional[Gate]:
    try:
        gate = Gate.parse(text)
    except GateError:
        return None
    return gate if gate.metric in LATENCY else None


def _ledger_rows(results: RehearsalResults, previous: Optional[RehearsalResults], names: list[str],
                 colors: dict[str, str]) -> tuple[list[dict], dict[str, int]]:
    rows, totals = [], {key: 0 for key in COUNTS}
    runs, failures = results.flows.runs, results.flows.failures
    for name in names:
        row = results.ledger.flows.get(name)
        prev_row = previous.ledger.flows.get(name) if previous else None
        cells = []
        for key in COUNTS:
            value = getattr(row, key) if row else None
            totals[key] += value or 0
            worse_when_higher = key in BAD_COUNTS
            cells.append({"key": key, "value": value, "bad": worse_when_higher and (value or 0) > 0,
                          "delta": _delta(value, getattr(prev_row, key) if prev_row else None)
                          if previous and worse_when_higher else None})
        rows.append({"flow": name, "color": colors[name], "cells": cells,
                     "negative_checks": row.negative_checks if row else 0,
                     "unawaited": row.unawaited if row else 0,
                     "runs": runs.get(name, 0), "failures": failures.get(name, 0),
                     "interrupted_runs": results.flows.interrupted.get(name, 0),
                     "failure_kinds": ", ".join(f"{k} ×{n}" for k, n in results.flows.failure_kinds.get(name, {}).items()),
                     "check_failures": sum(results.flows.check_failures.get(name, {}).values()),
                     "check_failure_kinds": ", ".join(
                         f"{k} ×{n}" for k, n in results.flows.check_failures.get(name, {}).items()),
                     "failures_delta": _delta(failures.get(name, 0), previous.flows.failures.get(name, 0))
                     if previous else None})
    return rows, totals


def _latency_rows(results: RehearsalResults, previous: Optional[RehearsalResults], names: list[str],
                  colors: dict[str, str]) -> list[dict]:
    rows = []
    for name in names:
        lat = results.latency.get(name)
        prev_lat = previous.latency.get(name) if previous else None
        rows.append({
            "flow": name, "color": colors[name], "count": lat.count if lat else 0,
            "cells": [{"key": p, "ms": getattr(lat, p) * 1000 if lat else None,
                       "delta": _delta(getattr(lat, p) if lat else None, getattr(prev_lat, p) if prev_lat else None,
                                       scale=1000, unit=" ms")} for p in PERCENTILES],
            "mean_ms": lat.mean * 1000 if lat else None,
        })
    return rows


def _gate_rows(results: RehearsalResults, previous: Optional[RehearsalResults]) -> list[dict]:
    prev_gates = {(g.gate, g.subject): g for g in previous.gates} if previous else {}
    gates = []
    for g in results.gates:
        was = prev_gates.get((g.gate, g.subject))
        gates.append({"gate": g.gate, "subject": g.subject, "passed": g.passed, "detail": g.detail,
                      "measured": _measured(g.gate, g.actual),
                      "previous": None if not previous else ("new gate" if was is None
                                                             else ("was PASS" if was.passed else "was FAIL"))})
    gates.sort(key=lambda g: g["passed"])  # failed gates first
    return gates


def _stream_rows(results: RehearsalResults, previous: Optional[RehearsalResults]) -> list[dict]:
    """The harness's view of the sink's event stream, one row per counter (more is worse for all)."""
    stream = results.harness.stream
    if stream is None:
        return []
    before = previous.harness.stream if previous else None
    rows = []
    for key, label in STREAM_COUNTERS:
        value = getattr(stream, key)
        rows.append({"key": key, "label": label, "value": value, "bad": key != "received" and value > 0,
                     "delta": _delta(value, getattr(before, key)) if before is not None and key != "received"
                     else None})
    return rows


def _lost_rows(results: RehearsalResults, t0: Optional[float]) -> list[dict]:
    rows = []
    for email in results.ledger.lost_emails[:LOST_SHOWN]:
        reply = email.reply
        rows.append({"flow": email.flow, "address": email.address, "when": _when(email.trigger),
                     "offset": email.trigger - t0 if email.trigger is not None and t0 is not None else None,
                     "within": email.within, "run": email.run,
                     "reply": f"{reply.method} {reply.path} → HTTP {reply.status}" if reply else "",
                     "reply_body": reply.body if reply else "", "sink": email.sink})
    return rows


def _stray_rows(results: RehearsalResults, t0: Optional[float]) -> list[dict]:
    return [{"address": s.address, "flow": s.flow or "", "subject": s.subject, "why": s.why,
             "offset": s.t - t0 if t0 is not None else None} for s in results.ledger.unexpected_emails]


def _fault_rows(results: RehearsalResults) -> list[dict]:
    rows = []
    for url, rule in results.harness.faults:
        rows.append({"sink": url, "name": rule.name or f"rule {rule.id}", "stage": rule.stage,
                     "scope": rule.scope or "", "match": ", ".join(f"{k}={v}" for k, v in rule.match.items()),
                     "action": _cell(rule.action), "fired": rule.fired, "acted": rule.acted})
    return rows


def _traffic_span(results: RehearsalResults, users: list[tuple[float, int]]) -> tuple[Optional[float], Optional[float]]:
    """First and last moment anything happened: the load's start, sends, deliveries, samples, users."""
    timeline = results.timeline
    stamps = [s.t for s in timeline.samples] + [t for t, _ in timeline.sends] + \
             [t for t, _ in timeline.deliveries] + [t for t, _ in users]
    if not stamps:
        return None, None
    return min(stamps + [results.run.started_at]), max(stamps)


def build_context(results: RehearsalResults, previous: Optional[RehearsalResults] = None,
                  users: Iterable[tuple[float, int]] = (), source: str = "", previous_source: str = "") -> dict:
    users = list(users)
    names = sorted(set(results.ledger.flows) | set(results.latency) | set(results.flows.runs))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    ledger_rows, totals = _ledger_rows(results, previous, names, colors)
    gates = _gate_rows(results, previous)

    timeline = results.timeline
    t0, t1 = _traffic_span(results, users)
    slowest = []
    for s in sorted(timeline.samples, key=lambda s: s.latency, reverse=True)[:SLOWEST]:
        slowest.append({"flow": s.flow, "latency": s.latency, "address": s.address,
                        "offset": s.t - t0 if t0 is not None else None, "hops_text": _fmt_hops(s.hops),
                        "color": colors.get(s.flow, "#555")})

    http, ledger, run = results.http, results.ledger, results.run
    thresholds = [(gate, g.subject) for g in results.gates if (gate := _gate_threshold(g.gate)) is not None]

    from mailproof.report import plots as rehearsal_plots  # matplotlib is imported only when a report is drawn

    return {
        "title": "mailproof rehearsal report",
        "passed": results.passed,
        "source": source,
        "previous_source": previous_source if previous else "",
        "previous_started": _when(previous.run.started_at) if previous else "",
        "started": _when(run.started_at),
        "duration": (t1 - t0) if t0 is not None and t1 is not None else None,
        "peak_users": max((u for _, u in users), default=None) or (results.run.peak_users or None),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "lost_emails": _lost_rows(results, t0),
        "lost_total": len(results.ledger.lost_emails),
        "strays": _stray_rows(results, t0),
        "duplicated_addresses": ledger.duplicated_addresses,
        "harness_errors": results.harness.errors,
        "harness_error_count": results.harness.error_count,
        "recovered": results.harness.recovered,
        "run": {"mode": run.mode, "host": run.host, "workers_expected": run.workers_expected,
                "users": run.users, "spawn_rate": run.spawn_rate, "run_time": run.run_time, "shape": run.shape,
                "peak_users_run": run.peak_users, "flows_source": run.flows_source,
                "workers_reported": len(results.workers), "missing_workers": run.missing_workers,
                "grace": run.grace, "chaos_profile": run.chaos_profile, "chaos_seed": run.chaos_seed,
                "started": _when(run.started_at), "finished": _when(run.finished_at),
                "wall": run.finished_at - run.started_at},
        "gates": gates,
        "gates_failed": sum(1 for g in gates if not g["passed"]),
        "ledger_rows": ledger_rows,
        "totals": totals,
        "unexpected": ledger.unexpected,
        "unexpected_delta": _delta(ledger.unexpected, previous.ledger.unexpected) if previous else None,
        "unexpected_addresses": ledger.unexpected_addresses,
        "handed_out": ledger.handed_out,
        "latency_rows": _latency_rows(results, previous, names, colors),
        "percentiles": PERCENTILES,
        "http": {"requests": http.requests, "failures": http.failures, "error_rate": http.error_rate,
                 "error_rate_delta": _delta(http.error_rate, previous.http.error_rate if previous.http.requests else None,
                                            scale=100, unit=" pt", digits=2) if previous else None},
        "locust": results.locust,
        "workers": results.workers,
        "stream_counters": STREAM_COUNTERS,
        "failure_samples": results.flows.failure_samples,
        "counts": COUNTS,
        "faults": _fault_rows(results),
        "faults_many_sinks": len(results.harness.sinks) > 1,
        "stream": _stream_rows(results, previous),
        "sinks": results.harness.sinks,
        "notes": results.harness.notes,
        "slowest": slowest,
        "slowest_addresses": any(s["address"] for s in slowest),
        "slowest_hops": any(s["hops_text"] for s in slowest),
        "latency_svg": rehearsal_plots.latency_over_time(timeline.samples, t0, colors, thresholds),
        "throughput_svg": rehearsal_plots.throughput(timeline.sends, timeline.deliveries, users, t0),
        "arrivals": results.run.arrivals,
        "arrivals_svg": (rehearsal_plots.arrivals(results.run.arrivals.offered, results.run.arrivals.started,
                                                  results.run.arrivals.completed)
                         if results.run.arrivals is not None else None),
        "sample_count": len(timeline.samples),
    }


def _measured(text: str, actual: Optional[float]) -> str:
    """A gate's measured value in its own unit: latency in ms, error rate in %, counts as is."""
    if actual is None:
        return "—"
    try:
        metric = Gate.parse(text).metric
    except GateError:
        return f"{actual:g}"
    if metric in LATENCY:
        return f"{_fmt_ms(actual * 1000)} ms"
    if metric == "error_rate":
        return f"{actual * 100:.2f} %"
    return f"{actual:g}"


def _when(stamp: Optional[float]) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# -- rendering -------------------------------------------------------------------------------------


def _fmt_ms(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def environment(template_dir: Path = TEMPLATES) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["ms"] = _fmt_ms
    env.filters["secs"] = _fmt_seconds
    env.filters["num"] = lambda v: "—" if v is None else f"{v:,}"
    return env


def render(results: RehearsalResults, previous: Optional[RehearsalResults] = None,
           users: Iterable[tuple[float, int]] = (),
           source: str = "", previous_source: str = "", template_dir: Path = TEMPLATES) -> str:
    context = build_context(results, previous, users, source, previous_source)
    return environment(template_dir).get_template(TEMPLATE).render(**context)


def keep_previous(results_path: Path) -> Optional[Path]:
    """Rotate ``reported.json`` -> ``previous.json`` when results.json holds a new run; return
    the previous run's file to compare with (None on the first report)."""
    folder = results_path.parent
    reported, previous = folder / "reported.json", folder / "previous.json"
    current = results_path.read_bytes()
    if reported.is_file() and reported.read_bytes() != current:
        os.replace(reported, previous)
    if not reported.is_file():
        shutil.copyfile(results_path, reported)
    return previous if previous.is_file() else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailproof.report.rehearsal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.json written by a rehearsal")
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--previous", type=Path, default=None, help="a previous run's results.json to compare with")
    compare.add_argument("--keep-previous", action="store_true",
                         help="compare with the run before this one, kept as previous.json beside RESULTS")
    parser.add_argument("--locust-history", type=Path, default=None,
                        help="Locust's stats history CSV (default: locust_stats_history.csv beside RESULTS)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="HTML file (default: report.html beside RESULTS)")
    args = parser.parse_args(argv)

    results = load_results(args.results)
    if args.keep_previous:
        previous_path = keep_previous(args.results)
        try:
            previous = RehearsalResults.read(previous_path) if previous_path else None
        except ResultsError as exc:  # e.g. kept from before an upgrade: report this run all the same
            print(f"rehearsal report: not comparing with the previous run: {exc}", file=sys.stderr)
            previous_path, previous = None, None
    else:
        previous_path = args.previous
        previous = load_results(previous_path) if previous_path else None
    history = args.locust_history or args.results.parent / "locust_stats_history.csv"
    output = args.output or args.results.parent / "report.html"
    page = render(results, previous, load_users(history), source=str(args.results),
                  previous_source=str(previous_path or ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    verdict = "PASS" if results.passed else "FAIL"
    print(f"rehearsal report ({verdict}): {output}" + (f" (compared with {previous_path})" if previous else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
