"""Opening one IMAP session (connect, TLS, login, select), or failing with the setting to fix.

Every way a wrong setting shows up on the wire is translated into a ``MailproofError`` that
names the setting: a name that does not resolve, an untrusted certificate, TLS spoken to a
plain port (handshake error) or plain to a TLS port (no greeting within the connect timeout),
nothing listening, no STARTTLS, a refused login (the server's reason, never the password), a
missing folder (with the folders that do exist). All of it happens within ``account.timeout``
(``CONNECT_TIMEOUT`` by default), so a bad setting fails a run in seconds, not at the first wait.

Once selected, the socket gets ``COMMAND_TIMEOUT``: a server silent that long is treated as gone.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import ssl
from typing import NamedTuple, Optional

from mailproof.extras import require

require("imap_tools", "the IMAP backend (--mailbox=imap)")

from imap_tools import MailBox, MailBoxStartTls, MailBoxUnencrypted  # noqa: E402
from imap_tools.errors import MailboxLoginError, MailboxStarttlsError  # noqa: E402

from mailproof.errors import MailproofError  # noqa: E402
from mailproof.imap.account import ImapAccount, setting_name  # noqa: E402

COMMAND_TIMEOUT = 30.0  # once logged in: a server silent this long is treated as gone


class Selected(NamedTuple):
    """What the server said at login and SELECT."""

    capabilities: frozenset
    uidvalidity: Optional[int]
    uidnext: int


def connect(account: ImapAccount):
    """An imap-tools mailbox connected to ``account`` (greeting read, TLS up), not logged in."""
    acct = account
    where = f"{acct.host}:{acct.port}"
    try:
        if acct.tls == "ssl":
            return MailBox(acct.host, acct.port, timeout=acct.timeout, ssl_context=_ssl_context(acct))
        if acct.tls == "starttls":
            return MailBoxStartTls(acct.host, acct.port, timeout=acct.timeout, ssl_context=_ssl_context(acct))
        return MailBoxUnencrypted(acct.host, acct.port, timeout=acct.timeout)
    except socket.gaierror as exc:
        raise MailproofError(f"cannot resolve the IMAP host {acct.host!r}: {exc}. Check {setting_name('host')}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise MailproofError(
            f"the IMAP server {where} presented a certificate this machine does not trust "
            f"({exc.verify_message}). Check {setting_name('host')} (the name must match the "
            "certificate) or trust its CA (SSL_CERT_FILE)"
        ) from exc
    except ssl.SSLError as exc:
        raise MailproofError(
            f"TLS handshake with {where} failed ({exc.reason or exc}): the port does not speak "
            f"implicit TLS. Check {setting_name('tls')} (ssl for port 993, starttls or plain for "
            f"143) and {setting_name('port')}"
        ) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise MailproofError(
            f"no IMAP greeting from {where} within {acct.timeout:g} s: wrong host/port, a firewall, "
            f"or a TLS port reached without TLS. Check {setting_name('host')}, {setting_name('port')} "
            f"and {setting_name('tls')} (tls={acct.tls})"
        ) from exc
    except ConnectionRefusedError as exc:
        raise MailproofError(
            f"the IMAP server {where} refused the connection: nothing listens there. Check "
            f"{setting_name('host')} and {setting_name('port')}"
        ) from exc
    except (MailboxStarttlsError, imaplib.IMAP4.error) as exc:
        raise MailproofError(
            f"IMAP server {where} does not allow STARTTLS ({exc}). Check {setting_name('tls')}: "
            "ssl for an implicit-TLS port, plain only for loopback test servers"
        ) from exc
    except OSError as exc:
        raise MailproofError(f"cannot reach the IMAP server {where}: {exc}. Check {setting_name('host')} and {setting_name('port')}") from exc


def login_and_select(mailbox, account: ImapAccount) -> Selected:
    """Log in and select ``account.folder`` on a connected ``mailbox``. On failure the connection
    is shut down and a MailproofError raised (other exceptions pass through, after the shutdown)."""
    try:
        return _login_and_select(mailbox, account)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mailbox.client.shutdown()
        if isinstance(exc, (imaplib.IMAP4.error, OSError, EOFError)):
            raise MailproofError(f"the IMAP session with {account.host}:{account.port} broke during login: {exc}") from exc
        raise


def _login_and_select(mailbox, acct: ImapAccount) -> Selected:
    client = mailbox.client
    try:
        mailbox.login(acct.user, acct.password, initial_folder=None)
    except MailboxLoginError as exc:
        raise MailproofError(
            f"IMAP login as {acct.user!r} at {acct.host}:{acct.port} was refused ({_server_text(exc)}): "
            f"wrong user or password. Check {setting_name('password')} and {setting_name('user')}"
        ) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise MailproofError(f"IMAP login at {acct.host}:{acct.port} got no answer within {acct.timeout:g} s") from exc
    typ, data = client.capability()  # after login: UIDPLUS and friends appear only now
    if typ == "OK" and data and data[0]:
        capabilities = frozenset(c.upper() for c in data[0].decode(errors="replace").split())
    else:
        capabilities = frozenset(c.upper() for c in client.capabilities)
    try:
        typ, data = client.select(_quote_folder(acct.folder))
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:
        typ, data = "NO", [str(exc).encode()]
    if typ != "OK":
        folders = []
        with contextlib.suppress(Exception):
            folders = [f.name for f in mailbox.folder.list()]
        raise MailproofError(
            f"IMAP folder {acct.folder!r} cannot be opened for {acct.user!r} "
            f"({(data[0] or b'').decode(errors='replace') if data else typ}). Existing folders: "
            f"{', '.join(folders) or 'none listed'}. Check {setting_name('folder')}"
        )
    uidvalidity = _untagged_int(client, "UIDVALIDITY")
    uidnext = _untagged_int(client, "UIDNEXT")
    if uidnext is None:  # rare servers: ask for the last UID instead
        typ, data = client.uid("SEARCH", "ALL")
        uids = [int(u) for u in (data[0] or b"").split()] if typ == "OK" else []
        uidnext = (max(uids) + 1) if uids else 1
    client.untagged_responses.clear()
    client.sock.settimeout(COMMAND_TIMEOUT)
    return Selected(capabilities, uidvalidity, uidnext)


def _ssl_context(account: ImapAccount) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if account.ca_file:
        context.load_verify_locations(account.ca_file)
    return context


def _server_text(exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"\[(?:AUTHENTICATIONFAILED|AUTHORIZATIONFAILED)\][^'\"]*", text)
    return found.group(0).strip() if found else text[-200:]


def _quote_folder(folder: str) -> bytes:
    from imap_tools.utils import encode_folder

    return encode_folder(folder)  # modified UTF-7, quoted


def _untagged_int(client, name: str) -> Optional[int]:
    values = client.untagged_responses.get(name) or []
    for value in values:
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None
