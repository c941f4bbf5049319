"""A private Postfix in front of a private Dovecot: the application's real SMTP relay in tests.

>>> with Dovecot() as dovecot, Postfix(lmtp_port=dovecot.lmtp_port) as postfix:
...     smtplib.SMTP(postfix.host, postfix.smtp_port).sendmail(..., ["qa+x@mailproof.test"], ...)

Root only (Postfix's master must start as root to drop to the ``postfix`` user). How it runs
(see docs/traps.md, "Postfix"):

- Its own ``config_directory`` (main.cf + master.cf written here), ``queue_directory`` and
  ``data_directory`` in a 0755 ``tempfile.mkdtemp(dir="/tmp")`` directory; nothing under
  /etc/postfix or /var/spool/postfix is touched. ``postfix -c DIR check`` creates the queue
  tree with the right owners and validates the configuration; then ``master -c DIR -s`` runs
  in the foreground as our child (``-s`` keeps its stdout, so ``maillog_file = /dev/stdout``
  reaches a pipe that a thread reads and copies to ``DIR/maillog``; ``maillog_file_prefixes``
  allows that path). Nothing goes to syslog, so nothing is lost when no syslogd runs.
- smtpd listens on 127.0.0.1 on a free port only (``inet_interfaces = 127.0.0.1`` and an
  explicit ``127.0.0.1:PORT`` service); no daemon runs chrooted.
- Routing: the test domain is a ``virtual_mailbox_domains`` domain with
  ``virtual_transport = lmtp:inet:127.0.0.1:<dovecot lmtp port>`` (``mydestination`` empty, no
  local delivery, no aliases). Postfix hands the full recipient (``qa+token@domain``) to
  Dovecot in RCPT TO; Dovecot strips the ``+detail`` only to find the user, files the copy in
  qa's INBOX and writes ``Delivered-To: qa+token@domain`` at the top (the header the IMAP
  watcher routes on; Postfix adds X-Original-To only in its own local/virtual/pipe agents).
  Dovecot writes Delivered-To only for a transaction with ONE recipient (with two, both copies
  come out identical, with neither address): ``lmtp_destination_recipient_limit = 1``.
- Fast retries (``queue_run_delay``/``minimal_backoff_time`` 1 s) so a message deferred while
  Dovecot restarts is delivered a second later, not after Postfix's default 5 minutes;
  ``in_flow_delay = 0`` so bursts are not throttled.
- main.cf is back-dated by a minute: a main.cf younger than the daemons' start makes Postfix
  wait about 2 s (docs/traps.md).
- Readiness is an event: the master logs "daemon started" after it has opened every listener;
  ``start()`` waits for that line on the pipe. Launch, log reading and stop are
  ManagedProcess's (mailproof/servers/process.py): the master runs in its own session (its own
  setsid() then finds it already a session leader, which it accepts), and ``stop()`` sends
  SIGTERM to that whole process group (on ``postfix stop`` the master does the same to its
  children), waits for every process, then SIGKILLs stragglers; the directory is removed.
"""

from __future__ import annotations

import collections
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from mailproof.net import LOOPBACK, free_port
from mailproof.servers.process import ManagedProcess

APT_PACKAGE = "postfix"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_READY = re.compile(r"postfix/master\[\d+\]: daemon started")

