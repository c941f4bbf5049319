"""``python -m mailproof.capture.service``: the command line (arguments, safety checks, serving)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Iterable, Optional

from mailproof.capture.service import TOKEN_ENV, ServiceError
from mailproof.capture.service.server import SinkService
from mailproof.capture.service.store import DEFAULT_MAX_MESSAGES
from mailproof.capture.smtp_sink import SinkError
from mailproof.faults.specs import FaultError, parse_chaos_profile
from mailproof.net import LOOPBACK, is_loopback


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
                        help=f"messages retained, oldest evicted first and counted (default {DEFAULT_MAX_MESSAGES})")
    parser.add_argument("--smtp-timeout", type=float, default=60.0, help="idle SMTP session timeout, seconds")
    parser.add_argument("--chaos", default=None, metavar="PROFILE",
                        help="fault rules to install at start, e.g. '5%%:rcpt:451,1%%:after_data:disconnect' "
                             "(see mailproof.faults.specs.parse_chaos_profile); scope 'chaos'")
    parser.add_argument("--chaos-seed", type=int, default=None, help="seed for --chaos (repeatable runs)")
    return parser


def parse_args(argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    args.token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not args.token:
        parser.error(  # exits with code 2 before anything listens
            f"refusing to listen on {args.host!r}: it is not a loopback address, and the API reads "
            f"every captured mail and changes faults. Give --token TOKEN (or set {TOKEN_ENV}); "
            "clients then send 'Authorization: Bearer TOKEN'. Or bind 127.0.0.1.")
    if args.max_messages < 1:
        parser.error("--max-messages must be at least 1")
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
                          token=args.token, max_messages=args.max_messages, smtp_timeout=args.smtp_timeout)
    for rule in args.chaos_rules:
        service.faults.add(rule)
    try:
        await service.start()
    except (SinkError, ServiceError) as exc:
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


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    return asyncio.run(_serve(args))
