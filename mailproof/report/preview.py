"""An email's HTML body made safe to show in a report: no script runs, nothing loads from afar.

Allure 3 shows an HTML attachment through DOMPurify, in an iframe sandboxed without scripts.
That removes scripts, but it also removes any ``<iframe>`` and ``http-equiv`` meta we could
add (so neither a sandboxed srcdoc frame nor a Content-Security-Policy survives there), and it
keeps remote images and stylesheets, which would load (tracking pixels fire) when QA opens the
report. So the preview is made static here, before it is attached, and must hold on its own:

- The markup goes through nh3 (the Rust ammonia sanitizer, on the html5ever parser: it parses
  as a browser does, then serializes a clean tree) with an explicit allow-list of email-layout
  tags and attributes (``_TAGS``, ``_ATTRIBUTES``). Everything else goes: scripts, ``<style>``
  blocks, ``<meta>``, ``<base>``, ``<link>``, forms and their controls, frames, objects, embeds,
  media, SVG and MathML (with their whole content), comments, event handlers.
- URLs: an ``<img src>`` stays only as ``data:image/(png|gif|jpeg|webp)``; ``cid:`` images are
  inlined as such first (``inline_cid_images``). Links (``<a href>``) are made inert: the href
  is removed and its target (http, https, mailto, tel) is shown as text after the link text.
  No other attribute may hold a URL at all.
- CSS: ``<style>`` blocks are dropped, not rewritten: their selectors reach the whole preview,
  banner included (they could hide or fake it), and a stylesheet is where every CSS loading
  feature lives (``@import``, ``@font-face``, nested rules). ``style=`` attributes are kept,
  rewritten through tinycss2 (a real CSS tokenizer: ``u\\72l(`` is a ``url`` token to it, an
  unclosed ``url(`` too): only properties of ``_STYLE_PROPERTIES``, and only values made of
  keywords, numbers, lengths, colours, ``rgb()``/``hsl()``/``calc()`` (strings for font
  names). So no url, image-set, var() or any other function survives, nor ``position``.
- The output is checked once more (``_verify``): a tag, attribute, URL or style that should not
  be there makes the preview text-only rather than risky.
- A Content-Security-Policy meta (``PREVIEW_CSP``) leads the document, as defense in depth, for
  the attachment opened on its own (a new tab, the file in allure-results).
- A banner says how many scripts were removed and remote references blocked, so a missing
  image is not mistaken for a bug. It is counted (``_Census``) on the email as the browser would
  parse it: nh3 parses and re-serializes it keeping every element and attribute, and only that
  canonical markup is read back (no second parse of the raw mail to disagree with the first):
  scripts are ``<script>`` elements, event-handler attributes, ``javascript:`` URLs and CSS
  ``expression()``; remote references are the URLs that would have loaded something or
  navigated (attributes such as src, srcset, background, poster, data, ``<link>``/``<base>``
  href, form actions, pings, meta refresh; CSS ``url()``, ``@import``, ``image-set()``
  strings), whether they point to the Internet or are relative. Links are not counted (their
  target is shown); nor are ``data:`` images, nor ``cid:`` images the message does not carry.
"""

from __future__ import annotations

import base64
import html
import re
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Iterable, Optional

from mailproof.extras import require

nh3 = require("nh3", "the email preview in Allure reports")
tinycss2 = require("tinycss2", "the email preview in Allure reports")

PREVIEW_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
               "form-action 'none'; base-uri 'none'")
INLINE_IMAGE_LIMIT = 2_000_000  # bytes of cid: images inlined per email
LINK_TARGET_SHOWN = 200  # characters of a link's target shown after its text

# -- the allow-lists --------------------------------------------------------------------------------

