"""The ``mailproof`` command.

    mailproof rehearse -f FLOWS (--host URL | --app "CMD" --app-ready URL_OR_REGEX) -u 10 -r 5 -t 20s
    mailproof sink [--smtp-port 2525 --http-port 8025 ...]     # the sink service; prints READY <url> smtp=<host:port>
    mailproof report [--results DIR --output DIR]            # QA's single-file Allure report
    mailproof preview MESSAGE.eml -o PREVIEW.html            # the safe offline preview Allure shows

``mailproof COMMAND --help`` describes each. Exit codes: 0 success; for ``rehearse`` 3 when a gate
failed; 2 for a usage or setup error (its cause and its fix are printed, never a traceback).
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Optional

USAGE_ERROR = 2
COMMANDS = {
    "rehearse": "run the flows of FLOWS under Locust against your app, account for every email, judge the SLO gates",
    "sink": "the sink service: SMTP capture plus an HTTP API (what rehearsals read)",
    "report": "QA's single-file Allure report from allure-pytest results",
    "preview": "the safe, offline HTML preview of one email (.eml), as the Allure report shows it",
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailproof", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def rehearse_parser() -> argparse.ArgumentParser:
    from mailproof.load import launcher

    parser = argparse.ArgumentParser(prog="mailproof rehearse", description=launcher.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    launcher.add_arguments(parser)
    return parser


def preview_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailproof preview",
        description="Write the safe, offline HTML preview of an email, the one the Allure report shows: scripts, "
                    "frames and forms removed, remote images, styles and fonts blocked (a banner lists them), "
                    "cid: images inlined, a Content-Security-Policy that loads nothing. A message without an "
                    "HTML part shows its text.")
    parser.add_argument("message", type=Path, metavar="MESSAGE.eml", help="the raw message (RFC 5322 bytes)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PREVIEW.html", help="the HTML file to write")
    return parser


def preview(argv: list[str]) -> int:
    args = preview_parser().parse_args(argv)
    try:
        raw = args.message.read_bytes()
    except OSError as exc:
        print(f"mailproof preview: cannot read {args.message}: {exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        from mailproof.report.preview import safe_preview
    except ImportError as exc:  # nh3 / tinycss2: the report extra
        print(f"mailproof preview: {exc}; install the report extra: pip install 'mailproof[report]'", file=sys.stderr)
        return USAGE_ERROR
    from mailproof.message import Message

    msg = Message(raw)
    markup = msg.html
    if markup:
        images = [(a.content_id, a.content_type, a.data) for a in msg.attachments if a.content_id]
    else:
        text = msg.text
        markup = (f"<pre>{html.escape(text)}</pre>" if text
                  else "<p>This message has neither an HTML nor a text part.</p>")
        images = []
    page = safe_preview(markup, images).html
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"mailproof preview: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR
    print(f"mailproof preview: {args.output} ({msg.subject or 'no subject'!s})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = _top_parser()
        if not argv:
            parser.print_usage(sys.stderr)
            print("mailproof: give a command: " + ", ".join(COMMANDS) + " (mailproof --help describes them)",
                  file=sys.stderr)
            return USAGE_ERROR
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "rehearse":
            from mailproof.load.launcher import rehearse

            return rehearse(rehearse_parser().parse_args(rest))
        if command == "sink":
            from mailproof.capture.service.cli import main as sink_main

            return sink_main(rest)
        if command == "report":
            from mailproof.report.allure_build import main as report_main

            return report_main(rest)
        if command == "preview":
            return preview(rest)
    except SystemExit as exc:  # argparse (--help: 0, a usage error: 2) or a command's own exit
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return USAGE_ERROR
    except ImportError as exc:  # an extra is missing (MissingExtra names it)
        hint = "" if "pip install" in str(exc) else ". Install the extras: pip install 'mailproof[all]'"
        print(f"mailproof {command}: {exc}{hint}", file=sys.stderr)
        return USAGE_ERROR
    _top_parser().print_usage(sys.stderr)
    print(f"mailproof: unknown command {command!r}; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
