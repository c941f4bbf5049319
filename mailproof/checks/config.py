"""What the checks need to know that the email does not say: keys, hosts under test, spamd.

One process-wide ``config`` (``mailproof.checks.config``) serves ``msg.checks``; the pytest
plugin fills in the application's host and a lazily started spamd, and a project adds its DKIM
keys (``config.add_dkim_key(domain, selector, public_key)``). A ``CheckConfig`` of one's own can
be passed to ``Checks(msg, config=...)`` instead.
"""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Union
from urllib.parse import urlsplit

DEFAULT_SPAM_THRESHOLD = 5.0  # SpamAssassin's own required_score
DEFAULT_HTTP_TIMEOUT = 10.0

_PEM = re.compile(rb"-----BEGIN (?:RSA )?PUBLIC KEY-----(.*?)-----END (?:RSA )?PUBLIC KEY-----", re.S)


def dkim_txt(public_key: Union[str, bytes]) -> bytes:
    """The DNS TXT record (``v=DKIM1; k=rsa; p=...``) for a public key given as PEM (either
    SubjectPublicKeyInfo or PKCS#1), as the bare base64 of ``p=``, or as a whole TXT record."""
    key = public_key.encode("ascii") if isinstance(public_key, str) else bytes(public_key)
    key = key.strip()
    if key.startswith(b"v=DKIM1") or b"p=" in key:
        return key
    found = _PEM.search(key)
    if found:
        key = b"".join(found.group(1).split())
    try:
        base64.b64decode(key, validate=True)
    except ValueError as exc:
        raise ValueError(f"not a DKIM public key (PEM, base64 or a v=DKIM1 TXT record): {key[:40]!r}...") from exc
    return b"v=DKIM1; k=rsa; p=" + key


def host_of(url: str) -> str:
    """``host:port`` of an http(s) URL (default ports spelled out), lower-cased; "" if none."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not host or parts.scheme.lower() not in ("http", "https"):
        return ""
    return f"{host.lower()}:{port or (443 if parts.scheme.lower() == 'https' else 80)}"


@dataclass
class CheckConfig:
    """``dkim_keys``: ``selector._domainkey.domain`` -> TXT record (the harness's key table,
    answered by the DKIM check's own ``dnsfunc``: no DNS is asked). ``app_hosts``: the
    ``host:port`` of the applications under test, the only ones the link and unsubscribe checks
    send requests to. ``spamd``: ``(host, port)`` of a running spamd, or a callable returning
    one (the plugin's lazy, once-per-session start)."""

    dkim_keys: dict[str, bytes] = field(default_factory=dict)
    app_hosts: set[str] = field(default_factory=set)
    spam_threshold: float = DEFAULT_SPAM_THRESHOLD
    spamd: Union[None, tuple[str, int], Callable[[], tuple[str, int]]] = None
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_dkim_key(self, domain: str, selector: str, public_key: Union[str, bytes]) -> None:
        name = f"{selector}._domainkey.{domain}".lower().rstrip(".")
        with self._lock:
            self.dkim_keys[name] = dkim_txt(public_key)

    def dkim_record(self, name: str) -> Optional[bytes]:
        with self._lock:
            return self.dkim_keys.get(name.lower().rstrip("."))

    def add_app_url(self, url: str) -> None:
        """Put the host of ``url`` under test (its links and unsubscribe URLs may be requested)."""
        host = host_of(url)
        if not host:
            raise ValueError(f"not an http(s) URL: {url!r}")
        with self._lock:
            self.app_hosts.add(host)

    def under_test(self, url: str) -> bool:
        host = host_of(url)
        with self._lock:
            return bool(host) and host in self.app_hosts

    def spamd_address(self) -> Optional[tuple[str, int]]:
        spamd = self.spamd
        return spamd() if callable(spamd) else spamd


config = CheckConfig()
