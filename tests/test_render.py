"""Every awaited email as a picture: --mailproof-render attaches PNGs drawn by real headless
Chromium (Debian package chromium), and each check a flow runs is an Allure step.

A small project mails a receipt with an inline ``cid:`` logo and a remote tracking pixel to the
in-process sink, waits for it and runs two checks; its Allure results must hold a 600 px and a
375 px PNG of that email and a step per check with the details attached, and Chromium must have
been asked for nothing but the page itself.
"""

from __future__ import annotations

import glob
import json
import shutil
import struct
from pathlib import Path

import pytest

from mailproof.report.render import INSTALL, Renderer

PNG_RED = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000000301"
    "0100c9fe92ef0000000049454e44ae426082")

PROJECT = r'''
import smtplib
from email.message import EmailMessage

import pytest

from mailproof import flow

LOGO = bytes.fromhex("%(logo)s")


@pytest.fixture(scope="session")
def mailproof_app_url():
    return "http://127.0.0.1:9/"  # the flow mails directly; no HTTP call is made


def receipt(to):
    msg = EmailMessage()
    msg["From"] = "shop@shop.invalid"
    msg["To"] = to
    msg["Subject"] = "Your receipt"
    msg.set_content("Total: 45.00 EUR\n")
    msg.add_alternative('<h1>Receipt</h1><img src="cid:logo@shop.invalid" alt="logo" width="40" height="40">'
                        '<img src="https://tracker.invalid/p.gif" alt="">'
                        '<p style="position: absolute">Total: 45.00 EUR</p>', subtype="html")
    msg.get_payload()[1].add_related(LOGO, "image", "png", cid="<logo@shop.invalid>", filename="logo.png")
    return msg


@flow(feature="Orders", story="Receipt picture")
def receipt_picture(flow, backend):
    address = flow.mailbox.address("pic")
    flow.mark()
    with smtplib.SMTP(backend.smtp_host, backend.smtp_port, timeout=10) as client:
        client.send_message(receipt(address))
    msg = flow.mailbox.wait_for(to=address, subject="Your receipt", within=5)
    assert msg.checks.clients().verdict == "warning"
    assert msg.checks.dkim().verdict == "failed"  # unsigned: the step is failed, the test is not


def test_receipt_picture(run_flow, mailproof_backend):
    run_flow(receipt_picture, backend=mailproof_backend)
'''


@pytest.fixture(scope="module")
def chromium():
    if shutil.which("chromium") is None:
        pytest.fail(f"rendering needs Chromium: {INSTALL}", pytrace=False)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def steps(node: dict):
    for step in node.get("steps", []):
        yield step
        yield from steps(step)


def test_a_flow_run_attaches_pngs_at_both_widths_and_a_step_per_check(pytester, chromium):
    pytester.makepyfile(test_pic=PROJECT % {"logo": PNG_RED.hex()})
    alluredir = pytester.path / "allure"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--alluredir", str(alluredir),
                                           "--mailproof-render", "-q")
    result.assert_outcomes(passed=1)
    (test,) = [json.loads(Path(f).read_text()) for f in glob.glob(str(alluredir / "*-result.json"))]
    mail = next(s for s in steps(test) if s["name"].startswith("Received: 'Your receipt'"))
    pictures = {a["name"]: (alluredir / a["source"]).read_bytes() for a in mail["attachments"]
                if a["name"].startswith("Rendered at")}
    assert sorted(pictures) == ["Rendered at 375 px", "Rendered at 600 px"]
    assert png_size(pictures["Rendered at 600 px"])[0] == 600
    assert png_size(pictures["Rendered at 375 px"])[0] == 375
    assert not [a for a in mail["attachments"] if a["name"].startswith("Rendering")]  # nothing blocked, no error
    checks = {s["name"].split(":")[0]: s for s in steps(test) if s["name"].startswith("Check ")}
    assert set(checks) == {"Check clients", "Check dkim"}
    assert checks["Check dkim"]["status"] == "failed" and checks["Check clients"]["status"] == "passed"
    details = (alluredir / checks["Check clients"]["attachments"][0]["source"]).read_text()
    assert "css-position: CSS position not supported by Gmail" in details


def test_the_renderer_inlines_cid_images_and_loads_nothing(chromium):
    renderer = Renderer()
    try:
        html = ('<p>x</p><img src="cid:a@b" alt="a" width="50" height="50">'
                '<img src="https://tracker.invalid/p.gif" alt=""><link rel="stylesheet" href="https://cdn.invalid/s.css">')
        with_logo = renderer.render(html, [("a@b", "image/png", PNG_RED)])
        without = renderer.render(html, [])
    finally:
        renderer.close()
    assert sorted(with_logo.pngs) == [375, 600] and with_logo.blocked == [] and without.blocked == []
    assert png_size(with_logo.pngs[600]) == (600, with_logo.heights[600])
    # The inlined 50 px logo takes room the missing one does not.
    assert with_logo.pngs[600] != without.pngs[600]
