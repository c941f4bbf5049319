"""In-memory state: users, one-time tokens and codes, orders, newsletter lists.

All methods are synchronous and the app runs on one event loop, so every method is atomic:
check-then-act races (two signups for one address) cannot happen inside a method.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal

CONFIRM_TTL = 24 * 3600.0
RESET_TTL = 15 * 60.0
RESET_MAX_TRIES = 5  # a 6-digit code is guessable without a cap on wrong tries


@dataclass
class User:
    email: str
    name: str | None
    confirmed: bool = False
    # The validation API's verdict (deliverable | risky | unknown | undeliverable), "pending" when the
    # signup was accepted during a validation outage, "proven" once the confirmation link was followed.
    validation: str = "deliverable"
    password_hash: bytes | None = None
    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))


@dataclass
class ResetCode:
    code: str
    expires: float
    tries: int = 0


@dataclass
class OrderLine:
    sku: str
    name: str
    qty: int
    unit_price: Decimal

    @property
    def total(self) -> Decimal:
        return self.qty * self.unit_price


@dataclass
class Order:
    order_id: str
    email: str
    lines: list[OrderLine]

    @property
    def total(self) -> Decimal:
        return sum((line.total for line in self.lines), Decimal("0.00"))


def hash_password(password: str, salt: bytes) -> bytes:
    """scrypt costs ~50 ms of CPU: call it off the event loop (asyncio.to_thread)."""
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


class AlreadyExists(Exception):
    pass


class Store:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.users: dict[str, User] = {}
        self._confirm_tokens: dict[str, tuple[str, float]] = {}  # token -> (email, expires)
        self._reset_codes: dict[str, ResetCode] = {}  # email -> latest code only
        self._order_seq = 0
        self.orders: dict[str, Order] = {}
        self._lists: dict[str, dict[str, str]] = {}  # list_id -> {email: unsubscribe token}
        self._unsub_tokens: dict[str, tuple[str, str]] = {}  # token -> (list_id, email)
        # Addresses a provider reported bounced or complained about -> why; the outbox skips them.
        self.suppressed: dict[str, str] = {}

    # --- users and confirmation ---

    def add_user(self, email: str, name: str | None, validation: str = "deliverable") -> str:
        """Create an unconfirmed user; return its confirmation token."""
        if email in self.users:
            raise AlreadyExists(email)
        self.users[email] = User(email, name, validation=validation)
        token = secrets.token_urlsafe(24)
        self._confirm_tokens[token] = (email, self.clock() + CONFIRM_TTL)
        return token

    def confirm(self, token: str) -> tuple[str, User | None]:
        """Return ("confirmed" | "already" | "invalid", user)."""
        entry = self._confirm_tokens.get(token)
        if entry is None or self.clock() > entry[1]:
            return "invalid", None
        user = self.users[entry[0]]
        if user.confirmed:
            return "already", user
        user.confirmed = True
        if user.validation in ("pending", "undeliverable"):
            user.validation = "proven"  # the link reached its owner: a stronger proof than any verdict
        return "confirmed", user

    # --- password reset ---

    def new_reset_code(self, email: str) -> str:
        code = f"{secrets.randbelow(10**6):06d}"
        self._reset_codes[email] = ResetCode(code, self.clock() + RESET_TTL)  # replaces any older code
        return code

    def use_reset_code(self, email: str, code: str) -> bool:
        """True once for a valid code; the code is spent on success and after too many tries."""
        entry = self._reset_codes.get(email)
        if entry is None or self.clock() > entry.expires:
            return False
        if not secrets.compare_digest(entry.code.encode(), code.encode()):
            entry.tries += 1
            if entry.tries >= RESET_MAX_TRIES:
                del self._reset_codes[email]
            return False
        del self._reset_codes[email]
        return True

    def set_password_hash(self, email: str, password_hash: bytes) -> None:
        self.users[email].password_hash = password_hash

    # --- orders ---

    def add_order(self, email: str, lines: list[OrderLine]) -> Order:
        self._order_seq += 1
        order = Order(f"ORD-{self._order_seq:06d}", email, lines)
        self.orders[order.order_id] = order
        return order

    # --- newsletters ---

    def subscribe(self, list_id: str, email: str) -> bool:
        """Add a subscriber; False if already subscribed. Each subscription gets a fresh token."""
        subs = self._lists.setdefault(list_id, {})
        if email in subs:
            return False
        token = secrets.token_urlsafe(24)
        subs[email] = token
        self._unsub_tokens[token] = (list_id, email)
        return True

    def subscribers(self, list_id: str) -> dict[str, str]:
        """{email: unsubscribe token}, a copy."""
        return dict(self._lists.get(list_id, {}))

    def lookup_unsubscribe(self, token: str) -> tuple[str, str] | None:
        return self._unsub_tokens.get(token)

    def unsubscribe(self, token: str) -> str:
        """Return "removed" | "already" | "invalid". Old tokens never remove a newer subscription."""
        entry = self._unsub_tokens.get(token)
        if entry is None:
            return "invalid"
        list_id, email = entry
        subs = self._lists.get(list_id, {})
        if subs.get(email) != token:
            return "already"
        del subs[email]
        return "removed"
