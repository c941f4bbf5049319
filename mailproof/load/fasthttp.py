"""``flow.http`` on Locust's FastHttpUser (geventhttpclient): the requests-like subset flows use.

``FastFlowUser`` runs flows exactly as ``FlowUser`` does, on Locust's FastHttpSession instead of
its requests-based HttpSession (``mailproof rehearse --client fast``). Flows are written against
requests; ``RequestsLikeClient`` gives them the same calls and answers:

- ``get/post/put/patch/delete/head/options/request`` with ``params=``, ``data=`` (a mapping or
  pairs are form-encoded by requests' own encoder, str/bytes sent as they are), ``json=``,
  ``headers=``, ``allow_redirects=`` and ``auth=`` (plus ``name=`` and ``expect=``, as on FlowUser);
- answers with ``status_code``, ``text``, ``content``, ``json()``, ``headers`` (case-insensitive),
  ``url`` (after redirects), ``ok``, ``reason`` and ``raise_for_status()`` (requests' HTTPError on
  400 and above), the rest of the FastResponse reachable as attributes.

What FastHttpSession cannot do per request (``timeout=``, ``files=``, ``cookies=``, ``verify=``,
``stream=``, ``proxies=``, ``cert=``) is refused with a TypeError that names the fix: set
``network_timeout`` on the user class, or run that flow with ``--client requests``. What requests'
Session or Response has and the fast client lacks (``flow.http.headers``, ``response.cookies``)
raises ``FastClientLacks``, naming the same fix. Both are harness errors: never the app's failure.
"""

from __future__ import annotations

import json as _json
from typing import Any, Optional

import requests
from requests.models import RequestEncodingMixin

from mailproof.errors import HarnessError

UNSUPPORTED = ("timeout", "files", "cookies", "verify", "stream", "proxies", "cert", "hooks")
_FORM = "application/x-www-form-urlencoded"


def _encode(value: Any) -> Any:
    """requests' own encoding of ``params=`` and of a mapping ``data=`` (so both clients send the same bytes)."""
    return RequestEncodingMixin._encode_params(value)


class FastClientUnsupported(HarnessError, TypeError):
    """A flow asked the fast client for what it cannot do per request: the harness's limit, not
    the application's failure (counted as a harness error, never against the app)."""


class FastClientLacks(HarnessError, AttributeError):
    """A flow read what requests' Session or Response has and the fast client does not
    (``flow.http.headers``, ``flow.http.cookies``, ``response.cookies``): the harness's limit, not
    the application's failure. An AttributeError still, so ``hasattr`` and ``getattr(x, n, d)`` work."""


def _lacks(kind: str, cls: type, name: str, error: AttributeError) -> AttributeError:
    """FastClientLacks for a public name of requests' ``cls``, else the AttributeError as it was."""
    if name.startswith("_") or not (name in getattr(cls, "__attrs__", ()) or hasattr(cls, name)):
        return error
    return FastClientLacks(f"flow.http on the fast client (FastHttpUser) has no {kind}.{name}, which requests' "
                           f"{cls.__name__} has: run this flow with --client requests (FlowUser), or pass what it "
                           "sets per request (headers=...)")


