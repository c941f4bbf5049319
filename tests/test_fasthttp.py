"""flow.http on FastHttpUser (mailproof.load.fasthttp) behaves as flow.http on HttpUser.

Locust monkey-patches whatever imports it, so both clients run in a child process here: the same
calls go through FlowUser's requests-based client and FastFlowUser's geventhttpclient one, against
a small real HTTP server (its own process), and every answer and every Locust request event must
be the same. Then the same flows run through both clients in real short rehearsals
(``mailproof rehearse --client requests|fast``) and their ledgers must agree.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from mailproof.net import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_rehearsal import LOADFLOWS, assert_reconciles, flask_shop, said  # noqa: E402

SERVER = textwrap.dedent(r'''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, body, content_type="application/json", extra=()):
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Served-By", "echo")
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8") if length else ""
            path = self.path
            if path.startswith("/redirect"):
                return self.answer(302, "", "text/plain", [("Location", "/echo?from=redirect")])
            if path.startswith("/status/"):
                code = int(path.split("/")[2].split("?")[0])
                return self.answer(code, f"status {code}: refused", "text/plain; charset=utf-8")
            if path.startswith("/text"):
                return self.answer(200, "h\u00e9llo, not json", "text/plain; charset=utf-8")
            self.answer(200, json.dumps({"method": self.command, "path": path, "body": body,
                                         "content_type": self.headers.get("Content-Type"),
                                         "trace": self.headers.get("X-Trace")}))

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
''')

CLIENTS = textwrap.dedent(r'''
    import json, sys
    import locust  # patches the process first, as under `locust -f`
    from locust.clients import HttpSession
    from locust.contrib.fasthttp import FastHttpSession
    from locust.env import Environment
    from mailproof.load.fasthttp import RequestsLikeClient
    from mailproof.load.user import REPLY_BODY_CHARS, _NamedClient, _reply_body

    base, closed = sys.argv[1], sys.argv[2]
    env = Environment()
    events = []
    env.events.request.add_listener(lambda request_type, name, exception=None, **kw:
                                    events.append([request_type, name, exception is None]))
    clients = {"requests": _NamedClient(HttpSession(base, env.events.request, None)),
               "fast": _NamedClient(RequestsLikeClient(FastHttpSession(base, env.events.request, None)))}
    calls = [
        ("get", ("/echo",), {"params": {"a": "1 2", "b": ["x", "y"]}}),
        ("get", ("/echo?z=1",), {"params": {"a": "\u00e9"}}),
        ("get", ("/echo",), {"params": [("k", "v"), ("k", "w")], "headers": {"X-Trace": "t1"}}),
        ("post", ("/echo",), {"json": {"k": [1, 2], "s": "\u00e9"}}),
        ("post", ("/echo", {"f": "v w", "g": "\u00e9"}), {}),
        ("post", ("/echo",), {"data": "raw body", "headers": {"Content-Type": "text/plain"}}),
        ("put", ("/echo",), {"json": {"x": 1}}),
        ("patch", ("/echo",), {"data": {"p": "1"}}),
        ("delete", ("/echo/ada%40example.test",), {}),
        ("request", ("OPTIONS", "/echo"), {}),
        ("head", ("/echo",), {}),
        ("get", ("/redirect",), {}),
        ("get", ("/redirect",), {"allow_redirects": False}),
        ("get", ("/status/404",), {}),
        ("get", ("/status/404",), {"expect": 404}),
        ("post", ("/status/422",), {"json": {}, "expect": (400, 422)}),
        ("get", ("/status/503",), {}),
        ("get", ("/text",), {}),
        ("get", ("/users/ada@example.test/orders/17",), {}),
        ("get", (f"{base}/echo",), {"params": {"absolute": "yes"}}),
        ("get", (f"http://127.0.0.1:{closed}/nothing",), {}),
    ]

    def outcome(fn):
        try:
            return ["ok", fn()]
        except Exception as exc:
            return ["raised", type(exc).__name__]

    seen = {}
    for kind, client in clients.items():
        events.clear()
        answers = []
        for verb, args, kwargs in calls:
            r = getattr(client, verb)(*args, **kwargs)
            answers.append({
                "call": f"{verb} {args} {sorted(kwargs)}",
                "status": r.status_code, "ok": outcome(lambda: r.ok), "text": r.text, "content": None if r.content is None else r.content.decode("utf-8"),
                "json": outcome(r.json), "raise_for_status": outcome(r.raise_for_status),
                "content_type": [r.headers.get("Content-Type"), r.headers.get("content-type")] if r.status_code else None,
                "served_by": r.headers.get("x-served-by") if r.status_code else None,
                "url": r.url if r.status_code else None,
                "bool": outcome(lambda: bool(r)),
                # what the ledger keeps of the answer that triggered an email: text's own first characters
                "reply_body_is_text": _reply_body(r) == (r.text or "")[:REPLY_BODY_CHARS],
            })
        seen[kind] = {"answers": answers, "events": list(events)}
    unsupported = []
    for kwargs in ({"timeout": 5}, {"files": {"f": b"x"}}, {"verify": False}):
        try:
            clients["fast"].get("/echo", **kwargs)
            unsupported.append("accepted")
        except TypeError as exc:
            from mailproof.errors import HarnessError  # the harness's limit: never counted against the app
            unsupported.append(str(exc) if isinstance(exc, HarnessError) else "a TypeError, not a HarnessError")
    seen["unsupported"] = unsupported
    print(json.dumps(seen))
''')


@pytest.fixture
def echo_server():
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_the_fast_client_answers_every_call_as_the_requests_client_does(echo_server):
    closed = free_port()  # nothing listens there: a connection error on both
    proc = subprocess.run([sys.executable, "-c", CLIENTS, echo_server, str(closed)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    requests_side, fast_side = seen["requests"], seen["fast"]
    for mine, theirs in zip(requests_side["answers"], fast_side["answers"]):
        assert mine == theirs, mine["call"]
    # The calls did what they say (so the comparison above compared something).
    answers = {a["call"]: a for a in requests_side["answers"]}
    echo = json.loads(requests_side["answers"][0]["text"])
    assert echo["path"] == "/echo?a=1+2&b=x&b=y"
    form = json.loads(requests_side["answers"][4]["text"])
    assert (form["body"], form["content_type"]) == ("f=v+w&g=%C3%A9", "application/x-www-form-urlencoded")
    assert json.loads(requests_side["answers"][2]["text"])["trace"] == "t1"
    assert json.loads(requests_side["answers"][11]["text"])["path"] == "/echo?from=redirect"
    assert requests_side["answers"][11]["url"].endswith("/echo?from=redirect")
    assert requests_side["answers"][12]["status"] == 302
    assert requests_side["answers"][13]["raise_for_status"] == ["raised", "HTTPError"]
    assert requests_side["answers"][17]["json"] == ["raised", "JSONDecodeError"]
    assert requests_side["answers"][-1]["status"] == 0
    assert requests_side["answers"][-1]["ok"] == ["raised", "ConnectionError"]  # requests' Response.ok, under Locust
    assert requests_side["answers"][13]["ok"] == ["ok", False] and requests_side["answers"][14]["ok"] == ["ok", False]
    assert len(answers) == len(requests_side["answers"])
    assert all(a["reply_body_is_text"] for a in requests_side["answers"] + fast_side["answers"])
    # Locust's statistics: the same rows (routes with ids templated), the same failures.
    assert requests_side["events"] == fast_side["events"]
    failed = [(name, ok) for _, name, ok in requests_side["events"] if not ok]
    assert failed == [("/status/{id}", False), ("/status/{id}", False), ("/nothing", False)]
    assert ["DELETE", "/echo/{id}", True] in requests_side["events"]
    assert ["GET", "/users/{id}/orders/{id}", True] in requests_side["events"]
    # What FastHttpSession cannot do per request is refused, naming the fix.
    assert all("--client requests" in text for text in seen["unsupported"]), seen["unsupported"]


def _rows(out: Path) -> Counter:
    with open(out / "locust_stats.csv", newline="") as handle:
        return Counter({(row["Type"], row["Name"]): int(row["Request Count"]) for row in csv.DictReader(handle)
                        if row["Name"] != "Aggregated"})


def test_the_same_flows_give_the_same_ledger_on_both_clients(tmp_path):
    """Flask Shop's load flows (redirects, expected 400 and 401, JSON, forms) at the same arrivals."""
    runs = {}
    for client in ("requests", "fast"):
        out = tmp_path / client
        proc, results = flask_shop(LOADFLOWS, out, "--shape", "constant", "--peak-rate", "8", "--duration", "5",
                                   "--client", client)
        assert proc.returncode == 0, said(proc)
        assert_reconciles(results)
        runs[client] = (results, _rows(out))
    (slow, slow_rows), (fast, fast_rows) = runs["requests"], runs["fast"]
    for results in (slow, fast):
        assert results["flows"]["failures"] == {} and results["http"]["failures"] == 0
        assert results["ledger"]["unexpected"] == 0 and results["harness"]["errors"] == []
        assert sum(results["flows"]["runs"].values()) == 40
        for name, counts in results["ledger"]["flows"].items():
            for key in ("late", "lost", "unverified", "duplicated", "unexpected", "interrupted", "unawaited"):
                assert counts[key] == 0, (name, key, counts)
    # Which flow an arrival runs is Locust's weighted random pick, so one side may (rarely: 40
    # picks of 4 flows) never run a flow the other ran: compare per run of each flow both ran.
    shared = set(slow["flows"]["runs"]) & set(fast["flows"]["runs"])
    assert shared, (slow["flows"]["runs"], fast["flows"]["runs"])
    for name in shared:
        a, b = slow["ledger"]["flows"].get(name), fast["ledger"]["flows"].get(name)
        ra, rb = slow["flows"]["runs"][name], fast["flows"]["runs"][name]
        assert (a is None) == (b is None), name
        if a is not None:
            for key in ("expected", "delivered"):
                assert a[key] / ra == b[key] / rb, (name, key, a, b)
    # The same statistics rows: MAIL steps and FLOWs of the flows both ran, and, when both ran
    # the same flows, the same HTTP routes (ids templated) and CHECKs.
    def of_shared(rows: Counter) -> set:
        return {(kind, name) for kind, name in rows
                if kind == "FLOW" and name in shared or kind == "MAIL" and name.partition(":")[0] in shared}
    assert of_shared(slow_rows) == of_shared(fast_rows) and of_shared(slow_rows)
    if set(slow["flows"]["runs"]) == set(fast["flows"]["runs"]):
        assert set(slow_rows) == set(fast_rows)
    assert {kind for kind, _ in slow_rows} >= {"GET", "POST", "MAIL", "FLOW"}
    for (kind, name), count in slow_rows.items():
        if kind == "FLOW":
            assert count == slow["flows"]["runs"][name]
    for (kind, name), count in fast_rows.items():
        if kind == "FLOW":
            assert count == fast["flows"]["runs"][name]


