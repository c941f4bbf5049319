"""pytest hooks that complete the Allure results of a flow run.

Registered by the mailproof plugin (``pytest_plugins = ["mailproof.report.allure_hooks"]`` in
mailproof/pytest_plugin.py); ``-p mailproof.report.allure_hooks`` loads it by hand. It does:

1. **Readable diffs for flows.** pytest rewrites ``assert`` only in test modules; flow functions
   live in other modules (``flows/accounts.py``). The packages named in the ini key
   ``mailproof_flow_modules`` (default ``flows``) are registered for assertion rewriting before
   any conftest imports them, so a failing ``assert x == y`` in a flow shows both sides.
2. **Failure categories.** A failed or broken flow test gets the label ``failure`` with one of
   the CATEGORIES below; ``mailproof/report/allure/allurerc.mjs`` groups the report's Categories
   tab by it (and, for results written without this plugin, by the exception class in the message).
3. **environment.properties** in the ``--alluredir``: application URL, mailbox backend, and the
   versions of Python, mailproof, aiosmtpd, locust, pytest and allure-pytest. Written by the
   xdist controller or a run without xdist, never by a worker, once at session start and again
   at session end (atomically: a worker started with ``--clean-alluredir`` may have wiped it).
4. **No harness noise for QA.**
   - A failed wait (MailNotDelivered, MailLate, UnexpectedMail) is reported with its message
     (what was expected, the near misses) and the user's frames only: the test and the flow
     line that waited. Frames of the mailproof package itself (``Mailbox.wait_for``, the
     ``run_flow`` runner) are left out, in Allure's trace and on the terminal alike, as they
     are for an assertion failing in the user's own code; ``--fulltrace`` shows them. Harness
     errors and anything else keep their whole traceback.
   - Set up / Tear down lists only real fixtures and teardowns. pytest (9.1 and later) gives
     every fixture an internal finalizer (a ``lambda`` that calls
     ``pytest_fixture_post_finalizer``); allure-pytest 2.16 wraps it like a real one, and since
     that finalizer is what closes the fixture's Allure container, the wrapped entry is written
     still open: a ``<fixture>::<lambda>`` teardown of unknown status on every fixture
     (allure-framework/allure-python#918). It is unwrapped here, and the teardown of a yield
     fixture is named ``<fixture>::teardown`` rather than by its position (``::1``).
5. The ini key ``mailproof_source_url`` (env ``MAILPROOF_SOURCE_URL``), read by
   mailproof.report.allure_reporter.label_flow_test: see there.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import allure
import allure_commons
import pytest
import requests

import mailproof
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
    parser.addini("mailproof_source_url", "where the report links each flow's source: a repository browse URL "
                  "prefix (https://git.example/shop/blob/main/) or a template with {path} and {line}; "
                  "empty: the source is shown as a rootdir-relative path only (env MAILPROOF_SOURCE_URL)",
                  default="")


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
    hide = call.excinfo is not None and is_product_failure(call.excinfo) \
        and not item.config.getoption("fulltrace", False) and callable(getattr(item, "_traceback_filter", None))
    own = item.__dict__.get("_traceback_filter")  # set on this very item by someone else (rarely)
    if hide:  # for the report made below, which Allure's trace and the terminal are written from
        item._traceback_filter = _without_harness_frames(item._traceback_filter, item.config)
    try:
        report = yield
    finally:
        if hide:
            if own is None:
                del item._traceback_filter  # the class's own again
            else:
                item._traceback_filter = own
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


# -- 4a. failed waits without harness frames ----------------------------------------------------

MAIL_ERRORS = (MailNotDelivered, MailLate, UnexpectedMail)
HARNESS_DIR = Path(mailproof.__file__).resolve().parent


def is_harness_frame(entry: Any) -> bool:
    """Whether a traceback entry runs code of the installed mailproof package."""
    try:
        path = Path(entry.frame.code.raw.co_filename).resolve()
    except (AttributeError, OSError, ValueError):
        return False
    return path.is_relative_to(HARNESS_DIR)


def is_product_failure(excinfo: pytest.ExceptionInfo) -> bool:
    """A failed wait, or an assertion of the test's own code (a flow's ``assert``): what the
    product did wrong, which harness frames only hide. Errors of the harness keep them."""
    if isinstance(excinfo.value, MAIL_ERRORS):
        return True
    if isinstance(excinfo.value, (AssertionError, pytest.fail.Exception)):
        entries = excinfo.traceback
        return bool(len(entries)) and not is_harness_frame(entries[-1])
    return False


def _without_harness_frames(tbfilter: Callable[[pytest.ExceptionInfo], Any], config: pytest.Config):
    """``tbfilter`` (pytest's cut to the test function and hiding of its own frames), then without
    mailproof's frames: what remains is the test, the flow function(s) and the flow line that
    waited, followed by the message. Filtering ``excinfo.traceback`` beforehand would not do:
    pytest's cut rebuilds the traceback from the raw one."""

    def traceback_filter(excinfo: pytest.ExceptionInfo):
        traceback = tbfilter(excinfo)
        kept = [entry for entry in traceback if not is_harness_frame(entry)]
        if not kept or len(kept) == len(traceback):
            return traceback
        if config.getoption("tbstyle", "auto") == "auto":  # as pytest does: first and last in full
            kept = [entry.with_repr_style(None if i in (0, len(kept) - 1) else "short") for i, entry in enumerate(kept)]
        return type(traceback)(kept)

    return traceback_filter


# -- 4b. fixtures as Allure shows them ---------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    """Outside allure-pytest's own wrapper: once it has wrapped the fixture's finalizers, tidy them."""
    try:
        return (yield)
    finally:
        tidy_allure_finalizers(fixturedef)


def tidy_allure_finalizers(fixturedef: pytest.FixtureDef) -> None:
    finalizers = getattr(fixturedef, "_finalizers", None)
    if not isinstance(finalizers, list):
        return
    for index, wrapped in enumerate(finalizers):
        if not isinstance(wrapped, allure_commons.fixture):
            continue
        finalizer = getattr(wrapped, "_fixture_function", None)
        if finalizer is None:
            continue
        if _is_pytest_internal(finalizer):
            finalizers[index] = finalizer  # pytest's bookkeeping: not a teardown, and closes the container
            continue
        name = getattr(wrapped, "_name", None)
        if isinstance(name, str) and "::" in name:
            wrapped._name = f"{name.rpartition('::')[0]}::{_teardown_name(finalizer)}"


def _is_pytest_internal(finalizer: Any) -> bool:
    """pytest's own finalizer (not a partial: the yield-fixture teardown is one, of a _pytest function)."""
    if isinstance(finalizer, functools.partial):
        return False
    module = getattr(finalizer, "__module__", None) or ""
    return module == "_pytest" or module.startswith("_pytest.")


def _teardown_name(finalizer: Any) -> str:
    func = finalizer.func if isinstance(finalizer, functools.partial) else finalizer
    name = getattr(func, "__name__", "") or ""
    if name == "_teardown_yield_fixture":  # the code after a fixture's ``yield``
        return "teardown"
    if not name or name.startswith("<"):  # a lambda registered with request.addfinalizer
        return "finalizer"
    return name