class RequestsLikeClient:
    """Wraps a Locust ``FastHttpSession``: requests' call signatures in, ``FastReply`` out."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._session, name)
        except AttributeError as error:
            raise _lacks("session", requests.Session, name, error) from None

    def request(self, method: str, url: str, params: Any = None, data: Any = None, headers: Optional[dict] = None,
                **kwargs: Any) -> Any:
        bad = [k for k in UNSUPPORTED if k in kwargs]
        if bad:
            raise FastClientUnsupported(f"flow.http on the fast client (FastHttpUser) takes no {', '.join(f'{k}=' for k in bad)} "
                            f"per request ({method.upper()} {url}): drop it (for timeouts: mailproof rehearse --http-timeout, "
                            "or network_timeout on the user class), or run with --client requests")
        if params:
            query = _encode(params)
            if query:
                url = f"{url}{'&' if '?' in url else '?'}{query}"
        headers = dict(headers or {})
        if not any(k.lower() == "accept" for k in headers):
            headers["Accept"] = "*/*"  # requests' own; FastHttpSession sends none, or application/json for json=
        if data is not None and not isinstance(data, (str, bytes, bytearray)):
            if hasattr(data, "read"):  # a file: its bytes with a Content-Length, as requests sends a file
                data = data.read()
            else:
                encoded = _encode(data)
                if isinstance(encoded, str):  # a mapping or pairs: a form, as requests sends it
                    if not any(k.lower() == "content-type" for k in headers):
                        headers["Content-Type"] = _FORM
                elif not isinstance(encoded, (bytes, bytearray)):
                    # Refused before sending, as requests refuses it: sent, it broke the connection
                    # pool and hung the user's next request.
                    raise TypeError(f"data= takes str, bytes, a mapping, pairs or a file, not {type(data).__name__} "
                                    f"({method.upper()} {url})")
                data = encoded
        if data == "" or data == b"":
            data = None  # requests sends no body for an empty one either
        if not kwargs.pop("allow_redirects", True):
            # Not FastHttpSession's allow_redirects=False: it switches the session's redirects off,
            # and back on only after a request that returned, so one that raised left them off for
            # every later flow run of the user. max_redirects=0 is this request's alone.
            kwargs["max_redirects"] = 0
        answer = self._session.request(method.upper(), url, data=data, headers=headers, **kwargs)
        return _Replying(answer) if kwargs.get("catch_response") else FastReply(answer)

    def get(self, url: str, params: Any = None, **kwargs: Any) -> Any:
        return self.request("GET", url, params=params, **kwargs)

    def options(self, url: str, **kwargs: Any) -> Any:
        return self.request("OPTIONS", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("allow_redirects", False)  # as requests.Session.head
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, data: Any = None, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", url, data=data, json=json, **kwargs)

    def put(self, url: str, data: Any = None, **kwargs: Any) -> Any:
        return self.request("PUT", url, data=data, **kwargs)

    def patch(self, url: str, data: Any = None, **kwargs: Any) -> Any:
        return self.request("PATCH", url, data=data, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.request("DELETE", url, **kwargs)


class _Replying:
    """The FastHttpSession's answer (a context manager with ``catch_response=True``), its answer a FastReply."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __enter__(self) -> "FastReply":
        return FastReply(self._inner.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)


class FastReply:
    """A FastResponse with requests' Response behaviour where they differ (raise_for_status, json errors)."""

    __slots__ = ("_r",)

    def __init__(self, response: Any) -> None:
        self._r = response

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._r, name)
        except AttributeError as error:
            raise _lacks("response", requests.Response, name, error) from None

    @property
    def status_code(self) -> int:
        return self._r.status_code or 0

    @property
    def text(self) -> str:
        return self._r.text or ""

    @property
    def content(self) -> Optional[bytes]:
        content = self._r.content
        if content is None and self.status_code:
            return b""
        return content  # None without an answer, as requests' (Locust's) response then

    @property
    def headers(self) -> Any:
        headers = self._r.headers
        return headers if headers is not None else requests.structures.CaseInsensitiveDict()

    @property
    def ok(self) -> bool:
        """As requests': False on an HTTP error status; no answer at all raises its ConnectionError."""
        try:
            self.raise_for_status()
        except requests.HTTPError:
            return False
        return True

    @property
    def reason(self) -> str:
        return getattr(getattr(self._r, "_response", None), "get_reason", lambda: "")() or ""

    def json(self, **kwargs: Any) -> Any:
        try:
            return _json.loads(self.text, **kwargs)
        except ValueError as exc:  # requests raises its own (a ValueError too)
            raise requests.exceptions.JSONDecodeError(getattr(exc, "msg", str(exc)), getattr(exc, "doc", ""),
                                                      getattr(exc, "pos", 0)) from None

    def raise_for_status(self) -> None:
        error = getattr(self._r, "error", None)
        status = self.status_code
        if status >= 400:
            kind = "Client" if status < 500 else "Server"
            raise requests.HTTPError(f"{status} {kind} Error: {self.reason} for url: {self.url}", response=self)
        if not status and error is not None:
            raise requests.ConnectionError(str(error))

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"<FastReply [{self.status_code}]>"
