"""A minimal Chromium DevTools-protocol client over ``--remote-debugging-pipe`` (no port).

``Chromium(binary)`` starts headless Chromium (Debian package ``chromium``) offline and quiet,
with every host name but loopback unresolvable (docs/traps.md, Chromium). Commands go out on
its fd 3, replies and events come back on fd 4, read by one thread; ``call`` and ``wait_event``
are woken by the reply or event they wait for (or by Chromium exiting), never by polling.

``on_event`` is called on the reader thread with every event before it is queued: assign a
callable (the renderer fails foreign requests there) or override it (``FrameRecorder``).
Only events named in ``keep`` are queued for ``wait_event`` (all of them if ``keep`` is None),
so a long-lived browser does not hoard the events nobody waits for.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Collection, Optional

from mailproof.errors import MailproofError

INSTALL = "apt-get install -y chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")
TIMEOUT = 30.0


class ChromiumError(MailproofError):
    """Chromium is missing, exited, refused a command or did not answer in time."""


def find_chromium(purpose: str) -> str:
    """The Chromium binary, or a ChromiumError naming ``purpose`` and the install command."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise ChromiumError(f"{purpose} needs Chromium: {INSTALL} (Debian/Ubuntu)")
    return binary


class Chromium:
    """Chromium with ``--remote-debugging-pipe``: commands on its fd 3, replies and events on fd 4."""

    def __init__(self, binary: str, args: Collection[str] = (), flags: Collection[str] = FLAGS,
                 keep: Optional[Collection[str]] = None, timeout: float = TIMEOUT) -> None:
        self.profile = tempfile.mkdtemp(prefix="mailproof-chromium-")
        self.timeout = timeout
        self._keep = None if keep is None else frozenset(keep)
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *flags, *args, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     preexec_fn=wire, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()  # the reader thread sends too (from on_event)
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        threading.Thread(target=self._read, daemon=True, name="mailproof-chromium").start()

    def on_event(self, message: dict) -> None:
        """Called on the reader thread with each event, before it is queued."""

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        with self._write_lock:
            os.write(self._to, json.dumps(message).encode() + b"\0")
        return ident

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: Optional[float] = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        ident = self.send(method, params, session)
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies or self.proc.poll() is not None, timeout):
                raise ChromiumError(f"Chromium did not answer {method} within {timeout:g} s")
            reply = self._replies.pop(ident, None)
        if reply is None:
            raise ChromiumError(f"Chromium exited (code {self.proc.returncode}) during {method}")
        if "error" in reply:
            raise ChromiumError(f"Chromium refused {method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: Optional[str] = None,
                   where: Callable[[dict], bool] = lambda params: True, timeout: Optional[float] = None) -> dict:
        """The first event (already received or yet to come) matching; it is consumed."""
        timeout = self.timeout if timeout is None else timeout

        def find() -> Optional[dict]:
            for event in self._events:
                if event.get("method") == method and (session is None or event.get("sessionId") == session) \
                        and where(event.get("params", {})):
                    self._events.remove(event)
                    return event
            return None

        with self._cond:
            box: list[Optional[dict]] = [None]
            if not self._cond.wait_for(lambda: (box.__setitem__(0, find()) or box[0]) is not None
                                       or self.proc.poll() is not None, timeout):
                raise ChromiumError(f"no {method} from Chromium within {timeout:g} s")
            if box[0] is None:
                raise ChromiumError(f"Chromium exited (code {self.proc.returncode}) waiting for {method}")
            return box[0]

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:  # Chromium exited: wake every waiter
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" not in message:
                    self.on_event(message)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    elif self._keep is None or message.get("method") in self._keep:
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


class FrameRecorder(Chromium):
    """Chromium that follows frames of other processes and records every request of every frame.

    Frames of other processes (e.g. a report's blob: attachment iframes) attach automatically,
    paused; each gets Page and Network enabled (and auto-attach for its own children) before it
    is resumed, so no request escapes ``requests``. The page's own session needs
    ``Network.enable`` and ``Target.setAutoAttach`` (waitForDebuggerOnStart) from the caller.
    """

    def __init__(self, binary: str, args: Collection[str] = (), **kwargs) -> None:
        self.requests: list[str] = []  # before the reader thread starts
        super().__init__(binary, args, **kwargs)

    def on_event(self, message: dict) -> None:
        method = message.get("method")
        if method == "Target.attachedToTarget":
            child = message["params"]["sessionId"]
            for command in ("Network.enable", "Page.enable"):
                self.send(command, session=child)
            self.send("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
                      session=child)
            self.send("Runtime.runIfWaitingForDebugger", session=child)
        elif method == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])