_TAGS = frozenset({
    "a", "abbr", "acronym", "address", "article", "aside", "b", "bdi", "bdo", "big", "blockquote", "br",
    "caption", "center", "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em",
    "figcaption", "figure", "font", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "i", "img",
    "ins", "kbd", "li", "main", "mark", "nav", "ol", "p", "pre", "q", "rp", "rt", "ruby", "s", "samp",
    "section", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th",
    "thead", "time", "tr", "tt", "u", "ul", "var", "wbr",
})
# Removed with everything inside (other tags not allowed lose the tag, keep their text).
_DROP_WITH_CONTENT = frozenset({
    "script", "style", "title", "noscript", "template", "iframe", "frame", "frameset", "noframes", "noembed",
    "object", "embed", "applet", "svg", "math", "xmp", "textarea", "select", "datalist", "audio", "video",
    "canvas", "portal", "fencedframe",
})
_GENERIC_ATTRIBUTES = frozenset({"align", "valign", "dir", "lang", "title", "style"})
_ATTRIBUTES = {
    "*": set(_GENERIC_ATTRIBUTES),
    "a": {"href"},
    "img": {"src", "alt", "width", "height", "border", "hspace", "vspace"},
    "table": {"width", "height", "border", "cellpadding", "cellspacing", "bgcolor", "frame", "rules", "summary"},
    "tr": {"bgcolor", "height"},
    "thead": {"bgcolor"}, "tbody": {"bgcolor"}, "tfoot": {"bgcolor"},
    "td": {"width", "height", "bgcolor", "colspan", "rowspan", "nowrap", "scope", "abbr"},
    "th": {"width", "height", "bgcolor", "colspan", "rowspan", "nowrap", "scope", "abbr"},
    "col": {"span", "width"}, "colgroup": {"span", "width"},
    "font": {"color", "face", "size"},
    "ol": {"start", "type", "reversed"}, "ul": {"type"}, "li": {"value", "type"},
    "hr": {"width", "size", "noshade", "color"},
    "time": {"datetime"}, "del": {"datetime"}, "ins": {"datetime"},
}
_DATA_IMAGE = re.compile(r"data:image/(png|gif|jpeg|webp)[;,]", re.I)
_INLINE_TYPES = {"image/png": "image/png", "image/gif": "image/gif", "image/jpeg": "image/jpeg",
                 "image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/webp": "image/webp"}
_SHOWN_LINK = re.compile(r"(https?|mailto|tel):", re.I)
_URL_IN_TEXT = re.compile(r"https?:|//|\\\\", re.I)  # no attribute of the output holds a URL

# CSS: properties that cannot load anything whatever their value, with values checked anyway.
_STYLE_PROPERTIES = frozenset({
    "color", "background-color", "background", "opacity",
    "font", "font-family", "font-size", "font-style", "font-weight", "font-variant", "line-height",
    "letter-spacing", "word-spacing", "text-align", "text-decoration", "text-decoration-line",
    "text-decoration-color", "text-decoration-style", "text-transform", "text-indent", "text-overflow",
    "vertical-align", "white-space", "word-break", "word-wrap", "overflow-wrap", "direction",
    "width", "min-width", "max-width", "height", "min-height", "max-height",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
    "border", "border-top", "border-right", "border-bottom", "border-left",
    "border-width", "border-style", "border-color", "border-radius",
    *(f"border-{side}-{what}" for side in ("top", "right", "bottom", "left") for what in ("width", "style", "color")),
    *(f"border-{corner}-radius" for corner in ("top-left", "top-right", "bottom-left", "bottom-right")),
    "border-collapse", "border-spacing", "table-layout", "caption-side", "empty-cells",
    "display", "visibility", "float", "clear", "overflow", "overflow-x", "overflow-y", "box-sizing",
    "list-style", "list-style-type", "list-style-position",
})
_STRING_PROPERTIES = frozenset({"font", "font-family"})  # font names may be quoted
_STYLE_FUNCTIONS = frozenset({"rgb", "rgba", "hsl", "hsla", "calc"})
_STYLE_TOKENS = frozenset({"whitespace", "ident", "number", "percentage", "dimension", "hash"})
_STYLE_LITERALS = frozenset({",", "/", "+", "-", "*"})


