"""HTTP routes of the Demo Shop (JSON in and out, HTML for the pages people open from emails)."""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from dataclasses import asdict
from decimal import Decimal, InvalidOperation
from functools import partial

from aiohttp import web

from . import addresses, webhooks
from .config import Config
from .emails import Composer, make_env
from .mailer import Mailer
from .metrics import Metrics
from .revalidation import Revalidator
from .store import RESET_TTL, AlreadyExists, OrderLine, Store, hash_password
from .validation import ValidationClient, ValidationUnavailable

log = logging.getLogger("demo_app.web")

LIST_ID = r"{list_id:[A-Za-z0-9][A-Za-z0-9_-]{0,63}}"  # also lands in the List-Id header: keep it tame
MIN_PASSWORD = 8


class Shop:
    """Everything a handler needs, built once per app."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.store = Store()
        self.env = make_env()
        self.composer = Composer(self.env, cfg.from_address, cfg.public_url or "")
        self.mailer = Mailer(cfg, self.metrics, suppressed=self.store.suppressed)
        self.validation = ValidationClient(cfg.validation_url, cfg.validation_key, self.metrics,
                                           cfg.validation_concurrency, cfg.validation_budget,
                                           cfg.validation_breaker_failures, cfg.validation_cooldown)
        self.revalidator = Revalidator(self.validation, self.store, self.metrics)

    def set_listen_url(self, url: str) -> None:
        """Links in emails use the public URL, by default the one we really listen on."""
        if not self.cfg.public_url:
            self.composer.public_url = url


SHOP = web.AppKey("shop", Shop)


# --- helpers -------------------------------------------------------------------------------------

def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def page(request: web.Request, template: str, title: str, status: int = 200, **ctx) -> web.Response:
    html = request.app[SHOP].env.get_template(f"pages/{template}.html").render(shop="Demo Shop", title=title, **ctx)
    return web.Response(text=html, status=status, content_type="text/html")


class BadRequest(Exception):
    pass


async def json_body(request: web.Request) -> dict:
    # Decimal for JSON numbers: 0.1 + 0.2 must stay 0.3 in a receipt.
    try:
        body = await request.json(loads=partial(json.loads, parse_float=Decimal))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def text_field(body: dict, key: str, *, required: bool = True, max_len: int = 200, multiline: bool = False) -> str | None:
    value = body.get(key)
    if not required and value in (None, ""):
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{key} is required")
    if len(value) > max_len:
        raise BadRequest(f"{key} is too long")
    allowed = "\r\n\t" if multiline else ""
    if any(unicodedata.category(c).startswith("C") and c not in allowed for c in value):
        raise BadRequest(f"{key} contains control characters")  # also blocks header injection
    return value


@web.middleware
async def bad_request_mw(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return error(400, str(exc))


# --- health, metrics, outbox ----------------------------------------------------------------------

async def home(request: web.Request) -> web.Response:
    # Every email's footer links here: a link in an email must lead somewhere.
    return page(request, "message", "Demo Shop", message="Welcome to the Demo Shop.")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    return web.json_response(shop.metrics.snapshot(outbox_depth=shop.mailer.depth,
                                                   validation_pending=shop.revalidator.pending))


async def bounces(request: web.Request) -> web.Response:
    return web.json_response([asdict(b) for b in request.app[SHOP].mailer.bounces])


async def outbox_wait_idle(request: web.Request) -> web.Response:
    """Long-poll until every accepted email is sent or bounced (an ops/test aid: no sleeping clients)."""
    shop = request.app[SHOP]
    idle = await shop.mailer.wait_idle(_timeout(request))
    return web.json_response({"idle": idle, "outbox_depth": shop.mailer.depth})


def _timeout(request: web.Request) -> float:
    try:
        return min(max(float(request.query.get("timeout", "5")), 0.0), 30.0)
    except ValueError:
        raise BadRequest("timeout must be a number of seconds") from None


async def validation_wait_settled(request: web.Request) -> web.Response:
    """Long-poll until no signup accepted during a validation outage still awaits its verdict."""
    shop = request.app[SHOP]
    settled = await shop.revalidator.wait_settled(_timeout(request))
    return web.json_response({"settled": settled, "pending": shop.revalidator.pending})


# --- signup and confirmation ----------------------------------------------------------------------

async def on_validation_unavailable(shop: Shop, email: str, name: str | None, exc: ValidationUnavailable) -> web.Response:
    """The degradation policy when the validation API gives no verdict: accept, confirm, check later.

    The signup is accepted as "pending validation" (202, ``"validation": "pending"``), the
    confirmation email goes out at once, and the address is looked up in the background once the
    API answers again (``revalidation.Revalidator``).

    Why not refuse with a 503: the validation API is a third-party quality filter (typos, dead
    domains, disposable addresses), not the source of truth about an address. The confirmation
    email is: an address whose owner clicks the link is proven, whatever any API says. Refusing
    signups while a provider is down (and launches are exactly when providers throttle and fail)
    turns their outage into ours and loses people who will not come back to retry. What accepting
    costs is bounded: an unconfirmed account, and perhaps one bounce for a mistyped address, which
    the mailer records at /bounces and the re-validation flags. The waiting is bounded too: a
    signup waits at most ``--validation-budget`` seconds for a verdict, and once the circuit
    breaker has seen the API down it waits not at all, so the confirmation still meets its SLO.

    A product with a strict gate (e.g. paid trials abused with throwaway addresses) would return
    503 here instead; this is the one place to change that.
    """
    try:
        token = shop.store.add_user(email, name, validation="pending")
    except AlreadyExists:
        return error(409, "already registered")
    shop.metrics.validation_degraded += 1
    log.warning("signup accepted without validation email=%s why=%s", email, exc)
    shop.revalidator.add(email)
    shop.mailer.enqueue(shop.composer.confirmation(email, name, token), email)
    return web.json_response({"status": "pending_confirmation", "validation": "pending"}, status=202)


async def signup(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    try:
        email = addresses.parse(body.get("email"))
    except addresses.InvalidAddress as exc:
        return error(400, f"invalid email address: {exc}")
    name = text_field(body, "name", required=False, max_len=100)
    if email in shop.store.users:  # cheap check first: saves a paid validation call
        return error(409, "already registered")
    try:
        verdict = await shop.validation.verify(email)
    except ValidationUnavailable as exc:
        return await on_validation_unavailable(shop, email, name, exc)
    if verdict.undeliverable:
        return error(422, f"email address rejected by validation: {verdict.reason}")
    try:
        token = shop.store.add_user(email, name, validation=verdict.result)  # re-checked: another signup may have won
    except AlreadyExists:
        return error(409, "already registered")
    shop.mailer.enqueue(shop.composer.confirmation(email, name, token), email)
    return web.json_response({"status": "pending_confirmation"}, status=202)


async def confirm(request: web.Request) -> web.Response:
    status, user = request.app[SHOP].store.confirm(request.query.get("token", ""))
    if user is None:
        return page(request, "message", "Invalid link", 404,
                    message="This confirmation link is invalid or has expired.")
    title = "Account already confirmed" if status == "already" else "Your account is confirmed"
    return page(request, "confirmed", title, already=status == "already", email=user.email)


async def get_user(request: web.Request) -> web.Response:
    store = request.app[SHOP].store
    try:
        user = store.users.get(addresses.parse(request.match_info["email"]))
    except addresses.InvalidAddress:
        user = None
    if user is None:
        return error(404, "no such user")
    answer = {"email": user.email, "name": user.name, "confirmed": user.confirmed, "validation": user.validation}
    if user.email in store.suppressed:  # a provider reported it bounced or complained about
        answer["suppressed"] = store.suppressed[user.email]
    return web.json_response(answer)


# --- password reset -------------------------------------------------------------------------------

async def password_reset(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    try:
        user = shop.store.users.get(addresses.parse(body.get("email")))
    except addresses.InvalidAddress:
        user = None
    if user is not None:
        code = shop.store.new_reset_code(user.email)
        shop.mailer.enqueue(shop.composer.reset_code(user.email, user.name, code, int(RESET_TTL // 60)), user.email)
    # Same answer either way: the response must not tell who has an account.
    return web.json_response({"status": "sent_if_registered"}, status=202)


async def password_reset_confirm(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    password = body.get("new_password")
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        # Checked before the code, so a too-short password does not burn the code.
        return error(400, f"new_password must be at least {MIN_PASSWORD} characters")
    code = body.get("code")
    try:
        email = addresses.parse(body.get("email"))
    except addresses.InvalidAddress:
        email = None
    if email is None or not isinstance(code, str) or not shop.store.use_reset_code(email, code):
        return error(400, "invalid or already used code")
    user = shop.store.users[email]
    shop.store.set_password_hash(email, await asyncio.to_thread(hash_password, password, user.salt))
    return web.json_response({"status": "password_changed"})


# --- orders ---------------------------------------------------------------------------------------

def parse_line(i: int, raw: object) -> OrderLine:
    if not isinstance(raw, dict):
        raise BadRequest(f"lines[{i}] must be an object")
    sku = text_field(raw, "sku", max_len=64)
    name = text_field(raw, "name")
    qty = raw.get("qty")
    if type(qty) is not int or qty <= 0:  # type() check: bool is an int subclass
        raise BadRequest(f"lines[{i}].qty must be a positive integer")
    price = raw.get("unit_price")
    try:
        if isinstance(price, bool) or not isinstance(price, (str, int, Decimal)):
            raise InvalidOperation
        price = Decimal(price)
    except InvalidOperation:
        raise BadRequest(f"lines[{i}].unit_price must be a decimal amount") from None
    if not price.is_finite() or price < 0 or price.as_tuple().exponent < -2:
        raise BadRequest(f"lines[{i}].unit_price must be a non-negative amount with at most 2 decimals")
    return OrderLine(sku, name, qty, price.quantize(Decimal("0.01")))


async def create_order(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    try:
        email = addresses.parse(body.get("email"))
    except addresses.InvalidAddress as exc:
        return error(400, f"invalid email address: {exc}")
    raw_lines = body.get("lines")
    if not isinstance(raw_lines, list) or not raw_lines:
        return error(400, "lines must be a non-empty list")
    if len(raw_lines) > 100:
        return error(400, "too many lines")
    order = shop.store.add_order(email, [parse_line(i, raw) for i, raw in enumerate(raw_lines)])
    user = shop.store.users.get(email)
    shop.mailer.enqueue(shop.composer.receipt(email, user.name if user else None, order), email)
    return web.json_response({"order_id": order.order_id, "total": f"{order.total:.2f}"}, status=201)


# --- newsletters and unsubscribe ------------------------------------------------------------------

async def subscribe(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    try:
        email = addresses.parse(body.get("email"))
    except addresses.InvalidAddress as exc:
        return error(400, f"invalid email address: {exc}")
    if shop.store.subscribe(request.match_info["list_id"], email):
        return web.json_response({"status": "subscribed"}, status=201)
    return web.json_response({"status": "already_subscribed"}, status=200)


async def list_subscribers(request: web.Request) -> web.Response:
    return web.json_response(sorted(request.app[SHOP].store.subscribers(request.match_info["list_id"])))


async def send_newsletter(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    body = await json_body(request)
    subject = text_field(body, "subject")
    text = text_field(body, "body", max_len=100_000, multiline=True)
    list_id = request.match_info["list_id"]
    subs = shop.store.subscribers(list_id)
    for email, token in subs.items():
        shop.mailer.enqueue(shop.composer.newsletter(email, list_id, token, subject, text), email)
    return web.json_response({"queued": len(subs)}, status=202)


async def unsubscribe_form(request: web.Request) -> web.Response:
    # GET never unsubscribes: link scanners and prefetchers follow GET links (RFC 8058).
    token = request.query.get("token", "")
    entry = request.app[SHOP].store.lookup_unsubscribe(token)
    if entry is None:
        return page(request, "message", "Invalid link", 404, message="This unsubscribe link is invalid.")
    list_id, email = entry
    return page(request, "unsubscribe", "Unsubscribe", list_id=list_id, email=email,
                action=str(request.rel_url))


async def unsubscribe(request: web.Request) -> web.Response:
    form = await request.post()
    if form.get("List-Unsubscribe") != "One-Click":
        return page(request, "message", "Bad request", 400, message="Missing List-Unsubscribe=One-Click.")
    result = request.app[SHOP].store.unsubscribe(request.query.get("token", ""))
    if result == "invalid":
        return page(request, "message", "Invalid link", 404, message="This unsubscribe link is invalid.")
    message = "You were already unsubscribed." if result == "already" else "You have been unsubscribed."
    return page(request, "message", "Unsubscribed", message=message)


# --- the application ------------------------------------------------------------------------------

def create_app(cfg: Config) -> web.Application:
    app = web.Application(middlewares=[bad_request_mw])
    shop = app[SHOP] = Shop(cfg)

    async def startup(app: web.Application) -> None:
        await shop.validation.start()
        shop.mailer.start()
        shop.revalidator.start()

    async def cleanup(app: web.Application) -> None:
        # Runs after the listener is closed and in-flight requests are done: drain, then close.
        await shop.revalidator.stop()
        await shop.mailer.stop(drain=2.0)
        await shop.validation.close()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    r = app.router
    r.add_get("/", home)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/bounces", bounces)
    r.add_get("/outbox/wait-idle", outbox_wait_idle)
    r.add_get("/validation/wait-settled", validation_wait_settled)
    r.add_post("/signup", signup)
    r.add_get("/confirm", confirm)
    r.add_get("/users/{email}", get_user)
    r.add_post("/password-reset", password_reset)
    r.add_post("/password-reset/confirm", password_reset_confirm)
    r.add_post("/orders", create_order)
    r.add_post(f"/newsletter/{LIST_ID}/subscribers", subscribe)
    r.add_get(f"/newsletter/{LIST_ID}/subscribers", list_subscribers)
    r.add_post(f"/newsletter/{LIST_ID}/send", send_newsletter)
    r.add_get("/unsubscribe", unsubscribe_form)
    r.add_post("/unsubscribe", unsubscribe)
    webhooks.add_routes(r)
    return app
