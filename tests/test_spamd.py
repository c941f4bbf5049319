"""The spam check against a real SpamAssassin spamd, started offline by mailproof.servers.spamd."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone

import pytest

from mailproof import Message
from mailproof.checks import FAILED, PASSED, CheckConfig, Checks
from mailproof.servers import spamd as spamd_module
from mailproof.servers.process import tcp_sockets
from mailproof.servers.spamd import Spamd, SpamdError


@pytest.fixture(scope="module")
def spamd():
    with Spamd() as server:
        yield server


def email(subject: str, body: str, *, dated: bool = True) -> Message:
    msg = EmailMessage()
    msg["From"] = "Demo Shop <no-reply@demo-shop.test>"
    msg["To"] = "qa@mailproof.test"
    msg["Subject"] = subject
    if dated:
        msg["Date"] = format_datetime(datetime.now(timezone.utc))
        msg["Message-ID"] = make_msgid(domain="demo-shop.test")
    msg.set_content(body)
    return Message(msg.as_bytes())


def test_spamd_listens_on_loopback_only(spamd):
    listening = [(ip, port) for ip, port, _, _ in tcp_sockets("LISTEN") if port == spamd.port]
    assert listening == [("127.0.0.1", spamd.port)]


def test_a_plain_receipt_scores_low(spamd):
    result = Checks(email("Your receipt", "Thank you for your order 1234.\n"), CheckConfig(spamd=spamd.address)).spam()
    assert result.verdict == PASSED, result.describe()
    assert result.data["score"] < 2.5


def test_spam_fails_with_the_rules_that_hit(spamd):
    spammy = email("FREE VIAGRA!!! WIN NOW", "CLICK HERE: 100% guaranteed, no risk! Cheap viagra.\n", dated=False)
    result = Checks(spammy, CheckConfig(spamd=spamd.address)).spam()
    assert result.verdict == FAILED and result.summary.startswith("spam: score")
    assert {"MISSING_DATE", "MISSING_MID"} <= set(result.data["rules"]), result.describe()
    assert any(line.startswith("+") and "MISSING_DATE: Missing Date: header" in line for line in result.details)


def test_threshold_is_the_callers(spamd):
    msg = email("Your receipt", "Thank you for your order 1234.\n", dated=False)  # MISSING_DATE, MISSING_MID
    assert Checks(msg, CheckConfig(spamd=spamd.address)).spam(threshold=1.0).verdict == FAILED


def test_a_missing_spamd_names_the_install_command(monkeypatch):
    monkeypatch.setattr(spamd_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(spamd_module.os, "access", lambda path, mode: False)
    with pytest.raises(SpamdError, match=r"apt-get install -y spamassassin spamd"):
        Spamd().start()