@dataclass
class Preview:
    html: str
    blocked: list[str] = field(default_factory=list)  # the remote references removed, as "<tag attr> url"
    scripts_removed: int = 0


def inline_cid_images(markup: str, images: Iterable[tuple[Optional[str], str, bytes]]) -> str:
    """Replace ``cid:ID`` with a data: URI for each (content_id, content_type, data) image.

    Only PNG, GIF, JPEG and WebP are inlined (not SVG), up to ``INLINE_IMAGE_LIMIT`` bytes in all.
    """
    budget = INLINE_IMAGE_LIMIT
    for content_id, content_type, data in images:
        kind = _INLINE_TYPES.get((content_type or "").split(";")[0].strip().lower())
        if not content_id or kind is None or len(data) > budget:
            continue
        cid = content_id.strip().strip("<>")
        if not cid or f"cid:{cid}" not in markup:
            continue
        budget -= len(data)
        markup = markup.replace(f"cid:{cid}", f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}")
    return markup


# -- CSS ------------------------------------------------------------------------------------------


def _style_value_ok(tokens: list, strings: bool) -> bool:
    for token in tokens:
        kind = token.type
        if kind in _STYLE_TOKENS or (kind == "literal" and token.value in _STYLE_LITERALS) \
                or (kind == "string" and strings):
            continue
        if kind == "function" and token.lower_name in _STYLE_FUNCTIONS and _style_value_ok(token.arguments, False):
            continue
        return False  # url, any other function, a block, an at-keyword, a bad token...
    return True


def clean_style(css: str) -> str:
    """A ``style=`` attribute reduced to allowed properties with values that cannot load anything."""
    kept = []
    for item in tinycss2.parse_blocks_contents(css, skip_comments=True, skip_whitespace=True):
        if item.type != "declaration" or item.lower_name not in _STYLE_PROPERTIES:
            continue
        if not _style_value_ok(item.value, item.lower_name in _STRING_PROPERTIES):
            continue
        value = tinycss2.serialize(item.value).strip()
        if value:
            kept.append(f"{item.lower_name}:{value}{' !important' if item.important else ''}")
    return ";".join(kept)


# -- the census: what the email would have loaded or run --------------------------------------------

_HTML_ELEMENTS = (
    "a abbr acronym address applet area article aside audio b base basefont bdi bdo bgsound big blink blockquote "
    "body br button canvas caption center cite code col colgroup data datalist dd del details dfn dialog dir div "
    "dl dt em embed fencedframe fieldset figcaption figure font footer form frame frameset h1 h2 h3 h4 h5 h6 head "
    "header hgroup hr html i iframe image img input ins isindex kbd keygen label legend li link listing main map "
    "mark marquee menu menuitem meta meter multicol nav nextid nobr noembed noframes noscript object ol optgroup "
    "option output p param picture plaintext portal pre progress q rb rp rt rtc ruby s samp script search section "
    "select selectedcontent slot small source spacer span strike strong style sub summary sup table tbody td "
    "template textarea tfoot th thead time title tr track tt u ul var video wbr xmp")
_SVG_ELEMENTS = (
    "altGlyph altGlyphDef altGlyphItem animate animateColor animateMotion animateTransform circle clipPath cursor "
    "defs desc discard ellipse feBlend feColorMatrix feComponentTransfer feComposite feConvolveMatrix "
    "feDiffuseLighting feDisplacementMap feDistantLight feDropShadow feFlood feFuncA feFuncB feFuncG feFuncR "
    "feGaussianBlur feImage feMerge feMergeNode feMorphology feOffset fePointLight feSpecularLighting feSpotLight "
    "feTile feTurbulence filter font-face foreignObject g glyphRef hatch line linearGradient marker mask metadata "
    "mpath path pattern polygon polyline radialGradient rect set stop svg switch symbol text textPath tref tspan "
    "use view")
