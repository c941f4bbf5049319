"""pytest hooks that complete the Allure results of a flow run.

Registered by the mailproof plugin (``pytest_plugins = ["mailproof.report.allure_hooks"]`` in
mailproof/pytest_plugin.py); ``-p mailproof.report.allure_hooks`` loads it by hand. It does three things:

1. **Readable diffs for flows.** pytest rewrites ``assert`` only in test modules; flow functions
   live in other modules (``flows/accounts.py``). The packages named in the ini key
   ``mailproof_flow_modules`` (default ``flows``) are registered for assertion rewriting before
   any conftest imports them, so a failing ``assert x == y`` in a flow shows both sides.
2. **Failure categories.** A failed or broken flow test gets the label ``failure`` with one of
   the CATEGORIES below; ``reports/allurerc.mjs`` groups the report's Categories tab by it (and,
   for results written without this plugin, by the exception class in the message).
3. **environment.properties** in the ``--alluredir``: application URL, mailbox backend, and the
   versions of Python, mailproof, aiosmtpd, locust, pytest and allure-pytest. Written by the
   xdist controller or a run without xdist, never by a worker, once at session start and again
   at session end (atomically: a worker started with ``--clean-alluredir`` may have wiped it).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

import allure
import pytest
import requests

from mailproof.errors import MailLate, MailNotDelivered, MailproofError, UnexpectedMail

FAILURE_LABEL = "failure"
MAIL_NOT_DELIVERED = "Mail never arrived"
MAIL_LATE = "Mail late"
UNEXPECTED_MAIL = "Unexpected mail"
CONTENT_MISMATCH = "Content mismatch"
APPLICATION_ERROR = "Application error"
HARNESS_ERROR = "Harness error"
CATEGORIES = (MAIL_NOT_DELIVERED, MAIL_LATE, UNEXPECTED_MAIL, CONTENT_MISMATCH, APPLICATION_ERROR, HARNESS_ERROR)

ENVIRONMENT_FILE = "environment.properties"
VERSIONS = ("mailproof", "aiosmtpd", "locust", "pytest", "allure-pytest")
_labelled = pytest.StashKey[bool]()


# -- 1. assertion rewriting for flow modules -----------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("mailproof_flow_modules", "packages/modules holding flow functions, rewritten by pytest "
                  "so failed asserts in flows show a diff", type="linelist", default=["flows"])


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    names = [n for n in early_config.getini("mailproof_flow_modules") if n not in sys.modules]
    if names:
        pytest.register_assert_rewrite(*names)


# -- 2. failure categories -------------------------------------------------------------------------


def classify(exc: Optional[BaseException], server_errors: Iterable[str] = ()) -> str:
    """The category QA filters a failed flow test by.

    A harness fault comes first (it says nothing about the product); then an application that
    answered 5xx or could not be reached (a flow assertion on that status, or a mail that never
    came after it, is a consequence); then what the mailbox saw; any other assertion is content.
    """
    if isinstance(exc, MailproofError):
        return HARNESS_ERROR
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError)) or any(True for _ in server_errors):
        return APPLICATION_ERROR
    if isinstance(exc, MailNotDelivered):
        return MAIL_NOT_DELIVERED
    if isinstance(exc, MailLate):
        return MAIL_LATE
    if isinstance(exc, UnexpectedMail):
        return UNEXPECTED_MAIL
    if isinstance(exc, (AssertionError, pytest.fail.Exception)):
        return CONTENT_MISMATCH
    return HARNESS_ERROR


def _server_errors(item: pytest.Item) -> list[str]:
    flow = getattr(item, "funcargs", {}).get("flow")
    reporter = getattr(flow, "reporter", None)
    return list(getattr(reporter, "server_errors", ()) or ())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and call.excinfo is not None and not item.stash.get(_labelled, False) \
            and not hasattr(report, "wasxfail"):
        item.stash[_labelled] = True
        allure.dynamic.label(FAILURE_LABEL, classify(call.excinfo.value, _server_errors(item)))
    return report


# -- 3. environment.properties ---------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _setting(config: pytest.Config, name: str, env: str) -> str:
    """The same precedence as the plugin: command-line option, environment, ini."""
    value = config.getoption(f"mailproof_{name}", default=None)
    if value is None:
        value = os.environ.get(env)
    if value is None:
        try:
            value = config.getini(f"mailproof_{name}")
        except ValueError:  # the plugin's options are not registered (used standalone)
            value = ""
    return str(value or "")


def environment_properties(config: pytest.Config) -> dict[str, str]:
    app_url = _setting(config, "app_url", "MAILPROOF_APP_URL")
    props = {
        "app.url": app_url or "started by the test session (free port per worker)",
        "mailbox.backend": _setting(config, "backend", "MAILPROOF_BACKEND") or "sink",
        "python.version": f"{platform.python_version()} ({platform.python_implementation()})",
        "os": platform.platform(terse=True),
    }
    workers = config.getoption("numprocesses", default=None)
    if workers:
        props["xdist.workers"] = str(workers)
    props.update({f"{dist}.version": _version(dist) for dist in VERSIONS})
    return props


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def write_environment(alluredir: Path, props: dict[str, str]) -> Path:
    """Write ``environment.properties`` into ``alluredir`` atomically (rename over any old one)."""
    alluredir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{_escape(key)}={_escape(value)}\n" for key, value in props.items())
    fd, tmp = tempfile.mkstemp(dir=alluredir, prefix=".environment.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    target = alluredir / ENVIRONMENT_FILE
    os.replace(tmp, target)
    return target


def _alluredir(config: pytest.Config) -> Optional[Path]:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes it
        return None
    value = config.getoption("allure_report_dir", default=None)
    return Path(value) if value else None


def _write_for(session: pytest.Session) -> None:
    alluredir = _alluredir(session.config)
    if alluredir is not None:
        write_environment(alluredir, environment_properties(session.config))


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _write_for(session)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    _write_for(session)
