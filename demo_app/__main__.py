"""python -m demo_app [flags]: serve until SIGTERM/SIGINT.

Prints exactly one line, `READY http://HOST:PORT`, on stdout once listening (logs go to stderr), so
a harness can read that line instead of polling.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from . import config
from .web import SHOP, create_app


async def serve(cfg: config.Config) -> None:
    app = create_app(cfg)
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if cfg.access_log else None,
                           shutdown_timeout=2.0)
    await runner.setup()  # runs on_startup: mailer workers and the validation client
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        app[SHOP].set_listen_url(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"READY {url}", flush=True)
        await stop.wait()
        logging.getLogger("demo_app").info("shutting down")
    finally:
        # Stops listening first, then lets in-flight requests finish, then drains the outbox (<= 2 s).
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    cfg = config.load(argv)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