def test_what_requests_has_and_the_fast_client_lacks_is_a_harness_error_naming_the_fix():
    """A flow reading requests' Session or Response attributes the fast client lacks gets a
    HarnessError (never counted against the app), still an AttributeError for hasattr()."""
    from mailproof.errors import HarnessError
    from mailproof.load.fasthttp import FastReply, RequestsLikeClient

    class Session:  # what a FastHttpSession has of these: none
        base_url = "http://127.0.0.1:1"

    class Answer:
        status_code, text, content, headers = 200, "", b"", {}

    client, reply = RequestsLikeClient(Session()), FastReply(Answer())
    assert client.base_url == "http://127.0.0.1:1"  # what the session has is its own
    for owner, name in ((client, "headers"), (client, "cookies"), (client, "auth"), (client, "mount"),
                        (reply, "cookies"), (reply, "elapsed"), (reply, "iter_content")):
        with pytest.raises(HarnessError, match="--client requests") as raised:
            getattr(owner, name)
        assert isinstance(raised.value, AttributeError) and not hasattr(owner, name), name
    for owner in (client, reply):  # not requests' either: a plain AttributeError, as before
        with pytest.raises(AttributeError) as raised:
            owner.no_such_thing
        assert not isinstance(raised.value, HarnessError)


# -- the same request on the wire; a client that keeps answering after a flow's bad call ---------------

