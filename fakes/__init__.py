"""Servers that stand in for the world around the application under test.

Only stdlib and third-party imports here: the harness (mailproof) uses these, never the reverse.
"""

from fakes.smtp_sink import CapturedMail, SinkError, SmtpSink

__all__ = ["CapturedMail", "SinkError", "SmtpSink"]
