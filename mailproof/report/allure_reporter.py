"""Report a flow to Allure: steps, HTTP calls, and every awaited email with its latency.

Every email a flow waited for (delivered, late, or arriving where none was expected) gets, in
its step, attachments QA can open in the report, for passing tests too:

- "Email preview (offline, no scripts)": the HTML body made static by mailproof.report.preview
  (scripts and frames removed, remote images/styles/fonts blocked, ``cid:`` images inlined, a CSP
  meta in front), which Allure then shows through DOMPurify in a script-less sandboxed iframe.
  (A wrapper page with a sandboxed ``srcdoc`` iframe does not work in Allure 3: its DOMPurify
  removes iframes and ``http-equiv`` metas from HTML attachments.);
- "Text body", "HTML body" (the markup as sent, as text), "Headers" (envelope first), "Links" (URL and anchor text);
- each MIME attachment (HTML and SVG ones as download-only bytes: they could carry scripts);
- "Raw message (.eml)" (message/rfc822 is download-only in Allure, hence the readable copies);
- with ``--mailproof-render`` (ini ``mailproof_render``), "Rendered at 600 px" and "Rendered at
  375 px": the preview above as headless Chromium draws it (mailproof.report.render), PNG.

Each deliverability check a test runs (``msg.checks...``, mailproof.checks) is a step of its own,
"Check dkim: FAILED: ...", with its details attached; a failed check's step is failed (a test
may expect that), a warning's step passes with WARNING in its title.

HTTP calls are steps titled with method, URL, status and time; an answer of 400 or more gets
its body attached, and a 5xx answer marks its step broken and is remembered
(``AllureReporter.server_errors``) so the failure is classed as an application error
(see mailproof.report.allure_hooks).

``label_flow_test`` labels the test ``run_flow`` runs: feature, story, severity, the flow's
docstring as description, and where the flow is defined, as the label ``flow source`` holding
a path relative to pytest's rootdir (``flows/orders.py:57``), which reads the same on every
machine. A link to it is added only when the ini key ``mailproof_source_url`` (or env
``MAILPROOF_SOURCE_URL``) says where the sources can be browsed: a prefix the path and
``#L<line>`` are appended to (``https://git.example/shop/blob/main/``), or a template with
``{path}`` and ``{line}`` (``https://bitbucket.example/shop/src/main/{path}#lines-{line}``).

The reporter is synchronous and must be called from the test's own thread: Allure's step stack
is per thread, and steps recorded from another thread or an asyncio task nest wrongly (docs/traps.md, "Allure").
Allure calls are no-ops when pytest runs without ``--alluredir``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional
from urllib.parse import quote

import allure
import allure_commons
from allure_commons.utils import uuid4

from mailproof.criteria import Criteria
from mailproof.flow import flow_info
from mailproof.report.preview import safe_preview
from mailproof.message import Message

_VERBS = {"delivered": "Received", "late": "LATE", "unexpected": "UNEXPECTED"}

RESPONSE_BODY_LIMIT = 20_000
# Attachment types a browser would run or render with active content: offered as plain bytes.
_ACTIVE_TYPES = {"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
                 "text/javascript", "application/javascript"}


class ApplicationError(Exception):
    """An HTTP 5xx answer from the application under test (used to mark its step broken)."""


def mail_title(event: str, msg: Message) -> str:
    latency = f"{msg.latency * 1000:.0f} ms after trigger" if msg.latency is not None else "latency unknown"
    return f"{_VERBS.get(event, event)}: {msg.subject!r} to {', '.join(msg.rcpt_tos) or ', '.join(msg.to)} ({latency})"


# -- test labels ----------------------------------------------------------------------------------

FLOW_SOURCE_LABEL = "flow source"
SOURCE_URL_ENV = "MAILPROOF_SOURCE_URL"


def label_flow_test(fn: Callable[..., Any], config: Any) -> None:
    """Label the running test from the flow ``fn`` it runs (see the module docstring)."""
    info = flow_info(fn)
    allure.dynamic.feature(info.feature)
    allure.dynamic.story(info.story)
    allure.dynamic.severity(info.severity)
    if info.description:
        allure.dynamic.description(info.description)
    location = flow_source(fn, Path(config.rootpath))
    if location is None:
        return
    path, line = location
    allure.dynamic.label(FLOW_SOURCE_LABEL, f"{path}:{line}")
    url = source_url(_source_url_setting(config), path, line)
    if url:
        allure.dynamic.link(url, name=f"flow source: {path}:{line}")


def flow_source(fn: Callable[..., Any], rootdir: Path) -> Optional[tuple[str, int]]:
    """Where ``fn`` is defined: a ``/``-separated path relative to ``rootdir`` and the line of its
    first decorator. A module outside the rootdir (an installed package of flows) is named from
    its import path instead (``shopflows/orders.py``), never by this machine's absolute path."""
    try:
        source = inspect.getsourcefile(fn)
        line = inspect.getsourcelines(fn)[1]
    except (OSError, TypeError):
        return None
    if not source:
        return None
    absolute = Path(os.path.abspath(source))
    for path, base in ((absolute, Path(os.path.abspath(rootdir))),
                       (Path(os.path.realpath(absolute)), Path(os.path.realpath(rootdir)))):  # symlinks
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix(), line
    name = getattr(fn, "__module__", None) or ""
    if name and name != "__main__":
        parts = name.split(".")
        if absolute.name == "__init__.py":
            parts.append("__init__")
        return "/".join(parts[:-1] + [parts[-1] + absolute.suffix]), line
    return absolute.name, line


