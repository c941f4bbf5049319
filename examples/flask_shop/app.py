"""Flask Shop: a small Flask application that sends its mail with Flask-Mail.

It stands for someone else's product under test: it knows nothing of mailproof, and the harness
reaches it only over HTTP and SMTP. What it does, the way a Flask team usually does it:

* ``POST /signup`` (form or JSON: email, name, optional password) sends a confirmation email at
  once, inside the request, with a link signed by itsdangerous; ``GET /confirm/<token>`` confirms
  the account and queues a welcome email.
* ``POST /password/forgot`` queues an email with a 6-digit code and a link to the reset form;
  an unknown address gets the same 200 answer and no email (no account enumeration, and since
  the mail is sent in the background the answer takes as long either way).
  ``POST /password/reset`` (email, code, password) accepts a code once.
* ``POST /orders`` answers 202 and queues the receipt: HTML and text, a PDF invoice and a CSV
  of the order lines, rendered and sent by the background worker.
* Queued mail is sent by one worker thread fed by a queue, and only once the response that
  caused it has been sent (what Celery or RQ do for a real shop). ``GET /outbox/wait-idle``
  answers when nothing is queued or being sent, so a test can tell "nothing was sent" from
  "not sent yet".

Configuration comes from the environment: ``MAILPROOF_SMTP_HOST`` and ``MAILPROOF_SMTP_PORT``
(the relay; default localhost:1025), ``HOST`` (default 127.0.0.1) and ``PORT`` (default 5000),
``SECRET_KEY`` (default: random per process). Start it with

    python examples/flask_shop/app.py
    flask --app examples/flask_shop/app run --port 5000

It logs to stdout, including Werkzeug's ``* Running on http://127.0.0.1:5000`` line.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import itertools
import logging
import os
import queue
import re
import secrets
import smtplib
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from email.utils import make_msgid
from typing import Any, Callable, Optional

from flask import Flask, after_this_request, current_app, jsonify, render_template, request, url_for
from flask_mail import Mail, Message
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from werkzeug.security import check_password_hash, generate_password_hash

SHOP_NAME = "Flask Shop"
SENDER = (SHOP_NAME, "no-reply@flask-shop.test")
MAIL_DOMAIN = "flask-shop.test"
CONFIRM_MAX_AGE = 24 * 3600  # seconds a confirmation link stays valid
RESET_MAX_AGE = 15 * 60  # seconds a reset code and its link stay valid
RESET_MAX_ATTEMPTS = 5  # wrong codes before a reset code is void
SEND_ATTEMPTS = 3  # the worker retries a transient SMTP failure
FORGOT_ANSWER = "If an account exists for that address, we have sent a password reset code."
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
CENT = Decimal("0.01")

mail = Mail()
log = logging.getLogger("flask_shop")


# -- data ----------------------------------------------------------------------------------------


@dataclass
class User:
    email: str
    name: str
    password_hash: Optional[str] = None
    confirmed: bool = False


@dataclass
class ResetCode:
    code_hash: str
    expires_at: float
    attempts: int = 0
    used: bool = False


@dataclass
class OrderLine:
    sku: str
    name: str
    quantity: int
    unit_price: Decimal

    @property
    def total(self) -> Decimal:
        return (self.unit_price * self.quantity).quantize(CENT)


@dataclass
class Order:
    id: str
    email: str
    name: str
    lines: list[OrderLine]
    created_at: float = field(default_factory=time.time)

    @property
    def total(self) -> Decimal:
        return sum((line.total for line in self.lines), Decimal("0.00"))

    def as_json(self) -> dict:
        return {"order_id": self.id, "email": self.email, "name": self.name, "total": str(self.total),
                "currency": "EUR",
                "items": [{"sku": l.sku, "name": l.name, "quantity": l.quantity,
                           "unit_price": str(l.unit_price), "line_total": str(l.total)} for l in self.lines]}


class Store:
    """In-memory accounts, reset codes and orders (a database in a real shop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users: dict[str, User] = {}
        self.reset_codes: dict[str, ResetCode] = {}
        self.orders: dict[str, Order] = {}
        self._order_numbers = itertools.count(1)

    def next_order_id(self) -> str:
        return f"FS-{next(self._order_numbers):05d}"


# -- the outbox: mail sent after the response ----------------------------------------------------


class Outbox:
    """A queue and one worker thread sending mail in the background.

    ``defer(job, *args)`` counts the job as pending at once and queues it when the response has
    been sent (``call_on_close``), so the mail never goes out before the answer, and
    ``wait_idle`` never reports idle while a request's mail is still to come.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.jobs: "queue.Queue[tuple[Callable[..., Any], tuple]]" = queue.Queue()
        self.sent = 0
        self.failed = 0
        self._pending = 0
        self._idle = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="outbox-worker", daemon=True)
        self._worker.start()

    def defer(self, job: Callable[..., Any], *args: Any) -> None:
        with self._idle:
            self._pending += 1

        @after_this_request
        def queue_when_sent(response):
            response.call_on_close(lambda: self.jobs.put((job, args)))
            return response

    def _work(self) -> None:
        while True:
            job, args = self.jobs.get()
            try:
                with self.app.app_context():
                    self._run(job, args)
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _run(self, job: Callable[..., Any], args: tuple) -> None:
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                job(*args)
            except (smtplib.SMTPException, OSError) as exc:
                permanent = isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code >= 500
                if permanent or attempt == SEND_ATTEMPTS:
                    self.failed += 1
                    log.error("outbox: %s failed for good after %d attempt(s): %s", job.__name__, attempt, exc)
                    return
                log.warning("outbox: %s failed (attempt %d), retrying: %s", job.__name__, attempt, exc)
                time.sleep(0.2 * 2 ** (attempt - 1))
            except Exception:
                self.failed += 1
                log.exception("outbox: %s crashed", job.__name__)
                return
            else:
                self.sent += 1
                return

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending


# -- emails --------------------------------------------------------------------------------------


def first_name(name: str) -> str:
    return name.split()[0] if name.strip() else "there"


def new_message(subject: str, to: str, template: str, **context: Any) -> Message:
    """A multipart/alternative message from ``emails/<template>.txt`` and ``.html``."""
    context.setdefault("shop_name", SHOP_NAME)
    msg = Message(subject=subject, recipients=[to],
                  body=render_template(f"emails/{template}.txt", **context),
                  html=render_template(f"emails/{template}.html", **context))
    msg.msgId = make_msgid(domain=MAIL_DOMAIN)
    return msg


def send_confirmation(user: User, link: str) -> None:
    mail.send(new_message(f"Confirm your {SHOP_NAME} account", user.email, "confirm",
                          first_name=first_name(user.name), link=link, hours=CONFIRM_MAX_AGE // 3600))


def send_welcome(email: str, name: str, shop_url: str) -> None:
    mail.send(new_message(f"Welcome to {SHOP_NAME}, {first_name(name)}", email, "welcome",
                          first_name=first_name(name), shop_url=shop_url))


def send_reset_code(email: str, name: str, code: str, link: str) -> None:
    mail.send(new_message(f"Your {SHOP_NAME} password reset code", email, "reset_code",
                          first_name=first_name(name), code=code, link=link,
                          minutes=RESET_MAX_AGE // 60))


def send_receipt(order: Order, order_url: str) -> None:
    msg = new_message(f"Your {SHOP_NAME} receipt for order {order.id}", order.email, "receipt",
                      first_name=first_name(order.name), order=order, order_url=order_url)
    msg.attach(f"receipt-{order.id}.pdf", "application/pdf", receipt_pdf(order))
    msg.attach(f"order-{order.id}.csv", "text/csv", order_csv(order).encode("utf-8"))
    mail.send(msg)


def order_csv(order: Order) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sku", "name", "quantity", "unit_price", "line_total"])
    for line in order.lines:
        writer.writerow([line.sku, line.name, line.quantity, line.unit_price, line.total])
    writer.writerow(["", "Total (EUR)", "", "", order.total])
    return out.getvalue()


def receipt_pdf(order: Order) -> bytes:
    """A one-page PDF invoice (plain PDF 1.4, Helvetica, no dependencies)."""
    lines = [f"{SHOP_NAME} - receipt for order {order.id}", f"Customer: {order.name} <{order.email}>", ""]
    lines += [f"{l.quantity} x {l.name} ({l.sku}) at EUR {l.unit_price} = EUR {l.total}" for l in order.lines]
    lines += ["", f"Total: EUR {order.total}"]

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    content = "BT /F1 11 Tf 16 TL 56 790 Td " + " ".join(f"({escape(t)}) '" for t in lines) + " ET"
    stream = content.encode("latin-1", "replace")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# -- helpers for views ---------------------------------------------------------------------------


def payload() -> dict:
    """The request's JSON object or its form fields, as a dict of strings and values."""
    if request.is_json:
        data = request.get_json(silent=True)
        return data if isinstance(data, dict) else {}
    return request.form.to_dict()


def wants_json() -> bool:
    return request.is_json or request.accept_mimetypes.best == "application/json"


def answer(status: int, message: str, page_title: str, **extra: Any):
    """JSON for API clients, a small HTML page for browsers (form posts)."""
    if wants_json():
        key = "error" if status >= 400 else "status"
        return jsonify({key: message, **extra}), status
    return render_template("page.html", title=page_title, message=message, shop_name=SHOP_NAME), status


def page(status: int, title: str, message: str):
    return render_template("page.html", title=title, message=message, shop_name=SHOP_NAME), status


def normalized_email(value: Any) -> str:
    return value.strip().lower() if isinstance(value, str) else ""


def code_digest(code: str) -> str:
    return hashlib.sha256(f"{current_app.secret_key}:{code}".encode()).hexdigest()


def shop() -> Store:
    return current_app.extensions["shop"]


def outbox() -> Outbox:
    return current_app.extensions["outbox"]


def serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key)


