"""``mailproof rehearse``: start the sink service, the application and Locust; judge the run.

    mailproof rehearse -f FLOWS (--host URL | --app "CMD" --app-ready URL_OR_REGEX) \\
        (-u USERS -r SPAWN_RATE -t RUN_TIME | --shape burst|ramp|constant --peak-rate R --duration S) \\
        [--workers N] [--client fast|requests] [--smtp-port P] [--flow-mix name=W,...] [--gate GATE ...] \\
        [--chaos PROFILE [--chaos-seed S] | --sink-url URL] [--grace S] [--out DIR]

Everything that can be wrong with the command is checked before anything starts (the gates, the
chaos profile, FLOWS and its flow names, the ports); a setup error exits 2 with its cause and
its fix. Then, in order:

1. the sink service (``python -m mailproof.capture.service``, its own process) listens for SMTP
   on ``--smtp-port`` (0: a free port) and serves its HTTP API on a free port; with
   ``--sink-url URL`` none is started: the service already running at URL is used (and left
   running), its SMTP address read from its ``/health``;
2. the application, with ``--app``: ``CMD`` runs through ``sh -c`` in its own process group, with
   ``MAILPROOF_SMTP_HOST`` and ``MAILPROOF_SMTP_PORT`` (the sink), ``MAILPROOF_APP_PORT`` (a free
   port mailproof chose) and each ``--app-env NAME=VALUE`` in its environment; ``{port}`` in
   ``--app``, ``--app-env``, ``--app-ready`` and ``--host`` is that same port. It is ready when
   ``--app-ready`` answers (an http(s) URL: any status below 500) or matches a line of its output
   (a regex; its first group, if any, is the app's URL);
3. Locust, headless: one process, or a master and ``--workers`` workers on 127.0.0.1, running
   mailproof's locustfile (mailproof.load.locustfile) on the flows of FLOWS. Without ``--shape``,
   Locust's ``-u``, ``-r`` and ``-t`` are passed as they are.

When the load stops, in-flight flows get ``--stop-timeout`` seconds to finish, outstanding mail
gets ``--grace`` seconds, and results.json (docs/results.md), Locust's CSVs (``locust_*.csv``),
its HTML (``locust.html``), its log (``locust.log``) and the rehearsal report (``report.html``)
are written to ``--out``. The summary is printed. Exit 0: every gate passed; 3: a gate failed;
2: the run could not be set up, or gave no results.

No Locust import here: Locust runs in child processes (importing it monkey-patches the process).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from mailproof.addresses import AddressBook
from mailproof.errors import MailproofError
from mailproof.http import DEFAULT_HTTP_TIMEOUT
from mailproof.load.flows import FlowsError, LoadedFlows, load_flows, parse_mix
from mailproof.load.gates import DEFAULT_GATES, GateError, parse_gates
from mailproof.load.shapes_config import KINDS, ShapeConfig
from mailproof.net import LOOPBACK, free_port

SETUP_ERROR, GATE_FAILED = 2, 3
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
_TIMESPAN = re.compile(r"^\s*(?:(?P<h>\d+)\s*h)?\s*(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+)\s*s?)?\s*$")
LOG_TAIL = 40


class SetupError(Exception):
    """The rehearsal cannot run: ``str()`` says why and how to fix it (exit 2)."""


def parse_timespan(text: str) -> int:
    """Locust's run-time format: ``20``, ``20s``, ``3m``, ``1h30m`` -> seconds."""
    found = _TIMESPAN.match(text or "")
    if not text or not found or not any(found.groupdict().values()):
        raise SetupError(f"-t {text!r}: give the run time as Locust does, e.g. -t 20s, -t 3m or -t 1h30m")
    return int(found["h"] or 0) * 3600 + int(found["m"] or 0) * 60 + int(found["s"] or 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument("-f", "--flows", required=True, metavar="FLOWS",
                      help="a Python file or an importable module; each @flow function in it is a task")
    what.add_argument("--flow-mix", default="", metavar="NAME=W,...",
                      help="task weights, e.g. 'signup_confirms_account=3,order_receipt=1' "
                           "(default: each flow's @flow(weight=N), else 1)")
    what.add_argument("--client", choices=("fast", "requests"), default="fast",
                      help="what flow.http runs on: fast (Locust's FastHttpUser, geventhttpclient; default: "
                           "about half the load generator's CPU per flow, docs/performance.md) or requests "
                           "(Locust's HttpUser, for a flow that needs requests' per-call timeout=, files= ...)")
    what.add_argument("--pacing", type=float, default=1.0, metavar="S",
                      help="without a shape (-u/-r/-t, a closed model): seconds between the starts of one user's "
                           "flows (default 1); a shape sets the arrivals itself")
    app = parser.add_argument_group("the application")
    app.add_argument("--host", default=None, metavar="URL",
                     help="the application's base URL (Locust's --host); with --app, defaults to the origin of "
                          "--app-ready or the URL its ready line names")
    app.add_argument("--app", default=None, metavar="CMD",
                     help="start the application with this shell command (stopped at the end, its whole process group)")
    app.add_argument("--app-ready", default=None, metavar="URL_OR_REGEX",
                     help="when the app is ready: an http(s) URL that answers (status below 500), or a regex "
                          "matched against its output lines (group 1, if any, is its URL)")
    app.add_argument("--app-env", action="append", default=[], metavar="NAME=VALUE",
                     help="extra environment for --app (repeatable), e.g. --app-env PORT={port}")
    app.add_argument("--app-timeout", type=float, default=30.0, metavar="S",
                     help="seconds the app may take to become ready (default 30)")
    load = parser.add_argument_group("the load: a shape of arrivals (open model), or Locust's own -u/-r/-t")
    load.add_argument("-u", "--users", type=int, default=None, help="peak number of concurrent users (Locust's -u)")
    load.add_argument("-r", "--spawn-rate", type=float, default=None, help="users started per second (Locust's -r)")
    load.add_argument("-t", "--run-time", default=None, metavar="RUN_TIME",
                      help="stop after this long, e.g. 20s, 3m, 1h30m (Locust's -t)")
    load.add_argument("--shape", choices=KINDS, default=None,
                      help="flows started per second over time, whatever the app's response times (open "
                           "model): launch-day burst, step ramp, or constant; instead of -u/-r/-t")
    load.add_argument("--peak-rate", type=float, default=None, metavar="R",
                      help="flows started per second at the shape's peak")
    load.add_argument("--max-users", type=int, default=0, metavar="N",
                      help="the shape's concurrency cap: flows running at once (default: 10 s of flows at the "
                           "peak rate, at least 10); an arrival that finds every user busy starts late, counted")
    load.add_argument("--peak-users", type=int, default=None, help=argparse.SUPPRESS)  # gone: a clear error
    load.add_argument("--duration", type=float, default=None, metavar="S", help="seconds the shape lasts")
    load.add_argument("--ramp-steps", type=int, default=4, metavar="N", help="stairs of the ramp shape (default 4)")
    load.add_argument("--workers", type=int, default=0, metavar="N",
                      help="Locust workers on 127.0.0.1 beside a master (default 0: one Locust process)")
    load.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                      help="seconds in-flight flows may take to finish when the load stops (Locust's "
                           "--stop-timeout; default 30); a flow stopped later is interrupted, never lost")
    mail = parser.add_argument_group("mail and verdict")
    mail.add_argument("--smtp-port", type=int, default=0, metavar="P",
                      help="the sink's SMTP port, for an app with a fixed relay (default 0: a free port)")
    mail.add_argument("--sink-url", default=None, metavar="URL",
                      help="use the sink service already running at URL (python -m mailproof.capture.service) "
                           "instead of starting one: its SMTP address (from its /health) goes to --app; "
                           "not with --smtp-port or --chaos (give those to the service)")
    mail.add_argument("--transport", default="smtp", choices=("smtp", "sendgrid", "mailgun", "ses", "postmark"),
                      help="how the app sends: smtp (default), or a provider's HTTP API, which the sink "
                           "service then also serves (--providers); the app gets MAILPROOF_TRANSPORT, "
                           "MAILPROOF_PROVIDER_URL, MAILPROOF_PROVIDER_KEY (and MAILPROOF_PROVIDER_SECRET for ses)")
    mail.add_argument("--provider-chaos", default=None, metavar="PROFILE",
                      help="with a provider --transport: faults of the provider API on a share of the "
                           "requests, e.g. '5%%:429,1%%:503,2%%:delay=0.5' (seeded by --chaos-seed)")
    mail.add_argument("--gate", action="append", default=[], metavar="GATE",
                      help="an SLO gate, e.g. 'signup_confirms_account:p95<2s' (repeatable), added to the "
                           "defaults: " + ", ".join(DEFAULT_GATES).replace("%", "%%"))
    mail.add_argument("--chaos", default=None, metavar="PROFILE",
                      help="SMTP faults the sink injects, e.g. '5%%:rcpt:451,1%%:after_data:disconnect'")
    mail.add_argument("--chaos-seed", type=int, default=None, metavar="S", help="seed for --chaos (repeatable runs)")
    mail.add_argument("--grace", type=float, default=10.0, metavar="S",
                      help="seconds outstanding mail may take after the load stops before it is lost (default 10)")
    mail.add_argument("--domain", default="mailproof.test", metavar="DOMAIN",
                      help="the domain of the test addresses flows hand out (pytest's mailproof_domain; default "
                           "mailproof.test): give the one your app accepts, the same as under pytest")
    mail.add_argument("--within", type=float, default=10.0, metavar="S",
                      help="a wait's default SLO, seconds from its trigger (pytest's mailproof_within; default 10)")
    mail.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="seconds a wait waits for late mail (pytest's mailproof_timeout; default: wait_for's own)")
    mail.add_argument("--http-timeout", type=float, default=DEFAULT_HTTP_TIMEOUT, metavar="S",
                      help="seconds a flow's request to the app may take (pytest's mailproof_http_timeout; default "
                           f"{DEFAULT_HTTP_TIMEOUT:g})")
    mail.add_argument("--out", default="reports/rehearsal", metavar="DIR",
                      help="results.json, Locust's CSV, HTML and log, report.html (default reports/rehearsal)")


