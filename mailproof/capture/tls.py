"""STARTTLS and AUTH for the capture sink: a throwaway CA, and the settings that switch both on.

TLS modes (the plugin's ``mailproof_sink_tls`` / ``--sink-tls``, the sink service's ``--tls``):

- ``off`` (default): plain SMTP, no STARTTLS offered;
- ``starttls``: STARTTLS is offered, mail in the clear is still accepted;
- ``starttls-required``: MAIL (and everything but EHLO/NOOP/QUIT/STARTTLS) before STARTTLS is
  refused with ``530 Must issue a STARTTLS command first``.

AUTH (the plugin's ``mailproof_sink_auth`` / ``--sink-auth``, the service's ``--auth``, or the
environment variable ``MAILPROOF_SINK_AUTH`` for both, which keeps the password out of ``ps``):
``USER:PASSWORD`` (split at the first colon). With it, AUTH PLAIN and LOGIN are offered and
required: MAIL before AUTH is refused with ``530 5.7.0 Authentication required``, a wrong
password with ``535 5.7.8``. A captured ``Message`` says what its session used: ``tls`` (True
after STARTTLS) and ``auth_user`` (the user it authenticated as, or None).

The certificate. When TLS is on, the sink makes a throwaway certificate authority at start
(``SinkCA``), issues itself a certificate for ``localhost``, ``127.0.0.1``, ``::1``, the host it
binds and this machine's name, and writes the CA certificate (PEM, no key) to a file:
``backend.tls_ca_file`` (plugin), ``ca_file`` under ``tls`` in the service's ``/health``, and
``ca=PATH`` at the end of its READY line. The application under test trusts that file:

- Python (smtplib, aiosmtplib, anything on ``ssl.create_default_context()``): start the app with
  ``SSL_CERT_FILE=PATH``. That replaces the default CA bundle of the process; an app that also
  talks TLS to real services should load the file into its SMTP context only
  (``ssl.create_default_context(cafile=PATH)``) or get a bundle of both (``cat`` the system bundle
  and PATH into one file).
- Node (nodemailer): ``NODE_EXTRA_CA_CERTS=PATH`` (added to the built-in CAs; read when the
  process starts, so start the app after the sink), or ``tls: {ca: fs.readFileSync(PATH)}``.
- Go and OpenSSL-based runtimes (Ruby, PHP, curl): ``SSL_CERT_FILE=PATH``; Java: import PATH into
  a truststore with ``keytool -importcert`` and pass ``-Djavax.net.ssl.trustStore=...``.

Connect by one of the names in the certificate (``127.0.0.1`` or ``localhost`` on loopback;
more with ``tls_hostnames`` / the service's ``--tls-hostname``), or the app's hostname check fails.

Why trustme: mailproof is a test harness, and trustme is the test tool made for exactly this (a
CA and leaf certificates with the extensions strict verifiers want, in memory, in a few lines).
Its only dependency is ``cryptography``; writing the X.509 details by hand with ``cryptography``
would be ours to keep right for every client's verifier. It is imported only when TLS is asked
for; without it, starting a TLS sink fails and says ``pip install 'mailproof[tls]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from mailproof.errors import MailproofError
from mailproof.net import UNSPECIFIED

TLS_MODES = ("off", "starttls", "starttls-required")
AUTH_ENV = "MAILPROOF_SINK_AUTH"  # USER:PASSWORD, kept out of argv (``ps``)
CA_FILE_NAME = "mailproof-sink-ca.pem"

_OFF = {"", "off", "no", "none", "false", "0"}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")

Credentials = tuple[str, str]


class TLSUnavailable(MailproofError):
    """TLS was asked for, and trustme (which makes the throwaway CA) is not installed."""


def parse_tls_mode(value: Optional[str], *, source: str = "mailproof_sink_tls") -> str:
    """``off`` | ``starttls`` | ``starttls-required`` (empty, none, no, false also mean off)."""
    mode = (value or "").strip().lower()
    if mode in _OFF:
        return "off"
    if mode not in TLS_MODES:
        raise MailproofError(f"{source} must be one of {', '.join(TLS_MODES)}, not {value!r}")
    return mode


def parse_auth(value: Union[None, str, Credentials], *, source: str = "mailproof_sink_auth") -> Optional[Credentials]:
    """``"user:password"`` (or a pair) as ``(user, password)``; empty means no AUTH.

    The error never repeats the value: it holds a password.
    """
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        user, password = value
    else:
        user, sep, password = value.strip().partition(":")
        if not sep:
            raise MailproofError(f"{source} must be USER:PASSWORD (the value given has no ':')")
    if not user or not password:
        raise MailproofError(f"{source} must be USER:PASSWORD with neither part empty")
    return user, password


def trustme_available() -> bool:
    return importlib.util.find_spec("trustme") is not None


def _trustme():
    try:
        return importlib.import_module("trustme")
    except ImportError as exc:
        raise TLSUnavailable(
            "STARTTLS on the capture sink needs a throwaway CA, made with trustme, which is not "
            f"installed ({exc}): pip install 'mailproof[tls]' (or switch TLS off)") from None


def default_hostnames(host: Optional[str] = None) -> list[str]:
    """The names the sink's certificate is issued for: loopback, the bound host, this machine."""
    names = ["localhost", "127.0.0.1", "::1"]
    candidates = [host or "", socket.gethostname()]
    try:
        candidates.append(socket.getfqdn())
    except OSError:
        pass
    for name in candidates:
        name = name.strip("[]")
        if name and name not in UNSPECIFIED and name not in names and _valid_identity(name):
            names.append(name)
    return names


