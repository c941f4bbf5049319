"""A flow's verdict under Locust is the one it gets under pytest, run after run of one user.

Under pytest each test gets a new session; a Locust user runs flow after flow on one client.
Here one user (``--max-users 1``) runs 10 arrivals against a small app, on both clients:

- an app with cookie sessions (a login, a cart) must not see a run arrive logged in as an earlier
  run's user, nor with a session header an earlier run set;
- a run whose request raised must not leave the client changed for the runs after it (Locust's
  FastHttpSession left redirects off after an ``allow_redirects=False`` request that raised);
- what requests offers and the fast client lacks is the harness's limit, never the app's failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_rehearsal import own_app, said  # noqa: E402

APP = textwrap.dedent(r'''
    import json, os, secrets
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls = {"whoami": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, status, body, extra=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/login":  # a session cookie, as a login sets one
                return self.send(200, {}, [("Set-Cookie", f"session={secrets.token_hex(8)}; Path=/; HttpOnly")])
            if self.path == "/whoami":  # the first caller's name cannot go in an HTTP header (not latin-1)
                calls["whoami"] += 1
                return self.send(200, {"name": "\u0141ukasz" if calls["whoami"] == 1 else "Lukas"})
            if self.path == "/confirm":
                return self.send(302, {}, [("Location", "/welcome")])
            if self.path == "/welcome":
                return self.send(200, {"page": "welcome"})
            self.send(200, {"cookie": self.headers.get("Cookie"), "trace": self.headers.get("X-Trace")})

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
''')

FLOWS = textwrap.dedent('''
    from mailproof import flow

    @flow
    def logs_in_from_a_fresh_session(flow):
        before = flow.http.get("/health").json()
        assert before == {"cookie": None, "trace": None}, f"an earlier run's session came in: {before}"
        flow.http.get("/login")
        after = flow.http.get("/health").json()
        assert after["cookie"] and after["cookie"].startswith("session="), f"the run's own cookie: {after}"
        try:
            flow.http.headers["X-Trace"] = "set by a run"  # requests' session headers (not on the fast client)
        except AttributeError:
            pass
''')


REDIRECT_FLOWS = textwrap.dedent('''
    from mailproof import flow

    @flow
    def confirmation_link_leads_to_welcome(flow):
        name = flow.http.get("/whoami").json()["name"]
        # Where does the link point? The first run's request raises on both clients (a header
        # value that is not latin-1), as it would under pytest.
        hop = flow.http.get("/confirm", headers={"X-User": name}, allow_redirects=False)
        assert hop.status_code == 302 and hop.headers["Location"] == "/welcome", hop.status_code
        page = flow.http.get("/confirm")  # followed, as requests follows it
        assert page.status_code == 200 and page.json() == {"page": "welcome"}, page.status_code
''')

SESSION_HEADER_FLOWS = textwrap.dedent('''
    from mailproof import flow

    @flow
    def sets_a_session_header(flow):
        flow.http.headers.update({"X-Trace": "t"})  # requests.Session's own way (AppSession under pytest)
        assert flow.http.get("/health").json()["trace"] == "t"
''')


def rehearse(tmp_path: Path, flows_text: str, client: str) -> tuple[subprocess.CompletedProcess, dict]:
    """One Locust user (--max-users 1) runs 10 arrivals of the flows against APP."""
    return own_app(APP, flows_text, tmp_path / f"run-{client}", "--client", client, "--max-users", "1", "--grace", "1")


@pytest.mark.parametrize("client", ["fast", "requests"])
def test_no_flow_run_sees_the_session_an_earlier_run_of_its_user_left(tmp_path, client):
    proc, results = rehearse(tmp_path, FLOWS, client)
    runs = results["flows"]["runs"].get("logs_in_from_a_fresh_session", 0)
    assert runs == 10, said(proc)  # one user ran them all, one after the other
    assert results["flows"]["failures"] == {}, results["flows"]["failure_samples"]
    assert proc.returncode == 0, said(proc)


@pytest.mark.parametrize("client", ["fast", "requests"])
def test_a_run_whose_request_raised_leaves_later_runs_following_redirects(tmp_path, client):
    """Locust's FastHttpSession turned redirects off for allow_redirects=False and back on only
    after a request that returned: one run that raised left every later run of its user with the
    302 instead of the page (9 more failures on the fast client)."""
    proc, results = rehearse(tmp_path, REDIRECT_FLOWS, client)
    assert results["flows"]["runs"].get("confirmation_link_leads_to_welcome") == 10, said(proc)
    assert results["flows"]["failures"] == {"confirmation_link_leads_to_welcome": 1}, \
        results["flows"]["failure_samples"]


def test_what_the_fast_client_lacks_is_the_harness_limit_not_the_apps_failure(tmp_path):
    """flow.http.headers passes under pytest; on the fast client it was an AttributeError in the
    flow, counted as the app's failure. It is now a harness error that names the fix."""
    proc, results = rehearse(tmp_path, SESSION_HEADER_FLOWS, "fast")
    assert results["flows"]["runs"].get("sets_a_session_header") == 10, said(proc)
    assert results["flows"]["failures"] == {}, results["flows"]["failure_samples"]
    assert results["flows"]["harness_errors"] == {"sets_a_session_header": 10}
    assert "--client requests" in json.dumps(results["harness"]["errors"]), results["harness"]["errors"]
