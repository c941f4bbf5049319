"""pytest plugin: fixtures for the capture backend, a per-test Mailbox, and running flows.

Registered through the ``pytest11`` entry point, so any project with mailproof installed has:
``mailbox``, ``flow``, ``run_flow``, ``mailproof_backend``, ``mailproof_app_url`` and the
options below. Session fixtures are per xdist worker: each worker gets its own sink.

Backends (``--mailbox``):

- ``sink`` (default): an in-process aiosmtpd sink per worker, on ``--sink-host``/``--sink-port``
  (port 0: each worker's own OS-chosen port, ``mailproof_backend.smtp_port``). A fixed
  ``--sink-port`` with more than one xdist worker is refused at once: each worker would bind it.
- ``service``: a running sink service (``python -m mailproof.capture.service``) at ``--sink-url``
  (ini ``mailproof_sink_url``, env ``MAILPROOF_SINK_URL``; its token in ``MAILPROOF_SINK_TOKEN``).
  Every worker reads it through its own ``RemoteSink``, so all workers share the ONE SMTP port
  an already running app sends to. Addresses carry a random run id per worker, and each worker
  keeps only the mail to its own addresses (and to addresses no mailproof run handed out); a
  ``sink_faults`` rule is scoped to its test and run on the service, and reaches everybody's SMTP
  sessions unless it names a recipient (``to=``/``to_pattern=``): the fixture warns when it does not.
- ``imap``: a real inbox (see ``IMAP_SETTINGS``); no fault injection.

STARTTLS and AUTH on the ``sink`` backend: ``mailproof_sink_tls`` / ``--sink-tls`` / env
``MAILPROOF_SINK_TLS`` (off | starttls | starttls-required) and ``mailproof_sink_auth`` /
``--sink-auth`` / env ``MAILPROOF_SINK_AUTH`` (``user:password``; AUTH then required). With TLS
on, ``mailproof_backend.tls_ca_file`` is the throwaway CA's certificate, for the app under test:
``SSL_CERT_FILE=<tls_ca_file>`` (Python) or ``NODE_EXTRA_CA_CERTS=<tls_ca_file>`` (Node), see
``mailproof.capture.tls``. On ``service`` the service's own ``--tls``/``--auth`` decide, and
``tls_ca_file`` comes from its ``/health``.

Transports (``--transport``, ini ``mailproof_transport``, env ``MAILPROOF_TRANSPORT``): ``smtp``
(default) or a provider's HTTP API, ``sendgrid``, ``mailgun``, ``ses`` or ``postmark``. On a
provider transport ``mailproof_providers`` is a running ``ProviderCapture`` (one loopback port for
all four APIs) feeding the same store as the sink, and ``mailproof_transport`` says what the app
under test must be configured with (name, base URL, key). Tests that inject SMTP faults
(``sink_faults``) are deselected there; tests that use ``provider_faults`` are deselected on smtp.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest

from mailproof.addresses import TOKEN, AddressBook
from mailproof import checks as _checks
from mailproof.capture.embedded import EmbeddedSink
from mailproof.capture.service import TOKEN_ENV
from mailproof.capture.tls import AUTH_ENV, TLS_MODES, parse_auth, parse_tls_mode, trustme_available
from mailproof.errors import MailproofError
from mailproof.faults import ScopedFaults
from mailproof.flow import Flow, run
from mailproof.http import DEFAULT_HTTP_TIMEOUT, AppSession
from mailproof.extras import available
from mailproof.mailbox import Mailbox
from mailproof.providers.faults import PROVIDERS
from mailproof.reporting import NullReporter

# Allure is the report extra: with allure-pytest installed, flows record steps and email previews
# and the hooks add failure categories and environment.properties; without it, nothing of it loads.
ALLURE = available("allure")
pytest_plugins = ["mailproof.report.allure_hooks"] if ALLURE else []

BACKENDS = ("sink", "service", "imap")
TRANSPORTS = ("smtp",) + PROVIDERS
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
    sink_url: str = ""
    sink_token: Optional[str] = field(default=None, repr=False)
    sink_tls: str = "off"
    sink_auth: Optional[tuple[str, str]] = field(default=None, repr=False)
    timeout: Optional[float] = None  # how long a wait waits for late mail (None: max(3*within, within+10))
    http_timeout: float = DEFAULT_HTTP_TIMEOUT  # seconds a flow's HTTP request may take
    transport: str = "smtp"  # smtp, or the provider API the app sends through


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mailproof", "mailproof email flow testing")
    group.addoption("--mailbox", dest="mailproof_backend", choices=BACKENDS, default=None,
                    help="where flows read mail: 'sink' (in-process aiosmtpd per worker, default), "
                         "'service' (a running sink service at --sink-url, one SMTP port for every "
                         "worker) or 'imap'")
    group.addoption("--app-url", dest="mailproof_app_url", default=None,
                    help="base URL of an already running application under test")
    group.addoption("--sink-host", dest="mailproof_sink_host", default=None,
                    help="address the capture sink binds (default 127.0.0.1)")
    group.addoption("--sink-port", dest="mailproof_sink_port", default=None, type=int,
                    help="port the capture sink binds (default 0: the OS picks one; a fixed port "
                         "works with one worker only)")
    group.addoption("--sink-url", dest="mailproof_sink_url", default=None,
                    help="with --mailbox=service: the sink service's HTTP URL (its READY line); "
                         f"token in {TOKEN_ENV}")
    group.addoption("--sink-tls", dest="mailproof_sink_tls", default=None, choices=TLS_MODES,
                    help="STARTTLS on the in-process sink: off, starttls or starttls-required "
                         "(mailproof_backend.tls_ca_file is the CA for the app to trust)")
    group.addoption("--mailproof-render", dest="mailproof_render", action="store_true", default=False,
                    help="render every awaited email in headless Chromium at 600 and 375 px and attach the "
                         "PNGs to Allure (needs the Debian package chromium; ~0.3 s an email)")
    group.addoption("--sink-auth", dest="mailproof_sink_auth", default=None, metavar="USER:PASSWORD",
                    help=f"require SMTP AUTH on the in-process sink (better: {AUTH_ENV})")
    group.addoption("--transport", dest="mailproof_transport", choices=TRANSPORTS, default=None,
                    help="how the app under test sends: 'smtp' (default) or a provider's HTTP API "
                         "(sendgrid, mailgun, ses, postmark), captured on loopback into the same mailbox")
    parser.addini("mailproof_transport", "how the app under test sends: smtp, sendgrid, mailgun, ses or postmark",
                  default="smtp")
    parser.addini("mailproof_backend", "default capture backend: sink, service or imap", default="sink")
    parser.addini("mailproof_app_url", "base URL of the application under test", default="")
    parser.addini("mailproof_sink_host", "address the capture sink binds", default="127.0.0.1")
    parser.addini("mailproof_sink_port", "port the capture sink binds (0: OS-chosen)", default="0")
    parser.addini("mailproof_sink_url", "URL of the sink service (--mailbox=service)", default="")
    parser.addini("mailproof_sink_tls", "STARTTLS on the capture sink: off, starttls or starttls-required",
                  default="off")
    parser.addini("mailproof_sink_auth", f"USER:PASSWORD the capture sink requires (or env {AUTH_ENV})",
                  default="")
    parser.addini("mailproof_render", "render every awaited email in Chromium to PNG for Allure (true/false)",
                  default="false")
    parser.addini("mailproof_domain", "domain of the test addresses handed out", default="mailproof.test")
    parser.addini("mailproof_within", "default SLO of a wait_for: seconds from the trigger (later mail is MailLate)",
                  default="10")
    parser.addini("mailproof_http_timeout", "seconds a flow's HTTP request to the app may take",
                  default=str(DEFAULT_HTTP_TIMEOUT))
    parser.addini("mailproof_timeout", "default seconds a wait_for waits for late mail "
                  "(empty: max(3 * within, within + 10))", default="")
    for key, help_text in IMAP_SETTINGS.items():
        parser.addini(f"mailproof_imap_{key}", help_text, default="")


# Backends with a capture sink in the application's SMTP path, where faults can be injected.
FAULT_BACKENDS = ("sink", "service")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "flow: a test that runs a mailproof flow (added automatically)")
    config.addinivalue_line(
        "markers", "sink_faults: the test injects SMTP faults at the capture sink (added automatically "
        "to tests that use the sink_faults fixture); deselected on backends without one (imap) and "
        "on provider transports")
    config.addinivalue_line(
        "markers", "provider_faults: the test makes the provider API misbehave (added automatically to "
        "tests that use the provider_faults fixture); deselected on --transport smtp")
    config.addinivalue_line(
        "markers", "smtp_transport: the test checks what only the application's own SMTP path carries "
        "(its own DKIM signature, say); deselected on provider transports")
    if getattr(config, "workerinput", None) is None and not config.getoption("help", False):
        # The controller (or a run without xdist) checks once, before any worker starts.
        problem = _configuration_problem(config)
        if problem:
            raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"flow", "run_flow"} & names:
            item.add_marker(pytest.mark.flow)
        if "sink_faults" in names:
            item.add_marker(pytest.mark.sink_faults)
        if "provider_faults" in names:
            item.add_marker(pytest.mark.provider_faults)
    backend = _setting(config, "backend", "MAILPROOF_BACKEND")
    transport = _setting(config, "transport", "MAILPROOF_TRANSPORT")
    # A fault that cannot be injected must not let its test pass (nor fail it for the wrong
    # reason): such tests are deselected, and the summary says so once.
    unusable = []
    if backend not in FAULT_BACKENDS or transport != "smtp":
        unusable.append("sink_faults")
    if transport != "smtp":
        unusable.append("smtp_transport")
    if transport == "smtp":
        unusable.append("provider_faults")
    dropped = [item for item in items if any(item.get_closest_marker(m) for m in unusable)]
    if dropped:
        items[:] = [item for item in items if item not in dropped]
        config.hook.pytest_deselected(items=dropped)
        config.stash[_DESELECTED] = (len(dropped), backend, transport)


_DESELECTED = pytest.StashKey[tuple]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    count, backend, transport = config.stash.get(_DESELECTED, (0, "", ""))
    if not count:
        return
    if transport != "smtp":
        terminalreporter.write_line(
            f"mailproof: {count} test(s) marked sink_faults or smtp_transport deselected: on --transport "
            f"{transport} the application sends through the provider's API, not the SMTP sink, and the "
            "provider signs its mail, not the app (provider_faults tests run here)")
    elif backend not in FAULT_BACKENDS:
        terminalreporter.write_line(
            f"mailproof: {count} test(s) marked sink_faults or provider_faults deselected: --mailbox={backend} "
            "has no capture sink in the application's SMTP path to inject faults at (run them on "
            "--mailbox=sink or --mailbox=service), and provider faults need a provider --transport")
    else:
        terminalreporter.write_line(
            f"mailproof: {count} test(s) marked provider_faults deselected: they need a provider transport "
            "(--transport sendgrid, mailgun, ses or postmark)")


def _setting(config: pytest.Config, name: str, env: str) -> Any:
    value = config.getoption(f"mailproof_{name}", default=None)
    if value is None:
        value = os.environ.get(env) or config.getini(f"mailproof_{name}")
    return value


SERVICE_URL_MISSING = (
    "--mailbox=service reads mail from a running sink service, and no service URL was given: pass "
    "--sink-url http://127.0.0.1:HTTP_PORT (or set mailproof_sink_url in the ini file, or "
    f"MAILPROOF_SINK_URL; a token goes in {TOKEN_ENV}). Start the service first with `mailproof sink` "
    "or `python -m mailproof.capture.service --smtp-port 2525` (the port your app sends to): "
    "its READY line names the URL.")

FIXED_PORT_UNDER_XDIST = (
    "--sink-port {port} (mailproof_sink_port / MAILPROOF_SINK_PORT) cannot work with {workers} "
    "pytest-xdist workers: under xdist each worker runs its own sink, so a fixed port can be bound "
    "only once. To have every worker capture the mail sent to one port (an already running app's "
    "SMTP port), run a sink service on it (python -m mailproof.capture.service --smtp-port {port}) "
    "and use --mailbox=service --sink-url http://127.0.0.1:HTTP_PORT; or drop --sink-port, and "
    "each worker's sink takes a free port of its own (mailproof_backend.smtp_port).")


def _xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run has (0 without xdist)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # inside a worker
        return int(workerinput.get("workercount") or 1)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    # The controller: xdist has turned -n auto/logical into a number before pytest_configure.
    numprocesses = config.getoption("numprocesses", None)
    try:
        count = int(numprocesses or 0)
    except (TypeError, ValueError):
        count = 0
    return max(count, len(config.getoption("tx", None) or []))


def _configuration_problem(config: pytest.Config) -> Optional[str]:
    """What makes the chosen backend unusable, said before any test runs (None: nothing)."""
    backend = _setting(config, "backend", "MAILPROOF_BACKEND")
    transport = _setting(config, "transport", "MAILPROOF_TRANSPORT")
    if transport not in TRANSPORTS:
        return f"unknown transport {transport!r} (mailproof_transport / MAILPROOF_TRANSPORT): use one of {', '.join(TRANSPORTS)}"
    if transport != "smtp" and backend != "sink":
        return (f"--transport {transport} captures the provider API in this process, into the in-process "
                f"sink's mailbox: run it with --mailbox=sink (not {backend})")
    if backend == "service":
        if not _setting(config, "sink_url", "MAILPROOF_SINK_URL"):
            return SERVICE_URL_MISSING
        return None
    if backend != "sink":
        return None
    try:
        port = int(_setting(config, "sink_port", "MAILPROOF_SINK_PORT"))
    except (TypeError, ValueError):
        return None  # mailproof_settings says what is wrong with it
    workers = _xdist_workers(config)
    if port and workers > 1:
        return FIXED_PORT_UNDER_XDIST.format(port=port, workers=workers)
    try:
        tls = parse_tls_mode(_setting(config, "sink_tls", "MAILPROOF_SINK_TLS"))
        parse_auth(_setting(config, "sink_auth", AUTH_ENV))
    except MailproofError as exc:
        return str(exc)
    if tls != "off" and not trustme_available():
        return (f"mailproof_sink_tls = {tls} needs a throwaway CA, made with trustme, which is not "
                "installed: pip install 'mailproof[tls]' (or set mailproof_sink_tls = off)")
    return None


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
            timeout=float(pytestconfig.getini("mailproof_timeout")) if pytestconfig.getini("mailproof_timeout") else None,
            http_timeout=float(pytestconfig.getini("mailproof_http_timeout")),
            imap={key: os.environ.get(f"MAILPROOF_IMAP_{key.upper()}") or pytestconfig.getini(f"mailproof_imap_{key}")
                  for key in IMAP_SETTINGS},
            sink_url=_setting(pytestconfig, "sink_url", "MAILPROOF_SINK_URL") or "",
            sink_token=os.environ.get(TOKEN_ENV) or None,
            sink_tls=parse_tls_mode(_setting(pytestconfig, "sink_tls", "MAILPROOF_SINK_TLS")),
            sink_auth=parse_auth(_setting(pytestconfig, "sink_auth", AUTH_ENV)),
            transport=_setting(pytestconfig, "transport", "MAILPROOF_TRANSPORT"),
        )
    except ValueError as exc:
        raise MailproofError(f"invalid mailproof setting: {exc}. Check --sink-port, mailproof_within, mailproof_timeout and mailproof_http_timeout.") from exc
    if settings.backend not in BACKENDS:
        raise MailproofError(f"unknown mailbox backend {settings.backend!r}: use one of {', '.join(BACKENDS)}")
    # Checked in pytest_configure already, except inside xdist workers (and for direct callers).
    problem = _configuration_problem(pytestconfig)
    if problem:
        raise MailproofError(problem)
    return settings


@pytest.fixture(scope="session")
def mailproof_backend(mailproof_settings: Settings):
    """The running capture backend: ``smtp_host``/``smtp_port`` to send to, ``store`` to read.

    ``tls_ca_file``: the CA certificate the app under test must trust (None with TLS off).
    """
    if mailproof_settings.backend == "imap":
        from mailproof.imap.backend import open_imap_backend  # imported only when chosen

        with open_imap_backend(mailproof_settings.imap) as backend:
            yield backend
        return
    if mailproof_settings.backend == "service":
        with _service_backend(mailproof_settings) as backend:
            yield backend
        return
    with EmbeddedSink(host=mailproof_settings.sink_host, port=mailproof_settings.sink_port,
                      tls=mailproof_settings.sink_tls, auth=mailproof_settings.sink_auth) as backend:
        yield backend


@dataclass(frozen=True)
class TransportSettings:
    """What the application under test sends through: ``name`` (smtp or a provider), and for a
    provider the capture's base ``url`` and the credentials it accepts."""

    name: str
    url: Optional[str] = None
    key: Optional[str] = field(default=None, repr=False)     # API key / server token / AWS access key id
    secret: Optional[str] = field(default=None, repr=False)  # AWS secret access key (ses)
    region: str = "us-east-1"
    webhook_key: Optional[str] = field(default=None, repr=False)  # what the app checks webhooks with