def source_url(setting: str, path: str, line: int) -> Optional[str]:
    """The browse URL of ``path`` at ``line`` from the ``mailproof_source_url`` setting (None: unset)."""
    setting = (setting or "").strip()
    if not setting:
        return None
    quoted = quote(path, safe="/")
    if "{path}" in setting or "{line}" in setting:
        return setting.replace("{path}", quoted).replace("{line}", str(line))
    return f"{setting if setting.endswith('/') else setting + '/'}{quoted}#L{line}"


def _source_url_setting(config: Any) -> str:
    value = os.environ.get(SOURCE_URL_ENV)
    if value:
        return value
    try:
        return str(config.getini("mailproof_source_url") or "")
    except ValueError:  # registered by mailproof.report.allure_hooks; not loaded
        return ""


# -- attachments ----------------------------------------------------------------------------------


def attach_message(msg: Message, event: str = "delivered") -> None:
    if msg.html is not None:
        images = [(a.content_id, a.content_type, a.data) for a in msg.attachments if a.content_id]
        allure.attach(safe_preview(msg.html, images).html, name="Email preview (offline, no scripts)",
                      attachment_type=allure.attachment_type.HTML)
    if msg.text is not None:
        allure.attach(msg.text, name="Text body", attachment_type=allure.attachment_type.TEXT)
    if msg.html is not None:
        # As text: QA reads the markup as sent; only the preview above is ever rendered.
        allure.attach(msg.html, name="HTML body", attachment_type=allure.attachment_type.TEXT)
    headers = "\n".join(f"{name}: {value}" for name, value in msg.headers)
    envelope = f"Envelope-From: {msg.mail_from}\nEnvelope-To: {', '.join(msg.rcpt_tos)}\n"
    allure.attach(envelope + headers, name="Headers", attachment_type=allure.attachment_type.TEXT)
    if msg.links:
        links = "\n".join(f"{link.url}  [{link.text or link.source}]" for link in msg.links)
        allure.attach(links, name=f"Links ({len(msg.links)})", attachment_type=allure.attachment_type.TEXT)
    for att in msg.attachments:
        content_type = "application/octet-stream" if att.content_type in _ACTIVE_TYPES else att.content_type
        # A plain MIME string is accepted as the attachment type; the extension names the file.
        allure.attach(att.data, name=f"Attachment {att.filename or att.content_type}",
                      attachment_type=content_type, extension=_extension(att.filename))
    allure.attach(msg.raw, name="Raw message (.eml)", attachment_type="message/rfc822", extension="eml")


def attach_renderings(msg: Message) -> None:
    """The email as Chromium draws its preview, at 600 and 375 px (PNG)."""
    from mailproof.report.render import RenderError, shared_renderer

    if msg.html is None:
        return
    images = [(a.content_id, a.content_type, a.data) for a in msg.attachments if a.content_id]
    try:
        rendering = shared_renderer().render(msg.html, images)
    except RenderError as exc:  # the report says why; the test's verdict is not the renderer's
        allure.attach(str(exc), name="Rendering failed", attachment_type=allure.attachment_type.TEXT)
        return
    for width, png in rendering.pngs.items():
        allure.attach(png, name=f"Rendered at {width} px", attachment_type=allure.attachment_type.PNG)
    if rendering.blocked:
        allure.attach("\n".join(rendering.blocked), name="Rendering: requests blocked",
                      attachment_type=allure.attachment_type.TEXT)


