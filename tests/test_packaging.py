"""The wheel holds mailproof only, and its core works without the extras.

A user installs ``mailproof`` into their own project: it must not bring top-level packages that
shadow theirs (a ``fakes/`` of their own is common), nor Locust's gevent patching, matplotlib or
allure into every pytest run. The extras are checked by what a missing one says.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("locust", "gevent", "matplotlib", "imap_tools", "allure", "allure_commons", "allure_pytest",
            "hdrh", "jinja2", "nh3", "tinycss2", "dkim", "aiospamc")
# Distributions only an extra may pull in.
EXTRA_ONLY = {"locust", "gevent", "matplotlib", "imap-tools", "allure-pytest", "hdrhistogram", "jinja2", "nh3",
              "tinycss2", "dkimpy", "aiospamc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("mailproof-*.whl")
    return found


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode())


def test_the_wheel_holds_the_mailproof_package_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"mailproof"}, tops
    # Package data the installed features need: the rehearsal template and the pinned Allure 3.
    for data in ("mailproof/report/templates/rehearsal.html.j2", "mailproof/report/allure/package-lock.json",
                 "mailproof/report/allure/allurerc.mjs"):
        assert data in names


def test_core_requirements_leave_load_imap_and_reports_to_extras(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    core = {r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requires if ";" not in r}
    assert core == {"pytest", "aiosmtpd", "aiohttp", "requests"}, core
    assert not core & EXTRA_ONLY
    extras = {r.split("extra ==")[1].strip().strip('"') for r in requires if "extra ==" in r}
    assert {"imap", "load", "report", "tls", "checks", "all"} <= extras


BLOCKER = textwrap.dedent(f"""
    # Makes the optional dependencies unimportable, as on a core-only install.
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
""")

USER_TEST = textwrap.dedent("""
    import smtplib
    import sys
    from email.message import EmailMessage

    import pytest

    from fakes.payment import FakeStripe   # the user's own fakes/ package, not shadowed


    def test_mailbox_on_the_in_process_sink(mailbox, mailproof_backend):
        addr = mailbox.address("signup")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.test", addr, "Welcome aboard"
        msg.set_content("hello")
        with smtplib.SMTP(mailproof_backend.smtp_host, mailproof_backend.smtp_port) as smtp:
            smtp.send_message(msg)
        assert mailbox.wait_for(to=addr, subject="Welcome", within=5).subject == "Welcome aboard"
        assert FakeStripe.name == "user's own"
        loaded = {name.split(".")[0] for name in sys.modules}
        assert not loaded & {"locust", "gevent", "matplotlib", "allure", "imap_tools"}, loaded


    def test_a_missing_extra_names_the_install_command():
        from mailproof.extras import MissingExtra
        import mailproof.load

        with pytest.raises(MissingExtra, match=r"pip install 'mailproof\\[load\\]'"):
            mailproof.load.FlowUser
        with pytest.raises(MissingExtra, match=r"pip install 'mailproof\\[imap\\]'"):
            import mailproof.imap  # noqa: F401
        from mailproof import Message

        with pytest.raises(MissingExtra, match=r"pip install 'mailproof\\[checks\\]'"):
            Message(b"From: a@b.test\\r\\n\\r\\nhi\\r\\n").checks.dkim()
""")


def test_the_plugin_runs_on_the_core_alone_beside_a_users_fakes_package(pytester, monkeypatch):
    blocker = pytester.mkdir("blocker")
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    fakes = pytester.mkpydir("fakes")
    (fakes / "payment.py").write_text("class FakeStripe:\n    name = \"user's own\"\n")
    pytester.makepyfile(test_user=USER_TEST)
    # The extras' own pytest plugins are installed in this venv; on a core install they are not.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:allure_pytest",
                                           "-p", "no:locust", "-q")
    result.assert_outcomes(passed=2)
