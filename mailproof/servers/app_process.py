"""Run an application under test as its own process and know, without polling, when it is ready.

The application prints one line matching ``ready_pattern`` (e.g. ``READY http://127.0.0.1:8123``)
once it listens; a reader thread wakes the launcher on that line. Output is kept (last lines) so
a failed start says why.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import signal
import subprocess
import threading
from typing import Mapping, Optional, Sequence

from mailproof.errors import MailproofError

TAIL_LINES = 40


class AppProcess:
    def __init__(self, command: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, ready_pattern: str = r"READY (\S+)",
                 start_timeout: float = 20.0, name: str = "application") -> None:
        self.command = list(command)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready_pattern = re.compile(ready_pattern)
        self.start_timeout = start_timeout
        self.name = name
        self.url: Optional[str] = None
        self.output: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: Optional[subprocess.Popen] = None
        self._readers: list[threading.Thread] = []

    def start(self) -> "AppProcess":
        try:
            self._proc = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                encoding="utf-8", errors="replace",  # one bad byte must not kill the reader
            )
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
        ready: "queue.Queue[Optional[str]]" = queue.Queue()
        for stream, is_stdout in ((self._proc.stdout, True), (self._proc.stderr, False)):
            reader = threading.Thread(target=self._read, args=(stream, ready if is_stdout else None),
                                      daemon=True, name=f"{self.name}-output")
            reader.start()
            self._readers.append(reader)
        try:
            url = ready.get(timeout=self.start_timeout)
        except queue.Empty:
            self.stop()
            raise MailproofError(
                f"the {self.name} did not print a line matching {self.ready_pattern.pattern!r} within "
                f"{self.start_timeout:g} s. Command: {' '.join(self.command)}\n{self.tail()}"
            ) from None
        if url is None:
            code = self._proc.wait()
            raise MailproofError(
                f"the {self.name} exited with code {code} before it was ready. "
                f"Command: {' '.join(self.command)}\n{self.tail()}"
            )
        self.url = url
        return self

    def _read(self, stream, ready: "Optional[queue.Queue[Optional[str]]]") -> None:
        announced = False
        for line in stream:
            self.output.append(line.rstrip("\n"))
            if ready is not None and not announced:
                found = self.ready_pattern.search(line)
                if found:
                    announced = True
                    ready.put(found.group(1) if found.groups() else line.strip())
        if ready is not None and not announced:
            ready.put(None)  # the process closed its output without announcing readiness

    def tail(self) -> str:
        return "Last output:\n  " + "\n  ".join(self.output) if self.output else "It printed nothing."

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for reader in self._readers:
            reader.join(timeout=2)
        return self._proc.returncode

    def __enter__(self) -> "AppProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