RAW_SERVER = textwrap.dedent(r'''
    import json, socket, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(16)
    print(s.getsockname()[1], flush=True)
    def serve(c):
        c.settimeout(0.5); data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += c.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
            need = int(headers.get("content-length", 0) or 0)
            while len(body) < need:
                body += c.recv(65536)
        except Exception:
            pass
        answer = json.dumps({"accept": headers.get("accept"), "content-type": headers.get("content-type"),
                             "content-length": headers.get("content-length"),
                             "transfer-encoding": headers.get("transfer-encoding")}).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
                  + str(len(answer)).encode() + b"\r\n\r\n" + answer)
        c.close()
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
''')

WIRE = textwrap.dedent(r'''
    import io, json, sys
    import locust
    from locust.clients import HttpSession
    from locust.contrib.fasthttp import FastHttpSession
    from locust.env import Environment
    from mailproof.load.fasthttp import RequestsLikeClient
    base = sys.argv[1]
    env = Environment()
    seen = {}
    for kind in ("requests", "fast"):
        c = (HttpSession(base, env.events.request, None) if kind == "requests"
             else RequestsLikeClient(FastHttpSession(base, env.events.request, None)))
        seen[kind] = {"get": c.get("/x").json(), "post json=": c.post("/x", json={"a": 1}).json(),
                      "post data=file": c.post("/x", data=io.BytesIO(b"raw=1")).json()}
    print(json.dumps(seen))
''')


