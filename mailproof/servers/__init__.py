"""Real servers started for a test run: the application under test, Dovecot, Postfix, spamd.

Each runs as its own process in its own process group (ManagedProcess, process.py), on
loopback, with private directories and free ports; stopping ends the whole group.
"""

from mailproof.servers.app_process import AppProcess
from mailproof.servers.dovecot import Dovecot, DovecotError
from mailproof.servers.postfix import Postfix, PostfixError
from mailproof.servers.process import ManagedProcess
from mailproof.servers.spamd import Spamd, SpamdError

__all__ = ["AppProcess", "Dovecot", "DovecotError", "ManagedProcess", "Postfix", "PostfixError", "Spamd", "SpamdError"]
