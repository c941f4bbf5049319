"""pytest plugin: fixtures for the capture backend, a per-test Mailbox, and running flows.

Registered through the ``pytest11`` entry point, so any project with mailproof installed has:
``mailbox``, ``flow``, ``run_flow``, ``mailproof_backend``, ``mailproof_app_url`` and the
options below. Session fixtures are per xdist worker: each worker gets its own sink.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from mailproof.addresses import AddressBook
from mailproof.capture.embedded import EmbeddedSink
from mailproof.errors import MailproofError
from mailproof.faults import ScopedFaults
from mailproof.flow import Flow, run
from mailproof.http import AppSession
from mailproof.extras import available
from mailproof.mailbox import Mailbox
from mailproof.reporting import NullReporter

# Allure is the report extra: with allure-pytest installed, flows record steps and email previews
# and the hooks add failure categories and environment.properties; without it, nothing of it loads.
ALLURE = available("allure")
pytest_plugins = ["mailproof.report.allure_hooks"] if ALLURE else []

BACKENDS = ("sink", "imap")
# IMAP account settings: ini key mailproof_imap_<key> or env MAILPROOF_IMAP_<KEY>. With no host,
# the imap backend starts a private Dovecot (behind a private Postfix when running as root).
IMAP_SETTINGS = {
    "host": "IMAP server of the test inbox (empty: start a private Dovecot)",
    "port": "IMAP port (default 993 for tls=ssl, else 143)",
    "tls": "ssl (implicit TLS), starttls, or plain (loopback tests only)",
    "user": "IMAP login",
    "password": "IMAP password (prefer the env var MAILPROOF_IMAP_PASSWORD)",
    "folder": "folder the test mail lands in (default INBOX)",
    "address": "the inbox's address; test addresses plus-address it (qa+token@domain)",
}


@dataclass(frozen=True)
class Settings:
    backend: str
    app_url: str
    sink_host: str
    sink_port: int
    domain: str
    within: float
    imap: dict


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mailproof", "mailproof email flow testing")
    group.addoption("--mailbox", dest="mailproof_backend", choices=BACKENDS, default=None,
                    help="where flows read mail: 'sink' (in-process aiosmtpd, default) or 'imap'")
    group.addoption("--app-url", dest="mailproof_app_url", default=None,
                    help="base URL of an already running application under test")
    group.addoption("--sink-host", dest="mailproof_sink_host", default=None,
                    help="address the capture sink binds (default 127.0.0.1)")
    group.addoption("--sink-port", dest="mailproof_sink_port", default=None, type=int,
                    help="port the capture sink binds (default 0: the OS picks one)")
    parser.addini("mailproof_backend", "default capture backend: sink or imap", default="sink")
    parser.addini("mailproof_app_url", "base URL of the application under test", default="")
    parser.addini("mailproof_sink_host", "address the capture sink binds", default="127.0.0.1")
    parser.addini("mailproof_sink_port", "port the capture sink binds (0: OS-chosen)", default="0")
    parser.addini("mailproof_domain", "domain of the test addresses handed out", default="mailproof.test")
    parser.addini("mailproof_within", "default seconds a wait_for waits", default="10")
    for key, help_text in IMAP_SETTINGS.items():
        parser.addini(f"mailproof_imap_{key}", help_text, default="")


# Backends with a capture sink in the application's SMTP path, where faults can be injected.
FAULT_BACKENDS = ("sink",)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "flow: a test that runs a mailproof flow (added automatically)")
    config.addinivalue_line(
        "markers", "sink_faults: the test injects SMTP faults at the capture sink (added automatically "
        "to tests that use the sink_faults fixture); deselected on backends without one (imap)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"flow", "run_flow"} & names:
            item.add_marker(pytest.mark.flow)
        if "sink_faults" in names:
            item.add_marker(pytest.mark.sink_faults)
    backend = _setting(config, "backend", "MAILPROOF_BACKEND")
    if backend in FAULT_BACKENDS:
        return
    # A fault that cannot be injected must not let its test pass (nor fail it for the wrong
    # reason): such tests are deselected, and the summary says so once.
    dropped = [item for item in items if item.get_closest_marker("sink_faults")]
    if dropped:
        items[:] = [item for item in items if not item.get_closest_marker("sink_faults")]
        config.hook.pytest_deselected(items=dropped)
        config.stash[_DESELECTED] = (len(dropped), backend)


_DESELECTED = pytest.StashKey[tuple]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    count, backend = config.stash.get(_DESELECTED, (0, ""))
    if count:
        terminalreporter.write_line(
            f"mailproof: {count} test(s) marked sink_faults deselected: --mailbox={backend} has no "
            "capture sink in the application's SMTP path to inject faults at (run them on --mailbox=sink)")


def _setting(config: pytest.Config, name: str, env: str) -> Any:
    value = config.getoption(f"mailproof_{name}", default=None)
    if value is None:
        value = os.environ.get(env) or config.getini(f"mailproof_{name}")
    return value


@pytest.fixture(scope="session")
def mailproof_settings(pytestconfig: pytest.Config) -> Settings:
    try:
        settings = Settings(
            backend=_setting(pytestconfig, "backend", "MAILPROOF_BACKEND"),
            app_url=_setting(pytestconfig, "app_url", "MAILPROOF_APP_URL"),
            sink_host=_setting(pytestconfig, "sink_host", "MAILPROOF_SINK_HOST"),
            sink_port=int(_setting(pytestconfig, "sink_port", "MAILPROOF_SINK_PORT")),
            domain=pytestconfig.getini("mailproof_domain"),
            within=float(pytestconfig.getini("mailproof_within")),
            imap={key: os.environ.get(f"MAILPROOF_IMAP_{key.upper()}") or pytestconfig.getini(f"mailproof_imap_{key}")
                  for key in IMAP_SETTINGS},
        )
    except ValueError as exc:
        raise MailproofError(f"invalid mailproof setting: {exc}. Check --sink-port and mailproof_within.") from exc
    if settings.backend not in BACKENDS:
        raise MailproofError(f"unknown mailbox backend {settings.backend!r}: use one of {', '.join(BACKENDS)}")
    return settings


@pytest.fixture(scope="session")
def mailproof_backend(mailproof_settings: Settings):
    """The running capture backend: ``smtp_host``/``smtp_port`` to send to, ``store`` to read."""
    if mailproof_settings.backend == "imap":
        from mailproof.imap.backend import open_imap_backend  # imported only when chosen

        with open_imap_backend(mailproof_settings.imap) as backend:
            yield backend
        return
    with EmbeddedSink(host=mailproof_settings.sink_host, port=mailproof_settings.sink_port) as backend:
        yield backend


@pytest.fixture(scope="session")
def mailproof_address_book(mailproof_backend, mailproof_settings: Settings) -> AddressBook:
    """Backends that read one real inbox bring their own (plus-addressing on that inbox)."""
    return getattr(mailproof_backend, "address_book", None) or AddressBook(domain=mailproof_settings.domain)


@pytest.fixture
def mailbox(mailproof_backend, mailproof_address_book, mailproof_settings):
    """A clean view for this test: only mail captured from now on, addresses unique to the run."""
    with Mailbox(mailproof_backend.store, mailproof_address_book,
                 default_within=mailproof_settings.within) as view:
        yield view


@pytest.fixture
def sink_faults(mailproof_backend, request):
    """Fault rules for this test only: ``sink_faults.rule("rcpt", "451 4.3.0 later", to=addr)``.

    Every rule added here is removed when the test ends, pass or fail.
    """
    scoped = ScopedFaults(mailproof_backend.faults, scope=request.node.nodeid)
    yield scoped
    scoped.clear()


@pytest.fixture(scope="session")
def mailproof_app_url(mailproof_settings: Settings) -> str:
    """Base URL of the application under test. Override this fixture to start your app."""
    if not mailproof_settings.app_url:
        raise MailproofError(
            "no application URL: pass --app-url, set mailproof_app_url in the ini file or "
            "MAILPROOF_APP_URL, or override the mailproof_app_url fixture to start the app"
        )
    return mailproof_settings.app_url


@pytest.fixture
def flow(mailbox, mailproof_app_url, request) -> Flow:
    """A Flow bound to the application and this test's mailbox, reporting to Allure."""
    session = AppSession(mailproof_app_url)
    if ALLURE:
        from mailproof.report.allure_reporter import AllureReporter

        reporter = AllureReporter()
    else:
        reporter = NullReporter()
    yield Flow(http=session, mailbox=mailbox, reporter=reporter, name=request.node.name)
    session.close()


@pytest.fixture
def run_flow(flow: Flow, pytestconfig: pytest.Config) -> Callable[..., Any]:
    """``run_flow(fn, **params)``: label the test in Allure from the flow and run it.

    With Allure: feature, story, severity, description and the flow's source as a path relative
    to the rootdir (a link too with ``mailproof_source_url``; see mailproof.report.allure_reporter).
    """

    def runner(fn: Callable[..., Any], **params: Any) -> Any:
        if ALLURE:
            from mailproof.report.allure_reporter import label_flow_test

            label_flow_test(fn, pytestconfig)
        return run(fn, flow, **params)

    return runner
