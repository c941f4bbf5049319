"""DKIM signing (RFC 6376) of every outgoing email, with dkimpy, when a key is configured.

The message is flattened here, as aiosmtplib would, but always 7-bit clean (8-bit parts become
base64 or quoted-printable): the signed bytes must be the bytes sent, whatever the relay offers
(a relay without 8BITMIME would otherwise make aiosmtplib flatten differently than was signed).
Every header present is signed but those RFC 6376 says not to (dkimpy's SHOULD_NOT list), so
List-Unsubscribe and List-Unsubscribe-Post are covered, as RFC 8058 requires; dkimpy's default
list would leave List-Unsubscribe-Post out. Canonicalization relaxed/relaxed.
"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import dkim
from aiosmtplib.email import flatten_message


class Signer:
    def __init__(self, key_file: str, selector: str, domain: str) -> None:
        try:
            self.key = Path(key_file).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the DKIM private key {key_file!r}: {exc}") from exc
        if b"PRIVATE KEY" not in self.key:
            raise ValueError(f"{key_file!r} is not a PEM private key (-----BEGIN ... PRIVATE KEY-----)")
        self.selector, self.domain = selector.encode("ascii"), domain.encode("idna")

    def sign(self, msg: EmailMessage, utf8: bool) -> bytes:
        """The message as it goes on the wire, a DKIM-Signature header first."""
        raw = flatten_message(msg, utf8=utf8, cte_type="7bit")
        headers = [name.lower().encode("ascii") for name in dict.fromkeys(k.lower() for k in msg.keys())
                   if name.lower().encode("ascii") not in dkim.DKIM.SHOULD_NOT]
        signature = dkim.sign(raw, self.selector, self.domain, self.key, include_headers=headers,
                              canonicalize=(b"relaxed", b"relaxed"))
        return signature + raw