_MATHML_ELEMENTS = (
    "math maction annotation annotation-xml menclose merror mfenced mfrac mglyph mi mlabeledtr mmultiscripts mn "
    "mo mover mpadded mphantom mprescripts mroot mrow ms mspace msqrt mstyle msub msubsup msup mtable mtd mtext "
    "mtr munder munderover none semantics")
_KNOWN_ELEMENTS = frozenset(f"{_HTML_ELEMENTS} {_SVG_ELEMENTS} {_MATHML_ELEMENTS}".split())
_TAG_NAME = re.compile(r"<([A-Za-z][^\t\n\f\r />]*)")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_KNOWN_SCHEMES = frozenset(
    "http https ftp ftps file data blob filesystem javascript vbscript livescript mocha jar view-source about "
    "chrome chrome-extension ws wss mhtml ms-its res cid mid mailto tel sms feed intent smb".split())
# The census parses a fragment, as nh3 does: that ignores <body>'s attributes (onload, background)
# and <frameset>/<frame>, and nh3 never shows a <template>'s content (a declarative shadow root
# renders). So those tags are renamed for the census, to elements it sees like any other.
_RENAMED = re.compile(r"<(/?)(body|frameset|frame|template)(?=[\t\n\f\r />])", re.I)
_RENAMED_PREFIX = "mailproof-"
_FOREIGN_TAG = re.compile(r"<(/?)(%s)(?=[\t\n\f\r />])" % "|".join(
    sorted({*_SVG_ELEMENTS.split(), *_MATHML_ELEMENTS.split()} - set(_HTML_ELEMENTS.split()), key=len, reverse=True)
    + ["svg", "math"]), re.I)

_SCRIPT_SCHEME = re.compile(r"(javascript|vbscript|livescript|mocha):", re.I)
_TEXT_ATTRIBUTES = frozenset({"alt", "title", "value", "placeholder", "label", "summary", "content", "name"})
_LOAD_SRC = frozenset({"img", "image", "input", "iframe", "frame", "embed", "video", "audio", "source", "track"})
_LOAD_ANYWHERE = frozenset({"background", "lowsrc", "dynsrc", "xlink:href", "formaction"})
_SRCSET = frozenset({"srcset", "imagesrcset"})
_LINKS = frozenset({"a", "area"})
_FOREIGN = frozenset({"svg", "math"})
_URL_SPACE = re.compile(r"[\t\n\r]")
_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\"]*)", re.I)


def _url(value: str) -> str:
    """A URL as the browser's parser sees it: C0 controls and spaces trimmed, tabs and newlines removed."""
    return _URL_SPACE.sub("", value.strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12"
                                           "\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f \t\n\r"))


def _loads(value: str) -> bool:
    """Whether a URL in a loading position would fetch something from outside the message."""
    url = _url(value)
    if not url or url.startswith("#") or url.lower().startswith("cid:"):
        return False
    return not _DATA_IMAGE.match(url)


def _srcset_urls(value: str) -> list[str]:
    return [candidate.split()[0] for candidate in value.split(",") if candidate.split()]


