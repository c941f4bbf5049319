"""The checks' HTTP: only to hosts under test, never following a redirect off them."""

from __future__ import annotations

from typing import Optional

import requests

from mailproof.checks.config import CheckConfig


class NotUnderTest(Exception):
    """A URL whose host is not an application under test: it is listed, never fetched."""


def request(config: CheckConfig, method: str, url: str, *, data: Optional[dict] = None) -> requests.Response:
    """One request with no cookies or credentials (a fresh session), redirects followed only
    while they stay on hosts under test (at most 5)."""
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: loopback stays loopback
        for _ in range(6):
            if not config.under_test(url):
                raise NotUnderTest(url)
            response = session.request(method, url, data=data, allow_redirects=False,
                                       timeout=config.http_timeout)
            location = response.headers.get("Location")
            if not (300 <= response.status_code < 400 and location):
                return response
            url = requests.compat.urljoin(url, location)
            if response.status_code in (301, 302, 303) and method == "POST":
                method, data = "GET", None
        return response
