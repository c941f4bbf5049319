"""The sink-service backend: a client of ``mailproof.capture.service`` with the shape of EmbeddedSink.

``RemoteSink(url, token=None)`` gives what a backend gives: ``name``, ``store`` (a MailStore),
``smtp_host``/``smtp_port`` (from ``/health``), ``faults`` (the FaultPlan API, over HTTP),
``start()``/``stop()`` and a context manager. ``RemoteSink.launch(...)`` starts the service as its
own process first (and stops it on ``stop()``).

One event stream per process: a daemon thread reads ``GET /stream`` and feeds every captured
message into ``store.deliver``, which wakes the waiting flows, however many there are. Nobody
polls and no wait costs an HTTP request. When the stream drops (or stays silent past three
heartbeats), the reader reconnects with ``since=<last seq seen>``: the service replays what
came after, so nothing is lost or delivered twice. Messages the service no longer retains are
counted in ``missing``. If the service itself restarted (a new ``instance`` id; its seqs begin
again at 1), the reader takes everything the new run retains and counts the event in
``restarts``.

STARTTLS and AUTH are the service's (``--tls``, ``--auth``; ``launch(tls=..., auth=...)``):
``start()`` reads them from ``/health`` into ``tls_mode``, ``tls_ca_file`` (the CA certificate
the app under test must trust: ``SSL_CERT_FILE=<tls_ca_file>`` for Python, ``NODE_EXTRA_CA_CERTS``
for Node; see ``mailproof.capture.tls``) and ``auth_required``. Each streamed message carries its
session's ``tls`` and ``auth_user`` into the ``Message``.

``accept`` (a ``Message -> bool``, None: everything) sets aside what this process has no use for
before it reaches the store; the pytest plugin's ``--mailbox=service`` uses it so that each xdist
worker keeps the mail to its own addresses (and to addresses no mailproof run handed out), not
its neighbours'. Set-aside messages are counted in ``set_aside``.

Gevent-friendly on purpose: plain blocking sockets (``http.client``), ``threading`` looked up at
call time, no asyncio. Under Locust's monkey-patching the reader thread is a greenlet and every
read is cooperative.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

from mailproof.capture.service import TOKEN_ENV
from mailproof.capture.tls import AUTH_ENV, Credentials, parse_auth, parse_tls_mode
from mailproof.faults.specs import FaultError, parse_chaos_profile, rule_from_spec, rule_to_spec
from mailproof.faults import FaultRule
from mailproof.servers.app_process import AppProcess
from mailproof.errors import MailproofError
from mailproof.mailbox import MailStore
from mailproof.message import Message
from mailproof.net import UNSPECIFIED

log = logging.getLogger("mailproof.capture.remote")

DEFAULT_HEARTBEAT = 2.0


class SinkServiceError(MailproofError):
    """The sink service answered with an error, or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class _Api:
    """Blocking JSON-over-HTTP calls to the service (one short connection per call)."""

    def __init__(self, url: str, token: Optional[str], timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise MailproofError(f"sink service URL must look like http://127.0.0.1:PORT, not {url!r}")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def connect(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201),
             raw: bool = False, timeout: Optional[float] = None) -> Any:
        conn = self.connect(timeout)
        headers = self.headers()
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SinkServiceError(f"{method} {self.url}{path} failed: {exc}. Is the sink service running?") from exc
        finally:
            conn.close()
        if raw and response.status in ok:
            return data
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode("utf-8", "replace")
        if response.status not in ok:
            error = decoded.get("error") if isinstance(decoded, dict) else decoded
            raise SinkServiceError(f"{method} {self.url}{path}: HTTP {response.status}: {error}",
                                   status=response.status, body=decoded)
        return decoded


class RemoteRule(FaultRule):
    """A rule installed on a sink service: ``fired`` and ``acted`` are read from the service.

    A test asserts on ``rule.fired`` right after the mail went through; with a FaultPlan that is
    the live count, and it must be here too (a stale 0 would fail a flow that worked, or pass one
    whose fault never fired).
    """

    @classmethod
    def bind(cls, rule: FaultRule, faults: "RemoteFaults") -> "RemoteRule":
        live = cls.__new__(cls)
        live.__dict__.update(rule.__dict__)
        live.__dict__["_remote"] = faults
        return live

    def _count(self, name: str) -> int:
        remote = self.__dict__.get("_remote")
        if remote is None:
            return self.__dict__.get(f"_{name}", 0)
        for spec in remote._api.call("GET", "/faults")["faults"]:
            if spec["id"] == self.id:
                self.__dict__[f"_{name}"] = int(spec.get(name, 0))
                break
        return self.__dict__.get(f"_{name}", 0)  # once removed from the service: the last count seen

    @property
    def fired(self) -> int:  # type: ignore[override]
        return self._count("fired")

    @fired.setter
    def fired(self, value: int) -> None:
        self.__dict__["_fired"] = value

    @property
    def acted(self) -> int:  # type: ignore[override]
        return self._count("acted")

    @acted.setter
    def acted(self, value: int) -> None:
        self.__dict__["_acted"] = value


