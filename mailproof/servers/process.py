"""One way to launch a server process, know when it is ready, and stop everything it started.

Used by AppProcess (the application under test), Dovecot and Postfix:

- The command runs in its own session (``start_new_session=True``), so its pid is the id of a
  process group holding everything it forks: the real server behind ``bash -c``, ``npm start``
  or ``make run``, Dovecot's imap/lmtp processes, Postfix's smtpd/qmgr.
- stdout and stderr are read by threads, line by line: the last lines are kept for error
  messages, optionally copied to a log file and handed to a callback. The line matching
  ``ready`` wakes the starter (an event set by the reader thread; nothing polls).
- ``stop()`` sends SIGTERM to the whole group, waits for every member (pidfds: woken by each
  exit, not polled), then SIGKILLs the group and reaps the leader. Signalling the leader alone
  would leave a launcher's real server running, its port still held.
"""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Mapping, Optional, Sequence, Union

Pattern = Union[str, "re.Pattern[str]"]


class ManagedProcess:
    """``command`` in its own process group, with its output read by threads.

    ``ready``: a regex searched in each line of the ``ready_streams`` ("stdout", "stderr");
    ``merge_stderr`` sends stderr into stdout (one ordered log, as servers writing to
    /dev/stderr need). ``output`` (a deque, the caller's to keep across restarts) gets every
    line; ``log_path`` gets a copy; ``on_line(line)`` is called from the reader thread.
    """

    def __init__(self, command: Sequence[str], *, name: str, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, ready: Optional[Pattern] = None,
                 ready_streams: Sequence[str] = ("stdout",), merge_stderr: bool = False,
                 output: Optional[collections.deque] = None, tail_lines: int = 40,
                 log_path: Optional[os.PathLike] = None,
                 on_line: Optional[Callable[[str], None]] = None) -> None:
        self.command = list(command)
        self.name = name
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready = re.compile(ready) if isinstance(ready, str) else ready
        self.ready_streams = ("stdout",) if merge_stderr else tuple(ready_streams)
        self.merge_stderr = merge_stderr
        self.output: collections.deque[str] = output if output is not None else collections.deque(maxlen=tail_lines)
        self.log_path = log_path
        self.on_line = on_line
        self.ready_match: Optional[re.Match] = None
        self._proc: Optional[subprocess.Popen] = None
        self._readers: list[threading.Thread] = []
        self._log = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._open_ready_streams = 0

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "ManagedProcess":
        """Launch (OSError from Popen, e.g. FileNotFoundError, is the caller's to explain)."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name}: a ManagedProcess starts once; make a new one")
        if self.log_path is not None:
            self._log = open(self.log_path, "a", buffering=1, encoding="utf-8")
        try:
            self._proc = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT if self.merge_stderr else subprocess.PIPE,
                text=True, bufsize=1, encoding="utf-8", errors="replace",  # one bad byte must not kill a reader
                start_new_session=True,
            )
        except BaseException:
            self._close_log()
            raise
        streams = [("stdout", self._proc.stdout)] + ([] if self.merge_stderr else [("stderr", self._proc.stderr)])
        self._open_ready_streams = sum(1 for label, _ in streams if label in self.ready_streams)
        for label, stream in streams:
            reader = threading.Thread(target=self._read, args=(stream, label in self.ready_streams),
                                      daemon=True, name=f"{self.name}-{label}-{self._proc.pid}")
            reader.start()
            self._readers.append(reader)
        return self

    def wait_ready(self, timeout: float) -> Optional[re.Match]:
        """The ready line's match, or None: the ready streams closed (then the exit is awaited
        within what is left of ``timeout``, so ``returncode`` says whether it exited) or time ran out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(lambda: self.ready_match is not None or self._open_ready_streams == 0,
                                   timeout)
            found, closed = self.ready_match, self._open_ready_streams == 0
        if found is None and closed:
            self.wait_exit(max(0.0, deadline - time.monotonic()))
        return found

    def wait_exit(self, timeout: float) -> Optional[int]:
        """The exit code once the leader has exited, or None after ``timeout`` (woken by the exit)."""
        if self._proc is None or self._proc.poll() is not None:
            return self.returncode
        _wait_for_exits([self._proc.pid], time.monotonic() + timeout)
        return self._proc.poll()

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """End the whole process group (SIGTERM, ``timeout`` s, SIGKILL); the leader's exit code."""
        proc = self._proc
        if proc is None:
            return None
        group = proc.pid
        # While the leader is not reaped its pid cannot be reused, so killpg reaches only our group.
        # Once poll() has reaped it, signal the members still found in /proc instead.
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            if proc.returncode is None:
                try:
                    os.killpg(group, signum)
                except ProcessLookupError:
                    pass
            else:
                _signal_all(live_group_members(group), signum)
            if _wait_for_group(group, time.monotonic() + wait):
                break
        proc.wait()
        for reader in self._readers:
            reader.join(timeout=2)  # each closes its stream at EOF; one still held elsewhere is left
        self._close_log()
        return proc.returncode

    def _read(self, stream, watch_ready: bool) -> None:
        try:
            with stream:
                for line in stream:
                    line = line.rstrip("\n")
                    self.output.append(line)
                    with self._lock:
                        if self._log is not None:
                            self._log.write(line + "\n")
                    if self.on_line is not None:
                        try:
                            self.on_line(line)
                        except Exception:  # a callback bug must not stop the reader (the pipe would fill)
                            pass
                    if watch_ready and self.ready is not None and self.ready_match is None:
                        found = self.ready.search(line)
                        if found:
                            with self._changed:
                                self.ready_match = found
                                self._changed.notify_all()
        finally:
            if watch_ready:
                with self._changed:
                    self._open_ready_streams -= 1
                    self._changed.notify_all()

    def _close_log(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


# -- what is still running, and what still listens --------------------------------------------


def live_group_members(pgid: int) -> list[int]:
    """Pids of the process group ``pgid`` that are still running (not zombies), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def processes_matching(text: str) -> list[int]:
    """Pids of running (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def tcp_sockets(state: str) -> list[tuple[str, int, str, int]]:
    """IPv4 TCP sockets in ``state`` ("LISTEN" or "ESTABLISHED") from /proc/net/tcp, as
    (local_ip, local_port, remote_ip, remote_port). No dependency on ss/netstat."""
    code = {"ESTABLISHED": "01", "LISTEN": "0A"}[state]
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] != code:
                continue
            (lip, lport), (rip, rport) = (part.split(":") for part in fields[1:3])
            found.append((socket.inet_ntoa(bytes.fromhex(lip)[::-1]), int(lport, 16),
                          socket.inet_ntoa(bytes.fromhex(rip)[::-1]), int(rport, 16)))
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_for_group(pgid: int, deadline: float) -> bool:
    """True once no member of ``pgid`` runs; looks again after each round (members may fork)."""
    while True:
        members = live_group_members(pgid)
        if not members:
            return True
        if time.monotonic() >= deadline:
            return False
        _wait_for_exits(members, deadline)


def _wait_for_exits(pids: Sequence[int], deadline: float) -> None:
    """Return when every pid has exited or at ``deadline``: a pidfd becomes readable at its
    process's exit, so this is woken by the exits (children or not), never polled."""
    poller, fds = select.poll(), []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except (AttributeError, OSError):  # no pidfd (kernel < 5.3): look every 10 ms
                while any(map(_running, pids)) and time.monotonic() < deadline:
                    time.sleep(0.01)
                return
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        waiting = set(fds)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting.discard(fd)
    finally:
        for fd in fds:
            os.close(fd)
