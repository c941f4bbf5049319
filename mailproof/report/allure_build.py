"""Build QA's Allure 3 report: one index.html that opens from disk, with history across runs.

    python -m mailproof.report.allure_build                      # reports/allure-results -> reports/allure-report
    python -m mailproof.report.allure_build --results DIR --output DIR [--history FILE]

Allure 3 is the npm package ``allure``, pinned in ``allure/package.json`` and
``allure/package-lock.json`` beside this module (package data); ``npm ci`` installs it into a
cache folder the first time and whenever the lock changes: ``$MAILPROOF_CACHE_DIR`` or
``~/.cache/mailproof``, since an installed package's own folder may not be writable. Needs
``node`` and ``npm`` on PATH.

Configuration (single file, categories) is ``allure/allurerc.mjs``. The history for the trends
is a JSON-lines file, by default ``.allure-history/history.jsonl`` beside the output. Allure 3 writes
a Google Analytics tag into every report: it is removed here, and the build fails if any trace
of it is left, so the report never calls out when QA opens it. One CSS rule is added so email
previews get a usable height when the report is opened from disk (see REPORT_CSS).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

PINNED = Path(__file__).resolve().parent / "allure"  # package.json, package-lock.json, allurerc.mjs
CONFIG = PINNED / "allurerc.mjs"
STAMP = ".mailproof-lock.sha256"
INSTALL_HINT = "install Node.js and npm (Debian: apt-get install -y nodejs npm)"

# <script async src="https://www.googletagmanager.com/gtag/js?id=..."></script> and the inline
# <script> that follows it, which defines gtag() and sends the page view.
_GA_LOADER = re.compile(r"<script[^>]*\bsrc=\"https://www\.googletagmanager\.com/[^\"]*\"[^>]*>\s*</script>\s*", re.I)
_GA_INLINE = re.compile(r"<script>(?:(?!</script>).)*?\bgtag\((?:(?!</script>).)*</script>\s*", re.I | re.S)
_GA_TRACES = ("googletagmanager", "google-analytics", "gtag(")

# Allure sizes an HTML attachment's iframe by reading its document's height. Opened from disk
# (file://) the attachment is a blob: document of another origin, the read fails, and the
# iframe keeps the browser's default 150 px: an email preview shows as a sliver. This gives
# HTML previews a usable height (they scroll inside); served over HTTP the measured height wins
# when larger.
REPORT_CSS = ('<style id="mailproof-report-css">'
              '[data-testid="html-attachment-preview"] iframe{min-height:min(640px,75vh)}'
              '</style>')


class ReportBuildError(RuntimeError):
    pass


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ReportBuildError(f"`{name}` not found on PATH: {INSTALL_HINT}")
    return path


@contextlib.contextmanager
def _install_lock(reports: Path) -> Iterator[None]:
    """One npm install at a time per reports folder (parallel test workers, make -j)."""
    key = hashlib.sha256(str(reports.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mailproof-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tool_dir() -> Path:
    """Where Allure 3 is installed: a cache folder the user can write, never site-packages."""
    base = os.environ.get("MAILPROOF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mailproof")
    return Path(base) / "allure3"


def allure_cli(reports: Optional[Path] = None) -> Path:
    """The path of Allure 3's CLI, running ``npm ci`` first if it is missing or out of date."""
    reports = tool_dir() if reports is None else Path(reports)
    lock_file = PINNED / "package-lock.json"
    if not lock_file.is_file():
        raise ReportBuildError(f"{lock_file} is missing: the Allure version is pinned there")
    wanted = hashlib.sha256(lock_file.read_bytes()).hexdigest()
    reports.mkdir(parents=True, exist_ok=True)
    cli = reports / "node_modules" / "allure" / "cli.js"
    stamp = reports / "node_modules" / STAMP
    with _install_lock(reports):
        if cli.is_file() and stamp.is_file() and stamp.read_text().strip() == wanted:
            return cli
        _tool("node")
        npm = _tool("npm")
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(PINNED / name, reports / name)
        print(f"report: installing Allure 3 into {reports / 'node_modules'} (npm ci)", flush=True)
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=reports,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not cli.is_file():
            raise ReportBuildError(f"npm ci in {reports} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
        stamp.write_text(wanted + "\n")
    return cli


def add_report_css(index: Path) -> None:
    page = index.read_text(encoding="utf-8")
    if 'id="mailproof-report-css"' not in page:
        head_end = page.lower().find("</head>")
        if head_end < 0:
            raise ReportBuildError(f"{index} has no </head>: the Allure template changed")
        page = page[:head_end] + REPORT_CSS + page[head_end:]
        index.write_text(page, encoding="utf-8")


def strip_analytics(index: Path) -> int:
    """Remove Allure's Google Analytics tags from ``index``; return how many were removed."""
    page = index.read_text(encoding="utf-8")
    page, loaders = _GA_LOADER.subn("", page)
    page, inline = _GA_INLINE.subn("", page)
    left = [trace for trace in _GA_TRACES if trace in page]
    if left:
        raise ReportBuildError(f"{index} still contains {', '.join(left)} after removing the analytics tags: "
                               "the Allure version changed its template; update mailproof/report/allure_build.py")
    index.write_text(page, encoding="utf-8")
    return loaders + inline


def build(results: Path, output: Path, *, history: Optional[Path] = None, config: Path = CONFIG,
          reports: Optional[Path] = None, name: Optional[str] = None) -> Path:
    """Generate the single-file report from ``results`` into ``output``; return its index.html."""
    results, output = Path(results).resolve(), Path(output).resolve()
    if not results.is_dir() or not any(results.glob("*-result.json")):
        raise ReportBuildError(f"no Allure results in {results}: run the flows first (make flows)")
    cli = allure_cli(reports)
    env = dict(os.environ)
    history = Path(history) if history is not None else output.parent / ".allure-history" / "history.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    env["MAILPROOF_ALLURE_HISTORY"] = str(history.resolve())
    command = [_tool("node"), str(cli), "generate", "--config", str(config), "--output", str(output), str(results)]
    if name:
        command += ["--report-name", name]
    done = subprocess.run(command, cwd=cli.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    index = output / "index.html"
    if done.returncode != 0 or not index.is_file():
        raise ReportBuildError(f"allure generate failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    strip_analytics(index)
    add_report_css(index)
    return index


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailproof.report.allure_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="reports/allure-results", help="allure-pytest results folder")
    parser.add_argument("--output", default="reports/allure-report", help="report folder (index.html)")
    parser.add_argument("--history", default=None,
                        help="history file for trends (default: .allure-history/history.jsonl beside the output)")
    parser.add_argument("--name", default=None, help="report name shown in its header")
    args = parser.parse_args(argv)
    try:
        index = build(Path(args.results), Path(args.output), history=Path(args.history) if args.history else None,
                      name=args.name)
    except ReportBuildError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {index}\n        open it from disk: {index.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
