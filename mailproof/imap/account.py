"""Which IMAP inbox to watch: ``ImapAccount``, built from the plugin's settings and validated.

The settings arrive as strings from an ini key ``mailproof_imap_<key>`` or the environment
variable ``MAILPROOF_IMAP_<KEY>`` (``setting_name`` spells both). A wrong one must fail before
any connection is tried, with a message that names the setting and says what to put there,
because the person reading it is configuring a staging inbox, not debugging mailproof.

``tls=plain`` is refused for anything but loopback: it would send the password in clear. The
inbox address is the bare ``local@domain``; test addresses plus-address it (``local+token@domain``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mailproof.errors import MailproofError
from mailproof.net import is_loopback

TLS_MODES = ("ssl", "starttls", "plain")
CONNECT_TIMEOUT = 5.0  # connect, TLS handshake, greeting, login: a bad setting fails within this


def setting_name(key: str) -> str:
    """How a user sets ``key``: the ini key and the environment variable."""
    return f"mailproof_imap_{key} / MAILPROOF_IMAP_{key.upper()}"


@dataclass(frozen=True)
class ImapAccount:
    """One IMAP inbox and how to reach it. Build it with ``from_options`` (validates)."""

    host: str
    port: int
    tls: str
    user: str
    password: str = ""
    folder: str = "INBOX"
    address: str = ""
    ca_file: Optional[str] = None  # extra CA to trust (tests with a trustme CA); else system CAs
    timeout: float = CONNECT_TIMEOUT

    def __repr__(self) -> str:  # never print the password
        return (f"ImapAccount(host={self.host!r}, port={self.port}, tls={self.tls!r}, user={self.user!r}, "
                f"folder={self.folder!r}, address={self.address!r})")

    @property
    def local(self) -> str:
        return self.address.rsplit("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port} ({self.tls}, folder {self.folder!r})"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ImapAccount":
        """Validate the plugin's settings (all strings, possibly empty). Errors name the setting."""
        get = lambda key: str(options.get(key) or "").strip()  # noqa: E731
        host = get("host")
        if not host:
            raise MailproofError(f"no IMAP host: set {setting_name('host')} (leave it empty only for the private Dovecot)")
        if "://" in host or "/" in host or " " in host:
            raise MailproofError(f"invalid IMAP host {host!r}: give a bare host name such as imap.example.com ({setting_name('host')})")
        tls = get("tls").lower() or "ssl"
        if tls not in TLS_MODES:
            raise MailproofError(f"invalid IMAP tls mode {tls!r}: use ssl, starttls or plain ({setting_name('tls')})")
        if tls == "plain" and not is_loopback(host):
            raise MailproofError(
                f"tls=plain would send the IMAP password in clear to {host}: plain is for loopback test "
                f"servers only; use ssl or starttls ({setting_name('tls')})"
            )
        port_text = get("port")
        if port_text:
            try:
                port = int(port_text)
            except ValueError:
                port = 0
            if not 0 < port < 65536:
                raise MailproofError(f"invalid IMAP port {port_text!r}: a number from 1 to 65535 ({setting_name('port')})")
        else:
            port = 993 if tls == "ssl" else 143
        user = get("user")
        if not user:
            raise MailproofError(f"no IMAP user: set {setting_name('user')}")
        password = str(options.get("password") or "")
        if not password:
            raise MailproofError(f"no IMAP password for {user!r}: set {setting_name('password')} (prefer the environment variable)")
        folder = get("folder") or "INBOX"
        address = get("address").lower() or (user.lower() if "@" in user else "")
        if not address:
            raise MailproofError(
                f"no address for the IMAP inbox: set {setting_name('address')} to the inbox's own "
                "address (test addresses plus-address it: local+token@domain)"
            )
        local, _, domain = address.rpartition("@")
        if not local or not domain or "." not in domain or " " in address:
            raise MailproofError(f"invalid inbox address {address!r}: expected local@domain ({setting_name('address')})")
        if "+" in local:
            raise MailproofError(
                f"the inbox address {address!r} already has a +detail: give the bare address, mailproof "
                f"adds +token itself ({setting_name('address')})"
            )
        ca_file = get("ca_file") or None
        if ca_file and not os.path.isfile(ca_file):
            raise MailproofError(f"CA file {ca_file!r} not found (IMAP ca_file)")
        timeout = float(options.get("timeout") or CONNECT_TIMEOUT)
        return cls(host=host, port=port, tls=tls, user=user, password=password, folder=folder,
                   address=address, ca_file=ca_file, timeout=timeout)
