"""The fake validation API: verdict rules, auth, stats, lifecycle, the fault seam, and the CLI."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from aiohttp import web

from fakes.validation_api import ValidationApi, verify

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"


@pytest.fixture(scope="module")
def api():
    with ValidationApi(api_key=KEY) as api:
        yield api


def check(api: ValidationApi, email: str, key: str | None = KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(f"{api.url}/v2/verify", params={"email": email}, headers=headers, timeout=5)


@pytest.mark.parametrize(
    "email, result, reason, disposable",
    [
        ("alice@example.com", "deliverable", "accepted_email", False),
        ("jörg+tag@example.com", "deliverable", "accepted_email", False),  # SMTPUTF8 local part
        ("not-an-address", "undeliverable", "invalid_email", False),
        ("two@@example.com", "undeliverable", "invalid_email", False),
        ("a b@example.com", "undeliverable", "invalid_email", False),
        ("nodot@localhost", "undeliverable", "invalid_email", False),
        ("x@invalid.test", "undeliverable", "invalid_domain", False),
        ("x@BOUNCE.test", "undeliverable", "invalid_domain", False),  # domains compare case-insensitively
        ("reject+r1.0001@example.com", "undeliverable", "rejected_email", False),
        ("someone@mailinator.com", "risky", "low_quality", True),
    ],
)
def test_rules(api, email, result, reason, disposable):
    resp = check(api, email)
    assert resp.status_code == 200
    assert resp.json() == {"email": email, "result": result, "reason": reason,
                           "disposable": disposable, "did_you_mean": None}


def test_deny_set_is_configurable():
    assert verify("x@custom.test", deny_domains={"custom.test"})["reason"] == "invalid_domain"
    assert verify("x@invalid.test", deny_domains=set())["result"] == "deliverable"


@pytest.mark.parametrize("key", [None, "wrong"])
def test_auth_required_when_key_configured(api, key):
    resp = check(api, "alice@example.com", key=key)
    assert resp.status_code == 401
    assert resp.json()["message"]


def test_no_key_configured_means_open():
    with ValidationApi() as open_api:
        assert check(open_api, "alice@example.com", key=None).json()["result"] == "deliverable"


def test_missing_email_is_400_and_health_needs_no_key(api):
    resp = requests.get(f"{api.url}/v2/verify", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert resp.status_code == 400 and "email" in resp.json()["message"]
    assert requests.get(f"{api.url}/health", timeout=5).status_code == 200


def test_stats_count_by_status():
    with ValidationApi(api_key=KEY) as api:
        check(api, "a@example.com")
        check(api, "b@example.com")
        check(api, "a@example.com", key="nope")
        requests.get(f"{api.url}/nowhere", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert api.stats == {"requests": 4, "by_status": {200: 2, 401: 1, 404: 1}}


def test_stop_releases_port_and_thread():
    before = set(threading.enumerate())
    api = ValidationApi().start()
    port = api.port
    (thread,) = set(threading.enumerate()) - before
    api.stop()
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    api.stop()  # idempotent


def test_fault_seam_can_replace_replies_and_is_counted():
    calls = []

    async def too_many(request: web.Request, handler):
        calls.append(request.path)
        if len(calls) == 1:
            return web.json_response({"message": "slow down"}, status=429, headers={"Retry-After": "1"})
        return await handler(request)

    with ValidationApi(api_key=KEY, faults=too_many) as api:
        first, second = check(api, "a@example.com"), check(api, "a@example.com")
        assert (first.status_code, first.headers["Retry-After"]) == (429, "1")
        assert second.json()["result"] == "deliverable"
        api.faults = None  # swappable at runtime
        check(api, "a@example.com")
        assert len(calls) == 2
        assert api.stats["by_status"] == {429: 1, 200: 2}


def test_cli_prints_ready_and_exits_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "fakes.validation_api", "--port", "0", "--api-key", KEY],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 10)[0], "no READY line within 10 s"
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        resp = requests.get(f"{url}/v2/verify", params={"email": "x@invalid.test"},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert resp.json()["reason"] == "invalid_domain"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