@pytest.fixture(scope="session")
def mailproof_providers(mailproof_backend, mailproof_settings: Settings):
    """The running ``ProviderCapture`` on a provider transport (None on smtp), into the sink's store."""
    if mailproof_settings.transport == "smtp":
        yield None
        return
    from mailproof.providers import ProviderCapture

    with ProviderCapture(mailproof_backend.store) as capture:
        yield capture


@pytest.fixture(scope="session")
def mailproof_transport(mailproof_settings: Settings, mailproof_providers) -> TransportSettings:
    name = mailproof_settings.transport
    if mailproof_providers is None:
        return TransportSettings(name)
    keys = mailproof_providers.keys
    key = {"sendgrid": keys.sendgrid, "mailgun": keys.mailgun, "ses": keys.ses_access_key,
           "postmark": keys.postmark}[name]
    return TransportSettings(name, url=mailproof_providers.url, key=key,
                             secret=keys.ses_secret_key if name == "ses" else None,
                             webhook_key=mailproof_providers.webhook_key(name))


@pytest.fixture
def provider_faults(mailproof_providers, mailproof_settings, request):
    """Provider misbehaviour for this test only: ``provider_faults.rule(status=429, to=addr)``
    (``mailproof.providers.faults``). Removed when the test ends; tests using it run only on a
    provider transport (deselected on smtp)."""
    from mailproof.providers import ScopedProviderFaults

    if mailproof_providers is None:
        raise MailproofError("provider_faults needs a provider transport: run with --transport sendgrid, "
                             "mailgun, ses or postmark")
    scoped = ScopedProviderFaults(mailproof_providers.faults, scope=request.node.nodeid)
    yield scoped
    scoped.clear()


