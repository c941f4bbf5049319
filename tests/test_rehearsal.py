"""The rehearsal end to end: sink service, demo app and Locust as real subprocesses.

Locust monkey-patches whatever imports it, so it only ever runs in a child process here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rehearse(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "rehearsal"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.rehearse", "--duration", "8", "--peak-users", "4",
         "--grace", "5", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    results_file = out / "results.json"
    assert results_file.exists(), f"no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(results_file.read_text())


def assert_reconciles(results: dict) -> None:
    flows = results["ledger"]["flows"]
    assert flows, "no flow ran"
    for name, row in flows.items():
        assert row["expected"] == row["delivered"] + row["lost"], (name, row)
        assert row["late"] <= row["delivered"], (name, row)
    assert sum(row["expected"] for row in flows.values()) > 0


def test_short_rehearsal_passes_and_every_email_is_accounted_for(tmp_path):
    proc, results = rehearse(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["passed"] is True
    assert_reconciles(results)
    assert all(row["lost"] == 0 and row["duplicated"] == 0 for row in results["ledger"]["flows"].values())
    # Exact percentiles exist for each flow that waited for mail, in order.
    for name, lat in results["latency"].items():
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (name, lat)
    assert "RESULT: PASS" in proc.stdout
    assert (tmp_path / "rehearsal" / "locust_stats.csv").exists()
    assert (tmp_path / "rehearsal" / "locust.html").exists()


def test_an_impossible_gate_fails_the_run_and_says_by_how_much(tmp_path):
    proc, results = rehearse(tmp_path, "--gate", "signup_confirms_account:p50<1ms",
                             "--flow-mix", "signup_confirms_account=1")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["passed"] is False
    failed = [g for g in results["gates"] if not g["passed"]]
    assert [g["gate"] for g in failed] == ["signup_confirms_account:p50<1ms"]
    assert "missed by" in failed[0]["detail"]
    assert "[FAIL] signup_confirms_account:p50<1ms" in proc.stdout
    assert_reconciles(results)


def test_distributed_run_merges_the_workers_ledgers(tmp_path):
    proc, results = rehearse(tmp_path, "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = results["workers"]
    assert len(workers) == 2, workers
    merged = results["ledger"]["flows"]
    for name, row in merged.items():
        for key in ("expected", "delivered", "lost", "duplicated", "late"):
            assert row[key] == sum(w.get(name, {}).get(key, 0) for w in workers.values()), (name, key)
    assert_reconciles(results)
    assert results["ledger"]["unexpected"] == 0  # each worker's mail is not "unexpected" to the master
