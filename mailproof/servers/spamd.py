"""A private SpamAssassin ``spamd`` for the spam check: real rules, offline, loopback only.

>>> with Spamd() as spamd:
...     mailproof.checks.config.spamd = (spamd.host, spamd.port)

How it runs (docs/traps.md, "SpamAssassin"):

- ``spamd`` from Debian's ``spamd`` package (with ``spamassassin``), in the foreground, as a
  child of this process (ManagedProcess: its own process group, stopped as a whole), listening
  on 127.0.0.1 on a free port, accepting 127.0.0.1 only.
- Offline: ``-L`` (local tests only: no DNS blocklists, no Razor/Pyzor/DCC), ``dns_available no``,
  no Bayes and no auto-learning (a score must not depend on what earlier tests taught it), no
  user configuration (``-x``). The rules are the ones on disk: those the package ships in
  /usr/share/spamassassin, or newer ones a previous ``sa-update`` put in /var/lib/spamassassin
  (sa-update needs the network; nothing here runs it).
- Readiness is an event: spamd logs to stderr (a pipe read by a thread), and ``start()`` wakes
  on the "server started on" line it writes once its socket listens (~0.7 s: the rules compile).
- Two children at most: each holds the compiled rules (~60 MB).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mailproof.errors import MailproofError
from mailproof.net import LOOPBACK, free_port
from mailproof.servers.process import ManagedProcess

APT_PACKAGES = "spamassassin spamd"
INSTALL = f"apt-get install -y {APT_PACKAGES}"
START_TIMEOUT = 60.0
_READY = re.compile(r"spamd: server started on")
_NO_RULES = re.compile(r"no rules were found|config: no configuration text or files found", re.I)
OFFLINE_CONFIG = ("use_bayes 0", "bayes_auto_learn 0", "dns_available no", "skip_rbl_checks 1")


class SpamdError(MailproofError):
    """spamd is missing or failed to start; the message says what to do."""


def find_spamd() -> str:
    found = shutil.which("spamd")
    if not found:
        for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = os.path.join(directory, "spamd")
            if os.access(candidate, os.X_OK):
                found = candidate
                break
    if not found:
        raise SpamdError(f"'spamd' (SpamAssassin's daemon) not found, and the spam check needs it: install it "
                         f"with `{INSTALL}` (Debian/Ubuntu; on Debian 12 spamd is its own package) and run again.")
    return found


def _run_as() -> list[str]:
    """spamd refuses to run its children as root: as root, run them as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    for user in ("debian-spamd", "nobody"):
        try:
            pwd.getpwnam(user)
            return ["--username", user]
        except KeyError:
            continue
    return []


class Spamd:
    """A private spamd. ``host``/``port`` once started; ``output`` its last log lines."""

    def __init__(self, *, children: int = 2, extra_config: tuple[str, ...] = ()) -> None:
        self.host = LOOPBACK
        self.port: Optional[int] = None
        self.children = children
        self.extra_config = tuple(extra_config)
        self.directory: Optional[Path] = None
        self._process: Optional[ManagedProcess] = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def address(self) -> tuple[str, int]:
        if self.port is None:
            raise SpamdError("spamd is not started")
        return self.host, self.port

    @property
    def output(self) -> list[str]:
        return list(self._process.output) if self._process else []

    def command(self) -> list[str]:
        assert self.directory is not None and self.port is not None
        config = [f"--cf={line}" for line in OFFLINE_CONFIG + self.extra_config]
        return [find_spamd(), "--local", "--nouser-config", "--ipv4-only", f"--listen={self.host}:{self.port}",
                f"--allowed-ips={self.host}", "--syslog=stderr", f"--max-children={self.children}",
                "--min-children=1", "--min-spare=1", f"--max-spare={self.children}",
                f"--pidfile={self.directory / 'spamd.pid'}", f"--helper-home-dir={self.directory}",
                *_run_as(), *config]

    def start(self) -> "Spamd":
        if self.running:
            raise SpamdError("spamd is already running; stop() it first")
        binary = find_spamd()  # the clear error before anything is made
        self.directory = Path(tempfile.mkdtemp(prefix="mailproof-spamd-", dir="/tmp"))
        os.chmod(self.directory, 0o755)  # the unprivileged children use it as their home
        for attempt in range(3):
            self.port = free_port()
            process = ManagedProcess(self.command(), name="spamd", ready=_READY, merge_stderr=True,
                                     env={**os.environ, "LC_ALL": "C"}, tail_lines=60)
            try:
                process.start()
            except OSError as exc:
                self._cleanup()
                raise SpamdError(f"cannot run {binary}: {exc}. Reinstall it: {INSTALL}") from exc
            if process.wait_ready(START_TIMEOUT):
                self._process = process
                return self
            process.stop()
            log = "\n".join(process.output)
            if "Address already in use" in log and attempt < 2:
                continue  # the port was taken between free_port() and the bind
            self._cleanup()
            if _NO_RULES.search(log):
                raise SpamdError("spamd found no SpamAssassin rules: the package's rules are in "
                                 f"/usr/share/spamassassin (reinstall: {INSTALL}), or run sa-update "
                                 f"(needs the network). spamd said:\n{log}")
            raise SpamdError(f"spamd did not start within {START_TIMEOUT:g} s (exit code {process.returncode}). "
                             f"Its last lines:\n{log}")
        raise SpamdError("spamd could not bind a free port")  # pragma: no cover

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> "Spamd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
