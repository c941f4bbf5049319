"""Builds each email the shop sends: jinja2 templates -> email.message.EmailMessage.

Every message is multipart/alternative (text first, HTML last: clients show the last part they
understand), with its own Message-ID on the shop's domain and a Date.
"""

from __future__ import annotations

import csv
import io
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from .store import Order

TEMPLATES = Path(__file__).parent / "templates"
SHOP = "Demo Shop"


class VerbatimHeader(str):
    """A header emitted as given, folded only between its comma-separated items.

    The email package RFC 2047-encodes any word longer than a line (a long unsubscribe URL), and
    aiosmtplib flattens with its own policy, so a policy setting cannot prevent it. An encoded
    List-Unsubscribe is not a URL any more (RFC 2369): mailbox providers would drop the button.
    Any object with `name` and `fold(policy=)` is taken as a ready-made header by the email package.
    """

    name: str

    def __new__(cls, name: str, value: str) -> "VerbatimHeader":
        self = super().__new__(cls, value)
        self.name = name
        return self

    def fold(self, *, policy) -> str:
        items = [item.strip() for item in self.split(",")]
        return f"{self.name}: " + f",{policy.linesep} ".join(items) + policy.linesep


def make_env() -> jinja2.Environment:
    # Autoescape HTML only: text parts must not show &amp; to the reader.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, not as an empty string
        keep_trailing_newline=True,
    )


class Composer:
    def __init__(self, env: jinja2.Environment, sender: Address, public_url: str) -> None:
        self.env, self.sender, self.public_url = env, sender, public_url

    @property
    def domain(self) -> str:
        return self.sender.domain

    def _message(self, to: str, subject: str, template: str, name: str | None = None, **ctx) -> EmailMessage:
        ctx = {"shop": SHOP, "public_url": self.public_url, "name": name, **ctx}
        msg = EmailMessage()
        msg["From"] = self.sender
        local, domain = to.rsplit("@", 1)
        msg["To"] = Address(display_name=name or "", username=local, domain=domain)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(timezone.utc))
        msg["Message-ID"] = make_msgid(domain=self.domain)
        msg.set_content(self.env.get_template(f"email/{template}.txt").render(ctx))
        msg.add_alternative(self.env.get_template(f"email/{template}.html").render(ctx), subtype="html")
        return msg

    def confirmation(self, to: str, name: str | None, token: str) -> EmailMessage:
        link = f"{self.public_url}/confirm?token={token}"  # token_urlsafe needs no quoting
        return self._message(to, f"Confirm your {SHOP} account", "confirm", name, link=link)

    def reset_code(self, to: str, name: str | None, code: str, minutes: int) -> EmailMessage:
        return self._message(to, f"Your {SHOP} password reset code", "reset", name, code=code, minutes=minutes)

    def receipt(self, to: str, name: str | None, order: Order) -> EmailMessage:
        msg = self._message(to, f"Your {SHOP} receipt {order.order_id}", "receipt", name, order=order)
        # The attachment goes next to the alternatives: multipart/mixed[alternative[text, html], csv].
        msg.add_attachment(receipt_csv(order), subtype="csv", filename=f"receipt-{order.order_id}.csv")
        return msg

    def newsletter(self, to: str, list_id: str, token: str, subject: str, body: str) -> EmailMessage:
        unsubscribe_url = f"{self.public_url}/unsubscribe?token={token}"
        msg = self._message(to, subject, "newsletter", None, body=body, list_id=list_id,
                            unsubscribe_url=unsubscribe_url)
        # RFC 2369 + RFC 8058 one-click: mailbox providers show an unsubscribe button and POST to it.
        msg["List-Unsubscribe"] = VerbatimHeader(
            "List-Unsubscribe", f"<{unsubscribe_url}>, <mailto:unsubscribe@{self.domain}?subject={token}>")
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["List-Id"] = f"{SHOP} {list_id} <{list_id}.lists.{self.domain}>"
        msg["Precedence"] = "bulk"
        return msg


def receipt_csv(order: Order) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)  # CRLF line ends, as RFC 4180 says
    writer.writerow(["sku", "name", "qty", "unit_price", "line_total"])
    for line in order.lines:
        writer.writerow([line.sku, line.name, line.qty, f"{line.unit_price:.2f}", f"{line.total:.2f}"])
    return buf.getvalue()
