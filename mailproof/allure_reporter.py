"""Report a flow to Allure: steps, HTTP calls, and every awaited email with its latency.

Each email gets its HTML body, text body, headers and raw .eml attached (message/rfc822 alone is
download-only in Allure, see NOTES.md). Allure calls are no-ops when no --alluredir is given.
"""

from __future__ import annotations

from typing import Any, ContextManager, Optional

import allure

from mailproof.criteria import Criteria
from mailproof.message import Message


_VERBS = {"delivered": "Received", "late": "LATE", "unexpected": "UNEXPECTED"}


def mail_title(event: str, msg: Message) -> str:
    latency = f"{msg.latency * 1000:.0f} ms after trigger" if msg.latency is not None else "latency unknown"
    return f"{_VERBS.get(event, event)}: {msg.subject!r} to {', '.join(msg.rcpt_tos) or ', '.join(msg.to)} ({latency})"


def attach_message(msg: Message) -> None:
    if msg.html is not None:
        allure.attach(msg.html, name="HTML body", attachment_type=allure.attachment_type.HTML)
    if msg.text is not None:
        allure.attach(msg.text, name="Text body", attachment_type=allure.attachment_type.TEXT)
    headers = "\n".join(f"{name}: {value}" for name, value in msg.headers)
    envelope = f"Envelope-From: {msg.mail_from}\nEnvelope-To: {', '.join(msg.rcpt_tos)}\n"
    allure.attach(envelope + headers, name="Headers", attachment_type=allure.attachment_type.TEXT)
    if msg.links:
        links = "\n".join(f"{link.url}  [{link.text or link.source}]" for link in msg.links)
        allure.attach(links, name="Links", attachment_type=allure.attachment_type.TEXT)
    for att in msg.attachments:
        # A plain MIME string is accepted as the attachment type; the extension names the file.
        allure.attach(att.data, name=f"Attachment {att.filename or att.content_type}",
                      attachment_type=att.content_type, extension=_extension(att.filename))
    allure.attach(msg.raw, name="Raw message (.eml)", attachment_type="message/rfc822", extension="eml")


def _extension(filename: str | None) -> str:
    if filename and "." in filename:
        return filename.rsplit(".", 1)[-1]
    return "bin"


class AllureReporter:
    def step(self, name: str) -> ContextManager[Any]:
        return allure.step(name)

    def http(self, method: str, url: str, response: Any, seconds: float) -> None:
        status = getattr(response, "status_code", "?")
        with allure.step(f"HTTP {method} {url} -> {status} ({seconds * 1000:.0f} ms)"):
            pass

    def mail(self, event: str, msg: Optional[Message], criteria: Criteria,
             error: Optional[Exception], step: str) -> None:
        if msg is None:  # missing: the failure itself carries the near misses
            return
        with allure.step(mail_title(event, msg)):
            attach_message(msg)
