"""A private Dovecot (IMAP + LMTP) for tests: real server, own directory, loopback only.

>>> with Dovecot(users={"qa": "secret"}) as dovecot:
...     smtplib.LMTP(dovecot.host, dovecot.lmtp_port)      # deliver
...     imap_tools.MailBoxUnencrypted(dovecot.host, dovecot.imap_port).login("qa", "secret")

How it runs (see docs/traps.md, "Dovecot"):

- ``dovecot -F -c CONF`` in the foreground, as a child of this process, with its own base_dir,
  state_dir and maildirs in a ``tempfile.mkdtemp(dir="/tmp")`` directory of mode 0755 (pytest's
  tmp_path is 0700 and Dovecot's unprivileged processes could not enter it; /tmp also keeps the
  unix socket paths under base_dir short).
- Everything listens on 127.0.0.1 only, on ports picked free by the OS: IMAP (plain, with
  STARTTLS when TLS is on), IMAPS when TLS is on, and LMTP over TCP so that Postfix and Python
  can both deliver.
- Users come from a passwd-file passdb; a static userdb maps every user to one mail uid:
  as root, the Debian ``mail`` system user (uid 8, present on every Debian/Ubuntu, no login, not
  one of Dovecot's own ``dovecot``/``dovenull`` privilege-separation users, so those keep their
  meaning); when not root, the current user (Dovecot then runs every process as that user).
- Readiness is an event: Dovecot logs to stderr (a pipe read by a thread), and ``start()`` waits
  on the "starting up" line, which the master writes after it has bound every listener; then it
  reads one IMAP greeting (imap-login is up). No fixed sleep anywhere. Ready in ~20 ms.
- No auth penalty (the anvil-auth-penalty socket is disabled) and ``auth_failure_delay = 0``:
  after a wrong-password test, later logins from 127.0.0.1 would otherwise wait 2 to 15 s.
- Launch, log reading and stop are ManagedProcess's (mailproof/servers/process.py). ``stop()``
  sends SIGTERM to the instance's whole process group, as systemd stops dovecot.service (~10 ms,
  where the master alone takes ~1 s and leaves logged-in imap processes serving their clients:
  shutdown_clients does not reach them in this mode), waits for every process, then removes the
  directory unless ``keep``. Clients get "* BYE Server shutting down." either way.
  ``restart()`` stops and starts again on the same ports and the same maildirs (mail survives).
"""

from __future__ import annotations

import collections
import grp
import os
import pwd
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Mapping, Optional

from mailproof.net import LOOPBACK, free_port
from mailproof.servers.process import ManagedProcess
# Re-exported: tests (tests/test_imap_backend.py) import these from here.
from mailproof.servers.process import live_group_members, processes_matching, tcp_sockets  # noqa: F401

APT_PACKAGES = "dovecot-imapd dovecot-lmtpd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_READY = re.compile(r"master: Info: Dovecot v\S+ .*starting up")
_FATAL = re.compile(r"(Fatal|Error): ")


class DovecotError(RuntimeError):
    """Dovecot is missing, misconfigured or failed to start; the message says what to do."""


def find_binary(name: str, package: str, extra_dirs: tuple[str, ...] = ("/usr/sbin", "/sbin")) -> str:
    found = shutil.which(name)
    if not found:
        for directory in extra_dirs:
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                found = candidate
                break
    if not found:
        raise DovecotError(
            f"{name!r} not found: install it with `apt-get install -y {package}` "
            "(Debian/Ubuntu) and run again."
        )
    return found


def mail_identity() -> tuple[int, int, str, str]:
    """(uid, gid, user, group) that owns the maildirs and runs the mail processes."""
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("mail")
        except KeyError:  # not Debian-like: fall back to nobody, still non-zero
            entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid, entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name
    uid, gid = os.geteuid(), os.getegid()
    return uid, gid, pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name