class _Census(HTMLParser):
    """Counts what markup would run or load. Fed with html5ever's serialization (see ``_census``)."""

    def __init__(self, depth: int = 0) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = depth
        self.blocked: list[str] = []
        self.scripts = 0
        self._foreign = 0
        self._style: Optional[list[str]] = None
        self._templates: list[bool] = []  # for each open <template>: whether its content is inert
        self._inert_templates = 0

    def _block(self, what: str, url: str) -> None:
        self.blocked.append(f"{what} {url.strip()}"[:300])

    # CSS: every url token, url()/src() function, image-set() string and @import target.
    def css(self, css: str, where: str, attribute: bool) -> None:
        nodes = tinycss2.parse_blocks_contents(css) if attribute else tinycss2.parse_stylesheet(css)
        self._css_walk(nodes, where)

    def _css_walk(self, nodes: Iterable, where: str) -> None:
        for node in nodes:
            kind = getattr(node, "type", None)
            if kind == "url" and _loads(node.value):
                self._block(f"{where} url()", node.value)
            elif kind == "function":
                name = node.lower_name
                if name in ("url", "src"):
                    for arg in node.arguments:
                        if arg.type == "string" and _loads(arg.value):
                            self._block(f"{where} {name}()", arg.value)
                elif name in ("image-set", "-webkit-image-set", "image", "cross-fade", "-webkit-cross-fade"):
                    for arg in node.arguments:
                        if arg.type == "string" and _loads(arg.value):
                            self._block(f"{where} {name}()", arg.value)
                elif name == "expression":
                    self.scripts += 1
                self._css_walk(node.arguments, where)
            elif kind == "at-rule":
                if node.lower_at_keyword == "import":
                    target = next((t for t in node.prelude if t.type in ("string", "url", "function")), None)
                    if target is not None and target.type == "string" and _loads(target.value):
                        self._block(f"{where} @import", target.value)
                self._css_walk(node.prelude, where)
                self._css_walk(node.content or (), where)
            elif kind == "declaration":
                self._css_walk(node.value, where)
            elif kind == "qualified-rule":
                self._css_walk(node.prelude, where)
                self._css_walk(node.content, where)
            elif kind in ("() block", "[] block", "{} block"):
                self._css_walk(node.content, where)

    def _element(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if self._inert_templates:
            return  # a <template>'s content is inert (unless it is a shadow root)
        if tag == "script":
            self.scripts += 1
        values = {name: value or "" for name, value in attrs}
        for name, value in values.items():
            where = f"<{tag} {name}>"
            if name.startswith("on"):
                self.scripts += 1
            elif name not in _TEXT_ATTRIBUTES and not name.startswith(("data-", "aria-")) \
                    and _SCRIPT_SCHEME.match(_url(value)):
                self.scripts += 1
            elif name == "style":
                self.css(value, where, attribute=True)
            elif name == "srcdoc" and self.depth < 3:
                inner = _census(value, self.depth + 1)
                self.scripts += inner.scripts
                self.blocked.extend(f"{where} {b}"[:300] for b in inner.blocked)
            elif tag == "script":
                continue  # counted as a script already
            elif name in _SRCSET:
                self.blocked.extend(f"{where} {u}"[:300] for u in _srcset_urls(value) if _loads(u))
            elif (name == "src" and tag in _LOAD_SRC) or name in _LOAD_ANYWHERE \
                    or (name == "href" and tag not in _LINKS) or (name == "ping" and tag in _LINKS) \
                    or (name == "poster" and tag == "video") or (name == "action" and tag in ("form", "isindex")) \
                    or (name in ("data", "codebase", "archive") and tag in ("object", "applet")) \
                    or (name == "code" and tag == "applet"):
                urls = value.split() if name == "ping" else [value]
                self.blocked.extend(f"{where} {u}"[:300] for u in urls if _loads(u))
            elif "url" in value.lower() and name not in _TEXT_ATTRIBUTES:  # SVG fill="url(...)" and the like
                self._css_walk(tinycss2.parse_component_value_list(value), where)
        if tag == "meta" and values.get("http-equiv", "").strip().lower() == "refresh":
            target = _REFRESH_URL.search(values.get("content", ""))
            self._block("<meta refresh>", target.group(1) if target else "(reload)")

    def handle_starttag(self, tag: str, attrs: list) -> None:
        tag = tag.removeprefix(_RENAMED_PREFIX)
        if tag == "template":
            shadow = any(name == "shadowrootmode" for name, _ in attrs)
            self._templates.append(not shadow)
            self._inert_templates += not shadow
        self._element(tag, attrs)
        if tag in _FOREIGN:
            self._foreign += 1
        if tag == "style":
            self._style = []

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._element(tag.removeprefix(_RENAMED_PREFIX), attrs)

    def handle_endtag(self, tag: str) -> None:
        tag = tag.removeprefix(_RENAMED_PREFIX)
        if tag == "template" and self._templates:
            self._inert_templates -= self._templates.pop()
        if tag in _FOREIGN and self._foreign:
            self._foreign -= 1
        if tag == "style" and self._style is not None:
            css = "".join(self._style)
            self._style = None
            # In SVG and MathML a <style>'s text is parsed, not raw: its serialization is escaped.
            self.css(html.unescape(css) if self._foreign else css, "<style>", attribute=False)

    def handle_data(self, data: str) -> None:
        if self._style is not None:
            self._style.append(data)

    def close(self) -> None:
        super().close()
        if self._style is not None:
            self.handle_endtag("style")


def _census(markup: str, depth: int = 0) -> _Census:
    """What the markup would run or load, parsed as a browser would (html5ever, everything kept).

    nh3 drops the subtrees it finds in a namespace a second parse would not give them (its
    protection against mXSS), and SVG or MathML elements in HTML, so when the markup has any,
    it is also counted with them taken as plain HTML elements (renamed); the larger count is
    kept (it may overstate an oddity, never miss one).
    """
    rename = lambda m: f"<{m.group(1)}{_RENAMED_PREFIX}{m.group(2).lower()}"  # noqa: E731
    markup = _RENAMED.sub(rename, markup)
    schemes = {s.lower() for s in _SCHEME.findall(_URL_SPACE.sub("", html.unescape(markup)))}
    counts = []
    for text in (markup, _FOREIGN_TAG.sub(rename, markup)):
        names = {n.replace("\0", "\ufffd") for name in _TAG_NAME.findall(text) for n in (name, name.lower())}
        canonical = nh3.clean(text, tags=set(_KNOWN_ELEMENTS | names), clean_content_tags=set(),
                              attributes={}, generic_attribute_prefixes={""}, url_schemes=set(_KNOWN_SCHEMES | schemes),
                              link_rel=None, strip_comments=True)
        census = _Census(depth)
        census.feed(canonical)
        census.close()
        counts.append(census)
        if not _FOREIGN_TAG.search(markup):
            break
    best = max(counts, key=lambda c: len(c.blocked))
    best.scripts = max(c.scripts for c in counts)
    return best


# -- the sanitizer ------------------------------------------------------------------------------


class _Links:
    """Link targets, replaced during sanitization by placeholders only this call can know."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.targets: list[str] = []

    def placeholder(self, target: str) -> str:
        self.targets.append(target)
        return f"#mailproof-link-{self.nonce}-{len(self.targets) - 1}"

    def render(self, fragment: str) -> str:
        """Drop each placeholder href; show its target as text at the end of the link.

        nh3's serialization escapes ``<`` in text and attribute values, and links do not nest,
        so the first ``</a>`` after a placeholder closes its link.
        """
        placeholder = re.compile(rf'href="#mailproof-link-{self.nonce}-(\d+)"')
        out: list[str] = []
        pending: Optional[str] = None
        at = 0
        for found in placeholder.finditer(fragment):
            out.append(self._close(fragment[at:found.start()], pending))
            out.append('data-mailproof-link=""')
            pending = self.targets[int(found.group(1))]
            at = found.end()
        out.append(self._close(fragment[at:], pending))
        return "".join(out)

    @staticmethod
    def _close(segment: str, target: Optional[str]) -> str:
        end = segment.find("</a>")
        if target is None or end < 0:
            return segment
        shown = target if len(target) <= LINK_TARGET_SHOWN else target[:LINK_TARGET_SHOWN] + "…"
        return (segment[:end] + ' <span data-mailproof-link-target="" style="color:#1a5fb4;font-size:0.85em">['
                + html.escape(shown) + "]</span>" + segment[end:])


def _attribute_filter(links: _Links):
    def keep(tag: str, name: str, value: str) -> Optional[str]:
        if name == "style":
            return clean_style(value) or None
        if tag == "img" and name == "src":
            return value.strip() if _DATA_IMAGE.match(value.strip()) else None
        if tag == "a" and name == "href":
            target = _url(value)
            return links.placeholder(target) if _SHOWN_LINK.match(target) else None
        if _URL_IN_TEXT.search(value):
            return None  # a title or alt holding a URL (or markup smuggling one): nothing needs it
        return value
    return keep


_MARKS = {"a": {"data-mailproof-link"}, "span": {"data-mailproof-link-target"}}  # added by _Links.render


class _Verifier(HTMLParser):
    """Re-reads the sanitized fragment: any tag, attribute, URL or style outside the allow-lists is a fault."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.faults: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in _TAGS:
            self.faults.append(f"<{tag}>")
        for name, value in attrs:
            value = value or ""
            allowed = _ATTRIBUTES["*"] | _ATTRIBUTES.get(tag, set()) | _MARKS.get(tag, set())
            if name not in allowed or name == "href":
                self.faults.append(f"<{tag} {name}>")
            elif name == "src":
                if not _DATA_IMAGE.match(value):
                    self.faults.append(f"<{tag} src>")
            elif name == "style":
                for item in tinycss2.parse_blocks_contents(value, skip_comments=True, skip_whitespace=True):
                    if item.type != "declaration" or item.lower_name not in _STYLE_PROPERTIES \
                            or not _style_value_ok(item.value, item.lower_name in _STRING_PROPERTIES):
                        self.faults.append(f"<{tag} style> {tinycss2.serialize([item])}")
            elif _URL_IN_TEXT.search(value):
                self.faults.append(f"<{tag} {name}>")

    handle_startendtag = handle_starttag


def _verify(fragment: str) -> list[str]:
    verifier = _Verifier()
    verifier.feed(fragment)
    verifier.close()
    census = _census(fragment)
    return verifier.faults + census.blocked + ["script"] * census.scripts


def _banner(blocked: list[str], scripts: int, note: str = "") -> str:
    parts = ["Offline preview by mailproof"]
    if scripts:
        parts.append(f"{scripts} script{'s' if scripts != 1 else ''} removed")
    if blocked:
        parts.append(f"{len(blocked)} remote reference{'s' if len(blocked) != 1 else ''} blocked "
                     "(see the HTML body attachment)")
    if note:
        parts.append(note)
    # Positioned with a z-index: nothing of the email (which cannot be positioned) paints over it.
    return ('<div data-mailproof-banner="1" style="position:relative;z-index:2147483647;'
            'font:12px/1.6 system-ui,sans-serif;color:#52606d;background:#f4f6f8;border-bottom:1px solid #d9dee3;'
            'padding:2px 8px;margin:0 0 4px 0">' + html.escape(" · ".join(parts)) + "</div>")


def _document(body: str) -> str:
    return ('<!doctype html><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{PREVIEW_CSP}">'
            '<meta name="referrer" content="no-referrer"><body>' + body + "</body>")


def safe_preview(markup: str, images: Iterable[tuple[Optional[str], str, bytes]] = ()) -> Preview:
    """The static, offline version of an email's HTML body (see the module docstring)."""
    markup = inline_cid_images(markup, images)
    census = _census(markup)
    links = _Links()
    fragment = nh3.clean(markup, tags=set(_TAGS), clean_content_tags=set(_DROP_WITH_CONTENT),
                         attributes={tag: set(names) for tag, names in _ATTRIBUTES.items()},
                         attribute_filter=_attribute_filter(links), url_schemes={"http", "https", "mailto", "tel", "data"},
                         link_rel=None, strip_comments=True)
    fragment = links.render(fragment)
    faults = _verify(fragment)
    note = ""
    if faults:  # not expected: the allow-lists above should make this impossible
        fragment = '<pre style="white-space:pre-wrap">' + nh3.clean(markup, tags=set(), clean_content_tags=set(_DROP_WITH_CONTENT)) + "</pre>"
        note = "shown as text only (the sanitized markup failed its own check)"
    body = (_banner(census.blocked, census.scripts, note)
            + '<div data-mailproof-email="" style="position:relative;z-index:0">' + fragment + "</div>")
    return Preview(html=_document(body), blocked=census.blocked, scripts_removed=census.scripts)
