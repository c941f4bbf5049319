"""Everything that receives mail: the in-process SMTP sink, the sink service and its client, the
LMTP relay in front of a private Dovecot.

Each feeds a ``MailStore`` (``mailproof.mailbox``) with raw bytes; nothing here parses a message
to decide where it goes: the envelope routes it, and ``Message`` parses it when a test asks.
"""

from mailproof.capture.embedded import EmbeddedSink
from mailproof.capture.remote import RemoteFaults, RemoteSink, SinkServiceError
from mailproof.capture.smtp_sink import CapturedMail, SinkError, SmtpSink

__all__ = ["CapturedMail", "EmbeddedSink", "RemoteFaults", "RemoteSink", "SinkError", "SinkServiceError",
           "SmtpSink"]