def _valid_identity(name: str) -> bool:
    try:
        import ipaddress

        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(name))


class SinkCA:
    """A throwaway CA, the sink's certificate from it, and the CA certificate in a file.

    >>> ca = SinkCA(); ca.ca_file  # give this to the app under test (SSL_CERT_FILE=...)
    >>> sink = SmtpSink(tls_context=ca.server_context()); ...; ca.cleanup()

    ``ca_file``: where to write the CA certificate (overwritten, left in place by ``cleanup()``);
    by default a file in a new temporary directory, removed by ``cleanup()``.
    """

    def __init__(self, hostnames: Optional[Iterable[str]] = None, *,
                 ca_file: Optional[Union[str, os.PathLike]] = None) -> None:
        trustme = _trustme()
        self.hostnames = list(hostnames) if hostnames is not None else default_hostnames()
        bad = [name for name in self.hostnames if not _valid_identity(name.strip("[]"))]
        if bad:
            raise MailproofError(f"cannot issue the sink's certificate for {bad[0]!r}: not a host name or IP address")
        self._ca = trustme.CA(organization_name="mailproof", organization_unit_name="capture sink test CA")
        self._cert = self._ca.issue_cert(*[name.strip("[]") for name in self.hostnames])
        self._own_dir: Optional[Path] = None
        if ca_file is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="mailproof-tls-"))
            path = self._own_dir / CA_FILE_NAME
        else:
            path = Path(ca_file).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
        self._ca.cert_pem.write_to_path(str(path))
        self.ca_file: str = str(path)

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate, PEM (what ``ca_file`` holds)."""
        return self._ca.cert_pem.bytes()

    def server_context(self) -> ssl.SSLContext:
        """The context the sink's STARTTLS uses: its certificate, TLS 1.2 or later."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this CA only (for tests of the sink itself)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def cleanup(self) -> None:
        """Remove the CA file's temporary directory (a ``ca_file`` given by the caller stays)."""
        own, self._own_dir = self._own_dir, None
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def sink_security(tls: str, auth: Optional[Credentials], *, host: Optional[str] = None,
                  hostnames: Iterable[str] = (), ca_file: Optional[str] = None) -> tuple[Optional[SinkCA], dict[str, Any]]:
    """The CA (None with TLS off) and the ``SmtpSink`` keyword arguments for a TLS mode and AUTH."""
    options: dict[str, Any] = {}
    ca = None
    if tls != "off":
        names = default_hostnames(host)
        names += [name for name in hostnames if name not in names]
        ca = SinkCA(names, ca_file=ca_file)
        options["tls_context"] = ca.server_context()
        options["require_starttls"] = tls == "starttls-required"
    if auth is not None:
        options["credentials"] = {auth[0]: auth[1]}
        options["auth_required"] = True
    return ca, options
