"""mailproof: prove that every email a product sends arrives, says the right thing, and arrives fast.

Public API for flows and tests; see README.md.
"""

from mailproof.addresses import AddressBook
from mailproof.servers.app_process import AppProcess
from mailproof.criteria import Criteria
from mailproof.capture.embedded import EmbeddedSink
from mailproof.errors import HarnessError, MailLate, MailNotDelivered, MailproofError, UnexpectedMail
from mailproof.flow import Flow, FlowInfo, flow, flow_info, run
from mailproof.http import AppSession
from mailproof.mailbox import Mailbox, MailStore
from mailproof.message import Attachment, Link, Message

__all__ = [
    "AddressBook", "AppProcess", "AppSession", "Attachment", "Criteria", "EmbeddedSink", "Flow",
    "FlowInfo", "HarnessError", "Link", "MailLate", "MailNotDelivered", "MailStore", "Mailbox", "MailproofError",
    "Message", "UnexpectedMail", "flow", "flow_info", "run",
]