def _service_backend(settings: Settings):
    """This worker's ``RemoteSink`` on the sink service at ``settings.sink_url`` (started)."""
    from mailproof.capture.remote import RemoteSink, SinkServiceError

    sink = RemoteSink(settings.sink_url, token=settings.sink_token)
    try:
        sink.start()
    except SinkServiceError as exc:
        raise MailproofError(
            f"--mailbox=service: cannot use the sink service at {settings.sink_url}: {exc}. Is it running "
            f"(python -m mailproof.capture.service prints its URL on the READY line), and is {TOKEN_ENV} "
            "its token?") from exc
    wanted = [(settings.sink_tls != "off" and sink.tls_mode != settings.sink_tls,
               f"mailproof_sink_tls asks for {settings.sink_tls}, but the service runs with TLS {sink.tls_mode}: "
               f"start it with --tls {settings.sink_tls}"),
              (settings.sink_auth is not None and not sink.auth_required,
               "mailproof_sink_auth is set, but the service does not require AUTH: start it with --auth "
               f"(or {AUTH_ENV})")]
    for mismatch, why in wanted:
        if mismatch:
            sink.stop()
            raise MailproofError(f"--mailbox=service at {settings.sink_url}: {why}. On this backend the "
                                 "service's own --tls and --auth decide; the plugin only checks them.")
    return sink


