"""Pictures of an email: its sanitized preview rendered in headless Chromium, to PNG.

``Renderer().render(html, images)`` -> ``{600: png, 375: png}``: the preview
(mailproof.report.preview: scripts gone, remote references blocked, ``cid:`` images inlined as
``data:`` URIs, the CSP meta in front) laid out at each width (375 px as a phone's mail app
lays it out) and captured whole (up to ``MAX_HEIGHT`` px).

Nothing loads from afar, three times over: the preview has no remote reference and its CSP
allows ``data:`` images only; every request Chromium still makes but the page itself is failed
through the DevTools Fetch domain (and counted, ``Rendering.blocked``); and every host name
but loopback resolves to nothing (``--host-resolver-rules``).

Chromium (Debian package ``chromium``) is started once, on first use, and driven over the
DevTools protocol on a pipe (mailproof.report.chromium, ``--remote-debugging-pipe``: no port);
each wait is woken by the reply or event it waits for. ``close()`` ends it (the pytest plugin
does at the session's end).
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from mailproof.report.chromium import INSTALL, Chromium, ChromiumError, find_chromium

__all__ = ["INSTALL", "MAX_HEIGHT", "WIDTHS", "RenderError", "Renderer", "Rendering", "close_shared_renderer",
           "shared_renderer"]

WIDTHS = (600, 375)
MAX_HEIGHT = 4000
ARGS = ("--disable-extensions", "--hide-scrollbars", "--mute-audio")  # on top of chromium.FLAGS

# Chromium is missing or did not render; the message says what to do. One error for both, so
# a caller catching RenderError also catches what the DevTools client raises.
RenderError = ChromiumError


@dataclass
class Rendering:
    pngs: dict[int, bytes] = field(default_factory=dict)  # width -> PNG
    heights: dict[int, int] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # requests failed (none expected)


class Renderer:
    """One headless Chromium, started on first use, rendering one email at a time."""

    def __init__(self, widths: Iterable[int] = WIDTHS) -> None:
        self.widths = tuple(widths)
        self._browser: Optional[Chromium] = None
        self._session: Optional[str] = None
        self._lock = threading.Lock()
        self._blocked: list[str] = []
        self._page_url = ""
        self._dir = None

    def _start(self) -> None:
        binary = find_chromium("rendering emails (--mailproof-render)")
        # Only the load events are waited for; the rest would pile up in a long-lived browser.
        browser = Chromium(binary, ARGS, keep=("Page.loadEventFired",))
        browser.on_event = self._on_event
        self._browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable",):
            browser.call(method, session=self._session)
        # Every request pauses here: the page's own file is let through, anything else is failed.
        browser.call("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, session=self._session)
        self._dir = tempfile.mkdtemp(prefix="mailproof-render-pages-")

    def _on_event(self, message: dict) -> None:
        if message.get("method") != "Fetch.requestPaused":
            return
        params = message["params"]
        url = params["request"]["url"]
        if url == self._page_url:
            self._browser.send("Fetch.continueRequest", {"requestId": params["requestId"]}, message.get("sessionId"))
        else:
            self._blocked.append(url)
            self._browser.send("Fetch.failRequest", {"requestId": params["requestId"], "errorReason": "BlockedByClient"},
                               message.get("sessionId"))

    def render(self, markup: str, images: Iterable[tuple[Optional[str], str, bytes]] = ()) -> Rendering:
        """The sanitized preview of ``markup`` (``cid:`` ``images`` inlined) at each width."""
        from mailproof.report.preview import safe_preview

        page = safe_preview(markup, images).html
        with self._lock:
            if self._browser is None or self._browser.proc.poll() is not None:
                self._start()
            browser, session = self._browser, self._session
            path = Path(self._dir) / "email.html"
            path.write_text(page, encoding="utf-8")
            self._page_url = path.as_uri()
            self._blocked = []
            result = Rendering()
            for width in self.widths:
                browser.call("Emulation.setDeviceMetricsOverride",
                             # A phone's mail app lays the email out at its own width (its
                             # viewport is the device's), hence no mobile emulation (980 px layout).
                             # A short viewport lets the content size be the email's height.
                             {"width": width, "height": 100, "deviceScaleFactor": 1, "mobile": False},
                             session=session)
                reply = browser.call("Page.navigate", {"url": self._page_url}, session=session)
                if "errorText" in reply:
                    raise RenderError(f"Chromium could not open the preview: {reply['errorText']}")
                browser.wait_event("Page.loadEventFired", session)
                size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
                height = max(1, min(MAX_HEIGHT, int(size["height"] + 0.5)))
                shot = browser.call("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, session=session)
                result.pngs[width] = base64.b64decode(shot["data"])
                result.heights[width] = height
            result.blocked = list(self._blocked)
            return result

    def close(self) -> None:
        with self._lock:
            if self._browser is not None:
                self._browser.close()
                self._browser = None
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


_shared: Optional[Renderer] = None
_shared_lock = threading.Lock()


def shared_renderer() -> Renderer:
    """The process's renderer (one Chromium per pytest worker)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Renderer()
        return _shared


def close_shared_renderer() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None
