"""An email's HTML body made safe to show in a report: no script runs, nothing loads from afar.

Allure 3 shows an HTML attachment through DOMPurify, in an iframe sandboxed without scripts.
That removes scripts, but it also removes any ``<iframe>`` and ``http-equiv`` meta we could
add (so neither a sandboxed srcdoc frame nor a Content-Security-Policy survives), and it keeps
remote images and stylesheets, which would load (tracking pixels fire) when QA opens the
report. So the preview is made static here, before it is attached:

- scripts, frames, objects, embeds, ``<base>``, ``<link>``, meta refresh/http-equiv, comments,
  event-handler attributes and ``javascript:`` URLs are dropped;
- every resource reference that is not a ``data:`` image (``src``, ``srcset``, ``background``,
  ``poster``, SVG ``href``, CSS ``url()`` and ``@import``) is removed and counted; ``cid:``
  images are inlined as data: URIs first, so they still show;
- a Content-Security-Policy meta (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``)
  leads the document, so opening the attachment on its own (a new tab, the file in
  allure-results) is locked down by the browser as well;
- a one-line banner says what was blocked, so a missing image is not mistaken for a bug.

Links stay clickable text (they open nothing by themselves). The parser is Python's: an email
crafted to parse differently here than in a browser could still get a remote image past it.
That is acceptable for a test report of your own application's mail, not for hostile mail.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Iterable, Optional

PREVIEW_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"
INLINE_IMAGE_LIMIT = 2_000_000  # bytes of cid: images inlined per email

_DROP_WITH_CONTENT = {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "noscript",
                      "noembed", "noframes", "template", "portal", "fencedframe"}
_DROP_TAG = {"base", "link", "param"}
_URL_ATTRS = {"src", "srcset", "background", "poster", "data", "lowsrc", "dynsrc", "action", "formaction",
              "xlink:href", "ping", "longdesc", "manifest", "codebase", "archive", "profile", "cite", "imagesrcset"}
_LINK_TAGS = {"a", "area"}
_SAFE_LINK = re.compile(r"^\s*(https?:|mailto:|tel:|#)", re.I)
_DATA_IMAGE = re.compile(r"^\s*data:image/(png|gif|jpe?g|webp|bmp|avif)[;,]", re.I)
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.I | re.S)
_CSS_IMPORT = re.compile(r"@import\b[^;]*;?", re.I)
_CSS_EXPRESSION = re.compile(r"expression\s*\(|behavior\s*:|-moz-binding\s*:", re.I)


@dataclass
class Preview:
    html: str
    blocked: list[str] = field(default_factory=list)  # the remote/unsafe references removed
    scripts_removed: int = 0


def inline_cid_images(markup: str, images: Iterable[tuple[Optional[str], str, bytes]]) -> str:
    """Replace ``cid:ID`` with a data: URI for each (content_id, content_type, data) image."""
    budget = INLINE_IMAGE_LIMIT
    for content_id, content_type, data in images:
        if not content_id or not _DATA_IMAGE.match(f"data:{content_type};") or len(data) > budget:
            continue
        cid = content_id.strip().strip("<>")
        if f"cid:{cid}" not in markup:
            continue
        budget -= len(data)
        markup = markup.replace(f"cid:{cid}", f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}")
    return markup


class _Rewriter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.blocked: list[str] = []
        self.scripts = 0
        self._skip: list[str] = []  # open elements whose content is dropped
        self._in_style = False
        self._body_seen = False
        self._head_written = False

    # -- output helpers --------------------------------------------------------------------------

    def _head(self) -> None:
        if not self._head_written:
            self._head_written = True
            self.out.append(f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{PREVIEW_CSP}">'
                            '<meta name="referrer" content="no-referrer">')

    def _block(self, what: str) -> None:
        self.blocked.append(what[:300])

    def _css(self, css: str) -> str:
        if _CSS_EXPRESSION.search(css):
            self._block("CSS expression/behavior")
            css = _CSS_EXPRESSION.sub("blocked:", css)

        def imports(match: re.Match) -> str:
            self._block(match.group(0).strip())
            return ""

        def urls(match: re.Match) -> str:
            target = match.group(2).strip()
            if _DATA_IMAGE.match(target):
                return match.group(0)
            self._block(target or "url()")
            return "none"

        return _CSS_URL.sub(urls, _CSS_IMPORT.sub(imports, css))

    def _tag(self, tag: str, attrs: list[tuple[str, Optional[str]]], close: bool) -> str:
        kept: list[tuple[str, Optional[str]]] = []
        for name, value in attrs:
            name = name.lower()
            if name.startswith("on"):
                self.scripts += 1
                continue
            if value is None:
                kept.append((name, None))
                continue
            if name == "style":
                kept.append((name, self._css(value)))
            elif name == "href" and tag in _LINK_TAGS:
                if _SAFE_LINK.match(value):
                    kept.append((name, value))
                else:
                    self._block(value)
            elif name in _URL_ATTRS or name == "href":
                if name in ("src", "srcset") and tag == "img" and _DATA_IMAGE.match(value) or value.strip().startswith("#"):
                    kept.append((name, value))
                else:
                    self._block(value)
                    kept.append(("data-mailproof-blocked", value[:300]))
            else:
                kept.append((name, value))
        if tag in _LINK_TAGS and any(n == "href" for n, _ in kept):
            kept = [(n, v) for n, v in kept if n not in ("target", "rel")]
            kept += [("target", "_blank"), ("rel", "noopener noreferrer")]
        text = "".join(f" {n}" if v is None else f' {n}="{html.escape(v, quote=True)}"' for n, v in kept)
        return f"<{tag}{text}{' /' if close else ''}>"

    # -- parser callbacks ------------------------------------------------------------------------

    def handle_decl(self, decl: str) -> None:
        if not self._skip and decl.lower().startswith("doctype") and not self.out:
            self.out.append(f"<!{decl}>")
        self._head()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._start(tag, attrs, close=False)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._start(tag, attrs, close=True)

    def _start(self, tag: str, attrs: list, close: bool) -> None:
        self._head()
        if self._skip:
            if tag == self._skip[-1] and not close:
                self._skip.append(tag)
            return
        if tag in _DROP_WITH_CONTENT:
            if tag == "script":
                self.scripts += 1
            else:
                self._block(f"<{tag}>")
            if not close:
                self._skip.append(tag)
            return
        if tag in _DROP_TAG:
            href = dict(attrs).get("href")
            if href:
                self._block(href)
            return
        if tag == "meta":
            names = {n.lower() for n, _ in attrs}
            if "http-equiv" in names or "charset" in names:
                return  # refresh, CSP, content-type: ours lead the document
        self.out.append(self._tag(tag, attrs, close))
        if tag == "style" and not close:
            self._in_style = True
        if tag == "body" and not self._body_seen:
            self._body_seen = True
            self.out.append("\x00BANNER\x00")

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            return
        if tag in _DROP_WITH_CONTENT or tag in _DROP_TAG:
            return
        if tag == "style":
            self._in_style = False
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        self._head()
        if not self._skip:
            self.out.append(self._css(data) if self._in_style else data)

    def handle_entityref(self, name: str) -> None:
        if not self._skip:
            self.out.append(f"&{name};")

    def handle_charref(self, name: str) -> None:
        if not self._skip:
            self.out.append(f"&#{name};")

    def handle_comment(self, data: str) -> None:
        pass  # conditional comments for Outlook and the like render as nothing in a browser

    def unknown_decl(self, data: str) -> None:
        pass

    def handle_pi(self, data: str) -> None:
        pass


def _banner(blocked: list[str], scripts: int) -> str:
    parts = ["Offline preview by mailproof"]
    if scripts:
        parts.append(f"{scripts} script{'s' if scripts != 1 else ''} removed")
    if blocked:
        parts.append(f"{len(blocked)} remote reference{'s' if len(blocked) != 1 else ''} blocked "
                     "(see the HTML body attachment)")
    return ('<div data-mailproof-banner="1" style="font:12px/1.6 system-ui,sans-serif;color:#52606d;'
            'background:#f4f6f8;border-bottom:1px solid #d9dee3;padding:2px 8px;margin:0 0 4px 0">'
            + html.escape(" · ".join(parts)) + "</div>")


def safe_preview(markup: str, images: Iterable[tuple[Optional[str], str, bytes]] = ()) -> Preview:
    """The static, offline version of an email's HTML body (see the module docstring)."""
    parser = _Rewriter()
    parser.feed(inline_cid_images(markup, images))
    parser.close()
    parser._head()
    banner = _banner(parser.blocked, parser.scripts)
    text = "".join(parser.out)
    if "\x00BANNER\x00" in text:
        text = text.replace("\x00BANNER\x00", banner, 1)
    else:  # no <body> tag: the banner opens the body the browser infers
        marker = '<meta name="referrer" content="no-referrer">'
        at = text.find(marker) + len(marker)
        text = text[:at] + banner + text[at:]
    return Preview(html=text, blocked=parser.blocked, scripts_removed=parser.scripts)
