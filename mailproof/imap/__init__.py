"""Real IMAP inboxes as a capture backend: a private Dovecot, or a staging account (imap-tools).

Needs the ``imap`` extra: ``pip install 'mailproof[imap]'``.

- ``account``: ImapAccount, the settings and their validation;
- ``connection``: opening one IMAP session, or an error naming the setting to fix;
- ``headers``: what a fetched message says (recipients, sender, hops) and the FETCH reply format;
- ``watcher``: ImapWatcher, one connection per account (IDLE/NOOP, reconnect, cleanup by UID);
- ``backend``: ImapBackend and open_imap_backend (private Dovecot/Postfix or LMTP relay, nudges).
"""

from mailproof.imap.account import CONNECT_TIMEOUT, ImapAccount, setting_name
from mailproof.imap.backend import ImapBackend, open_imap_backend
from mailproof.imap.headers import parse_hops, recipients_for
from mailproof.imap.watcher import ImapWatcher

__all__ = ["CONNECT_TIMEOUT", "ImapAccount", "ImapBackend", "ImapWatcher", "open_imap_backend",
           "parse_hops", "recipients_for", "setting_name"]
