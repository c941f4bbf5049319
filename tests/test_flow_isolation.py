"""Each flow run under Locust starts on a fresh session, as each pytest test does.

A Locust user runs flow after flow on one client. An app with cookie sessions (a login, a cart)
would otherwise see the next run arrive logged in as the previous run's user, and the flow's
verdict under load would differ from its verdict under pytest. Here one user (``--max-users 1``)
runs every arrival against a small app that sets a session cookie and echoes what it receives,
on both clients, and every run must find no cookie (and no session header) from an earlier one.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from mailproof.net import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_rehearsal import mailproof, read_results, said  # noqa: E402

APP = textwrap.dedent(r'''
    import json, os, secrets
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            extra = []
            if self.path == "/login":  # a session cookie, as a login sets one
                extra.append(("Set-Cookie", f"session={secrets.token_hex(8)}; Path=/; HttpOnly"))
            body = json.dumps({"cookie": self.headers.get("Cookie"), "trace": self.headers.get("X-Trace")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

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


@pytest.mark.parametrize("client", ["fast", "requests"])
def test_no_flow_run_sees_the_session_an_earlier_run_of_its_user_left(tmp_path, client):
    app, flows, out = tmp_path / "cookie_app.py", tmp_path / "cookie_flows.py", tmp_path / "run"
    app.write_text(APP)
    flows.write_text(FLOWS)
    port = free_port()
    proc = mailproof("rehearse", "-f", str(flows), "--app", f"{sys.executable} {app}", "--app-env", f"PORT={port}",
                     "--app-ready", f"http://127.0.0.1:{port}/health", "--client", client,
                     "--shape", "constant", "--peak-rate", "5", "--duration", "2", "--max-users", "1",
                     "--grace", "1", "--out", str(out))
    results = read_results(proc, out)
    runs = results["flows"]["runs"].get("logs_in_from_a_fresh_session", 0)
    assert runs == 10, said(proc)  # one user ran them all, one after the other
    assert results["flows"]["failures"] == {}, results["flows"]["failure_samples"]
    assert proc.returncode == 0, said(proc)
