"""The email preview against a corpus of hostile HTML (tests/hostile_html/), in Python and in Chromium.

Each vector is one file; its remote loads point at ``{{url}}`` (``http://127.0.0.1:<beacon>/<mode>/<id>``),
its scripts run ``{{js}}``, which marks every document up to the top one with
``data-pwned-<mode>--<id>`` and requests ``{{url}}/script``. ``inert.txt`` lists the vectors that
do nothing in Chromium even unsanitized (they need a click, or an old browser) with the reason.

The browser test serves every vector from a local beacon server, which records every request,
and opens them all in one headless Chromium run (``--dump-dom`` of one page that frames each
vector in each mode; ``--virtual-time-budget`` lets refreshes and animations happen):

- ``raw``: the vectors as sent, as a control: each vector not listed inert must hit the beacon,
  run its script or navigate (so a 0 below means something); ``noscript--`` ones in a frame
  sandboxed without scripts (as Allure's), where ``<noscript>`` content renders;
- ``allure``: the preview without its CSP meta, in an iframe sandboxed without scripts, as Allure
  shows it (where ``<noscript>`` content renders);
- ``nocsp``: the preview without its CSP meta, scripts allowed (a script left in would run);
- ``csp``: the preview as attached, CSP meta included.

For the three preview modes: no beacon request, no script run, no navigation (each frame is
still the preview document it was given, loaded once, banner included).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tinycss2

from mailproof.report.preview import PREVIEW_CSP, safe_preview

CORPUS = Path(__file__).resolve().parent / "hostile_html"
VECTORS = {path.stem: path.read_text(encoding="utf-8") for path in sorted(CORPUS.glob("*.html"))}
INERT = {line.split("#", 1)[0].strip(): line.split("#", 1)[1].strip()
         for line in (CORPUS / "inert.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
# No spaces, no quotes, no < & %: the same payload works in a <script>, any attribute and a javascript: URL.
PAYLOAD = ("(function(){try{for(w=window;;w=w.parent){w.document.documentElement.setAttribute(`data-pwned-{{mark}}`,1);"
           "if(w==w.parent)break}}catch(e){}document.createElement(`img`).src=`{{url}}/script`})()")
CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{PREVIEW_CSP}">'
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")
CONTROL = "raw"
PREVIEWS = ("allure", "nocsp", "csp")
MODES = (CONTROL, *PREVIEWS)
SANDBOXED_CLASSES = {"noscript"}  # unsanitized, these show only where scripting is off (as in Allure)
ALLOWED_STYLE_FUNCTIONS = {"rgb", "rgba", "hsl", "hsla", "calc"}
DATA_IMAGE = re.compile(r"data:image/(png|gif|jpeg|webp)[;,]", re.I)


def fill(markup: str, mode: str, vector: str, port: int) -> str:
    url = f"http://127.0.0.1:{port}/{mode}/{vector}"
    return (markup.replace("{{js}}", PAYLOAD).replace("{{mark}}", f"{mode}--{vector}").replace("{{url}}", url)
            .replace("{{host}}", f"127.0.0.1:{port}").replace("{{path}}", f"/{mode}/{vector}"))


def test_the_corpus_is_complete():
    assert len(VECTORS) >= 60
    assert set(INERT) <= set(VECTORS), set(INERT) - set(VECTORS)
    for name, markup in VECTORS.items():
        assert re.fullmatch(r"[a-z0-9]+--[a-z0-9-]+", name), name  # <class>--<what>: a URL path segment


# -- in Python: what comes out of safe_preview ------------------------------------------------------


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    handle_startendtag = handle_starttag


def elements(markup: str) -> list[tuple[str, dict[str, str]]]:
    parser = Elements()
    parser.feed(markup)
    parser.close()
    return parser.elements


def own_head(out: str) -> str:
    """The preview without the head it always starts with (our metas) and its banner."""
    head = '<!doctype html><meta charset="utf-8">' + CSP_META + '<meta name="referrer" content="no-referrer"><body>'
    assert out.startswith(head), out[:400]
    body = out[len(head):]
    assert body.startswith("<div data-mailproof-banner="), body[:200]
    return body[body.index("</div>") + 6:]


def style_problems(css: str) -> list[str]:
    problems = []

    def walk(tokens):
        for token in tokens:
            if token.type == "url" or token.type in ("() block", "[] block", "{} block", "at-keyword"):
                problems.append(token.type)
            elif token.type == "function":
                if token.lower_name not in ALLOWED_STYLE_FUNCTIONS:
                    problems.append(f"{token.lower_name}()")
                walk(token.arguments)
    for item in tinycss2.parse_blocks_contents(css):
        walk(item.value if item.type == "declaration" else getattr(item, "prelude", []) or [item])
    if re.search(r"https?:|//|\\", css, re.I):
        problems.append("a URL or an escape")
    return problems


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_no_url_survives_in_any_attribute_or_style(name):
    preview = safe_preview(fill(VECTORS[name], "py", name, 9))
    body = own_head(preview.html)
    for tag, attrs in elements(body):
        assert tag not in {"script", "style", "meta", "base", "link", "iframe", "frame", "object", "embed", "form",
                           "input", "button", "svg", "math", "image", "video", "audio", "source", "picture",
                           "template", "noscript", "applet", "frameset", "use", "textarea", "select"}, (tag, body)
        for attr, value in attrs.items():
            assert not attr.startswith("on") and attr not in {"href", "srcset", "background", "poster", "ping",
                                                              "action", "formaction", "lowsrc", "dynsrc", "data"}, (tag, attr)
            if (tag, attr) == ("img", "src"):
                assert DATA_IMAGE.match(value), (tag, attr, value)
            else:
                assert not re.search(r"https?:|//|javascript:", value, re.I), (tag, attr, value)
            if attr == "style":
                assert not style_problems(value), (value, style_problems(value))
    if name not in INERT:  # the banner tells QA something was taken out
        assert preview.blocked or preview.scripts_removed, (name, preview)


def test_a_plain_email_keeps_its_layout_images_and_link_targets():
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")
    email = """<html><head><style>.x{color:red}</style></head><body>
