"""``python -m mailproof.capture.service``: the command line (arguments, safety checks, serving).

STARTTLS and AUTH on the SMTP side (``mailproof.capture.tls``)::

    python -m mailproof.capture.service --smtp-port 2525 --tls starttls-required --auth app:secret

``--tls starttls`` offers STARTTLS, ``starttls-required`` refuses mail before it (530). The
certificate comes from a throwaway CA made at start (trustme: ``pip install 'mailproof[tls]'``); the CA
certificate is written to a file (``--tls-ca-file PATH``, else a temporary file removed at exit)
that the READY line names at its end, ``READY http://... smtp=HOST:PORT ca=PATH``, as does
``/health`` (``tls.ca_file``). Start the application under test trusting it: ``SSL_CERT_FILE=PATH``
for Python (and Go, Ruby, PHP), ``NODE_EXTRA_CA_CERTS=PATH`` for Node. ``--tls-hostname NAME``
adds a name to the certificate when the app reaches the service by a name other than
localhost, 127.0.0.1 or this machine's.

``--auth USER:PASSWORD`` (better: the environment variable ``MAILPROOF_SINK_AUTH``, kept out of
``ps``) offers AUTH PLAIN/LOGIN and requires it: MAIL before AUTH is refused with 530, a wrong
password with 535. Each captured message records ``tls`` and ``auth_user``.

``--loop auto`` (the default) runs on uvloop when it is installed (``pip install 'mailproof[speed]'``),
which captures faster, above all with one message per connection; ``--loop asyncio`` forces the
standard loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Callable, Iterable, Optional

from mailproof.capture.service import TOKEN_ENV, ServiceError
from mailproof.capture.service.server import SinkService
from mailproof.capture.service.store import DEFAULT_MAX_MESSAGES, DEFAULT_STREAM_HOLD
from mailproof.capture.smtp_sink import SinkError
from mailproof.capture.tls import AUTH_ENV, TLS_MODES, parse_auth, trustme_available
from mailproof.errors import MailproofError
from mailproof.faults.specs import FaultError, parse_chaos_profile
from mailproof.net import LOOPBACK, is_loopback


TOKEN_USER = "mailproof"  # SMTP user of the credentials derived from the token off loopback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailproof.capture.service",
        description="mailproof sink service: SMTP capture plus an HTTP API, in one process.")
    parser.add_argument("--host", default=LOOPBACK,
                        help="address SMTP and HTTP bind (default 127.0.0.1; anything else needs --token)")
    parser.add_argument("--smtp-port", type=int, default=0, help="SMTP port (0: the OS picks one)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP API port (0: the OS picks one)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' on every endpoint (or set {TOKEN_ENV})")
    parser.add_argument("--max-messages", type=int, default=DEFAULT_MAX_MESSAGES,
                        help=f"messages retained, oldest evicted first and counted, once every named stream "
                             f"client has been sent them (default {DEFAULT_MAX_MESSAGES})")
    parser.add_argument("--stream-hold", type=float, default=DEFAULT_STREAM_HOLD,
                        help="seconds a disconnected stream client (client=ID) still holds the mail it was "
                             f"not sent yet, so its reconnect finds no gap (default {DEFAULT_STREAM_HOLD:g})")
    parser.add_argument("--smtp-timeout", type=float, default=60.0,
                        help="idle SMTP timeout: seconds without a byte from the client (default 60)")
    parser.add_argument("--data-timeout", type=float, default=600.0,
                        help="longest one DATA phase may take, 354 to the final dot, seconds (default 600)")
    parser.add_argument("--chaos", default=None, metavar="PROFILE",
                        help="fault rules to install at start, e.g. '5%%:rcpt:451,1%%:after_data:disconnect' "
                             "(see mailproof.faults.specs.parse_chaos_profile); scope 'chaos'")
    parser.add_argument("--chaos-seed", type=int, default=None, help="seed for --chaos (repeatable runs)")
    parser.add_argument("--tls", choices=TLS_MODES, default="off",
                        help="STARTTLS on the SMTP side: 'starttls' offers it, 'starttls-required' refuses "
                             "mail before it (a throwaway CA; its certificate file is named by ca= on the "
                             "READY line and in /health)")
    parser.add_argument("--tls-ca-file", default=None, metavar="PATH",
                        help="write the CA certificate here (default: a temporary file removed at exit)")
    parser.add_argument("--tls-hostname", action="append", default=[], metavar="NAME",
                        help="another name or address for the certificate (repeatable); localhost, "
                             "127.0.0.1, ::1, --host and this machine's name are always in it")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help=f"require SMTP AUTH with these credentials (or set {AUTH_ENV}); on a "
                             "non-loopback --host the default is user 'mailproof' with the token as password")
    parser.add_argument("--providers", action="store_true",
                        help="also serve the SendGrid, Mailgun, SES and Postmark send APIs (one more port, "
                             "on the READY line as providers=URL; keys from MAILPROOF_PROVIDER_KEYS, else random)")
    parser.add_argument("--providers-port", type=int, default=0, help="port of the provider APIs (0: the OS picks)")
    parser.add_argument("--provider-chaos", default=None, metavar="PROFILE",
                        help="with --providers: provider faults on a share of the requests, e.g. "
                             "'5%%:429,1%%:503,2%%:delay=0.5' (seeded by --chaos-seed)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop: uvloop when installed (pip install 'mailproof[speed]'), which "
                             "captures faster; 'asyncio' forces the standard loop; 'uvloop' requires it")
    parser.add_argument("--open-smtp", action="store_true",
                        help="on a non-loopback --host, accept SMTP without AUTH (anyone who reaches the "
                             "port can then put mail in front of the flows)")
    return parser


def parse_args(argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    args.token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.token is not None and not args.token.strip():
        parser.error(f"--token (or {TOKEN_ENV}) is only white space: no client header could ever match it; "
                     "give a real token")
    if not is_loopback(args.host) and not args.token:
        parser.error(  # exits with code 2 before anything listens
            f"refusing to listen on {args.host!r}: it is not a loopback address, and the API reads "
            f"every captured mail and changes faults. Give --token TOKEN (or set {TOKEN_ENV}); "
            "clients then send 'Authorization: Bearer TOKEN'. Or bind 127.0.0.1.")
    if args.stream_hold < 0:
        parser.error("--stream-hold must be 0 or more seconds")
    if args.max_messages < 1:
        parser.error("--max-messages must be at least 1")
    try:
        args.auth = parse_auth(args.auth or os.environ.get(AUTH_ENV) or None,
                               source=f"--auth (or {AUTH_ENV})")
    except MailproofError as exc:
        parser.error(str(exc))
    if not is_loopback(args.host) and args.auth is None and not args.open_smtp:
        # Off loopback anyone could inject mail the flows would take for the app's: require AUTH,
        # with credentials the clients already have (the token), unless told otherwise.
        args.auth = parse_auth(f"{TOKEN_USER}:{args.token}", source="the derived SMTP credentials")
    if args.tls != "off" and not trustme_available():
        parser.error(f"--tls {args.tls} needs a throwaway CA, made with trustme, which is not installed: "
                     "pip install 'mailproof[tls]' (or drop --tls)")
    if (args.tls_ca_file or args.tls_hostname) and args.tls == "off":
        parser.error("--tls-ca-file and --tls-hostname need --tls starttls or --tls starttls-required")
    args.provider_chaos_rules = []
    if args.provider_chaos:
        if not args.providers:
            parser.error("--provider-chaos needs --providers")
        from mailproof.providers.faults import ProviderFaultError, parse_provider_chaos

        try:
            args.provider_chaos_rules = parse_provider_chaos(args.provider_chaos)
        except ProviderFaultError as exc:
            parser.error(f"--provider-chaos: {exc}")
    try:
        args.loop_factory = loop_factory(args.loop)
    except MailproofError as exc:
        parser.error(str(exc))
    if args.chaos:
        try:
            args.chaos_rules = parse_chaos_profile(args.chaos, seed=args.chaos_seed, scope="chaos")
        except FaultError as exc:
            parser.error(f"--chaos: {exc}")
    else:
        args.chaos_rules = []
    return args


async def _serve(args: argparse.Namespace) -> int:
    service = SinkService(host=args.host, smtp_port=args.smtp_port, http_port=args.http_port,
                          token=args.token, max_messages=args.max_messages,
                          stream_hold=args.stream_hold, smtp_timeout=args.smtp_timeout,
                          data_timeout=args.data_timeout,
                          tls=args.tls, auth=args.auth, tls_hostnames=tuple(args.tls_hostname),
                          ca_file=args.tls_ca_file, providers=args.providers,
                          providers_port=args.providers_port)
    for rule in args.chaos_rules:
        service.faults.add(rule)
    if service.providers is not None:
        from mailproof.providers.faults import ProviderFaultPlan

        service.providers.faults = ProviderFaultPlan(seed=args.chaos_seed)
        for provider_rule in args.provider_chaos_rules:
            service.providers.faults.add(provider_rule)
    try:
        await service.start()
    except (SinkError, ServiceError, MailproofError) as exc:
        print(f"sink service: {exc}", file=sys.stderr, flush=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything imported and built so far lives as long as the process: keep it out of the
    # garbage collector's full collections (they would rescan it thousands of times under load).
    gc.freeze()
    print(service.ready_line, flush=True)
    await stop.wait()
    await service.stop()
    return 0


def loop_factory(choice: str) -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop for ``--loop``: uvloop's when installed (auto) or asked for, else None (asyncio's).

    uvloop is an optional speed-up (the ``speed`` extra), never required; the sink reads asyncio
    StreamReader internals, which are the same Python objects under uvloop.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise MailproofError("--loop uvloop: uvloop is not installed; pip install 'mailproof[speed]' "
                                 "(or use --loop auto, which falls back to asyncio's loop)") from None
        return None
    return uvloop.new_event_loop


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    with asyncio.Runner(loop_factory=args.loop_factory) as runner:
        return runner.run(_serve(args))
