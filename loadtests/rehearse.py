"""The demo's rehearsal: ``mailproof rehearse`` on loadtests/flows.py with the demo app and its fakes.

    python -m loadtests.rehearse                                           # burst to 20 flows/s over 60 s
    python -m loadtests.rehearse --duration 30 --peak-rate 25 --workers 2
    python -m loadtests.rehearse -u 100 -r 100 -t 20s                       # Locust's own flags instead of a shape
    python -m loadtests.rehearse --chaos "5%:rcpt:451,1%:after_data:disconnect"

Every option is ``mailproof rehearse``'s (``mailproof rehearse --help``); this only adds what is
the demo's: the flows, ``--app`` (loadtests/demo.py: the validation fake and the demo app) and
``--app-ready``, a burst shape unless ``-u/-r/-t`` or ``--shape`` are given, and
``--app-workers N`` (the demo app's SMTP pool). Exit codes are the command's: 0, 3 or 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mailproof.cli import main as mailproof

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPE = ("--shape", "burst", "--peak-rate", "20", "--duration", "60")


def command(argv: list[str]) -> list[str]:
    argv = list(argv)
    workers = "8"
    if "--app-workers" in argv:
        at = argv.index("--app-workers")
        workers = argv[at + 1] if at + 1 < len(argv) else workers
        del argv[at:at + 2]
    given = {a.split("=")[0] for a in argv}
    shape: list[str] = []
    if not given & {"-u", "--users", "-r", "--spawn-rate", "-t", "--run-time"}:
        for flag, value in zip(DEFAULT_SHAPE[::2], DEFAULT_SHAPE[1::2]):
            if flag not in given:
                shape += [flag, value]
    app = (f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} -m loadtests.demo "
           f"--workers {shlex.quote(workers)}")
    return ["rehearse", "-f", str(ROOT / "loadtests" / "flows.py"), "--app", app,
            "--app-ready", r"READY (http://\S+)", "--out", str(ROOT / "reports" / "rehearsal"), *shape, *argv]


def main(argv: list[str] | None = None) -> int:
    return mailproof(command(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