<table width="600" cellpadding="4" bgcolor="#ffffff" style="border-collapse:collapse;font-family:'Helvetica Neue',Arial">
<tr><td style="padding:8px 12px;color:#333;background-color:rgb(244,246,248);text-align:center" colspan="2">
<img src="cid:logo@shop" alt="Shop" width="120" height="40"> <b>Hello</b> <i>Ada</i></td></tr>
<tr><td>Total</td><td align="right"><strong>45.00 EUR</strong></td></tr></table>
<p>See <a href="https://shop.invalid/orders/1" target="_blank" style="color:#06c">your order</a>
or write to <a href="mailto:help@shop.invalid">us</a>.</p><ul><li>one</li></ul></body></html>"""
    preview = safe_preview(email, [("<logo@shop>", "image/png", png)])
    body = own_head(preview.html)
    assert preview.blocked == [] and preview.scripts_removed == 0
    assert "Offline preview by mailproof</div>" in preview.html  # nothing to report
    assert '<table width="600" cellpadding="4" bgcolor="#ffffff" ' in body
    assert 'style="border-collapse:collapse;font-family:&quot;Helvetica Neue&quot;,Arial"' in body
    assert 'style="padding:8px 12px;color:#333;background-color:rgb(244,246,248);text-align:center"' in body
    assert '<img src="data:image/png;base64,' in body and 'alt="Shop" width="120" height="40"' in body
    assert "<b>Hello</b> <i>Ada</i>" in body and "<strong>45.00 EUR</strong>" in body and "<li>one</li>" in body
    # Links are inert, their target shown after their text.
    assert "href=" not in body and not re.search(r"\starget=", body)
    assert "your order <span data-mailproof-link-target" in body and "[https://shop.invalid/orders/1]</span></a>" in body
    assert "[mailto:help@shop.invalid]" in body
    assert ".x{color" not in body


def test_the_banner_counts_what_was_removed():
    email = """<!doctype html><html><head><style>.hero { background: url(https://cdn.invalid/hero.jpg) }</style>
<link rel="stylesheet" href="https://cdn.invalid/shop.css"></head><body>
<img src="https://tracker.invalid/pixel.gif?u=ada" width="1" height="1"><a href="https://shop.invalid/o/1">order</a>
<script>document.title = 'PWNED'</script><img src="x" onerror="document.title = 'PWNED'">
<p style="background:u\\72l(https://cdn.invalid/e.png)">escaped</p></body></html>"""
    preview = safe_preview(email)
    assert preview.scripts_removed == 2
    assert [b.split()[-1] for b in preview.blocked] == [
        "https://cdn.invalid/hero.jpg", "https://cdn.invalid/shop.css", "https://tracker.invalid/pixel.gif?u=ada",
        "x", "https://cdn.invalid/e.png"], preview.blocked
    assert "2 scripts removed · 5 remote references blocked" in preview.html


def test_style_attributes_keep_only_what_cannot_load():
    from mailproof.report.preview import clean_style

    assert clean_style("color: red; position: fixed; top: 0") == "color:red"
    assert clean_style("background: #fff url(https://x.invalid/a.png); background-color: #fff") == "background-color:#fff"
    assert clean_style(r"co\6c or: blue; width: calc(100% - 2px) !important") == "color:blue;width:calc(100% - 2px) !important"
    assert clean_style("font-family: 'Open Sans', sans-serif; content: 'x'") == 'font-family:"Open Sans", sans-serif'
    assert clean_style("background: image-set('https://x.invalid/a.png' 1x); color: var(--x)") == ""
    assert clean_style("width: expression(alert(1)); behavior: url(x.htc); -moz-binding: url(x)") == ""
    assert clean_style("color: red; }</style><script>") == "color:red"


# -- in Chromium: the beacon ------------------------------------------------------------------------


class Beacon(ThreadingHTTPServer):
    """Serves the pages it is given; answers and records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), BeaconHandler)
        self.pages: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()