def _mail_of_run(run_id: str) -> Callable[[Any], bool]:
    """Keep a message unless every recipient is an address another mailproof run handed out."""

    def accept(msg) -> bool:
        if not msg.rcpt_tos:
            return True
        for rcpt in msg.rcpt_tos:
            found = TOKEN.search(rcpt.lower())
            if found is None or found.group(1) == run_id:
                return True
        return False

    return accept


@pytest.fixture(scope="session")
def mailproof_address_book(mailproof_backend, mailproof_settings: Settings) -> AddressBook:
    """Backends that read one real inbox bring their own (plus-addressing on that inbox).

    On ``--mailbox=service`` every worker's stream brings every worker's mail: from here on, this
    worker's store keeps only the mail to its own addresses (this book's run id) and to addresses
    no mailproof run handed out, so ``mailbox.messages``, near-miss lists and ``expect_no_mail()``
    see what a private sink would have seen.
    """
    book = getattr(mailproof_backend, "address_book", None) or AddressBook(domain=mailproof_settings.domain)
    if mailproof_settings.backend == "service" and getattr(mailproof_backend, "accept", False) is None:
        mailproof_backend.accept = _mail_of_run(book.run_id)
    return book


@pytest.fixture
def mailbox(mailproof_backend, mailproof_address_book, mailproof_settings):
    """A clean view for this test: only mail captured from now on, addresses unique to the run."""
    with Mailbox(mailproof_backend.store, mailproof_address_book,
                 default_within=mailproof_settings.within, default_timeout=mailproof_settings.timeout) as view:
        yield view


