"""HTTP clients for flows: a base-URL requests session, and a wrapper that marks triggers.

The wrapper works around any requests-compatible client (requests.Session in pytest, Locust's
HttpSession under load): it records when each request starts, so mail latency is measured from
the request that caused it (docs/architecture.md, decision 3), and reports each call to the flow's reporter.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional
from urllib.parse import urljoin

import requests

_VERBS = ("request", "get", "post", "put", "patch", "delete", "head", "options")


class AppSession(requests.Session):
    """A requests.Session whose relative URLs resolve against the application's base URL."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, urljoin(self.base_url, url.lstrip("/")), *args, **kwargs)


class TriggeringClient:
    """Delegates to ``client``; each request first calls ``on_start()`` and then ``on_done(...)``."""

    def __init__(self, client: Any, on_start: Callable[[], Any],
                 on_done: Optional[Callable[[str, str, Any, float], None]] = None) -> None:
        self._client = client
        self._on_start = on_start
        self._on_done = on_done

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in _VERBS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._on_start()
            started = time.perf_counter()
            response = attr(*args, **kwargs)
            if self._on_done is not None:
                method, url = _method_and_url(name, args, kwargs)
                self._on_done(method, url, response, time.perf_counter() - started)
            return response

        return call

    @property
    def client(self) -> Any:
        return self._client


def _method_and_url(verb: str, args: tuple, kwargs: dict) -> tuple[str, str]:
    if verb == "request":
        method = args[0] if args else kwargs.get("method", "")
        url = args[1] if len(args) > 1 else kwargs.get("url", "")
    else:
        method, url = verb, args[0] if args else kwargs.get("url", "")
    return str(method).upper(), str(url)