class BeaconHandler(BaseHTTPRequestHandler):
    server: Beacon
    protocol_version = "HTTP/1.1"  # keep-alive: hundreds of frames load quicker

    def _answer(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.path)
        body = self.server.pages.get(self.path.split("?")[0], b"<!doctype html><title>beacon</title><p>BEACON PAGE</p>")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


HARNESS = """<!doctype html><meta charset="utf-8"><style>iframe { width: 120px; height: 60px; border: 0 }</style>
<body><pre id="results"></pre><script>
const frames = %s;
const loads = {};
for (const [key, src, sandboxed] of frames) {
  const frame = document.createElement('iframe');
  frame.dataset.key = key;
  loads[key] = 0;
  frame.addEventListener('load', () => { loads[key] += 1; });
  if (sandboxed) frame.setAttribute('sandbox', 'allow-same-origin');
  frame.src = src;
  document.body.appendChild(frame);
}
const marks = (doc) => [...doc.documentElement.attributes].map(a => a.name).filter(n => n.startsWith('data-pwned-'));
addEventListener('load', () => setTimeout(() => {
  const out = {top: marks(document), frames: {}};
  for (const frame of document.querySelectorAll('iframe')) {
    const r = {loads: loads[frame.dataset.key]};
    try { r.href = frame.contentWindow.location.href; } catch (e) { r.href = 'unreadable: ' + e; }
    try {
      const doc = frame.contentDocument;
      r.banner = !!doc.querySelector('[data-mailproof-banner]');
      r.marks = marks(doc);
      r.text = (doc.body ? doc.body.innerText : '').slice(0, 200);
    } catch (e) { r.error = String(e); }
    out.frames[frame.dataset.key] = r;
  }
  document.getElementById('results').textContent = JSON.stringify(out);
}, 4000));
</script>"""


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("Chromium is needed to render the hostile previews: apt-get install -y chromium", pytrace=False)
    return binary


