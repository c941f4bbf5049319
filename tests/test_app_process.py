"""AppProcess (mailproof/servers/app_process.py): start a real child process, know when it is
ready, and stop everything it started.

The children are tiny Python programs (``sys.executable -c``); readiness is the READY line they
print, read by AppProcess's reader thread (no polling on either side), or for apps that print
nothing, an HTTP answer at ``ready_url`` (bounded backoff).
"""

from __future__ import annotations

import shlex
import signal
import socket
import stat
import sys
import textwrap
import time
import urllib.request

import pytest

from mailproof.errors import MailproofError
from mailproof.net import free_port
from mailproof.servers.app_process import AppProcess
from mailproof.servers.process import live_group_members, tcp_sockets


def child(*parts: str) -> list[str]:
    return [sys.executable, "-c", "".join(textwrap.dedent(part) for part in parts)]


SERVE_FOREVER = """
    import time
    while True:
        time.sleep(3600)
"""


def test_ready_line_sets_url_and_stop_terminates():
    app = AppProcess(child("""
        import os
        print("loading templates", flush=True)
        print("READY http://127.0.0.1:8123/base " + os.environ["MAILPROOF_TEST_FLAG"], flush=True)
    """, SERVE_FOREVER), env={"MAILPROOF_TEST_FLAG": "flag-ok"}, start_timeout=20)
    started = time.monotonic()
    with app:
        assert app.url == "http://127.0.0.1:8123/base"
        assert app.running
        assert time.monotonic() - started < 15
        assert list(app.output)[:2] == ["loading templates", "READY http://127.0.0.1:8123/base flag-ok"]
        stopping = time.monotonic()
        assert app.stop() == -signal.SIGTERM
        assert time.monotonic() - stopping < 5
        assert not app.running
    assert app.stop() == -signal.SIGTERM  # stopping again is harmless


def test_ready_pattern_without_group_gives_the_line():
    with AppProcess(child("""
        print("  listening on 127.0.0.1:9000  ", flush=True)
    """, SERVE_FOREVER), ready_pattern=r"listening on", start_timeout=20) as app:
        assert app.url == "listening on 127.0.0.1:9000"


def test_ready_line_on_stderr_counts_as_flask_prints_it():
    # Werkzeug (flask run) logs "Running on http://..." to stderr, not stdout.
    with AppProcess(child("""
        import sys
        print(" * Running on http://127.0.0.1:5123", file=sys.stderr, flush=True)
    """, SERVE_FOREVER), ready_pattern=r"Running on (http://\S+)", start_timeout=20) as app:
        assert app.url == "http://127.0.0.1:5123"


def test_child_exiting_early_reports_code_and_output_tail():
    started = time.monotonic()
    with pytest.raises(MailproofError) as failed:
        AppProcess(child("""
            import sys
            print("booting", flush=True)
            try:
                raise RuntimeError("no SMTP_HOST configured")
            except RuntimeError:
                import traceback
                traceback.print_exc()
            sys.exit(3)
        """), name="demo app", start_timeout=30).start()
    assert time.monotonic() - started < 10, "an exited child must not wait for the start timeout"
    text = str(failed.value)
    assert "the demo app exited with code 3 before it was ready" in text
    assert "booting" in text
    assert "RuntimeError: no SMTP_HOST configured" in text


def test_missing_binary_is_a_clear_error():
    with pytest.raises(MailproofError) as failed:
        AppProcess(["/nonexistent/mailproof-demo-app", "--port", "0"], name="demo app").start()
    text = str(failed.value)
    assert "cannot start the demo app" in text
    assert "'/nonexistent/mailproof-demo-app' not found" in text


def test_non_executable_file_is_a_clear_error(tmp_path):
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\necho READY http://x\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(MailproofError, match="cannot start the application"):
        AppProcess([str(script)]).start()


def test_never_ready_times_out_and_stops_the_child():
    app = AppProcess(child("""
        print("starting up", flush=True)
    """, SERVE_FOREVER), start_timeout=1)
    started = time.monotonic()
    with pytest.raises(MailproofError) as failed:
        app.start()
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 6
    text = str(failed.value)
    assert "did not print a line matching 'READY (\\\\S+)' within 1 s" in text
    assert "starting up" in text
    assert not app.running and app.url is None


def test_stop_kills_a_child_that_ignores_sigterm():
    app = AppProcess(child("""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("READY http://x", flush=True)
    """, SERVE_FOREVER), start_timeout=20).start()
    started = time.monotonic()
    assert app.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not app.running


def test_stop_before_start_is_a_no_op():
    assert AppProcess(["true"]).stop() is None


