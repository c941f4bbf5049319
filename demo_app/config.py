"""Settings from command-line flags, each with an environment-variable fallback."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import parseaddr


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 0
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_timeout: float = 10.0  # also the HTTP timeout of a provider's API
    # smtp, or a provider's HTTP API through its official client: sendgrid | mailgun | ses | postmark.
    transport: str = "smtp"
    provider_url: str | None = None  # the API's base URL (None: the provider's public one)
    provider_key: str | None = None  # API key / server token / AWS access key id
    provider_secret: str | None = None  # AWS secret access key (ses)
    provider_region: str = "us-east-1"  # ses
    mailgun_domain: str | None = None  # the sending domain (None: --mail-from's)
    # What a provider's event webhooks are checked with: SendGrid's verification key (base64),
    # Mailgun's webhook signing key, Postmark's "user:password"; SES's SNS certificate must come
    # from under --provider-url (a real deployment checks it comes from sns.<region>.amazonaws.com).
    webhook_key: str | None = None
    # Transient SMTP failures (4xx, timeouts, disconnects) are retried until a message is this old,
    # then given up as a bounce. Real MTAs keep trying for days; a product's own outbox, minutes.
    retry_for: float = 600.0
    validation_url: str = "http://127.0.0.1:8081"
    validation_key: str | None = None
    validation_concurrency: int = 8
    # Seconds a signup waits for a verdict, retries included, before the degradation policy applies.
    # It is part of the confirmation email's latency: keep it well under the 5 s delivery SLO.
    validation_budget: float = 3.0
    validation_breaker_failures: int = 5  # failed attempts in a row that open the circuit
    validation_cooldown: float = 1.0  # seconds the open circuit fails lookups at once
    public_url: str | None = None  # None: the URL we actually listen on
    workers: int = 4
    mail_from: str = "Demo Shop <no-reply@demo-shop.test>"
    log_level: str = "INFO"
    access_log: bool = False
    # DKIM signing of every email (demo_app/dkim.py): a PEM private key file and its selector;
    # the public key is published as <selector>._domainkey.<mail domain>.
    dkim_key: str | None = None
    dkim_selector: str | None = None

    @property
    def from_address(self) -> Address:
        name, addr = parseaddr(self.mail_from)
        return Address(display_name=name, addr_spec=addr)

    @property
    def mail_domain(self) -> str:
        """Domain for Message-IDs and the mailto: unsubscribe address."""
        return self.from_address.domain


# The providers' own endpoints, when --provider-url is not given.
PUBLIC_APIS = {"sendgrid": "https://api.sendgrid.com", "mailgun": "https://api.mailgun.net",
               "ses": "https://email.{region}.amazonaws.com", "postmark": "https://api.postmarkapp.com"}

# flag name -> (env var, type)
_FLAGS = {
    "host": ("DEMO_HOST", str),
    "port": ("DEMO_PORT", int),
    "smtp_host": ("DEMO_SMTP_HOST", str),
    "smtp_port": ("DEMO_SMTP_PORT", int),
    "smtp_user": ("DEMO_SMTP_USER", str),
    "smtp_password": ("DEMO_SMTP_PASSWORD", str),
    "smtp_timeout": ("DEMO_SMTP_TIMEOUT", float),
    "transport": ("DEMO_TRANSPORT", str),
    "provider_url": ("DEMO_PROVIDER_URL", str),
    "provider_key": ("DEMO_PROVIDER_KEY", str),
    "provider_secret": ("DEMO_PROVIDER_SECRET", str),
    "provider_region": ("DEMO_PROVIDER_REGION", str),
    "mailgun_domain": ("DEMO_MAILGUN_DOMAIN", str),
    "webhook_key": ("DEMO_WEBHOOK_KEY", str),
    "retry_for": ("DEMO_RETRY_FOR", float),
    "validation_url": ("DEMO_VALIDATION_URL", str),
    "validation_key": ("DEMO_VALIDATION_KEY", str),
    "validation_concurrency": ("DEMO_VALIDATION_CONCURRENCY", int),
    "validation_budget": ("DEMO_VALIDATION_BUDGET", float),
    "validation_breaker_failures": ("DEMO_VALIDATION_BREAKER_FAILURES", int),
    "validation_cooldown": ("DEMO_VALIDATION_COOLDOWN", float),
    "public_url": ("DEMO_PUBLIC_URL", str),
    "workers": ("DEMO_WORKERS", int),
    "mail_from": ("DEMO_FROM", str),
    "log_level": ("DEMO_LOG_LEVEL", str),
    "dkim_key": ("DEMO_DKIM_KEY", str),
    "dkim_selector": ("DEMO_DKIM_SELECTOR", str),
}
_BOOLS = {"smtp_starttls": "DEMO_SMTP_STARTTLS", "access_log": "DEMO_ACCESS_LOG"}


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over the defaults."""
    env = os.environ if environ is None else environ
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m demo_app", description="Demo Shop, the app under test")
    for name, (var, typ) in _FLAGS.items():
        default = typ(env[var]) if var in env else getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=default, help=f"env {var}")
    for name, var in _BOOLS.items():
        default = _truthy(env[var]) if var in env else getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                       default=default, help=f"env {var}")
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.workers < 1 or cfg.validation_concurrency < 1 or cfg.validation_breaker_failures < 1:
        p.error("--workers, --validation-concurrency and --validation-breaker-failures must be at least 1")
    if cfg.retry_for < 0 or cfg.validation_budget <= 0 or cfg.validation_cooldown < 0:
        p.error("--retry-for and --validation-cooldown must be >= 0, --validation-budget > 0")
    from .transports import TRANSPORTS

    if cfg.transport not in TRANSPORTS:
        p.error(f"--transport must be one of {', '.join(TRANSPORTS)}, not {cfg.transport!r}")
    if cfg.transport != "smtp" and not cfg.provider_key:
        p.error(f"--transport {cfg.transport} needs --provider-key (env DEMO_PROVIDER_KEY)")
    if cfg.transport == "ses" and not cfg.provider_secret:
        p.error("--transport ses needs --provider-secret (the AWS secret access key, env DEMO_PROVIDER_SECRET)")
    if cfg.transport != "smtp" and not cfg.provider_url:
        cfg.provider_url = PUBLIC_APIS[cfg.transport].format(region=cfg.provider_region)
    if not cfg.from_address.domain:
        p.error(f"--mail-from has no usable address: {cfg.mail_from!r}")
    if bool(cfg.dkim_key) != bool(cfg.dkim_selector):
        p.error("--dkim-key and --dkim-selector go together (the key file and its DNS selector)")
    if cfg.dkim_key and not os.path.isfile(cfg.dkim_key):
        p.error(f"--dkim-key {cfg.dkim_key!r}: no such file (a PEM private key)")
    if cfg.public_url:
        cfg.public_url = cfg.public_url.rstrip("/")
    cfg.validation_url = cfg.validation_url.rstrip("/")
    return cfg