@pytest.fixture(scope="module")
def rendered(chromium_binary):
    """Every vector in every mode, in one Chromium run: (results per frame key, beacon requests, previews)."""
    beacon = Beacon()
    port = beacon.server_address[1]
    thread = threading.Thread(target=beacon.serve_forever, daemon=True)
    thread.start()
    frames, previews = [], {}
    for mode in MODES:
        for name, markup in VECTORS.items():
            filled = fill(markup, mode, name, port)
            if mode in PREVIEWS:
                preview = safe_preview(filled)
                previews[(mode, name)] = preview
                page = preview.html
                if mode != "csp":
                    assert page.count(CSP_META) == 1
                    page = page.replace(CSP_META, "")
            else:
                page = filled
            path = f"/{mode}/{name}/index.html"
            beacon.pages[path] = page.encode("utf-8")
            sandboxed = mode == "allure" or (mode == CONTROL and name.split("--")[0] in SANDBOXED_CLASSES)
            frames.append([f"{mode}--{name}", f"http://127.0.0.1:{port}{path}", sandboxed])
    beacon.pages["/index.html"] = (HARNESS % json.dumps(frames)).encode("utf-8")
    profile = tempfile.mkdtemp(prefix="mailproof-hostile-")
    started = time.monotonic()
    try:
        run = subprocess.run([chromium_binary, *FLAGS, f"--user-data-dir={profile}", "--window-size=4000,3000",
                              "--virtual-time-budget=15000", "--dump-dom", f"http://127.0.0.1:{port}/index.html"],
                             capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        beacon.shutdown()
        beacon.server_close()
    seconds = time.monotonic() - started
    found = re.search(r'<pre id="results">(.*?)</pre>', run.stdout, re.S)
    assert found and found.group(1), f"no results from Chromium ({seconds:.1f} s): {run.stdout[-2000:]} {run.stderr[-2000:]}"
    results = json.loads(html.unescape(found.group(1)))
    print(f"Chromium rendered {len(frames)} frames in {seconds:.1f} s")
    return results, beacon.requests, previews, port


def outcomes(rendered) -> dict[tuple[str, str], list[str]]:
    """For every (mode, vector): what it did (beacon hits, scripts, navigations); empty if nothing."""
    results, requests, _, _ = rendered
    did: dict[tuple[str, str], list[str]] = {(mode, name): [] for mode in MODES for name in VECTORS}
    pages = {}
    for path in requests:
        parts = path.split("?")[0].split("/")
        key = (parts[1], parts[2]) if len(parts) > 2 else None
        if key not in did:
            if path != "/favicon.ico" and path != "/index.html":
                did.setdefault(("unattributed", path), []).append(f"request {path}")
            continue
        if path == f"/{key[0]}/{key[1]}/index.html":
            pages[key] = pages.get(key, 0) + 1
        else:
            did[key].append(f"beacon {path}")
    for mark in results["top"]:
        mode, name = mark.removeprefix("data-pwned-").split("--", 1)
        did[(mode, name)].append("script ran (marked the top page)")
    for key, frame in results["frames"].items():
        mode, name = key.split("--", 1)
        expected = f"/{mode}/{name}/index.html"
        if not frame.get("href", "").endswith(expected):
            did[(mode, name)].append(f"navigated to {frame.get('href')}")
        if frame.get("loads") != 1 or pages.get((mode, name)) != 1:
            did[(mode, name)].append(f"loaded {frame.get('loads')} times, page served {pages.get((mode, name))} times")
        if frame.get("marks"):
            did[(mode, name)].append(f"script ran ({frame['marks']})")
        if mode in PREVIEWS and not frame.get("banner"):
            did[(mode, name)].append(f"not the preview any more: {frame.get('error') or frame.get('text')!r}")
    return did


@pytest.mark.parametrize("mode", PREVIEWS)
def test_previews_load_nothing_run_nothing_and_stay_put_in_chromium(rendered, mode):
    did = outcomes(rendered)
    assert not [k for k in did if k[0] == "unattributed"], [(k, v) for k, v in did.items() if k[0] == "unattributed"]
    bad = {name: what for (m, name), what in did.items() if m == mode and what}
    assert bad == {}, json.dumps(bad, indent=1)


def test_the_vectors_are_live_unsanitized_so_the_zeros_mean_something(rendered):
    did = outcomes(rendered)
    dead = sorted(n for n in VECTORS if n not in INERT and not did[(CONTROL, n)])
    alive = sorted(n for n in INERT if did[(CONTROL, n)])
    assert dead == [], f"these vectors do nothing even unsanitized: list them in inert.txt or fix them: {dead}"
    assert alive == [], f"inert.txt lists vectors that are live in Chromium: {[(n, did[('raw', n)]) for n in alive]}"


def test_every_live_vector_is_reported_in_the_banner(rendered):
    _, _, previews, _ = rendered
    did = outcomes(rendered)
    silent = [name for name in VECTORS if did[(CONTROL, name)]
              and not (previews[("csp", name)].blocked or previews[("csp", name)].scripts_removed)]
    assert silent == [], f"the banner says nothing was removed: {silent}"

