"""``python -m loadtests.demo``: the demo application and its fake validation API, as one command.

What ``mailproof rehearse --app`` starts for the demo (``make rehearsal``): the validation fake
(``python -m fakes.validation_api``) first, then the demo app (``python -m demo_app``) pointed at
it and at the sink that ``mailproof rehearse`` gives in ``MAILPROOF_SMTP_HOST`` and
``MAILPROOF_SMTP_PORT``, or (``mailproof rehearse --transport X``) the provider API in
``MAILPROOF_TRANSPORT``, ``MAILPROOF_PROVIDER_URL``, ``MAILPROOF_PROVIDER_KEY`` and
``MAILPROOF_PROVIDER_SECRET``. The demo app's ``READY http://...`` line is printed on stdout once it
listens (``--app-ready 'READY (http://\\S+)'``); everything else goes to stderr.

Both children stay in this process's group: ``mailproof`` ends the whole group, so neither
outlives the rehearsal.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"READY (http://\S+)")


def _relay(stream, ready: "queue.Queue[str]", name: str, echo_ready: bool) -> None:
    """Copy a child's lines to stderr; the first READY line's URL goes to ``ready`` (and, for the
    app, to stdout: the one READY line a launcher may see; the fake's is reworded)."""
    told = False
    for line in stream:
        found = READY.search(line) if not told else None
        if found:
            told = True
            ready.put(found.group(1))
            if echo_ready:
                print(line.rstrip("\n"), flush=True)
            else:
                print(f"{name} listening on {found.group(1)}", file=sys.stderr, flush=True)
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
    if not told:
        ready.put("")


def _start(command: list[str], name: str, echo_ready: bool, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    ready: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_relay, args=(child.stdout, ready, name, echo_ready), daemon=True).start()
    try:
        url = ready.get(timeout=timeout)
    except queue.Empty:
        url = ""
    if not url:
        child.kill()
        raise SystemExit(f"loadtests.demo: the {name} did not print READY within {timeout:g} s "
                         f"(exit code {child.poll()}); its output is above")
    return child, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8, help="the demo app's SMTP worker pool (default 8)")
    parser.add_argument("--port", type=int, default=0, help="the demo app's port (default 0: a free one)")
    args = parser.parse_args(argv)
    host, port = os.environ.get("MAILPROOF_SMTP_HOST"), os.environ.get("MAILPROOF_SMTP_PORT")
    if not host or not port:
        raise SystemExit("loadtests.demo: set MAILPROOF_SMTP_HOST and MAILPROOF_SMTP_PORT (mailproof rehearse does)")
    python = sys.executable
    validation, validation_url = _start([python, "-m", "fakes.validation_api", "--port", "0"],
                                        "validation API", echo_ready=False)
    try:
        transport = []
        if os.environ.get("MAILPROOF_TRANSPORT", "smtp") != "smtp":
            transport = ["--transport", os.environ["MAILPROOF_TRANSPORT"],
                         "--provider-url", os.environ["MAILPROOF_PROVIDER_URL"],
                         "--provider-key", os.environ["MAILPROOF_PROVIDER_KEY"]]
            if os.environ.get("MAILPROOF_PROVIDER_SECRET"):
                transport += ["--provider-secret", os.environ["MAILPROOF_PROVIDER_SECRET"]]
        app, _ = _start([python, "-m", "demo_app", "--port", str(args.port), "--smtp-host", host, "--smtp-port", port,
                         "--validation-url", validation_url, "--workers", str(args.workers), *transport],
                        "demo application", echo_ready=True)
        return app.wait()
    finally:
        validation.terminate()


if __name__ == "__main__":
    sys.exit(main())
