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
DevTools protocol on a pipe (``--remote-debugging-pipe``: no port); each wait is woken by the
reply or event it waits for. ``close()`` ends it (the pytest plugin does at the session's end).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from mailproof.errors import MailproofError

WIDTHS = (600, 375)
MAX_HEIGHT = 4000
INSTALL = "apt-get install -y chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")
TIMEOUT = 30.0


class RenderError(MailproofError):
    """Chromium is missing or did not render; the message says what to do."""


@dataclass
class Rendering:
    pngs: dict[int, bytes] = field(default_factory=dict)  # width -> PNG
    heights: dict[int, int] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # requests failed (none expected)


class _DevTools:
    """Chromium with ``--remote-debugging-pipe``: commands on its fd 3, replies and events on fd 4."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="mailproof-render-")
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     preexec_fn=wire, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self.on_event = None  # called from the reader thread with each event
        threading.Thread(target=self._read, daemon=True, name="mailproof-render").start()

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        return ident

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> dict:
        ident = self.send(method, params, session)
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies or self.proc.poll() is not None, TIMEOUT):
                raise RenderError(f"Chromium did not answer {method} within {TIMEOUT:g} s")
            reply = self._replies.pop(ident, None)
        if reply is None:
            raise RenderError(f"Chromium exited (code {self.proc.returncode}) during {method}")
        if "error" in reply:
            raise RenderError(f"Chromium refused {method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str) -> dict:
        def find():
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            return None

        with self._cond:
            box = [None]
            if not self._cond.wait_for(lambda: (box.__setitem__(0, find()) or box[0]) is not None
                                       or self.proc.poll() is not None, TIMEOUT):
                raise RenderError(f"no {method} from Chromium within {TIMEOUT:g} s")
            if box[0] is None:
                raise RenderError(f"Chromium exited (code {self.proc.returncode})")
            return box[0]

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" not in message and self.on_event is not None:
                    self.on_event(message)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    elif message.get("method") in ("Page.loadEventFired",):
                        self._events.append(message)
                    self._cond.notify_all()

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._to, self._from):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)


class Renderer:
    """One headless Chromium, started on first use, rendering one email at a time."""

    def __init__(self, widths: Iterable[int] = WIDTHS) -> None:
        self.widths = tuple(widths)
        self._browser: Optional[_DevTools] = None
        self._session: Optional[str] = None
        self._lock = threading.Lock()
        self._blocked: list[str] = []
        self._page_url = ""
        self._dir = None

    def _start(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise RenderError(f"rendering emails (--mailproof-render) needs Chromium: {INSTALL} (Debian/Ubuntu)")
        browser = _DevTools(binary)
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