# -- the application -----------------------------------------------------------------------------


def configure_logging() -> None:
    """Log to stdout (twelve-factor), Werkzeug's "Running on" line included."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(config: Optional[dict] = None) -> Flask:
    configure_logging()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_hex(32),
        MAIL_SERVER=os.environ.get("MAILPROOF_SMTP_HOST", "localhost"),
        MAIL_PORT=int(os.environ.get("MAILPROOF_SMTP_PORT", "1025")),
        MAIL_USE_TLS=False,
        MAIL_USE_SSL=False,
        MAIL_DEFAULT_SENDER=SENDER,
    )
    app.config.update(config or {})
    mail.init_app(app)
    app.extensions["shop"] = Store()
    app.extensions["outbox"] = Outbox(app)
    register_routes(app)
    log.info("sending mail through %s:%s", app.config["MAIL_SERVER"], app.config["MAIL_PORT"])
    return app


def register_routes(app: Flask) -> None:
    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.get("/outbox/wait-idle")
    def outbox_wait_idle():
        """Answers once no mail is queued or being sent (or after ``timeout`` seconds, at most 30)."""
        try:
            timeout = min(max(float(request.args.get("timeout", "5")), 0.0), 30.0)
        except ValueError:
            return jsonify({"error": "timeout must be a number of seconds"}), 400
        idle = outbox().wait_idle(timeout)
        return jsonify({"idle": idle, "pending": outbox().pending, "sent": outbox().sent,
                        "failed": outbox().failed})

    # -- accounts ----------------------------------------------------------------------------

    @app.post("/signup")
    def signup():
        data = payload()
        email = normalized_email(data.get("email"))
        name = str(data.get("name") or "").strip()
        password = str(data.get("password") or "")
        if not EMAIL_RE.match(email):
            return answer(400, "a valid email address is required", "Sign up")
        if password and len(password) < 8:
            return answer(400, "the password needs at least 8 characters", "Sign up")
        user = User(email=email, name=name or email.split("@")[0],
                    password_hash=generate_password_hash(password) if password else None)
        with shop().lock:
            if email in shop().users:
                return answer(409, "an account with this address already exists", "Sign up")
            shop().users[email] = user
        token = serializer().dumps(email, salt="email-confirm")
        try:
            send_confirmation(user, url_for("confirm", token=token, _external=True))
        except (smtplib.SMTPException, OSError) as exc:
            log.error("signup: the confirmation to %s could not be sent: %s", email, exc)
            with shop().lock:
                shop().users.pop(email, None)
            return answer(503, "we could not send the confirmation email, please try again", "Sign up")
        return answer(201, "confirmation sent: check your inbox", "Check your inbox", email=email)

    @app.get("/confirm/<token>")
    def confirm(token: str):
        try:
            email = serializer().loads(token, salt="email-confirm", max_age=CONFIRM_MAX_AGE)
        except SignatureExpired:
            return page(410, "Link expired", "This confirmation link has expired. Sign up again to get a new one.")
        except BadSignature:
            return page(404, "Invalid link", "This confirmation link is not valid.")
        with shop().lock:
            user = shop().users.get(email)
            if user is None:
                return page(404, "Invalid link", "This confirmation link is not valid.")
            already = user.confirmed
            user.confirmed = True
        if already:
            return page(200, "Already confirmed", "Your account is already confirmed.")
        outbox().defer(send_welcome, user.email, user.name, request.host_url)
        return page(200, "Account confirmed", f"Thanks, {first_name(user.name)}: your account is confirmed.")

    @app.post("/login")
    def login():
        data = payload()
        email = normalized_email(data.get("email"))
        with shop().lock:
            user = shop().users.get(email)
        if user is None or not user.password_hash or not check_password_hash(user.password_hash, str(data.get("password") or "")):
            return jsonify({"error": "wrong email address or password"}), 401
        if not user.confirmed:
            return jsonify({"error": "confirm your email address first"}), 403
        return jsonify({"status": "logged in", "email": user.email, "name": user.name})

    @app.post("/password/forgot")
    def password_forgot():
        email = normalized_email(payload().get("email"))
        with shop().lock:
            user = shop().users.get(email)
            if user is not None:
                code = f"{secrets.randbelow(10 ** 6):06d}"
                shop().reset_codes[email] = ResetCode(code_digest(code), time.time() + RESET_MAX_AGE)
        if user is not None:
            token = serializer().dumps(email, salt="password-reset")
            outbox().defer(send_reset_code, user.email, user.name, code,
                           url_for("password_reset_form", token=token, _external=True))
        return answer(200, FORGOT_ANSWER, "Check your inbox")

    @app.get("/password/reset/<token>")
    def password_reset_form(token: str):
        try:
            email = serializer().loads(token, salt="password-reset", max_age=RESET_MAX_AGE)
        except BadSignature:  # SignatureExpired included
            return page(404, "Invalid link", "This password reset link is not valid or has expired.")
        return render_template("reset_form.html", email=email, shop_name=SHOP_NAME,
                               action=url_for("password_reset")), 200

    @app.post("/password/reset")
    def password_reset():
        data = payload()
        email = normalized_email(data.get("email"))
        code = str(data.get("code") or "").strip()
        password = str(data.get("password") or "")
        if len(password) < 8:
            return answer(400, "the new password needs at least 8 characters", "Reset your password")
        with shop().lock:
            record = shop().reset_codes.get(email)
            user = shop().users.get(email)
            if record is None or user is None:
                return answer(400, "invalid code", "Reset your password")
            if record.used:
                return answer(400, "this code has already been used", "Reset your password")
            if time.time() > record.expires_at or record.attempts >= RESET_MAX_ATTEMPTS:
                return answer(400, "this code has expired: ask for a new one", "Reset your password")
            if not hmac.compare_digest(record.code_hash, code_digest(code)):
                record.attempts += 1
                return answer(400, "invalid code", "Reset your password")
            record.used = True
            user.password_hash = generate_password_hash(password)
            user.confirmed = True  # the code proves the address, as a confirmation link would
        return answer(200, "your password has been changed", "Password changed")

    # -- orders ------------------------------------------------------------------------------

    @app.post("/orders")
    def place_order():
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return jsonify({"error": "send the order as a JSON object"}), 400
        email = normalized_email(data.get("email"))
        if not EMAIL_RE.match(email):
            return jsonify({"error": "a valid email address is required"}), 400
        items = data.get("items")
        if not isinstance(items, list) or not items:
            return jsonify({"error": "an order needs at least one item"}), 400
        lines = []
        for index, item in enumerate(items):
            try:
                quantity = int(item["quantity"])
                unit_price = Decimal(str(item["unit_price"])).quantize(CENT)
                sku, name = str(item["sku"]), str(item["name"])
            except (KeyError, TypeError, ValueError, InvalidOperation):
                return jsonify({"error": f"item {index}: sku, name, quantity and unit_price are required"}), 400
            if quantity < 1 or unit_price < 0:
                return jsonify({"error": f"item {index}: quantity must be positive and the price not negative"}), 400
            lines.append(OrderLine(sku=sku, name=name, quantity=quantity, unit_price=unit_price))
        with shop().lock:
            order = Order(id=shop().next_order_id(), email=email,
                          name=str(data.get("name") or "").strip() or email.split("@")[0], lines=lines)
            shop().orders[order.id] = order
        outbox().defer(send_receipt, order, url_for("show_order", order_id=order.id, _external=True))
        return jsonify({**order.as_json(), "status": "received"}), 202

    @app.get("/orders/<order_id>")
    def show_order(order_id: str):
        with shop().lock:
            order = shop().orders.get(order_id)
        if order is None:
            return jsonify({"error": "no such order"}), 404
        return jsonify(order.as_json())


def main() -> None:
    app = create_app()
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5000"))
    app.run(host=host, port=port, debug=False, use_reloader=False, threaded=True)


if __name__ == "__main__":
    main()
