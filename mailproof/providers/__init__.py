"""Capture of mail sent through providers' HTTP APIs: SendGrid, Mailgun, Amazon SES v2, Postmark.

    with ProviderCapture(store) as capture:          # one loopback port for all four APIs
        SendGridAPIClient(capture.keys.sendgrid, host=capture.url).send(mail)
        ...                                           # the Message lands in store, source "sendgrid"

Each provider module documents which parts of its API are covered. ``faults`` makes the providers
misbehave (their own error bodies, 401/403, 429 with rate-limit headers, 5xx, slow answers, bounce
and complaint events); ``webhooks`` posts their signed event webhooks back to the application.
"""

from mailproof.providers.base import Event, Provider
from mailproof.providers.compose import Attachment, Outgoing, compose
from mailproof.providers.faults import (PROVIDERS, ProviderFault, ProviderFaultError, ProviderFaultPlan,
                                        ScopedProviderFaults)
from mailproof.providers.server import Keys, ProviderCapture, ProviderCaptureError, Submitted
from mailproof.providers.webhooks import WebhookError, WebhookLog, WebhookRecord, WebhookTarget

__all__ = ["PROVIDERS", "Attachment", "Event", "Keys", "Outgoing", "Provider", "ProviderCapture",
           "ProviderCaptureError", "ProviderFault", "ProviderFaultError", "ProviderFaultPlan",
           "ScopedProviderFaults", "Submitted", "WebhookError", "WebhookLog", "WebhookRecord", "WebhookTarget",
           "compose"]
