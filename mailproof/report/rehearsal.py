"""The rehearsal report: one self-contained HTML page from a rehearsal's results.json.

    python -m mailproof.report.rehearsal reports/rehearsal/results.json -o reports/rehearsal/report.html
    python -m mailproof.report.rehearsal RESULTS.json --previous PREV.json -o OUT.html
    python -m mailproof.report.rehearsal RESULTS.json --keep-previous -o OUT.html

It shows the verdict of every SLO gate; per flow the emails expected, delivered, late, lost and
duplicated; the exact latency percentiles (p50/p90/p95/p99/max, from the merged HdrHistograms);
delivery latency over time and sends vs deliveries per second with the load shape (users, read
from Locust's ``locust_stats_history.csv`` beside the results) overlaid; the faults injected,
when the results carry a "faults" key; and the slowest emails (with hop timings when present).

Compared with a previous run (``--previous``), every number shows its change. ``--keep-previous``
does the bookkeeping across runs in the results' folder: the results a report was last built
from are kept as ``reported.json``; when a new run has replaced results.json, that copy becomes
``previous.json`` and the report compares against it. Rebuilding the same run's report is
idempotent (it keeps comparing against the same previous run).

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

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "rehearsal.html.j2"
PERCENTILES = ("p50", "p90", "p95", "p99", "max")
COUNTS = ("expected", "delivered", "late", "lost", "duplicated")
SLOWEST = 10
# Colours for flows, stable across both plots (matplotlib's tab10).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


# -- inputs ----------------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"rehearsal report: cannot read results {path}: {exc}") from exc
    for key in ("ledger", "latency", "gates"):
        if key not in data:
            raise SystemExit(f"rehearsal report: {path} has no {key!r}: is it a rehearsal results.json?")
    return data


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


def _sample(raw: Any) -> Optional[dict]:
    """A timeline sample: [t, latency, flow] (plus, in later results, address and hops)."""
    if isinstance(raw, dict):
        t, latency = raw.get("time", raw.get("t")), raw.get("latency")
        flow, address, hops = raw.get("flow", "?"), raw.get("address"), raw.get("hops")
    elif isinstance(raw, (list, tuple)) and len(raw) >= 3:
        t, latency, flow = raw[0], raw[1], raw[2]
        extra = list(raw[3:])
        address = next((x for x in extra if isinstance(x, str)), None)
        hops = next((x for x in extra if isinstance(x, dict)), None)
    else:
        return None
    if not isinstance(t, (int, float)) or not isinstance(latency, (int, float)):
        return None
    return {"t": float(t), "latency": float(latency), "flow": str(flow), "address": address,
            "hops": hops if isinstance(hops, dict) else None}


def _fmt_hops(hops: Optional[dict]) -> str:
    if not hops:
        return ""
    parts = []
    for name, value in hops.items():
        parts.append(f"{name} {value * 1000:.0f} ms" if isinstance(value, (int, float)) else f"{name} {value}")
    return " → ".join(parts)


def _gate_threshold(text: str) -> Optional[Gate]:
    try:
        gate = Gate.parse(text)
    except GateError:
        return None
    return gate if gate.metric in LATENCY else None


def build_context(results: dict, previous: Optional[dict] = None, users: Iterable[tuple[float, int]] = (),
                  source: str = "", previous_source: str = "") -> dict:
    users = list(users)
    ledger = results["ledger"]
    latency = results.get("latency", {})
    prev_ledger = (previous or {}).get("ledger", {}).get("flows", {})
    prev_latency = (previous or {}).get("latency", {})
    flows_info = results.get("flows", {})
    runs, failures = flows_info.get("runs", {}), flows_info.get("failures", {})
    prev_flows = (previous or {}).get("flows", {})

    names = sorted(set(ledger.get("flows", {})) | set(latency) | set(runs))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    ledger_rows, latency_rows = [], []
    totals = {key: 0 for key in COUNTS}
    for name in names:
        row = ledger.get("flows", {}).get(name, {})
        prev_row = prev_ledger.get(name, {}) if previous else {}
        cells = []
        for key in COUNTS:
            value = row.get(key)
            totals[key] += value or 0
            bad = key in ("late", "lost", "duplicated") and (value or 0) > 0
            cells.append({"key": key, "value": value, "bad": bad,
                          "delta": _delta(value, prev_row.get(key), higher_is_worse=key in ("late", "lost", "duplicated"))
                          if previous and key in ("late", "lost", "duplicated") else None})
        ledger_rows.append({"flow": name, "color": colors[name], "cells": cells,
                            "negative_checks": row.get("negative_checks", 0),
                            "runs": runs.get(name, 0), "failures": failures.get(name, 0),
                            "failures_delta": _delta(failures.get(name, 0), prev_flows.get("failures", {}).get(name, 0))
                            if previous else None})
        lat, prev_lat = latency.get(name), prev_latency.get(name) if previous else None
        latency_rows.append({
            "flow": name, "color": colors[name], "count": (lat or {}).get("count", 0),
            "cells": [{"key": p, "ms": lat[p] * 1000 if lat and p in lat else None,
                       "delta": _delta(lat.get(p) if lat else None, prev_lat.get(p) if prev_lat else None,
                                       scale=1000, unit=" ms")} for p in PERCENTILES],
            "mean_ms": lat["mean"] * 1000 if lat and "mean" in lat else None,
        })

    prev_gates = {(g["gate"], g["subject"]): g for g in (previous or {}).get("gates", [])}
    gates = []
    for g in results.get("gates", []):
        was = prev_gates.get((g["gate"], g["subject"]))
        gates.append({**g, "measured": _measured(g["gate"], g.get("actual")),
                      "previous": None if not previous else ("new gate" if was is None
                                                             else ("was PASS" if was["passed"] else "was FAIL"))})
    gates.sort(key=lambda g: g["passed"])  # failed gates first

    timeline = results.get("timeline", {})
    samples = [s for s in (_sample(raw) for raw in timeline.get("samples", [])) if s is not None]
    stamps = [s["t"] for s in samples] + [t for t, _ in timeline.get("sends", [])] + \
             [t for t, _ in timeline.get("deliveries", [])] + [t for t, _ in users]
    t0 = min(stamps) if stamps else None
    t1 = max(stamps) if stamps else None
    slowest = sorted(samples, key=lambda s: s["latency"], reverse=True)[:SLOWEST]
    for s in slowest:
        s["offset"] = s["t"] - t0 if t0 is not None else None
        s["hops_text"] = _fmt_hops(s["hops"])
        s["color"] = colors.get(s["flow"], "#555")

    http = results.get("http", {})
    requests = http.get("requests", 0)
    error_rate = http.get("failures", 0) / requests if requests else 0.0
    prev_http = (previous or {}).get("http", {})
    prev_rate = prev_http.get("failures", 0) / prev_http["requests"] if prev_http.get("requests") else None

    thresholds = []
    for g in results.get("gates", []):
        gate = _gate_threshold(g["gate"])
        if gate is not None:
            thresholds.append((gate, g["subject"]))

    from mailproof.report import plots as rehearsal_plots  # matplotlib is imported only when a report is drawn

    return {
        "title": "mailproof rehearsal report",
        "passed": bool(results.get("passed")),
        "source": source,
        "previous_source": previous_source if previous else "",
        "previous_started": _when(_first_time(previous)) if previous else "",
        "started": _when(t0),
        "duration": (t1 - t0) if t0 is not None and t1 is not None else None,
        "peak_users": max((u for _, u in users), default=None),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "gates": gates,
        "gates_failed": sum(1 for g in gates if not g["passed"]),
        "ledger_rows": ledger_rows,
        "totals": totals,
        "unexpected": ledger.get("unexpected", 0),
        "unexpected_delta": _delta(ledger.get("unexpected", 0), (previous or {}).get("ledger", {}).get("unexpected"))
        if previous else None,
        "unexpected_addresses": ledger.get("unexpected_addresses", {}),
        "handed_out": ledger.get("handed_out"),
        "latency_rows": latency_rows,
        "percentiles": PERCENTILES,
        "http": {"requests": requests, "failures": http.get("failures", 0), "error_rate": error_rate,
                 "error_rate_delta": _delta(error_rate, prev_rate, scale=100, unit=" pt", digits=2)
                 if previous else None},
        "locust": results.get("locust", {}),
        "workers": results.get("workers", {}),
        "failure_samples": flows_info.get("failure_samples", {}),
        "faults": _faults(results.get("faults")),
        "slowest": slowest,
        "slowest_addresses": any(s["address"] for s in slowest),
        "slowest_hops": any(s["hops_text"] for s in slowest),
        "latency_svg": rehearsal_plots.latency_over_time(samples, t0, colors, thresholds),
        "throughput_svg": rehearsal_plots.throughput(timeline.get("sends", []), timeline.get("deliveries", []),
                                                     users, t0),
        "sample_count": len(samples),
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


def _first_time(results: Optional[dict]) -> Optional[float]:
    if not results:
        return None
    timeline = results.get("timeline", {})
    stamps = [s["t"] for s in (_sample(r) for r in timeline.get("samples", [])) if s] + \
             [t for t, _ in timeline.get("sends", [])]
    return min(stamps) if stamps else None


def _when(stamp: Optional[float]) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _faults(faults: Any) -> Optional[dict]:
    """Faults as a table whatever their shape: a mapping, a list of rules, or a profile string."""
    if faults in (None, "", [], {}):
        return None
    if isinstance(faults, str):
        return {"columns": ["fault profile"], "rows": [[faults]]}
    if isinstance(faults, dict):
        return {"columns": ["fault", "value"], "rows": [[str(k), _cell(v)] for k, v in faults.items()]}
    if isinstance(faults, list):
        columns: list[str] = []
        for item in faults:
            for key in (item.keys() if isinstance(item, dict) else ()):
                if key not in columns:
                    columns.append(str(key))
        if not columns:
            return {"columns": ["fault"], "rows": [[_cell(item)] for item in faults]}
        return {"columns": columns,
                "rows": [[_cell(item.get(c)) if isinstance(item, dict) else _cell(item) for c in columns] for item in faults]}
    return {"columns": ["fault"], "rows": [[_cell(faults)]]}


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


def render(results: dict, previous: Optional[dict] = None, users: Iterable[tuple[float, int]] = (),
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
    previous_path = keep_previous(args.results) if args.keep_previous else args.previous
    previous = load_results(previous_path) if previous_path else None
    history = args.locust_history or args.results.parent / "locust_stats_history.csv"
    output = args.output or args.results.parent / "report.html"
    page = render(results, previous, load_users(history), source=str(args.results),
                  previous_source=str(previous_path or ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    verdict = "PASS" if results.get("passed") else "FAIL"
    print(f"rehearsal report ({verdict}): {output}" + (f" (compared with {previous_path})" if previous else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
