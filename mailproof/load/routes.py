"""What FlowUser reads of each request it reports, computed once per distinct value.

Every request a flow makes is named by its route (one Locust stats row per route) and, when it
triggers mail, its answer is sampled for the ledger. Under load these ran per request: a URL
split and a regex per path segment for the name (twice: the client and the reporter), requests'
Content-Type parsing for the sample's charset. Both are cached here, and the name is one regex
substitution. No Locust import: tests/test_load_routes.py holds them to the earlier forms.
"""

from __future__ import annotations

import functools
import re
from typing import Optional
from urllib.parse import urlsplit

from requests.utils import get_encoding_from_headers

# A path segment holding an id: a digit or "@" ("%40", a quoted "@", has digits).
_ID_SEGMENT = re.compile(r"[^/]*[@\d][^/]*")


@functools.lru_cache(maxsize=1024)
def route(url: str) -> str:
    """The URL's path with every segment that holds an id as ``{id}``: ``/users/{id}``."""
    return _ID_SEGMENT.sub("{id}", urlsplit(url).path or "/")


@functools.lru_cache(maxsize=256)
def header_encoding(content_type: Optional[str]) -> Optional[str]:
    """requests' ``get_encoding_from_headers`` (which reads the Content-Type alone) of an answer."""
    return get_encoding_from_headers({"content-type": content_type})