class SharedSinkWarning(UserWarning):
    """A fault rule on a shared sink service matches every sender's mail, not just this test's."""


class _SharedServiceFaults(ScopedFaults):
    """``ScopedFaults`` on a sink service that other workers and runs send through too."""

    def rule(self, stage: str, action: Any, **match: Any):
        if not (match.get("to") or match.get("to_pattern")):
            warnings.warn(SharedSinkWarning(
                f"this {stage!r} fault rule names no recipient, and on --mailbox=service it acts on every "
                "SMTP session the sink service sees: other xdist workers' and other runs' mail too. Give "
                "to=mailbox.address(...) (stage rcpt, data or after_data) to keep it to this test."),
                stacklevel=2)
        return super().rule(stage, action, **match)


@pytest.fixture
def sink_faults(mailproof_backend, mailproof_address_book, mailproof_settings, request):
    """Fault rules for this test only: ``sink_faults.rule("rcpt", "451 4.3.0 later", to=addr)``.

    Every rule added here is removed when the test ends, pass or fail. On ``--mailbox=service``
    the scope is the test id and this run's id (two runs of one suite sharing a service do not
    remove each other's rules), and a rule without ``to=``/``to_pattern=`` warns: it would act
    on everybody's mail.
    """
    if mailproof_settings.backend == "service":
        scope = f"{request.node.nodeid} [run {mailproof_address_book.run_id}]"
        scoped: ScopedFaults = _SharedServiceFaults(mailproof_backend.faults, scope=scope)
    else:
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


