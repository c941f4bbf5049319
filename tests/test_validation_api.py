"""The fake validation API: verdict rules, auth, stats, lifecycle, faults (built in and custom), the CLI."""

from __future__ import annotations

import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from aiohttp import web

from fakes.validation_api import FaultSettings, FaultSettingsError, ValidationApi, verify

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


# --- fault injection ------------------------------------------------------------------------------

class Clock:
    """A hand-driven clock for the windows (rate limit, outage): time passes when the test says."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faulty():
    """A fresh API per test, with a hand-driven clock for its fault windows."""
    with ValidationApi(api_key=KEY) as api:
        api.faults.clock = Clock()
        yield api


def statuses(api: ValidationApi, n: int, session: requests.Session | None = None) -> list[int]:
    get = (session or requests).get
    return [get(f"{api.url}/v2/verify", params={"email": "a@example.com"},
                headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code for _ in range(n)]


def test_latency_with_seeded_jitter(faulty):
    faulty.faults.set(latency=0.1, jitter=0.1, seed=3)
    draws = random.Random(3)
    expected = [0.1 + draws.uniform(0, 0.1) for _ in range(3)]
    took = []
    for _ in expected:
        started = time.monotonic()
        assert check(faulty, "a@example.com").json()["result"] == "deliverable"
        took.append(time.monotonic() - started)
    for want, got in zip(expected, took):
        assert want <= got < want + 0.5, (expected, took)
    assert faulty.faults.fired["delayed"] == 3


def test_rate_limit_answers_429_with_retry_after_and_the_window_slides(faulty):
    faulty.faults.set(rate_limit=3, retry_after=2)
    responses = [check(faulty, "a@example.com") for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert [r.headers.get("Retry-After") for r in responses[3:]] == ["2", "2"]
    faulty.faults.clock.now += 0.5
    assert statuses(faulty, 1) == [429]
    faulty.faults.clock.now += 0.5
    assert statuses(faulty, 4) == [200, 200, 200, 429]
    assert faulty.faults.fired == {"requests": 10, "delayed": 0, "rate_limited": 4, "errors": 0,
                                   "outage": 0, "malformed": 0}
    assert faulty.stats["by_status"] == {200: 6, 429: 4}


@pytest.mark.parametrize("status", [503, 500, 502, 429])
def test_error_burst_then_healthy(faulty, status):
    faulty.faults.set(errors=2, error_status=status)
    responses = [check(faulty, "a@example.com") for _ in range(3)]
    assert [r.status_code for r in responses] == [status, status, 200]
    assert ("Retry-After" in responses[0].headers) == (status == 429)
    assert faulty.faults.fired["errors"] == 2


def test_error_rate_is_seeded_and_repeatable(faulty):
    draws = random.Random(5)
    expected = [503 if draws.random() < 0.3 else 200 for _ in range(20)]
    assert {200, 503} <= set(expected)
    runs = []
    for _ in range(2):
        faulty.faults.set(error_rate=0.3, seed=5)  # set() restarts the seeded stream
        runs.append(statuses(faulty, 20))
    assert runs == [expected, expected]
    assert faulty.faults.fired["errors"] == 2 * expected.count(503)


def test_outage_refuses_connections_until_cleared(faulty):
    session = requests.Session()
    assert statuses(faulty, 1, session) == [200]  # a kept-alive connection, from before the outage
    faulty.faults.set(outage=60)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", faulty.port), timeout=2)
    with pytest.raises(requests.ConnectionError):
        statuses(faulty, 1, session)  # the kept-alive connection is gone too
    faulty.faults.clear()
    assert faulty.wait_listening(0)  # clear() returns once the API listens again, same port
    assert statuses(faulty, 2, session) == [200, 200]
    session.close()


def test_outage_ends_by_itself_after_its_window():
    with ValidationApi(api_key=KEY) as api:
        started = time.monotonic()
        api.faults.set(outage=0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", api.port), timeout=2)
        assert api.wait_listening(5), "the API did not come back after its outage window"
        assert time.monotonic() - started >= 0.3
        assert statuses(api, 1) == [200]


def test_outage_set_before_start_applies_at_start():
    api = ValidationApi(api_key=KEY, faults=FaultSettings(outage=60))
    with api:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", api.port), timeout=2)
        api.faults = None  # the shorthand for clear()
        assert statuses(api, 1) == [200]


@pytest.mark.parametrize("mode, status", [("503", 503), ("429", 429)])
def test_outage_answering_503_or_429_for_a_window(faulty, mode, status):
    faulty.faults.set(outage=2, outage_mode=mode, retry_after=1)
    first = check(faulty, "a@example.com")
    assert first.status_code == status
    assert first.headers.get("Retry-After") == ("1" if status == 429 else None)
    faulty.faults.clock.now += 1.9
    assert statuses(faulty, 1) == [status]
    faulty.faults.clock.now += 0.1
    assert statuses(faulty, 2) == [200, 200]
    assert faulty.faults.fired["outage"] == 2


def test_malformed_bodies_then_good_ones(faulty):
    faulty.faults.set(malformed=3)
    bodies = [check(faulty, "a@example.com") for _ in range(4)]
    assert all(r.status_code == 200 for r in bodies)
    with pytest.raises(ValueError):
        bodies[0].json()  # truncated JSON
    assert bodies[1].headers["Content-Type"].startswith("text/html")
    assert "result" not in bodies[2].json()
    assert bodies[3].json()["result"] == "deliverable"
    assert faulty.faults.fired["malformed"] == 3


def test_malformed_never_garbles_an_error_answer(faulty):
    faulty.faults.set(malformed=1)
    bad = check(faulty, "a@example.com", key="wrong")
    assert bad.status_code == 401 and bad.json()["message"]
    assert faulty.faults.fired["malformed"] == 0
    with pytest.raises(ValueError):
        check(faulty, "a@example.com").json()


def test_faults_combine_in_order(faulty):
    faulty.faults.set(rate_limit=2, errors=1, latency=0.05, seed=1)
    assert statuses(faulty, 3) == [503, 200, 429]  # the burst uses a slot; the third is over the rate
    assert faulty.faults.fired == {"requests": 3, "delayed": 3, "rate_limited": 1, "errors": 1,
                                   "outage": 0, "malformed": 0}


def test_clear_heals_and_resets_counters(faulty):
    faulty.faults.set(errors=5)
    assert statuses(faulty, 1) == [503]
    faulty.faults.clear()
    assert faulty.faults.settings is None
    assert faulty.faults.fired["errors"] == 0
    assert statuses(faulty, 1) == [200]


def test_settings_from_constructor_dict_and_assignment():
    with ValidationApi(api_key=KEY, faults={"errors": 1}) as api:
        assert statuses(api, 2) == [503, 200]
        api.faults = FaultSettings(errors=1, error_status=500)
        assert statuses(api, 2) == [500, 200]
        settings = api.faults.set(FaultSettings(errors=1), error_status=502)  # a base, with changes
        assert settings == FaultSettings(errors=1, error_status=502)
        assert statuses(api, 2) == [502, 200]


@pytest.mark.parametrize("fields, why", [
    ({"latency": -1}, "latency must be"),
    ({"jitter": float("nan")}, "jitter must be"),
    ({"error_rate": 1.5}, "error_rate must be between 0 and 1"),
    ({"rate_limit": 0}, "rate_limit must be a positive"),
    ({"errors": 1.5}, "errors must be a whole number"),
    ({"retry_after": -1}, "retry_after must be a whole number"),
    ({"error_status": 404}, "error_status must be a 5xx status or 429"),
    ({"outage_mode": "down"}, "outage_mode must be one of refuse, 503, 429"),
    ({"latncy": 1}, "the settings are: latency"),
])
def test_bad_settings_raise_and_change_nothing(faulty, fields, why):
    faulty.faults.set(errors=1)
    with pytest.raises(FaultSettingsError, match=re.escape(why)):
        faulty.faults.set(**fields)
    assert faulty.faults.settings == FaultSettings(errors=1)


def test_validation_faults_fixture_drives_the_session_api(validation_api, validation_faults):
    assert validation_faults is validation_api.faults
    assert validation_faults.settings is None and validation_faults.fired["requests"] == 0
    validation_faults.set(errors=1)
    resp = requests.get(f"{validation_api.url}/v2/verify", params={"email": "a@example.com"}, timeout=5)
    assert resp.status_code == 503
    assert validation_faults.fired["errors"] == 1
