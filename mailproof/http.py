"""HTTP clients for flows: a base-URL requests session, and a wrapper that reports each request.

The wrapper works around any requests-compatible client (requests.Session in pytest, Locust's
HttpSession under load): before each request it calls ``on_start(method, url, fields)``, so the
Mailbox can take the request as the trigger of the handed-out addresses it carries (mail latency
is measured from the request that caused it: docs/architecture.md, decision 3); after it,
``on_done(...)`` reports the call to the flow's reporter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping  # not typing's: its isinstance goes through typing's __instancecheck__
from typing import Any, Callable, Optional
from urllib.parse import unquote, unquote_plus, urljoin

import requests

_VERBS = ("request", "get", "post", "put", "patch", "delete", "head", "options")
# The positional parameters after the URL of requests' (and Locust's) verb methods.
_POSITIONAL = {"get": ("params",), "post": ("data", "json"), "put": ("data",), "patch": ("data",)}
REQUEST_TEXT_LIMIT = 256 * 1024  # characters of one request field searched for addresses


DEFAULT_HTTP_TIMEOUT = 10.0  # seconds a flow's request may take (ini mailproof_http_timeout)


# requests' own classes underneath: flows that catch them keep working, and QA's report files
# them as application errors (the app, or the URL it was given), not as the harness's.
class AppUnreachable(requests.ConnectionError):
    """The application could not be reached at all; the message names the URL and its setting."""


class AppTimeout(requests.Timeout):
    """The application took longer than the flow HTTP timeout; the message names the setting."""


class AppSession(requests.Session):
    """A requests.Session whose relative URLs resolve against the application's base URL.

    A request the application never answers costs ``timeout`` seconds, not requests' forever;
    failures to reach it are raised as ``AppUnreachable`` / ``AppTimeout`` (still requests'
    ConnectionError / Timeout), whose message says which setting gave the URL or the timeout.
    """

    def __init__(self, base_url: str, timeout: float = DEFAULT_HTTP_TIMEOUT, *,
                 url_setting: str = "--app-url / mailproof_app_url",
                 timeout_setting: str = "mailproof_http_timeout") -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self.url_setting = url_setting
        self.timeout_setting = timeout_setting

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        # flow.http.post(..., expect=400): the answer a flow expects; only Locust's statistics use it
        # (a 4xx there is a failure unless expected), pytest flows assert on status codes themselves.
        kwargs.pop("expect", None)
        full = urljoin(self.base_url, url.lstrip("/"))
        try:
            return super().request(method, full, *args, **kwargs)
        except requests.Timeout as exc:
            raise AppTimeout(
                f"{str(method).upper()} {full} got no answer within {kwargs['timeout']} s, the flow HTTP "
                f"timeout ({self.timeout_setting}; or timeout= on this call). Is {self._where(full)} "
                "stuck or overloaded?") from exc
        except requests.ConnectionError as exc:
            raise AppUnreachable(
                f"cannot reach {self._where(full)} for {str(method).upper()} {full}: {_reason(exc)}. "
                "Is it running, and is that its URL?") from exc

    def _where(self, url: str) -> str:
        """The application and the setting its URL came from, or just the URL a flow gave itself."""
        if url.startswith(self.base_url):
            return f"the application at {self.base_url} ({self.url_setting})"
        return url


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests failure, e.g. 'Connection refused'."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    text = str(exc)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else (text or type(exc).__name__)


class TriggeringClient:
    """Delegates to ``client``. Each request first calls ``on_start(method, url, fields)``
    (``fields``: the keyword arguments, positional ``params``/``data``/``json`` included by name)
    and then ``on_done(method, url, response, seconds)``."""

    def __init__(self, client: Any, on_start: Callable[[str, str, Mapping[str, Any]], Any],
                 on_done: Optional[Callable[[str, str, Any, float], None]] = None) -> None:
        self._client = client
        self._on_start = on_start
        self._on_done = on_done

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in _VERBS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            method, url, fields = request_parts(name, args, kwargs)
            self._on_start(method, url, fields)
            started = time.perf_counter()
            response = attr(*args, **kwargs)
            if self._on_done is not None:
                self._on_done(method, url, response, time.perf_counter() - started)
            return response

        return call

    @property
    def client(self) -> Any:
        return self._client


def request_parts(verb: str, args: tuple, kwargs: dict) -> tuple[str, str, dict]:
    """``(METHOD, url, fields)`` of a call ``client.<verb>(*args, **kwargs)``."""
    fields = dict(kwargs)
    if verb == "request":
        method = args[0] if args else kwargs.get("method", "")
        url = args[1] if len(args) > 1 else kwargs.get("url", "")
        if len(args) > 2 and "params" not in fields:  # requests.Session.request(method, url, params, data)
            fields["params"] = args[2]
        if len(args) > 3 and "data" not in fields:
            fields["data"] = args[3]
    else:
        method, url = verb, args[0] if args else kwargs.get("url", "")
        for name, value in zip(_POSITIONAL.get(verb, ()), args[1:]):
            fields.setdefault(name, value)
    return str(method).upper(), str(url), fields


# -- finding handed-out addresses in a request ---------------------------------------------------


def _collect(value: Any, out: list[str], depth: int = 0) -> None:
    """Strings of a request field (str, bytes, mappings and sequences of them). Never reads a
    file or an iterator: a request body must reach the application untouched."""
    if value is None or depth > 16:
        return
    if isinstance(value, str):
        out.append(value[:REQUEST_TEXT_LIMIT])
    elif isinstance(value, (bytes, bytearray)):
        out.append(bytes(value[:REQUEST_TEXT_LIMIT]).decode("utf-8", "replace"))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _collect(k, out, depth + 1)
            _collect(v, out, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _collect(v, out, depth + 1)


def carried_addresses(addresses: list[str], url: Any, fields: Mapping[str, Any]) -> list[str]:
    """Which of ``addresses`` (lower-cased) a request carries: in the URL, the query string
    (``params``), form data (``data``) or the JSON body (``json``); case-insensitive;
    percent-encoded (``%40``, ``%2B``, once or twice) or with its ``+`` read as a space."""
    parts: list[str] = []
    _collect(url if isinstance(url, (str, bytes)) else str(url), parts)
    for name in ("params", "data", "json"):
        _collect(fields.get(name), parts)
    text = "\n".join(parts).lower()
    variants = [text]
    for _ in range(2):  # quote(address); a query string quoted twice
        decoded = unquote(variants[-1])
        if decoded == variants[-1]:
            break
        variants.append(decoded)
    if not any("@" in v for v in variants):
        return []
    plus = unquote_plus(text)
    return [a for a in addresses if any(a in v for v in variants) or a.replace("+", " ") in plus]