def _render_enabled(config: pytest.Config) -> bool:
    if config.getoption("mailproof_render", False):
        return True
    return str(config.getini("mailproof_render")).strip().lower() in ("1", "true", "yes", "on")


def pytest_unconfigure(config: pytest.Config) -> None:
    if ALLURE:
        from mailproof.report.render import close_shared_renderer  # started only if used

        close_shared_renderer()


class _LazySpamd:
    """The session's spamd, started by the first spam check (never, if no test checks spam)."""

    def __init__(self) -> None:
        self._spamd = None
        self._error: Optional[Exception] = None
        self._lock = threading.Lock()

    def __call__(self) -> tuple[str, int]:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._spamd is None:
                from mailproof.servers.spamd import Spamd

                try:
                    self._spamd = Spamd().start()
                except MailproofError as exc:
                    self._error = exc  # said once per test that asks, not retried for every email
                    raise
            return self._spamd.address

    def stop(self) -> None:
        with self._lock:
            if self._spamd is not None:
                self._spamd.stop()
                self._spamd = None


@pytest.fixture(scope="session", autouse=True)
def mailproof_checks():
    """The deliverability checks' configuration (``mailproof.checks.config``) for this session:
    add DKIM keys here (``mailproof_checks.add_dkim_key(domain, selector, public_key)``). Unless
    a spamd was configured, the first spam check starts a private one (mailproof.servers.spamd),
    stopped at the end of the session; a session that checks no spam starts none."""
    config = _checks.config
    lazy = None
    if config.spamd is None:
        config.spamd = lazy = _LazySpamd()
    yield config
    if lazy is not None:
        lazy.stop()
        if config.spamd is lazy:
            config.spamd = None


@pytest.fixture
def flow(mailbox, mailproof_app_url, mailproof_settings, mailproof_checks, request) -> Flow:
    """A Flow bound to the application and this test's mailbox, reporting to Allure.

    The application's host is put under test for the checks (its links and one-click
    unsubscribe URLs may be requested); with Allure, each check run in the test is a step."""
    session = AppSession(mailproof_app_url, timeout=mailproof_settings.http_timeout)
    try:
        mailproof_checks.add_app_url(mailproof_app_url)
    except ValueError:
        pass  # not an http(s) URL: AppSession says so at the first request
    observer = None
    if ALLURE:
        from mailproof.report.allure_reporter import AllureReporter, report_check

        reporter = AllureReporter(render=_render_enabled(request.config))
        observer = report_check
        _checks.add_observer(observer)
    else:
        reporter = NullReporter()
    yield Flow(http=session, mailbox=mailbox, reporter=reporter, name=request.node.name)
    if observer is not None:
        _checks.remove_observer(observer)
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