class RemoteFaults:
    """The FaultPlan API (``rule``, ``add``, ``remove``, ``clear``, ``rules``) on the service.

    Rules are sent as JSON (``mailproof.faults.specs``); ``rules`` reads them back with their live
    ``fired``/``acted`` counts. It implements ``mailproof.faults.Faults``, so ``ScopedFaults`` works on it unchanged.
    """

    def __init__(self, api: _Api) -> None:
        self._api = api

    def add(self, rule: FaultRule) -> FaultRule:
        spec = rule_to_spec(rule)
        for key in ("id", "fired", "acted"):
            spec.pop(key, None)
        try:
            answer = self._api.call("POST", "/faults", spec)
        except SinkServiceError as exc:
            if exc.status == 400:
                raise FaultError(str(exc)) from None
            raise
        rule.id = answer["id"]
        return RemoteRule.bind(rule, self)

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule:
        return self.add(FaultRule(stage=stage, action=action, **match))

    def profile(self, profile: str, *, seed: Optional[int] = None, scope: Optional[str] = None,
                to_pattern: Optional[str] = None) -> list[FaultRule]:
        """Install a compact chaos profile (``mailproof.faults.specs.parse_chaos_profile``)."""
        parse_chaos_profile(profile, seed=seed, scope=scope, to_pattern=to_pattern)  # fail fast, locally
        body = {"profile": profile, "seed": seed, "scope": scope, "to_pattern": to_pattern}
        answer = self._api.call("POST", "/faults", {k: v for k, v in body.items() if v is not None})
        return [self._from_spec(spec) for spec in answer["faults"]]

    def remove(self, rule: Union[FaultRule, int]) -> None:
        rule_id = rule if isinstance(rule, int) else rule.id
        self._api.call("DELETE", f"/faults/{int(rule_id)}", ok=(200, 404))

    def clear(self, scope: Optional[str] = None) -> int:
        path = "/faults" + (f"?{urllib.parse.urlencode({'scope': scope})}" if scope is not None else "")
        return int(self._api.call("DELETE", path)["removed"])

    @property
    def rules(self) -> list[FaultRule]:
        return [self._from_spec(spec) for spec in self._api.call("GET", "/faults")["faults"]]

    @staticmethod
    def _from_spec(spec: dict) -> FaultRule:
        rule = rule_from_spec(spec)
        rule.id, rule.fired, rule.acted = spec["id"], spec.get("fired", 0), spec.get("acted", 0)
        return rule


