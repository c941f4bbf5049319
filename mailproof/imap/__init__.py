"""Real IMAP inboxes as a capture backend: a private Dovecot, or a staging account (imap-tools).

Needs the ``imap`` extra: ``pip install 'mailproof[imap]'``.
"""

from mailproof.imap.backend import ImapAccount, ImapBackend, ImapWatcher, open_imap_backend

__all__ = ["ImapAccount", "ImapBackend", "ImapWatcher", "open_imap_backend"]
