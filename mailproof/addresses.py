"""Unique test addresses: one per expectation (docs/architecture.md, decision 2).

``label+<run>.<seq>@domain``: ``run`` is random per process (so xdist workers and concurrent
runs never collide) and ``seq`` is zero-padded, so every token has the same width and no address
is a prefix of another (IMAP search is substring-based).
"""

from __future__ import annotations

import itertools
import re
import secrets
import string
import threading
from typing import Optional

_ALPHABET = string.ascii_lowercase + string.digits
_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")
RUN_WIDTH = 6
SEQ_WIDTH = 6
TOKEN = re.compile(rf"\+(?:[a-z0-9-]*\.)?([a-z0-9]{{{RUN_WIDTH}}})\.(\d{{{SEQ_WIDTH}}})@")


def new_run_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(RUN_WIDTH))


class AddressBook:
    """Hands out fresh addresses. Thread-safe.

    With ``local`` set (a real inbox such as ``qa@example.com``), addresses use plus-addressing
    on that one mailbox: ``qa+label.<run>.<seq>@domain``.
    """

    def __init__(self, domain: str = "mailproof.test", run_id: Optional[str] = None,
                 local: Optional[str] = None) -> None:
        if not domain or "@" in domain or " " in domain:
            raise ValueError(f"invalid mail domain {domain!r}: give a bare domain such as 'mailproof.test'")
        self.domain = domain.lower()
        self.run_id = run_id or new_run_id()
        self.local = local
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def address(self, label: str = "user") -> str:
        clean = _LABEL_CHARS.sub("-", label.lower()).strip("-") or "user"
        with self._lock:
            seq = next(self._seq)
        token = f"{self.run_id}.{seq:0{SEQ_WIDTH}d}"
        if self.local:
            return f"{self.local}+{clean}.{token}@{self.domain}"
        return f"{clean}+{token}@{self.domain}"


def is_handed_out_by(address: str, run_id: str) -> bool:
    found = TOKEN.search(address.lower())
    return bool(found and found.group(1) == run_id)