def test_output_that_is_not_utf8_does_not_hide_readiness():
    # Logs are not always UTF-8 (a Latin-1 file name, a binary dump): readiness and the output
    # tail must survive them.
    app = AppProcess(child("""
        import sys
        sys.stdout.buffer.write(b"caf\\xe9 log line\\n")
        sys.stdout.flush()
        print("READY http://x", flush=True)
    """, SERVE_FOREVER), start_timeout=2)
    try:
        app.start()
        assert app.url == "http://x"
        assert app.output[0].startswith("caf")
    finally:
        app.stop()


def _running(pid: int) -> bool:
    """Running, not merely a zombie: an orphan's zombie waits for init to reap it, which some
    container inits never do; a zombie holds no port and runs no code."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["obeys-sigterm", "ignores-sigterm"])
def test_stop_ends_the_real_server_behind_a_launcher_and_frees_its_port(ignores_sigterm):
    # `bash -c "server; echo ..."` forks the server (a lone command would be exec'd): the server
    # is bash's child, as behind `npm start` or `make run`. SIGTERM to bash alone kills only bash.
    server = textwrap.dedent(f"""
        import http.server, os, signal
        if {ignores_sigterm}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        print(f"READY http://127.0.0.1:{{httpd.server_port}} pid={{os.getpid()}}", flush=True)
        httpd.serve_forever()
    """)
    app = AppProcess(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(server)}; echo launcher done"],
                     ready_pattern=r"READY (\S+) pid=\d+", start_timeout=20).start()
    try:
        port = int(app.url.rsplit(":", 1)[1])
        grandchild = int(next(line for line in app.output if line.startswith("READY")).rsplit("=", 1)[1])
        assert grandchild != app.pid and _parent(grandchild) == app.pid, "the server must be bash's child"
        assert (("127.0.0.1", port) in {(ip, p) for ip, p, _, _ in tcp_sockets("LISTEN")})
    finally:
        started = time.monotonic()
        code = app.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert code == -signal.SIGTERM  # bash itself obeys
    assert not _running(grandchild), "the launcher's server outlived stop()"
    assert not live_group_members(app.pid)
    assert port not in {p for _, p, _, _ in tcp_sockets("LISTEN")}
    with socket.socket() as again:  # SO_REUSEADDR passes TIME_WAIT, never a live listener
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


# Counts the requests it gets; answers 503 twice ("starting"), then 404: any answer below 500
# means the app is up. /hits reports the count.
QUIET_HTTP_APP = """
    import http.server, sys
    hits = 0
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            global hits
            hits += 1
            body = str(hits).encode() if self.path == "/hits" else b""
            self.send_response(200 if self.path == "/hits" else 503 if hits <= 2 else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_ready_url_waits_for_an_http_answer_below_500_from_an_app_that_prints_nothing():
    port = free_port()
    with AppProcess(child(QUIET_HTTP_APP) + [str(port)], ready_url=f"http://127.0.0.1:{port}/health",
                    start_timeout=20) as app:
        assert app.url == f"http://127.0.0.1:{port}"
        assert not app.output, "the app printed nothing; readiness came from HTTP"
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(app.url + "/hits", timeout=10) as hits:
            assert hits.read() == b"4"  # 503, 503 retried; the 404 was ready; then this request


def test_ready_url_that_never_answers_times_out_naming_ready_url():
    port = free_port()  # nothing will listen there
    app = AppProcess(child("""
        print("still migrating the database", flush=True)
    """, SERVE_FOREVER), ready_url=f"http://127.0.0.1:{port}/health", start_timeout=1)
    started = time.monotonic()
    with pytest.raises(MailproofError) as failed:
        app.start()
    assert 1 <= time.monotonic() - started < 6
    text = str(failed.value)
    assert f"did not answer ready_url http://127.0.0.1:{port}/health" in text
    assert "within start_timeout 1 s" in text and "ConnectionRefusedError" in text
    assert "pass ready_pattern= instead" in text
    assert "still migrating the database" in text
    assert not app.running and app.url is None


def test_ready_url_app_exiting_early_reports_code_and_output():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(MailproofError) as failed:
        AppProcess(child("""
            import sys
            print("cannot bind: permission denied", file=sys.stderr, flush=True)
            sys.exit(4)
        """), ready_url=f"http://127.0.0.1:{port}/", name="demo app", start_timeout=30).start()
    assert time.monotonic() - started < 10, "an exited app must not wait for the start timeout"
    text = str(failed.value)
    assert "the demo app exited with code 4 before it was ready" in text
    assert "cannot bind: permission denied" in text


def test_ready_url_and_ready_pattern_are_checked_up_front():
    with pytest.raises(ValueError, match="not both"):
        AppProcess(["true"], ready_pattern="READY", ready_url="http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="http"):
        AppProcess(["true"], ready_url="127.0.0.1:8000")
