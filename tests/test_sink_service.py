"""The sink service as its own process: CLI, SMTP capture, HTTP API, faults, token rules.

Real processes and sockets throughout. Nothing sleeps to wait for mail: waits are long-polls,
streams are read line by line, and SMTP replies come back synchronously.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from email.message import EmailMessage
from pathlib import Path
from typing import Optional

import pytest
import requests

from mailproof.criteria import Criteria
from mailproof.faults.specs import (FaultError, action_from_spec, action_to_spec, parse_chaos_profile,
                               rule_from_spec, rule_to_spec)
from mailproof.faults import Chaos, Delay, Disconnect, RateLimit, Reply, Script, Stall
from mailproof.capture.remote import RemoteSink
from mailproof.capture.service import store as store_module
from mailproof.capture.service.store import SEQ, CaptureStore, Slicer
from mailproof.capture.smtp_sink import CapturedMail
from mailproof.mailbox import Mailbox
from mailproof.message import Message
from mailproof.servers.app_process import AppProcess

ROOT = Path(__file__).resolve().parent.parent


def make_raw(to: str, subject: str = "Hello", body: str = "Hi there.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "app@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

READY = re.compile(r"^READY (http://127\.0\.0\.1:(\d+)) smtp=127\.0\.0\.1:(\d+)(?: ca=(\S+))?$")


class Service:
    """A sink service process started through its CLI."""

    def __init__(self, *args: str, token: Optional[str] = None, env: Optional[dict] = None) -> None:
        command = [sys.executable, "-m", "mailproof.capture.service", "--host", "127.0.0.1",
                   "--smtp-port", "0", "--http-port", "0", *args]
        if token:
            command += ["--token", token]
        self.token = token
        self.process = AppProcess(command, cwd=str(ROOT), ready_pattern=r"READY (http://\S+)",
                                  env=env, name="sink service").start()
        self.ready_line = next(line for line in self.process.output if line.startswith("READY"))
        found = READY.match(self.ready_line)
        assert found, f"unexpected READY line {self.ready_line!r}"
        self.url = found.group(1)
        self.http_port = int(found.group(2))
        self.smtp_port = int(found.group(3))
        self.ca_file = found.group(4)  # with --tls only
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def json(self, path: str, method: str = "GET", **kw):
        response = self.http.request(method, self.url + path, timeout=30, **kw)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def send(self, to, raw: bytes, sender: str = "app@example.test") -> dict:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
            return smtp.sendmail(sender, to, raw)

    def last_seq(self) -> int:
        return self.json("/health")["last_seq"]

    def stop(self) -> Optional[int]:
        self.http.close()
        return self.process.stop()


@pytest.fixture(scope="module")
def service():
    svc = Service()
    yield svc
    assert svc.stop() == 0, svc.process.tail()  # SIGTERM: a clean exit


_counter = iter(range(1, 10**6))


def addr(label: str = "u") -> str:
    return f"{label}.{next(_counter):06d}@svc.test"


# -- startup, capture, raw bytes -------------------------------------------------------------------


def test_ready_line_and_health(service):
    health = service.json("/health")
    assert health["status"] == "ok"
    assert health["smtp"] == {"host": "127.0.0.1", "port": service.smtp_port}
    assert health["http"]["port"] == service.http_port
    assert health["token_required"] is False
    assert health["tls"] == {"mode": "off", "ca_file": None} and health["auth_required"] is False
    assert " ca=" not in service.ready_line


def test_sent_mail_is_listed_parsed_on_request_and_raw_is_identical(service):
    to = addr("raw")
    msg = EmailMessage()
    msg["From"] = "App <app@example.test>"
    msg["To"] = to
    msg["Subject"] = "=?utf-8?q?Caf=C3=A9_receipt?="
    msg.set_content("Line one.\n.leading dot survives dot-stuffing\nCaf\u00e9 \u2713\n", cte="8bit")
    msg.add_alternative("<p>Your code is <b>123456</b></p>", subtype="html")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="receipt.pdf")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    since = service.last_seq()
    service.send([to], raw)

    listed = service.json(f"/messages?to={urllib.parse.quote(to.upper())}&since={since}")["messages"]
    assert len(listed) == 1
    summary = listed[0]
    assert summary["rcpt_tos"] == [to] and summary["mail_from"] == "app@example.test"
    assert summary["size"] == len(raw) and summary["subject"] == "Café receipt"
    assert summary["received_at"] == pytest.approx(time.time(), abs=30)

    raw_back = service.get(f"/messages/{summary['seq']}/raw")
    assert raw_back.headers["Content-Type"].startswith("message/rfc822")
    assert raw_back.content == raw  # byte for byte, 8-bit and the leading dot included

    parsed = service.json(f"/messages/{summary['seq']}")
    assert parsed["subject"] == "Café receipt"
    assert parsed["to"] == [to]
    assert ".leading dot survives" in parsed["text"] and "\u2713" in parsed["text"]
    assert "<b>123456</b>" in parsed["html"]
    assert parsed["attachments"] == [{"filename": "receipt.pdf", "content_type": "application/pdf",
                                      "size": len(b"%PDF-1.4 fake"), "inline": False, "content_id": None}]
    assert ["Subject", "Café receipt"] in parsed["headers"]


def test_unknown_message_is_404_and_bad_params_are_400(service):
    missing = service.get("/messages/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["error"]
    bad = service.get("/messages?since=yesterday")
    assert bad.status_code == 400 and "since" in bad.json()["error"]
    assert service.get("/wait?timeout=-1").status_code == 400


# -- long-poll waits -----------------------------------------------------------------------------


def test_wait_returns_the_moment_mail_arrives(service):
    to = addr("wait")
    since = service.last_seq()
    result: dict = {}

    def wait() -> None:
        started = time.monotonic()
        response = service.get(f"/wait?to={to}&subject=Welcome&since={since}&timeout=30", timeout=60)
        result.update(status=response.status_code, body=response.json(), took=time.monotonic() - started)

    waiter = threading.Thread(target=wait)
    waiter.start()
    service.send([addr("other")], make_raw("someone-else@x", "Welcome"))  # another recipient: ignored
    service.send([to], make_raw(to, "Welcome aboard"))
    waiter.join(timeout=60)
    assert result["status"] == 200, result
    assert [m["subject"] for m in result["body"]["messages"]] == ["Welcome aboard"]
    assert result["took"] < 10  # woken by the arrival, far before the 30 s timeout


def test_wait_counts_retained_mail_and_waits_for_the_rest(service):
    to = addr("count")
    since = service.last_seq()
    service.send([to], make_raw(to, "Part 1"))
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(
        r=service.get(f"/wait?to={to}&count=2&since={since}&timeout=30", timeout=60)))
    waiter.start()
    service.send([to], make_raw(to, "Part 2"))
    waiter.join(timeout=60)
    assert result["r"].status_code == 200
    assert [m["subject"] for m in result["r"].json()["messages"]] == ["Part 1", "Part 2"]


def test_wait_times_out_with_408_and_near_misses(service):
    to = addr("late")
    since = service.last_seq()
    service.send([to], make_raw(to, "Receipt"))
    started = time.monotonic()
    response = service.get(f"/wait?to={to}&subject=Confirm&since={since}&timeout=0.3")
    assert response.status_code == 408
    assert time.monotonic() - started >= 0.3
    body = response.json()
    assert "no mail to" in body["error"] and "Confirm" in body["error"]
    assert body["found"] == []
    assert body["near_misses"][0]["rcpt_tos"] == [to]
    assert body["near_misses"][0]["why"] == ["subject 'Receipt' does not contain 'Confirm'"]


def test_wait_near_miss_reasons_are_exactly_the_criteria_mismatches(service):
    """/wait matches with Criteria and reports Criteria.mismatches: it cannot drift from a Mailbox wait."""
    to, other = addr("drift"), addr("bystander")
    since = service.last_seq()
    service.send([to.upper()], make_raw(to, "Please Confirm"))  # found: the recipient is case-insensitive
    service.send([to], make_raw(to, "Your receipt"))  # the right recipient, another subject
    service.send([other], make_raw(other, "Confirm this"))  # the subject, another recipient
    service.send([other], make_raw(other, "Newsletter"))  # neither
    response = service.get(f"/wait?to={to}&subject=Confirm&count=2&since={since}&timeout=0")
    assert response.status_code == 408
    body = response.json()
    criteria = Criteria(to=to, subject="Confirm")
    assert body["error"].startswith(f"only 1 of 2 mails {criteria.describe()} within 0 s;")
    assert [m["subject"] for m in body["found"]] == ["Please Confirm"]
    near = body["near_misses"]
    assert [m["subject"] for m in near] == ["Your receipt", "Newsletter", "Confirm this"]  # same recipient first
    for miss in near:
        raw = service.get(f"/messages/{miss['seq']}/raw").content
        msg = Message(raw, mail_from=miss["mail_from"], rcpt_tos=miss["rcpt_tos"], seq=miss["seq"])
        assert miss["why"] == criteria.mismatches(msg) != []
    assert [len(m["why"]) for m in near] == [1, 2, 1]  # both kinds of reason, alone and together


def test_messages_are_paged_with_a_hard_bound_and_a_next_cursor(service):
    to = addr("page")
    since = service.last_seq()
    for i in range(3):
        service.send([to], make_raw(to, f"Page {i}"))
    first = service.json(f"/messages?since={since}&limit=2")
    assert [m["subject"] for m in first["messages"]] == ["Page 0", "Page 1"]
    assert first["limit"] == 2 and first["next"] == first["messages"][-1]["seq"]
    second = service.json(f"/messages?since={first['next']}&limit=2")
    assert [m["subject"] for m in second["messages"]] == ["Page 2"] and second["next"] is None
    by_rcpt = service.json(f"/messages?to={to}&since={since}&limit=2")  # the recipient index pages too
    assert [m["subject"] for m in by_rcpt["messages"]] == ["Page 0", "Page 1"] and by_rcpt["next"]
    assert service.json("/messages?limit=1000000")["limit"] == 1000  # the hard bound


def test_wait_without_a_recipient_takes_the_earliest_retained_matches_in_order(service):
    tag = f"Scan-{next(_counter)}"
    since = service.last_seq()
    for i in range(250):  # more than one SCAN_CHUNK: the scan yields to the loop in between
        to = addr("scan")
        service.send([to], make_raw(to, f"{tag} {i}" if i % 50 == 0 else "Noise"))
    body = service.json(f"/wait?subject={tag}&count=3&since={since}&timeout=10")
    assert [m["subject"] for m in body["messages"]] == [f"{tag} 0", f"{tag} 50", f"{tag} 100"]


def test_a_large_message_is_parsed_off_the_loop_and_capture_goes_on(service):
    to = addr("big")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.test", to, "Many parts"
    msg.set_content("body\n")
    for i in range(300):
        msg.add_attachment(b"x" * 200, maintype="application", subtype="octet-stream", filename=f"a{i}.bin")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    since = service.last_seq()
    service.send([to], raw)
    seq = service.json(f"/messages?to={to}&since={since}")["messages"][0]["seq"]
    parsed = service.json(f"/messages/{seq}")
    assert parsed["subject"] == "Many parts" and len(parsed["attachments"]) == 300


def test_a_wait_whose_client_hangs_up_is_removed_at_once(service):
    """The waiter goes when the client does, not at its 3,600 s timeout. No polling: /stats?waiters=N
    is itself a long-poll that answers once N waiters are registered."""
    import socket
    before = service.json("/stats")
    assert before["waiters"] == 0
    sock = socket.create_connection(("127.0.0.1", service.http_port), timeout=10)
    try:
        sock.sendall(f"GET /wait?to={addr('gone')}&timeout=3600 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert service.json("/stats?waiters=1&timeout=10")["waiters"] == 1  # registered
    finally:
        sock.close()
    started = time.monotonic()
    after = service.json("/stats?waiters=0&timeout=10")
    assert after["waiters"] == 0 and after["waiters_abandoned"] == before["waiters_abandoned"] + 1
    assert time.monotonic() - started < 5


# -- the event stream ----------------------------------------------------------------------------


def open_stream(service: Service, query: str):
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=30)
    headers = {"Authorization": f"Bearer {service.token}"} if service.token else {}
    conn.request("GET", f"/stream?{query}", headers=headers)
    response = conn.getresponse()
    return conn, response


def read_event(response) -> dict:
    line = response.readline()
    assert line.endswith(b"\n"), f"stream ended: {line!r}"
    return json.loads(line)


def test_stream_replays_since_seq_then_goes_live_with_heartbeats(service):
    to = addr("stream")
    raws = [make_raw(to, f"Mail {i}") for i in range(3)]
    for raw in raws:
        service.send([to], raw)
    seqs = [m["seq"] for m in service.json(f"/messages?to={to}")["messages"]]
    conn, response = open_stream(service, f"since={seqs[0]}&heartbeat=0.2")
    try:
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("application/x-ndjson")
        assert response.getheader("Transfer-Encoding") == "chunked"
        hello = read_event(response)["hello"]
        assert hello == {"instance": service.json("/health")["instance"], "since": seqs[0],
                         "last_seq": seqs[-1], "reset": False, "run": None}
        replayed = [read_event(response) for _ in range(2)]  # everything after seqs[0]
        assert [e["seq"] for e in replayed] == seqs[1:]
        assert [base64.b64decode(e["raw"]) for e in replayed] == raws[1:]
        assert replayed[0]["rcpt_tos"] == [to] and replayed[0]["mail_from"] == "app@example.test"

        live_raw = make_raw(to, "Live one")
        service.send([to], live_raw)
        event = read_event(response)
        while "heartbeat" in event:  # a heartbeat may come first; each read blocks until a line
            event = read_event(response)
        assert event["seq"] == seqs[-1] + 1 and base64.b64decode(event["raw"]) == live_raw
        heartbeat = read_event(response)  # nothing else arrives: the next line is a heartbeat
        assert heartbeat["last_seq"] >= event["seq"] and heartbeat["heartbeat"] > 0
    finally:
        conn.close()


def test_stream_without_since_starts_with_the_next_arrival(service):
    to = addr("next")
    service.send([to], make_raw(to, "Before"))
    conn, response = open_stream(service, "heartbeat=30")
    try:
        assert "hello" in read_event(response)
        service.send([to], make_raw(to, "After"))
        event = read_event(response)
        assert b"Subject: After" in base64.b64decode(event["raw"])
    finally:
        conn.close()


def test_a_stream_for_another_run_of_the_service_replays_everything(service):
    """A client that knew an earlier run (its seqs restart at 1) gets all that is retained."""
    to = addr("restart")
    service.send([to], make_raw(to, "After restart"))
    first = service.json("/messages?limit=1")["messages"][0]["seq"]
    conn, response = open_stream(service, "since=999999&instance=an-earlier-run&heartbeat=30")
    try:
        hello = read_event(response)["hello"]
        assert hello["reset"] is True and hello["since"] == 0
        assert read_event(response)["seq"] == first
    finally:
        conn.close()


def test_a_stream_for_one_run_carries_its_mail_and_strays_and_accounts_for_every_seq(service):
    """Fan-in: run=ID streams that run's mail and strays, never another run's; every line says which
    seqs it accounts for (``from``), and mail only for others ends in a ``through`` line."""
    since = service.last_seq()
    mine, theirs = "order+abc123.000001@svc.test", "order+zzz999.000001@svc.test"
    stray = addr("stray")
    conn, response = open_stream(service, f"since={since}&run=ABC123&heartbeat=60")
    everything, all_response = open_stream(service, f"since={since}&heartbeat=60")
    try:
        assert read_event(response)["hello"]["run"] == "abc123"
        assert read_event(all_response)["hello"]["run"] is None
        for to in (theirs, mine, theirs, stray, theirs):
            service.send([to], make_raw(to))
        # When a "through" line comes depends on timing; what is accounted for does not.
        last, records = since, []
        while last < since + 5:
            event = read_event(response)
            if "through" in event:
                assert event["through"] > last
                last = event["through"]
            else:
                assert event["from"] == last + 1, event  # every seq before it accounted for
                last = event["seq"]
                records.append(event)
        assert [(e["seq"], e["rcpt_tos"]) for e in records] == [(since + 2, [mine]), (since + 4, [stray])]
        unfiltered = [read_event(all_response) for _ in range(5)]
        assert [e["seq"] for e in unfiltered] == list(range(since + 1, since + 6))
        assert all("from" not in e for e in unfiltered)  # an unfiltered stream's lines are as before
    finally:
        conn.close()
        everything.close()
    conn, response = open_stream(service, f"since={since}&run=zzz999")  # a replay is filtered the same way
    try:
        read_event(response)
        replayed = [read_event(response) for _ in range(3)]
        assert [(e["from"], e["seq"]) for e in replayed] == [(since + 1, since + 1), (since + 2, since + 3),
                                                             (since + 4, since + 4)]
    finally:
        conn.close()


def test_remote_sinks_of_two_runs_each_get_their_own_mail_and_miss_nothing(service):
    with RemoteSink(service.url, run="aaa111") as one, RemoteSink(service.url, run="bbb222") as two, \
            Mailbox(one.store) as box_one, Mailbox(two.store) as box_two:
        for i in range(6):
            to = f"flow+{'aaa111' if i % 2 else 'bbb222'}.{i:06d}@svc.test"
            service.send([to], make_raw(to, f"Mail {i}"))
        stray = addr("stray")
        service.send([stray], make_raw(stray, "Stray"))  # both get it, after all the rest
        target = service.last_seq()
        box_one.wait_for(stray, within=20)
        box_two.wait_for(stray, within=20)
        assert (one.last_seq, two.last_seq) == (target, target)  # every seq accounted for: catch-up works
        assert sorted(m.subject for m in one.store.since(0)) == ["Mail 1", "Mail 3", "Mail 5", "Stray"]
        assert sorted(m.subject for m in two.store.since(0)) == ["Mail 0", "Mail 2", "Mail 4", "Stray"]
        assert (one.missing, two.missing, one.duplicates, two.duplicates) == (0, 0, 0, 0)  # filtered is no gap
        assert one.filtered >= 3 and two.filtered >= 3


def test_dropping_streams_cuts_them_abruptly(service):
    conn, response = open_stream(service, "heartbeat=30")
    try:
        assert service.json("/streams", method="DELETE")["dropped"] >= 1
        with pytest.raises(http.client.IncompleteRead):  # no terminating chunk: a real drop
            response.read()
    finally:
        conn.close()


# -- faults through the API ----------------------------------------------------------------------


def test_faults_via_api_451_twice_then_accept_and_removed_by_scope(service):
    to = addr("fault")
    rule = service.json("/faults", method="POST", json={
        "stage": "rcpt", "to": to, "scope": "t1",
        "action": {"script": ["451 4.3.0 try later", {"reply": "451 4.3.0 try later"}]}})
    assert rule["id"] > 0 and rule["fired"] == 0 and rule["scope"] == "t1"
    other = service.json("/faults", method="POST", json={"stage": "data", "to": addr("x"), "scope": "t2",
                                                         "action": {"delay": 0.01, "then": "554 5.0.0 no"}})
    for attempt in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            service.send([to], make_raw(to, "Retry me"))
        assert refused.value.recipients[to] == (451, b"4.3.0 try later")
    service.send([to], make_raw(to, "Retry me"))  # the third attempt is accepted
    assert len(service.json(f"/messages?to={to}")["messages"]) == 1

    fired = {f["id"]: f for f in service.json("/stats")["faults"]}
    assert (fired[rule["id"]]["fired"], fired[rule["id"]]["acted"]) == (3, 2)
    listed = {f["id"]: f for f in service.json("/faults")["faults"]}
    assert listed[rule["id"]]["action"] == {"script": [{"reply": "451 4.3.0 try later"}] * 2}

    assert service.json("/faults?scope=t1", method="DELETE") == {"removed": 1}
    assert [f["id"] for f in service.json("/faults")["faults"]] == [other["id"]]
    assert service.json(f"/faults/{other['id']}", method="DELETE")["id"] == other["id"]
    assert service.http.delete(f"{service.url}/faults/{other['id']}").status_code == 404
    assert service.json("/faults")["faults"] == []


def test_after_data_disconnect_keeps_the_mail(service):
    to = addr("ambiguous")
    service.json("/faults", method="POST", json={"stage": "after_data", "to": to, "scope": "t3",
                                                 "action": {"disconnect": True}})
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            service.send([to], make_raw(to, "Did it arrive?"))
        assert len(service.json(f"/messages?to={to}")["messages"]) == 1  # taken, though unacknowledged
    finally:
        service.json("/faults?scope=t3", method="DELETE")


def test_chaos_profile_via_api(service):
    to = addr("chaos")
    added = service.json("/faults", method="POST", json={
        "profile": "100%:rcpt:452,ratelimit:1000/s:rcpt:451", "seed": 7, "scope": "prof",
        "to_pattern": re.escape(to)})["faults"]
    assert [f["action"] for f in added] == [
        {"chaos": {"p": 1.0, "seed": 7, "action": {"reply": "452 4.3.1 mailproof chaos: insufficient system storage"}}},
        {"rate_limit": {"per_second": 1000.0, "reply": "451 4.3.0 mailproof chaos: temporary failure, try again later"}},
    ]
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        service.send([to], make_raw(to))
    assert refused.value.recipients[to][0] == 452
    service.send([addr("bystander")], make_raw("b@x"))  # other recipients are untouched
    assert service.json("/faults?scope=prof", method="DELETE") == {"removed": 2}


@pytest.mark.parametrize("spec, field", [
    ({"stage": "rcpt"}, "action"),
    ({"stage": "helo", "action": "451 4.3.0 x"}, "stage"),
    ({"stage": "rcpt", "action": {"reply": "fine"}}, "action.reply"),
    ({"stage": "rcpt", "action": {"script": ["451 4.3.0 x", {"delay": "soon"}]}}, "action.script[1].delay"),
    ({"stage": "rcpt", "action": {"chaos": {"p": 2, "action": "451 4.3.0 x"}}}, "action.chaos.p"),
    ({"stage": "rcpt", "action": {"explode": True}}, "action.explode"),
    ({"stage": "rcpt", "recipient": "a@x", "action": None}, "recipient"),
    ({"stage": "mail", "to": "a@x", "action": None}, "stage"),
])
def test_malformed_fault_specs_are_400_naming_the_field(service, spec, field):
    response = service.http.post(service.url + "/faults", json=spec, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}:"), response.json()


# -- retention -----------------------------------------------------------------------------------


def test_bounded_retention_counts_evictions_and_streams_say_what_is_missing():
    svc = Service("--max-messages", "3")
    try:
        with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=10) as smtp:
            for i in range(5):
                smtp.sendmail("app@example.test", [f"r{i}@svc.test"], make_raw(f"r{i}@svc.test", f"N{i}"))
        stats = svc.json("/stats")
        assert (stats["received"], stats["retained"], stats["evicted"]) == (5, 3, 2)
        assert [m["seq"] for m in svc.json("/messages")["messages"]] == [3, 4, 5]
        gone = svc.get("/messages/1")
        assert gone.status_code == 404 and "evicted" in gone.json()["error"]
        conn, response = open_stream(svc, "since=0")
        try:
            assert read_event(response)["hello"]["reset"] is False
            assert read_event(response)["missing"] == {"from": 1, "to": 2, "evicted": 2, "cleared": 0}
            assert read_event(response)["seq"] == 3
        finally:
            conn.close()
        assert [m["seq"] for m in svc.json("/messages?to=R0@svc.test")["messages"]] == []  # index follows eviction
        assert [m["seq"] for m in svc.json("/messages?to=r4@svc.test")["messages"]] == [5]
        late = svc.get("/wait?to=r0@svc.test&since=0&timeout=0")  # its mail was evicted: it must say so
        assert late.status_code == 408
        body = late.json()
        assert (body["evicted_since"], body["evicted"]) == (2, 2)
        assert "no mail" in body["error"] and "2 message(s) after seq 0 were evicted" in body["error"]
        later = svc.get("/wait?to=r0@svc.test&since=2&timeout=0").json()
        assert later["evicted_since"] == 0 and "none evicted after seq 2" in later["error"]
        assert svc.json("/messages", method="DELETE")["cleared"] == 3
        stats = svc.json("/stats")
        assert (stats["retained"], stats["cleared"], stats["evicted"], stats["last_seq"]) == (0, 3, 2, 5)
    finally:
        assert svc.stop() == 0


def _captured(seq: int, to: str = "held@svc.test") -> CapturedMail:
    return CapturedMail(seq=seq, mail_from="app@example.test", rcpt_tos=(to,),
                        data=make_raw(to, f"N{seq}"), received_at=time.time())


def test_the_store_keeps_what_a_named_client_was_not_sent_and_evicts_it_once_sent():
    store = CaptureStore(max_messages=3)
    cursor = store.attach("worker-1", since=0)
    for seq in range(1, 6):
        store.add(_captured(seq))
    assert (len(store.messages), store.evicted, store.over_cap) == (5, 0, 2)  # kept past the cap, counted
    store.sent(cursor, 1)  # the client has seq 1 now: that one may go, seq 2 not yet
    assert ([r[SEQ] for r in store.messages], store.evicted) == ([2, 3, 4, 5], 1)
    store.sent(cursor, 5)
    assert ([r[SEQ] for r in store.messages], store.evicted) == ([3, 4, 5], 2)
    store.add(_captured(6))  # every cursor is past the oldest: plain first-in first-out again
    assert ([r[SEQ] for r in store.messages], store.evicted, store.over_cap) == ([4, 5, 6], 3, 2)


def test_a_disconnected_client_holds_mail_for_its_hold_then_nothing():
    store = CaptureStore(max_messages=2, stream_hold=3600)
    store.detach(store.attach("gone", since=0))  # its connection ended: the hold runs
    for seq in range(1, 5):
        store.add(_captured(seq))
    assert (len(store.messages), store.evicted) == (4, 0)  # a reconnect within the hold finds it all
    brief = CaptureStore(max_messages=2, stream_hold=0)
    brief.detach(brief.attach("gone", since=0))
    for seq in range(1, 5):
        brief.add(_captured(seq))
    assert ([r[SEQ] for r in brief.messages], brief.evicted, brief.cursors) == ([3, 4], 2, {})
    assert store.release("gone") and not store.release("gone")  # DELETE /streams/ID
    assert ([r[SEQ] for r in store.messages], store.evicted) == ([3, 4], 2)


def test_a_named_stream_client_finds_no_gap_after_a_reconnect_past_the_cap():
    """A worker's stream drops while mail pours in past --max-messages: its reconnect with since=
    must replay every message (with an anonymous client they were evicted and reported missing)."""
    svc = Service("--max-messages", "3")
    try:
        conn, response = open_stream(svc, "since=0&client=worker-1")
        assert read_event(response)["hello"]["since"] == 0
        conn.close()
        with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=10) as smtp:
            for i in range(6):
                smtp.sendmail("app@example.test", [f"h{i}@svc.test"], make_raw(f"h{i}@svc.test", f"H{i}"))
        stats = svc.json("/stats")
        assert (stats["retained"], stats["evicted"], stats["over_cap"], stats["stream_clients"]) == (6, 0, 3, 1)
        conn, response = open_stream(svc, "since=0&client=worker-1")
        try:
            assert read_event(response)["hello"]["since"] == 0
            assert [read_event(response)["seq"] for _ in range(6)] == [1, 2, 3, 4, 5, 6]  # no 'missing' line
        finally:
            conn.close()
        assert svc.json("/streams/worker-1", method="DELETE")["released"] is True
        stats = svc.json("/stats")
        assert (stats["retained"], stats["evicted"], stats["stream_clients"]) == (3, 3, 0)
    finally:
        assert svc.stop() == 0


def test_remote_sink_names_its_stream_and_releases_it_when_stopped(service):
    remote = RemoteSink(service.url).start()
    try:
        assert service.json("/stats")["stream_clients"] >= 1
        assert remote.client_id in service.json("/stats?waiters=0")["stream_client_ids"]
    finally:
        remote.stop()
    assert remote.client_id not in service.json("/stats")["stream_client_ids"]


def _interleaving(scans: int = 3, ticks: int = 12) -> str:
    """Which scan ran each slice, '.' for each turn of a light task (SMTP's stand-in)."""
    log: list[str] = []

    async def scan(name: str) -> None:
        async with Slicer() as slicer:
            for _ in range(ticks):
                log.append(name)
                await slicer.tick()

    async def light() -> None:
        for _ in range(scans * ticks + 2):
            log.append(".")
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(scan(str(i)) for i in range(scans)), light())
    asyncio.run(main())
    return "".join(log)