def report_check(result: Any, msg: Message) -> None:
    """One deliverability check (a ``mailproof.checks.CheckResult``) as a step with its details."""
    title = f"Check {result.name}: {result.verdict.upper()}: {result.summary} ({result.seconds * 1000:.0f} ms)"
    error = AssertionError(result.summary) if result.verdict == "failed" else None
    with _step(title[:300], error, took=result.seconds):
        allure.attach(result.describe(), name=f"{result.name} check of {msg.subject!r}",
                      attachment_type=allure.attachment_type.TEXT)


def _extension(filename: str | None) -> str:
    if filename and "." in filename:
        return filename.rsplit(".", 1)[-1]
    return "bin"


def _response_text(response: Any) -> str:
    try:
        text = response.text
    except Exception:  # a body that cannot be decoded: show what it is, not crash the report
        return f"<{len(getattr(response, 'content', b'') or b'')} bytes, not decodable as text>"
    if len(text) > RESPONSE_BODY_LIMIT:
        return text[:RESPONSE_BODY_LIMIT] + f"\n... ({len(text) - RESPONSE_BODY_LIMIT} more characters)"
    return text


class AllureReporter:
    """The pytest-side Reporter (see mailproof.reporting). One per test."""

    def __init__(self, render: bool = False) -> None:
        self.server_errors: list[str] = []  # "HTTP 500 from POST /signup", for failure categories
        self.render = render  # attach PNG renderings of every awaited email

    def step(self, name: str) -> ContextManager[Any]:
        return allure.step(name)

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        status = getattr(response, "status_code", "?")
        error: Optional[ApplicationError] = None
        if isinstance(status, int) and status >= 500:
            error = ApplicationError(f"HTTP {status} from {method} {url}")
            self.server_errors.append(str(error))
        with _step(f"HTTP {method} {url} -> {status} ({seconds * 1000:.0f} ms)", error, took=seconds):
            if isinstance(status, int) and status >= 400:
                allure.attach(_response_text(response), name=f"Response body ({status})",
                              attachment_type=allure.attachment_type.TEXT)

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        if msg is None:  # missing: the failure itself carries the near misses
            return
        # A late or unexpected mail marks its own step failed, so QA sees which one it was.
        with _step(mail_title(event, msg), error if event in ("late", "unexpected") else None):
            attach_message(msg, event)
            if self.render:
                attach_renderings(msg)


@contextlib.contextmanager
def _step(title: str, error: Optional[BaseException], took: float = 0.0) -> Iterator[None]:
    """An Allure step that ends passed, or with ``error``'s status (AssertionError: failed,
    anything else: broken) without raising it into the flow.

    Driven through Allure's own hooks, as ``allure.step`` does, from the calling thread.
    ``took``: seconds the step really lasted before it was reported (an HTTP call is reported
    once its answer is in), so the report's duration column shows the call's time, not 0 ms.
    """
    uuid = uuid4()
    allure_commons.plugin_manager.hook.start_step(uuid=uuid, title=title, params={})
    if took > 0:
        _backdate(uuid, took)
    try:
        yield
    except BaseException as exc:
        allure_commons.plugin_manager.hook.stop_step(uuid=uuid, title=title, exc_type=type(exc),
                                                     exc_val=exc, exc_tb=exc.__traceback__)
        raise
    allure_commons.plugin_manager.hook.stop_step(uuid=uuid, title=title, exc_type=type(error) if error else None,
                                                 exc_val=error, exc_tb=None)


def _backdate(uuid: str, seconds: float) -> None:
    """Move a just-started step's start back by ``seconds`` in allure-pytest's open results."""
    for plugin in allure_commons.plugin_manager.get_plugins():
        logger = getattr(plugin, "allure_logger", None)
        item = logger.get_item(uuid) if logger is not None and hasattr(logger, "get_item") else None
        if item is not None and isinstance(getattr(item, "start", None), int):
            item.start -= int(seconds * 1000)