@pytest.fixture
def raw_server():
    server = subprocess.Popen([sys.executable, "-c", RAW_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.kill()
        server.wait()


def test_the_app_receives_the_same_request_from_both_clients(raw_server):
    """Accept, Content-Type, Content-Length and chunking as requests sends them, for a plain GET,
    json= and a file in data= (the fast client sent no Accept, Accept: application/json, and a
    file chunked)."""
    proc = subprocess.run([sys.executable, "-c", WIRE, raw_server], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # geventhttpclient gives a body without a Content-Type one of its own (docs/traps.md), where
    # requests sends none: the one field left out for the file.
    for side in seen.values():
        side["post data=file"].pop("content-type")
    assert seen["fast"] == seen["requests"]
    assert seen["requests"]["post json="]["accept"] == "*/*" and seen["requests"]["post data=file"]["content-length"] == "5"


POOL = textwrap.dedent(r'''
    import sys
    import gevent, locust
    from locust.contrib.fasthttp import FastHttpSession
    from locust.env import Environment
    from mailproof.load.fasthttp import RequestsLikeClient
    client = RequestsLikeClient(FastHttpSession(sys.argv[1], Environment().events.request, None))
    try:
        client.post("/echo", data=1.5)  # a flow's bug: requests raises TypeError too
    except TypeError:
        pass
    try:
        with gevent.Timeout(3):
            print(client.get("/echo").status_code)
    except BaseException as exc:  # LoopExit here; under Locust the user's greenlet blocks forever
        print(type(exc).__name__)
''')


def test_a_request_that_raised_does_not_hang_the_users_next_request(echo_server):
    """data=1.5 (a flow's bug) is refused before it is sent, as requests refuses it: sent, it left
    the connection pool short and the user's next request blocked forever."""
    proc = subprocess.run([sys.executable, "-c", POOL, echo_server], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "200", proc.stdout + proc.stderr[-2000:]
