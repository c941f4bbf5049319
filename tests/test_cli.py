"""The `mailproof` command: its help, its subcommands, and the setup errors `rehearse` stops on
before it starts anything (exit 2, the cause and the fix, never a traceback).

The rehearsals themselves are in test_rehearsal.py. Everything here is quick: no load runs.
"""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailproof.cli import main
from mailproof.load.flows import FlowsError, load_flows, parse_mix
from mailproof.load.gates import DEFAULT_GATES, Gate, GateError, parse_gates
from mailproof.load.launcher import SetupError, parse_timespan

ROOT = Path(__file__).resolve().parent.parent
LOADFLOWS = ROOT / "examples" / "flask_shop" / "loadflows.py"
SCRIPT = Path(sys.executable).parent / "mailproof"


def cli(*args: str, timeout: float = 60, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailproof.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# -- help --------------------------------------------------------------------------------------------


def test_the_console_script_is_installed_and_lists_every_command():
    assert SCRIPT.exists(), f"{SCRIPT} is missing: run .venv/bin/pip install -e . (pyproject declares it)"
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("rehearse", "sink", "report", "preview"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("command, expected", [
    ("rehearse", ["-f FLOWS", "--app-ready", "-u USERS", "--shape", "--workers", "--smtp-port", "--flow-mix",
                  "--gate", "--chaos", "--chaos-seed", "--grace", "--out", "--stop-timeout", "--app-env"]),
    ("sink", ["--smtp-port", "--http-port", "--chaos", "--token"]),
    ("report", ["--results", "--output"]),
    ("preview", ["MESSAGE.eml", "-o PREVIEW.html"]),
])
def test_each_command_has_its_help(command, expected):
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in expected:
        assert text in proc.stdout, (text, proc.stdout)


def test_no_command_or_an_unknown_one_is_a_usage_error():
    proc = cli()
    assert proc.returncode == 2 and "give a command" in proc.stderr
    proc = cli("launch")
    assert proc.returncode == 2 and "unknown command 'launch'" in proc.stderr


# -- mailproof sink ------------------------------------------------------------------------------------


def test_sink_prints_its_ready_line_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "mailproof.cli", "sink", "--smtp-port", "0", "--http-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+) smtp=127\.0\.0\.1:(\d+)\n", line)
        assert found, line + proc.stderr.read() if proc.poll() is not None else line
        with socket.create_connection(("127.0.0.1", int(found.group(2))), timeout=5) as smtp:
            assert smtp.recv(100).startswith(b"220")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


# -- mailproof preview ---------------------------------------------------------------------------------

PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_preview_writes_the_safe_offline_page_with_cid_images_inlined(tmp_path):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "shop@example.test", "ada@example.test", "Your receipt"
    msg.set_content("Thanks for your order.")
    msg.add_alternative('<p>Thanks!</p><img src="cid:logo@shop"><img src="https://tracker.example/p.gif">'
                        '<script>alert(1)</script>', subtype="html")
    msg.get_payload()[1].add_related(PIXEL, "image", "png", cid="<logo@shop>")
    eml, out = tmp_path / "receipt.eml", tmp_path / "out" / "preview.html"
    eml.write_bytes(msg.as_bytes())
    assert main(["preview", str(eml), "-o", str(out)]) == 0
    page = out.read_text()
    assert "Content-Security-Policy" in page and "Thanks!" in page
    assert "data:image/png;base64," in page  # the cid: image, inlined
    assert not re.search(r"""src\s*=\s*["']?https?://""", page)  # the remote image is blocked, not loaded
    assert "<script" not in page.lower()


def test_preview_of_a_message_without_html_shows_its_text(tmp_path):
    eml, out = tmp_path / "plain.eml", tmp_path / "plain.html"
    eml.write_bytes(b"From: a@example.test\r\nTo: b@example.test\r\nSubject: Code\r\n\r\nYour code is 123456 <b>\r\n")
    assert main(["preview", str(eml), "-o", str(out)]) == 0
    page = out.read_text()
    assert "<pre>" in page and "Your code is 123456 &lt;b&gt;" in page


def test_preview_of_a_missing_file_says_so(tmp_path, capsys):
    assert main(["preview", str(tmp_path / "nope.eml"), "-o", str(tmp_path / "x.html")]) == 2
    assert "cannot read" in capsys.readouterr().err


# -- mailproof rehearse: setup errors, before anything starts ------------------------------------------

APP = f"{sys.executable} examples/flask_shop/app.py"


def rehearse(*args: str, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return cli("rehearse", *args, "--out", str(out), timeout=timeout)


def assert_setup_error(proc: subprocess.CompletedProcess, *texts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    for text in texts:
        assert text in proc.stderr, (text, proc.stderr)


def test_a_bad_gate_exits_2_before_any_load(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc = rehearse("-f", str(LOADFLOWS), "--app", APP, "--app-ready", "http://127.0.0.1:{port}/health",
                    "--app-env", "PORT={port}", "-u", "10", "-t", "20s", "--gate", "signup:p95 lower than 2s", out=out)
    assert_setup_error(proc, "--gate: cannot read gate 'signup:p95 lower than 2s'", "[FLOW:]METRIC OP VALUE")
    assert time.monotonic() - started < 20
    assert not (out / "locust.log").exists() and not (out / "results.json").exists()  # Locust never started
    assert "mailproof rehearse: examples" not in proc.stdout  # nor the sink and the app (no start line)


@pytest.mark.parametrize("args, texts", [
    (["--gate", "signup_confirm:p95<2s"], ["names flow 'signup_confirm', which is not among the flows run"]),
    (["--gate", "*:lost==0%"], ["'%' is for rates"]),
    (["--gate", "*:p95<2%"], ["'%' is for rates"]),
    (["--gate", "http:lost==0"], ["measured per flow"]),
    (["--flow-mix", "signup=2"], ["--flow-mix: unknown flow 'signup'", "signup_confirms_account"]),
    (["--chaos", "5%:rcpt"], ["--chaos:"]),
    (["--chaos-seed", "3"], ["--chaos-seed seeds a --chaos profile"]),
    (["--shape", "burst"], ["drop -u -t"]),
])
def test_bad_options_exit_2_with_the_cause_and_the_fix(tmp_path, args, texts):
    proc = rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "-u", "2", "-t", "5s", *args,
                    out=tmp_path / "run")
    assert_setup_error(proc, *texts)


def test_the_run_needs_a_length_and_an_application(tmp_path):
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "-u", "2", out=tmp_path),
                       "say how long to run: a shape (--shape constant --peak-rate 10 --duration 20)")
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "-u", "2", "-t", "5s", out=tmp_path),
                       "say where the application is")
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "--app", APP, "-u", "2", "-t", "5s", out=tmp_path),
                       "--app needs --app-ready")
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "--shape", "ramp",
                                "--peak-rate", "5", out=tmp_path), "needs --peak-rate R (flows per second) and --duration S")
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "--shape", "ramp",
                                "--peak-users", "5", "--duration", "9", out=tmp_path),
                       "--peak-users is gone: a shape sets arrivals now")
    assert_setup_error(rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "-u", "2", "-t", "5s",
                                "--max-users", "5", out=tmp_path), "size a --shape")


