"""Run an application under test as its own process and know when it is ready.

Built on ManagedProcess (mailproof/servers/process.py): own process group, output read by
threads (last lines kept so a failed start says why), and ``stop()`` ends the whole group, so
a launcher (``bash -c``, ``npm start``, ``make run``) does not leave the real server running.
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, Optional, Sequence

from mailproof.errors import MailproofError
from mailproof.servers.process import ManagedProcess

TAIL_LINES = 40
DEFAULT_READY_PATTERN = r"READY (\S+)"
# HTTP readiness: first retry after 10 ms, doubling up to 500 ms between attempts.
FIRST_RETRY, MAX_RETRY = 0.01, 0.5
# No proxy for a readiness check: the app listens here, and a proxy's 502 would read as "not yet".
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AppProcess:
    """The application under test, started by ``start()`` (or ``with``), ended by ``stop()``.

    Readiness, one of:

    - ``ready_pattern`` (default ``READY (\\S+)``): the app prints, on stdout or stderr (Flask's
      Werkzeug, Uvicorn and many loggers write to stderr), one line matching
      this regex once it accepts requests, e.g. ``READY http://127.0.0.1:8123``. The reader thread
      wakes ``start()`` on that line (no polling). ``.url`` is the match's group(1), or the whole
      stripped line when the regex has no group.
    - ``ready_url``: for an app that prints nothing useful. ``start()`` GETs this URL, retrying
      after 10 ms, doubling up to 500 ms, until any HTTP answer below 500; ``.url`` is its
      origin (``http://host:port``).

    Either way, ``start()`` fails with the output's last lines if the app exits first or is not
    ready within ``start_timeout`` seconds. ``env`` is added to this process's environment;
    ``cwd`` is the working directory.
    """

    def __init__(self, command: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, ready_pattern: Optional[str] = None,
                 ready_url: Optional[str] = None, start_timeout: float = 20.0,
                 name: str = "application") -> None:
        if ready_pattern is not None and ready_url is not None:
            raise ValueError("give ready_pattern (a line the app prints) or ready_url (a URL it answers), not both")
        if ready_url is not None:
            parts = urllib.parse.urlsplit(ready_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"ready_url must be an http(s) URL with a host, not {ready_url!r}")
        self.command = list(command)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready_url = ready_url
        self.ready_pattern = None if ready_url else re.compile(ready_pattern or DEFAULT_READY_PATTERN)
        self.start_timeout = start_timeout
        self.name = name
        self.url: Optional[str] = None
        self.output: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._process: Optional[ManagedProcess] = None

    def start(self) -> "AppProcess":
        if self.running:
            raise MailproofError(f"the {self.name} is already running; stop() it first")
        self._process = ManagedProcess(self.command, name=self.name, env=self.env, cwd=self.cwd,
                                       ready=self.ready_pattern, ready_streams=("stdout", "stderr"),
                                       output=self.output)
        try:
            self._process.start()
        except FileNotFoundError as exc:
            raise MailproofError(
                f"cannot start the {self.name}: {exc.filename!r} not found. "
                f"Install it or fix the command {self.command!r}."
            ) from exc
        except PermissionError as exc:
            raise MailproofError(
                f"cannot start the {self.name}: {exc.filename!r} is not executable. "
                f"Run chmod +x on it, or start it through its interpreter: {self.command!r}."
            ) from exc
        try:
            self.url = self._wait_for_url() if self.ready_url else self._wait_for_line()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_line(self) -> str:
        process = self._process
        assert process is not None and self.ready_pattern is not None
        found = process.wait_ready(self.start_timeout)
        if found is not None:
            return found.group(1) if found.re.groups else found.string.strip()
        if process.returncode is not None:
            raise self._exited()
        raise self._failure(
            f"did not print a line matching {self.ready_pattern.pattern!r} within {self.start_timeout:g} s.")

    def _wait_for_url(self) -> str:
        """GET ready_url with a bounded exponential backoff; between attempts, wait on the exit."""
        process, url = self._process, self.ready_url
        assert process is not None and url is not None
        deadline = time.monotonic() + self.start_timeout
        delay, last = FIRST_RETRY, "no attempt"
        while True:
            left = deadline - time.monotonic()
            try:
                with _DIRECT.open(url, timeout=max(0.05, min(2.0, left))) as answer:
                    status = answer.status
            except urllib.error.HTTPError as exc:  # an answer all the same (404, 401, 503...)
                status = exc.code
                exc.close()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP
                cause = exc.reason if isinstance(getattr(exc, "reason", None), BaseException) else exc
                status, last = None, f"{type(cause).__name__}: {cause}"
            if status is not None:
                if status < 500:
                    parts = urllib.parse.urlsplit(url)
                    return f"{parts.scheme}://{parts.netloc}"
                last = f"HTTP {status}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failure(
                    f"did not answer ready_url {url} with an HTTP status below 500 within start_timeout "
                    f"{self.start_timeout:g} s (last attempt: {last}). If the app prints a line once it "
                    "listens, pass ready_pattern= instead.")
            if process.wait_exit(min(delay, left)) is not None:
                raise self._exited()
            delay = min(delay * 2, MAX_RETRY)

    def _exited(self) -> MailproofError:
        assert self._process is not None
        return self._failure(f"exited with code {self._process.returncode} before it was ready.")

    def _failure(self, what: str) -> MailproofError:
        if self._process is not None:
            # The group may outlive its leader; and once stopped, the readers have read everything.
            self._process.stop()
        return MailproofError(f"the {self.name} {what} Command: {' '.join(self.command)}\n{self.tail()}")

    def tail(self) -> str:
        return "Last output:\n  " + "\n  ".join(self.output) if self.output else "It printed nothing."

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """End the app's whole process group (SIGTERM, then SIGKILL after ``timeout`` s); its exit code."""
        return self._process.stop(timeout) if self._process else None

    def __enter__(self) -> "AppProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
