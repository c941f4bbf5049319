"""Faults the harness survives, in real short rehearsals of the demo (loadtests/flows.py and the
demo app, through `python -m loadtests.rehearse`), judged from results.json.

1. The sink service is killed with SIGKILL mid-run and a new one started on the same SMTP and HTTP
   ports: the workers' streams reconnect (``harness.stream.restarts``), the restart is a harness
   error (``sink_restart``), the app's retries land in the new service, and nothing is called lost.
2. A Locust worker is killed mid-run (2 workers): the master names it (``run.missing_workers``,
   an ``unreported_worker`` harness error), and its in-flight expectations are not lost.

Rule under test: a harness-side gap is never the app's loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mailproof.load.results import RehearsalResults
from mailproof.net import free_port

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str, timeout: float = 2.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def start_service(smtp_port: int, http_port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1",
                             "--smtp-port", str(smtp_port), "--http-port", str(http_port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sink service exited with {proc.returncode}")
        try:
            _get(f"http://127.0.0.1:{http_port}/health")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the sink service did not answer /health within 20 s")


def demo(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loadtests.rehearse", "--out", str(out), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    path = out / "results.json"
    assert path.exists(), f"no results (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    RehearsalResults.read(path)
    results = json.loads(path.read_text())
    results["_said"] = f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-2000:]}"
    return results


def total(results: dict, key: str) -> int:
    return sum(row[key] for row in results["ledger"]["flows"].values())


def assert_reconciles(results: dict) -> None:
    for name, row in results["ledger"]["flows"].items():
        assert row["expected"] == row["delivered"] + row["lost"] + row["unverified"], (name, row)
    assert total(results, "expected") > 0


def test_the_sink_service_killed_and_restarted_mid_run_is_a_harness_error_and_loses_nothing(tmp_path):
    smtp_port, http_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    services = [start_service(smtp_port, http_port)]
    out = tmp_path / "run"
    times: dict[str, float] = {}
    problems: list[str] = []

    def kill_and_restart() -> None:
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # under load: mail is being captured
                try:
                    if _get(f"{url}/stats")["received"] >= 10:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            else:
                problems.append("no mail reached the sink service within 90 s")
                return
            old = services[0]
            times["killed"] = time.time()
            os.kill(old.pid, signal.SIGKILL)
            old.wait()
            services.append(start_service(smtp_port, http_port))  # the same ports, at once
            times["restarted"] = time.time()
        except BaseException as exc:  # reported by the test, not lost in a thread
            problems.append(f"{type(exc).__name__}: {exc}")

    try:
        proc = demo(out, "--sink-url", url, "-u", "4", "-r", "4", "-t", "16s", "--grace", "10",
                    "--stop-timeout", "10")
        killer = threading.Thread(target=kill_and_restart, daemon=True)
        killer.start()
        results = finish(proc, out)
        killer.join(timeout=30)
        assert not problems, problems
        new_service = f"{url}/messages"
        assert "restarted" in times, times
        said = results.pop("_said")
        assert_reconciles(results)
        # The workers' stream reconnected to the new service; the restart is the harness's error.
        stream = results["harness"]["stream"]
        assert stream["restarts"] >= 1, (stream, said)
        kinds = {e["kind"]: e for e in results["harness"]["errors"]}
        assert "sink_restart" in kinds, (results["harness"]["errors"], said)
        # No email the new service captured is counted lost; none caught in the gap either: those
        # are delivered (the app's retries reached the new service) or unverified.
        for lost in results["ledger"]["lost_emails"]:
            held = _get(f"{new_service}?to={lost['address']}&since=0&limit=100")["messages"]
            assert not held, (lost, held)
            assert lost["trigger"] is not None and lost["trigger"] > times["restarted"], (lost, times)
        assert total(results, "lost") == 0, (results["ledger"]["lost_emails"], said)
        if total(results, "unverified"):
            assert "unverified" in kinds, results["harness"]["errors"]
        # Mail triggered after the restart was delivered, through the new service.
        after = [s for s in results["timeline"]["samples"] if s["t"] - s["latency"] > times["restarted"]]
        assert after, (times, results["timeline"]["samples"][-5:])
        assert results["harness"]["sinks"] and results["harness"]["sinks"][0]["received"] > 0
        print(json.dumps({"times": times, "stream": stream, "errors": results["harness"]["errors"],
                          "flows": results["ledger"]["flows"], "recovered": results["harness"]["recovered"]},
                         indent=1))
    finally:
        for service in services:
            if service.poll() is None:
                service.kill()
                service.wait()


def _workers_of(parent: int) -> list[int]:
    """Locust worker processes started by ``parent`` (the launcher runs them as its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"--worker" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def test_a_locust_worker_killed_mid_run_is_a_missing_worker_and_its_mail_is_not_lost(tmp_path):
    out = tmp_path / "run"
    proc = demo(out, "-u", "6", "-r", "6", "-t", "16s", "--workers", "2", "--grace", "5", "--stop-timeout", "5")
    killed: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_workers_of(proc.pid)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    workers = _workers_of(proc.pid)
    if len(workers) == 2:
        time.sleep(7)  # the load is on: both workers run users with mail in flight
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])
    started = time.monotonic()
    results = finish(proc, out)
    said = results.pop("_said")
    assert killed, f"never saw 2 Locust workers: {said}"
    run = results["run"]
    assert run["mode"] == "distributed" and run["workers_expected"] == 2, (run, said)
    assert len(run["missing_workers"]) == 1, (run, said)
    kinds = {e["kind"]: e for e in results["harness"]["errors"]}
    assert kinds["unreported_worker"]["count"] == 1, results["harness"]["errors"]
    assert len(results["workers"]) == 1 and run["missing_workers"][0] not in results["workers"]
    # The dead worker's in-flight expectations are not the app's loss; the live one's mail came.
    assert_reconciles(results)
    assert total(results, "lost") == 0, (results["ledger"]["lost_emails"], said)
    assert total(results, "delivered") > 0
    assert results["ledger"]["unexpected"] == 0, results["ledger"]["unexpected_emails"][:5]
    # The master did not wait out its whole report timeout for a worker that can never report.
    assert time.monotonic() - started < 60, said
    print(json.dumps({"run": run, "errors": results["harness"]["errors"], "flows": results["ledger"]["flows"],
                      "workers": {k: v["flows"] for k, v in results["workers"].items()}}, indent=1))
