"""FlowUser's request names and reply charsets (mailproof.load.routes) are what they were before
they were cached: the per-segment scan of the path, and requests' own header parsing."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from mailproof.load.routes import header_encoding, route


def _route_per_segment(url: str) -> str:
    """The form the stats names had: a segment with "@", "%40" or a digit is an id."""
    path = urlsplit(url).path or "/"
    return "/".join("{id}" if re.search(r"(@|%40|\d)", seg) else seg for seg in path.split("/"))


def test_routes_of_the_demo_requests():
    assert route("/signup") == "/signup"
    assert route("/users/ada%40mailproof.test") == "/users/{id}"
    assert route("/users/ada@mailproof.test") == "/users/{id}"
    assert route("http://127.0.0.1:8080/confirm?token=abc123") == "/confirm"
    assert route("/orders/A-12/lines/3/") == "/orders/{id}/lines/{id}/"
    assert route("") == "/" and route("http://host") == "/"


_SEGMENT = st.text(st.sampled_from("ab-_.%40@9~ Z+"), max_size=8)


@settings(max_examples=500, derandomize=True, deadline=None, database=None)
@given(st.lists(_SEGMENT, max_size=6).map("/".join), st.sampled_from(["", "/", "http://h:1", "http://h"]),
       st.sampled_from(["", "?q=1@2", "#x9"]))
def test_route_is_the_per_segment_scan(path, prefix, tail):
    url = prefix + path + tail
    assert route(url) == _route_per_segment(url)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.none() | st.sampled_from(["application/json", "text/html; charset=utf-8", "text/plain",
                                    "text/html; charset='latin-1'", "image/png", "application/json; charset=ascii",
                                    ""]) | st.text(max_size=30))
def test_header_encoding_is_requests_own(content_type):
    headers = CaseInsensitiveDict({} if content_type is None else {"Content-Type": content_type})
    assert header_encoding(headers.get("content-type")) == get_encoding_from_headers(headers)
