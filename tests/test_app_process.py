"""AppProcess (mailproof/app_process.py): start a real child process, know when it is ready.

The children are tiny Python programs (``sys.executable -c``); readiness is the READY line they
print, read by AppProcess's reader thread (no polling on either side).
"""

from __future__ import annotations

import signal
import stat
import sys
import textwrap
import time

import pytest

from mailproof.servers.app_process import AppProcess
from mailproof.errors import MailproofError


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
