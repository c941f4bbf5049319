"""Links and visible text out of an HTML body, in linear time, never raising.

The standard library's html.parser cannot be used on captured mail: it raises AssertionError on
input such as ``<![x[``, and it is quadratic or worse on unterminated tags (100 KB of ``<a "``
takes over three minutes). This is a small tokenizer after the HTML standard's rules for the few
things the harness reads: start and end tags with their attributes, comments, declarations, and
the raw-text elements whose content is no markup (script, style) or no visible text (title).
Every step consumes input, and every search starts where the last one ended.
"""

from __future__ import annotations

import re
from html import unescape
from typing import Optional

_TAG_NAME = re.compile(r"[a-zA-Z][^\s/>]*")
_SPACE = re.compile(r"[\s/]*")  # between attributes; a "/" there is the self-closing mark or junk
_WS = re.compile(r"\s*")
_ATTR_NAME = re.compile(r"[^\s/>=]+|=[^\s/>=]*")
_UNQUOTED = re.compile(r"[^\s>]*")
_RAW_TEXT = {name: re.compile(rf"</{name}(?=[\s/>]|\Z)", re.IGNORECASE)
             for name in ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")}
_HIDDEN_RAW = {"script", "style", "title", "iframe", "noembed", "noframes"}


class HtmlReading:
    """What the harness reads of one HTML document: ``links`` and ``text`` (visible text);
    ``tags`` (every start tag with its attributes) and ``styles`` (the text of each ``<style>``)
    for the deliverability checks (mailproof.checks)."""

    def __init__(self, html: str) -> None:
        self.links: list[tuple[str, str]] = []  # (href, anchor text), in document order
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self._visible: list[str] = []
        self._href: Optional[str] = None
        self._anchor: list[str] = []
        self._in_head = False
        self._scan(html)
        self._close_anchor()

    def text(self) -> str:
        return " ".join(" ".join(self._visible).split())

    # -- tokenizer ---------------------------------------------------------------------------

    def _scan(self, s: str) -> None:
        n = len(s)
        i = 0
        while i < n:
            j = s.find("<", i)
            if j < 0:
                self._data(s[i:])
                return
            if j > i:
                self._data(s[i:j])
            i = self._markup(s, j, n)

    def _markup(self, s: str, i: int, n: int) -> int:
        """Handle the markup at ``s[i] == "<"``; return where the text goes on."""
        nxt = s[i + 1:i + 2]
        if nxt.isascii() and nxt.isalpha():
            return self._start_tag(s, i, n)
        if nxt == "/":
            end = s.find(">", i + 2)
            if end < 0:
                return n  # end of file inside a tag: the rest is the tag's
            match = _TAG_NAME.match(s, i + 2)
            if match:
                self._end_tag(match.group().lower())
            return end + 1  # "</>" and "</ junk>" are ignored (a bogus comment)
        if s.startswith("<!--", i):
            if s.startswith("<!-->", i):
                return i + 5
            if s.startswith("<!--->", i):
                return i + 6
            end = s.find("-->", i + 4)
            return n if end < 0 else end + 3
        if nxt in ("!", "?"):  # <!DOCTYPE ...>, <![CDATA[...]]>, <![x[, <?xml ...?>: up to the next ">"
            end = s.find(">", i + 2)
            return n if end < 0 else end + 1
        self._data("<")
        return i + 1

    def _start_tag(self, s: str, i: int, n: int) -> int:
        match = _TAG_NAME.match(s, i + 1)
        name = match.group().lower()
        j = match.end()
        attrs: dict[str, Optional[str]] = {}
        while True:
            j = _SPACE.match(s, j).end()
            if j >= n:
                return n
            if s[j] == ">":
                j += 1
                break
            match = _ATTR_NAME.match(s, j)
            attr = match.group().lower()
            j = match.end()
            k = _WS.match(s, j).end()
            value: Optional[str] = None  # an attribute without a value (<a href>) has none
            if k < n and s[k] == "=":
                k = _WS.match(s, k + 1).end()
                if k < n and s[k] in "\"'":
                    end = s.find(s[k], k + 1)
                    if end < 0:
                        return n  # end of file inside an attribute value
                    value = s[k + 1:end]
                    j = end + 1
                else:
                    match = _UNQUOTED.match(s, k)
                    value = match.group()
                    j = match.end()
            # The first of repeated attributes counts, as in a browser.
            attrs.setdefault(attr, unescape(value) if value and "&" in value else value)
        self._start(name, attrs)
        raw = _RAW_TEXT.get(name)
        if raw is not None:
            close = raw.search(s, j)
            end = n if close is None else close.start()
            if name == "style":
                self.styles.append(s[j:end])
            if name not in _HIDDEN_RAW:
                self._data(s[j:end])
            return end
        return j

    # -- what is read ------------------------------------------------------------------------

    def _start(self, name: str, attrs: dict) -> None:
        self.tags.append((name, attrs))
        if name == "head":
            self._in_head = True
        elif name == "body":
            self._in_head = False
        elif name == "a":
            self._close_anchor()  # an <a> inside an open <a> closes it
            self._href = attrs.get("href")
            self._anchor = []

    def _end_tag(self, name: str) -> None:
        if name == "head":
            self._in_head = False
        elif name == "a":
            self._close_anchor()

    def _close_anchor(self) -> None:
        if self._href is not None:
            self.links.append((self._href.strip(), " ".join("".join(self._anchor).split())))
        self._href = None
        self._anchor = []

    def _data(self, raw: str) -> None:
        text = unescape(raw) if "&" in raw else raw
        if self._href is not None:
            self._anchor.append(text)
        if not self._in_head:
            self._visible.append(text)