class Dovecot:
    """A private Dovecot instance. Attributes: ``host``, ``imap_port``, ``imaps_port`` (TLS
    only), ``lmtp_port``, ``users`` (name -> password), ``domain``, ``directory``."""

    def __init__(
        self,
        users: Optional[Mapping[str, str]] = None,
        *,
        domain: str = "mailproof.test",
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        auth_failure_delay: float = 0,
        recipient_delimiter: str = "+",
        keep: bool = False,
    ) -> None:
        self.users = dict(users) if users is not None else {"qa": secrets.token_hex(12)}
        for name, password in self.users.items():
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or ":" in password or "\n" in password:
                raise ValueError(f"unusable Dovecot user {name!r}: letters, digits, . _ - only; no ':' in passwords")
        self.domain = domain
        self.host = LOOPBACK
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM file paths)")
        self.auth_failure_delay = auth_failure_delay
        self.recipient_delimiter = recipient_delimiter
        self.keep = keep
        self.imap_port: Optional[int] = None
        self.imaps_port: Optional[int] = None
        self.lmtp_port: Optional[int] = None
        self.directory: Optional[Path] = None
        self.binary = find_binary("dovecot", APT_PACKAGES)
        self.output: collections.deque[str] = collections.deque(maxlen=200)  # kept across restarts
        self._process: Optional[ManagedProcess] = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    def start(self) -> "Dovecot":
        if self.running:
            raise DovecotError("Dovecot is already running; stop() it first")
        first = self.directory is None
        if first:
            self.directory = Path(tempfile.mkdtemp(prefix="mailproof-dovecot-", dir="/tmp"))
            os.chmod(self.directory, 0o755)
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.imap_port = free_port()
                self.lmtp_port = free_port()
                self.imaps_port = free_port() if self.tls else None
            try:
                self._write_config()
                self._launch()
                return self
            except DovecotError as exc:
                # A port taken between free_port() and the bind: pick new ones and try again.
                if first and "Address already in use" in str(exc) and attempt + 1 < attempts:
                    continue
                if first:
                    self._remove_directory()
                raise
        return self

    def stop(self) -> None:
        """End the instance's process group (every Dovecot process), remove the directory."""
        self._terminate()
        if not self.keep:
            self._remove_directory()

    def restart(self, *, reset_uids: bool = False) -> "Dovecot":
        """Stop and start again on the same ports and maildirs (clients see the connection drop).

        ``reset_uids`` deletes every maildir's ``dovecot-uidlist`` and index while stopped:
        Dovecot then numbers the messages afresh under a new UIDVALIDITY (a rebuilt index).
        """
        self._terminate()
        if reset_uids and self.directory is not None:
            # The UIDs live in dovecot-uidlist and in the index (which would restore them).
            for pattern in ("*/**/dovecot-uidlist", "*/**/dovecot.index*"):
                for path in (self.directory / "mail").glob(pattern):
                    path.unlink()
        return self.start()

    def __enter__(self) -> "Dovecot":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------

    def address(self, user: Optional[str] = None) -> str:
        return f"{user or next(iter(self.users))}@{self.domain}"

    def maildir(self, user: Optional[str] = None) -> Path:
        assert self.directory is not None
        return self.directory / "mail" / (user or next(iter(self.users)))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.output)[-lines:])

    # -- internals ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "dovecot.conf"

    def _write_config(self) -> None:
        d = self.directory
        assert d is not None
        uid, gid, user, group = mail_identity()
        root = os.geteuid() == 0
        for sub in ("run", "state", "mail", "home"):
            (d / sub).mkdir(exist_ok=True)
        for sub in ("mail", "home"):
            os.chown(d / sub, uid, gid)
            os.chmod(d / sub, 0o700)
        users_file = d / "users"
        users_file.write_text("".join(f"{name}:{{PLAIN}}{pw}::::::\n" for name, pw in self.users.items()))
        # Read by the auth process, which runs as Dovecot's internal user (``dovecot``) as root.
        internal = pwd.getpwnam("dovecot") if root else pwd.getpwuid(uid)
        os.chown(users_file, internal.pw_uid, internal.pw_gid)
        os.chmod(users_file, 0o600)
        ssl_block = "ssl = no\n"
        imaps = "  inet_listener imaps {\n    port = 0\n  }\n"
        if self.tls:
            ssl_block = f"ssl = yes\nssl_cert = <{self.tls_cert}\nssl_key = <{self.tls_key}\n"
            imaps = f"  inet_listener imaps {{\n    address = {LOOPBACK}\n    port = {self.imaps_port}\n    ssl = yes\n  }}\n"
        # Not root: Dovecot can neither switch users nor chroot; every process runs as us.
        unprivileged = "" if root else (
            f"default_internal_user = {user}\ndefault_internal_group = {group}\n"
            f"default_login_user = {user}\n"
            "service imap-login {\n  chroot =\n}\n"
        )
        anvil_chroot = "" if root else "  chroot =\n"
        self.config_path.write_text(
            f"""# mailproof private Dovecot: generated, loopback only
instance_name = {d.name}
base_dir = {d}/run
state_dir = {d}/state
log_path = /dev/stderr
info_log_path = /dev/stderr
debug_log_path = /dev/stderr
listen = {LOOPBACK}
hostname = imap.{self.domain}
protocols = imap lmtp
{ssl_block}disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = {self.auth_failure_delay:g} secs
auth_username_format = %Ln
recipient_delimiter = {self.recipient_delimiter}
lmtp_save_to_detail_mailbox = no
mail_location = maildir:{d}/mail/%n
first_valid_uid = {uid}
first_valid_gid = {gid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {users_file}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
{imaps}}}
service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {self.lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0600
  }}
}}
# No auth penalty (anvil delays every login from an IP by 2 to 15 s after a failed one): a
# wrong-password test must not slow down the logins that follow it. Mode 0 = no such socket.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{anvil_chroot}}}
{unprivileged}"""
        )

    def _launch(self) -> None:
        assert self.directory is not None
        self._process = ManagedProcess(
            [self.binary, "-F", "-c", str(self.config_path)], name="dovecot", ready=_READY,
            merge_stderr=True, output=self.output, log_path=self.directory / "dovecot.log",
        ).start()
        ready = self._process.wait_ready(START_TIMEOUT) is not None
        if not ready or not self._process.running:
            why = "exited" if self._process.returncode is not None else "did not report 'starting up'"
            self._terminate()
            raise DovecotError(
                f"Dovecot {why} within {START_TIMEOUT:g} s (config {self.config_path}):\n{self.log_tail()}"
            )
        # The master binds every listener before it logs "starting up". Reading one IMAP greeting
        # also waits for imap-login to run: a SIGTERM while the master is still forking its
        # first children takes it about 6 s to obey instead of about 1 s.
        try:
            with socket.create_connection((self.host, self.imap_port), timeout=5) as sock:
                greeting = sock.makefile("rb").readline()
                if not greeting.startswith(b"* OK"):
                    raise OSError(f"unexpected greeting {greeting!r}")
        except OSError as exc:
            self._terminate()
            raise DovecotError(f"Dovecot started but its IMAP port does not greet: {exc}\n{self.log_tail()}") from exc

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(STOP_TIMEOUT)

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