def test_heavy_requests_take_turns_so_a_light_task_waits_behind_one_slice(monkeypatch):
    monkeypatch.setattr(store_module, "SCAN_CHUNK", 1)  # every record is a slice
    monkeypatch.setattr(store_module, "TURN_SECONDS", 3600)  # no hand-over within this test
    log = _interleaving()
    assert max(len(run) for run in log.split(".")) == 1, log  # never two slices in a row
    assert log.replace(".", "") == "0" * 12 + "1" * 12 + "2" * 12  # in turn, first come first served
    monkeypatch.setattr(store_module, "TURN_SECONDS", 0)  # hand over at every slice: round robin
    assert _interleaving().replace(".", "").startswith("012012")


# -- safe by default -----------------------------------------------------------------------------


def test_non_loopback_host_without_token_is_refused_before_listening():
    done = subprocess.run([sys.executable, "-m", "mailproof.capture.service", "--host", "0.0.0.0",
                           "--smtp-port", "0", "--http-port", "0"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30,
                          env={**__import__("os").environ, "MAILPROOF_SINK_TOKEN": ""})
    assert done.returncode == 2
    assert "READY" not in done.stdout  # it exited before binding anything
    assert "refusing to listen on '0.0.0.0'" in done.stderr and "--token" in done.stderr


def test_a_token_of_only_white_space_is_refused_at_start():
    from mailproof.capture.service.cli import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["--token", "   "])
    assert exited.value.code == 2