class Plan:
    """The checked command line: everything the run needs, decided before anything starts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        for module, dist in (("locust", "locust"), ("hdrh", "hdrhistogram")):
            if importlib.util.find_spec(module) is None:  # found, not imported: Locust patches what imports it
                raise SetupError(f"rehearsals need {dist}, which is not installed: pip install 'mailproof[load]'")
        self.out = Path(args.out).resolve()
        self.port = free_port() if any("{port}" in (v or "") for v in
                                       [args.app, args.app_ready, args.host, *args.app_env]) else None
        self.gates = self._gates_and_shape()
        self.flows = self._flows()
        self._check_gate_flows()
        self.chaos = self._chaos()
        self.app_env = self._app_env()
        self.ready_url, self.ready_pattern = self._readiness()
        self.host = self._sub(args.host) if args.host else None
        if self.host is not None:
            parts = urllib.parse.urlsplit(self.host)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SetupError(f"--host {args.host!r}: give the app's base URL, e.g. --host http://127.0.0.1:8000")
        if getattr(args, "sink_url", None):
            parts = urllib.parse.urlsplit(args.sink_url)
            if parts.scheme != "http" or not parts.hostname:
                raise SetupError(f"--sink-url {args.sink_url!r}: give the sink service's HTTP URL, "
                                 "e.g. --sink-url http://127.0.0.1:8025")
            if args.smtp_port or args.chaos:
                raise SetupError("--sink-url uses a running sink service: give --smtp-port and --chaos to the "
                                 "service (python -m mailproof.capture.service --smtp-port P --chaos ...), not here")
            if getattr(args, "transport", "smtp") != "smtp":
                raise SetupError("--transport with --sink-url: the keys of a service someone else started are "
                                 "not known here; drop --sink-url and let mailproof start the service")
        elif args.smtp_port:
            _check_port_free(args.smtp_port, "--smtp-port")
        if getattr(args, "provider_chaos", None):
            from mailproof.providers.faults import ProviderFaultError, parse_provider_chaos

            if getattr(args, "transport", "smtp") == "smtp":
                raise SetupError("--provider-chaos needs a provider --transport (sendgrid, mailgun, ses or postmark)")
            try:
                parse_provider_chaos(args.provider_chaos)
            except ProviderFaultError as exc:
                raise SetupError(f"--provider-chaos: {exc}") from None
        if args.workers < 0:
            raise SetupError("--workers must be 0 (one Locust process) or more")
        if args.grace < 0 or args.stop_timeout < 0 or args.pacing < 0:
            raise SetupError("--grace, --stop-timeout and --pacing are seconds, 0 or more")
        if not args.within > 0 or not args.http_timeout > 0 or (args.timeout is not None and not args.timeout > 0):
            raise SetupError("--within, --timeout and --http-timeout are seconds, more than 0")
        try:
            AddressBook(domain=args.domain)
        except ValueError as exc:
            raise SetupError(f"--domain {args.domain!r}: {exc}") from None

    def _sub(self, text: str) -> str:
        return text.replace("{port}", str(self.port)) if self.port is not None else text

    def _gates_and_shape(self) -> list:
        args = self.args
        try:
            gates = parse_gates([*DEFAULT_GATES, *args.gate])
        except GateError as exc:
            raise SetupError(f"--gate: {exc}") from None
        if args.shape:
            given = [flag for flag, value in (("-u", args.users), ("-r", args.spawn_rate), ("-t", args.run_time))
                     if value is not None]
            if given:
                raise SetupError(f"--shape {args.shape} sets the users over time: drop {' '.join(given)}, "
                                 "or drop --shape to use Locust's -u/-r/-t")
            if args.peak_users is not None:
                raise SetupError("--peak-users is gone: a shape sets arrivals now, not users. Give --peak-rate R "
                                 "(flows started per second at the peak) and, if needed, --max-users N (the cap)")
            if args.peak_rate is None or args.duration is None:
                raise SetupError(f"--shape {args.shape} needs --peak-rate R (flows per second) and --duration S")
            try:
                self.shape: Optional[ShapeConfig] = ShapeConfig(args.shape, args.peak_rate, args.duration,
                                                                args.ramp_steps, args.max_users)
            except ValueError as exc:
                raise SetupError(f"--shape: {exc}") from None
            self.run_time = None
        else:
            if args.peak_rate is not None or args.duration is not None or args.peak_users is not None \
                    or args.max_users:
                raise SetupError("--peak-rate, --max-users and --duration size a --shape; without one use "
                                 "-u USERS -t RUN_TIME")
            if args.run_time is None:
                raise SetupError("say how long to run: a shape (--shape constant --peak-rate 10 --duration 20), "
                                 "or -t RUN_TIME (e.g. -u 10 -r 5 -t 20s)")
            self.run_time = parse_timespan(args.run_time)
            if self.run_time <= 0:
                raise SetupError("-t must be longer than 0 s")
            if (args.users is not None and args.users < 1) or (args.spawn_rate is not None and args.spawn_rate <= 0):
                raise SetupError("-u must be at least 1 and -r above 0")
            self.shape = None
        return gates

    def _flows(self) -> LoadedFlows:
        try:
            loaded = load_flows(self.args.flows)
            if self.args.flow_mix:
                parse_mix(self.args.flow_mix, list(loaded.flows), loaded.skipped)
        except FlowsError as exc:
            raise SetupError(str(exc)) from None
        return loaded

    def _check_gate_flows(self) -> None:
        try:
            parse_gates([*DEFAULT_GATES, *self.args.gate], flows=self.flows.flows)
        except GateError as exc:
            raise SetupError(f"--gate: {exc}") from None

    def _chaos(self) -> Optional[str]:
        if not self.args.chaos:
            if self.args.chaos_seed is not None and not getattr(self.args, "provider_chaos", None):
                raise SetupError("--chaos-seed seeds a --chaos profile (or --provider-chaos): give one of them too")
            return None
        from mailproof.faults.specs import FaultError, parse_chaos_profile

        try:
            parse_chaos_profile(self.args.chaos, seed=self.args.chaos_seed, scope="chaos")
        except FaultError as exc:
            raise SetupError(f"--chaos: {exc}") from None
        return self.args.chaos

    def _app_env(self) -> dict[str, str]:
        env = {}
        for item in self.args.app_env:
            name, sep, value = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise SetupError(f"--app-env {item!r}: write NAME=VALUE, e.g. --app-env PORT={{port}}")
            env[name] = self._sub(value)
        if env and not self.args.app:
            raise SetupError("--app-env is the environment of --app: give --app CMD too")
        return env

    def _readiness(self) -> tuple[Optional[str], Optional[str]]:
        args = self.args
        if not args.app:
            if args.app_ready:
                raise SetupError("--app-ready says when --app is ready: give --app CMD too")
            if not args.host:
                raise SetupError("say where the application is: --host URL (already running), or --app CMD "
                                 "--app-ready URL_OR_REGEX (mailproof starts it)")
            return None, None
        ready = self._sub(args.app_ready) if args.app_ready else (self._sub(args.host) if args.host else None)
        if ready is None:
            raise SetupError("--app needs --app-ready: a URL the app answers once it listens (e.g. "
                             "http://127.0.0.1:{port}/health) or a regex of the line it prints then "
                             "(e.g. 'Running on (http://\\S+)')")
        if re.match(r"^https?://", ready):
            return ready, None
        try:
            re.compile(ready)
        except re.error as exc:
            raise SetupError(f"--app-ready {args.app_ready!r} is neither an http(s) URL nor a valid regex: {exc}") from None
        return None, ready


def _check_port_free(port: int, flag: str) -> None:
    if not 0 < port < 65536:
        raise SetupError(f"{flag} {port}: a port is 1..65535 (or 0 for a free one)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise SetupError(f"{flag} {port}: the port is taken on {LOOPBACK} ({exc.strerror}). Stop what listens "
                             f"there (`ss -ltnp 'sport = :{port}'` shows it), or choose another port "
                             f"({flag} 0 lets mailproof pick a free one).") from None


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n  ".join(text[-lines:]) or "(empty)"


class Run:
    """The processes of one rehearsal, started in order and stopped in reverse."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.stack = ExitStack()
        self.sink_url = ""
        self.smtp = ("", 0)
        self.providers_url = ""  # the sink service's provider APIs, with a provider --transport
        self.provider_keys = None
        self.app_url: Optional[str] = None

    def start_sink(self) -> None:
        from mailproof.servers.app_process import AppProcess

        plan = self.plan
        if getattr(plan.args, "sink_url", None):
            self._use_sink(plan.args.sink_url)
            return
        command = [sys.executable, "-m", "mailproof.capture.service", "--host", LOOPBACK,
                   "--smtp-port", str(plan.args.smtp_port), "--http-port", "0"]
        if plan.chaos:
            command += ["--chaos", plan.chaos]
            if plan.args.chaos_seed is not None:
                command += ["--chaos-seed", str(plan.args.chaos_seed)]
        env = None
        if getattr(plan.args, "transport", "smtp") != "smtp":
            from mailproof.providers.server import KEYS_ENV, Keys

            self.provider_keys = Keys.random()  # one set for the service and the app
            command += ["--providers"]
            if getattr(plan.args, "provider_chaos", None):
                command += ["--provider-chaos", plan.args.provider_chaos]
                if plan.args.chaos_seed is not None and not plan.chaos:
                    command += ["--chaos-seed", str(plan.args.chaos_seed)]
            env = {KEYS_ENV: self.provider_keys.to_json()}
        sink = AppProcess(command, ready_pattern=r"READY (http://\S+) smtp=(\S+)", name="sink service",
                          start_timeout=30.0, env=env)
        try:
            sink.start()
        except MailproofError as exc:
            raise SetupError(f"the sink service did not start: {exc}") from None
        self.stack.callback(sink.stop)
        self.sink_url = sink.url or ""
        line = next((l for l in reversed(sink.output) if l.startswith("READY ")), "")
        found = re.search(r"smtp=(\S+):(\d+)", line)
        if found is None:
            raise SetupError(f"the sink service printed no SMTP address in its ready line {line!r}")
        self.smtp = (found.group(1).strip("[]"), int(found.group(2)))
        providers = re.search(r"providers=(\S+)", line)
        if self.provider_keys is not None:
            if providers is None:
                raise SetupError(f"the sink service printed no providers=URL in its ready line {line!r}")
            self.providers_url = providers.group(1)

    def _use_sink(self, url: str) -> None:
        """--sink-url: a sink service someone else started (and stops); its SMTP address from /health."""
        from mailproof.capture.remote import RemoteSink
        from mailproof.net import UNSPECIFIED

        try:
            health = RemoteSink(url, token=os.environ.get("MAILPROOF_SINK_TOKEN") or None).health()
            host, port = health["smtp"]["host"], int(health["smtp"]["port"])
        except (MailproofError, KeyError, TypeError, ValueError) as exc:
            raise SetupError(f"--sink-url {url}: no sink service answers there ({exc}). Start one "
                             "(python -m mailproof.capture.service), or drop --sink-url to let mailproof start it.") from None
        self.sink_url = url.rstrip("/")
        self.smtp = (urllib.parse.urlsplit(url).hostname if host in UNSPECIFIED else host, port)

    def start_app(self) -> None:
        from mailproof.servers.app_process import AppProcess

        plan = self.plan
        if not plan.args.app:
            self.app_url = plan.host
            return
        env = {"MAILPROOF_SMTP_HOST": self.smtp[0], "MAILPROOF_SMTP_PORT": str(self.smtp[1]),
               **self._transport_env(), **plan.app_env}
        if plan.port is not None:
            env.setdefault("MAILPROOF_APP_PORT", str(plan.port))
        app = AppProcess(["/bin/sh", "-c", plan._sub(plan.args.app)], env=env, ready_url=plan.ready_url,
                         ready_pattern=plan.ready_pattern, start_timeout=plan.args.app_timeout, name="application")
        try:
            app.start()
        except MailproofError as exc:
            hint = ("The port it wanted is taken: stop what holds it, or give it a free one (--app-env PORT={port})."
                    if "in use" in str(exc).lower() else
                    "Check that --app starts it, that it reads its SMTP relay from MAILPROOF_SMTP_HOST and "
                    "MAILPROOF_SMTP_PORT (or pass yours with --app-env), and that --app-ready is what it answers "
                    "or prints once it listens (or raise --app-timeout).")
            raise SetupError(f"the application did not become ready: {exc}\n{hint}") from None
        self.stack.callback(app.stop)
        self.app_url = plan.host or app.url
        if not self.app_url or not re.match(r"^https?://", self.app_url):
            raise SetupError(f"the app is ready, but its URL is unknown ({self.app_url!r}): give --host URL, or a "
                             "--app-ready regex whose group 1 is the URL")

    def _transport_env(self) -> dict[str, str]:
        keys, transport = self.provider_keys, getattr(self.plan.args, "transport", "smtp")
        if keys is None:
            return {"MAILPROOF_TRANSPORT": "smtp"}
        key = {"sendgrid": keys.sendgrid, "mailgun": keys.mailgun, "ses": keys.ses_access_key,
               "postmark": keys.postmark}[transport]
        env = {"MAILPROOF_TRANSPORT": transport, "MAILPROOF_PROVIDER_URL": self.providers_url,
               "MAILPROOF_PROVIDER_KEY": key}
        if transport == "ses":
            env["MAILPROOF_PROVIDER_SECRET"] = keys.ses_secret_key
        return env

    def locust_env(self) -> dict[str, str]:
        plan = self.plan
        flows = plan.args.flows
        if flows.endswith(".py") or os.path.sep in flows:
            flows = str(Path(flows).resolve())
        env = {**os.environ, "MAILPROOF_FLOWS": flows, "MAILPROOF_PACING": f"{plan.args.pacing:g}",
               "MAILPROOF_CLIENT": getattr(plan.args, "client", "fast"),
               "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)}
        env.pop("MAILPROOF_SHAPE", None)
        env.pop("MAILPROOF_FLOW_MIX", None)
        if plan.args.flow_mix:
            env["MAILPROOF_FLOW_MIX"] = plan.args.flow_mix
        if plan.shape is not None:
            env["MAILPROOF_SHAPE"] = plan.shape.encode()
        # How many workers share the shape's arrivals (worker i takes every n-th): 1 for a local run.
        env["MAILPROOF_WORKERS"] = str(max(plan.args.workers, 1))
        return env

    def locust_command(self) -> list[str]:
        plan, args = self.plan, self.plan.args
        out = plan.out
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", self.app_url or "",
                   "--only-summary", "--stop-timeout", f"{args.stop_timeout:g}",
                   "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
                   "--exit-code-on-error", "0",  # the gates decide (http:error_rate among them)
                   "--loglevel", "WARNING",
                   "--mailproof-sink-url", self.sink_url, "--mailproof-grace", f"{args.grace:g}",
                   "--mailproof-results", str(out / "results.json"), "--mailproof-quiet",
                   "--mailproof-domain", args.domain, "--mailproof-within", f"{args.within:g}",
                   "--mailproof-http-timeout", f"{args.http_timeout:g}"]
        if args.timeout is not None:
            command += ["--mailproof-timeout", f"{args.timeout:g}"]
        if plan.shape is None:
            command += ["-t", f"{plan.run_time}s"]
            if args.users is not None:
                command += ["-u", str(args.users)]
            if args.spawn_rate is not None:
                command += ["-r", f"{args.spawn_rate:g}"]
        if plan.chaos:
            command += ["--mailproof-chaos", plan.chaos]
            if args.chaos_seed is not None:
                command += ["--mailproof-chaos-seed", str(args.chaos_seed)]
        for gate in args.gate:
            command += ["--mailproof-gate", gate]
        return command

    def run_locust(self) -> int:
        plan = self.plan
        plan.out.mkdir(parents=True, exist_ok=True)
        log_path = plan.out / "locust.log"
        env, command = self.locust_env(), self.locust_command()
        with open(log_path, "w", encoding="utf-8") as log:
            if plan.args.workers <= 0:
                return subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            port = free_port()
            master = subprocess.Popen(command + ["--master", "--master-bind-host", LOOPBACK,
                                                 "--master-bind-port", str(port),
                                                 "--expect-workers", str(plan.args.workers)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
            # Workers take the run's options from the master; they need the locustfile and the sink.
            worker_command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                              "--master-host", LOOPBACK, "--master-port", str(port),
                              "--mailproof-sink-url", self.sink_url, "--mailproof-grace", f"{plan.args.grace:g}",
                              "--loglevel", "WARNING"]
            workers = [subprocess.Popen(worker_command, env=env, stdout=log, stderr=subprocess.STDOUT)
                       for _ in range(plan.args.workers)]
            try:
                code = master.wait()
            finally:
                for worker in workers:
                    try:
                        worker.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait()
                if master.poll() is None:
                    master.kill()
                    master.wait()
            return code


def describe(plan: Plan, run: Run) -> str:
    args = plan.args
    if plan.shape is not None:
        load = (f"{plan.shape.kind} to {plan.shape.peak_rate:g} flows/s for {plan.shape.duration:g} s "
                f"(at most {plan.shape.max_users} at once)")
    else:
        load = (f"{args.users if args.users is not None else 1} users at {args.spawn_rate or 1:g}/s "
                f"for {plan.run_time} s")
    flows = ", ".join(f"{name}={weight}" for name, weight in
                      (parse_mix(args.flow_mix, list(plan.flows.flows)) if args.flow_mix else plan.flows.weights).items())
    return (f"mailproof rehearse: {plan.flows.module} ({flows}) against {run.app_url}; sink {run.sink_url} "
            f"(smtp {run.smtp[0]}:{run.smtp[1]}"
            + (f"; the app sends through {args.transport}'s API at {run.providers_url}" if run.providers_url else "")
            + f"); {load}"
            + (f"; {args.workers} Locust workers" if args.workers else "")
            + (f"; chaos {plan.chaos!r}" if plan.chaos else "")
            + (f"; provider chaos {args.provider_chaos!r}" if getattr(args, "provider_chaos", None) else ""))


def rehearse(args: argparse.Namespace) -> int:
    from mailproof.load.results import RehearsalResults, ResultsError
    from mailproof.load.summary import render_summary

    try:
        plan = Plan(args)
    except SetupError as exc:
        print(f"mailproof rehearse: {exc}", file=sys.stderr)
        return SETUP_ERROR
    for note in plan.flows.notes():
        print(f"mailproof rehearse: note: {note}", file=sys.stderr)
    results_path = plan.out / "results.json"
    plan.out.mkdir(parents=True, exist_ok=True)
    if results_path.exists():
        results_path.unlink()  # never judge by an earlier run's file
    run = Run(plan)
    started = time.time()
    try:
        with run.stack:
            run.start_sink()
            run.start_app()
            print(describe(plan, run), flush=True)
            code = run.run_locust()
    except SetupError as exc:
        print(f"mailproof rehearse: {exc}", file=sys.stderr)
        return SETUP_ERROR
    except KeyboardInterrupt:
        print("mailproof rehearse: interrupted; the sink and the app are stopped", file=sys.stderr)
        return 130
    log_path = plan.out / "locust.log"
    try:
        results = RehearsalResults.read(results_path)
    except ResultsError as exc:
        print(f"mailproof rehearse: Locust exited with code {code} after {time.time() - started:.0f} s and wrote no "
              f"results ({exc.problem}). The end of its log ({log_path}):\n  {_tail(log_path)}", file=sys.stderr)
        return SETUP_ERROR
    print(render_summary(results), flush=True)
    _report(plan)
    print(f"mailproof rehearse: results {results_path}; Locust's log {log_path}, its HTML {plan.out / 'locust.html'}",
          flush=True)
    return 0 if results.passed else GATE_FAILED


def _report(plan: Plan) -> None:
    """report.html beside the results (compared with the previous run in --out, if any)."""
    try:
        from mailproof.report import rehearsal as report
    except ImportError as exc:  # jinja2 / matplotlib: the report extra
        print(f"mailproof rehearse: no report.html ({exc}): pip install 'mailproof[report]'", file=sys.stderr)
        return
    try:
        report.main([str(plan.out / "results.json"), "--keep-previous", "-o", str(plan.out / "report.html")])
    except SystemExit as exc:  # a report error must not hide the verdict
        print(f"mailproof rehearse: no report.html: {exc}", file=sys.stderr)
    except Exception as exc:
        print(f"mailproof rehearse: no report.html: {type(exc).__name__}: {exc}", file=sys.stderr)