class RemoteSink:
    """Backend reading a sink service over HTTP: one stream in, MailStore waiters out."""

    name = "sink-service"

    def __init__(self, url: str, token: Optional[str] = None, *, store: Optional[MailStore] = None,
                 replay: bool = False, heartbeat: float = DEFAULT_HEARTBEAT, timeout: float = 10.0,
                 connect_timeout: float = 10.0, accept: Optional[Callable[[Message], bool]] = None,
                 run: Optional[str] = None) -> None:
        """``replay=True`` also delivers what the service retained before ``start()``. ``run``: an
        AddressBook run id; the service then streams only the mail to that run's addresses, and
        strays (mail to no harness address), not other runs' (a Locust worker's own mail)."""
        if heartbeat <= 0:
            raise ValueError("heartbeat must be a positive number of seconds")
        self.url = url.rstrip("/")
        self.token = token
        self.store = store if store is not None else MailStore()
        self.replay = replay
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self._api = _Api(self.url, token, timeout)
        self.faults = RemoteFaults(self._api)
        self.accept = accept
        self.run = run
        self.smtp_host: Optional[str] = None
        self.smtp_port: Optional[int] = None
        self.tls_mode = "off"  # the service's SMTP security, from /health at start()
        self.tls_ca_file: Optional[str] = None
        self.auth_required = False
        self.process: Optional[AppProcess] = None
        # Stream state, written by the reader thread only.
        self.last_seq = 0  # the service's seq of the last message delivered into the store
        self.received = 0  # messages delivered into the store from the stream
        self.set_aside = 0  # messages the stream brought that ``accept`` turned down
        self.duplicates = 0  # stream lines at or below last_seq (skipped; never expected)
        self.filtered = 0  # seqs the service left out of this stream: other runs' mail (run=)
        self.missing = 0  # messages the service no longer had when the stream asked for them
        self.stream_connections = 0  # successful (re)connections of the stream
        self.restarts = 0  # times the stream found a restarted service (seqs begin again at 1)
        self.instance: Optional[str] = None  # the service run whose seqs last_seq counts
        # Named to the service: mail not yet sent to this client is not evicted (nor across a reconnect).
        self.client_id = uuid.uuid4().hex
        self.last_heartbeat: Optional[float] = None
        self.last_error: Optional[BaseException] = None
        self._fatal: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._conn_lock = threading.Lock()
        self._conn: Optional[http.client.HTTPConnection] = None

    # -- launching the service --------------------------------------------------------------------

    @classmethod
    def launch(cls, *, host: str = "127.0.0.1", smtp_port: int = 0, http_port: int = 0,
               token: Optional[str] = None, max_messages: Optional[int] = None,
               chaos: Optional[str] = None, chaos_seed: Optional[int] = None,
               tls: Optional[str] = None, auth: Union[None, str, Credentials] = None,
               tls_hostnames: tuple[str, ...] = (), extra_args: tuple[str, ...] = (),
               python: Optional[str] = None, start_timeout: float = 20.0, **options: Any) -> "RemoteSink":
        """Start ``python -m mailproof.capture.service`` as its own process and connect to it (started).

        ``tls`` (starttls | starttls-required) and ``auth`` (``"user:password"``) secure its SMTP
        side; ``tls_ca_file`` then names the CA certificate. The token and the credentials travel
        in the environment, not on the command line (``ps`` shows argv). ``stop()`` stops the
        process too.
        """
        command = [python or sys.executable, "-m", "mailproof.capture.service", "--host", host,
                   "--smtp-port", str(smtp_port), "--http-port", str(http_port)]
        if max_messages is not None:
            command += ["--max-messages", str(max_messages)]
        if chaos:
            command += ["--chaos", chaos]
        if chaos_seed is not None:
            command += ["--chaos-seed", str(chaos_seed)]
        tls_mode = parse_tls_mode(tls, source="tls")
        if tls_mode != "off":
            command += ["--tls", tls_mode]
        for name in tls_hostnames:
            command += ["--tls-hostname", name]
        command += list(extra_args)
        env = {TOKEN_ENV: token} if token else {}
        credentials = parse_auth(auth, source="auth")
        if credentials is not None:
            env[AUTH_ENV] = ":".join(credentials)
        process = AppProcess(command, env=env, ready_pattern=r"READY (http://\S+)",
                             start_timeout=start_timeout, name="sink service").start()
        sink = cls(process.url, token=token, **options)
        sink.process = process
        try:
            sink.start()
        except BaseException:
            process.stop()
            raise
        return sink

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "RemoteSink":
        """Read /health, open the event stream and return once it is connected."""
        if self._thread is not None:
            return self
        health = self._api.call("GET", "/health")
        smtp = health["smtp"]
        self.smtp_host = self._api.host if smtp["host"] in UNSPECIFIED else smtp["host"]
        self.smtp_port = int(smtp["port"])
        tls = health.get("tls") or {}
        self.tls_mode = tls.get("mode") or "off"
        self.tls_ca_file = tls.get("ca_file")
        self.auth_required = bool(health.get("auth_required"))
        self.last_seq = 0 if self.replay else int(health["last_seq"])
        self.instance = health.get("instance")
        self._stopping.clear()
        self._connected.clear()
        self._fatal = None
        self._thread = threading.Thread(target=self._read_stream, daemon=True,
                                        name=f"mailproof-sink-stream-{self._api.port}")
        self._thread.start()
        if not self._connected.wait(self.connect_timeout) or self._fatal is not None:
            error = self._fatal or self.last_error
            self.stop()
            raise SinkServiceError(f"cannot open the event stream of the sink service at {self.url}: "
                                   f"{error or 'no answer within %g s' % self.connect_timeout}")
        return self

    def stop(self) -> None:
        """Close the stream and join its reader; stop the service process if launched here."""
        self._stopping.set()
        self._close_stream()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
            self._release()
        if self.process is not None:
            self.process.stop()
            self.process = None

    def _release(self) -> None:
        """Tell the service this client holds no mail any more (best effort: the hold expires)."""
        try:
            self._api.call("DELETE", f"/streams/{self.client_id}", timeout=2.0)
        except (OSError, SinkServiceError, http.client.HTTPException, ValueError) as exc:
            log.debug("could not release the stream cursor at %s: %s", self.url, exc)

    def __enter__(self) -> "RemoteSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- API helpers -------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._api.call("GET", "/health")

    def stats(self) -> dict:
        return self._api.call("GET", "/stats")

    def clear_messages(self) -> int:
        """Forget what the service retains (the local store keeps its messages)."""
        return int(self._api.call("DELETE", "/messages")["cleared"])

    def raw(self, seq: int) -> bytes:
        """The exact bytes the service captured as its message ``seq``."""
        return self._api.call("GET", f"/messages/{int(seq)}/raw", raw=True)

    def drop_streams(self) -> int:
        """Ask the service to drop every open stream (a chaos hook; this client reconnects)."""
        return int(self._api.call("DELETE", "/streams")["dropped"])

    def reconnect_stream(self) -> None:
        """Drop this client's stream connection from its side; the reader reconnects with since=."""
        self._close_stream()

    # -- the event stream --------------------------------------------------------------------------

    def _close_stream(self) -> None:
        with self._conn_lock:
            conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            except OSError:
                pass

    def _read_stream(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            productive = False
            conn = self._api.connect(timeout=self.heartbeat * 3 + 1)
            with self._conn_lock:
                self._conn = conn
            try:
                if self._stopping.is_set():
                    break
                params = {"since": self.last_seq, "heartbeat": self.heartbeat, "client": self.client_id}
                if self.run:
                    params["run"] = self.run
                if self.instance:
                    params["instance"] = self.instance
                query = urllib.parse.urlencode(params)
                conn.request("GET", f"{self._api.prefix}/stream?{query}", headers=self._api.headers())
                response = conn.getresponse()
                if response.status != 200:
                    body = response.read().decode("utf-8", "replace")
                    error = SinkServiceError(f"GET /stream: HTTP {response.status}: {body}", status=response.status)
                    if response.status in (401, 403, 404):
                        self._fatal = error  # retrying cannot help
                        self._connected.set()
                        return
                    raise error
                self.stream_connections += 1
                self._connected.set()
                productive = True
                backoff = 0.05
                while not self._stopping.is_set():
                    line = response.readline()
                    if not line.endswith(b"\n"):
                        break  # end of stream, or a connection dropped mid-line: reconnect
                    self._handle_line(line)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                # OSError covers socket.timeout: three heartbeats missed means a dead connection.
                if not self._stopping.is_set():
                    self.last_error = exc
                    log.info("sink service stream interrupted (%s); reconnecting with since=%d", exc, self.last_seq)
            finally:
                with self._conn_lock:
                    self._conn = None
                conn.close()
            if not productive and not self._stopping.is_set():
                # The service did not answer: back off a little (interruptible by stop()).
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def _accepts(self, msg: Message) -> bool:
        try:
            return bool(self.accept(msg))  # type: ignore[misc]
        except Exception:  # a broken filter must not end the stream: keep the message
            log.exception("the accept filter of the sink service stream failed; keeping the message")
            return True

    def _handle_line(self, line: bytes) -> None:
        event = json.loads(line)
        seq = event.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                self.duplicates += 1
                return
            first = int(event.get("from", seq))  # a filtered stream: seqs first..seq-1 were other runs' mail
            if first > self.last_seq + 1:  # gap without a 'missing' notice: count it all the same
                self.missing += first - self.last_seq - 1
                log.warning("sink service stream skipped seqs %d..%d (no longer retained)", self.last_seq + 1, first - 1)
            self.filtered += seq - max(first, self.last_seq + 1)
            msg = Message(base64.b64decode(event["raw"]), mail_from=event.get("mail_from") or "",
                                  rcpt_tos=event.get("rcpt_tos") or (), received_at=event.get("received_at"),
                                  source="sink-service",
                                  extra={"service_seq": seq, "service_instance": self.instance},
                                  tls=event.get("tls"), auth_user=event.get("auth_user"))
            self.last_seq = seq
            if self.accept is not None and not self._accepts(msg):
                self.set_aside += 1
                return
            self.received += 1
            self.store.deliver(msg)
        elif "through" in event:  # a filtered stream: everything up to here was other runs' mail
            through = int(event["through"])
            self.filtered += max(0, through - self.last_seq)
            self.last_seq = max(self.last_seq, through)
        elif "heartbeat" in event:
            self.last_heartbeat = time.time()
        elif "hello" in event:
            hello = event["hello"]
            if hello.get("reset"):
                log.warning("the sink service restarted (instance %s, was %s): its retained mail is replayed "
                            "from seq 1; mail it captured before the restart and never streamed is gone",
                            hello.get("instance"), self.instance)
                self.restarts += 1
                self.last_seq = int(hello.get("since", 0))
            self.instance = hello.get("instance") or self.instance
        elif "missing" in event:
            gap = event["missing"]
            log.warning("sink service no longer retains seqs %s..%s (evicted or cleared)", gap["from"], gap["to"])
            self.missing += int(gap["to"]) - int(gap["from"]) + 1
            self.last_seq = max(self.last_seq, int(gap["to"]))