def test_off_loopback_smtp_requires_auth_derived_from_the_token_unless_open(monkeypatch, capsys):
    from mailproof.capture.service.cli import TOKEN_USER, parse_args

    monkeypatch.delenv("MAILPROOF_SINK_AUTH", raising=False)
    assert parse_args(["--host", "0.0.0.0", "--token", "t0k"]).auth == (TOKEN_USER, "t0k")
    assert parse_args(["--host", "0.0.0.0", "--token", "t0k", "--open-smtp"]).auth is None
    assert parse_args(["--host", "0.0.0.0", "--token", "t0k", "--auth", "app:pw"]).auth == ("app", "pw")
    assert parse_args([]).auth is None  # loopback: open, as a local test double


def test_a_deeply_nested_fault_rule_is_a_400_not_a_500(service):
    # Written as text: json.dumps itself would refuse to encode this much nesting.
    body = '{"stage": "rcpt", "action": ' + '{"delay": 0.1, "then": ' * 5000 + '"451 4.3.0 later"' + "}" * 5001
    answer = requests.post(service.url + "/faults", data=body, timeout=30,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "nested" in answer.json()["error"], answer.text
    shallow = '{"stage": "rcpt", "to": "x@deep.test", "action": ' + '{"delay": 0.1, "then": ' * 3 + '"451 4.3.0 later"' + "}" * 4
    added = requests.post(service.url + "/faults", data=shallow, timeout=30, headers={"Content-Type": "application/json"})
    assert added.status_code == 201, added.text  # a real rule of a few levels still goes in
    service.json(f"/faults/{added.json()['id']}", method="DELETE")


def test_with_a_token_every_endpoint_requires_it():
    svc = Service(token="s3cret-token")
    try:
        for path in ("/health", "/messages", "/stats", "/faults", "/wait?timeout=0", "/stream"):
            bare = requests.get(svc.url + path, timeout=10)
            assert bare.status_code == 401, path
            assert "Bearer" in bare.headers["WWW-Authenticate"]
            wrong = requests.get(svc.url + path, timeout=10, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        assert requests.delete(svc.url + "/messages", timeout=10).status_code == 401
        assert requests.post(svc.url + "/faults", json={}, timeout=10).status_code == 401
        assert svc.json("/health")["token_required"] is True
        assert svc.get("/wait?timeout=0").status_code == 408  # authorized: a real answer
    finally:
        assert svc.stop() == 0


# -- STARTTLS and AUTH ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_service():
    """--tls starttls-required, the credentials from the environment (kept out of ps)."""
    svc = Service("--tls", "starttls-required", "--tls-hostname", "sink.internal",
                  env={"MAILPROOF_SINK_AUTH": "app:s3cret"})
    yield svc
    assert svc.stop() == 0, svc.process.tail()
    assert not Path(svc.ca_file).exists(), "the temporary CA file outlived the service"


def test_tls_service_names_its_ca_on_the_ready_line_and_in_health(secure_service):
    assert secure_service.ca_file and Path(secure_service.ca_file).read_text().startswith("-----BEGIN CERTIFICATE")
    health = secure_service.json("/health")
    assert health["tls"] == {"mode": "starttls-required", "ca_file": secure_service.ca_file}
    assert health["auth_required"] is True
    assert "s3cret" not in json.dumps(health)
    assert "s3cret" not in " ".join(secure_service.process.command)


def test_tls_service_refuses_mail_before_starttls_and_before_auth(secure_service):
    trusting = ssl.create_default_context(cafile=secure_service.ca_file)
    since = secure_service.last_seq()
    with smtplib.SMTP("127.0.0.1", secure_service.smtp_port, timeout=10) as smtp:
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("app@example.test", ["x@svc.test"], make_raw("x@svc.test"))
        assert refused.value.smtp_code == 530  # STARTTLS first
    with smtplib.SMTP("127.0.0.1", secure_service.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=trusting)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("app@example.test", ["x@svc.test"], make_raw("x@svc.test"))
        assert refused.value.smtp_code == 530  # then AUTH
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.login("app", "wrong")
        assert failed.value.smtp_code == 535
    assert secure_service.last_seq() == since


def test_tls_service_records_the_session_in_views_and_stream(secure_service):
    to = addr("secure")
    conn, response = open_stream(secure_service, "heartbeat=30")
    try:
        assert "hello" in read_event(response)
        with smtplib.SMTP("localhost", secure_service.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=secure_service.ca_file))  # by name too
            smtp.login("app", "s3cret")
            smtp.sendmail("app@example.test", [to], make_raw(to, "Secure"))
        event = read_event(response)
        assert (event["tls"], event["auth_user"], event["rcpt_tos"]) == (True, "app", [to])
    finally:
        conn.close()
    parsed = secure_service.json(f"/messages/{event['seq']}")
    assert (parsed["tls"], parsed["auth_user"], parsed["subject"]) == (True, "app", "Secure")


def test_plain_stream_lines_say_no_tls_and_no_auth(service):
    to = addr("plainline")
    conn, response = open_stream(service, "heartbeat=30")
    try:
        assert "hello" in read_event(response)
        service.send([to], make_raw(to))
        event = read_event(response)
        assert (event["tls"], event["auth_user"]) == (False, None)
    finally:
        conn.close()


def test_tls_ca_file_option_writes_where_told(tmp_path):
    target = tmp_path / "ca" / "sink.pem"
    svc = Service("--tls", "starttls", "--tls-ca-file", str(target))
    try:
        assert svc.ca_file == str(target) and target.exists()
        with smtplib.SMTP("127.0.0.1", svc.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=str(target)))
            assert smtp.sendmail("app@example.test", ["t@svc.test"], make_raw("t@svc.test")) == {}
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize("args, env, said", [
    (["--auth", "no-colon-hunter2"], {}, "USER:PASSWORD"),
    ([], {"MAILPROOF_SINK_AUTH": "user:"}, "neither part empty"),
    (["--tls-ca-file", "/tmp/x.pem"], {}, "need --tls"),
    (["--tls", "ssl"], {}, "invalid choice"),
])
def test_bad_tls_and_auth_arguments_exit_2_before_listening(args, env, said):
    done = subprocess.run([sys.executable, "-m", "mailproof.capture.service", "--smtp-port", "0",
                           "--http-port", "0", *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert "READY" not in done.stdout and said in done.stderr
    assert "hunter2" not in done.stderr


# -- fault_specs as a library --------------------------------------------------------------------


def test_action_specs_round_trip():
    specs = [
        {"reply": "451 4.3.0 later"},
        {"reply": "550-5.1.1 no such user\n550 5.1.1 really"},
        {"script": [{"reply": "451 4.3.0 x"}, {"accept": True}], "after": {"disconnect": True}},
        {"delay": 0.5, "then": {"stall": 3.0}},
        {"stall": None},
        {"chaos": {"p": 0.05, "seed": 1, "action": {"disconnect": True}}},
        {"rate_limit": {"per_second": 50.0, "reply": "451 4.7.0 slow down"}},
    ]
    for spec in specs:
        assert action_to_spec(action_from_spec(spec)) == spec
    assert isinstance(action_from_spec("451 4.3.0 x"), Reply)
    assert action_to_spec(None) == {"accept": True}
    rule = rule_from_spec({"stage": "rcpt", "to": "a@x", "scope": "t1", "action": {"reply": "451 4.3.0 later"}})
    assert (rule.stage, rule.to, rule.scope, rule.action.reply) == ("rcpt", "a@x", "t1", "451 4.3.0 later")
    assert rule_from_spec(rule_to_spec(rule)).action == rule.action


def test_chaos_profile_grammar():
    rules = parse_chaos_profile("5%:rcpt:451, 1%:after_data:disconnect,ratelimit:50/s:rcpt:451,"
                                "0.5%:data:stall=2,100%:mail:delay=0.1,2%:rcpt:550 5.7.1 blocked",
                                seed=10, scope="rehearsal")
    assert [r.stage for r in rules] == ["rcpt", "after_data", "rcpt", "data", "mail", "rcpt"]
    assert all(r.scope == "rehearsal" for r in rules)
    chaos, drop, limit, stall, delay, custom = (r.action for r in rules)
    assert isinstance(chaos, Chaos) and chaos.p == 0.05 and chaos.seed == 10 and chaos.action.reply.startswith("451 4.3.0")
    assert isinstance(drop.action, Disconnect) and drop.seed == 11
    assert isinstance(limit, RateLimit) and limit.per_second == 50 and limit.reply.startswith("451")
    assert isinstance(stall.action, Stall) and stall.action.seconds == 2 and stall.p == 0.005
    assert isinstance(delay.action, Delay) and delay.action.seconds == 0.1
    assert custom.action.reply == "550 5.7.1 blocked"
    for bad, why in [("5:rcpt:451", "5%"), ("5%:helo:451", "stage"), ("5%:rcpt:250", "unknown outcome"), ("5%:rcpt:45", "not an SMTP reply"),
                     ("ratelimit:fast:rcpt", "50/s"), ("5%:rcpt:explode", "unknown outcome"),
                     ("5%:rcpt:451,,1%:data:451", "empty item"), ("", "empty"), ("200%:rcpt:451", "100%")]:
        with pytest.raises(FaultError, match=re.escape(why)):
            parse_chaos_profile(bad)
    assert isinstance(Script(["451 4.3.0 x"]).steps[0], Reply)  # the actions fault_specs builds on