def test_bad_flows_exit_2_naming_the_problem(tmp_path):
    empty = tmp_path / "noflows.py"
    empty.write_text("def not_a_flow(flow):\n    pass\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import this_module_does_not_exist\n")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('the flows need a config file')\n")
    cases = [(tmp_path / "missing.py", "no such file"),
             (empty, "no @flow function in module 'noflows'"),
             (broken, "importing it failed: No module named 'this_module_does_not_exist'"),
             (raising, "importing it raised RuntimeError: the flows need a config file"),
             (Path("no_such.module"), "no module named 'no_such.module'")]
    for flows, text in cases:
        proc = rehearse("-f", str(flows), "--host", "http://127.0.0.1:9", "-u", "1", "-t", "2s", out=tmp_path / "r")
        assert_setup_error(proc, text)


def test_a_taken_smtp_port_exits_2_before_the_sink_starts(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = rehearse("-f", str(LOADFLOWS), "--host", "http://127.0.0.1:9", "-u", "1", "-t", "2s",
                        "--smtp-port", str(port), out=tmp_path)
    assert_setup_error(proc, f"--smtp-port {port}: the port is taken", "choose another port")


def test_an_app_that_never_becomes_ready_exits_2_with_its_output(tmp_path):
    proc = rehearse("-f", str(LOADFLOWS), "--app", "echo 'listening nowhere'; exit 4", "--app-ready",
                    "http://127.0.0.1:9/health", "-u", "1", "-t", "2s", out=tmp_path / "run")
    assert_setup_error(proc, "the application did not become ready", "exited with code 4", "listening nowhere",
                       "MAILPROOF_SMTP_HOST")
    assert not (tmp_path / "run" / "locust.log").exists()


# -- the pieces, in process ----------------------------------------------------------------------------


def test_flows_of_a_module_weights_and_what_cannot_run_under_load(tmp_path):
    package = tmp_path / "shopflows"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text(textwrap.dedent('''
        from mailproof import flow

        @flow
        def helper_flow(flow):
            pass
    '''))
    (package / "load.py").write_text(textwrap.dedent('''
        from mailproof import flow
        from .common import helper_flow  # imported: not a task of this module

        @flow
        def signup(flow, name="Ada"):
            helper_flow(flow)

        @flow(weight=3)
        def order(flow):
            pass

        @flow
        def with_faults(flow, faults):
            pass
    '''))
    loaded = load_flows(str(package / "load.py"))
    assert loaded.module == "shopflows.load"
    assert loaded.weights == {"signup": 1, "order": 3}
    assert list(loaded.skipped) == ["with_faults"] and "needs faults" in loaded.skipped["with_faults"]
    assert [f.__name__ for f in loaded.mix()] == ["signup", "order"]
    assert {f.__name__: w for f, w in loaded.mix("order=2,signup=0").items()} == {"order": 2}
    with pytest.raises(FlowsError, match="unknown flow 'with_faults' \\(it needs faults"):
        parse_mix("with_faults=1", list(loaded.flows), loaded.skipped)
    with pytest.raises(FlowsError, match="weight 0: nothing would run"):
        parse_mix("order=0", list(loaded.flows))
    exported = tmp_path / "exported.py"
    exported.write_text("from shopflows.common import helper_flow\n__all__ = ['helper_flow']\n")
    assert list(load_flows(str(exported)).flows) == ["helper_flow"]  # __all__ names the tasks


def test_the_flask_shop_flows_need_their_load_versions():
    """examples/flask_shop/flows are pytest flows: the sink_faults one cannot run under load at all;
    loadflows.py has the load-friendly versions (and reuses the order flow as it is)."""
    orders = load_flows(str(ROOT / "examples" / "flask_shop" / "flows" / "orders.py"))
    assert "receipt_is_sent_after_the_response" in orders.skipped
    assert set(load_flows(str(LOADFLOWS)).flows) == {
        "signup_confirms_account", "tampered_confirmation_link_is_refused", "password_reset_code_works_once",
        "order_receipt_has_invoice"}


def test_gates_grammar_defaults_and_flow_names():
    assert [g.text for g in parse_gates(DEFAULT_GATES)] == list(DEFAULT_GATES)
    rate = Gate.parse("flows:failure_rate<=0%")
    assert (rate.flow, rate.metric, rate.value) == ("*", "failure_rate", 0.0)
    assert Gate.parse("harness:errors==0").flow == "harness"
    assert Gate.parse("signup:p95<250ms").value == pytest.approx(0.25)
    with pytest.raises(GateError, match="not among the flows run"):
        parse_gates(["order:p95<2s"], flows=["signup"])
    with pytest.raises(GateError, match="unknown metric 'p42'"):
        Gate.parse("p42<1s")


@pytest.mark.parametrize("text, seconds", [("20", 20), ("20s", 20), ("3m", 180), ("1h30m", 5400), ("1m5s", 65)])
def test_run_time_in_locusts_format(text, seconds):
    assert parse_timespan(text) == seconds


def test_a_bad_run_time_is_a_setup_error():
    with pytest.raises(SetupError, match="give the run time as Locust does"):
        parse_timespan("twenty seconds")


EXPECT_CHECK = textwrap.dedent('''
    import locust  # first, as `locust -f` does: it monkey-patches before ssl is imported
    from mailproof.load.user import _NamedClient

    class Answer:
        def __init__(self, status):
            self.status_code, self.text, self.error, self.verdict = status, "body", None, None
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def success(self):
            self.verdict = "success"
        def failure(self, why):
            self.verdict = "failure: " + why

    class Client:
        def __init__(self):
            self.calls = []
        def post(self, url, **kwargs):
            self.calls.append((url, kwargs))
            return Answer(int(url.rsplit("/", 1)[1]))

    client = Client()
    named = _NamedClient(client)
    verdicts = [named.post("/orders/FS-1/200").verdict, named.post("/status/404").verdict,
                named.post("/status/400", expect=400).verdict, named.post("/status/422", expect=(400, 422)).verdict,
                named.post("/status/500", expect=400).verdict]
    print(verdicts)
    print(sorted(client.calls[0][1]), client.calls[0][1]["name"])
    try:
        named.post("/status/400", expect="400")
    except TypeError as exc:
        print("TypeError", exc)
''')


def test_http_answers_of_400_and_above_fail_unless_the_flow_expects_them():
    """_NamedClient (Locust's client in a rehearsal); in a subprocess, since it imports Locust."""
    proc = subprocess.run([sys.executable, "-c", EXPECT_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    verdicts, kwargs, error = proc.stdout.splitlines()
    assert verdicts == str(["success", "failure: HTTP 404: body", "success", "success", "failure: HTTP 500: body"])
    assert kwargs == "['catch_response', 'name'] /orders/{id}/{id}"  # expect= never reaches Locust's client
    assert error.startswith("TypeError expect= takes")