# One service per line: name type private unpriv chroot wakeup maxproc command. No chroot.
_MASTER_CF = """\
{smtp_service} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """Postfix is missing, cannot run here, or failed to start; the message says what to do."""


def _binary(name: str, directory: str) -> str:
    path = os.path.join(directory, name)
    if not os.access(path, os.X_OK):
        raise PostfixError(
            f"{path} not found: install Postfix with "
            "`echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections "
            f"&& apt-get install -y {APT_PACKAGE}` (the preseed keeps the system daemon from starting)."
        )
    return path


class Postfix:
    """A private Postfix relaying ``domain`` to Dovecot's LMTP. Attributes: ``host``,
    ``smtp_port``, ``directory``, ``maillog`` (path of the copied log)."""

    def __init__(self, lmtp_port: int, *, domain: str = "mailproof.test", lmtp_host: str = LOOPBACK,
                 hostname: Optional[str] = None, keep: bool = False) -> None:
        self.postfix_cmd = _binary("postfix", "/usr/sbin")
        self.master_cmd = _binary("master", "/usr/lib/postfix/sbin")
        if os.geteuid() != 0:
            raise PostfixError(
                "a private Postfix needs root (its master starts as root and drops to the postfix "
                "user); without root, relay with mailproof.capture.lmtp_relay.LmtpRelay instead"
            )
        self.lmtp_host = lmtp_host
        self.lmtp_port = lmtp_port
        self.domain = domain
        self.hostname = hostname or f"smtp.{domain}"
        self.keep = keep
        self.host = LOOPBACK
        self.smtp_port: Optional[int] = None
        self.directory: Optional[Path] = None
        self.output: collections.deque[str] = collections.deque(maxlen=300)  # kept across starts
        self._process: Optional[ManagedProcess] = None
        self._lines_lock = threading.Condition()
        self._lines: list[str] = []
        self._line_listeners: list[Callable[[str], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    @property
    def maillog(self) -> Path:
        assert self.directory is not None
        return self.directory / "maillog"

    def start(self) -> "Postfix":
        if self.running:
            raise PostfixError("Postfix is already running; stop() it first")
        self.directory = Path(tempfile.mkdtemp(prefix="mailproof-postfix-", dir="/tmp"))
        os.chmod(self.directory, 0o755)
        try:
            for attempt in range(3):
                self.smtp_port = free_port()
                self._write_config()
                self._check()
                try:
                    self._launch()
                    return self
                except PostfixError as exc:
                    if "Address already in use" in str(exc) and attempt < 2:
                        continue  # the port was taken between free_port() and the bind
                    raise
        except BaseException:
            self._remove_directory()
            raise
        return self

    def stop(self) -> None:
        self._terminate()
        if not self.keep:
            self._remove_directory()

    def __enter__(self) -> "Postfix":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.output)[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> Optional[re.Match]:
        """The first log line from index ``start`` on that matches ``pattern`` (woken per line)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._lines_lock:
            while True:
                while index < len(self._lines):
                    found = regex.search(self._lines[index])
                    index += 1
                    if found:
                        return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lines_lock.wait(left)

    def add_line_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(line)`` for every log line, from the log reader thread (keep it short).
        E.g. react to ``status=sent`` lines: the moment Postfix has handed a message over."""
        self._line_listeners.append(listener)

    @property
    def log_lines(self) -> list[str]:
        with self._lines_lock:
            return list(self._lines)

    # -- internals ---------------------------------------------------------------------------

    def _write_config(self) -> None:
        d = self.directory
        assert d is not None
        # `postfix check` creates the queue tree with Postfix's owners; data_directory (master's
        # lock, caches) must belong to mail_owner.
        (d / "queue").mkdir(exist_ok=True)
        (d / "data").mkdir(mode=0o700, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(d / "data", owner.pw_uid, owner.pw_gid)
        main_cf = d / "main.cf"
        main_cf.write_text(
            f"""# mailproof private Postfix: generated, loopback only
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $myhostname
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
virtual_alias_maps =
virtual_mailbox_domains = {self.domain}
virtual_mailbox_maps =
virtual_transport = lmtp:inet:{self.lmtp_host}:{self.lmtp_port}
lmtp_destination_recipient_limit = 1
recipient_delimiter = +
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
lmtp_host_lookup = native
smtputf8_enable = yes
biff = no
append_dot_mydomain = no
in_flow_delay = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
maillog_file = /dev/stdout
maillog_file_prefixes = /dev/stdout, {d}
"""
        )
        (d / "master.cf").write_text(_MASTER_CF.format(smtp_service=f"{LOOPBACK}:{self.smtp_port}"))
        past = time.time() - 60  # a main.cf newer than the daemons makes Postfix pause (docs/traps.md)
        for name in ("main.cf", "master.cf"):
            os.utime(d / name, (past, past))

    def _check(self) -> None:
        result = subprocess.run([self.postfix_cmd, "-c", str(self.directory), "check"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PostfixError(
                f"`postfix -c {self.directory} check` failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def _launch(self) -> None:
        assert self.directory is not None
        with self._lines_lock:
            self._lines = []
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        self._process = ManagedProcess(
            [self.master_cmd, "-c", str(self.directory), "-s"], name="postfix", env=env,
            ready=_READY, merge_stderr=True, output=self.output, log_path=self.maillog,
            on_line=self._on_line,
        ).start()
        ready = self._process.wait_ready(START_TIMEOUT) is not None
        if not ready or not self._process.running:
            why = "exited" if self._process.returncode is not None else "did not log 'daemon started'"
            self._terminate()
            tail = self.log_tail()
            if not tail:
                tail = ("(no log: the master failed before its log service ran, so the reason went "
                        f"to syslog; try `{self.master_cmd} -c {self.directory} -d -v -s` by hand)")
            raise PostfixError(f"Postfix {why} within {START_TIMEOUT:g} s (config {self.directory}):\n{tail}")

    def _on_line(self, line: str) -> None:
        """From the log reader thread: feed wait_for_log and the line listeners."""
        with self._lines_lock:
            self._lines.append(line)
            self._lines_lock.notify_all()
        for listener in list(self._line_listeners):
            try:
                listener(line)
            except Exception:  # a listener bug must not stop the log reader (Postfix would block)
                pass

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(STOP_TIMEOUT)

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
